//! `TaskContext::preview` against a real broker over a loopback WebSocket: previews are
//! stored as the task's events and linked from its progress, and a flood of them is cut
//! down to the broker's rate without holding up the result.

#![allow(clippy::unwrap_used)] // test helpers: a panic is the failure report

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine as _;
use kiln_broker::{Broker, BrokerConfig, NewTask};
use kiln_protocol::TaskState;
use kiln_worker::{PreviewError, TaskContext, Worker, WorkerConfig};
use serde_json::json;
use tokio::net::TcpListener;

/// A tiny image for preview `i` (its bytes differ per `i`).
fn image(i: usize) -> Vec<u8> {
    let mut b = b"\x89PNG\r\n\x1a\n\0\0\0\x0dIHDR".to_vec();
    b.extend_from_slice(&(16 + i as u32).to_be_bytes());
    b.extend_from_slice(&9u32.to_be_bytes());
    b
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn previews_are_stored_linked_and_a_flood_is_rate_limited_without_delaying_the_result() {
    let dir = tempfile::tempdir().unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let cfg = BrokerConfig {
        preview_burst: 3,
        preview_interval: Duration::from_millis(200),
        ..BrokerConfig::default()
    };
    let broker = Broker::open(&dir.path().join("q.sqlite"), cfg).unwrap();
    let _server = kiln_test_support_gateway::serve(broker.clone(), listener);

    // When the handler returned, and what a preview too large for a frame gave.
    let returned: Arc<Mutex<Option<Instant>>> = Arc::default();
    let too_large: Arc<Mutex<Option<PreviewError>>> = Arc::default();
    let (r, t) = (returned.clone(), too_large.clone());
    let flood = 2000;
    let w = Worker::new(WorkerConfig {
        url: format!("ws://{addr}/v1/workers/connect"),
        state_dir: dir.path().join("w"),
        ..WorkerConfig::default()
    })
    .blocking_handler("paint", move |ctx: TaskContext| {
        *t.lock().unwrap() = ctx.preview(&vec![0; 70_000], "image/png").err();
        for i in 0..flood {
            ctx.preview(&image(i), "image/png").unwrap();
        }
        *r.lock().unwrap() = Some(Instant::now());
        Ok(json!({"painted": true}))
    });
    let handle = w.handle();
    let running = tokio::spawn(w.run());

    let id = broker
        .submit(NewTask {
            task_type: "paint".into(),
            input: json!({}),
            ..NewTask::default()
        })
        .await
        .unwrap()
        .0
        .id;
    let until = Instant::now() + Duration::from_secs(20);
    let task = loop {
        let t = broker.queue().get(&id).await.unwrap().unwrap();
        if t.state.is_terminal() {
            break t;
        }
        assert!(Instant::now() < until, "the task did not finish");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let done = Instant::now();
    assert_eq!(task.state, TaskState::Succeeded);
    let lag = done - returned.lock().unwrap().unwrap();
    assert!(
        lag < Duration::from_secs(2),
        "the result came {lag:?} after the handler returned"
    );
    assert!(matches!(
        *too_large.lock().unwrap(),
        Some(PreviewError::TooLarge { size: 70_000, .. })
    ));

    let events = broker.queue().events_after(&id, 0).await.unwrap();
    // (ts, preview) of each stored preview.
    let previews: Vec<(u64, serde_json::Value)> = events
        .iter()
        .filter_map(|e| match &e.kind {
            kiln_broker::TaskEventKind::Progress(d) if d["event"] == "preview" => {
                Some((e.ts, d["preview"].clone()))
            }
            _ => None,
        })
        .collect();
    let span = previews.last().unwrap().0 - previews[0].0;
    // The burst, then at most one per interval while the flood was read.
    assert!(previews.len() >= 3, "{}", previews.len());
    assert!(
        previews.len() as u64 <= 3 + span / 200 + 1,
        "{} previews stored over {span} ms",
        previews.len()
    );
    // Indexes count every preview sent (the refused one took none), so the stored ones
    // are a subset, in order; the data is the image sent under that index.
    let indexes: Vec<u64> = previews
        .iter()
        .map(|(_, p)| p["index"].as_u64().unwrap())
        .collect();
    assert_eq!(&indexes[..3], &[0, 1, 2]);
    assert!(indexes.windows(2).all(|w| w[0] < w[1]));
    let last = &previews.last().unwrap().1;
    let i = last["index"].as_u64().unwrap() as usize;
    let data = base64::engine::general_purpose::STANDARD
        .decode(last["data"].as_str().unwrap())
        .unwrap();
    assert_eq!(data, image(i));
    assert_eq!(last["width"], 16 + i as u64);
    // The task keeps the latest preview (as the last stored progress).
    let link = &task.progress.as_ref().unwrap()["preview"];
    assert_eq!(link["index"], i as u64);

    handle.shutdown();
    let _ = tokio::time::timeout(Duration::from_secs(10), running).await;
}
