//! The queue conformance suite on the SQLite backend (in memory and on a file), and what
//! only a file can show: reopening it keeps the tasks.

#![allow(clippy::unwrap_used)] // test helpers: a panic is the failure report

mod conformance;

use std::sync::Arc;

use kiln_broker::*;
use kiln_protocol::TaskState;
use serde_json::json;

async fn in_memory(_test: &str) -> Option<Arc<dyn Queue>> {
    Some(Arc::new(SqliteQueue::in_memory(2).unwrap()))
}

async fn done(_test: &str) {}

conformance_tests!(in_memory, done);

/// A queue file of its own per test and executor, removed first and after.
fn file_of(test: &str, executor: SqliteExecutor) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("kiln-conformance-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(format!("{test}-{executor:?}.sqlite"))
}

fn remove_file_of(test: &str, executor: SqliteExecutor) {
    let path = file_of(test, executor);
    for ext in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{ext}", path.display()));
    }
}

fn open_file_of(test: &str, executor: SqliteExecutor) -> Option<Arc<dyn Queue>> {
    remove_file_of(test, executor);
    let opts = SqliteOptions {
        queue: QueueOptions {
            default_max_attempts: 2,
            retry_base_ms: 0,
            ..QueueOptions::default()
        },
        executor,
        ..SqliteOptions::default()
    };
    Some(Arc::new(
        SqliteQueue::open(&file_of(test, executor), opts).unwrap(),
    ))
}

/// Global webhook endpoints, on a file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn global_endpoints_receive_their_task_events() {
    let dir = tempfile::tempdir().unwrap();
    let opts = SqliteOptions {
        queue: QueueOptions {
            default_max_attempts: 2,
            retry_base_ms: 0,
            webhook_endpoints: conformance::endpoints(),
        },
        ..SqliteOptions::default()
    };
    let q = SqliteQueue::open(&dir.path().join("q.sqlite"), opts).unwrap();
    conformance::global_endpoints_receive_their_task_events(&q).await;
}

/// The same suite on a file with the blocking-pool executor.
mod on_file_blocking_pool {
    use super::*;

    async fn on_file(test: &str) -> Option<Arc<dyn Queue>> {
        open_file_of(test, SqliteExecutor::BlockingPool)
    }

    async fn remove(test: &str) {
        remove_file_of(test, SqliteExecutor::BlockingPool)
    }

    use crate::conformance;
    conformance_tests!(on_file, remove);
}

/// The same suite on a file with the default executor: one writer thread that commits
/// waiting calls together, and a read connection of its own.
mod on_file_writer_thread {
    use super::*;

    async fn on_file(test: &str) -> Option<Arc<dyn Queue>> {
        open_file_of(test, SqliteExecutor::Thread)
    }

    async fn remove(test: &str) {
        remove_file_of(test, SqliteExecutor::Thread)
    }

    use crate::conformance;
    conformance_tests!(on_file, remove);
}

#[tokio::test]
async fn survives_reopening_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("q.sqlite");
    let id = {
        let q = SqliteQueue::open(&path, SqliteOptions::default()).unwrap();
        let nt = NewTask {
            task_type: "txt2img".into(),
            input: json!({"keep": true}),
            ..Default::default()
        };
        q.enqueue(nt, 1).await.unwrap().0.id
    };
    let q = SqliteQueue::open(&path, SqliteOptions::default()).unwrap();
    assert_eq!(
        q.get(&id).await.unwrap().unwrap().input,
        json!({"keep": true})
    );
    assert_eq!(q.stats().await.unwrap().count(TaskState::Queued), 1);
}

#[tokio::test]
async fn a_file_from_before_routing_gets_the_new_columns() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("q.sqlite");
    let old = {
        let q = SqliteQueue::open(&path, SqliteOptions::default()).unwrap();
        let nt = NewTask {
            task_type: "txt2img".into(),
            input: json!({"old": true}),
            ..Default::default()
        };
        q.enqueue(nt, 1).await.unwrap().0.id
    };
    // The file as an earlier release left it: no routing columns.
    {
        let c = rusqlite::Connection::open(&path).unwrap();
        c.execute_batch(
            "ALTER TABLE tasks DROP COLUMN model; ALTER TABLE tasks DROP COLUMN labels;",
        )
        .unwrap();
        let cols: i64 = c
            .query_row(
                "SELECT COUNT(*) FROM pragma_table_info('tasks') WHERE name IN ('model', 'labels')",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(cols, 0);
    }
    let q = SqliteQueue::open(&path, SqliteOptions::default()).unwrap();
    let t = q.get(&old).await.unwrap().unwrap();
    assert_eq!((t.model, t.labels.len()), (None, 0));
    let nt = NewTask {
        task_type: "txt2img".into(),
        input: json!({"new": true}),
        model: Some("sdxl".into()),
        labels: vec!["gpu=a100".into()],
        ..Default::default()
    };
    let (routed, _) = q.enqueue(nt, 2).await.unwrap();
    drop(q);
    // Opening again finds the columns and changes nothing.
    let q = SqliteQueue::open(&path, SqliteOptions::default()).unwrap();
    let w = Capabilities {
        task_types: vec!["txt2img".into()],
        models: vec!["sdxl".into()],
        labels: vec!["gpu=a100".into()],
    };
    let got = q.reserve("w", &w, 5, 100_000, 3).await.unwrap();
    let got: Vec<&str> = got.iter().map(|t| t.id.as_str()).collect();
    assert_eq!(got, [old.as_str(), routed.id.as_str()]);
}
