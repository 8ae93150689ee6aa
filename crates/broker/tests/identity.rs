//! Worker identity over real sessions: a worker cannot act on another worker's lease, a
//! hello for a registered `worker_id` must carry the secret issued to it (and a refused one
//! leaves the connected worker alone), and `worker_id` / `boot_id` are validated.

#![allow(clippy::unwrap_used)] // test helpers: a panic is the failure report

use std::sync::Arc;
use std::time::Duration;

use futures_channel::mpsc;
use futures_util::StreamExt;
use kiln_broker::*;
use kiln_protocol::messages::*;
use kiln_protocol::{Envelope, Message, TaskState, close};
use serde_json::json;

struct Conn {
    tx: mpsc::UnboundedSender<Result<String, std::io::Error>>,
    rx: mpsc::UnboundedReceiver<String>,
    end: tokio::task::JoinHandle<SessionEnd>,
}

fn hello(worker_id: &str, boot: &str, secret: Option<&str>) -> Hello {
    Hello {
        worker_id: worker_id.into(),
        boot_id: boot.into(),
        capabilities: Capabilities {
            task_types: vec!["txt2img".into()],
            ..Default::default()
        },
        slots: 1,
        resume: None,
        inflight: vec![],
        outbox: vec![],
        worker_secret: secret.map(str::to_owned),
    }
}

impl Conn {
    fn open(b: &Arc<Broker>, h: Hello) -> Self {
        let (tx, from_worker) = mpsc::unbounded();
        let (to_worker, rx) = mpsc::unbounded();
        let end = tokio::spawn(b.clone().serve_session(from_worker, to_worker));
        let mut c = Conn { tx, rx, end };
        c.send(Message::Hello(h));
        c
    }

    async fn welcomed(b: &Arc<Broker>, h: Hello) -> (Self, Welcome) {
        let mut c = Self::open(b, h);
        let Message::Welcome(w) = c.recv().await else {
            panic!("no welcome")
        };
        (c, w)
    }

    fn send(&mut self, m: Message) {
        self.tx
            .unbounded_send(Ok(Envelope::new(m, 0).encode()))
            .unwrap();
    }

    async fn recv(&mut self) -> Message {
        loop {
            let f = tokio::time::timeout(Duration::from_secs(5), self.rx.next())
                .await
                .expect("frame in time")
                .expect("open");
            match Envelope::decode(&f, 1 << 20).unwrap().message {
                Message::HeartbeatAck(_) => continue,
                m => return m,
            }
        }
    }

    async fn refused(self) -> SessionEnd {
        tokio::time::timeout(Duration::from_secs(5), self.end)
            .await
            .expect("session ends")
            .unwrap()
    }

    fn result(&mut self, lease: &str, from: &str) {
        self.send(Message::Result(TaskResult {
            lease: lease.into(),
            status: ResultStatus::Ok,
            output: Some(json!({ "from": from })),
            error: None,
            usage: None,
            timings: None,
        }));
    }
}

fn broker() -> Arc<Broker> {
    let cfg = BrokerConfig {
        heartbeat: Duration::from_millis(200),
        lease: Duration::from_secs(3),
        dead_after: Duration::from_secs(2),
        sweep_interval: Duration::from_millis(100),
        ..Default::default()
    };
    Broker::new(Arc::new(SqliteQueue::in_memory(3).unwrap()), cfg)
}

async fn submit(b: &Broker) -> String {
    b.submit(NewTask {
        task_type: "txt2img".into(),
        input: json!({}),
        ..Default::default()
    })
    .await
    .unwrap()
    .0
    .id
}

#[tokio::test]
async fn a_worker_cannot_complete_another_workers_lease() {
    let b = broker();
    let id = submit(&b).await;
    let (mut a, _) = Conn::welcomed(&b, hello("wa", "ba", None)).await;
    let Message::Assign(asg) = a.recv().await else {
        panic!("expected assign")
    };
    let lease = asg.tasks[0].lease.clone();
    // Worker B (same worker token, its own id) sends a result carrying A's lease.
    let (mut thief, _) = Conn::welcomed(&b, hello("wb", "bb", None)).await;
    thief.send(Message::Progress(Progress {
        lease: lease.clone(),
        stage: Some("x".into()),
        step: 1,
        total: 2,
        eta_ms: None,
    }));
    thief.send(Message::Release(Release {
        lease: lease.clone(),
    }));
    thief.result(&lease, "b");
    let Message::ResultAck(ack) = thief.recv().await else {
        panic!("expected result_ack")
    };
    assert!(!ack.accepted);
    assert_eq!(ack.reason.as_deref(), Some(NOT_HOLDER));
    let t = b.queue().get(&id).await.unwrap().unwrap();
    assert_eq!(t.state, TaskState::Running, "B's frames changed nothing");
    assert_eq!(t.lease.as_deref(), Some(lease.as_str()));
    assert_eq!(t.progress, None);
    // A's genuine result is the one that counts.
    a.result(&lease, "a");
    let Message::ResultAck(ack) = a.recv().await else {
        panic!("expected result_ack")
    };
    assert!(ack.accepted, "{:?}", ack.reason);
    let t = b.queue().get(&id).await.unwrap().unwrap();
    assert_eq!(t.state, TaskState::Succeeded);
    assert_eq!(t.output, Some(json!({"from": "a"})));
}

#[tokio::test]
async fn the_first_hello_gets_a_secret_that_later_hellos_must_present() {
    let b = broker();
    let (real, welcome) = Conn::welcomed(&b, hello("gpu-01", "boot1", None)).await;
    let secret = welcome
        .worker_secret
        .expect("a secret on first registration");
    assert!(secret.starts_with("wks_") && secret.len() == 68, "{secret}");
    let id = submit(&b).await;
    let mut real = real;
    let Message::Assign(asg) = real.recv().await else {
        panic!("expected assign")
    };
    // Someone with the worker token claims the id: without a secret, then with a wrong one.
    for claim in [None, Some("wks_guess"), Some("")] {
        let end = Conn::open(&b, hello("gpu-01", "evil", claim))
            .refused()
            .await;
        assert_eq!(end.code, close::IDENTITY, "{claim:?}: {}", end.reason);
        assert!(end.reason.contains("worker_secret"), "{}", end.reason);
    }
    // The real worker was not closed and still holds its task.
    let w = b.workers();
    assert_eq!(w.len(), 1);
    assert!(w[0].connected);
    assert_eq!(w[0].boot_id, "boot1");
    real.result(&asg.tasks[0].lease, "real");
    let Message::ResultAck(ack) = real.recv().await else {
        panic!("expected result_ack")
    };
    assert!(ack.accepted, "{:?}", ack.reason);
    assert_eq!(
        b.queue().get(&id).await.unwrap().unwrap().output,
        Some(json!({"from": "real"}))
    );
    // A new boot that proves the identity takes over (the old session gets 4003), and no
    // new secret is issued.
    let (_next, w2) = Conn::welcomed(&b, hello("gpu-01", "boot2", Some(&secret))).await;
    assert_eq!(w2.worker_secret, None);
    let old = real.refused().await;
    assert_eq!(old.code, close::REPLACED);
}

#[tokio::test]
async fn a_presented_secret_is_adopted_when_none_is_stored_and_can_be_forgotten() {
    let b = broker();
    let (c, w) = Conn::welcomed(&b, hello("w1", "b1", Some("kept-from-before"))).await;
    assert_eq!(
        w.worker_secret, None,
        "nothing issued: the worker's own is adopted"
    );
    drop(c);
    let end = Conn::open(&b, hello("w1", "b2", Some("other")))
        .refused()
        .await;
    assert_eq!(end.code, close::IDENTITY);
    // An operator forgets the identity: the next hello registers afresh.
    assert!(b.forget_identity("w1").await.unwrap());
    let (_c, w) = Conn::welcomed(&b, hello("w1", "b3", None)).await;
    assert!(w.worker_secret.is_some());
}

#[tokio::test]
async fn invalid_worker_and_boot_ids_are_refused() {
    let b = broker();
    let long = "w".repeat(100_000);
    for (id, boot, field) in [
        ("", "b1", "worker_id"),
        (long.as_str(), "b1", "worker_id"),
        ("w 1", "b1", "worker_id"),
        ("w1\n", "b1", "worker_id"),
        ("w/1", "b1", "worker_id"),
        ("w1", "", "boot_id"),
        ("w1", long.as_str(), "boot_id"),
    ] {
        let end = Conn::open(&b, hello(id, boot, None)).refused().await;
        assert_eq!(end.code, close::PROTOCOL, "{field}");
        assert!(
            end.reason.starts_with(&format!("invalid {field}: ")),
            "{}",
            end.reason
        );
        assert!(end.reason.len() < 200, "the reason does not echo the id");
    }
    assert!(b.workers().is_empty(), "nothing was listed");
    let ok = "gpu-01.rack_2:a@b".to_owned() + &"x".repeat(128 - 17);
    assert_eq!(ok.len(), 128);
    let (_c, w) = Conn::welcomed(&b, hello(&ok, "boot_1", None)).await;
    assert!(w.worker_secret.is_some());
}
