//! An I/O stream that says when the bytes that tell HTTP/1 from HTTP/2
//! have been read: how the proxy closes a client that finishes its TLS
//! handshake and then sends nothing, or only part of HTTP/2's preface.
//! hyper's HTTP/1 header timer starts only once it knows the connection is
//! HTTP/1, and its HTTP/2 pings once it has the whole preface; until then
//! nothing of hyper's times the connection out. An HTTP/2 client sends its
//! preface at once, so a connection kept open and idle after that (a
//! pre-warmed pool) is not affected.
//!
//! It never delays or buffers what it reads; it compares the first bytes
//! with the preface, nothing more.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, ReadBuf};
use tokio::sync::Notify;

/// What an HTTP/2 client sends first.
const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

pub struct FirstBytes<T> {
    inner: T,
    /// Told once, when the bytes read tell the protocol: a byte that
    /// differs from the preface (HTTP/1), or the whole preface.
    seen: Option<Arc<Notify>>,
    /// Bytes of the preface read so far.
    matched: usize,
}

impl<T> FirstBytes<T> {
    /// The stream, and a future that ends when `within` has gone by
    /// before the bytes that tell the protocol were read (and never
    /// otherwise).
    pub fn new(
        inner: T,
        within: Duration,
    ) -> (Self, impl std::future::Future<Output = ()> + Send + 'static) {
        let seen = Arc::new(Notify::new());
        let silent = {
            let seen = seen.clone();
            async move {
                // `notify_one` keeps its permit for a waiter still to come.
                if tokio::time::timeout(within, seen.notified()).await.is_ok() {
                    std::future::pending::<()>().await;
                }
            }
        };
        (
            FirstBytes {
                inner,
                seen: Some(seen),
                matched: 0,
            },
            silent,
        )
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for FirstBytes<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        if self.seen.is_some() {
            let mut told = false;
            for &b in &buf.filled()[before..] {
                if b != PREFACE[self.matched] {
                    told = true;
                    break;
                }
                self.matched += 1;
                if self.matched == PREFACE.len() {
                    told = true;
                    break;
                }
            }
            if told && let Some(seen) = self.seen.take() {
                seen.notify_one();
            }
        }
        polled
    }
}

forward_async_write!(FirstBytes);

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn silence_ends_the_wait_and_bytes_cancel_it() {
        let (a, mut b) = tokio::io::duplex(64);
        let (_stream, silent) = FirstBytes::new(a, Duration::from_millis(100));
        b.write_all(b"x").await.unwrap();
        // Nothing read the byte: still silent as far as the reader knows.
        tokio::time::timeout(Duration::from_secs(30), silent)
            .await
            .expect("the wait ends with nothing read");

        let (a, mut b) = tokio::io::duplex(64);
        let (mut stream, silent) = FirstBytes::new(a, Duration::from_millis(100));
        b.write_all(b"GET").await.unwrap();
        let mut got = [0u8; 3];
        stream.read_exact(&mut got).await.unwrap();
        assert!(
            tokio::time::timeout(Duration::from_secs(1), silent)
                .await
                .is_err(),
            "bytes were read: the wait never ends"
        );
    }

    /// Part of HTTP/2's preface tells nothing yet: hyper waits for the
    /// rest with no timer of its own, so the wait goes on. The whole
    /// preface, or a byte that differs from it, ends it.
    #[tokio::test]
    async fn only_the_bytes_that_tell_the_protocol_cancel_the_wait() {
        // (A wait that ends does so after 200 ms; one that never ends is
        // given 500 ms to show it.)
        let read = |sent: &'static [u8], wait: u64| async move {
            let (a, mut b) = tokio::io::duplex(64);
            let (mut stream, silent) = FirstBytes::new(a, Duration::from_millis(200));
            b.write_all(sent).await.unwrap();
            let mut got = vec![0u8; sent.len()];
            stream.read_exact(&mut got).await.unwrap();
            let ended = tokio::time::timeout(Duration::from_millis(wait), silent)
                .await
                .is_ok();
            (ended, stream, b)
        };
        for partial in [&b"P"[..], b"PRI * HTTP/2.0\r\n", &PREFACE[..23]] {
            assert!(
                read(partial, 30_000).await.0,
                "{partial:?} tells nothing yet"
            );
        }
        for told in [&b"PO"[..], b"GET / HTTP/1.1\r\n", PREFACE] {
            assert!(!read(told, 500).await.0, "{told:?} tells the protocol");
        }
        // Told over several reads.
        let (a, mut b) = tokio::io::duplex(64);
        let (mut stream, silent) = FirstBytes::new(a, Duration::from_millis(200));
        let mut got = [0u8; 12];
        b.write_all(&PREFACE[..12]).await.unwrap();
        stream.read_exact(&mut got).await.unwrap();
        b.write_all(&PREFACE[12..]).await.unwrap();
        stream.read_exact(&mut got).await.unwrap();
        assert!(
            tokio::time::timeout(Duration::from_millis(500), silent)
                .await
                .is_err()
        );
    }
}
