//! Every store against the pure lifecycle: random sequences of submits, claims, progress,
//! results (ok, retryable and fatal errors, cancelled; also with stale leases and by the
//! wrong worker), rejects, releases, cancels, retries, renewals, worker restarts and time
//! passing (lapsed leases, deadlines) are run through a store and through a model built only from
//! `kiln_broker::lifecycle`; each answer, and at the end each task and its events, must be
//! what the model says.
//!
//! SQLite runs in memory; PostgreSQL (127.0.0.1:5432, database `test`) and Redis
//! (127.0.0.1:6379) get a schema or key prefix per case and are skipped with a notice when
//! unreachable outside `CI=true`.

#![allow(clippy::unwrap_used)] // test helpers: a panic is the failure report

use std::collections::HashMap;
use std::sync::Arc;

use kiln_broker::lifecycle::{self, TaskEventKind};
use kiln_broker::*;
use kiln_protocol::TaskState;
use kiln_protocol::messages::TaskError;
use proptest::prelude::*;
use proptest::test_runner::TestCaseError;
use serde_json::json;

const LEASE_MS: u64 = 100;
const WORKERS: [&str; 2] = ["w0", "w1"];

#[derive(Debug, Clone, Copy)]
enum How {
    Ok,
    Retryable,
    Fatal,
    Cancelled,
}

#[derive(Debug, Clone)]
enum Op {
    Submit {
        max_attempts: u32,
        deadline: Option<u64>,
    },
    Claim {
        worker: usize,
        n: usize,
    },
    Progress {
        task: usize,
        wrong_worker: bool,
    },
    Complete {
        task: usize,
        how: How,
        stale: bool,
        wrong_worker: bool,
    },
    Reject {
        task: usize,
        avoid_ms: u64,
    },
    Release {
        task: usize,
    },
    Cancel {
        task: usize,
    },
    Retry {
        task: usize,
        attempts: Option<u32>,
    },
    Renew {
        worker: usize,
    },
    ReleaseWorker {
        worker: usize,
    },
    Advance {
        ms: u64,
    },
}

fn how() -> impl Strategy<Value = How> {
    prop_oneof![
        Just(How::Ok),
        Just(How::Retryable),
        Just(How::Fatal),
        Just(How::Cancelled)
    ]
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (1u32..=3, prop::option::weighted(0.3, 50u64..400))
            .prop_map(|(max_attempts, deadline)| Op::Submit { max_attempts, deadline }),
        3 => (0..2usize, 1..=2usize).prop_map(|(worker, n)| Op::Claim { worker, n }),
        2 => (0..16usize, any::<bool>()).prop_map(|(task, wrong_worker)| Op::Progress { task, wrong_worker }),
        3 => (0..16usize, how(), prop::bool::weighted(0.15), prop::bool::weighted(0.15))
            .prop_map(|(task, how, stale, wrong_worker)| Op::Complete { task, how, stale, wrong_worker }),
        1 => (0..16usize, 1u64..200).prop_map(|(task, avoid_ms)| Op::Reject { task, avoid_ms }),
        1 => (0..16usize).prop_map(|task| Op::Release { task }),
        1 => (0..8usize).prop_map(|task| Op::Cancel { task }),
        1 => (0..8usize, prop::option::of(1u32..=2)).prop_map(|(task, attempts)| Op::Retry { task, attempts }),
        1 => (0..2usize).prop_map(|worker| Op::Renew { worker }),
        1 => (0..2usize).prop_map(|worker| Op::ReleaseWorker { worker }),
        2 => (0u64..150).prop_map(|ms| Op::Advance { ms }),
    ]
}

/// The expected store, from the lifecycle rules alone.
struct Model {
    opts: QueueOptions,
    now: u64,
    tasks: Vec<Task>,
    events: HashMap<String, Vec<TaskEventKind>>,
    /// The lease of each attempt record of each task, by attempt number.
    leases: HashMap<String, Vec<String>>,
    /// `(task, worker)` -> skipped until.
    avoid: HashMap<(String, String), u64>,
}

impl Model {
    fn pos(&self, id: &str) -> usize {
        self.tasks.iter().position(|t| t.id == id).unwrap()
    }

    fn take(&mut self, id: &str, tr: &lifecycle::Transition) -> Task {
        let i = self.pos(id);
        let after = tr.apply(&self.tasks[i]);
        self.tasks[i] = after.clone();
        self.events
            .get_mut(id)
            .unwrap()
            .extend(tr.events.iter().cloned());
        after
    }

    fn by_lease(&self, lease: &str) -> (Option<&Task>, bool) {
        let known = self.leases.values().any(|ls| ls.iter().any(|l| l == lease));
        let current = self
            .tasks
            .iter()
            .find(|t| t.lease.as_deref() == Some(lease));
        (current, known)
    }

    fn pick(&self, i: usize) -> Option<&Task> {
        (!self.tasks.is_empty()).then(|| &self.tasks[i % self.tasks.len()])
    }

    /// The task an op naming a lease acts on: mostly a running one (odd `i`: any task, so
    /// that ended and queued tasks' leases are tried too).
    fn pick_leased(&self, i: usize) -> Option<&Task> {
        let running: Vec<&Task> = self
            .tasks
            .iter()
            .filter(|t| t.state == TaskState::Running)
            .collect();
        if running.is_empty() || i % 2 == 1 {
            return self.pick(i / 2);
        }
        Some(running[(i / 2) % running.len()])
    }

    /// The lease an op on task `i` names: the current one, else its latest, else one no
    /// task ever had.
    fn lease_of(&self, i: usize, stale: bool) -> String {
        let Some(t) = self.pick_leased(i) else {
            return "lease_none".into();
        };
        let all = self.leases.get(&t.id).cloned().unwrap_or_default();
        let l = if stale {
            all.first()
        } else {
            t.lease.as_ref().or(all.last())
        };
        l.cloned().unwrap_or_else(|| "lease_none".into())
    }

    fn holder_of(&self, i: usize, wrong: bool) -> String {
        let w = self.pick_leased(i).and_then(|t| t.worker_id.clone());
        match (w, wrong) {
            (Some(w), false) => w,
            (Some(w), true) => WORKERS.iter().find(|o| **o != w).unwrap().to_string(),
            (None, _) => WORKERS[0].into(),
        }
    }

    fn give_back(&mut self, lease: &str, holder: &str, why: &str) -> Option<Task> {
        let (t, _) = self.by_lease(lease);
        let t =
            t.filter(|t| t.state == TaskState::Running && t.worker_id.as_deref() == Some(holder))?;
        let (id, tr) = (t.id.clone(), lifecycle::release(t, why, self.now));
        Some(self.take(&id, &tr))
    }
}

fn sorted(mut v: Vec<Task>) -> Vec<Task> {
    v.sort_by(|a, b| (&a.id, a.state.as_str()).cmp(&(&b.id, b.state.as_str())));
    v
}

async fn run(q: &dyn Queue, ops: Vec<Op>) -> Result<(), TestCaseError> {
    let mut m = Model {
        opts: queue_options(),
        now: 1_000,
        tasks: Vec::new(),
        events: HashMap::new(),
        leases: HashMap::new(),
        avoid: HashMap::new(),
    };
    let caps = Capabilities {
        task_types: vec!["t".into()],
        ..Default::default()
    };
    // Every case starts with a few tasks, so that the ops find something to act on.
    let start = (0..3).map(|_| Op::Submit {
        max_attempts: 2,
        deadline: None,
    });
    for (k, op) in start.chain(ops).enumerate() {
        let now = m.now;
        match op {
            Op::Submit {
                max_attempts,
                deadline,
            } => {
                let nt = NewTask {
                    task_type: "t".into(),
                    input: json!({ "k": k }),
                    max_attempts: Some(max_attempts),
                    deadline: deadline.map(|d| now + d),
                    ..Default::default()
                };
                let (t, created) = q.enqueue(nt.clone(), now).await.unwrap();
                prop_assert!(created);
                let a = lifecycle::admit(nt, &m.opts).unwrap();
                prop_assert_eq!(&t, &lifecycle::new_task(&a, t.id.clone(), t.seq, now));
                m.events.insert(t.id.clone(), vec![a.event]);
                m.leases.insert(t.id.clone(), Vec::new());
                m.tasks.push(t);
            }
            Op::Claim { worker, n } => {
                let w = WORKERS[worker];
                let got = q.reserve(w, &caps, n, now + LEASE_MS, now).await.unwrap();
                let eligible: Vec<String> = m
                    .tasks
                    .iter()
                    .filter(|t| t.state == TaskState::Queued)
                    .filter(|t| {
                        m.avoid
                            .get(&(t.id.clone(), w.into()))
                            .is_none_or(|u| *u <= now)
                    })
                    .map(|t| t.id.clone())
                    .collect();
                prop_assert_eq!(
                    got.len(),
                    n.min(eligible.len()),
                    "claimed {:?} of {:?}",
                    got,
                    eligible
                );
                for g in got {
                    prop_assert!(eligible.contains(&g.id), "{} was not claimable", g.id);
                    let lease = g.lease.clone().unwrap();
                    let tr =
                        lifecycle::claim(&m.tasks[m.pos(&g.id)], w, &lease, now + LEASE_MS, now);
                    prop_assert_eq!(&g, &m.take(&g.id, &tr));
                    // An attempt given back is forgotten: its number's record is replaced.
                    let ls = m.leases.get_mut(&g.id).unwrap();
                    ls.truncate(g.attempt as usize - 1);
                    ls.push(lease);
                }
            }
            Op::Progress { task, wrong_worker } => {
                let (lease, holder) = (m.lease_of(task, false), m.holder_of(task, wrong_worker));
                let p = json!({ "step": k });
                let got = q
                    .progress(&lease, Some(&holder), p.clone(), now)
                    .await
                    .unwrap();
                let (t, _) = m.by_lease(&lease);
                let want = t
                    .filter(|t| {
                        t.state == TaskState::Running
                            && t.worker_id.as_deref() == Some(holder.as_str())
                    })
                    .map(|t| (t.id.clone(), lifecycle::progress(t, p)));
                prop_assert_eq!(got.as_ref(), want.as_ref().map(|(id, _)| id));
                if let Some((id, tr)) = want {
                    m.take(&id, &tr);
                }
            }
            Op::Complete {
                task,
                how,
                stale,
                wrong_worker,
            } => {
                let (lease, holder) = (m.lease_of(task, stale), m.holder_of(task, wrong_worker));
                let error = |retryable| TaskError {
                    code: "boom".into(),
                    message: format!("op {k}"),
                    retryable,
                };
                let c = match how {
                    How::Ok => Completion::Ok(json!({ "out": k })),
                    How::Retryable => Completion::Error(error(true)),
                    How::Fatal => Completion::Error(error(false)),
                    How::Cancelled => Completion::Cancelled,
                };
                let got = q
                    .complete_as(&holder, &lease, c.clone(), now)
                    .await
                    .unwrap();
                let (t, known) = m.by_lease(&lease);
                match lifecycle::check_lease(t, &lease, Some(&holder), known) {
                    Err(refused) => prop_assert_eq!(got, *refused),
                    Ok(t) => {
                        let (id, tr) = (
                            t.id.clone(),
                            lifecycle::finish(t, Ending::Done(c), &m.opts, now),
                        );
                        let after = m.take(&id, &tr);
                        prop_assert!(got.accepted);
                        prop_assert_eq!(got.task, Some(after));
                    }
                }
            }
            Op::Reject { task, avoid_ms } => {
                let (lease, holder) = (m.lease_of(task, false), m.holder_of(task, false));
                let until = now + avoid_ms;
                let got = q
                    .reject(&lease, Some(&holder), "busy", until, now)
                    .await
                    .unwrap();
                let want = m.give_back(&lease, &holder, "busy");
                if let Some(t) = &want {
                    m.avoid.insert((t.id.clone(), holder.clone()), until);
                }
                prop_assert_eq!(got, want);
            }
            Op::Release { task } => {
                let (lease, holder) = (m.lease_of(task, false), m.holder_of(task, false));
                let got = q
                    .release(&lease, Some(&holder), "given back", now)
                    .await
                    .unwrap();
                prop_assert_eq!(got, m.give_back(&lease, &holder, "given back"));
            }
            Op::Cancel { task } => {
                let Some(t) = m.pick(task).cloned() else {
                    prop_assert_eq!(
                        q.cancel("task_none", now).await.unwrap(),
                        CancelOutcome::NotFound
                    );
                    continue;
                };
                let got = q.cancel(&t.id, now).await.unwrap();
                let want = match lifecycle::cancel(&t, now) {
                    None => CancelOutcome::AlreadyTerminal(t),
                    Some(tr) => {
                        let after = m.take(&t.id, &tr);
                        match (after.state, after.worker_id.clone(), after.lease.clone()) {
                            (TaskState::Running, Some(worker_id), Some(lease)) => {
                                CancelOutcome::SignalWorker {
                                    task: after,
                                    worker_id,
                                    lease,
                                }
                            }
                            _ => CancelOutcome::Canceled(after),
                        }
                    }
                };
                prop_assert_eq!(got, want);
            }
            Op::Retry { task, attempts } => {
                let Some(t) = m.pick(task).cloned() else {
                    continue;
                };
                let got = q.retry(&t.id, attempts, now).await.unwrap();
                let want = match lifecycle::retry(&t, attempts, &m.opts, now) {
                    None => RetryOutcome::Refused(t),
                    Some(tr) => RetryOutcome::Queued(m.take(&t.id, &tr)),
                };
                prop_assert_eq!(got, want);
            }
            Op::Renew { worker } => {
                let (w, until) = (WORKERS[worker], now + LEASE_MS);
                let got = q.renew(w, until).await.unwrap();
                let mut want = 0;
                for t in &mut m.tasks {
                    if t.state == TaskState::Running
                        && t.worker_id.as_deref() == Some(w)
                        && t.lease_expires_at.is_some_and(|e| e < until)
                    {
                        t.lease_expires_at = Some(until);
                        want += 1;
                    }
                }
                prop_assert_eq!(got, want);
            }
            Op::ReleaseWorker { worker } => {
                let w = WORKERS[worker];
                let got = q.release_worker(w, &[], now).await.unwrap();
                let held: Vec<Task> = m
                    .tasks
                    .iter()
                    .filter(|t| t.state == TaskState::Running && t.worker_id.as_deref() == Some(w))
                    .cloned()
                    .collect();
                let want: Vec<Task> = held
                    .iter()
                    .map(|t| {
                        m.take(
                            &t.id,
                            &lifecycle::requeue(t, lifecycle::WORKER_RESTARTED, true, now),
                        )
                    })
                    .collect();
                prop_assert_eq!(sorted(got), sorted(want));
            }
            Op::Advance { ms } => {
                m.now += ms;
                let now = m.now;
                let got = q.sweep(now).await.unwrap();
                let mut want = Sweep::default();
                let lapsed: Vec<Task> = m
                    .tasks
                    .iter()
                    .filter(|t| lifecycle::lapsed(t, now))
                    .cloned()
                    .collect();
                for t in lapsed {
                    want.changed.push(m.take(&t.id, &lifecycle::lapse(&t, now)));
                }
                let late: Vec<Task> = m
                    .tasks
                    .iter()
                    .filter(|t| lifecycle::past_deadline(t, now))
                    .cloned()
                    .collect();
                for t in late {
                    if let (TaskState::Running, Some(w), Some(l)) =
                        (t.state, &t.worker_id, &t.lease)
                    {
                        want.stop.push((w.clone(), l.clone()));
                    }
                    want.changed
                        .push(m.take(&t.id, &lifecycle::expire(&t, now)));
                }
                let mut stop = got.stop.clone();
                stop.sort();
                want.stop.sort();
                prop_assert_eq!(stop, want.stop);
                prop_assert_eq!(sorted(got.changed), sorted(want.changed));
            }
        }
    }
    for t in &m.tasks {
        let stored = q.get(&t.id).await.unwrap();
        prop_assert_eq!(stored.as_ref(), Some(t));
        let events = q.events_after(&t.id, 0).await.unwrap();
        prop_assert!(
            events.windows(2).all(|w| w[0].id < w[1].id),
            "event ids increase"
        );
        let kinds: Vec<TaskEventKind> = events.into_iter().map(|e| e.kind).collect();
        prop_assert_eq!(&kinds, &m.events[&t.id], "events of {}", t.id);
    }
    Ok(())
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

fn config(cases: u32) -> ProptestConfig {
    ProptestConfig {
        cases,
        failure_persistence: None,
        max_shrink_iters: 256,
        ..ProptestConfig::default()
    }
}

/// The model's settings: 2 attempts, no retry backoff.
fn queue_options() -> QueueOptions {
    QueueOptions {
        default_max_attempts: 2,
        retry_base_ms: 0,
        ..QueueOptions::default()
    }
}

/// The opened store; `None` (after a notice) when `what` is unreachable outside `CI=true`.
fn reachable<Q>(opened: Result<Q, QueueError>, what: &str) -> Option<Q> {
    match opened {
        Ok(q) => Some(q),
        Err(e) if std::env::var("CI").as_deref() != Ok("true") => {
            eprintln!("notice: {what} not reachable ({e}); test skipped");
            None
        }
        Err(e) => panic!("{what} is required in CI: {e}"),
    }
}

proptest! {
    #![proptest_config(config(64))]
    #[test]
    fn sqlite_follows_the_lifecycle(ops in prop::collection::vec(op(), 10..40)) {
        let q = SqliteQueue::in_memory(2).unwrap();
        runtime().block_on(run(&q, ops))?;
    }
}

#[cfg(feature = "postgres")]
mod postgres {
    use std::sync::atomic::{AtomicU32, Ordering};

    use super::*;

    const URL: &str = "host=127.0.0.1 port=5432 user=postgres dbname=test connect_timeout=3";
    static CASE: AtomicU32 = AtomicU32::new(0);

    async fn open() -> Option<PostgresQueue> {
        let n = CASE.fetch_add(1, Ordering::Relaxed);
        let opts = PostgresOptions {
            url: URL.into(),
            schema: format!("kiln_life{}_{n}", std::process::id()),
            pool_size: 2,
            queue: queue_options(),
            ..PostgresOptions::default()
        };
        reachable(PostgresQueue::open(opts).await, "PostgreSQL")
    }

    proptest! {
        #![proptest_config(config(32))]
        #[test]
        fn postgres_follows_the_lifecycle(ops in prop::collection::vec(op(), 10..30)) {
            runtime().block_on(async {
                let Some(q) = open().await else { return Ok(()) };
                let q = Arc::new(q);
                let r = run(&*q, ops).await;
                q.drop_schema().await.unwrap();
                r
            })?;
        }
    }
}

#[cfg(feature = "redis")]
mod redis {
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::time::Duration;

    use super::*;

    const URL: &str = "redis://127.0.0.1:6379";
    static CASE: AtomicU32 = AtomicU32::new(0);

    async fn open() -> Option<RedisQueue> {
        let n = CASE.fetch_add(1, Ordering::Relaxed);
        let opts = RedisOptions {
            url: URL.into(),
            prefix: format!("kiln-life:{}:{n}:", std::process::id()),
            block: Duration::from_millis(500),
            queue: queue_options(),
            ..RedisOptions::default()
        };
        reachable(RedisQueue::connect(opts).await, "Redis")
    }

    proptest! {
        #![proptest_config(config(32))]
        #[test]
        fn redis_follows_the_lifecycle(ops in prop::collection::vec(op(), 10..30)) {
            runtime().block_on(async {
                let Some(q) = open().await else { return Ok(()) };
                q.delete_all().await.unwrap();
                let r = run(&q, ops).await;
                q.delete_all().await.unwrap();
                r
            })?;
        }
    }
}
