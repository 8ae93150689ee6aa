//! A `Queue` used directly, without a broker or workers: a SQLite queue in a temp dir,
//! two tasks submitted (one twice under the same idempotency key), claimed under a lease
//! and completed, one with an output and one with a retryable error that queues it again.
//!
//! Run: `cargo run -p kiln-broker --example queue`. `cargo test -p kiln-broker` runs it too.

use std::time::Duration;

use kiln_broker::{Capabilities, Completion, NewTask, Queue, SqliteOptions, SqliteQueue, now_ms};
use kiln_protocol::TaskState;
use kiln_protocol::messages::TaskError;
use serde_json::json;

type Error = Box<dyn std::error::Error + Send + Sync>;

async fn run() -> Result<(), Error> {
    let dir = tempfile::tempdir()?;
    let queue = SqliteQueue::open(&dir.path().join("queue.sqlite"), SqliteOptions::default())?;

    // Submit: durable when `enqueue` returns; the same request id gives back the same task.
    let now = now_ms();
    let fox = NewTask {
        task_type: "txt2img".into(),
        input: json!({"prompt": "a fox"}),
        request_id: Some("req-fox".into()),
        ..Default::default()
    };
    let (task, created) = queue.enqueue(fox.clone(), now).await?;
    let (again, created_again) = queue.enqueue(fox, now).await?;
    assert!(created && !created_again && again.id == task.id);
    let (owl, _) = queue
        .enqueue(
            NewTask {
                task_type: "txt2img".into(),
                input: json!({"prompt": "an owl"}),
                ..Default::default()
            },
            now,
        )
        .await?;
    println!("submitted {} and {}", task.id, owl.id);

    // Claim: a worker serving `txt2img` leases up to two tasks for 30 s.
    let caps = Capabilities {
        task_types: vec!["txt2img".into()],
        ..Default::default()
    };
    let lease_until = now + Duration::from_secs(30).as_millis() as u64;
    let claimed = queue
        .reserve("worker-1", &caps, 2, lease_until, now)
        .await?;
    assert_eq!(claimed.len(), 2);
    for t in &claimed {
        println!(
            "claimed {} (attempt {}) under lease {:?}",
            t.id, t.attempt, t.lease
        );
    }

    // Complete: the first with an output, the second with a retryable error.
    let mut outcomes = Vec::new();
    for (t, completion) in claimed.iter().zip([
        Completion::Ok(json!({"image": "fox.png"})),
        Completion::Error(TaskError {
            code: "gpu_busy".into(),
            message: "out of memory, try again".into(),
            retryable: true,
        }),
    ]) {
        let lease = t.lease.as_deref().ok_or("a claimed task has a lease")?;
        let outcome = queue.complete(lease, completion, now_ms()).await?;
        assert!(outcome.accepted, "{:?}", outcome.reason);
        outcomes.push(outcome.task.ok_or("the task after completion")?);
    }
    for t in &outcomes {
        println!("{} is {:?}, output {:?}", t.id, t.state, t.output);
    }
    assert_eq!(outcomes[0].state, TaskState::Succeeded);
    assert_eq!(
        outcomes[1].state,
        TaskState::Queued,
        "a retryable error queues it again"
    );

    // A result for a lease that has ended changes nothing.
    let stale = claimed[0].lease.as_deref().ok_or("lease")?;
    let late = queue
        .complete(stale, Completion::Ok(json!(null)), now_ms())
        .await?;
    assert!(!late.accepted);
    println!(
        "a second result for {} is refused: {:?}",
        claimed[0].id, late.reason
    );
    Ok(())
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Error> {
    run().await
}

#[cfg(test)]
mod tests {
    #[tokio::test]
    async fn the_example_runs() {
        super::run().await.unwrap();
    }
}
