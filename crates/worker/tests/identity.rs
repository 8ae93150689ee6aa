//! The worker SDK keeps the secret the gateway issues at first registration in its state
//! dir and proves its identity with it after a restart; a process that lost the secret is
//! refused (4005) and stops, and the worker running under that id is not disturbed.

#![allow(clippy::unwrap_used)] // test helpers: a panic is the failure report

use std::path::Path;
use std::time::Duration;

use kiln_broker::{Broker, BrokerConfig, NewTask, SqliteQueue};
use kiln_protocol::{TaskState, close};
use kiln_test_support_gateway::serve;
use kiln_worker::{TaskContext, Worker, WorkerConfig, WorkerError};
use serde_json::json;
use tokio::net::TcpListener;

fn worker(url: &str, dir: &Path) -> Worker {
    let mut wc = WorkerConfig {
        url: url.to_owned(),
        state_dir: dir.to_path_buf(),
        ..Default::default()
    };
    wc.reconnect.initial_backoff = Duration::from_millis(100);
    wc.reconnect.max_backoff = Duration::from_millis(300);
    Worker::new(wc).blocking_handler("echo", |ctx: TaskContext| Ok(json!({"echo": ctx.input})))
}

async fn connected(b: &Broker, boot_not: Option<&str>) -> String {
    for _ in 0..100 {
        if let Some(w) = b
            .workers()
            .into_iter()
            .find(|w| w.connected && Some(w.boot_id.as_str()) != boot_not)
        {
            return w.boot_id;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("no worker connected")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_secret_is_kept_and_a_process_without_it_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("w");
    let queue = std::sync::Arc::new(SqliteQueue::in_memory(3).unwrap());
    let broker = Broker::with_queue(
        queue,
        BrokerConfig {
            heartbeat: Duration::from_millis(300),
            ..Default::default()
        },
    );
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("ws://{}/v1/workers/connect", listener.local_addr().unwrap());
    let _server = serve(broker.clone(), listener);

    // First registration: the secret lands in the state dir, owner-only.
    let first = worker(&url, &state);
    let h1 = first.handle();
    let t1 = tokio::spawn(first.run());
    let boot1 = connected(&broker, None).await;
    // The broker lists the worker before its `welcome` (which carries the secret) has
    // reached the worker and been stored.
    for _ in 0..100 {
        if std::fs::read_to_string(state.join("worker_secret")).is_ok_and(|s| !s.is_empty()) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let secret = std::fs::read_to_string(state.join("worker_secret")).unwrap();
    assert!(secret.starts_with("wks_"), "{secret}");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(state.join("worker_secret"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }
    h1.shutdown();
    tokio::time::timeout(Duration::from_secs(10), t1)
        .await
        .unwrap()
        .unwrap()
        .unwrap();

    // A restart of the same worker (same state dir) proves its identity and runs tasks.
    let again = worker(&url, &state);
    let h2 = again.handle();
    let t2 = tokio::spawn(again.run());
    let boot2 = connected(&broker, Some(&boot1)).await;
    assert_ne!(boot1, boot2);
    let (task, _) = broker
        .submit(NewTask {
            task_type: "echo".into(),
            input: json!({"n": 1}),
            ..Default::default()
        })
        .await
        .unwrap();
    for _ in 0..100 {
        if broker.queue().get(&task.id).await.unwrap().unwrap().state == TaskState::Succeeded {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        broker.queue().get(&task.id).await.unwrap().unwrap().state,
        TaskState::Succeeded
    );

    // Another process with the same worker id but without the secret (a copied id, or a
    // state dir that lost its secret) is refused and stops; the real worker stays.
    let impostor_dir = dir.path().join("impostor");
    std::fs::create_dir_all(&impostor_dir).unwrap();
    std::fs::copy(state.join("worker_id"), impostor_dir.join("worker_id")).unwrap();
    let err = tokio::time::timeout(Duration::from_secs(10), worker(&url, &impostor_dir).run())
        .await
        .expect("the impostor stops instead of retrying")
        .unwrap_err();
    match err {
        WorkerError::Refused { code, reason } => {
            assert_eq!(code, close::IDENTITY, "{reason}");
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    let w = broker.workers();
    assert_eq!(w.len(), 1);
    assert!(w[0].connected);
    assert_eq!(w[0].boot_id, boot2, "the real worker kept its session");
    h2.shutdown();
    tokio::time::timeout(Duration::from_secs(10), t2)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
}
