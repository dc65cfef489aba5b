//! Reads a whole TLS ClientHello from a client, however it is split into
//! records and segments, and extracts the SNI. The bytes read are returned
//! unchanged so they can be replayed to rustls or to the original server.
//!
//! Must never: read past the ClientHello (the bytes after it belong to the
//! TLS session), or grow without bound.

use tokio::io::{AsyncRead, AsyncReadExt};

/// A ClientHello larger than this is refused (real ones, post-quantum key
/// shares included, are a few KiB).
pub const MAX_CLIENT_HELLO: usize = 64 << 10;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum HelloError {
    #[error("connection closed before the ClientHello was complete")]
    Eof,
    #[error("not a TLS handshake (first byte {0:#04x})")]
    NotTls(u8),
    #[error("malformed ClientHello: {0}")]
    Malformed(&'static str),
    #[error("ClientHello larger than {MAX_CLIENT_HELLO} bytes")]
    TooLarge,
    #[error("read error: {0}")]
    Io(String),
}

/// What the proxy needs from the ClientHello.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ClientHello {
    /// The server name, lower-cased, if the client sent one.
    pub sni: Option<String>,
    /// ALPN protocols offered.
    pub alpn: Vec<String>,
}

/// Reads records until the ClientHello handshake message is complete.
/// Returns the parsed hello and every byte read (whole records only).
pub async fn read_client_hello<R: AsyncRead + Unpin>(
    r: &mut R,
) -> Result<(ClientHello, Vec<u8>), HelloError> {
    let mut raw = Vec::with_capacity(2048);
    let mut handshake = Vec::with_capacity(2048);
    loop {
        let mut header = [0u8; 5];
        read_exact(r, &mut header).await?;
        if header[0] != 22 {
            return Err(if raw.is_empty() {
                HelloError::NotTls(header[0])
            } else {
                HelloError::Malformed("non-handshake record inside the ClientHello")
            });
        }
        if header[1] != 3 {
            return Err(HelloError::Malformed("record version is not 3.x"));
        }
        let len = u16::from_be_bytes([header[3], header[4]]) as usize;
        if len == 0 || len > 16384 + 2048 {
            return Err(HelloError::Malformed("bad record length"));
        }
        if raw.len() + 5 + len > MAX_CLIENT_HELLO {
            return Err(HelloError::TooLarge);
        }
        raw.extend_from_slice(&header);
        let start = raw.len();
        raw.resize(start + len, 0);
        read_exact(r, &mut raw[start..]).await?;
        handshake.extend_from_slice(&raw[start..]);
        if handshake.len() >= 4 {
            if handshake[0] != 1 {
                return Err(HelloError::Malformed(
                    "first handshake message is not a ClientHello",
                ));
            }
            let body_len =
                u32::from_be_bytes([0, handshake[1], handshake[2], handshake[3]]) as usize;
            if body_len + 4 > MAX_CLIENT_HELLO {
                return Err(HelloError::TooLarge);
            }
            if handshake.len() >= body_len + 4 {
                let hello = parse_client_hello(&handshake[4..4 + body_len])?;
                return Ok((hello, raw));
            }
        }
    }
}

async fn read_exact<R: AsyncRead + Unpin>(r: &mut R, buf: &mut [u8]) -> Result<(), HelloError> {
    let mut filled = 0;
    while filled < buf.len() {
        match r.read(&mut buf[filled..]).await {
            Ok(0) => return Err(HelloError::Eof),
            Ok(n) => filled += n,
            Err(e) => return Err(HelloError::Io(e.to_string())),
        }
    }
    Ok(())
}

struct Cursor<'a> {
    b: &'a [u8],
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], HelloError> {
        if self.b.len() < n {
            return Err(HelloError::Malformed("truncated"));
        }
        let (h, t) = self.b.split_at(n);
        self.b = t;
        Ok(h)
    }
    fn u8(&mut self) -> Result<usize, HelloError> {
        Ok(self.take(1)?[0] as usize)
    }
    fn u16(&mut self) -> Result<usize, HelloError> {
        let b = self.take(2)?;
        Ok(u16::from_be_bytes([b[0], b[1]]) as usize)
    }
    fn vec8(&mut self) -> Result<&'a [u8], HelloError> {
        let n = self.u8()?;
        self.take(n)
    }
    fn vec16(&mut self) -> Result<&'a [u8], HelloError> {
        let n = self.u16()?;
        self.take(n)
    }
}

/// Parses the body of a ClientHello handshake message.
pub fn parse_client_hello(body: &[u8]) -> Result<ClientHello, HelloError> {
    let mut c = Cursor { b: body };
    c.take(2)?; // legacy_version
    c.take(32)?; // random
    c.vec8()?; // legacy_session_id
    c.vec16()?; // cipher_suites
    c.vec8()?; // legacy_compression_methods
    let mut hello = ClientHello::default();
    if c.b.is_empty() {
        return Ok(hello);
    }
    let mut exts = Cursor { b: c.vec16()? };
    while !exts.b.is_empty() {
        let ty = exts.u16()?;
        let data = exts.vec16()?;
        match ty {
            0 => {
                let mut list = Cursor {
                    b: Cursor { b: data }.vec16()?,
                };
                while !list.b.is_empty() {
                    let name_type = list.u8()?;
                    let name = list.vec16()?;
                    if name_type == 0 {
                        let s = std::str::from_utf8(name)
                            .map_err(|_| HelloError::Malformed("SNI is not ASCII"))?;
                        if s.is_empty() || !s.is_ascii() {
                            return Err(HelloError::Malformed("SNI is not a host name"));
                        }
                        hello.sni = Some(s.to_ascii_lowercase());
                    }
                }
            }
            16 => {
                let mut list = Cursor {
                    b: Cursor { b: data }.vec16()?,
                };
                while !list.b.is_empty() {
                    let p = list.vec8()?;
                    hello.alpn.push(String::from_utf8_lossy(p).into_owned());
                }
            }
            _ => {}
        }
    }
    Ok(hello)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A ClientHello made by rustls itself, with a large extension to make
    /// it span several records when split.
    fn rustls_hello(sni: &str) -> Vec<u8> {
        use std::sync::Arc;
        let roots = rustls::RootCertStore::empty();
        let mut cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::aws_lc_rs::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
        cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        let mut conn =
            rustls::ClientConnection::new(Arc::new(cfg), sni.to_string().try_into().unwrap())
                .unwrap();
        let mut out = Vec::new();
        conn.write_tls(&mut out).unwrap();
        out
    }

    /// Re-frames one handshake message into records of at most `n` bytes.
    fn split_records(wire: &[u8], n: usize) -> Vec<u8> {
        let len = u16::from_be_bytes([wire[3], wire[4]]) as usize;
        let payload = &wire[5..5 + len];
        let mut out = Vec::new();
        for chunk in payload.chunks(n) {
            out.extend_from_slice(&[22, 3, 1]);
            out.extend_from_slice(&(chunk.len() as u16).to_be_bytes());
            out.extend_from_slice(chunk);
        }
        out
    }

    fn read_all(bytes: Vec<u8>) -> Result<(ClientHello, Vec<u8>), HelloError> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        rt.block_on(async move {
            let mut r = &bytes[..];
            read_client_hello(&mut r).await
        })
    }

    #[test]
    fn reads_sni_and_alpn_from_real_hello() {
        let wire = rustls_hello("API.OpenAI.com");
        let (h, raw) = read_all(wire.clone()).unwrap();
        assert_eq!(h.sni.as_deref(), Some("api.openai.com"));
        assert_eq!(h.alpn, vec!["h2", "http/1.1"]);
        assert_eq!(raw, wire);
    }

    #[test]
    fn hello_across_many_records() {
        let wire = rustls_hello("api.anthropic.com");
        let split = split_records(&wire, 37);
        let (h, raw) = read_all(split.clone()).unwrap();
        assert_eq!(h.sni.as_deref(), Some("api.anthropic.com"));
        assert_eq!(raw, split, "every byte read is replayed");
    }

    #[test]
    fn stops_at_the_end_of_the_hello() {
        let mut wire = rustls_hello("api.openai.com");
        let n = wire.len();
        wire.extend_from_slice(b"\x17\x03\x03\x00\x01X");
        let (_, raw) = read_all(wire).unwrap();
        assert_eq!(raw.len(), n);
    }

    #[test]
    fn rejects_non_tls_and_truncation() {
        assert_eq!(
            read_all(b"GET / HTTP/1.1\r\n\r\n".to_vec()).unwrap_err(),
            HelloError::NotTls(b'G')
        );
        let wire = rustls_hello("api.openai.com");
        assert_eq!(
            read_all(wire[..wire.len() - 3].to_vec()).unwrap_err(),
            HelloError::Eof
        );
        assert_eq!(read_all(Vec::new()).unwrap_err(), HelloError::Eof);
    }

    proptest! {
        #[test]
        fn garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
            let mut b = vec![22u8, 3, 1];
            b.extend_from_slice(&bytes);
            let _ = read_all(b);
            let _ = parse_client_hello(&bytes);
        }

        #[test]
        fn any_record_size_same_sni(n in 1usize..600) {
            let wire = rustls_hello("generativelanguage.googleapis.com");
            let (h, _) = read_all(split_records(&wire, n)).unwrap();
            prop_assert_eq!(h.sni.as_deref(), Some("generativelanguage.googleapis.com"));
        }
    }
}
