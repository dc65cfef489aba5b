//! A throwaway PKI for the fake provider: a test CA and leaves for the
//! provider host names, written as PEM files in a temp dir. The agent trusts
//! the test CA through `[upstream] extra_ca`.

use std::path::{Path, PathBuf};

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose};

pub struct TestPki {
    pub dir: tempfile::TempDir,
    pub ca_pem: String,
    issuer: Issuer<'static, KeyPair>,
}

pub struct Leaf {
    pub cert_pem: String,
    pub key_pem: String,
}

impl TestPki {
    pub fn new() -> TestPki {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("params");
        params
            .distinguished_name
            .push(DnType::CommonName, "tollgate test upstream CA");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let key = KeyPair::generate().expect("key");
        let cert = params.self_signed(&key).expect("self-signed");
        let ca_pem = cert.pem();
        std::fs::write(dir.path().join("upstream-ca.pem"), &ca_pem).expect("write ca");
        let issuer = Issuer::new(params, key);
        TestPki {
            dir,
            ca_pem,
            issuer,
        }
    }

    pub fn ca_path(&self) -> PathBuf {
        self.dir.path().join("upstream-ca.pem")
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    pub fn leaf(&self, host: &str) -> Leaf {
        let mut params = CertificateParams::new(vec![host.to_string()]).expect("params");
        params.distinguished_name.push(DnType::CommonName, host);
        let key = KeyPair::generate().expect("key");
        let cert = params.signed_by(&key, &self.issuer).expect("sign leaf");
        Leaf {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        }
    }
}

impl Default for TestPki {
    fn default() -> Self {
        Self::new()
    }
}
