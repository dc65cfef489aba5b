//! The local CA as a JVM sees it. Java's PKIX validator does not apply a
//! trusted root's own name constraints, only those of the certificates
//! below it: this is why the CA signs leaves with a constrained
//! intermediate and drops the root's key. Checked with the JDK's own
//! validator on real files (the CA as `run` makes it).

use std::path::Path;
use std::process::Command;

use rcgen::{
    BasicConstraints, CertificateParams, CidrSubnet, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, GeneralSubtree, IsCa, Issuer, KeyPair, KeyUsagePurpose,
    NameConstraints, SanType,
};

/// `java PathCheck.java ROOT CERTS...`: VALID or INVALID with a reason.
fn java_validates(root: &Path, path: &[&Path]) -> String {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/java/PathCheck.java");
    let out = Command::new("java")
        .arg(src)
        .arg(root)
        .args(path)
        .output()
        .expect("java runs (the JDK is a test prerequisite: cargo xtask setup)");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// A leaf for `host` signed with `key_pem` as the certificate `issuer_pem`:
/// what a stolen `ca.key` can sign.
fn leaf(dir: &Path, name: &str, host: &str, issuer_pem: &str, key_pem: &str) -> std::path::PathBuf {
    let key = KeyPair::from_pem(key_pem).expect("key");
    let issuer = Issuer::from_ca_cert_pem(issuer_pem, key).expect("issuer");
    let leaf_key = KeyPair::generate().expect("leaf key");
    let mut p = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, host);
    p.distinguished_name = dn;
    p.subject_alt_names = vec![SanType::DnsName(host.to_string().try_into().expect("ia5"))];
    p.not_before = time::OffsetDateTime::now_utc() - time::Duration::hours(1);
    p.not_after = time::OffsetDateTime::now_utc() + time::Duration::days(30);
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    p.use_authority_key_identifier_extension = true;
    let pem = p.signed_by(&leaf_key, &issuer).expect("signs").pem();
    let path = dir.join(name);
    std::fs::write(&path, pem).expect("write leaf");
    path
}

#[test]
#[ignore = "needs a JDK (java on PATH; cargo xtask setup installs one)"]
fn a_stolen_ca_key_cannot_sign_for_another_site_even_for_java() {
    let t = tempfile::tempdir().expect("tempdir");
    let hosts = vec!["api.openai.com".to_string()];
    tollgate::ca::LocalCa::load_or_create(t.path(), &hosts).expect("CA");
    let ca = t.path().join("ca");
    let read = |f: &str| std::fs::read_to_string(ca.join(f)).expect(f);
    let (root, intermediate) = (ca.join("ca.crt"), ca.join("intermediate.crt"));
    let key = read("ca.key");
    // A provider host: valid.
    let good = leaf(
        t.path(),
        "good.pem",
        "api.openai.com",
        &read("intermediate.crt"),
        &key,
    );
    assert_eq!(java_validates(&root, &[&good, &intermediate]), "VALID");
    // Any other site, with the key on disk: refused by the intermediate's
    // constraints.
    let evil = leaf(
        t.path(),
        "evil.pem",
        "login.example-bank.com",
        &read("intermediate.crt"),
        &key,
    );
    let verdict = java_validates(&root, &[&evil, &intermediate]);
    assert!(verdict.starts_with("INVALID"), "{verdict}");

    // Why: a CA made before intermediates (the root's key on disk, its
    // constraints on the trust anchor alone) would let Java accept it.
    let old = t.path().join("old");
    std::fs::create_dir_all(&old).expect("dir");
    let old_key = KeyPair::generate().expect("key");
    let mut p = CertificateParams::default();
    p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, "old-style tollgate CA");
    p.distinguished_name = dn;
    p.name_constraints = Some(NameConstraints {
        permitted_subtrees: vec![GeneralSubtree::DnsName("api.openai.com".into())],
        excluded_subtrees: vec![
            GeneralSubtree::IpAddress(CidrSubnet::V4([0; 4], [0; 4])),
            GeneralSubtree::IpAddress(CidrSubnet::V6([0; 16], [0; 16])),
        ],
    });
    let old_pem = p.self_signed(&old_key).expect("self-signed").pem();
    let old_root = old.join("ca.crt");
    std::fs::write(&old_root, &old_pem).expect("write");
    let evil = leaf(
        &old,
        "evil.pem",
        "login.example-bank.com",
        &old_pem,
        &old_key.serialize_pem(),
    );
    assert_eq!(
        java_validates(&old_root, &[&evil]),
        "VALID",
        "the JDK ignores a trust anchor's own name constraints"
    );
}
