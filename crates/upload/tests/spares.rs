//! Warm spare connections, against an in-process h2 server over TLS on 127.0.0.1: opened in
//! the background before a connection runs out of room, bounded, none for an idle pool, and
//! requests that waited for a handshake counted.
// Helpers outside #[test] functions unwrap too: a failed setup step should panic.
#![allow(clippy::unwrap_used)]

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use kiln_upload::{CounterSnapshot, Multipart, UploadClient, UploadFile};
use support::{Pki, client};

struct Server {
    port: u16,
    /// Connections accepted.
    accepted: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// An h2 server that answers every request after `delay`, with TLS handshakes slowed by
/// `handshake_delay` (so that a request that waits for one is slow to notice).
async fn start(pki: &Pki, delay: Duration, handshake_delay: Duration) -> Server {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let acceptor = tokio_rustls::TlsAcceptor::from(pki.server_config());
    let accepted = Arc::new(AtomicU64::new(0));
    let acc = accepted.clone();
    let task = tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            acc.fetch_add(1, Ordering::Relaxed);
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                tokio::time::sleep(handshake_delay).await;
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let Ok(mut conn) = h2::server::handshake(tls).await else {
                    return;
                };
                while let Some(Ok((req, mut tx))) = conn.accept().await {
                    tokio::spawn(async move {
                        let mut body = req.into_body();
                        while let Some(Ok(c)) = body.data().await {
                            let _ = body.flow_control().release_capacity(c.len());
                        }
                        tokio::time::sleep(delay).await;
                        let res = http::Response::builder()
                            .status(200)
                            .header("content-type", "application/json")
                            .body(())
                            .unwrap();
                        if let Ok(mut s) = tx.send_response(res, false) {
                            let _ = s.send_data(
                                Bytes::from_static(br#"{"data":{"url":"https://img.example/s"}}"#),
                                true,
                            );
                        }
                    });
                }
            });
        }
    });
    Server {
        port,
        accepted,
        task,
    }
}

fn target(port: u16) -> Arc<Multipart> {
    Arc::new(Multipart::new(
        format!("https://127.0.0.1:{port}/upload").parse().unwrap(),
    ))
}

async fn run(c: &UploadClient, t: Arc<Multipart>, n: usize, concurrency: usize) {
    let sem = Arc::new(tokio::sync::Semaphore::new(concurrency));
    let file = Arc::new(UploadFile::new(vec![3u8; 20_000], "a.png", "image/png"));
    let mut hs = Vec::new();
    for _ in 0..n {
        let (c, t, f, sem) = (c.clone(), t.clone(), file.clone(), sem.clone());
        hs.push(tokio::spawn(async move {
            let _p = sem.acquire().await.unwrap();
            c.upload(t.as_ref(), &f).await
        }));
    }
    for h in hs {
        h.await.unwrap().unwrap_or_else(|e| panic!("{e}"));
    }
}

fn settle_check(s: &CounterSnapshot, uploads: u64) {
    assert_eq!(s.uploads_ok, uploads, "{s:?}");
    assert_eq!(s.failed_attempts, 0, "{s:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sequential_uploads_never_wait_after_the_first() {
    let pki = Pki::new();
    // Requests take longer than a handshake: one spare opened two requests ahead is ready.
    let srv = start(&pki, Duration::from_millis(20), Duration::from_millis(5)).await;
    let mut cfg = pki.client_config();
    cfg.max_requests_per_connection = 5;
    let (c, counters) = client(cfg);
    let t = target(srv.port);
    run(&c, t, 30, 1).await;
    let s = counters.snapshot();
    settle_check(&s, 30);
    assert_eq!(
        s.handshake_waits, 1,
        "only the very first upload waits for a connection: {s:?}"
    );
    assert!(
        s.spares >= 5,
        "each rotation was prepared in the background: {s:?}"
    );
    // 30 uploads at 5 per connection need 6; one spare may be left over.
    assert!(s.connections <= 7, "spares are bounded: {s:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_uploads_rarely_wait_and_spares_stay_bounded() {
    let pki = Pki::new();
    let srv = start(&pki, Duration::from_millis(20), Duration::from_millis(20)).await;
    let mut cfg = pki.client_config();
    cfg.max_requests_per_connection = 5;
    let (c, counters) = client(cfg);
    let t = target(srv.port);
    // The first burst of 8 all wait for the first connection.
    run(&c, t.clone(), 8, 8).await;
    let before = counters.snapshot();
    assert_eq!(before.handshake_waits, 8, "{before:?}");
    run(&c, t, 200, 8).await;
    let s = counters.snapshot();
    settle_check(&s, 208);
    let waits = s.handshake_waits - before.handshake_waits;
    eprintln!("waits {waits}; {s:?}");
    assert!(
        waits <= 20,
        "at most 10% of 200 uploads waited for a handshake: {waits} ({s:?})"
    );
    // 208 uploads at 5 per connection need 42; the in-flight bound allows at most
    // ceil(8 x 8 / 5) = 13 connects at once (headroom at most 8), so no more than that are
    // left unused. Here a connect (20 ms handshake delay) lasts about one request (20 ms),
    // so the headroom is 2 or 3 and far fewer are.
    assert!(s.connections <= 42 + 13 + 1, "spares are bounded: {s:?}");
    // A background connect started by the last requests may still be in its handshake.
    let mut s = counters.snapshot();
    for _ in 0..40 {
        if s.connections == srv.accepted.load(Ordering::Relaxed) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        s = counters.snapshot();
    }
    assert!(s.connections <= 42 + 13 + 1, "spares are bounded: {s:?}");
    assert_eq!(s.connections, srv.accepted.load(Ordering::Relaxed));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_pool_opens_nothing() {
    let pki = Pki::new();
    let srv = start(&pki, Duration::ZERO, Duration::ZERO).await;
    let (c, counters) = client(pki.client_config());
    run(&c, target(srv.port), 3, 1).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let s = counters.snapshot();
    assert_eq!((s.connections, s.spares), (1, 0), "{s:?}");
    assert_eq!(s.handshake_waits, 1, "{s:?}");
    assert_eq!(srv.accepted.load(Ordering::Relaxed), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fresh_policy_counts_every_upload_as_a_handshake_wait() {
    let pki = Pki::new();
    let srv = start(&pki, Duration::ZERO, Duration::ZERO).await;
    let mut cfg = pki.client_config();
    cfg.connection_policy = kiln_upload::ConnectionPolicy::FreshPerRequest;
    let (c, counters) = client(cfg);
    run(&c, target(srv.port), 6, 2).await;
    let s = counters.snapshot();
    assert_eq!(
        (s.handshake_waits, s.connections, s.spares),
        (6, 6, 0),
        "{s:?}"
    );
}
