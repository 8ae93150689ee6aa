//! Dispatch: fills a session's free slots from the queue and sends the assignments in
//! frames packed to fit `max_frame_bytes`. Assignments that fail on the transport (refused
//! or undelivered) are counted per task (`Queue::assign_failed`, dead-lettered as
//! `assign_failed` after `max_assign_failures` in a row); an ack of the frame resets the
//! count; a cancel of an unacked assignment takes it out of its frame.

use std::collections::HashSet;

use kiln_protocol::messages::*;
use kiln_protocol::{Envelope, Message};

use crate::broker::{Broker, now_ms};
use crate::model::{QueueError, Task};
use crate::session::{Retained, SessionState};

/// The assignments of one dispatch, split into frames of at most `max` bytes: tasks whose
/// assignment never failed go together, in as few frames as fit; each task that failed an
/// assignment before goes alone, after them, so that it cannot take others down with it.
/// Tasks that do not fit in a frame even alone are returned apart (refused).
fn pack(
    tasks: Vec<TaskAssignment>,
    suspects: &HashSet<String>,
    max: usize,
) -> (Vec<Vec<TaskAssignment>>, Vec<TaskAssignment>) {
    // The envelope around an empty task list, with the widest seq and ts.
    let base = Envelope::new(
        Message::Assign(Assign {
            seq: u64::MAX,
            tasks: Vec::new(),
        }),
        u64::MAX,
    )
    .from_source("gateway")
    .encode()
    .len();
    let size_of = |t: &TaskAssignment| {
        serde_json::to_string(t)
            .map(|s| s.len())
            .unwrap_or(usize::MAX)
    };
    let (fresh, suspect): (Vec<_>, Vec<_>) = tasks
        .into_iter()
        .partition(|t| !suspects.contains(&t.task_id));
    let mut frames: Vec<Vec<TaskAssignment>> = Vec::new();
    let mut refused = Vec::new();
    let mut current: Vec<TaskAssignment> = Vec::new();
    let mut len = base;
    for t in fresh {
        let size = size_of(&t);
        if base.saturating_add(size) > max {
            refused.push(t);
            continue;
        }
        let comma = usize::from(!current.is_empty());
        if len + comma + size > max {
            frames.push(std::mem::take(&mut current));
            len = base;
        }
        len += usize::from(!current.is_empty()) + size;
        current.push(t);
    }
    if !current.is_empty() {
        frames.push(current);
    }
    for t in suspect {
        if base.saturating_add(size_of(&t)) > max {
            refused.push(t);
        } else {
            frames.push(vec![t]);
        }
    }
    (frames, refused)
}

/// The assignment a reserved task is sent as (`None`: reserved without a lease).
fn assignment(t: Task) -> Option<TaskAssignment> {
    Some(TaskAssignment {
        task_id: t.id,
        attempt: t.attempt,
        lease: t.lease?,
        request_id: t.request_id,
        task_type: t.task_type,
        priority: t.priority,
        deadline: t.deadline,
        model: t.model,
        input: t.input,
    })
}

/// The credits one dispatch took from a session.
struct Credits {
    caps: Capabilities,
    free: usize,
    session: String,
}

impl Broker {
    /// Fills the worker's free slots from the queue.
    pub(crate) async fn dispatch(&self, worker_id: &str) {
        if self.is_paused() {
            return;
        }
        let now = now_ms();
        let lease_until = now + self.cfg.lease.as_millis() as u64;
        let Some(credits) = self.take_credits(worker_id) else {
            return;
        };
        let reserved = self
            .queue
            .reserve(worker_id, &credits.caps, credits.free, lease_until, now)
            .await;
        let (refused, orphans) = match self.hand_out(worker_id, &credits, reserved) {
            Some(r) => r,
            None => return,
        };
        self.assignments_failed(worker_id, refused).await;
        for lease in &orphans {
            if let Err(e) = self
                .queue
                .release(lease, None, "the session ended before assignment", now)
                .await
            {
                tracing::warn!(message = "release failed", error = %e);
            }
        }
        if !orphans.is_empty() {
            self.wake_dispatch();
        }
        self.publish();
    }

    /// Takes the session's free slots for a `reserve`; they stay taken while the store
    /// answers. `None` when the session cannot take work now.
    fn take_credits(&self, worker_id: &str) -> Option<Credits> {
        let mut sessions = self.sessions();
        let s = sessions.get_mut(worker_id)?;
        if s.tx.is_none() || s.draining || s.replacing {
            return None;
        }
        let free = s.free();
        if free == 0 {
            return None;
        }
        s.reserving += free;
        Some(Credits {
            caps: s.capabilities.clone(),
            free,
            session: s.session.clone(),
        })
    }

    /// Gives the credits back and assigns the reserved tasks to the session that took them.
    /// Returns the leases refused as too large and the leases to release because that
    /// session was replaced meanwhile; `None` when there is nothing to do.
    fn hand_out(
        &self,
        worker_id: &str,
        credits: &Credits,
        reserved: Result<Vec<Task>, QueueError>,
    ) -> Option<(Vec<String>, Vec<String>)> {
        let mut sessions = self.sessions();
        let mut current = sessions
            .get_mut(worker_id)
            .filter(|s| s.session == credits.session);
        if let Some(s) = current.as_mut() {
            s.reserving = s.reserving.saturating_sub(credits.free);
        }
        let tasks = match reserved {
            Ok(t) => t,
            Err(e) => {
                tracing::warn!(message = "reserve failed", error = %e);
                return None;
            }
        };
        if tasks.is_empty() {
            return None;
        }
        match current.filter(|s| !s.replacing) {
            Some(s) => {
                let assignments: Vec<TaskAssignment> =
                    tasks.into_iter().filter_map(assignment).collect();
                for a in &assignments {
                    s.inflight.insert(a.lease.clone());
                }
                Some((self.push_assignments(s, assignments), Vec::new()))
            }
            // The session was replaced while the store answered: give the tasks back.
            None => Some((
                Vec::new(),
                tasks.into_iter().filter_map(|t| t.lease).collect(),
            )),
        }
    }

    fn suspects(&self) -> std::sync::MutexGuard<'_, HashSet<String>> {
        self.suspects.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Sends the assignments of one dispatch to `s` in frames that fit the frame limit.
    /// Returns the leases of tasks too large for any frame (the caller counts them as
    /// failed assignments; they are already out of `s.inflight`).
    fn push_assignments(&self, s: &mut SessionState, tasks: Vec<TaskAssignment>) -> Vec<String> {
        let (frames, refused) = {
            let suspects = self.suspects();
            pack(tasks, &suspects, self.cfg.max_frame_bytes)
        };
        for tasks in frames {
            s.push_control(|seq| Message::Assign(Assign { seq, tasks }));
        }
        refused
            .into_iter()
            .map(|t| {
                tracing::warn!(message = "assignment refused: the frame would exceed max_frame_bytes", task_id = %t.task_id, limit = self.cfg.max_frame_bytes);
                s.inflight.remove(&t.lease);
                t.lease
            })
            .collect()
    }

    /// Counts a failed assignment for each lease (the store queues the task again, or
    /// dead-letters it as `assign_failed` after `max_assign_failures` in a row), and lets
    /// dispatch fill the freed slots.
    pub(crate) async fn assignments_failed(&self, worker_id: &str, leases: Vec<String>) {
        if leases.is_empty() {
            return;
        }
        let now = now_ms();
        for lease in leases {
            self.free_lease(worker_id, &lease);
            match self
                .queue
                .assign_failed(&lease, self.cfg.max_assign_failures, now)
                .await
            {
                Ok(Some(t)) => {
                    tracing::warn!(message = "assignment failed on the transport", worker_id = %worker_id, task_id = %t.id, state = t.state.as_str(), dead_lettered = t.dead_lettered);
                    if t.state.is_terminal() {
                        self.suspects().remove(&t.id);
                    } else {
                        self.suspects().insert(t.id);
                    }
                }
                Ok(None) => {}
                Err(e) => tracing::warn!(message = "failed assignment not stored", error = %e),
            }
        }
        self.publish();
        self.wake_dispatch();
    }

    /// The worker refused a frame (`error` envelope with code `oversized`): it acks every
    /// control message before the one it refuses, so the refused one is the oldest unacked
    /// `assign`. Takes it out of the session and returns its leases.
    pub(crate) fn take_refused(&self, worker_id: &str) -> Vec<String> {
        let mut sessions = self.sessions();
        let Some(s) = sessions.get_mut(worker_id) else {
            return Vec::new();
        };
        let Some(i) = s.retained.iter().position(Retained::is_assign) else {
            return Vec::new();
        };
        let r = s.retained.remove(i);
        r.tasks
            .into_iter()
            .map(|(lease, _)| {
                s.inflight.remove(&lease);
                lease
            })
            .collect()
    }

    /// Control frames up to `seq` arrived. The tasks they assigned that had failed an
    /// assignment before start counting again from zero.
    pub(crate) async fn acked(&self, worker_id: &str, seq: u64) {
        let delivered: Vec<(String, String)> = {
            let mut sessions = self.sessions();
            let Some(s) = sessions.get_mut(worker_id) else {
                return;
            };
            if s.retained.first().is_none_or(|r| r.seq > seq) {
                return;
            }
            let suspects = self.suspects();
            let mut out = Vec::new();
            s.retained.retain(|r| {
                if r.seq > seq {
                    return true;
                }
                out.extend(
                    r.tasks
                        .iter()
                        .filter(|(_, id)| suspects.contains(id))
                        .cloned(),
                );
                false
            });
            out
        };
        for (lease, task_id) in delivered {
            self.suspects().remove(&task_id);
            if let Err(e) = self.queue.record_assignment(&lease, true).await {
                tracing::warn!(message = "delivered assignment not stored", error = %e);
            }
        }
    }

    /// If `lease` was assigned to `worker_id` in a frame the worker has not acked, takes it
    /// out of that frame (the frame is not replayed with it) and of the session's leases.
    /// True when it was unacked: the caller ends the attempt at once.
    pub(crate) fn withdraw_unacked(&self, worker_id: &str, lease: &str) -> bool {
        let mut sessions = self.sessions();
        let Some(s) = sessions.get_mut(worker_id) else {
            return false;
        };
        let Some(i) = s
            .retained
            .iter()
            .position(|r| r.tasks.iter().any(|(l, _)| l == lease))
        else {
            return false;
        };
        s.inflight.remove(lease);
        let r = &mut s.retained[i];
        r.tasks.retain(|(l, _)| l != lease);
        if r.tasks.is_empty() {
            s.retained.remove(i);
            return true;
        }
        // Re-encode the frame without the task, keeping its seq.
        if let Ok(mut env) = Envelope::decode(&r.frame, usize::MAX)
            && let Message::Assign(a) = &mut env.message
        {
            a.tasks.retain(|t| t.lease != lease);
            r.frame = env.encode();
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn task(id: &str, input_bytes: usize) -> TaskAssignment {
        TaskAssignment {
            task_id: id.into(),
            attempt: 1,
            lease: format!("lease_{id}"),
            request_id: None,
            task_type: "txt2img".into(),
            priority: 0,
            deadline: None,
            model: None,
            input: json!({"prompt": "x".repeat(input_bytes)}),
        }
    }

    #[test]
    fn frames_fit_the_limit_and_suspects_go_alone_and_last() {
        let tasks = vec![
            task("a", 400),
            task("s", 10),
            task("b", 400),
            task("c", 400),
            task("big", 5000),
        ];
        let suspects: HashSet<String> = ["s".to_owned()].into();
        let (frames, refused) = pack(tasks, &suspects, 1500);
        let ids: Vec<Vec<&str>> = frames
            .iter()
            .map(|f| f.iter().map(|t| t.task_id.as_str()).collect())
            .collect();
        assert_eq!(ids, vec![vec!["a", "b"], vec!["c"], vec!["s"]]);
        assert_eq!(refused.len(), 1);
        assert_eq!(refused[0].task_id, "big");
        for f in frames {
            let frame = Envelope::new(Message::Assign(Assign { seq: 1, tasks: f }), now_ms())
                .from_source("gateway")
                .encode();
            assert!(frame.len() <= 1500, "frame of {} bytes", frame.len());
        }
    }
}
