//! A TCP proxy that adds round-trip time, for measuring connection reuse on loopback (which
//! has none, on a kernel without netem).
//!
//! Model: every chunk read from one side is written to the other `rtt / 2` after it was read,
//! in order (each chunk carries its read time). A new connection costs what the TCP
//! handshake would: the client's connect returns at once on loopback, so its first byte is
//! held until one extra `rtt` after the accept (it would have waited for the SYN-ACK), and
//! the server's first byte cannot reach the client before `rtt` after the accept. EOF is
//! forwarded the same way (as a write shutdown). Limits: no bandwidth limit, no slow start or
//! congestion window, no loss or reordering; up to 256 chunks of 64 KiB are in flight per
//! direction (far above any TCP window the tests meet), after which reading pauses.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::time::Instant;

/// What the proxy did.
#[derive(Debug, Default)]
pub struct ProxyCounters {
    /// Client connections accepted.
    pub connections: AtomicU64,
    /// Upstream connects that failed (the client connection was closed).
    pub upstream_failures: AtomicU64,
    /// Bytes forwarded client -> upstream.
    pub bytes_up: AtomicU64,
    /// Bytes forwarded upstream -> client.
    pub bytes_down: AtomicU64,
    /// Chunks forwarded (both directions).
    pub chunks: AtomicU64,
    /// The latest a chunk was written after its due time, in microseconds (timer and
    /// scheduling slack: a large value means the machine could not keep the model).
    pub max_late_us: AtomicU64,
}

impl ProxyCounters {
    /// One JSON object with every counter.
    pub fn json(&self) -> String {
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        format!(
            "{{\"connections\":{},\"upstream_failures\":{},\"bytes_up\":{},\"bytes_down\":{},\"chunks\":{},\"max_late_ms\":{:.2}}}",
            l(&self.connections),
            l(&self.upstream_failures),
            l(&self.bytes_up),
            l(&self.bytes_down),
            l(&self.chunks),
            l(&self.max_late_us) as f64 / 1000.0
        )
    }
}

/// A running proxy; stops when dropped.
pub struct LatencyProxy {
    /// Where it listens.
    pub addr: SocketAddr,
    /// Its counters.
    pub counters: Arc<ProxyCounters>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for LatencyProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Starts a proxy on `listen` (port 0 picks one) in front of `upstream`.
pub async fn start(
    listen: SocketAddr,
    upstream: SocketAddr,
    rtt: Duration,
) -> std::io::Result<LatencyProxy> {
    let listener = TcpListener::bind(listen).await?;
    let addr = listener.local_addr()?;
    let counters = Arc::new(ProxyCounters::default());
    let task = tokio::spawn(serve(listener, upstream, rtt, counters.clone()));
    Ok(LatencyProxy {
        addr,
        counters,
        task,
    })
}

/// Accepts connections on `listener` and proxies each to `upstream`, until the task ends.
pub async fn serve(
    listener: TcpListener,
    upstream: SocketAddr,
    rtt: Duration,
    counters: Arc<ProxyCounters>,
) {
    loop {
        let Ok((client, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        let accepted = Instant::now();
        counters.connections.fetch_add(1, Ordering::Relaxed);
        tokio::spawn(proxy_one(client, upstream, rtt, accepted, counters.clone()));
    }
}

async fn proxy_one(
    client: TcpStream,
    upstream: SocketAddr,
    rtt: Duration,
    accepted: Instant,
    counters: Arc<ProxyCounters>,
) {
    let server = match TcpStream::connect(upstream).await {
        Ok(s) => s,
        Err(_) => {
            counters.upstream_failures.fetch_add(1, Ordering::Relaxed);
            return;
        }
    };
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let (cr, cw) = client.into_split();
    let (sr, sw) = server.into_split();
    let one_way = rtt / 2;
    // The client's first byte waits for the handshake it did not have to do: one RTT.
    let up = pump(cr, sw, one_way, accepted + rtt, counters.clone(), true);
    // The server's first byte leaves no earlier than the SYN would have reached it.
    let down = pump(sr, cw, one_way, accepted + one_way, counters, false);
    tokio::join!(up, down);
}

async fn pump(
    mut r: tokio::net::tcp::OwnedReadHalf,
    mut w: tokio::net::tcp::OwnedWriteHalf,
    one_way: Duration,
    ready: Instant,
    counters: Arc<ProxyCounters>,
    up: bool,
) {
    let (tx, mut rx) = mpsc::channel::<(Instant, Option<Vec<u8>>)>(256);
    let reader = async move {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = r.read(&mut buf).await.unwrap_or(0);
            let due = Instant::now().max(ready) + one_way;
            let chunk = (n > 0).then(|| buf[..n].to_vec());
            if tx.send((due, chunk)).await.is_err() || n == 0 {
                break;
            }
        }
    };
    let c = counters.clone();
    let writer = async move {
        while let Some((due, chunk)) = rx.recv().await {
            tokio::time::sleep_until(due).await;
            let late = Instant::now().saturating_duration_since(due).as_micros() as u64;
            c.max_late_us.fetch_max(late, Ordering::Relaxed);
            let Some(chunk) = chunk else {
                let _ = w.shutdown().await;
                break;
            };
            if w.write_all(&chunk).await.is_err() {
                break;
            }
            c.chunks.fetch_add(1, Ordering::Relaxed);
            let bytes = if up { &c.bytes_up } else { &c.bytes_down };
            bytes.fetch_add(chunk.len() as u64, Ordering::Relaxed);
        }
    };
    tokio::join!(reader, writer);
}
