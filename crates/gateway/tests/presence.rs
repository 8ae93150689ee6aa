//! Worker presence on `GET /v1/events` with a real worker: a worker that is killed is
//! reported `worker.offline` once `worker_offline_grace` has passed, while a 2 s network
//! blip (a TCP proxy on 127.0.0.1 that cuts the worker's connection and refuses new ones,
//! then lets them through again) is not reported at all.

#![allow(clippy::unwrap_used)] // test helpers: a panic is the failure report

mod served;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::http::Request;
use http_body_util::BodyExt;
use serde_json::Value;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tower_service::Service as _;

use served::{Gw, serve, sleeper};

const GRACE: Duration = Duration::from_secs(4);

/// A TCP proxy to `upstream`; while `cut` is true it closes every connection it carries
/// and every new one at once.
async fn proxy(upstream: SocketAddr) -> (SocketAddr, watch::Sender<bool>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (cut, rx) = watch::channel(false);
    tokio::spawn(async move {
        while let Ok((mut client, _)) = listener.accept().await {
            let mut rx = rx.clone();
            if *rx.borrow() {
                continue; // dropped: closed at once
            }
            tokio::spawn(async move {
                let Ok(mut up) = TcpStream::connect(upstream).await else {
                    return;
                };
                tokio::select! {
                    _ = tokio::io::copy_bidirectional(&mut client, &mut up) => {}
                    _ = rx.wait_for(|c| *c) => {}
                }
            });
        }
    });
    (addr, cut)
}

/// Events `GET /v1/events` sent: when each arrived, its type and data.
type Seen = Arc<Mutex<Vec<(Instant, String, Value)>>>;

/// Follows `GET /v1/events` in the background.
async fn follow(gw: &Gw) -> Seen {
    let req = Request::get("/v1/events").body(Body::empty()).unwrap();
    let resp = gw.app.clone().call(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    let seen: Seen = Arc::default();
    let out = seen.clone();
    let mut body = resp.into_body();
    tokio::spawn(async move {
        let mut buf = String::new();
        while let Some(Ok(frame)) = body.frame().await {
            let Some(data) = frame.data_ref() else {
                continue;
            };
            buf.push_str(&String::from_utf8_lossy(data));
            while let Some(end) = buf.find("\n\n") {
                let block: String = buf.drain(..end + 2).collect();
                let field = |name: &str| {
                    block
                        .lines()
                        .find_map(|l| l.strip_prefix(name).map(|v| v.trim().to_owned()))
                };
                if let (Some(kind), Some(data)) = (field("event:"), field("data:")) {
                    let data = serde_json::from_str(&data).unwrap_or(Value::Null);
                    out.lock().unwrap().push((Instant::now(), kind, data));
                }
            }
        }
    });
    seen
}

/// When `kind` for `worker` first arrived after `since`, waiting at most `wait`.
async fn arrival(
    seen: &Seen,
    kind: &str,
    worker: &str,
    since: Instant,
    wait: Duration,
) -> Option<Instant> {
    let until = Instant::now() + wait;
    loop {
        let hit = seen
            .lock()
            .unwrap()
            .iter()
            .find(|(at, k, d)| *at >= since && k == kind && d["worker_id"] == worker)
            .map(|e| e.0);
        if hit.is_some() || Instant::now() >= until {
            return hit;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_worker_goes_offline_after_the_grace_but_a_network_blip_does_not() {
    let gw = serve(|c| c.worker_offline_grace = GRACE).await;
    let seen = follow(&gw).await;
    let (addr, cut) = proxy(gw.addr).await;
    let start = Instant::now();
    let w = sleeper(
        format!("ws://{addr}/v1/workers/connect"),
        &gw.dir.path().join("w"),
        1,
    );
    let worker = tokio::spawn(w.run());
    gw.wait_workers(1).await;
    let id = gw.state.broker().workers()[0].worker_id.clone();
    assert!(
        arrival(&seen, "worker.online", &id, start, Duration::from_secs(5))
            .await
            .is_some()
    );

    // A 2 s blip: the session ends (the gateway sees the worker disconnected), the worker
    // comes back, and no offline event is sent, even well after the grace.
    let blip = Instant::now();
    cut.send_replace(true);
    let mut was_down = false;
    while blip.elapsed() < Duration::from_secs(2) {
        was_down |= gw.state.broker().workers().iter().all(|w| !w.connected);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(was_down, "the blip did not end the worker's session");
    cut.send_replace(false);
    gw.wait_workers(1).await;
    let quiet = GRACE + Duration::from_secs(2) - blip.elapsed().min(GRACE);
    let offline = arrival(&seen, "worker.offline", &id, blip, quiet).await;
    assert!(offline.is_none(), "a 2 s blip was reported as an outage");

    // Killed: offline once the grace has passed, not before.
    let killed = Instant::now();
    worker.abort();
    let at = arrival(
        &seen,
        "worker.offline",
        &id,
        killed,
        GRACE + Duration::from_secs(4),
    )
    .await
    .expect("no worker.offline after the worker was killed");
    let after = at.duration_since(killed);
    assert!(
        after >= GRACE - Duration::from_millis(100),
        "offline after {after:?}, before the grace"
    );
    assert!(
        after <= GRACE + Duration::from_secs(3),
        "offline only after {after:?}"
    );
}
