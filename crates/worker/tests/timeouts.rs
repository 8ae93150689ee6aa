//! The worker's configurable timeouts and frame limit against a scripted gateway socket
//! (a peer that answers `hello` as told, then keeps quiet), and the GPU statistics hook
//! against a real broker.

#![allow(clippy::unwrap_used)] // test helpers: a panic is the failure report
#![allow(clippy::result_large_err)] // the callback signature is tungstenite's

use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use kiln_broker::{Broker, BrokerConfig};
use kiln_protocol::messages::{GpuStats, Timers, Welcome};
use kiln_protocol::{Envelope, Message};
use kiln_worker::{TaskContext, Worker, WorkerConfig};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::{self, handshake::server};

/// How the scripted gateway answers a `hello`.
#[derive(Clone, Copy)]
enum Answer {
    /// Nothing at all.
    Silence,
    /// A welcome (heartbeats every 100 ms), then no `hb_ack` ever.
    WelcomeNoAcks,
    /// A welcome whose frame is about this many bytes.
    BigWelcome(usize),
}

/// What the scripted gateway saw, in order.
#[derive(Debug, PartialEq)]
enum Seen {
    Hello,
    Heartbeat,
}

async fn scripted(answer: Answer) -> (String, mpsc::UnboundedReceiver<Seen>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("ws://{}/v1/workers/connect", listener.local_addr().unwrap());
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let tx = tx.clone();
            tokio::spawn(async move {
                let cb = |_req: &server::Request, mut resp: server::Response| {
                    resp.headers_mut()
                        .insert("Sec-WebSocket-Protocol", "kiln.v1".parse().unwrap());
                    Ok(resp)
                };
                let Ok(mut ws) = tokio_tungstenite::accept_hdr_async(tcp, cb).await else {
                    return;
                };
                while let Some(Ok(m)) = ws.next().await {
                    let tungstenite::Message::Text(t) = m else {
                        continue;
                    };
                    let env = Envelope::decode(t.as_str(), usize::MAX).unwrap();
                    match env.message {
                        Message::Hello(_) => {
                            let _ = tx.send(Seen::Hello);
                            if let Some(w) = welcome(answer) {
                                let _ = ws.send(tungstenite::Message::Text(w.into())).await;
                            }
                        }
                        Message::Heartbeat(_) => {
                            let _ = tx.send(Seen::Heartbeat);
                        }
                        _ => {}
                    }
                }
            });
        }
    });
    (url, rx)
}

fn welcome(answer: Answer) -> Option<String> {
    let session = match answer {
        Answer::Silence => return None,
        Answer::WelcomeNoAcks => "s-1".to_owned(),
        Answer::BigWelcome(n) => "s".repeat(n),
    };
    let w = Welcome {
        session,
        timers: Timers {
            heartbeat_ms: 100,
            ..Timers::default()
        },
        resumed: false,
        keep: Vec::new(),
        drop: Vec::new(),
        max_frame_bytes: None,
        worker_secret: None,
    };
    Some(
        Envelope::new(Message::Welcome(w), kiln_protocol::now_ms())
            .from_source("gateway")
            .encode(),
    )
}

fn worker(url: String, dir: &std::path::Path, tweak: impl FnOnce(&mut WorkerConfig)) -> Worker {
    let mut cfg = WorkerConfig {
        url,
        state_dir: dir.to_path_buf(),
        ..WorkerConfig::default()
    };
    cfg.reconnect.initial_backoff = Duration::from_millis(20);
    cfg.reconnect.max_backoff = Duration::from_millis(50);
    tweak(&mut cfg);
    Worker::new(cfg).handler("echo", |ctx: TaskContext| async move { Ok(ctx.input) })
}

/// The next thing the scripted gateway saw, within `secs`.
async fn next(rx: &mut mpsc::UnboundedReceiver<Seen>, secs: u64) -> Seen {
    tokio::time::timeout(Duration::from_secs(secs), rx.recv())
        .await
        .expect("the worker went quiet")
        .unwrap()
}

#[tokio::test]
async fn a_gateway_that_never_welcomes_is_left_after_the_welcome_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let (url, mut rx) = scripted(Answer::Silence).await;
    let w = worker(url, dir.path(), |c| {
        c.welcome_timeout = Duration::from_millis(200)
    });
    let handle = w.handle();
    let run = tokio::spawn(w.run());
    assert_eq!(next(&mut rx, 5).await, Seen::Hello);
    let started = tokio::time::Instant::now();
    assert_eq!(next(&mut rx, 5).await, Seen::Hello, "a new connection");
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(180) && waited < Duration::from_secs(3),
        "reconnected after {waited:?}"
    );
    handle.shutdown();
    tokio::time::timeout(Duration::from_secs(5), run)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
}

#[tokio::test]
async fn heartbeats_without_answers_end_the_connection_after_the_heartbeat_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let (url, mut rx) = scripted(Answer::WelcomeNoAcks).await;
    let w = worker(url, dir.path(), |c| {
        c.heartbeat_timeout = Duration::from_millis(400)
    });
    let run = tokio::spawn(w.run());
    assert_eq!(next(&mut rx, 5).await, Seen::Hello);
    let started = tokio::time::Instant::now();
    let mut beats = 0;
    // Heartbeats until the worker gives up and says hello on a new connection.
    while next(&mut rx, 5).await == Seen::Heartbeat {
        beats += 1;
    }
    let waited = started.elapsed();
    // First heartbeat after ~100 ms, then 400 ms without an answer.
    assert!(beats >= 2, "{beats} heartbeats before giving up");
    assert!(
        waited >= Duration::from_millis(400) && waited < Duration::from_secs(3),
        "gave up after {waited:?}"
    );
    run.abort();
}

#[tokio::test]
async fn a_welcome_over_the_frame_limit_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (url, mut rx) = scripted(Answer::BigWelcome(8 << 10)).await;
    let w = worker(url, dir.path(), |c| c.max_frame_bytes = 4 << 10);
    let run = tokio::spawn(w.run());
    // The worker never takes the session up: no heartbeat, only new hellos.
    for _ in 0..3 {
        assert_eq!(next(&mut rx, 5).await, Seen::Hello);
    }
    run.abort();

    // Under the limit, the same welcome starts the session.
    let dir = tempfile::tempdir().unwrap();
    let (url, mut rx) = scripted(Answer::BigWelcome(8 << 10)).await;
    let run = tokio::spawn(worker(url, dir.path(), |_| {}).run());
    assert_eq!(next(&mut rx, 5).await, Seen::Hello);
    assert_eq!(next(&mut rx, 5).await, Seen::Heartbeat);
    run.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heartbeats_carry_what_the_gpu_hook_reports() {
    let dir = tempfile::tempdir().unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("ws://{}/v1/workers/connect", listener.local_addr().unwrap());
    let cfg = BrokerConfig {
        heartbeat: Duration::from_millis(100),
        ..BrokerConfig::default()
    };
    let broker = Broker::open(&dir.path().join("q.sqlite"), cfg).unwrap();
    let _server = kiln_test_support_gateway::serve(broker.clone(), listener);
    let util = Arc::new(std::sync::atomic::AtomicU32::new(17));
    let u = util.clone();
    let w = worker(url, &dir.path().join("w"), |_| {}).gpu_stats(move || {
        Some(GpuStats {
            util: Some(u.load(std::sync::atomic::Ordering::SeqCst) as f32),
            mem_used_mb: Some(1024),
            mem_total_mb: Some(24_576),
        })
    });
    let run = tokio::spawn(w.run());
    let reported = |want: f32| {
        let broker = broker.clone();
        async move {
            for _ in 0..100 {
                let gpu = broker.workers().into_iter().find_map(|w| w.gpu);
                if gpu.as_ref().and_then(|g| g.util) == Some(want) {
                    return gpu.unwrap();
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            panic!("the broker never saw util {want}")
        }
    };
    let g = reported(17.0).await;
    assert_eq!((g.mem_used_mb, g.mem_total_mb), (Some(1024), Some(24_576)));
    // The hook is asked again at every heartbeat.
    util.store(93, std::sync::atomic::Ordering::SeqCst);
    reported(93.0).await;
    run.abort();
}
