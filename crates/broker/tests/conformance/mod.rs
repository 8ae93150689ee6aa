//! The queue store's contract, run against every backend: idempotent enqueue, priority
//! order, leases, compare-and-set results, explicit failure with a retry time, dead-letters,
//! release, retryable rejects (the rejecting worker skips the task for a while), worker
//! restarts (they spend attempts, but keep the leases whose results the
//! new process still holds), cancel, retry, lapsed leases, deadlines, listing,
//! counts, events, stage timings, the task types workers said hello with, assignments that
//! fail on the transport, batches of tasks stored together.
//!
//! Each function takes a fresh, empty queue whose default is 2 attempts with no retry
//! backoff. A backend's test file instantiates them all with `conformance_tests!`.

#![allow(clippy::unwrap_used)] // test helpers: a panic is the failure report
#![allow(dead_code, unreachable_pub)]

use kiln_broker::*;
use kiln_protocol::TaskState;
use kiln_protocol::messages::TaskError;
use serde_json::json;

mod outbox;
pub use outbox::*;

/// Instantiates every conformance test. `$make` is an async fn taking the test name and
/// returning a fresh `Arc<dyn Queue>` (or `None`: the backend is not reachable here and the
/// test is skipped with a notice); `$done` an async fn taking the test name, run after the
/// test passed (cleanup).
#[macro_export]
macro_rules! conformance_tests {
    ($make:path, $done:path) => {
        $crate::conformance_tests!(@each $make, $done;
            enqueue_is_idempotent_by_request_id,
            reserve_by_priority_then_age_and_capability,
            results_are_compare_and_set_on_the_lease,
            stale_lease_after_expiry_is_refused,
            lapsed_leases_dead_letter_after_max_attempts,
            retryable_errors_requeue_until_attempts_run_out,
            release_does_not_count_the_attempt,
            cancel_queued_running_and_done,
            retry_queues_a_dead_lettered_task_as_a_new_attempt,
            retry_refuses_queued_running_and_succeeded_tasks,
            retry_of_canceled_and_expired_tasks_and_their_deadlines,
            deadlines_expire_tasks,
            events_resume_after_an_id,
            fail_waits_for_its_retry_time,
            dead_letter_ignores_remaining_attempts,
            renew_extends_only_the_workers_leases,
            release_worker_requeues_everything_it_held,
            release_worker_keeps_the_leases_whose_results_survived,
            a_task_that_keeps_crashing_its_worker_is_dead_lettered,
            list_and_stats,
            concurrent_reserves_never_share_a_task,
            events_of_failed_calls_are_not_published,
            timings_merge_by_key_and_worker_stages_need_the_current_lease,
            detail_agrees_with_get_attempts_and_timings,
            a_model_task_goes_only_to_workers_listing_the_model,
            labels_must_all_be_on_the_worker,
            unfit_tasks_stay_queued_and_are_not_starved,
            priority_then_age_among_the_tasks_a_worker_fits,
            a_rejected_task_skips_its_worker_for_the_back_off,
            a_rejected_routed_task_skips_only_its_worker,
            task_types_seen_are_remembered_by_time,
            failed_assignments_requeue_then_dead_letter_as_assign_failed,
            a_delivered_assignment_resets_the_failure_count,
            cancel_of_an_undelivered_assignment_ends_the_task_at_once,
            a_lease_is_acted_on_only_by_the_worker_holding_it,
            worker_identities_are_set_once_and_can_be_forgotten,
            webhook_messages_are_written_with_their_changes,
            a_webhook_gets_completed_by_default,
            message_leases_are_exclusive,
            failures_retry_on_schedule_then_exhaust_and_rearm,
            gone_disables_the_url_until_a_message_is_rearmed,
            added_messages_are_claimed_like_task_messages,
            enqueue_many_answers_in_order_and_each_item_is_idempotent,
            enqueue_many_stores_nothing_when_an_item_fails
        );
    };
    (@each $make:path, $done:path; $($name:ident),*) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() {
                let Some(q) = $make(stringify!($name)).await else {
                    return;
                };
                conformance::$name(&*q).await;
                drop(q);
                $done(stringify!($name)).await;
            }
        )*
    };
}

mod retry;
pub use retry::*;

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

/// A worker serving `TYPES`, without models or labels.
fn caps() -> Capabilities {
    Capabilities {
        task_types: types(),
        ..Default::default()
    }
}

/// A worker serving `TYPES` with these models and labels.
fn worker(models: &[&str], labels: &[&str]) -> Capabilities {
    Capabilities {
        task_types: types(),
        models: models.iter().map(|s| s.to_string()).collect(),
        labels: labels.iter().map(|s| s.to_string()).collect(),
    }
}

fn routed(model: Option<&str>, labels: &[&str], input: serde_json::Value) -> NewTask {
    NewTask {
        model: model.map(str::to_owned),
        labels: labels.iter().map(|s| s.to_string()).collect(),
        ..task("txt2img", input)
    }
}

fn ids(tasks: &[Task]) -> Vec<String> {
    tasks.iter().map(|t| t.id.clone()).collect()
}

fn oom() -> TaskError {
    TaskError {
        code: "oom".into(),
        message: "out of memory".into(),
        retryable: true,
    }
}

async fn lease_one(q: &dyn Queue, worker: &str, until: u64, now: u64) -> String {
    q.reserve(worker, &caps(), 1, until, now).await.unwrap()[0]
        .lease
        .clone()
        .unwrap()
}

pub async fn enqueue_is_idempotent_by_request_id(q: &dyn Queue) {
    let mut t = task("txt2img", json!({"p": 1}));
    t.request_id = Some("r1".into());
    let (a, created) = q.enqueue(t.clone(), T).await.unwrap();
    assert!(created);
    let (b, created) = q.enqueue(t.clone(), T + 1).await.unwrap();
    assert!(!created);
    assert_eq!(a.id, b.id);
    t.input = json!({"p": 2});
    assert!(matches!(
        q.enqueue(t, T).await.unwrap_err(),
        QueueError::Conflict(_)
    ));
    assert!(matches!(
        q.enqueue(task(" ", json!({})), T).await.unwrap_err(),
        QueueError::Invalid(_)
    ));
}

pub async fn reserve_by_priority_then_age_and_capability(q: &dyn Queue) {
    let (low, _) = q.enqueue(task("txt2img", json!(1)), T).await.unwrap();
    let mut hi = task("txt2img", json!(2));
    hi.priority = 5;
    let (hi, _) = q.enqueue(hi, T).await.unwrap();
    let (other, _) = q.enqueue(task("upscale", json!(3)), T).await.unwrap();
    let got = q.reserve("w", &caps(), 5, T + 90_000, T).await.unwrap();
    assert_eq!(
        got.iter().map(|t| t.id.clone()).collect::<Vec<_>>(),
        [hi.id, low.id]
    );
    assert!(
        got.iter()
            .all(|t| t.state == TaskState::Running && t.attempt == 1 && t.lease.is_some())
    );
    assert_eq!(
        q.get(&other.id).await.unwrap().unwrap().state,
        TaskState::Queued
    );
    assert_eq!(
        q.queue_position(&q.get(&other.id).await.unwrap().unwrap())
            .await
            .unwrap(),
        Some(0)
    );
}

pub async fn results_are_compare_and_set_on_the_lease(q: &dyn Queue) {
    let (t, _) = q.enqueue(task("txt2img", json!({})), T).await.unwrap();
    let lease = q.reserve("w", &caps(), 1, T + 90_000, T).await.unwrap()[0]
        .lease
        .clone()
        .unwrap();
    let first = q
        .complete(&lease, Completion::Ok(json!({"url": "a"})), T + 5)
        .await
        .unwrap();
    assert!(first.accepted);
    let dup = q
        .complete(&lease, Completion::Ok(json!({"url": "b"})), T + 6)
        .await
        .unwrap();
    assert!(!dup.accepted);
    let done = q.get(&t.id).await.unwrap().unwrap();
    assert_eq!(done.state, TaskState::Succeeded);
    assert_eq!(done.output, Some(json!({"url": "a"})));
    assert!(
        !q.complete("lease_nope", Completion::Cancelled, T)
            .await
            .unwrap()
            .accepted
    );
}

pub async fn stale_lease_after_expiry_is_refused(q: &dyn Queue) {
    let (t, _) = q.enqueue(task("txt2img", json!({})), T).await.unwrap();
    let old = q.reserve("w1", &caps(), 1, T + 100, T).await.unwrap()[0]
        .lease
        .clone()
        .unwrap();
    let changed = q.sweep(T + 101).await.unwrap().changed;
    assert_eq!(changed[0].state, TaskState::Queued);
    let new = q
        .reserve("w2", &caps(), 1, T + 90_000, T + 102)
        .await
        .unwrap();
    assert_eq!(new[0].attempt, 2);
    let late = q
        .complete(&old, Completion::Ok(json!("late")), T + 200)
        .await
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
        .await
        .unwrap()
        .accepted
    );
    let attempts = q.attempts(&t.id).await.unwrap();
    assert_eq!(attempts.len(), 2);
    assert_eq!(attempts[0].error.as_deref(), Some("lease expired"));
}

pub async fn lapsed_leases_dead_letter_after_max_attempts(q: &dyn Queue) {
    let (t, _) = q.enqueue(task("txt2img", json!({})), T).await.unwrap();
    for i in 0..2u64 {
        q.reserve("w", &caps(), 1, T + i * 1000 + 10, T + i * 1000)
            .await
            .unwrap();
        q.sweep(T + i * 1000 + 11).await.unwrap();
    }
    let t = q.get(&t.id).await.unwrap().unwrap();
    assert_eq!(t.state, TaskState::Failed);
    assert!(t.dead_lettered);
    assert_eq!(t.error.unwrap().code, "lease_expired");
}

pub async fn retryable_errors_requeue_until_attempts_run_out(q: &dyn Queue) {
    let (t, _) = q.enqueue(task("txt2img", json!({})), T).await.unwrap();
    let err = TaskError {
        code: "oom".into(),
        message: "out of memory".into(),
        retryable: true,
    };
    let l1 = q.reserve("w", &caps(), 1, T + 90_000, T).await.unwrap()[0]
        .lease
        .clone()
        .unwrap();
    let o = q
        .complete(&l1, Completion::Error(err.clone()), T + 1)
        .await
        .unwrap();
    assert_eq!(o.task.unwrap().state, TaskState::Queued);
    let l2 = q.reserve("w", &caps(), 1, T + 90_000, T + 2).await.unwrap()[0]
        .lease
        .clone()
        .unwrap();
    let o = q
        .complete(&l2, Completion::Error(err), T + 3)
        .await
        .unwrap();
    let t2 = o.task.unwrap();
    assert_eq!(t2.state, TaskState::Failed);
    assert!(t2.dead_lettered);
    assert_eq!(q.attempts(&t.id).await.unwrap().len(), 2);
}

pub async fn release_does_not_count_the_attempt(q: &dyn Queue) {
    q.enqueue(task("txt2img", json!({})), T).await.unwrap();
    let l = q.reserve("w", &caps(), 1, T + 90_000, T).await.unwrap()[0]
        .lease
        .clone()
        .unwrap();
    let back = q
        .release(&l, None, "draining", T + 1)
        .await
        .unwrap()
        .unwrap();
    assert_eq!((back.state, back.attempt), (TaskState::Queued, 0));
    let again = q.reserve("w", &caps(), 1, T + 90_000, T + 2).await.unwrap();
    assert_eq!(again[0].attempt, 1);
}

pub async fn cancel_queued_running_and_done(q: &dyn Queue) {
    let (a, _) = q.enqueue(task("txt2img", json!(1)), T).await.unwrap();
    assert!(
        matches!(q.cancel(&a.id, T).await.unwrap(), CancelOutcome::Canceled(t) if t.state == TaskState::Canceled)
    );
    let (b, _) = q.enqueue(task("txt2img", json!(2)), T).await.unwrap();
    let l = q.reserve("w", &caps(), 1, T + 100, T).await.unwrap()[0]
        .lease
        .clone()
        .unwrap();
    match q.cancel(&b.id, T).await.unwrap() {
        CancelOutcome::SignalWorker {
            worker_id, lease, ..
        } => assert_eq!((worker_id.as_str(), lease.as_str()), ("w", l.as_str())),
        other => panic!("{other:?}"),
    }
    // The worker never answers: when the lease lapses the task is canceled, not redelivered.
    q.sweep(T + 101).await.unwrap();
    assert_eq!(
        q.get(&b.id).await.unwrap().unwrap().state,
        TaskState::Canceled
    );
    assert!(matches!(
        q.cancel(&b.id, T).await.unwrap(),
        CancelOutcome::AlreadyTerminal(_)
    ));
    assert!(matches!(
        q.cancel("task_x", T).await.unwrap(),
        CancelOutcome::NotFound
    ));
}

pub async fn deadlines_expire_tasks(q: &dyn Queue) {
    let mut t = task("txt2img", json!({}));
    t.deadline = Some(T + 50);
    let (t, _) = q.enqueue(t, T).await.unwrap();
    q.sweep(T + 51).await.unwrap();
    assert_eq!(
        q.get(&t.id).await.unwrap().unwrap().state,
        TaskState::Expired
    );
}

pub async fn events_resume_after_an_id(q: &dyn Queue) {
    let (t, _) = q.enqueue(task("txt2img", json!({})), T).await.unwrap();
    let l = q.reserve("w", &caps(), 1, T + 90_000, T).await.unwrap()[0]
        .lease
        .clone()
        .unwrap();
    q.progress(&l, None, json!({"step": 1, "total": 2}), T + 1)
        .await
        .unwrap();
    q.complete(&l, Completion::Ok(json!({})), T + 2)
        .await
        .unwrap();
    let all = q.events_after(&t.id, 0).await.unwrap();
    let kinds: Vec<_> = all.iter().map(|e| e.kind.name()).collect();
    assert_eq!(
        kinds,
        ["status", "status", "progress", "status", "completed"]
    );
    let tail = q.events_after(&t.id, all[2].id).await.unwrap();
    assert_eq!(tail.len(), 2);
    assert_eq!(q.take_events().len(), 5);
}

pub async fn fail_waits_for_its_retry_time(q: &dyn Queue) {
    let (t, _) = q.enqueue(task("txt2img", json!({})), T).await.unwrap();
    let l = lease_one(q, "w", T + 90_000, T).await;
    let o = q.fail(&l, oom(), T + 500, T + 1).await.unwrap();
    assert!(o.accepted);
    let back = o.task.unwrap();
    assert_eq!(
        (back.state, back.error.unwrap().code.as_str()),
        (TaskState::Queued, "oom")
    );
    assert!(
        q.reserve("w", &caps(), 1, T + 90_000, T + 499)
            .await
            .unwrap()
            .is_empty()
    );
    let again = q
        .reserve("w", &caps(), 1, T + 90_000, T + 500)
        .await
        .unwrap();
    assert_eq!((again[0].id.as_str(), again[0].attempt), (t.id.as_str(), 2));
    // The fencing holds for failures too: the old lease is stale now.
    assert!(!q.fail(&l, oom(), T + 600, T + 501).await.unwrap().accepted);
    // A non-retryable error ends the task without dead-lettering it.
    let l2 = again[0].lease.clone().unwrap();
    let fatal = TaskError {
        retryable: false,
        ..oom()
    };
    let done = q
        .fail(&l2, fatal, T + 700, T + 502)
        .await
        .unwrap()
        .task
        .unwrap();
    assert_eq!((done.state, done.dead_lettered), (TaskState::Failed, false));
}

pub async fn dead_letter_ignores_remaining_attempts(q: &dyn Queue) {
    let mut nt = task("txt2img", json!({}));
    nt.max_attempts = Some(5);
    let (t, _) = q.enqueue(nt, T).await.unwrap();
    let l = lease_one(q, "w", T + 90_000, T).await;
    let o = q.dead_letter(&l, oom(), T + 1).await.unwrap();
    assert!(o.accepted);
    let t = q.get(&t.id).await.unwrap().unwrap();
    assert_eq!(
        (t.state, t.dead_lettered, t.attempt),
        (TaskState::Failed, true, 1)
    );
    assert!(!q.dead_letter(&l, oom(), T + 2).await.unwrap().accepted);
    let events = q.events_after(&t.id, 0).await.unwrap();
    assert!(events.last().unwrap().kind.is_completed());
}

pub async fn renew_extends_only_the_workers_leases(q: &dyn Queue) {
    q.enqueue(task("txt2img", json!(1)), T).await.unwrap();
    q.enqueue(task("txt2img", json!(2)), T).await.unwrap();
    let mine = lease_one(q, "w1", T + 100, T).await;
    let other = lease_one(q, "w2", T + 100, T).await;
    assert_eq!(q.renew("w1", T + 1000).await.unwrap(), 1);
    // Renewal never shortens a lease.
    q.renew("w1", T + 50).await.unwrap();
    let sweep = q.sweep(T + 101).await.unwrap();
    assert_eq!(sweep.changed.len(), 1);
    assert_eq!(sweep.changed[0].state, TaskState::Queued);
    let held = q.leases_of("w1").await.unwrap();
    assert_eq!(
        held.iter().map(|(l, _)| l.as_str()).collect::<Vec<_>>(),
        [mine.as_str()]
    );
    assert!(q.leases_of("w2").await.unwrap().is_empty());
    assert!(
        !q.complete(&other, Completion::Ok(json!(0)), T + 102)
            .await
            .unwrap()
            .accepted
    );
    assert!(
        q.complete(&mine, Completion::Ok(json!(0)), T + 999)
            .await
            .unwrap()
            .accepted
    );
}

pub async fn release_worker_requeues_everything_it_held(q: &dyn Queue) {
    for i in 0..3 {
        q.enqueue(task("txt2img", json!(i)), T).await.unwrap();
    }
    let got = q.reserve("w", &caps(), 3, T + 90_000, T).await.unwrap();
    assert_eq!(got.len(), 3);
    let back = q.release_worker("w", &[], T + 1).await.unwrap();
    assert_eq!(back.len(), 3);
    // Queued again at once; the lost attempt counts (it stays 1 until the next reserve).
    assert!(
        back.iter()
            .all(|t| t.state == TaskState::Queued && t.attempt == 1)
    );
    assert!(q.leases_of("w").await.unwrap().is_empty());
    let stale = got[0].lease.clone().unwrap();
    assert!(
        q.release(&stale, None, "again", T + 2)
            .await
            .unwrap()
            .is_none()
    );
    assert!(
        q.progress(&stale, None, json!({}), T + 2)
            .await
            .unwrap()
            .is_none()
    );
}

/// A restarted worker whose outbox survived keeps those leases: the named ones stay current
/// and their results are accepted; the others are released with the attempt counted. A
/// lease of another worker, or an unknown one, in `keep` changes nothing.
pub async fn release_worker_keeps_the_leases_whose_results_survived(q: &dyn Queue) {
    for i in 0..3 {
        q.enqueue(task("txt2img", json!(i)), T).await.unwrap();
    }
    let other = q.enqueue(task("txt2img", json!("v")), T).await.unwrap().0;
    let got = q.reserve("w", &caps(), 3, T + 90_000, T).await.unwrap();
    assert_eq!(got.len(), 3);
    let theirs = q.reserve("v", &caps(), 1, T + 90_000, T).await.unwrap();
    assert_eq!(theirs[0].id, other.id);
    let kept = got[1].lease.clone().unwrap();
    let their_lease = theirs[0].lease.clone().unwrap();
    let keep = vec![
        kept.clone(),
        their_lease.clone(),
        "lease_unknown".to_string(),
    ];
    let back = q.release_worker("w", &keep, T + 1).await.unwrap();
    let mut released: Vec<&str> = back.iter().map(|t| t.id.as_str()).collect();
    released.sort_unstable();
    let mut expected = vec![got[0].id.as_str(), got[2].id.as_str()];
    expected.sort_unstable();
    assert_eq!(released, expected);
    assert!(
        back.iter()
            .all(|t| t.state == TaskState::Queued && t.attempt == 1)
    );
    assert_eq!(
        q.leases_of("w").await.unwrap(),
        vec![(kept.clone(), got[1].id.clone())]
    );
    let still = q.get(&got[1].id).await.unwrap().unwrap();
    assert_eq!(still.state, TaskState::Running);
    assert_eq!(still.lease.as_deref(), Some(kept.as_str()));
    assert_eq!(still.worker_id.as_deref(), Some("w"));
    // The other worker's lease is untouched.
    assert_eq!(
        q.leases_of("v").await.unwrap(),
        vec![(their_lease, other.id.clone())]
    );
    // The result the new process resends is accepted: the task ran once.
    assert!(
        q.complete(&kept, Completion::Ok(json!("done")), T + 2)
            .await
            .unwrap()
            .accepted
    );
    let done = q.get(&got[1].id).await.unwrap().unwrap();
    assert_eq!(done.state, TaskState::Succeeded);
    assert_eq!(done.attempt, 1);
    let attempts = q.attempts(&got[1].id).await.unwrap();
    assert_eq!(attempts.len(), 1);
    assert_eq!(attempts[0].error, None);
    // The released ones ended their attempt as a restart.
    let lost = q.attempts(&got[0].id).await.unwrap();
    assert_eq!(lost.len(), 1);
    assert_eq!(lost[0].error.as_deref(), Some("worker restarted"));
    // Their old leases are stale.
    let stale = got[0].lease.clone().unwrap();
    assert!(
        !q.complete(&stale, Completion::Ok(json!(0)), T + 3)
            .await
            .unwrap()
            .accepted
    );
}

/// A task that takes its worker process down every time: each restart spends an attempt,
/// and once they are spent the task is dead-lettered instead of crashing workers forever.
pub async fn a_task_that_keeps_crashing_its_worker_is_dead_lettered(q: &dyn Queue) {
    let (t, _) = q.enqueue(task("txt2img", json!({})), T).await.unwrap();
    let first = q.reserve("w", &caps(), 1, T + 90_000, T).await.unwrap();
    assert_eq!(first[0].attempt, 1);
    let back = q.release_worker("w", &[], T + 1).await.unwrap();
    assert_eq!(back[0].state, TaskState::Queued);
    let second = q.reserve("w", &caps(), 1, T + 90_000, T + 2).await.unwrap();
    assert_eq!(second[0].id, t.id);
    assert_eq!(second[0].attempt, 2, "the crashed attempt counted");
    let back = q.release_worker("w", &[], T + 3).await.unwrap();
    assert_eq!(back.len(), 1);
    let dead = q.get(&t.id).await.unwrap().unwrap();
    assert_eq!(dead.state, TaskState::Failed);
    assert!(dead.dead_lettered);
    assert_eq!(dead.error.unwrap().message, "worker restarted");
    assert!(
        q.reserve("w", &caps(), 1, T + 90_000, T + 4)
            .await
            .unwrap()
            .is_empty(),
        "not run a third time"
    );
    let attempts = q.attempts(&t.id).await.unwrap();
    assert_eq!(attempts.len(), 2);
    for a in &attempts {
        assert_eq!(a.error.as_deref(), Some("worker restarted"));
        assert!(a.ended_at.is_some());
    }
    let completed: Vec<_> = q
        .events_after(&t.id, 0)
        .await
        .unwrap()
        .into_iter()
        .filter(|e| e.kind.is_completed())
        .collect();
    assert_eq!(completed.len(), 1);
    assert_eq!(completed[0].kind.data()["status"], "failed");
}

pub async fn list_and_stats(q: &dyn Queue) {
    let mut ids = Vec::new();
    for i in 0..5 {
        let tt = if i % 2 == 0 { "txt2img" } else { "upscale" };
        ids.push(q.enqueue(task(tt, json!(i)), T + i).await.unwrap().0.id);
    }
    q.reserve("w", &caps(), 1, T + 90_000, T + 10)
        .await
        .unwrap();
    let all = q
        .list(&ListFilter {
            limit: 10,
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(
        all.iter().map(|t| t.id.clone()).rev().collect::<Vec<_>>(),
        ids
    );
    let page = q
        .list(&ListFilter {
            limit: 2,
            before_seq: Some(all[1].seq),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(
        page.iter().map(|t| t.id.as_str()).collect::<Vec<_>>(),
        [ids[2].as_str(), ids[1].as_str()]
    );
    let queued_upscale = q
        .list(&ListFilter {
            state: Some(TaskState::Queued),
            task_type: Some("upscale".into()),
            limit: 10,
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(queued_upscale.len(), 2);
    let stats = q.stats().await.unwrap();
    assert_eq!(
        (
            stats.count(TaskState::Queued),
            stats.count(TaskState::Running)
        ),
        (4, 1)
    );
    q.ping().await.unwrap();
    assert!(q.get("task_missing").await.unwrap().is_none());
}

pub async fn concurrent_reserves_never_share_a_task(q: &dyn Queue) {
    for i in 0..40 {
        q.enqueue(task("txt2img", json!(i)), T).await.unwrap();
    }
    let mut seen = std::collections::HashSet::new();
    let calls = (0..8).map(|w| async move {
        let worker = format!("w{w}");
        let mut mine = Vec::new();
        loop {
            let got = q.reserve(&worker, &caps(), 3, T + 90_000, T).await.unwrap();
            if got.is_empty() {
                break mine;
            }
            mine.extend(got.into_iter().map(|t| t.id));
        }
    });
    for ids in futures_util::future::join_all(calls).await {
        for id in ids {
            assert!(seen.insert(id), "a task was reserved twice");
        }
    }
    assert_eq!(seen.len(), 40);
}

pub async fn events_of_failed_calls_are_not_published(q: &dyn Queue) {
    let mut t = task("txt2img", json!({"a": 1}));
    t.request_id = Some("r".into());
    q.enqueue(t.clone(), T).await.unwrap();
    assert_eq!(q.take_events().len(), 1);
    t.input = json!({"a": 2});
    q.enqueue(t, T).await.unwrap_err();
    assert!(q.take_events().is_empty());
}

pub async fn timings_merge_by_key_and_worker_stages_need_the_current_lease(q: &dyn Queue) {
    let (t, _) = q.enqueue(task("txt2img", json!({})), T).await.unwrap();
    assert_eq!(q.timings(&t.id).await.unwrap(), None);
    let m = |v: serde_json::Value| v.as_object().unwrap().clone();
    q.merge_timings(&t.id, &m(json!({"compress_ms": 7})))
        .await
        .unwrap();
    let lease = lease_one(q, "w", T + 90_000, T + 10).await;
    let stages: std::collections::BTreeMap<String, u64> =
        [("render_ms".to_owned(), 40), ("upload_ms".to_owned(), 3)].into();
    assert!(
        q.record_worker_timings(&lease, None, &stages)
            .await
            .unwrap()
    );
    assert!(
        !q.record_worker_timings("lease_nope", None, &stages)
            .await
            .unwrap(),
        "an unknown lease records nothing"
    );
    q.complete(&lease, Completion::Ok(json!({})), T + 60)
        .await
        .unwrap();
    // The attempt is over: a late duplicate result cannot overwrite the stages.
    let late: std::collections::BTreeMap<String, u64> = [("render_ms".to_owned(), 1)].into();
    assert!(!q.record_worker_timings(&lease, None, &late).await.unwrap());
    q.merge_timings(&t.id, &m(json!({"upload_ms": 2})))
        .await
        .unwrap();
    assert_eq!(
        q.timings(&t.id).await.unwrap(),
        Some(
            json!({"compress_ms": 7, "upload_ms": 2, "worker": {"render_ms": 40, "upload_ms": 3}})
        )
    );
}

/// `detail` reads the same task, attempts and timings as the three separate calls.
pub async fn detail_agrees_with_get_attempts_and_timings(q: &dyn Queue) {
    assert_eq!(q.detail("task_nope").await.unwrap(), None);
    let (t, _) = q
        .enqueue(task("txt2img", json!({"d": 1})), T)
        .await
        .unwrap();
    let queued = q.detail(&t.id).await.unwrap().unwrap();
    assert_eq!(queued.task, q.get(&t.id).await.unwrap().unwrap());
    assert!(queued.attempts.is_empty());
    assert_eq!(queued.timings, None);
    let lease = lease_one(q, "w", T + 90_000, T + 10).await;
    let m = json!({"compress_ms": 4}).as_object().unwrap().clone();
    q.merge_timings(&t.id, &m).await.unwrap();
    q.complete(&lease, Completion::Ok(json!({"ok": true})), T + 20)
        .await
        .unwrap();
    let done = q.detail(&t.id).await.unwrap().unwrap();
    assert_eq!(done.task, q.get(&t.id).await.unwrap().unwrap());
    assert_eq!(done.task.state, TaskState::Succeeded);
    assert_eq!(done.attempts, q.attempts(&t.id).await.unwrap());
    assert_eq!(done.attempts.len(), 1);
    assert_eq!(done.timings, Some(json!({"compress_ms": 4})));
}

pub async fn a_model_task_goes_only_to_workers_listing_the_model(q: &dyn Queue) {
    let mut nt = routed(Some("sdxl"), &[], json!({"p": 1}));
    nt.request_id = Some("r-model".into());
    let (t, _) = q.enqueue(nt.clone(), T).await.unwrap();
    assert_eq!(t.model.as_deref(), Some("sdxl"));
    // The same request with another model is another task.
    let mut other = nt.clone();
    other.model = Some("flux".into());
    assert!(matches!(
        q.enqueue(other, T).await.unwrap_err(),
        QueueError::Conflict(_)
    ));
    let mut empty = nt.clone();
    empty.model = Some(" ".into());
    empty.request_id = None;
    assert!(matches!(
        q.enqueue(empty, T).await.unwrap_err(),
        QueueError::Invalid(_)
    ));
    // No models listed, or other models: nothing to run.
    for w in [caps(), worker(&["flux"], &[])] {
        assert!(
            q.reserve("w0", &w, 5, T + 90_000, T)
                .await
                .unwrap()
                .is_empty()
        );
    }
    // A model alone is not enough: the worker must serve the type too.
    let wrong_type = Capabilities {
        task_types: vec!["upscale".into()],
        models: vec!["sdxl".into()],
        ..Default::default()
    };
    assert!(
        q.reserve("w0", &wrong_type, 5, T + 90_000, T)
            .await
            .unwrap()
            .is_empty()
    );
    let got = q
        .reserve("w1", &worker(&["flux", "sdxl"], &[]), 5, T + 90_000, T + 1)
        .await
        .unwrap();
    assert_eq!(ids(&got), vec![t.id.clone()]);
    assert_eq!(got[0].model.as_deref(), Some("sdxl"));
    assert!(got[0].fits(&worker(&["sdxl"], &[])));
    assert!(!got[0].fits(&caps()));
    // A task that names no model runs on a worker that lists models.
    let (plain, _) = q.enqueue(task("txt2img", json!(2)), T + 2).await.unwrap();
    assert_eq!(plain.model, None);
    let got = q
        .reserve("w1", &worker(&["sdxl"], &[]), 5, T + 90_000, T + 3)
        .await
        .unwrap();
    assert_eq!(ids(&got), [plain.id]);
    // Stored and read back.
    assert_eq!(
        q.get(&t.id).await.unwrap().unwrap().model.as_deref(),
        Some("sdxl")
    );
}

pub async fn labels_must_all_be_on_the_worker(q: &dyn Queue) {
    let (t, _) = q
        .enqueue(
            routed(None, &["region=eu", "gpu=a100", "region=eu"], json!(1)),
            T,
        )
        .await
        .unwrap();
    // Stored sorted, without duplicates.
    assert_eq!(t.labels, ["gpu=a100", "region=eu"]);
    for w in [
        caps(),
        worker(&[], &["gpu=a100"]),
        worker(&[], &["region=eu", "gpu=h100"]),
    ] {
        assert!(
            q.reserve("w0", &w, 5, T + 90_000, T)
                .await
                .unwrap()
                .is_empty()
        );
    }
    let superset = worker(&[], &["spot", "region=eu", "gpu=a100"]);
    let got = q
        .reserve("w1", &superset, 5, T + 90_000, T + 1)
        .await
        .unwrap();
    assert_eq!(ids(&got), vec![t.id.clone()]);
    assert_eq!(got[0].labels, ["gpu=a100", "region=eu"]);
    // Model and labels together: both must hold.
    let (both, _) = q
        .enqueue(routed(Some("sdxl"), &["gpu=a100"], json!(2)), T + 2)
        .await
        .unwrap();
    for w in [worker(&["sdxl"], &[]), worker(&["flux"], &["gpu=a100"])] {
        assert!(
            q.reserve("w0", &w, 5, T + 90_000, T + 3)
                .await
                .unwrap()
                .is_empty()
        );
    }
    let got = q
        .reserve(
            "w2",
            &worker(&["sdxl"], &["gpu=a100"]),
            5,
            T + 90_000,
            T + 3,
        )
        .await
        .unwrap();
    assert_eq!(ids(&got), [both.id]);
    let mut empty = routed(None, &["gpu=a100", ""], json!(3));
    empty.request_id = None;
    assert!(matches!(
        q.enqueue(empty, T).await.unwrap_err(),
        QueueError::Invalid(_)
    ));
}

pub async fn unfit_tasks_stay_queued_and_are_not_starved(q: &dyn Queue) {
    // The oldest, most urgent task needs a model the first worker lacks.
    let mut first = routed(Some("sdxl"), &["gpu=a100"], json!("a"));
    first.priority = 9;
    let (a, _) = q.enqueue(first, T).await.unwrap();
    let mut plain = Vec::new();
    for i in 0..4 {
        plain.push(
            q.enqueue(task("txt2img", json!(i)), T + 1 + i)
                .await
                .unwrap()
                .0
                .id,
        );
    }
    // The worker that does not fit takes every other task, one reserve after another, and
    // never the unfit one, which keeps its place at the head of its queue.
    let other = worker(&["flux"], &["gpu=a100"]);
    let mut got = Vec::new();
    for i in 0..3 {
        got.extend(ids(&q
            .reserve("w0", &other, 2, T + 90_000, T + 10 + i)
            .await
            .unwrap()));
    }
    assert_eq!(got, plain);
    let waiting = q.get(&a.id).await.unwrap().unwrap();
    assert_eq!((waiting.state, waiting.attempt), (TaskState::Queued, 0));
    assert_eq!(q.queue_position(&waiting).await.unwrap(), Some(0));
    // A worker that fits comes: it gets the task at once.
    let fit = worker(&["sdxl"], &["gpu=a100", "zone=b"]);
    let got = q.reserve("w1", &fit, 5, T + 90_000, T + 20).await.unwrap();
    assert_eq!(ids(&got), vec![a.id.clone()]);
    // Given back (and after a lapsed lease), it is again only for workers that fit.
    let lease = got[0].lease.clone().unwrap();
    q.release(&lease, None, "restart", T + 21)
        .await
        .unwrap()
        .unwrap();
    assert!(
        q.reserve("w0", &other, 5, T + 90_000, T + 22)
            .await
            .unwrap()
            .is_empty()
    );
    let again = q.reserve("w1", &fit, 5, T + 100, T + 23).await.unwrap();
    assert_eq!(ids(&again), vec![a.id.clone()]);
    q.sweep(T + 101).await.unwrap();
    assert!(
        q.reserve("w0", &other, 5, T + 90_000, T + 102)
            .await
            .unwrap()
            .is_empty()
    );
    let last = q.reserve("w2", &fit, 5, T + 90_000, T + 103).await.unwrap();
    assert_eq!((ids(&last), last[0].attempt), (vec![a.id.clone()], 2));
    assert!(
        q.complete(
            last[0].lease.as_ref().unwrap(),
            Completion::Ok(json!({})),
            T + 104
        )
        .await
        .unwrap()
        .accepted
    );
}

pub async fn priority_then_age_among_the_tasks_a_worker_fits(q: &dyn Queue) {
    let mut at = T;
    let mut add = |model: Option<&str>, labels: &[&str], priority: i32| {
        let mut nt = routed(model, labels, json!(at));
        nt.priority = priority;
        at += 1;
        (nt, at)
    };
    let mut id = Vec::new();
    for (model, labels, prio) in [
        (Some("sdxl"), &[][..], 0),
        (None, &[][..], 0),
        (Some("sdxl"), &["gpu=a100"][..], 5),
        (Some("flux"), &[][..], 9),
        (None, &[][..], 5),
        (None, &["gpu=h100"][..], 7),
        (Some("sdxl"), &[][..], 5),
    ] {
        let (nt, now) = add(model, labels, prio);
        id.push(q.enqueue(nt, now).await.unwrap().0.id);
    }
    let w = worker(&["sdxl"], &["gpu=a100"]);
    let got = q.reserve("w", &w, 3, T + 90_000, T + 100).await.unwrap();
    assert_eq!(ids(&got), [id[2].clone(), id[4].clone(), id[6].clone()]);
    let got = q.reserve("w", &w, 10, T + 90_000, T + 101).await.unwrap();
    assert_eq!(ids(&got), [id[0].clone(), id[1].clone()]);
    // Never the flux task nor the h100 one.
    for i in [3, 5] {
        assert_eq!(
            q.get(&id[i]).await.unwrap().unwrap().state,
            TaskState::Queued
        );
    }
}

pub async fn a_rejected_task_skips_its_worker_for_the_back_off(q: &dyn Queue) {
    let (t, _) = q
        .enqueue(task("txt2img", json!({"n": 1})), T)
        .await
        .unwrap();
    let (later, _) = q
        .enqueue(task("txt2img", json!({"n": 2})), T + 1)
        .await
        .unwrap();
    let l = lease_one(q, "busy", T + 90_000, T + 2).await;
    // Rejected retryably: queued again, the attempt not counted, `busy` skips it until
    // T + 30_000.
    let back = q
        .reject(&l, None, "rejected: out of memory", T + 30_000, T + 3)
        .await
        .unwrap()
        .unwrap();
    assert_eq!((back.state, back.attempt), (TaskState::Queued, 0));
    let a = q.attempts(&t.id).await.unwrap();
    assert_eq!(a[0].error.as_deref(), Some("rejected: out of memory"));
    // A stale lease changes nothing.
    assert!(
        q.reject(&l, None, "again", T + 30_000, T + 4)
            .await
            .unwrap()
            .is_none()
    );
    // The rejecting worker gets the next task instead, then nothing while it waits.
    let got = q
        .reserve("busy", &caps(), 5, T + 90_000, T + 5)
        .await
        .unwrap();
    assert_eq!(ids(&got), [later.id.as_str()]);
    assert!(
        q.reserve("busy", &caps(), 5, T + 90_000, T + 6)
            .await
            .unwrap()
            .is_empty()
    );
    // Another worker takes it at once, ahead of newer tasks.
    let (newest, _) = q
        .enqueue(task("txt2img", json!({"n": 3})), T + 7)
        .await
        .unwrap();
    let got = q
        .reserve("idle", &caps(), 1, T + 90_000, T + 8)
        .await
        .unwrap();
    assert_eq!(ids(&got), [t.id.as_str()]);
    assert_eq!(got[0].attempt, 1);
    // Given back by that worker too, it goes back to `busy` once the back-off is over.
    let l2 = got[0].lease.clone().unwrap();
    q.release(&l2, None, "draining", T + 9)
        .await
        .unwrap()
        .unwrap();
    let got = q
        .reserve("busy", &caps(), 5, T + 90_000, T + 10)
        .await
        .unwrap();
    assert_eq!(
        ids(&got),
        [newest.id.as_str()],
        "still skipped within the back-off"
    );
    let got = q
        .reserve("busy", &caps(), 5, T + 90_000, T + 30_001)
        .await
        .unwrap();
    assert_eq!(ids(&got), [t.id.as_str()]);
    // A rejected task that is canceled while skipped ends at once.
    let (c, _) = q
        .enqueue(task("img2img", json!({})), T + 40_000)
        .await
        .unwrap();
    let l3 = lease_one(q, "busy", T + 130_000, T + 40_001).await;
    q.reject(&l3, None, "busy", T + 70_000, T + 40_002)
        .await
        .unwrap()
        .unwrap();
    assert!(matches!(
        q.cancel(&c.id, T + 40_003).await.unwrap(),
        CancelOutcome::Canceled(_)
    ));
    assert!(
        q.reserve("idle", &caps(), 5, T + 130_000, T + 40_004)
            .await
            .unwrap()
            .is_empty()
    );
    assert!(
        q.reserve("busy", &caps(), 5, T + 130_000, T + 70_001)
            .await
            .unwrap()
            .is_empty()
    );
}

pub async fn a_rejected_routed_task_skips_only_its_worker(q: &dyn Queue) {
    let (t, _) = q
        .enqueue(routed(Some("sdxl"), &["gpu=a100"], json!({})), T)
        .await
        .unwrap();
    let fits = worker(&["sdxl"], &["gpu=a100"]);
    let got = q.reserve("a", &fits, 1, T + 90_000, T + 1).await.unwrap();
    let l = got[0].lease.clone().unwrap();
    q.reject(&l, None, "busy", T + 30_000, T + 2)
        .await
        .unwrap()
        .unwrap();
    // A worker that does not fit never gets it; the rejecting one not before the back-off.
    assert!(
        q.reserve("b", &caps(), 5, T + 90_000, T + 3)
            .await
            .unwrap()
            .is_empty()
    );
    assert!(
        q.reserve("a", &fits, 5, T + 90_000, T + 4)
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(
        q.get(&t.id).await.unwrap().unwrap().state,
        TaskState::Queued
    );
    // Rejected by a second worker too: both skip it until their own times.
    let got = q.reserve("c", &fits, 1, T + 90_000, T + 5).await.unwrap();
    q.reject(
        got[0].lease.as_ref().unwrap(),
        None,
        "busy",
        T + 50_000,
        T + 6,
    )
    .await
    .unwrap()
    .unwrap();
    assert!(
        q.reserve("c", &fits, 5, T + 90_000, T + 30_001)
            .await
            .unwrap()
            .is_empty()
    );
    let got = q
        .reserve("a", &fits, 5, T + 90_000, T + 30_002)
        .await
        .unwrap();
    assert_eq!(ids(&got), [t.id.as_str()]);
    assert_eq!(got[0].attempt, 1);
}

pub async fn task_types_seen_are_remembered_by_time(q: &dyn Queue) {
    assert!(q.task_types_seen(0).await.unwrap().is_empty());
    q.note_task_types(&["txt2img".into(), "upscale".into()], T)
        .await
        .unwrap();
    q.note_task_types(&["upscale".into(), "lip_sync".into()], T + 10)
        .await
        .unwrap();
    // An older hello never moves a type's time back.
    q.note_task_types(&["upscale".into()], T + 5).await.unwrap();
    assert_eq!(
        q.task_types_seen(T).await.unwrap(),
        ["lip_sync", "txt2img", "upscale"]
    );
    assert_eq!(
        q.task_types_seen(T + 1).await.unwrap(),
        ["lip_sync", "upscale"]
    );
    assert!(q.task_types_seen(T + 11).await.unwrap().is_empty());
}

/// Leases the one queued `txt2img` task (the other type waits).
async fn lease_txt2img(q: &dyn Queue, now: u64) -> String {
    let only = Capabilities {
        task_types: vec!["txt2img".into()],
        ..Default::default()
    };
    let got = q.reserve("w", &only, 2, now + 90_000, now).await.unwrap();
    assert_eq!(got.len(), 1);
    got[0].lease.clone().unwrap()
}

pub async fn failed_assignments_requeue_then_dead_letter_as_assign_failed(q: &dyn Queue) {
    let (poison, _) = q
        .enqueue(task("txt2img", json!({"p": 1})), T)
        .await
        .unwrap();
    let (other, _) = q
        .enqueue(task("img2img", json!({"p": 2})), T + 1)
        .await
        .unwrap();
    for n in 1..=2u64 {
        let l = lease_txt2img(q, T + 10 * n).await;
        let back = q
            .assign_failed(&l, 3, T + 10 * n + 1)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(back.id, poison.id);
        assert_eq!(
            (back.state, back.attempt, back.dead_lettered),
            (TaskState::Queued, 0, false),
            "a failed assignment is not an attempt"
        );
        assert!(
            q.assign_failed(&l, 3, T + 10 * n + 2)
                .await
                .unwrap()
                .is_none(),
            "an old lease counts nothing"
        );
    }
    let l = lease_txt2img(q, T + 40).await;
    let dead = q.assign_failed(&l, 3, T + 41).await.unwrap().unwrap();
    assert_eq!(dead.id, poison.id);
    assert_eq!((dead.state, dead.dead_lettered), (TaskState::Failed, true));
    let err = dead.error.unwrap();
    assert_eq!(err.code, ASSIGN_FAILED);
    assert!(!err.retryable);
    // The other task was never blamed: it is all that is left, on its first attempt.
    let next = q
        .reserve("w", &caps(), 2, T + 90_000, T + 50)
        .await
        .unwrap();
    assert_eq!(ids(&next), vec![other.id.clone()]);
    assert_eq!(next[0].attempt, 1);
    let events = q.events_after(&poison.id, 0).await.unwrap();
    assert!(events.last().unwrap().kind.is_completed());
}

pub async fn a_delivered_assignment_resets_the_failure_count(q: &dyn Queue) {
    let (t, _) = q.enqueue(task("txt2img", json!({})), T).await.unwrap();
    for n in 1..=2u64 {
        let l = lease_one(q, "w", T + 90_000, T + 10 * n).await;
        q.assign_failed(&l, 3, T + 10 * n + 1)
            .await
            .unwrap()
            .unwrap();
    }
    let l = lease_one(q, "w", T + 90_000, T + 30).await;
    assert_eq!(q.record_assignment(&l, true).await.unwrap(), Some(0));
    // The worker got it, then gave it back: the count starts again.
    q.release(&l, None, "draining", T + 31)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(q.record_assignment(&l, true).await.unwrap(), None);
    for n in 4..=5u64 {
        let l = lease_one(q, "w", T + 90_000, T + 10 * n).await;
        let back = q
            .assign_failed(&l, 3, T + 10 * n + 1)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            back.state,
            TaskState::Queued,
            "two failures in a row are not three"
        );
    }
    let l = lease_one(q, "w", T + 90_000, T + 60).await;
    let dead = q.assign_failed(&l, 3, T + 61).await.unwrap().unwrap();
    assert_eq!((dead.id, dead.state), (t.id, TaskState::Failed));
}

pub async fn cancel_of_an_undelivered_assignment_ends_the_task_at_once(q: &dyn Queue) {
    let (t, _) = q.enqueue(task("txt2img", json!({})), T).await.unwrap();
    let l = lease_one(q, "w", T + 90_000, T).await;
    assert!(matches!(
        q.cancel(&t.id, T + 1).await.unwrap(),
        CancelOutcome::SignalWorker { .. }
    ));
    // The broker knows the worker never acknowledged the assignment: it gives the lease
    // back, and a task whose cancel was requested ends canceled instead of queued.
    let after = q
        .release(
            &l,
            None,
            "canceled before the worker acknowledged it",
            T + 2,
        )
        .await
        .unwrap()
        .unwrap();
    assert_eq!(after.state, TaskState::Canceled);
    assert!(
        q.reserve("w", &caps(), 1, T + 90_000, T + 3)
            .await
            .unwrap()
            .is_empty()
    );
    let done = q.complete(&l, Completion::Cancelled, T + 4).await.unwrap();
    assert!(
        !done.accepted,
        "a late result of the withdrawn lease is refused"
    );
}

pub async fn a_lease_is_acted_on_only_by_the_worker_holding_it(q: &dyn Queue) {
    let (t, _) = q.enqueue(task("txt2img", json!({})), T).await.unwrap();
    let lease = lease_one(q, "wa", T + 90_000, T).await;
    // Worker B names A's lease: nothing it sends about it counts.
    let stolen = q
        .complete_as("wb", &lease, Completion::Ok(json!({"from": "b"})), T + 1)
        .await
        .unwrap();
    assert!(!stolen.accepted);
    assert_eq!(stolen.reason.as_deref(), Some(NOT_HOLDER));
    let failed = q
        .finish(&lease, Some("wb"), Ending::Dead(oom()), T + 1)
        .await
        .unwrap();
    assert!(!failed.accepted);
    assert_eq!(
        q.progress(&lease, Some("wb"), json!({}), T + 1)
            .await
            .unwrap(),
        None
    );
    let stages = std::collections::BTreeMap::from([("render_ms".to_owned(), 5u64)]);
    assert!(
        !q.record_worker_timings(&lease, Some("wb"), &stages)
            .await
            .unwrap()
    );
    assert!(
        q.release(&lease, Some("wb"), "mine now", T + 1)
            .await
            .unwrap()
            .is_none()
    );
    let still = q.get(&t.id).await.unwrap().unwrap();
    assert_eq!(still.state, TaskState::Running);
    assert_eq!(still.lease.as_deref(), Some(lease.as_str()));
    assert_eq!(still.attempt, 1);
    assert_eq!(still.progress, None);
    // A's own frames still count, and A's result becomes the output.
    assert!(
        q.progress(&lease, Some("wa"), json!({"step": 1}), T + 2)
            .await
            .unwrap()
            .is_some()
    );
    assert!(
        q.record_worker_timings(&lease, Some("wa"), &stages)
            .await
            .unwrap()
    );
    let mine = q
        .complete_as("wa", &lease, Completion::Ok(json!({"from": "a"})), T + 3)
        .await
        .unwrap();
    assert!(mine.accepted, "{:?}", mine.reason);
    let done = q.get(&t.id).await.unwrap().unwrap();
    assert_eq!(done.state, TaskState::Succeeded);
    assert_eq!(done.output, Some(json!({"from": "a"})));
}

pub async fn worker_identities_are_set_once_and_can_be_forgotten(q: &dyn Queue) {
    assert_eq!(q.identity("wid").await.unwrap(), None);
    assert!(q.set_identity("wid", "h1", T).await.unwrap());
    assert!(!q.set_identity("wid", "h2", T + 1).await.unwrap());
    assert_eq!(q.identity("wid").await.unwrap().as_deref(), Some("h1"));
    assert_eq!(q.identity("other").await.unwrap(), None);
    assert!(q.forget_identity("wid").await.unwrap());
    assert!(!q.forget_identity("wid").await.unwrap());
    assert_eq!(q.identity("wid").await.unwrap(), None);
    assert!(q.set_identity("wid", "h3", T + 2).await.unwrap());
    assert_eq!(q.identity("wid").await.unwrap().as_deref(), Some("h3"));
}

fn keyed(rid: Option<&str>, input: serde_json::Value) -> NewTask {
    NewTask {
        request_id: rid.map(str::to_owned),
        ..task("txt2img", input)
    }
}

pub async fn enqueue_many_answers_in_order_and_each_item_is_idempotent(q: &dyn Queue) {
    assert!(q.enqueue_many(Vec::new(), T).await.unwrap().is_empty());
    let (old, _) = q
        .enqueue(keyed(Some("old"), json!("old")), T)
        .await
        .unwrap();
    let batch = vec![
        keyed(Some("a"), json!("a")),
        keyed(None, json!("b")),
        // Stored before: answered with that task.
        keyed(Some("old"), json!("old")),
        // Repeated inside the batch: the task the first item created.
        keyed(Some("a"), json!("a")),
        keyed(Some("e"), json!("e")),
    ];
    let got = q.enqueue_many(batch.clone(), T + 1).await.unwrap();
    let created: Vec<bool> = got.iter().map(|(_, c)| *c).collect();
    assert_eq!(created, [true, true, false, false, true]);
    let inputs: Vec<&serde_json::Value> = got.iter().map(|(t, _)| &t.input).collect();
    assert_eq!(
        inputs,
        [
            &json!("a"),
            &json!("b"),
            &json!("old"),
            &json!("a"),
            &json!("e")
        ]
    );
    assert_eq!(got[2].0.id, old.id);
    assert_eq!(got[3].0.id, got[0].0.id);
    for (t, _) in &got {
        assert_eq!(t.state, TaskState::Queued);
        assert_eq!(q.get(&t.id).await.unwrap().unwrap().input, t.input);
    }
    let e = &got[4].0;
    assert_eq!(q.get(&e.id).await.unwrap().unwrap().created_at, T + 1);
    assert!(
        !q.events_after(&e.id, 0).await.unwrap().is_empty(),
        "queued event"
    );
    // The keyed items again create nothing and name the same tasks.
    let keyed_only: Vec<NewTask> = batch
        .into_iter()
        .filter(|t| t.request_id.is_some())
        .collect();
    let again = q.enqueue_many(keyed_only, T + 2).await.unwrap();
    assert!(again.iter().all(|(_, c)| !c));
    assert_eq!(
        again.iter().map(|(t, _)| t.id.clone()).collect::<Vec<_>>(),
        [0, 2, 3, 4].map(|i| got[i].0.id.clone())
    );
    assert_eq!(q.stats().await.unwrap().count(TaskState::Queued), 4);
    // Stored in the order given: equal priority runs oldest first.
    let order = q
        .reserve("w", &caps(), 10, T + 60_000, T + 3)
        .await
        .unwrap();
    let want = [&old.id, &got[0].0.id, &got[1].0.id, &got[4].0.id];
    assert_eq!(order.iter().map(|t| &t.id).collect::<Vec<_>>(), want);
}

pub async fn enqueue_many_stores_nothing_when_an_item_fails(q: &dyn Queue) {
    q.enqueue(keyed(Some("k"), json!(1)), T).await.unwrap();
    let conflict = vec![keyed(Some("x"), json!("x")), keyed(Some("k"), json!(2))];
    assert!(matches!(
        q.enqueue_many(conflict, T).await.unwrap_err(),
        QueueError::Conflict(rid) if rid == "k"
    ));
    let inside = vec![keyed(Some("y"), json!(1)), keyed(Some("y"), json!(2))];
    assert!(matches!(
        q.enqueue_many(inside, T).await.unwrap_err(),
        QueueError::Conflict(rid) if rid == "y"
    ));
    let invalid = vec![keyed(Some("z"), json!("z")), task(" ", json!({}))];
    assert!(matches!(
        q.enqueue_many(invalid, T).await.unwrap_err(),
        QueueError::Invalid(_)
    ));
    assert_eq!(
        q.stats().await.unwrap().count(TaskState::Queued),
        1,
        "only k"
    );
    // The keys of the failed batches are free: nothing was stored under them.
    let (x, created) = q
        .enqueue(keyed(Some("x"), json!("other")), T)
        .await
        .unwrap();
    assert!(created);
    assert_eq!(x.input, json!("other"));
    assert!(q.enqueue(keyed(Some("y"), json!(3)), T).await.unwrap().1);
    assert!(q.enqueue(keyed(Some("z"), json!(3)), T).await.unwrap().1);
}
