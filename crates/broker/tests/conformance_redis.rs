//! The queue conformance suite on the Redis Streams backend (Redis at 127.0.0.1:6379), each
//! test under its own key prefix, deleted afterwards; and what only a shared Redis can show:
//! two handles on one prefix see each other's tasks, leases and events.
//!
//! Without a reachable Redis the tests fail when `CI=true` and skip with a notice otherwise.

#![cfg(feature = "redis")]
#![allow(clippy::unwrap_used)] // test helpers: a panic is the failure report

#[path = "conformance/batch_remote.rs"]
mod batch_remote;
mod conformance;

use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use kiln_broker::*;
use kiln_protocol::TaskState;
use serde_json::json;

const URL: &str = "redis://127.0.0.1:6379";

fn prefix(test: &str) -> String {
    format!("kiln-test:{}:{test}:", std::process::id())
}

fn options(test: &str) -> RedisOptions {
    RedisOptions {
        url: URL.into(),
        prefix: prefix(test),
        block: Duration::from_millis(500),
        queue: QueueOptions {
            default_max_attempts: 2,
            retry_base_ms: 0,
            ..QueueOptions::default()
        },
        ..RedisOptions::default()
    }
}

/// A queue on a fresh prefix; `None` (after a notice) when Redis is absent outside CI.
async fn open(test: &str) -> Option<RedisQueue> {
    match RedisQueue::connect(options(test)).await {
        Ok(q) => {
            q.delete_all().await.unwrap();
            Some(q)
        }
        Err(e) if std::env::var("CI").as_deref() != Ok("true") => {
            eprintln!("SKIPPED {test}: no Redis at {URL} ({e}); CI=true makes this a failure");
            None
        }
        Err(e) => panic!("Redis at {URL} is required in CI: {e}"),
    }
}

async fn fresh(test: &str) -> Option<Arc<dyn Queue>> {
    open(test).await.map(|q| Arc::new(q) as Arc<dyn Queue>)
}

async fn cleanup(test: &str) {
    if let Ok(q) = RedisQueue::connect(options(test)).await {
        q.delete_all().await.unwrap();
    }
}

conformance_tests!(fresh, cleanup);
batch_remote_tests!(fresh, cleanup; batch_keeps_order_and_dedupes, a_conflicting_batch_stores_nothing);

fn nt(t: &str) -> NewTask {
    NewTask {
        task_type: t.into(),
        input: json!({"p": 1}),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_handles_share_tasks_leases_and_events() {
    let test = "two_handles";
    let (Some(a), Some(b)) = (
        open(test).await,
        RedisQueue::connect(options(test)).await.ok(),
    ) else {
        return;
    };
    let mut notes = b.notifications().unwrap();
    // Give the reader time to pin its start before A writes.
    let first = tokio::time::timeout(Duration::from_millis(300), notes.next()).await;
    assert!(first.is_err(), "no notification before anything happened");
    let (t, _) = a.enqueue(nt("txt2img"), 1_000).await.unwrap();
    // B is told that tasks are ready and sees A's event.
    let mut saw_ready = false;
    let mut saw_event = false;
    while !(saw_ready && saw_event) {
        match tokio::time::timeout(Duration::from_secs(3), notes.next())
            .await
            .unwrap()
            .unwrap()
        {
            Notification::TasksReady => saw_ready = true,
            Notification::Event(e) => {
                assert_eq!(e.task_id, t.id);
                saw_event = true;
            }
            _ => {}
        }
    }
    // B reserves what A enqueued; A renews and completes B's lease (the lease is shared).
    let got = b
        .reserve("w", &txt2img_worker(), 4, 90_000, 1_001)
        .await
        .unwrap();
    assert_eq!(got.len(), 1);
    assert_eq!(a.renew("w", 180_000).await.unwrap(), 1);
    let lease = got[0].lease.clone().unwrap();
    assert!(
        a.complete(&lease, Completion::Ok(json!({"ok": 1})), 2_000)
            .await
            .unwrap()
            .accepted
    );
    assert!(
        !b.complete(&lease, Completion::Ok(json!({"ok": 2})), 2_001)
            .await
            .unwrap()
            .accepted
    );
    let done = b.get(&t.id).await.unwrap().unwrap();
    assert_eq!(
        (done.state, done.output),
        (TaskState::Succeeded, Some(json!({"ok": 1})))
    );
    // Each handle publishes only its own events; the store holds all of them.
    let a_ids: Vec<i64> = a.take_events().iter().map(|e| e.id).collect();
    let b_ids: Vec<i64> = b.take_events().iter().map(|e| e.id).collect();
    assert_eq!((a_ids.len(), b_ids.len()), (3, 1));
    let all = a.events_after(&t.id, 0).await.unwrap();
    assert_eq!(all.len(), 4);
    drop(notes);
    a.delete_all().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_go_to_the_dead_stream_and_user_json_is_kept_verbatim() {
    let test = "dead_stream";
    let Some(q) = open(test).await else { return };
    // JSON that a Lua round trip would damage: empty arrays and objects, big integers.
    let input = json!({"a": [], "o": {}, "big": 9007199254740993u64, "s": "é\"\n"});
    let (t, _) = q
        .enqueue(
            NewTask {
                input: input.clone(),
                ..nt("txt2img")
            },
            1,
        )
        .await
        .unwrap();
    assert_eq!(q.get(&t.id).await.unwrap().unwrap().input, input);
    let l = q
        .reserve("w", &txt2img_worker(), 1, 1_000, 2)
        .await
        .unwrap()[0]
        .lease
        .clone()
        .unwrap();
    let err = kiln_protocol::messages::TaskError {
        code: "poison".into(),
        message: "bad".into(),
        retryable: true,
    };
    assert!(q.dead_letter(&l, err, 3).await.unwrap().accepted);
    let client = redis::Client::open(URL).unwrap();
    let mut c = client.get_multiplexed_async_connection().await.unwrap();
    let n: u64 = redis::cmd("XLEN")
        .arg(format!("{}dead", prefix(test)))
        .query_async(&mut c)
        .await
        .unwrap();
    assert_eq!(n, 1);
    assert!(q.delete_all().await.unwrap() > 0);
    let left: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{}*", prefix(test)))
        .query_async(&mut c)
        .await
        .unwrap();
    assert!(left.is_empty(), "{left:?}");
}

/// A worker serving `txt2img`.
fn txt2img_worker() -> Capabilities {
    Capabilities {
        task_types: vec!["txt2img".into()],
        ..Default::default()
    }
}

/// Global webhook endpoints: the store keeps them under its prefix for the script.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn global_endpoints_receive_their_task_events() {
    let test = "global_endpoints_receive_their_task_events";
    let Some(plain) = open(test).await else {
        return;
    };
    drop(plain);
    let mut o = options(test);
    o.queue.webhook_endpoints = conformance::endpoints();
    let q = RedisQueue::connect(o).await.unwrap();
    conformance::global_endpoints_receive_their_task_events(&q).await;
    q.delete_all().await.unwrap();
}
