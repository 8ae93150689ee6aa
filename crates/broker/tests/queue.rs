//! The queue store's contract: idempotent enqueue, priority order, leases, compare-and-set
//! results, release, cancel, lapsed leases, deadlines, dead-lettering, events.

#![allow(clippy::unwrap_used)] // test helpers: a panic is the failure report

use kiln_broker::*;
use kiln_protocol::TaskState;
use kiln_protocol::messages::TaskError;
use serde_json::json;

fn q() -> SqliteQueue {
    SqliteQueue::in_memory(2).unwrap()
}

fn task(t: &str, input: serde_json::Value) -> NewTask {
    NewTask {
        task_type: t.into(),
        input,
        ..Default::default()
    }
}

const T: u64 = 1_000_000;
const TYPES: &[&str] = &["txt2img", "img2img"];

fn types() -> Vec<String> {
    TYPES.iter().map(|s| s.to_string()).collect()
}

#[test]
fn enqueue_is_idempotent_by_request_id() {
    let q = q();
    let mut t = task("txt2img", json!({"p": 1}));
    t.request_id = Some("r1".into());
    let (a, created) = q.enqueue(t.clone(), T).unwrap();
    assert!(created);
    let (b, created) = q.enqueue(t.clone(), T + 1).unwrap();
    assert!(!created);
    assert_eq!(a.id, b.id);
    t.input = json!({"p": 2});
    assert!(matches!(
        q.enqueue(t, T).unwrap_err(),
        QueueError::Conflict(_)
    ));
    assert!(matches!(
        q.enqueue(task(" ", json!({})), T).unwrap_err(),
        QueueError::Invalid(_)
    ));
}

#[test]
fn reserve_by_priority_then_age_and_capability() {
    let q = q();
    let (low, _) = q.enqueue(task("txt2img", json!(1)), T).unwrap();
    let mut hi = task("txt2img", json!(2));
    hi.priority = 5;
    let (hi, _) = q.enqueue(hi, T).unwrap();
    let (other, _) = q.enqueue(task("upscale", json!(3)), T).unwrap();
    let got = q.reserve("w", &types(), 5, T + 90_000, T).unwrap();
    assert_eq!(
        got.iter().map(|t| t.id.clone()).collect::<Vec<_>>(),
        [hi.id, low.id]
    );
    assert!(
        got.iter()
            .all(|t| t.state == TaskState::Running && t.attempt == 1 && t.lease.is_some())
    );
    assert_eq!(q.get(&other.id).unwrap().unwrap().state, TaskState::Queued);
    assert_eq!(
        q.queue_position(&q.get(&other.id).unwrap().unwrap())
            .unwrap(),
        Some(0)
    );
}

#[test]
fn results_are_compare_and_set_on_the_lease() {
    let q = q();
    let (t, _) = q.enqueue(task("txt2img", json!({})), T).unwrap();
    let lease = q.reserve("w", &types(), 1, T + 90_000, T).unwrap()[0]
        .lease
        .clone()
        .unwrap();
    let first = q
        .complete(&lease, Completion::Ok(json!({"url": "a"})), T + 5)
        .unwrap();
    assert!(first.accepted);
    let dup = q
        .complete(&lease, Completion::Ok(json!({"url": "b"})), T + 6)
        .unwrap();
    assert!(!dup.accepted);
    let done = q.get(&t.id).unwrap().unwrap();
    assert_eq!(done.state, TaskState::Succeeded);
    assert_eq!(done.output, Some(json!({"url": "a"})));
    assert!(
        !q.complete("lease_nope", Completion::Cancelled, T)
            .unwrap()
            .accepted
    );
}

#[test]
fn stale_lease_after_expiry_is_refused() {
    let q = q();
    let (t, _) = q.enqueue(task("txt2img", json!({})), T).unwrap();
    let old = q.reserve("w1", &types(), 1, T + 100, T).unwrap()[0]
        .lease
        .clone()
        .unwrap();
    let changed = q.sweep(T + 101).unwrap().changed;
    assert_eq!(changed[0].state, TaskState::Queued);
    let new = q.reserve("w2", &types(), 1, T + 90_000, T + 102).unwrap();
    assert_eq!(new[0].attempt, 2);
    let late = q
        .complete(&old, Completion::Ok(json!("late")), T + 200)
        .unwrap();
    assert!(!late.accepted);
    assert_eq!(
        late.reason.as_deref(),
        Some("stale lease: the attempt is no longer current")
    );
    assert!(
        q.complete(
            new[0].lease.as_ref().unwrap(),
            Completion::Ok(json!("ok")),
            T + 300
        )
        .unwrap()
        .accepted
    );
    let attempts = q.attempts(&t.id).unwrap();
    assert_eq!(attempts.len(), 2);
    assert_eq!(attempts[0].error.as_deref(), Some("lease expired"));
}

#[test]
fn lapsed_leases_dead_letter_after_max_attempts() {
    let q = q();
    let (t, _) = q.enqueue(task("txt2img", json!({})), T).unwrap();
    for i in 0..2u64 {
        q.reserve("w", &types(), 1, T + i * 1000 + 10, T + i * 1000)
            .unwrap();
        q.sweep(T + i * 1000 + 11).unwrap();
    }
    let t = q.get(&t.id).unwrap().unwrap();
    assert_eq!(t.state, TaskState::Failed);
    assert!(t.dead_lettered);
    assert_eq!(t.error.unwrap().code, "lease_expired");
}

#[test]
fn retryable_errors_requeue_until_attempts_run_out() {
    let q = q();
    let (t, _) = q.enqueue(task("txt2img", json!({})), T).unwrap();
    let err = TaskError {
        code: "oom".into(),
        message: "out of memory".into(),
        retryable: true,
    };
    let l1 = q.reserve("w", &types(), 1, T + 90_000, T).unwrap()[0]
        .lease
        .clone()
        .unwrap();
    let o = q
        .complete(&l1, Completion::Error(err.clone()), T + 1)
        .unwrap();
    assert_eq!(o.task.unwrap().state, TaskState::Queued);
    let l2 = q.reserve("w", &types(), 1, T + 90_000, T + 2).unwrap()[0]
        .lease
        .clone()
        .unwrap();
    let o = q.complete(&l2, Completion::Error(err), T + 3).unwrap();
    let t2 = o.task.unwrap();
    assert_eq!(t2.state, TaskState::Failed);
    assert!(t2.dead_lettered);
    assert_eq!(q.attempts(&t.id).unwrap().len(), 2);
}

#[test]
fn release_does_not_count_the_attempt() {
    let q = q();
    q.enqueue(task("txt2img", json!({})), T).unwrap();
    let l = q.reserve("w", &types(), 1, T + 90_000, T).unwrap()[0]
        .lease
        .clone()
        .unwrap();
    let back = q.release(&l, "draining", T + 1).unwrap().unwrap();
    assert_eq!((back.state, back.attempt), (TaskState::Queued, 0));
    let again = q.reserve("w", &types(), 1, T + 90_000, T + 2).unwrap();
    assert_eq!(again[0].attempt, 1);
}

#[test]
fn cancel_queued_running_and_done() {
    let q = q();
    let (a, _) = q.enqueue(task("txt2img", json!(1)), T).unwrap();
    assert!(
        matches!(q.cancel(&a.id, T).unwrap(), CancelOutcome::Canceled(t) if t.state == TaskState::Canceled)
    );
    let (b, _) = q.enqueue(task("txt2img", json!(2)), T).unwrap();
    let l = q.reserve("w", &types(), 1, T + 100, T).unwrap()[0]
        .lease
        .clone()
        .unwrap();
    match q.cancel(&b.id, T).unwrap() {
        CancelOutcome::SignalWorker {
            worker_id, lease, ..
        } => assert_eq!((worker_id.as_str(), lease.as_str()), ("w", l.as_str())),
        other => panic!("{other:?}"),
    }
    // The worker never answers: when the lease lapses the task is canceled, not redelivered.
    q.sweep(T + 101).unwrap();
    assert_eq!(q.get(&b.id).unwrap().unwrap().state, TaskState::Canceled);
    assert!(matches!(
        q.cancel(&b.id, T).unwrap(),
        CancelOutcome::AlreadyTerminal(_)
    ));
    assert!(matches!(
        q.cancel("task_x", T).unwrap(),
        CancelOutcome::NotFound
    ));
}

#[test]
fn deadlines_expire_tasks() {
    let q = q();
    let mut t = task("txt2img", json!({}));
    t.deadline = Some(T + 50);
    let (t, _) = q.enqueue(t, T).unwrap();
    q.sweep(T + 51).unwrap();
    assert_eq!(q.get(&t.id).unwrap().unwrap().state, TaskState::Expired);
}

#[test]
fn events_resume_after_an_id() {
    let q = q();
    let (t, _) = q.enqueue(task("txt2img", json!({})), T).unwrap();
    let l = q.reserve("w", &types(), 1, T + 90_000, T).unwrap()[0]
        .lease
        .clone()
        .unwrap();
    q.progress(&l, json!({"step": 1, "total": 2}), T + 1)
        .unwrap();
    q.complete(&l, Completion::Ok(json!({})), T + 2).unwrap();
    let all = q.events_after(&t.id, 0).unwrap();
    let kinds: Vec<_> = all.iter().map(|e| e.kind.as_str()).collect();
    assert_eq!(
        kinds,
        ["status", "status", "progress", "status", "completed"]
    );
    let tail = q.events_after(&t.id, all[2].id).unwrap();
    assert_eq!(tail.len(), 2);
    assert_eq!(q.take_events().len(), 5);
}

#[test]
fn survives_reopening_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("q.sqlite");
    let id = {
        let q = SqliteQueue::open(&path, 3, 0, false).unwrap();
        q.enqueue(task("txt2img", json!({"keep": true})), T)
            .unwrap()
            .0
            .id
    };
    let q = SqliteQueue::open(&path, 3, 0, false).unwrap();
    assert_eq!(q.get(&id).unwrap().unwrap().input, json!({"keep": true}));
    assert_eq!(q.stats().unwrap().count(TaskState::Queued), 1);
}

#[test]
fn timings_merge_by_key_and_worker_stages_need_the_current_lease() {
    let q = q();
    let (t, _) = q.enqueue(task("txt2img", json!({})), T).unwrap();
    assert_eq!(q.timings(&t.id).unwrap(), None);
    let m = |v: serde_json::Value| v.as_object().unwrap().clone();
    q.merge_timings(&t.id, &m(json!({"compress_ms": 7})))
        .unwrap();
    let lease = q.reserve("w", &types(), 1, T + 90_000, T + 10).unwrap()[0]
        .lease
        .clone()
        .unwrap();
    let stages: std::collections::BTreeMap<String, u64> =
        [("render_ms".to_owned(), 40), ("upload_ms".to_owned(), 3)].into();
    assert!(q.record_worker_timings(&lease, &stages).unwrap());
    assert!(
        !q.record_worker_timings("lease_nope", &stages).unwrap(),
        "an unknown lease records nothing"
    );
    q.complete(&lease, Completion::Ok(json!({})), T + 60)
        .unwrap();
    // The attempt is over: a late duplicate result cannot overwrite the stages.
    let late: std::collections::BTreeMap<String, u64> = [("render_ms".to_owned(), 1)].into();
    assert!(!q.record_worker_timings(&lease, &late).unwrap());
    q.merge_timings(&t.id, &m(json!({"upload_ms": 2}))).unwrap();
    assert_eq!(
        q.timings(&t.id).unwrap(),
        Some(
            json!({"compress_ms": 7, "upload_ms": 2, "worker": {"render_ms": 40, "upload_ms": 3}})
        )
    );
}
