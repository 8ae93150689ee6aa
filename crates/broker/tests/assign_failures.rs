//! Worker sessions over channels, where assignments fail on the transport: a frame the
//! worker refuses, a connection that drops before the ack, a task too large for any frame
//! (each dead-lettered as `assign_failed` after three failures in a row while the other
//! tasks run), a cancel of an assignment the worker never acknowledged, and an oversized
//! result.

#![allow(clippy::unwrap_used)] // test helpers: a panic is the failure report

use std::sync::Arc;
use std::time::Duration;

use futures_channel::mpsc;
use futures_util::StreamExt;
use kiln_broker::*;
use kiln_protocol::messages::*;
use kiln_protocol::{Envelope, Message, TaskState};
use serde_json::json;

struct TestWorker {
    tx: mpsc::UnboundedSender<Result<String, std::io::Error>>,
    rx: mpsc::UnboundedReceiver<String>,
    end: tokio::task::JoinHandle<SessionEnd>,
}

impl TestWorker {
    async fn connect(b: &Arc<Broker>, slots: u32, resume: Option<Resume>) -> (Self, Welcome) {
        let (tx, from_worker) = mpsc::unbounded();
        let (to_worker, rx) = mpsc::unbounded();
        let end = tokio::spawn(b.clone().serve_session(from_worker, to_worker));
        let mut w = TestWorker { tx, rx, end };
        w.send(Message::Hello(Hello {
            worker_id: "w1".into(),
            boot_id: "boot1".into(),
            capabilities: Capabilities {
                task_types: vec!["txt2img".into()],
                ..Default::default()
            },
            slots,
            resume,
            inflight: vec![],
            outbox: vec![],
            // The same secret for every hello: the first registers (adopts) it.
            worker_secret: Some("secret-of-w1".into()),
        }));
        let Message::Welcome(welcome) = w.recv().await.message else {
            panic!("no welcome")
        };
        (w, welcome)
    }

    fn send(&mut self, m: Message) {
        self.send_env(Envelope::new(m, 0));
    }

    fn send_env(&mut self, e: Envelope) {
        self.tx.unbounded_send(Ok(e.encode())).unwrap();
    }

    /// The next frame other than `hb_ack`.
    async fn recv(&mut self) -> Envelope {
        loop {
            let Some(f) = tokio::time::timeout(Duration::from_secs(5), self.rx.next())
                .await
                .expect("frame in time")
            else {
                panic!("session ended: {:?}", (&mut self.end).await);
            };
            let e = Envelope::decode(&f, usize::MAX).unwrap();
            if !matches!(e.message, Message::HeartbeatAck(_)) {
                return e;
            }
        }
    }

    async fn assign(&mut self) -> Assign {
        match self.recv().await.message {
            Message::Assign(a) => a,
            other => panic!("expected assign, got {other:?}"),
        }
    }

    /// Refuses the last frame as too large, as a worker does for a frame over its limit.
    fn refuse(&mut self) {
        let err = kiln_protocol::DecodeError::Oversized {
            size: 20 << 20,
            limit: 16 << 20,
        };
        self.send_env(Envelope::error_reply(&err, 0));
    }

    fn ok(&mut self, lease: &str) {
        self.send(Message::Result(TaskResult {
            lease: lease.into(),
            status: ResultStatus::Ok,
            output: Some(json!({"ok": true})),
            error: None,
            usage: None,
            timings: None,
        }));
    }

    async fn drop_connection(self) -> SessionEnd {
        drop(self.tx);
        self.end.await.unwrap()
    }
}

fn broker_with(max_frame_bytes: usize) -> Arc<Broker> {
    let cfg = BrokerConfig {
        heartbeat: Duration::from_millis(200),
        lease: Duration::from_secs(3),
        dead_after: Duration::from_secs(2),
        sweep_interval: Duration::from_millis(100),
        max_frame_bytes,
        ..Default::default()
    };
    Broker::new(Arc::new(SqliteQueue::in_memory(3).unwrap()), cfg)
}

async fn submit(b: &Broker, input: serde_json::Value) -> String {
    b.submit(NewTask {
        task_type: "txt2img".into(),
        input,
        ..Default::default()
    })
    .await
    .unwrap()
    .0
    .id
}

async fn task(b: &Broker, id: &str) -> Task {
    b.queue().get(id).await.unwrap().unwrap()
}

/// Waits (bounded) until the refusal of the assignment holding `lease` was stored.
async fn settle(b: &Broker, id: &str, lease: &str) {
    for _ in 0..100 {
        if task(b, id).await.lease.as_deref() != Some(lease) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("the refused assignment of {id} was not counted");
}

fn assert_assign_failed(t: &Task) {
    assert_eq!((t.state, t.dead_lettered), (TaskState::Failed, true));
    assert_eq!(t.error.as_ref().unwrap().code, ASSIGN_FAILED);
}

#[tokio::test]
async fn a_refused_assign_fails_three_times_then_dead_letters_while_the_next_task_runs() {
    let b = broker_with(1 << 20);
    let poison = submit(&b, json!({"big": true})).await;
    let normal = submit(&b, json!({"small": true})).await;
    let (mut w, _) = TestWorker::connect(&b, 2, None).await;
    // Both fit two slots and go out in one frame the first time; the worker refuses it.
    let first = w.assign().await;
    assert_eq!(first.tasks.len(), 2);
    w.refuse();
    // Now each task goes alone (each failed once), so refusing the poison's frame no longer
    // blames the other task.
    let mut normal_done = false;
    for _ in 0..12 {
        match w.recv().await.message {
            Message::Assign(a) => {
                assert_eq!(
                    a.tasks.len(),
                    1,
                    "a task that failed an assignment goes alone"
                );
                let t = &a.tasks[0];
                if t.task_id == poison {
                    w.refuse();
                    settle(&b, &poison, &t.lease).await;
                } else {
                    w.send(Message::Ack(Ack { seq: a.seq }));
                    w.ok(&t.lease);
                }
            }
            Message::ResultAck(ack) => {
                assert!(ack.accepted);
                normal_done = true;
            }
            other => panic!("unexpected {other:?}"),
        }
        if normal_done && task(&b, &poison).await.state.is_terminal() {
            break;
        }
    }
    assert!(normal_done);
    let p = task(&b, &poison).await;
    assert_assign_failed(&p);
    let n = task(&b, &normal).await;
    assert_eq!((n.state, n.attempt), (TaskState::Succeeded, 1));
    // The worker is still connected and gets new work.
    let next = submit(&b, json!({"after": true})).await;
    let a = w.assign().await;
    assert_eq!(a.tasks[0].task_id, next);
}

#[tokio::test]
async fn an_assign_lost_with_the_connection_is_counted_on_resume_and_not_replayed() {
    let b = broker_with(1 << 20);
    let id = submit(&b, json!({})).await;
    let (mut w, welcome) = TestWorker::connect(&b, 1, None).await;
    let mut leases = Vec::new();
    for round in 0..3 {
        let a = w.assign().await;
        assert_eq!(a.tasks[0].task_id, id);
        leases.push(a.tasks[0].lease.clone());
        // The worker never gets it: its connection drops on the frame.
        w.drop_connection().await;
        let (again, back) = TestWorker::connect(
            &b,
            1,
            Some(Resume {
                session: welcome.session.clone(),
                last_seq: a.seq - 1,
            }),
        )
        .await;
        assert!(back.resumed);
        w = again;
        if round < 2 {
            assert_eq!(task(&b, &id).await.attempt, 1, "not an attempt");
        }
    }
    assert_assign_failed(&task(&b, &id).await);
    assert_eq!(
        leases
            .iter()
            .collect::<std::collections::HashSet<_>>()
            .len(),
        3
    );
    // Nothing is replayed or sent again.
    assert!(
        tokio::time::timeout(Duration::from_millis(300), w.rx.next())
            .await
            .map_or(true, |f| !f.unwrap().contains("\"assign\"")),
    );
}

#[tokio::test]
async fn a_task_too_large_for_any_frame_is_never_sent_and_others_still_are() {
    let b = broker_with(4096);
    let big = submit(&b, json!({"prompt": "x".repeat(8000)})).await;
    let small = submit(&b, json!({"prompt": "a fox"})).await;
    let (mut w, _) = TestWorker::connect(&b, 1, None).await;
    let a = w.assign().await;
    assert_eq!(
        a.tasks[0].task_id, small,
        "the big task is refused by the gateway"
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(3);
    while !task(&b, &big).await.state.is_terminal() {
        assert!(
            std::time::Instant::now() < deadline,
            "dead-lettered in time"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_assign_failed(&task(&b, &big).await);
}

#[tokio::test]
async fn cancel_of_an_unacked_assign_takes_effect_at_once() {
    let b = broker_with(1 << 20);
    let id = submit(&b, json!({})).await;
    let (mut w, welcome) = TestWorker::connect(&b, 1, None).await;
    let a = w.assign().await;
    let lease = a.tasks[0].lease.clone();
    assert!(matches!(
        b.cancel(&id).await.unwrap(),
        CancelOutcome::SignalWorker { .. }
    ));
    assert_eq!(task(&b, &id).await.state, TaskState::Canceled, "at once");
    match w.recv().await.message {
        Message::Cancel(c) => assert_eq!(c.lease, lease),
        other => panic!("expected cancel, got {other:?}"),
    }
    // After a reconnect the assign is not replayed: only the cancel is.
    w.drop_connection().await;
    let (mut w, back) = TestWorker::connect(
        &b,
        1,
        Some(Resume {
            session: welcome.session.clone(),
            last_seq: 0,
        }),
    )
    .await;
    assert!(back.resumed);
    match w.recv().await.message {
        Message::Cancel(c) => assert_eq!(c.lease, lease),
        other => panic!("expected the replayed cancel only, got {other:?}"),
    }
    assert_eq!(b.queue().attempts(&id).await.unwrap().len(), 1);
}

#[tokio::test]
async fn an_oversized_result_fails_its_task_and_is_acknowledged_and_the_session_stays() {
    let b = broker_with(4096);
    let id = submit(&b, json!({})).await;
    let (mut w, welcome) = TestWorker::connect(&b, 1, None).await;
    assert_eq!(welcome.max_frame_bytes, Some(4096));
    let a = w.assign().await;
    w.send(Message::Ack(Ack { seq: a.seq }));
    let lease = a.tasks[0].lease.clone();
    w.send(Message::Result(TaskResult {
        lease: lease.clone(),
        status: ResultStatus::Ok,
        output: Some(json!({"image": "A".repeat(10_000)})),
        error: None,
        usage: None,
        timings: None,
    }));
    let e = w.recv().await;
    assert!(matches!(e.message, Message::Error));
    assert_eq!(e.error.as_deref(), Some("oversized"));
    let Message::ResultAck(ack) = w.recv().await.message else {
        panic!("expected result_ack")
    };
    assert_eq!(ack.lease, lease);
    assert!(!ack.accepted);
    assert!(ack.reason.unwrap().starts_with("result_too_large"));
    let t = task(&b, &id).await;
    assert_eq!(t.state, TaskState::Failed);
    assert_eq!(t.error.unwrap().code, "result_too_large");
    // Oversized frames are not protocol violations: the session goes on.
    for _ in 0..3 {
        w.send(Message::Result(TaskResult {
            lease: lease.clone(),
            status: ResultStatus::Ok,
            output: Some(json!({"image": "A".repeat(10_000)})),
            error: None,
            usage: None,
            timings: None,
        }));
        assert!(matches!(w.recv().await.message, Message::Error));
        assert!(matches!(w.recv().await.message, Message::ResultAck(_)));
    }
    let next = submit(&b, json!({})).await;
    assert_eq!(w.assign().await.tasks[0].task_id, next);
}
