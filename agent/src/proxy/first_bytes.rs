//! An I/O stream that says when its first bytes have been read: how the
//! proxy closes a client that finishes its TLS handshake and then sends
//! nothing. hyper's HTTP/1 header timer starts only once it knows the
//! connection is HTTP/1, which takes the first bytes; an HTTP/2 client
//! sends its preface at once, so a connection kept open and idle after
//! that (a pre-warmed pool) is not affected.
//!
//! It never delays, buffers or inspects what it reads.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, ReadBuf};
use tokio::sync::Notify;

pub struct FirstBytes<T> {
    inner: T,
    /// Told once, at the first read that gave bytes.
    seen: Option<Arc<Notify>>,
}

impl<T> FirstBytes<T> {
    /// The stream, and a future that ends when `within` has gone by
    /// before the stream's first bytes were read (and never otherwise).
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
        if buf.filled().len() > before
            && let Some(seen) = self.seen.take()
        {
            seen.notify_one();
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
}
