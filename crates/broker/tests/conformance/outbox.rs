//! The webhook outbox's contract (see `kiln_broker::outbox`), run against every backend.

use kiln_broker::*;
use serde_json::json;

use super::{T, caps, task};

const URL: &str = "http://127.0.0.1:9/hook";

fn hooked(events: &[&str]) -> NewTask {
    NewTask {
        webhook: Some(URL.into()),
        webhook_events: events.iter().map(|s| s.to_string()).collect(),
        ..task("txt2img", json!({"p": 1}))
    }
}

fn attempt(at: u64, status: Option<u16>) -> DeliveryAttempt {
    DeliveryAttempt {
        attempt: 0,
        at,
        status,
        latency_ms: 3,
        error: status.filter(|s| *s >= 300).map(|s| format!("HTTP {s}")),
    }
}

async fn events_of(q: &dyn Queue, task_id: &str) -> Vec<String> {
    q.outbox()
        .task_messages(task_id)
        .await
        .unwrap()
        .into_iter()
        .map(|r| r.message.event)
        .collect()
}

/// Every change a webhook asked for writes one message in the change's transaction; a
/// refused change (a stale lease) writes none; progress is at most once a second.
pub async fn webhook_messages_are_written_with_their_changes(q: &dyn Queue) {
    let (plain, _) = q.enqueue(task("txt2img", json!({})), T).await.unwrap();
    let (t, _) = q
        .enqueue(hooked(&["completed", "started", "progress", "started"]), T)
        .await
        .unwrap();
    assert_eq!(t.webhook.as_deref(), Some(URL));
    assert_eq!(t.webhook_events, ["completed", "progress", "started"]);
    assert_eq!(
        q.get(&t.id).await.unwrap().unwrap().webhook_events,
        t.webhook_events
    );
    let leased = q.reserve("w", &caps(), 2, T + 60_000, T + 1).await.unwrap();
    let lease = leased
        .iter()
        .find(|x| x.id == t.id)
        .unwrap()
        .lease
        .clone()
        .unwrap();
    assert_eq!(events_of(q, &t.id).await, ["task.started"]);
    for (i, at) in [T + 10, T + 500, T + 1010, T + 1500]
        .into_iter()
        .enumerate()
    {
        q.progress(&lease, None, json!({"step": i, "total": 4}), at)
            .await
            .unwrap()
            .unwrap();
    }
    assert_eq!(
        events_of(q, &t.id).await,
        ["task.started", "task.progress", "task.progress"]
    );
    let done = q
        .complete(&lease, Completion::Ok(json!({"ok": true})), T + 2000)
        .await
        .unwrap();
    assert!(done.accepted);
    let refused = q
        .complete(&lease, Completion::Ok(json!(1)), T + 2001)
        .await
        .unwrap();
    assert!(!refused.accepted);
    let all = q.outbox().task_messages(&t.id).await.unwrap();
    let names: Vec<&str> = all.iter().map(|r| r.message.event.as_str()).collect();
    assert_eq!(
        names,
        [
            "task.started",
            "task.progress",
            "task.progress",
            "task.completed"
        ]
    );
    let completed = &all[3].message;
    assert_eq!(completed.payload["id"], json!(t.id));
    assert_eq!(completed.payload["state"], json!("succeeded"));
    assert_eq!(completed.payload["output"], json!({"ok": true}));
    assert_eq!(all[1].message.payload["progress"]["step"], json!(0));
    assert_eq!(completed.state, MessageState::Pending);
    assert_eq!(completed.url, URL);
    assert!(completed.id.starts_with("msg_") && completed.id.len() == 36);
    let mut ids: Vec<&str> = all.iter().map(|r| r.message.id.as_str()).collect();
    ids.dedup();
    assert_eq!(ids.len(), 4);
    assert!(
        q.outbox()
            .task_messages(&plain.id)
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(q.outbox().pending_messages().await.unwrap(), 4);
}

/// A webhook without events gets `task.completed` only, for any terminal state.
pub async fn a_webhook_gets_completed_by_default(q: &dyn Queue) {
    let (t, _) = q.enqueue(hooked(&[]), T).await.unwrap();
    assert_eq!(t.webhook_events, ["completed"]);
    let bad = NewTask {
        webhook_events: vec!["finished".into()],
        ..hooked(&[])
    };
    assert!(matches!(
        q.enqueue(bad, T).await,
        Err(QueueError::Invalid(_))
    ));
    q.reserve("w", &caps(), 1, T + 60_000, T + 1).await.unwrap();
    assert!(events_of(q, &t.id).await.is_empty());
    assert!(matches!(
        q.cancel(&t.id, T + 2).await.unwrap(),
        CancelOutcome::SignalWorker { .. }
    ));
    assert!(events_of(q, &t.id).await.is_empty());
    let (u, _) = q.enqueue(hooked(&[]), T).await.unwrap();
    q.cancel(&u.id, T + 3).await.unwrap();
    let all = q.outbox().task_messages(&u.id).await.unwrap();
    assert_eq!(all.len(), 1);
    assert_eq!(all[0].message.payload["state"], json!("canceled"));
}

async fn three_messages(q: &dyn Queue) -> Vec<String> {
    let mut ids = Vec::new();
    for i in 0..3 {
        let (t, _) = q.enqueue(hooked(&[]), T + i).await.unwrap();
        q.cancel(&t.id, T + 10 + i).await.unwrap();
        ids.push(
            q.outbox().task_messages(&t.id).await.unwrap()[0]
                .message
                .id
                .clone(),
        );
    }
    ids
}

/// A message is held by one holder at a time; a lapsed lease frees it; only the holder may
/// record an attempt.
pub async fn message_leases_are_exclusive(q: &dyn Queue) {
    let ids = three_messages(q).await;
    let o = q.outbox();
    let (a, b) = tokio::join!(
        o.claim_messages("a", 2, T + 1000, T + 100),
        o.claim_messages("b", 2, T + 1000, T + 100)
    );
    let (a, b) = (a.unwrap(), b.unwrap());
    assert_eq!(a.len() + b.len(), 3);
    let mut seen: Vec<&String> = a.iter().chain(&b).map(|m| &m.id).collect();
    seen.sort();
    seen.dedup();
    assert_eq!(seen.len(), 3);
    assert!(
        o.claim_messages("c", 5, T + 2000, T + 500)
            .await
            .unwrap()
            .is_empty()
    );
    let mine = a.first().or(b.first()).unwrap().clone();
    let holder = mine.lease_holder.clone().unwrap();
    assert!(
        !o.record_delivery(
            &mine.id,
            "c",
            "{}",
            attempt(T + 600, Some(200)),
            DeliveryOutcome::Delivered
        )
        .await
        .unwrap()
    );
    assert!(
        o.record_delivery(
            &mine.id,
            &holder,
            "{}",
            attempt(T + 600, Some(200)),
            DeliveryOutcome::Delivered
        )
        .await
        .unwrap()
    );
    // The other two leases lapse at T + 1000.
    let again = o.claim_messages("c", 5, T + 3000, T + 1001).await.unwrap();
    assert_eq!(again.len(), 2);
    assert!(again.iter().all(|m| m.id != mine.id && ids.contains(&m.id)));
    let rec = o.message(&mine.id).await.unwrap().unwrap();
    assert_eq!(rec.message.state, MessageState::Delivered);
    assert_eq!(rec.attempts.len(), 1);
    assert_eq!(rec.attempts[0].attempt, 1);
    assert_eq!(rec.attempts[0].status, Some(200));
    assert_eq!(o.pending_messages().await.unwrap(), 2);
}

/// A failed attempt is due again at its retry time; the first body is kept; the end of the
/// schedule exhausts the message; a re-armed message is due at once.
pub async fn failures_retry_on_schedule_then_exhaust_and_rearm(q: &dyn Queue) {
    let ids = three_messages(q).await;
    let o = q.outbox();
    let m = o
        .claim_messages("a", 1, T + 1000, T + 100)
        .await
        .unwrap()
        .remove(0);
    assert_eq!(m.id, ids[0]);
    let first = r#"{"type":"task.completed"}"#;
    assert!(
        o.record_delivery(
            &m.id,
            "a",
            first,
            attempt(T + 100, Some(503)),
            DeliveryOutcome::RetryAt(T + 5000)
        )
        .await
        .unwrap()
    );
    let rest = o.claim_messages("b", 5, T + 1000, T + 200).await.unwrap();
    assert!(rest.iter().all(|x| x.id != m.id));
    let early = o.claim_messages("a", 5, T + 9000, T + 4999).await.unwrap();
    assert!(early.iter().all(|x| x.id != m.id));
    let m2 = o.claim_messages("a", 5, T + 9000, T + 5000).await.unwrap();
    assert_eq!(m2.len(), 1);
    assert_eq!(m2[0].attempts, 1);
    assert_eq!(m2[0].body.as_deref(), Some(first));
    assert!(
        o.record_delivery(
            &m.id,
            "a",
            "other",
            attempt(T + 5000, None),
            DeliveryOutcome::Exhausted
        )
        .await
        .unwrap()
    );
    let rec = o.message(&m.id).await.unwrap().unwrap();
    assert_eq!(rec.message.state, MessageState::Exhausted);
    assert_eq!(rec.message.body.as_deref(), Some(first));
    let statuses: Vec<Option<u16>> = rec.attempts.iter().map(|a| a.status).collect();
    assert_eq!(statuses, [Some(503), None]);
    assert_eq!(rec.attempts[0].error.as_deref(), Some("HTTP 503"));
    assert!(
        o.claim_messages("a", 5, T + 99_000, T + 90_000)
            .await
            .unwrap()
            .iter()
            .all(|x| x.id != m.id)
    );
    assert!(o.retry_message("msg_nope", T).await.unwrap().is_none());
    let re = o.retry_message(&m.id, T + 100_000).await.unwrap().unwrap();
    assert_eq!((re.state, re.next_at), (MessageState::Pending, T + 100_000));
    let back = o
        .claim_messages("a", 5, T + 200_000, T + 100_000)
        .await
        .unwrap();
    assert!(back.iter().any(|x| x.id == m.id));
    assert!(
        o.record_delivery(
            &m.id,
            "a",
            "x",
            attempt(T + 100_001, Some(204)),
            DeliveryOutcome::Delivered
        )
        .await
        .unwrap()
    );
    let done = o.retry_message(&m.id, T + 100_002).await.unwrap().unwrap();
    assert_eq!(done.state, MessageState::Delivered);
}

/// 410 disables the URL: its other pending messages are not sent until one is re-armed.
pub async fn gone_disables_the_url_until_a_message_is_rearmed(q: &dyn Queue) {
    let ids = three_messages(q).await;
    let o = q.outbox();
    let m = o
        .claim_messages("a", 1, T + 1000, T + 100)
        .await
        .unwrap()
        .remove(0);
    assert!(
        o.record_delivery(
            &m.id,
            "a",
            "b",
            attempt(T + 100, Some(410)),
            DeliveryOutcome::Disabled
        )
        .await
        .unwrap()
    );
    assert!(
        o.claim_messages("a", 5, T + 3000, T + 2000)
            .await
            .unwrap()
            .is_empty()
    );
    for id in &ids {
        let rec = o.message(id).await.unwrap().unwrap();
        assert_eq!(rec.message.state, MessageState::Disabled, "{id}");
    }
    assert_eq!(o.pending_messages().await.unwrap(), 0);
    o.retry_message(&ids[1], T + 3000).await.unwrap().unwrap();
    let back = o.claim_messages("a", 5, T + 9000, T + 3000).await.unwrap();
    assert_eq!(back.len(), 1);
    assert_eq!(back[0].id, ids[1]);
}

/// Messages no task change causes (worker and queue events) are stored and claimed alike.
pub async fn added_messages_are_claimed_like_task_messages(q: &dyn Queue) {
    let o = q.outbox();
    let added = o
        .add_messages(
            vec![NewMessage {
                task_id: None,
                url: URL.into(),
                event: "worker.online".into(),
                payload: json!({"worker_id": "w1", "slots": 2}),
            }],
            T,
        )
        .await
        .unwrap();
    assert_eq!(added.len(), 1);
    let got = o.claim_messages("a", 5, T + 1000, T).await.unwrap();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].id, added[0].id);
    assert_eq!(got[0].event, "worker.online");
    assert_eq!(got[0].payload, json!({"worker_id": "w1", "slots": 2}));
    assert_eq!(got[0].task_id, None);
}

/// The global endpoints [`global_endpoints_receive_their_task_events`] expects the queue to
/// be opened with.
pub fn endpoints() -> Vec<WebhookEndpoint> {
    vec![
        WebhookEndpoint {
            url: "http://127.0.0.1:9/all".into(),
            events: vec!["task.started".into(), "task.completed".into()],
        },
        WebhookEndpoint {
            url: "http://127.0.0.1:9/progress".into(),
            events: vec!["task.progress".into()],
        },
    ]
}

/// Global endpoints receive the task events they list, for every task, in the change's
/// transaction; a task's own webhook gets its messages too.
pub async fn global_endpoints_receive_their_task_events(q: &dyn Queue) {
    let (plain, _) = q.enqueue(task("txt2img", json!({})), T).await.unwrap();
    let (own, _) = q.enqueue(hooked(&[]), T).await.unwrap();
    let leased = q.reserve("w", &caps(), 2, T + 60_000, T + 1).await.unwrap();
    for t in &leased {
        let l = t.lease.clone().unwrap();
        q.progress(&l, None, json!({"step": 1}), T + 10)
            .await
            .unwrap()
            .unwrap();
        q.progress(&l, None, json!({"step": 2}), T + 20)
            .await
            .unwrap()
            .unwrap();
        q.complete(&l, Completion::Ok(json!(1)), T + 30)
            .await
            .unwrap();
    }
    let sent = |id: String| async move {
        q.outbox()
            .task_messages(&id)
            .await
            .unwrap()
            .into_iter()
            .map(|r| (r.message.event, r.message.url))
            .collect::<Vec<_>>()
    };
    let all = "http://127.0.0.1:9/all".to_owned();
    let progress = "http://127.0.0.1:9/progress".to_owned();
    assert_eq!(
        sent(plain.id.clone()).await,
        [
            ("task.started".to_owned(), all.clone()),
            ("task.progress".to_owned(), progress.clone()),
            ("task.completed".to_owned(), all.clone()),
        ]
    );
    assert_eq!(
        sent(own.id.clone()).await,
        [
            ("task.started".to_owned(), all.clone()),
            ("task.progress".to_owned(), progress),
            ("task.completed".to_owned(), URL.to_owned()),
            ("task.completed".to_owned(), all),
        ]
    );
}
