//! `enqueue_many` on the shared stores (PostgreSQL, Redis): order, idempotency inside and
//! across batches, labels and models, events, and batches that store nothing because one
//! item conflicts.

#![allow(clippy::unwrap_used)] // test helpers: a panic is the failure report
#![allow(dead_code, unreachable_pub)]

use kiln_broker::*;
use serde_json::json;

const T: u64 = 1_000_000;

fn item(i: u32, request_id: Option<&str>) -> NewTask {
    NewTask {
        task_type: "txt2img".into(),
        input: json!({ "i": i }),
        request_id: request_id.map(Into::into),
        ..Default::default()
    }
}

fn worker() -> Capabilities {
    Capabilities {
        task_types: vec!["txt2img".into()],
        models: vec!["sdxl".into()],
        labels: vec!["gpu".into()],
    }
}

/// Instantiates the batch tests like `conformance_tests!`.
#[macro_export]
macro_rules! batch_remote_tests {
    ($make:path, $done:path; $($name:ident),*) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() {
                let Some(q) = $make(stringify!($name)).await else {
                    return;
                };
                batch_remote::$name(&*q).await;
                drop(q);
                $done(stringify!($name)).await;
            }
        )*
    };
}

pub async fn batch_keeps_order_and_dedupes(q: &dyn Queue) {
    assert!(q.enqueue_many(Vec::new(), T).await.unwrap().is_empty());
    let (before, _) = q.enqueue(item(9, Some("r9")), T).await.unwrap();
    let mut routed = item(4, None);
    routed.model = Some("sdxl".into());
    routed.labels = vec!["gpu".into()];
    let batch = vec![
        item(1, Some("r1")),
        item(2, Some("r2")),
        item(1, Some("r1")),
        routed,
        item(9, Some("r9")),
        item(5, None),
    ];
    let out = q.enqueue_many(batch, T + 1).await.unwrap();
    let created: Vec<bool> = out.iter().map(|o| o.1).collect();
    assert_eq!(created, [true, true, false, true, false, true]);
    assert_eq!(out[0].0.id, out[2].0.id);
    assert_eq!(out[4].0.id, before.id);
    assert_eq!(out[3].0.labels, ["gpu"]);
    assert_eq!(out[3].0.model.as_deref(), Some("sdxl"));
    for (t, _) in &out {
        let stored = q.get(&t.id).await.unwrap().unwrap();
        assert_eq!((stored.input.clone(), stored.seq), (t.input.clone(), t.seq));
        let events = q.events_after(&t.id, 0).await.unwrap();
        assert_eq!(events.len(), 1, "one status event per task");
    }
    // A second batch: what the first stored is a duplicate.
    let again = q
        .enqueue_many(vec![item(2, Some("r2")), item(6, Some("r6"))], T + 2)
        .await
        .unwrap();
    assert_eq!((again[0].1, again[1].1), (false, true));
    assert_eq!(again[0].0.id, out[1].0.id);
    // Leased oldest first: the batch's order is its tasks' order (the routed task, in a
    // queue of its own, is checked only for being there).
    let got = q
        .reserve("w", &worker(), 10, T + 90_000, T + 3)
        .await
        .unwrap();
    let routed = out[3].0.id.as_str();
    assert!(got.iter().any(|t| t.id == routed));
    let ids: Vec<&str> = got
        .iter()
        .map(|t| t.id.as_str())
        .filter(|id| *id != routed)
        .collect();
    let want = [
        before.id.as_str(),
        out[0].0.id.as_str(),
        out[1].0.id.as_str(),
        out[5].0.id.as_str(),
        again[1].0.id.as_str(),
    ];
    assert_eq!(ids, want);
}

pub async fn a_conflicting_batch_stores_nothing(q: &dyn Queue) {
    q.enqueue(item(1, Some("r1")), T).await.unwrap();
    // r1 reused for other input: the whole batch is refused.
    let e = q
        .enqueue_many(vec![item(2, Some("r2")), item(3, Some("r1"))], T + 1)
        .await
        .unwrap_err();
    assert!(matches!(e, QueueError::Conflict(_)), "{e}");
    // A batch that contradicts itself.
    let e = q
        .enqueue_many(vec![item(4, Some("r4")), item(5, Some("r4"))], T + 1)
        .await
        .unwrap_err();
    assert!(matches!(e, QueueError::Conflict(_)), "{e}");
    let mut bad = item(6, None);
    bad.model = Some(" ".into());
    let e = q
        .enqueue_many(vec![item(7, Some("r7")), bad], T + 1)
        .await
        .unwrap_err();
    assert!(matches!(e, QueueError::Invalid(_)), "{e}");
    for (i, rid) in [(2, "r2"), (4, "r4"), (7, "r7")] {
        let (_, created) = q.enqueue(item(i, Some(rid)), T + 2).await.unwrap();
        assert!(created, "{rid} was not stored by the refused batch");
    }
    let stats = q.stats().await.unwrap();
    assert_eq!(stats.count(kiln_protocol::TaskState::Queued), 4);
}
