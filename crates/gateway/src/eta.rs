//! Queue ETA: when a queued task should start and finish, for the task object's
//! `estimated_start_s`, `estimated_finish_s` and `waiting_for_worker`.
//!
//! # The estimator
//!
//! For a queued task with `p` tasks ahead of it (its `queue_position`: queued tasks of the
//! same type and model that run first), `S` slots serving it (the slots of the connected,
//! not draining workers of this instance that fit its type, model and labels), a run time
//! `T` and the elapsed times `e₁…eₖ` of the tasks of its type and model running now:
//!
//! - `T` is the median of the run times (first start to completion) of the latest
//!   [`WINDOW`] tasks of that type and model that succeeded at their first attempt. A
//!   median, not a mean, so one stuck or very short run does not move it.
//! - Each slot is free at `fᵢ`: `max(T − eᵢ, 0)` for a slot running one of those tasks
//!   (at most `S` of them), `0` for the others. Sorted, `f₁ ≤ … ≤ f_S ≤ T`.
//! - Tasks all taking `T`, the tasks ahead start in order on whichever slot frees first,
//!   which goes round the slots in the order of the `fᵢ`: the task at position `p` starts at
//!   `start = f_{(p mod S)+1} + ⌊p / S⌋ · T` and finishes at `start + T`. With no task
//!   running this is `⌊p / S⌋ · T`; always `⌊p/S⌋·T ≤ start ≤ (⌊p/S⌋ + 1)·T`, and `start`
//!   never decreases as `p` grows.
//! - No worker serving the task online (`S = 0`): both estimates are `null` and
//!   `waiting_for_worker` is `true`. No run time recorded yet: the start is `0` if a slot
//!   is free for it (`p < S − k`), otherwise unknown; the finish is unknown (`null`).
//!
//! Seconds are whole seconds from the time of the answer, rounded to the nearest.
//!
//! # Assumptions and error
//!
//! The estimate assumes that the serving slots run only this type and model (a worker that
//! also serves other types shares its slots: the start comes later), that the tasks ahead
//! run like the recent ones (inputs that change the run time, e.g. more steps, move it), that
//! none of them fails and runs again, that no task of higher priority arrives, and that the
//! workers stay. `eᵢ` counts from the task's first start. The median of 20 samples is within
//! about a quarter of the spread of the run times of the true median; the start's error
//! grows with the number of rounds `⌊p / S⌋` (each round adds one run time's variation).
//! Workers connected to another instance sharing the store are not counted.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use kiln_broker::{ListFilter, Queue, QueueError, Task, serves};
use kiln_protocol::TaskState;

use crate::AppState;

/// How many recent run times the median is taken over.
pub(crate) const WINDOW: usize = 20;
/// How long the run times and running tasks of one type and model are reused.
const FRESH: Duration = Duration::from_secs(2);
/// How many recent tasks are read to find the run times (and the running tasks).
const READ: usize = 60;

/// A task's place in the queue and when it should start and finish, as ms from now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Estimate {
    /// When it should start (`None`: unknown).
    pub(crate) start_ms: Option<u64>,
    /// When it should finish (`None`: unknown).
    pub(crate) finish_ms: Option<u64>,
}

/// The estimate for the task at `position` (tasks ahead) with `slots` serving slots, run
/// time `run_ms` (`None`: none recorded) and the elapsed times of the tasks of its route
/// running now. `None` when no slot serves it (waiting for a worker). See the module docs.
pub(crate) fn estimate(
    position: u64,
    slots: u32,
    run_ms: Option<u64>,
    running_elapsed_ms: &[u64],
) -> Option<Estimate> {
    if slots == 0 {
        return None;
    }
    let s = u64::from(slots);
    let busy = running_elapsed_ms.len().min(slots as usize);
    let Some(t) = run_ms else {
        let idle = s - busy as u64;
        let start_ms = (position < idle).then_some(0);
        return Some(Estimate {
            start_ms,
            finish_ms: None,
        });
    };
    let mut free: Vec<u64> = running_elapsed_ms[..busy]
        .iter()
        .map(|e| t.saturating_sub(*e))
        .collect();
    free.resize(slots as usize, 0);
    free.sort_unstable();
    let first_free = free[(position % s) as usize];
    let start = first_free.saturating_add((position / s).saturating_mul(t));
    Some(Estimate {
        start_ms: Some(start),
        finish_ms: Some(start.saturating_add(t)),
    })
}

/// The median of `samples` (the lower middle one for an even count); `None` when empty.
pub(crate) fn median(mut samples: Vec<u64>) -> Option<u64> {
    if samples.is_empty() {
        return None;
    }
    samples.sort_unstable();
    Some(samples[(samples.len() - 1) / 2])
}

/// Whole seconds, rounded to the nearest (half a second up).
pub(crate) fn seconds(ms: u64) -> u64 {
    ms.saturating_add(500) / 1000
}

/// What the estimate of one (type, model) reads from the store, kept for [`FRESH`].
#[derive(Debug, Clone)]
struct Route {
    read_at: Instant,
    run_ms: Option<u64>,
    /// First starts (Unix ms) of the tasks of the route running now.
    running_since: Vec<u64>,
}

/// The run times and running tasks per (type, model), read at most every [`FRESH`].
#[derive(Debug, Default)]
pub(crate) struct RunTimes {
    routes: Mutex<HashMap<(String, Option<String>), Route>>,
}

impl RunTimes {
    async fn route(&self, q: &dyn Queue, t: &Task) -> Result<Route, QueueError> {
        let key = (t.task_type.clone(), t.model.clone());
        if let Some(r) = self
            .lock()
            .get(&key)
            .filter(|r| r.read_at.elapsed() < FRESH)
        {
            return Ok(r.clone());
        }
        let same = |o: &Task| o.model == t.model;
        let read = |state| ListFilter {
            state: Some(state),
            task_type: Some(t.task_type.clone()),
            limit: READ,
            before_seq: None,
        };
        let done = q.list(&read(TaskState::Succeeded)).await?;
        let runs = done
            .iter()
            .filter(|o| same(o) && o.attempt == 1)
            .filter_map(|o| Some(o.completed_at?.saturating_sub(o.started_at?)))
            .take(WINDOW)
            .collect();
        let running = q.list(&read(TaskState::Running)).await?;
        let r = Route {
            read_at: Instant::now(),
            run_ms: median(runs),
            running_since: running
                .iter()
                .filter(|o| same(o))
                .filter_map(|o| o.started_at)
                .collect(),
        };
        self.lock().insert(key, r.clone());
        Ok(r)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<(String, Option<String>), Route>> {
        self.routes.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The ETA fields of the task object.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct EtaView {
    pub(crate) start_s: Option<u64>,
    pub(crate) finish_s: Option<u64>,
    pub(crate) waiting_for_worker: bool,
}

/// The slots of this instance's connected, not draining workers that may run `t`.
fn serving_slots(state: &AppState, t: &Task) -> u32 {
    state
        .broker()
        .workers()
        .iter()
        .filter(|w| w.connected && !w.draining)
        .filter(|w| serves(&w.capabilities, &t.task_type, t.model.as_deref(), &t.labels))
        .map(|w| w.slots)
        .sum()
}

/// The ETA of `t` at `position` (queued tasks only; others get the default: all unknown).
pub(crate) async fn of(
    state: &AppState,
    t: &Task,
    position: Option<u64>,
    now: u64,
) -> Result<EtaView, QueueError> {
    let Some(position) = position.filter(|_| t.state == TaskState::Queued) else {
        return Ok(EtaView::default());
    };
    let slots = serving_slots(state, t);
    if slots == 0 {
        return Ok(EtaView {
            waiting_for_worker: true,
            ..EtaView::default()
        });
    }
    if state.broker().is_paused() {
        return Ok(EtaView::default());
    }
    let route = state.run_times().route(state.broker().queue(), t).await?;
    let elapsed: Vec<u64> = route
        .running_since
        .iter()
        .map(|s| now.saturating_sub(*s))
        .collect();
    let e = estimate(position, slots, route.run_ms, &elapsed);
    Ok(EtaView {
        start_s: e.and_then(|e| e.start_ms).map(seconds),
        finish_s: e.and_then(|e| e.finish_ms).map(seconds),
        waiting_for_worker: false,
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a panic is the failure report
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn worked_examples() {
        // Two idle slots, 10 s runs: positions 0 and 1 now, 2 and 3 after one run.
        let at = |p| estimate(p, 2, Some(10_000), &[]).unwrap();
        assert_eq!(at(0).start_ms, Some(0));
        assert_eq!(at(1).start_ms, Some(0));
        assert_eq!(at(2).start_ms, Some(10_000));
        assert_eq!(at(3).finish_ms, Some(20_000));
        // One slot 4 s into a 10 s run: the next task starts in 6 s.
        let e = estimate(0, 1, Some(10_000), &[4_000]).unwrap();
        assert_eq!((e.start_ms, e.finish_ms), (Some(6_000), Some(16_000)));
        // A run longer than usual is taken as about to end.
        assert_eq!(
            estimate(0, 1, Some(10_000), &[30_000]).unwrap().start_ms,
            Some(0)
        );
        // No slot: waiting for a worker.
        assert_eq!(estimate(0, 0, Some(10_000), &[]), None);
        // No run time yet: "now" only when a slot is free for it.
        let unknown = |p, running: &[u64]| estimate(p, 2, None, running).unwrap();
        assert_eq!(unknown(1, &[5]).start_ms, None);
        assert_eq!(unknown(0, &[5]).start_ms, Some(0));
        assert_eq!(unknown(0, &[5]).finish_ms, None);
        assert_eq!(unknown(2, &[]).start_ms, None);
    }

    #[test]
    fn median_and_seconds() {
        assert_eq!(median(vec![]), None);
        assert_eq!(median(vec![9, 1, 5]), Some(5));
        assert_eq!(median(vec![4, 1, 100, 2]), Some(2));
        assert_eq!(
            (
                seconds(0),
                seconds(499),
                seconds(500),
                seconds(1499),
                seconds(u64::MAX)
            ),
            (0, 0, 1, 1, u64::MAX / 1000)
        );
    }

    fn inputs() -> impl Strategy<Value = (u32, u64, Vec<u64>)> {
        (
            1u32..16,
            1u64..1_000_000,
            prop::collection::vec(0u64..2_000_000, 0..20),
        )
    }

    proptest! {
        #[test]
        fn the_start_never_decreases_with_the_position(
            (slots, t, running) in inputs(), p in 0u64..10_000,
        ) {
            let a = estimate(p, slots, Some(t), &running).unwrap();
            let b = estimate(p + 1, slots, Some(t), &running).unwrap();
            prop_assert!(a.start_ms <= b.start_ms);
            prop_assert!(a.finish_ms <= b.finish_ms);
        }

        #[test]
        fn the_start_lies_within_its_round(
            (slots, t, running) in inputs(), p in 0u64..10_000,
        ) {
            let e = estimate(p, slots, Some(t), &running).unwrap();
            let rounds = p / u64::from(slots);
            let start = e.start_ms.unwrap();
            prop_assert!(rounds * t <= start && start <= (rounds + 1) * t);
            prop_assert_eq!(e.finish_ms, Some(start + t));
            if running.is_empty() {
                prop_assert_eq!(start, rounds * t);
            }
        }

        #[test]
        fn more_slots_never_start_later((slots, t, _r) in inputs(), p in 0u64..10_000) {
            let fewer = estimate(p, slots, Some(t), &[]).unwrap();
            let more = estimate(p, slots + 1, Some(t), &[]).unwrap();
            prop_assert!(more.start_ms <= fewer.start_ms);
        }

        #[test]
        fn unknown_inputs_give_unknown_estimates(
            (slots, _t, running) in inputs(), p in 0u64..10_000,
        ) {
            prop_assert_eq!(estimate(p, 0, Some(1), &running), None);
            let e = estimate(p, slots, None, &running).unwrap();
            prop_assert_eq!(e.finish_ms, None);
            let idle = u64::from(slots).saturating_sub(running.len() as u64);
            prop_assert_eq!(e.start_ms.is_some(), p < idle);
        }

        #[test]
        fn huge_inputs_do_not_overflow(p in any::<u64>(), t in any::<u64>(), slots in 1u32..4) {
            let e = estimate(p, slots, Some(t), &[u64::MAX, 0]).unwrap();
            prop_assert!(e.start_ms <= e.finish_ms);
        }
    }
}
