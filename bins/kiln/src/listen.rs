//! The HTTP listener: accepts connections and serves the router over HTTP/1.1 (with
//! upgrades, for the worker socket), closing a connection whose request head is not complete
//! within `header_read_timeout` of its first byte, or that is idle (no request being
//! answered, no byte moving) for `idle_timeout`. Hyper's own answers to requests it cannot
//! parse (bad request line, URI over 64 KiB, head too large) get the JSON error body.

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll, ready};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::ConnectInfo;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tower_service::Service as _;

/// Connection time limits.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Limits {
    /// A request head must be complete this long after its first byte arrived.
    pub(crate) header_read_timeout: Duration,
    /// A connection with no request being answered and no byte read or written for this
    /// long is closed.
    pub(crate) idle_timeout: Duration,
}

/// Serves `app` on `listener` until `shutdown` resolves, then lets open connections finish
/// their requests (kept-alive ones close after their current response) and returns when
/// all are closed.
pub(crate) async fn serve(
    listener: TcpListener,
    app: Router,
    limits: Limits,
    shutdown: impl Future<Output = ()>,
) {
    let (stop_tx, stop_rx) = watch::channel(false);
    let (open_tx, open_rx) = watch::channel(());
    tokio::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    // Out of file descriptors and the like: wait instead of spinning.
                    tracing::warn!(message = "accept failed", error = %e);
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let _ = stream.set_nodelay(true);
        let (app, stop, open) = (app.clone(), stop_rx.clone(), open_rx.clone());
        tokio::spawn(async move {
            connection(stream, peer, app, limits, stop).await;
            drop(open);
        });
    }
    drop(listener);
    let _ = stop_tx.send(true);
    drop(open_rx);
    open_tx.closed().await;
}

async fn connection(
    stream: TcpStream,
    peer: SocketAddr,
    app: Router,
    limits: Limits,
    mut stop: watch::Receiver<bool>,
) {
    let act = Arc::new(Activity::new());
    let io = TokioIo::new(Watched {
        inner: stream,
        act: act.clone(),
        pending: None,
    });
    let svc_act = act.clone();
    let svc = hyper::service::service_fn(move |mut req: hyper::Request<Incoming>| {
        let busy = Busy::start(svc_act.clone());
        req.extensions_mut().insert(ConnectInfo(peer));
        let mut router = app.clone();
        async move {
            let resp = router.call(req).await;
            drop(busy);
            Ok::<_, Infallible>(match resp {
                Ok(r) => r,
                Err(never) => match never {},
            })
        }
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .serve_connection(io, svc)
        .with_upgrades();
    tokio::pin!(conn);
    let mut stopping = false;
    loop {
        tokio::select! {
            r = conn.as_mut() => {
                if let Err(e) = r {
                    tracing::debug!(message = "connection ended", %peer, error = %e);
                }
                return;
            }
            _ = stop.wait_for(|s| *s), if !stopping => {
                stopping = true;
                conn.as_mut().graceful_shutdown();
            }
            why = act.expired(limits) => {
                tracing::info!(message = "connection closed", %peer, reason = why);
                return;
            }
        }
    }
}

/// What a connection is doing, shared by its socket and its service. Times are
/// milliseconds since the connection opened, plus one (0: not set).
struct Activity {
    opened: Instant,
    last_io: AtomicU64,
    head_started: AtomicU64,
    busy: AtomicUsize,
}

impl Activity {
    fn new() -> Self {
        Self {
            opened: Instant::now(),
            last_io: AtomicU64::new(1),
            head_started: AtomicU64::new(0),
            busy: AtomicUsize::new(0),
        }
    }

    fn now(&self) -> u64 {
        self.opened.elapsed().as_millis() as u64 + 1
    }

    fn read(&self) {
        let now = self.now();
        self.last_io.store(now, Ordering::Relaxed);
        if self.busy.load(Ordering::Relaxed) == 0 {
            let _ =
                self.head_started
                    .compare_exchange(0, now, Ordering::Relaxed, Ordering::Relaxed);
        }
    }

    fn wrote(&self) {
        self.last_io.store(self.now(), Ordering::Relaxed);
    }

    /// Bytes of a request head arrived and no handler has its request yet.
    fn head_open(&self) -> bool {
        self.head_started.load(Ordering::Relaxed) != 0 && self.busy.load(Ordering::Relaxed) == 0
    }

    /// Resolves with the name of the limit once the connection overstays one.
    async fn expired(&self, limits: Limits) -> &'static str {
        let tick = (limits.header_read_timeout.min(limits.idle_timeout) / 4)
            .clamp(Duration::from_millis(20), Duration::from_secs(1));
        let (head_ms, idle_ms) = (
            limits.header_read_timeout.as_millis() as u64,
            limits.idle_timeout.as_millis() as u64,
        );
        loop {
            tokio::time::sleep(tick).await;
            if self.busy.load(Ordering::Relaxed) > 0 {
                continue;
            }
            let now = self.now();
            let head = self.head_started.load(Ordering::Relaxed);
            if head != 0 && now.saturating_sub(head) >= head_ms {
                return "header_read_timeout";
            }
            if head == 0 && now.saturating_sub(self.last_io.load(Ordering::Relaxed)) >= idle_ms {
                return "idle_timeout";
            }
        }
    }
}

/// A request being answered: from the head's arrival until the handler returns.
struct Busy(Arc<Activity>);

impl Busy {
    fn start(act: Arc<Activity>) -> Self {
        act.busy.fetch_add(1, Ordering::Relaxed);
        act.head_started.store(0, Ordering::Relaxed);
        Self(act)
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.busy.fetch_sub(1, Ordering::Relaxed);
        self.0.wrote();
    }
}

/// The socket, recording activity, and replacing hyper's empty error answers.
struct Watched {
    inner: TcpStream,
    act: Arc<Activity>,
    /// A replacement answer still to be written, and how much of it is.
    pending: Option<(Vec<u8>, usize)>,
}

impl Watched {
    fn drain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while let Some((buf, at)) = &mut self.pending {
            if *at == buf.len() {
                self.pending = None;
                break;
            }
            let n = ready!(Pin::new(&mut self.inner).poll_write(cx, &buf[*at..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            *at += n;
            self.act.wrote();
        }
        Poll::Ready(Ok(()))
    }

    /// When hyper answers a head it could not parse (no handler saw it), the same answer
    /// with a JSON body.
    fn replace(&mut self, buf: &[u8]) -> bool {
        if !self.act.head_open() {
            return false;
        }
        match json_answer(buf) {
            Some(answer) => {
                self.pending = Some((answer, 0));
                true
            }
            None => false,
        }
    }
}

/// The JSON version of one of hyper's automatic error answers
/// (`HTTP/1.1 4xx …\r\ncontent-length: 0\r\n…\r\n\r\n`).
fn json_answer(buf: &[u8]) -> Option<Vec<u8>> {
    if buf.len() > 512 || !buf.starts_with(b"HTTP/1.1 4") || !buf.ends_with(b"\r\n\r\n") {
        return None;
    }
    let head = std::str::from_utf8(buf).ok()?;
    if !head
        .to_ascii_lowercase()
        .contains("\r\ncontent-length: 0\r\n")
    {
        return None;
    }
    let status: u16 = head.get(9..12)?.parse().ok()?;
    let (code, message) = match status {
        414 => ("uri_too_long", "the request URI is longer than 64 KiB"),
        431 => (
            "headers_too_large",
            "the request head is larger than the server accepts",
        ),
        _ => ("malformed_request", "the request head cannot be parsed"),
    };
    let reason = head.get(13..head.find("\r\n")?).unwrap_or("");
    let body = serde_json::json!({"error": {"code": code, "message": message, "retryable": false}})
        .to_string();
    Some(
        format!(
            "HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
            body.len()
        )
        .into_bytes(),
    )
}

impl AsyncRead for Watched {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        ready!(Pin::new(&mut this.inner).poll_read(cx, buf))?;
        if buf.filled().len() > before {
            this.act.read();
        }
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for Watched {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        ready!(this.drain(cx))?;
        if this.replace(buf) {
            // Written from `pending`; what is left goes out on the next write or flush.
            let _ = this.drain(cx)?;
            return Poll::Ready(Ok(buf.len()));
        }
        let n = ready!(Pin::new(&mut this.inner).poll_write(cx, buf))?;
        if n > 0 {
            this.act.wrote();
        }
        Poll::Ready(Ok(n))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        ready!(this.drain(cx))?;
        let total: usize = bufs.iter().map(|b| b.len()).sum();
        if bufs.len() <= 2
            && let Some(first) = bufs.iter().find(|b| !b.is_empty())
            && first.len() == total
            && this.replace(first)
        {
            let _ = this.drain(cx)?;
            return Poll::Ready(Ok(total));
        }
        let n = ready!(Pin::new(&mut this.inner).poll_write_vectored(cx, bufs))?;
        if n > 0 {
            this.act.wrote();
        }
        Poll::Ready(Ok(n))
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.drain(cx))?;
        Pin::new(&mut this.inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.drain(cx))?;
        Pin::new(&mut this.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hyper_error_heads_get_a_json_body() {
        let head = b"HTTP/1.1 414 URI Too Long\r\ncontent-length: 0\r\ndate: Thu, 03 Dec 2026 14:00:00 GMT\r\n\r\n";
        let out = String::from_utf8(json_answer(head).unwrap()).unwrap();
        assert!(out.starts_with("HTTP/1.1 414 URI Too Long\r\n"), "{out}");
        let body = &out[out.find("\r\n\r\n").unwrap() + 4..];
        let v: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(v["error"]["code"], "uri_too_long");
        assert!(out.contains(&format!("content-length: {}\r\n", body.len())));
        // Answers with a body, and successes, pass untouched.
        assert!(json_answer(b"HTTP/1.1 404 Not Found\r\ncontent-length: 12\r\n\r\n").is_none());
        assert!(json_answer(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n").is_none());
    }
}
