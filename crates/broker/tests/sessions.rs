//! Worker sessions over channels: credits, fencing, resume without redelivery, restart
//! with reassignment (the lost attempt counts; leases whose results survived in the outbox
//! are kept), a gateway restart keeping what the worker
//! runs or holds a result for, cancel replay, bad frames, a retryable reject that keeps the
//! task from its worker for the back-off.

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
    async fn connect(
        b: &Arc<Broker>,
        boot: &str,
        slots: u32,
        resume: Option<Resume>,
        inflight: Vec<String>,
    ) -> (Self, Welcome) {
        Self::connect_with_outbox(b, boot, slots, resume, inflight, vec![]).await
    }

    /// Like `connect`, saying that results for the leases in `outbox` wait to be sent.
    async fn connect_with_outbox(
        b: &Arc<Broker>,
        boot: &str,
        slots: u32,
        resume: Option<Resume>,
        inflight: Vec<String>,
        outbox: Vec<String>,
    ) -> (Self, Welcome) {
        let caps = Capabilities {
            task_types: vec!["txt2img".into()],
            ..Default::default()
        };
        Self::connect_as(b, "w1", caps, boot, slots, resume, inflight, outbox).await
    }

    #[allow(clippy::too_many_arguments)]
    async fn connect_as(
        b: &Arc<Broker>,
        worker_id: &str,
        capabilities: Capabilities,
        boot: &str,
        slots: u32,
        resume: Option<Resume>,
        inflight: Vec<String>,
        outbox: Vec<String>,
    ) -> (Self, Welcome) {
        let (tx, from_worker) = mpsc::unbounded();
        let (to_worker, rx) = mpsc::unbounded();
        let end = tokio::spawn(b.clone().serve_session(from_worker, to_worker));
        let mut w = TestWorker { tx, rx, end };
        w.send(Message::Hello(Hello {
            worker_id: worker_id.into(),
            boot_id: boot.into(),
            capabilities,
            slots,
            resume,
            inflight,
            outbox,
            // The same secret for every hello of this id: the first registers (adopts) it.
            worker_secret: Some(format!("secret-of-{worker_id}")),
        }));
        let Message::Welcome(welcome) = w.recv().await else {
            panic!("no welcome")
        };
        (w, welcome)
    }

    fn send(&mut self, m: Message) {
        self.tx
            .unbounded_send(Ok(Envelope::new(m, 0).encode()))
            .unwrap();
    }

    fn send_raw(&mut self, s: &str) {
        self.tx.unbounded_send(Ok(s.to_owned())).unwrap();
    }

    async fn recv(&mut self) -> Message {
        let f = tokio::time::timeout(Duration::from_secs(5), self.rx.next())
            .await
            .expect("frame in time")
            .expect("open");
        Envelope::decode(&f, 1 << 20).unwrap().message
    }

    async fn assign(&mut self) -> Assign {
        loop {
            match self.recv().await {
                Message::Assign(a) => return a,
                Message::HeartbeatAck(_) => continue,
                other => panic!("expected assign, got {other:?}"),
            }
        }
    }

    async fn nothing_for(&mut self, ms: u64) {
        if let Ok(Some(f)) = tokio::time::timeout(Duration::from_millis(ms), self.rx.next()).await {
            panic!("unexpected frame {f}");
        }
    }

    fn result(&mut self, lease: &str, status: ResultStatus) {
        self.send(Message::Result(TaskResult {
            lease: lease.into(),
            status,
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

fn cfg() -> BrokerConfig {
    BrokerConfig {
        heartbeat: Duration::from_millis(200),
        lease: Duration::from_secs(3),
        dead_after: Duration::from_secs(2),
        sweep_interval: Duration::from_millis(100),
        ..Default::default()
    }
}

fn broker() -> Arc<Broker> {
    Broker::new(Arc::new(SqliteQueue::in_memory(3).unwrap()), cfg())
}

async fn submit(b: &Broker, n: usize) -> Vec<String> {
    let mut ids = Vec::new();
    for i in 0..n {
        let (t, _) = b
            .submit(NewTask {
                task_type: "txt2img".into(),
                input: json!({"i": i}),
                ..Default::default()
            })
            .await
            .unwrap();
        ids.push(t.id);
    }
    ids
}

#[tokio::test]
async fn credits_limit_assignments_to_free_slots() {
    let b = broker();
    submit(&b, 5).await;
    let (mut w, _) = TestWorker::connect(&b, "boot1", 2, None, vec![]).await;
    let a = w.assign().await;
    assert_eq!(a.tasks.len(), 2, "never more than the free slots");
    w.send(Message::Ack(Ack { seq: a.seq }));
    w.nothing_for(300).await;
    w.result(&a.tasks[0].lease, ResultStatus::Ok);
    let Message::ResultAck(ack) = w.recv().await else {
        panic!()
    };
    assert!(ack.accepted);
    let next = w.assign().await;
    assert_eq!(next.tasks.len(), 1, "one slot freed, one task sent");
}

#[tokio::test]
async fn duplicate_results_get_one_acceptance() {
    let b = broker();
    let ids = submit(&b, 1).await;
    let (mut w, _) = TestWorker::connect(&b, "boot1", 1, None, vec![]).await;
    let a = w.assign().await;
    let lease = a.tasks[0].lease.clone();
    w.result(&lease, ResultStatus::Ok);
    w.result(&lease, ResultStatus::Ok);
    let Message::ResultAck(first) = w.recv().await else {
        panic!()
    };
    let Message::ResultAck(second) = w.recv().await else {
        panic!()
    };
    assert!(first.accepted);
    assert!(!second.accepted);
    assert_eq!(
        b.queue().get(&ids[0]).await.unwrap().unwrap().state,
        TaskState::Succeeded
    );
}

#[tokio::test]
async fn blip_resumes_without_redelivery_and_replays_cancel() {
    let b = broker();
    let ids = submit(&b, 1).await;
    let (mut w, welcome) = TestWorker::connect(&b, "boot1", 1, None, vec![]).await;
    let a = w.assign().await;
    w.send(Message::Ack(Ack { seq: a.seq }));
    tokio::time::sleep(Duration::from_millis(100)).await;
    let lease = a.tasks[0].lease.clone();
    w.drop_connection().await;
    // While the worker is away, the client cancels.
    assert!(matches!(
        b.cancel(&ids[0]).await.unwrap(),
        CancelOutcome::SignalWorker { .. }
    ));
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (mut w, again) = TestWorker::connect(
        &b,
        "boot1",
        1,
        Some(Resume {
            session: welcome.session.clone(),
            last_seq: a.seq,
        }),
        vec![lease.clone()],
    )
    .await;
    assert!(again.resumed);
    assert_eq!(again.keep, vec![lease.clone()]);
    match w.recv().await {
        Message::Cancel(c) => assert_eq!(c.lease, lease),
        other => panic!("expected the replayed cancel, got {other:?}"),
    }
    w.result(&lease, ResultStatus::Cancelled);
    let Message::ResultAck(ack) = w.recv().await else {
        panic!()
    };
    assert!(ack.accepted);
    assert_eq!(
        b.queue().get(&ids[0]).await.unwrap().unwrap().state,
        TaskState::Canceled
    );
    assert_eq!(
        b.queue().attempts(&ids[0]).await.unwrap().len(),
        1,
        "no redelivery"
    );
}

#[tokio::test]
async fn new_boot_releases_old_leases_at_once() {
    let b = broker();
    let ids = submit(&b, 1).await;
    let (mut w, _) = TestWorker::connect(&b, "boot1", 1, None, vec![]).await;
    let a = w.assign().await;
    w.drop_connection().await;
    let started = std::time::Instant::now();
    let (mut w2, welcome) = TestWorker::connect(&b, "boot2", 1, None, vec![]).await;
    assert!(!welcome.resumed);
    let again = w2.assign().await;
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "reassigned within 1 s of hello"
    );
    assert_eq!(again.tasks[0].task_id, ids[0]);
    assert_eq!(
        again.tasks[0].attempt, 2,
        "the attempt lost with the old process counts"
    );
    assert_ne!(again.tasks[0].lease, a.tasks[0].lease);
    w2.result(&a.tasks[0].lease, ResultStatus::Ok);
    let Message::ResultAck(stale) = w2.recv().await else {
        panic!()
    };
    assert!(!stale.accepted, "the old boot's lease is fenced out");
    let attempts = b.queue().attempts(&ids[0]).await.unwrap();
    assert_eq!(attempts.len(), 2);
    assert_eq!(attempts[0].error.as_deref(), Some("worker restarted"));
}

/// A worker process crashes after writing one result to its outbox but before the gateway
/// acknowledged it, while another task was still running. The new process's hello lists the
/// outbox lease: it is kept and its result accepted (the task ran once), and only the other
/// lease is released, with its lost attempt counted.
#[tokio::test]
async fn new_boot_keeps_the_leases_in_its_outbox_and_releases_the_rest() {
    let b = broker();
    submit(&b, 2).await;
    let (mut w, _) = TestWorker::connect(&b, "boot1", 2, None, vec![]).await;
    let a = w.assign().await;
    assert_eq!(a.tasks.len(), 2);
    let (finished, lost) = (a.tasks[0].clone(), a.tasks[1].clone());
    w.drop_connection().await;
    let (mut w2, welcome) =
        TestWorker::connect_with_outbox(&b, "boot2", 1, None, vec![], vec![finished.lease.clone()])
            .await;
    assert!(!welcome.resumed);
    assert_eq!(welcome.keep, vec![finished.lease.clone()]);
    assert!(welcome.drop.is_empty());
    // The released task is queued again at once, its lost attempt counted.
    let back = b.queue().get(&lost.task_id).await.unwrap().unwrap();
    assert_eq!(back.state, TaskState::Queued);
    assert_eq!(back.attempt, 1);
    // The kept lease fills the only slot until its result arrives.
    w2.result(&finished.lease, ResultStatus::Ok);
    let Message::ResultAck(ack) = w2.recv().await else {
        panic!()
    };
    assert!(ack.accepted, "{ack:?}");
    let done = b.queue().get(&finished.task_id).await.unwrap().unwrap();
    assert_eq!(done.state, TaskState::Succeeded);
    assert_eq!(
        b.queue().attempts(&finished.task_id).await.unwrap().len(),
        1
    );
    let again = w2.assign().await;
    assert_rerun_after_crash(b.queue(), &again, &lost.task_id, &lost.lease).await;
}

/// `again` reassigns `task_id` as attempt 2 under a new lease, the first attempt ended by
/// the crash.
async fn assert_rerun_after_crash(q: &dyn Queue, again: &Assign, task_id: &str, lost: &str) {
    assert_eq!(again.tasks[0].task_id, task_id);
    assert_eq!(again.tasks[0].attempt, 2, "the crashed attempt counted");
    assert_ne!(again.tasks[0].lease, lost);
    let attempts = q.attempts(task_id).await.unwrap();
    assert_eq!(attempts[0].error.as_deref(), Some("worker restarted"));
}

/// A worker process that crashed connects to a gateway that has no session for it (the
/// gateway restarted too, or the worker was on another instance): its hello, with no session
/// to resume and nothing running, still marks a new process, so the lost attempt counts.
#[tokio::test]
async fn new_process_on_a_gateway_without_its_session_spends_the_lost_attempt() {
    let q: Arc<dyn Queue> = Arc::new(SqliteQueue::in_memory(3).unwrap());
    let b1 = Broker::new(q.clone(), cfg());
    let ids = submit(&b1, 1).await;
    let (mut w, _) = TestWorker::connect(&b1, "boot1", 1, None, vec![]).await;
    let a = w.assign().await;
    w.drop_connection().await;
    drop(b1);
    let b2 = Broker::new(q.clone(), cfg());
    let (mut w2, welcome) = TestWorker::connect(&b2, "boot2", 1, None, vec![]).await;
    assert!(!welcome.resumed);
    let again = w2.assign().await;
    assert_rerun_after_crash(&*q, &again, &ids[0], &a.tasks[0].lease).await;
}

/// The gateway process restarts (a new broker on the same store, no sessions) while the
/// worker runs one task and holds the unsent result of another: both leases are kept, and
/// the stored result is accepted instead of the task running again.
#[tokio::test]
async fn gateway_restart_keeps_running_and_outbox_leases() {
    let q: Arc<dyn Queue> = Arc::new(SqliteQueue::in_memory(3).unwrap());
    let b1 = Broker::new(q.clone(), cfg());
    let ids = submit(&b1, 2).await;
    let (mut w, welcome) = TestWorker::connect(&b1, "boot1", 2, None, vec![]).await;
    let a = w.assign().await;
    assert_eq!(a.tasks.len(), 2);
    w.send(Message::Ack(Ack { seq: a.seq }));
    let (running, finished) = (a.tasks[0].lease.clone(), a.tasks[1].lease.clone());
    w.drop_connection().await;
    drop(b1);
    let b2 = Broker::new(q.clone(), cfg());
    let resume = Some(Resume {
        session: welcome.session,
        last_seq: a.seq,
    });
    let (mut w, again) = TestWorker::connect_with_outbox(
        &b2,
        "boot1",
        2,
        resume,
        vec![running.clone()],
        vec![finished.clone()],
    )
    .await;
    assert!(!again.resumed, "the new gateway does not know the session");
    let mut keep = again.keep.clone();
    keep.sort();
    let mut want = vec![running.clone(), finished.clone()];
    want.sort();
    assert_eq!(keep, want);
    assert!(again.drop.is_empty());
    w.result(&finished, ResultStatus::Ok);
    let Message::ResultAck(ack) = w.recv().await else {
        panic!()
    };
    assert!(ack.accepted, "{ack:?}");
    w.result(&running, ResultStatus::Ok);
    let Message::ResultAck(ack) = w.recv().await else {
        panic!()
    };
    assert!(ack.accepted, "{ack:?}");
    for id in &ids {
        assert_eq!(
            q.get(id).await.unwrap().unwrap().state,
            TaskState::Succeeded
        );
        assert_eq!(q.attempts(id).await.unwrap().len(), 1, "ran once");
    }
}

/// A task that finished while the connection was down: its lease is in the outbox, not in
/// `inflight`, and the resumed session keeps it so the result is accepted.
#[tokio::test]
async fn resume_keeps_a_lease_whose_result_is_in_the_outbox() {
    let b = broker();
    let ids = submit(&b, 1).await;
    let (mut w, welcome) = TestWorker::connect(&b, "boot1", 1, None, vec![]).await;
    let a = w.assign().await;
    w.send(Message::Ack(Ack { seq: a.seq }));
    let lease = a.tasks[0].lease.clone();
    w.drop_connection().await;
    let resume = Some(Resume {
        session: welcome.session.clone(),
        last_seq: a.seq,
    });
    let (mut w, again) =
        TestWorker::connect_with_outbox(&b, "boot1", 1, resume, vec![], vec![lease.clone()]).await;
    assert!(again.resumed);
    assert_eq!(again.keep, vec![lease.clone()]);
    w.result(&lease, ResultStatus::Ok);
    let Message::ResultAck(ack) = w.recv().await else {
        panic!()
    };
    assert!(ack.accepted, "{ack:?}");
    assert_eq!(
        b.queue().get(&ids[0]).await.unwrap().unwrap().state,
        TaskState::Succeeded
    );
    assert_eq!(b.queue().attempts(&ids[0]).await.unwrap().len(), 1);
}

#[tokio::test]
async fn long_task_with_heartbeats_runs_once() {
    let b = broker();
    let ids = submit(&b, 1).await;
    let (mut w, _) = TestWorker::connect(&b, "boot1", 1, None, vec![]).await;
    let a = w.assign().await;
    let lease = a.tasks[0].lease.clone();
    // 3 s lease; the task takes 6 s with heartbeats every 200 ms.
    let until = std::time::Instant::now() + Duration::from_secs(6);
    while std::time::Instant::now() < until {
        w.send(Message::Heartbeat(Heartbeat {
            ack_seq: a.seq,
            inflight: vec![lease.clone()],
            free: 0,
            gpu: None,
        }));
        let Message::HeartbeatAck(_) = w.recv().await else {
            panic!()
        };
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    w.result(&lease, ResultStatus::Ok);
    let Message::ResultAck(ack) = w.recv().await else {
        panic!()
    };
    assert!(ack.accepted);
    assert_eq!(
        b.queue().attempts(&ids[0]).await.unwrap().len(),
        1,
        "ran exactly once"
    );
}

#[tokio::test]
async fn bad_frames_get_error_replies_then_close() {
    let b = broker();
    let (mut w, _) = TestWorker::connect(&b, "boot1", 1, None, vec![]).await;
    w.send_raw("not json");
    let Message::Error = w.recv().await else {
        panic!()
    };
    w.send_raw(r#"{"type":"teleport","version":"1","payload":{}}"#);
    let Message::Error = w.recv().await else {
        panic!()
    };
    w.send_raw("{");
    let Message::Error = w.recv().await else {
        panic!()
    };
    let end = w.end.await.unwrap();
    assert_eq!(end.code, kiln_protocol::close::PROTOCOL);
}

#[tokio::test]
async fn first_frame_must_be_hello() {
    let b = broker();
    let (tx, from_worker) = mpsc::unbounded::<Result<String, std::io::Error>>();
    let (to_worker, _rx) = mpsc::unbounded();
    let end = tokio::spawn(b.clone().serve_session(from_worker, to_worker));
    tx.unbounded_send(Ok(Envelope::new(Message::Ack(Ack { seq: 1 }), 0).encode()))
        .unwrap();
    assert_eq!(end.await.unwrap().code, kiln_protocol::close::PROTOCOL);
}

#[tokio::test]
async fn workers_with_different_models_each_get_only_their_own_tasks() {
    let b = broker();
    let submit_for = |model: &'static str, i: usize| {
        let b = b.clone();
        async move {
            b.submit(NewTask {
                task_type: "txt2img".into(),
                input: json!({"i": i}),
                model: Some(model.into()),
                ..Default::default()
            })
            .await
            .unwrap()
            .0
            .id
        }
    };
    let (mut sdxl, mut flux) = (Vec::new(), Vec::new());
    for i in 0..3 {
        sdxl.push(submit_for("sdxl", i).await);
        flux.push(submit_for("flux", i).await);
    }
    assert!(!b.can_serve("txt2img", Some("sdxl"), &[]));
    let caps = |model: &str| Capabilities {
        task_types: vec!["txt2img".into()],
        models: vec![model.into()],
        labels: vec!["gpu=a100".into()],
    };
    let (mut wa, _) =
        TestWorker::connect_as(&b, "wa", caps("sdxl"), "ba", 8, None, vec![], vec![]).await;
    let (mut wb, _) =
        TestWorker::connect_as(&b, "wb", caps("flux"), "bb", 8, None, vec![], vec![]).await;
    assert!(b.can_serve("txt2img", Some("flux"), &["gpu=a100".into()]));
    assert!(!b.can_serve("txt2img", Some("flux"), &["gpu=h100".into()]));
    assert!(!b.can_serve("txt2img", Some("sd15"), &[]));
    assert!(b.can_serve("txt2img", None, &[]));
    async fn take(w: &mut TestWorker, n: usize) -> Vec<TaskAssignment> {
        let mut got = Vec::new();
        while got.len() < n {
            let a = w.assign().await;
            w.send(Message::Ack(Ack { seq: a.seq }));
            got.extend(a.tasks);
        }
        got
    }
    for (w, model, want) in [(&mut wa, "sdxl", &sdxl), (&mut wb, "flux", &flux)] {
        let got = take(w, 3).await;
        let mut ids: Vec<String> = got.iter().map(|t| t.task_id.clone()).collect();
        ids.sort();
        let mut want = want.clone();
        want.sort();
        assert_eq!(ids, want, "{model} worker got other tasks");
        assert!(got.iter().all(|t| t.model.as_deref() == Some(model)));
    }
    // A new task for one model wakes dispatch: only its worker gets it.
    let late = submit_for("flux", 9).await;
    let got = take(&mut wb, 1).await;
    assert_eq!(got[0].task_id, late);
    wa.nothing_for(300).await;
    for w in [wa, wb] {
        w.drop_connection().await;
    }
}

fn reject(w: &mut TestWorker, lease: &str) {
    w.send(Message::Reject(Reject {
        lease: lease.into(),
        reason: "out of memory".into(),
        retryable: true,
    }));
}

#[tokio::test]
async fn a_retryable_reject_sends_the_task_elsewhere_then_back_after_the_back_off() {
    let b = Broker::new(
        Arc::new(SqliteQueue::in_memory(3).unwrap()),
        BrokerConfig {
            reject_backoff: Duration::from_millis(800),
            ..cfg()
        },
    );
    let ids = submit(&b, 1).await;
    let (mut w1, _) = TestWorker::connect(&b, "boot1", 1, None, vec![]).await;
    let a = w1.assign().await;
    w1.send(Message::Ack(Ack { seq: a.seq }));
    reject(&mut w1, &a.tasks[0].lease);
    // Not straight back to the worker that rejected it.
    w1.nothing_for(400).await;
    // Another worker that fits gets it at once.
    let caps = Capabilities {
        task_types: vec!["txt2img".into()],
        ..Default::default()
    };
    let (mut w2, _) =
        TestWorker::connect_as(&b, "w2", caps, "boot2", 1, None, vec![], vec![]).await;
    let a2 = w2.assign().await;
    assert_eq!(a2.tasks[0].task_id, ids[0]);
    assert_eq!(a2.tasks[0].attempt, 1, "a retryable reject does not count");
    // w2 rejects it too and leaves; once w1's back-off is over, w1 gets it again.
    w2.send(Message::Ack(Ack { seq: a2.seq }));
    reject(&mut w2, &a2.tasks[0].lease);
    let again = tokio::time::timeout(Duration::from_secs(5), w1.assign())
        .await
        .expect("the task comes back to w1 after its back-off");
    assert_eq!(again.tasks[0].task_id, ids[0]);
    let attempts = b.queue().attempts(&ids[0]).await.unwrap();
    assert_eq!(attempts.len(), 1, "{attempts:?}");
    assert_eq!(attempts[0].worker_id, "w1");
}
