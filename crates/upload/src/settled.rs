//! When a new HTTP/2 connection has heard from its server. The server's first frame is its
//! SETTINGS (RFC 9113 §3.4), which carry the stream window the client may send into; until
//! it arrives the client must assume the default 65,535 bytes. A request sent on a connection
//! that has not heard from its server yet therefore sends its first 64 KiB, then waits for
//! the SETTINGS to arrive before sending the rest, however large a window the server offers.
//! A connection opened in the background (`spare.rs`) is lent only once it has heard from its
//! server, so that every request on it gets the server's window at once.

use std::io;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::Notify;
use tokio::time::Instant;

/// Set once the connection's first read after the TLS handshake completed.
#[derive(Debug, Default)]
pub(crate) struct Settled {
    at: OnceLock<Instant>,
    notify: Notify,
}

impl Settled {
    fn mark(&self) {
        if self.at.set(Instant::now()).is_ok() {
            self.notify.notify_waiters();
        }
    }

    /// When the server's first bytes arrived (or the connection ended before any did).
    #[cfg(test)]
    pub(crate) fn at(&self) -> Option<Instant> {
        self.at.get().copied()
    }

    /// Waits until the server's first bytes arrived or the connection ended.
    pub(crate) async fn wait(&self) {
        loop {
            let notified = self.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.at.get().is_some() {
                return;
            }
            notified.await;
        }
    }
}

/// An I/O stream that marks [`Settled`] at its first completed read: data, end of stream or
/// error (the last two so that nothing waits for a connection that has already ended).
pub(crate) struct FirstRead<S> {
    inner: S,
    settled: Option<Arc<Settled>>,
}

impl<S> FirstRead<S> {
    pub(crate) fn new(inner: S, settled: Arc<Settled>) -> Self {
        Self {
            inner,
            settled: Some(settled),
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for FirstRead<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        if r.is_ready()
            && let Some(s) = self.settled.take()
        {
            s.mark();
        }
        r
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for FirstRead<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn marks_at_the_first_read_not_at_writes() {
        let (a, mut b) = tokio::io::duplex(64);
        let settled = Arc::new(Settled::default());
        let mut io = FirstRead::new(a, settled.clone());
        io.write_all(b"client preface").await.unwrap();
        assert!(settled.at().is_none(), "a write is not the server speaking");
        let mut got = [0u8; 14];
        b.read_exact(&mut got).await.unwrap();
        let waiter = tokio::spawn({
            let s = settled.clone();
            async move { s.wait().await }
        });
        b.write_all(b"SETTINGS").await.unwrap();
        let mut buf = [0u8; 8];
        io.read_exact(&mut buf).await.unwrap();
        assert!(settled.at().is_some());
        waiter.await.unwrap();
    }

    #[tokio::test]
    async fn marks_when_the_stream_ends_before_any_byte() {
        let (a, b) = tokio::io::duplex(64);
        let settled = Arc::new(Settled::default());
        let mut io = FirstRead::new(a, settled.clone());
        drop(b);
        let mut buf = [0u8; 8];
        assert_eq!(io.read(&mut buf).await.unwrap(), 0);
        settled.wait().await;
        assert!(settled.at().is_some());
    }
}
