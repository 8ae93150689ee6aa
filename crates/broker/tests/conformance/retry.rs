//! The contract of `Queue::retry`: a task that ended without succeeding is queued again as
//! a new attempt of the same task; every other state is refused.

use kiln_broker::*;
use kiln_protocol::TaskState;
use serde_json::json;

use super::{T, caps, lease_one, oom, task};

/// Runs `id` through two retryable failures (the queues of the suite allow 2 attempts).
async fn dead_letter_by_failures(q: &dyn Queue, now: u64) {
    for k in 0..2 {
        let l = lease_one(q, "w", now + 90_000, now + k).await;
        assert!(q.fail(&l, oom(), now + k, now + k).await.unwrap().accepted);
    }
}

pub async fn retry_queues_a_dead_lettered_task_as_a_new_attempt(q: &dyn Queue) {
    let (t, _) = q
        .enqueue(task("txt2img", json!({"prompt": "a fox"})), T)
        .await
        .unwrap();
    dead_letter_by_failures(q, T).await;
    let dead = q.get(&t.id).await.unwrap().unwrap();
    assert_eq!((dead.state, dead.dead_lettered), (TaskState::Failed, true));
    let RetryOutcome::Queued(back) = q.retry(&t.id, None, T + 10).await.unwrap() else {
        panic!("a dead-lettered task is retried");
    };
    assert_eq!(back.state, TaskState::Queued);
    assert_eq!((back.attempt, back.max_attempts), (2, 4), "2 more attempts");
    assert!(!back.dead_lettered && back.completed_at.is_none() && back.worker_id.is_none());
    assert_eq!((back.input.clone(), back.seq), (t.input.clone(), t.seq));
    assert_eq!(q.get(&t.id).await.unwrap().unwrap(), back);
    assert_eq!(q.queue_position(&back).await.unwrap(), Some(0));
    assert_eq!(q.stats().await.unwrap().count(TaskState::Queued), 1);
    assert_eq!(q.stats().await.unwrap().count(TaskState::Failed), 0);
    // The retry is a status event after the task's completed event.
    let events = q.events_after(&t.id, 0).await.unwrap();
    let n = events.len();
    assert!(events[n - 2].kind.is_completed());
    assert_eq!(
        events[n - 1].kind.data(),
        json!({"status": "queued", "attempt": 2, "worker_id": null})
    );
    // The next claim is attempt 3 of the same task; the earlier records stay.
    let got = q
        .reserve("w2", &caps(), 1, T + 90_000, T + 11)
        .await
        .unwrap();
    assert_eq!((got[0].id.as_str(), got[0].attempt), (t.id.as_str(), 3));
    let l = got[0].lease.clone().unwrap();
    let done = q
        .complete(&l, Completion::Ok(json!({"ok": 1})), T + 12)
        .await
        .unwrap();
    assert_eq!(done.task.unwrap().state, TaskState::Succeeded);
    let attempts = q.attempts(&t.id).await.unwrap();
    assert_eq!(
        attempts.iter().map(|a| a.attempt).collect::<Vec<_>>(),
        [1, 2, 3]
    );
    assert_eq!(attempts[2].worker_id, "w2");
}

pub async fn retry_refuses_queued_running_and_succeeded_tasks(q: &dyn Queue) {
    assert_eq!(
        q.retry("task_none", None, T).await.unwrap(),
        RetryOutcome::NotFound
    );
    let (a, _) = q.enqueue(task("txt2img", json!(1)), T).await.unwrap();
    assert!(matches!(
        q.retry(&a.id, None, T).await.unwrap(),
        RetryOutcome::Refused(t) if t.state == TaskState::Queued
    ));
    let l = lease_one(q, "w", T + 90_000, T).await;
    assert!(matches!(
        q.retry(&a.id, None, T).await.unwrap(),
        RetryOutcome::Refused(t) if t.state == TaskState::Running
    ));
    q.complete(&l, Completion::Ok(json!(1)), T + 1)
        .await
        .unwrap();
    let RetryOutcome::Refused(done) = q.retry(&a.id, None, T + 2).await.unwrap() else {
        panic!("a succeeded task is not retried");
    };
    assert_eq!(done.state, TaskState::Succeeded);
    // Nothing was written by the refusals.
    let events = q.events_after(&a.id, 0).await.unwrap();
    assert!(events.last().unwrap().kind.is_completed());
}

pub async fn retry_of_canceled_and_expired_tasks_and_their_deadlines(q: &dyn Queue) {
    // Canceled with a deadline still ahead: queued again under the same deadline.
    let mut nt = task("txt2img", json!(1));
    nt.deadline = Some(T + 1_000);
    let (c, _) = q.enqueue(nt, T).await.unwrap();
    q.cancel(&c.id, T + 1).await.unwrap();
    let RetryOutcome::Queued(back) = q.retry(&c.id, Some(1), T + 2).await.unwrap() else {
        panic!("a canceled task is retried");
    };
    assert_eq!((back.deadline, back.max_attempts), (Some(T + 1_000), 1));
    // Expired: its passed deadline is dropped, so it is not expired again.
    let mut nt = task("txt2img", json!(2));
    nt.deadline = Some(T + 50);
    let (e, _) = q.enqueue(nt, T).await.unwrap();
    q.sweep(T + 51).await.unwrap();
    assert_eq!(
        q.get(&e.id).await.unwrap().unwrap().state,
        TaskState::Expired
    );
    let RetryOutcome::Queued(back) = q.retry(&e.id, None, T + 60).await.unwrap() else {
        panic!("an expired task is retried");
    };
    assert_eq!(back.deadline, None);
    q.sweep(T + 900).await.unwrap();
    assert_eq!(
        q.get(&e.id).await.unwrap().unwrap().state,
        TaskState::Queued
    );
    // The canceled one's kept deadline still holds.
    q.sweep(T + 1_001).await.unwrap();
    assert_eq!(
        q.get(&c.id).await.unwrap().unwrap().state,
        TaskState::Expired
    );
    // A retry granted one attempt dead-letters on its first retryable failure.
    let mut nt = task("txt2img", json!(3));
    nt.priority = 10; // ahead of the task queued again above
    let (f, _) = q.enqueue(nt, T).await.unwrap();
    let l = lease_one(q, "w", T + 90_000, T + 1_002).await;
    q.fail(&l, oom(), T + 1_003, T + 1_003).await.unwrap();
    let l = lease_one(q, "w", T + 90_000, T + 1_004).await;
    q.fail(&l, oom(), T + 1_005, T + 1_005).await.unwrap();
    assert!(q.get(&f.id).await.unwrap().unwrap().dead_lettered);
    q.retry(&f.id, Some(1), T + 1_006).await.unwrap();
    let l = lease_one(q, "w", T + 90_000, T + 1_007).await;
    let o = q.fail(&l, oom(), T + 1_008, T + 1_008).await.unwrap();
    let t = o.task.unwrap();
    assert_eq!(
        (t.state, t.dead_lettered, t.attempt),
        (TaskState::Failed, true, 3)
    );
}
