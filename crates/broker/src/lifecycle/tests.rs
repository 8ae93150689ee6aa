use super::*;

fn running(max_attempts: u32) -> Task {
    let a = admit(
        NewTask {
            task_type: "t".into(),
            max_attempts: Some(max_attempts),
            ..Default::default()
        },
        &QueueOptions::default(),
    )
    .unwrap();
    let t = new_task(&a, "task_1".into(), 1, 1);
    claim(&t, "w", "l1", 100, 2).apply(&t)
}

/// The wire form of every event is what clients have always read.
#[test]
fn events_keep_their_wire_form() {
    let cases = [
        (
            TaskEventKind::Status {
                status: TaskState::Running,
                attempt: 2,
                worker_id: Some("w".into()),
            },
            r#"{"id":7,"task_id":"task_1","kind":"status","data":{"attempt":2,"status":"running","worker_id":"w"},"ts":9}"#,
        ),
        (
            TaskEventKind::CancelRequested,
            r#"{"id":7,"task_id":"task_1","kind":"status","data":{"cancel_requested":true,"status":"running"},"ts":9}"#,
        ),
        (
            TaskEventKind::Progress(json!({"step": 1})),
            r#"{"id":7,"task_id":"task_1","kind":"progress","data":{"step":1},"ts":9}"#,
        ),
        (
            TaskEventKind::Completed {
                status: TaskState::Failed,
                output: None,
                error: Some(TaskError {
                    code: "x".into(),
                    message: "y".into(),
                    retryable: false,
                }),
            },
            r#"{"id":7,"task_id":"task_1","kind":"completed","data":{"error":{"code":"x","message":"y","retryable":false},"output":null,"status":"failed"},"ts":9}"#,
        ),
    ];
    for (kind, wire) in cases {
        let e = TaskEvent {
            id: 7,
            task_id: "task_1".into(),
            kind,
            ts: 9,
        };
        assert_eq!(serde_json::to_string(&e).unwrap(), wire);
        assert_eq!(serde_json::from_str::<TaskEvent>(wire).unwrap(), e);
    }
    assert!(
        serde_json::from_str::<TaskEvent>(
            r#"{"id":1,"task_id":"t","kind":"nope","data":{},"ts":1}"#
        )
        .is_err()
    );
}

#[test]
fn a_retryable_failure_requeues_until_attempts_are_spent() {
    let opts = QueueOptions::default();
    let err = TaskError {
        code: "oom".into(),
        message: "m".into(),
        retryable: true,
    };
    let t = running(2);
    let tr = finish(&t, Ending::Done(Completion::Error(err.clone())), &opts, 10);
    assert_eq!(tr.state, TaskState::Queued);
    assert_eq!(tr.fields.not_before, opts.retry_at(1, 10));
    assert_eq!(tr.fields.worker_id, None);
    let t = claim(&tr.apply(&t), "w", "l2", 100, 20).apply(&tr.apply(&t));
    let tr = finish(&t, Ending::Done(Completion::Error(err)), &opts, 30);
    assert_eq!(tr.state, TaskState::Failed);
    assert!(tr.fields.dead_lettered);
    assert_eq!(tr.events.len(), 2);
}

#[test]
fn requeue_counts_only_counted_attempts_and_honours_cancels() {
    let t = running(1);
    let given_back = release(&t, "why", 5);
    assert_eq!(
        (given_back.state, given_back.fields.attempt),
        (TaskState::Queued, 0)
    );
    let lapsed = lapse(&t, 5);
    assert_eq!(lapsed.state, TaskState::Failed);
    assert_eq!(lapsed.fields.error.as_ref().unwrap().code, LEASE_EXPIRED);
    let marked = cancel(&t, 5).unwrap().apply(&t);
    assert!(marked.cancel_requested);
    assert_eq!(release(&marked, "why", 6).state, TaskState::Canceled);
    assert!(cancel(&lapsed.apply(&t), 7).is_none());
}

#[test]
fn a_retry_requeues_only_tasks_that_ended_without_success() {
    let opts = QueueOptions::default();
    let t = running(1);
    assert!(retry(&t, None, &opts, 5).is_none(), "running");
    let err = TaskError {
        code: "oom".into(),
        message: "m".into(),
        retryable: true,
    };
    let dead = finish(&t, Ending::Done(Completion::Error(err)), &opts, 6).apply(&t);
    assert!(dead.dead_lettered);
    let tr = retry(&dead, Some(2), &opts, 7).unwrap();
    assert_eq!(tr.state, TaskState::Queued);
    let again = tr.apply(&dead);
    assert_eq!((again.attempt, again.max_attempts), (1, 3));
    assert!(!again.dead_lettered && again.completed_at.is_none());
    assert_eq!(again.worker_id, None);
    assert!(tr.is_ready(7));
    assert_eq!(tr.events, vec![TaskEventKind::status_of(&again)]);
    assert!(retry(&again, None, &opts, 8).is_none(), "queued");
    let ok = finish(&t, Ending::Done(Completion::Ok(json!(1))), &opts, 6).apply(&t);
    assert!(retry(&ok, None, &opts, 8).is_none(), "succeeded");
    // The default grant is the store's default; a passed deadline is dropped.
    let mut expired = expire(&t, 9).apply(&t);
    expired.deadline = Some(8);
    let back = retry(&expired, None, &opts, 10).unwrap().apply(&expired);
    assert_eq!((back.max_attempts, back.deadline), (4, None));
    expired.deadline = Some(20);
    assert_eq!(
        retry(&expired, None, &opts, 10).unwrap().fields.deadline,
        Some(20)
    );
}

#[test]
fn the_lease_check_names_what_is_wrong() {
    let t = running(1);
    assert!(check_lease(Some(&t), "l1", Some("w"), true).is_ok());
    let reason = |r: Result<&Task, Box<CompleteOutcome>>| r.unwrap_err().reason.unwrap();
    assert_eq!(
        reason(check_lease(Some(&t), "l1", Some("v"), true)),
        crate::NOT_HOLDER
    );
    assert!(reason(check_lease(None, "l0", None, true)).starts_with("stale"));
    assert_eq!(
        reason(check_lease(None, "l0", None, false)),
        "unknown lease"
    );
}
