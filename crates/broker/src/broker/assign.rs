//! Assignments that fail on the transport: frames packed to fit `max_frame_bytes`, the
//! refused or undelivered ones counted per task (`Queue::assign_failed`, dead-lettered as
//! `assign_failed` after `max_assign_failures` in a row), cancels of unacked assignments,
//! and oversized frames from workers.

use std::collections::HashSet;

use futures_util::{Sink, SinkExt};
use kiln_protocol::messages::*;
use kiln_protocol::{DecodeError, Envelope, Message};

use super::{Broker, SessionState, now_ms};
use crate::model::Completion;

/// A control frame sent to a worker and kept until acked.
pub(crate) struct Retained {
    /// Its control seq.
    pub(crate) seq: u64,
    /// The encoded frame.
    pub(crate) frame: String,
    /// `(lease, task_id)` of the tasks an `assign` carries; empty for other messages.
    pub(crate) tasks: Vec<(String, String)>,
}

impl Retained {
    fn is_assign(&self) -> bool {
        !self.tasks.is_empty()
    }
}

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
    let (fresh, suspect): (Vec<_>, Vec<_>) = tasks
        .into_iter()
        .partition(|t| !suspects.contains(&t.task_id));
    let mut frames: Vec<Vec<TaskAssignment>> = Vec::new();
    let mut refused = Vec::new();
    let mut current: Vec<TaskAssignment> = Vec::new();
    let mut len = base;
    for t in fresh {
        let size = serde_json::to_string(&t)
            .map(|s| s.len())
            .unwrap_or(usize::MAX);
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
        let size = serde_json::to_string(&t)
            .map(|s| s.len())
            .unwrap_or(usize::MAX);
        if base.saturating_add(size) > max {
            refused.push(t);
        } else {
            frames.push(vec![t]);
        }
    }
    (frames, refused)
}

/// The control frames a resuming worker did not receive (seq above its `last_seq`), oldest
/// first: `(seq, leases of an assign)`.
pub(super) struct Unreceived(Vec<(u64, Vec<String>)>);

impl Unreceived {
    /// Splits them into the frame the connection failed on — the first one, when it is an
    /// assign: its seq and its leases the worker does not claim — and the leases of the
    /// assigns replayed after it.
    pub(super) fn split(
        self,
        claimed: &HashSet<&String>,
    ) -> (Option<u64>, Vec<String>, HashSet<String>) {
        let mut frames = self.0.into_iter();
        let (seq, blamed) = match frames.next() {
            Some((seq, leases)) if !leases.is_empty() => (
                Some(seq),
                leases
                    .into_iter()
                    .filter(|l| !claimed.contains(l))
                    .collect(),
            ),
            _ => (None, Vec::new()),
        };
        let replayed = frames.flat_map(|(_, leases)| leases).collect();
        (seq, blamed, replayed)
    }
}

impl Broker {
    /// The control frames of the worker's session that a resuming `hello` says it did not
    /// receive.
    pub(super) fn unreceived(&self, hello: &Hello) -> Unreceived {
        let Some(resume) = &hello.resume else {
            return Unreceived(Vec::new());
        };
        let sessions = self.sessions();
        let frames = sessions
            .get(&hello.worker_id)
            .filter(|s| s.session == resume.session)
            .map(|s| {
                s.retained
                    .iter()
                    .filter(|r| r.seq > resume.last_seq)
                    .map(|r| (r.seq, r.tasks.iter().map(|(l, _)| l.clone()).collect()))
                    .collect()
            })
            .unwrap_or_default();
        Unreceived(frames)
    }

    fn suspects(&self) -> std::sync::MutexGuard<'_, HashSet<String>> {
        self.suspects.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Sends the assignments of one dispatch to `s` in frames that fit the frame limit.
    /// Returns the leases of tasks too large for any frame (the caller counts them as
    /// failed assignments; they are already out of `s.inflight`).
    pub(super) fn push_assignments(
        &self,
        s: &mut SessionState,
        tasks: Vec<TaskAssignment>,
    ) -> Vec<String> {
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
    pub(super) async fn assignments_failed(&self, worker_id: &str, leases: Vec<String>) {
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
    pub(super) fn take_refused(&self, worker_id: &str) -> Vec<String> {
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
    pub(super) async fn acked(&self, worker_id: &str, seq: u64) {
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
    pub(super) fn withdraw_unacked(&self, worker_id: &str, lease: &str) -> bool {
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

    /// A worker frame over `max_frame_bytes` (but read, under the hard limit): answered with
    /// an `oversized` error envelope, and the session goes on. An oversized `result` fails
    /// its attempt with `result_too_large` (not retried) and gets a `result_ack` refusing
    /// it, so the worker drops it from its outbox instead of resending it forever.
    pub(super) async fn oversized_frame<K: Sink<String> + Unpin>(
        &self,
        worker_id: &str,
        text: &str,
        err: &DecodeError,
        sink: &mut K,
    ) {
        tracing::warn!(message = "oversized frame from worker", worker_id = %worker_id, error = %err);
        let _ = sink
            .send(Envelope::error_reply(err, now_ms()).encode())
            .await;
        let Some(peek) = Envelope::peek(text) else {
            return;
        };
        let (Some(lease), "result") = (peek.lease, peek.kind.as_str()) else {
            return;
        };
        let error = TaskError::result_too_large(text.len(), self.cfg.max_frame_bytes);
        let reason = format!("{}: {}", error.code, error.message);
        self.free_lease(worker_id, &lease);
        if let Err(e) = self
            .queue
            .complete(&lease, Completion::Error(error), now_ms())
            .await
        {
            // Not acknowledged: the worker resends it, and it is answered again.
            tracing::warn!(message = "oversized result not stored", error = %e);
            return;
        }
        self.publish();
        let ack = Message::ResultAck(ResultAck {
            lease,
            accepted: false,
            reason: Some(reason),
        });
        let _ = sink
            .send(Envelope::new(ack, now_ms()).from_source("gateway").encode())
            .await;
        self.dispatch(worker_id).await;
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
