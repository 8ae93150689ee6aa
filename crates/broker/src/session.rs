//! A connected worker's session: its state in the session table, the read/write loop of
//! its connection after the welcome, and the handling of every frame a worker sends.

use std::collections::HashSet;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use futures_util::stream::FuturesUnordered;
use futures_util::{Sink, SinkExt, Stream, StreamExt};
use kiln_protocol::messages::*;
use kiln_protocol::{DecodeError, Envelope, Message, close};
use tokio::sync::mpsc;

use crate::broker::{Broker, SessionEnd, end, now_ms};
use crate::model::Completion;

/// Bad frames a connection may send before it is closed.
const MAX_BAD_FRAMES: u32 = 3;

/// Results a session stores at once, at most; its next frames wait meanwhile (a worker's
/// slots bound its results anyway).
const MAX_STORING: usize = 64;

/// A result being stored: yields the `result_ack` to send (`None`: not stored).
type Pending<'a> = Pin<Box<dyn Future<Output = Option<String>> + Send + 'a>>;

/// The results a session is storing.
type Storing<'a> = FuturesUnordered<Pending<'a>>;

/// What handling one received frame produced.
#[derive(Default)]
struct Handled<'a> {
    /// Frames to send.
    frames: Vec<String>,
    /// A result being stored.
    storing: Option<Pending<'a>>,
    /// The session ends.
    end: Option<SessionEnd>,
}

impl Handled<'_> {
    fn frames(frames: Vec<String>) -> Self {
        Self {
            frames,
            ..Self::default()
        }
    }
}

/// What the broker hands a session's connection to send.
pub(crate) enum Outbound {
    Frame(String),
    Close(SessionEnd),
}

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
    pub(crate) fn is_assign(&self) -> bool {
        !self.tasks.is_empty()
    }
}

/// A worker's entry in the session table (kept for a lease after it disconnects, so that
/// it can resume).
pub(crate) struct SessionState {
    pub(crate) session: String,
    pub(crate) boot_id: String,
    pub(crate) capabilities: Capabilities,
    pub(crate) slots: u32,
    pub(crate) inflight: HashSet<String>,
    /// Control frames sent and not yet acked, oldest first.
    pub(crate) retained: Vec<Retained>,
    pub(crate) next_seq: u64,
    /// Credits taken by a `reserve` still running.
    pub(crate) reserving: usize,
    /// A new hello for this worker is being registered: assign nothing more here.
    pub(crate) replacing: bool,
    pub(crate) tx: Option<mpsc::UnboundedSender<Outbound>>,
    pub(crate) conn_id: u64,
    pub(crate) draining: bool,
    pub(crate) last_seen: u64,
    pub(crate) last_renew: u64,
    pub(crate) disconnected_at: Option<u64>,
    pub(crate) gpu: Option<GpuStats>,
}

impl SessionState {
    pub(crate) fn free(&self) -> usize {
        (self.slots as usize).saturating_sub(self.inflight.len() + self.reserving)
    }

    /// Queues a control message (`assign`, `cancel`, `drain`) with the next seq; kept until
    /// acked so it can be replayed on resume.
    pub(crate) fn push_control(&mut self, build: impl FnOnce(u64) -> Message) {
        let seq = self.next_seq;
        self.next_seq += 1;
        let message = build(seq);
        let tasks = match &message {
            Message::Assign(a) => a
                .tasks
                .iter()
                .map(|t| (t.lease.clone(), t.task_id.clone()))
                .collect(),
            _ => Vec::new(),
        };
        let frame = gateway_frame(message);
        self.retained.push(Retained {
            seq,
            frame: frame.clone(),
            tasks,
        });
        if let Some(tx) = &self.tx {
            let _ = tx.send(Outbound::Frame(frame));
        }
    }
}

/// A message from the gateway, encoded.
pub(crate) fn gateway_frame(message: Message) -> String {
    Envelope::new(message, now_ms())
        .from_source("gateway")
        .encode()
}

impl Broker {
    /// Runs one worker connection until it ends. `frames` yields the text frames received,
    /// `sink` takes the text frames to send. Returns the close the transport should send.
    pub async fn serve_session<S, K, E>(self: Arc<Self>, mut frames: S, mut sink: K) -> SessionEnd
    where
        S: Stream<Item = Result<String, E>> + Unpin,
        K: Sink<String> + Unpin,
        E: std::fmt::Display,
    {
        let mut conn = match self.hello_phase(&mut frames, &mut sink).await {
            Ok(c) => c,
            Err(end) => return end,
        };
        let outcome = self
            .run_session(&conn.worker_id, &mut frames, &mut sink, &mut conn.rx)
            .await;
        self.disconnect(&conn.worker_id, conn.conn_id, outcome)
    }

    /// The loop of a welcomed connection: frames in, control frames out, dispatch when the
    /// queue changes, and the `dead_after` silence timer. Results are stored while the loop
    /// goes on reading (results that arrive together commit together); what one turn of the
    /// loop sends goes out in one write.
    async fn run_session<S, K, E>(
        &self,
        worker_id: &str,
        frames: &mut S,
        sink: &mut K,
        rx: &mut mpsc::UnboundedReceiver<Outbound>,
    ) -> SessionEnd
    where
        S: Stream<Item = Result<String, E>> + Unpin,
        K: Sink<String> + Unpin,
        E: std::fmt::Display,
    {
        self.dispatch(worker_id).await;
        let mut wake = self.wake.subscribe();
        let mut bad_frames = 0u32;
        let dead_after = self.cfg.dead_after;
        let mut silence = Box::pin(tokio::time::sleep(dead_after));
        let mut storing: Storing<'_> = FuturesUnordered::new();
        loop {
            tokio::select! {
                frame = frames.next(), if storing.len() < MAX_STORING => {
                    let text = match frame {
                        Some(Ok(t)) => t,
                        Some(Err(e)) => return end(1006, format!("transport error: {e}")),
                        None => return end(1006, "connection closed".into()),
                    };
                    silence.as_mut().reset(tokio::time::Instant::now() + dead_after);
                    let got = self.on_frame(worker_id, &text, &mut bad_frames).await;
                    for f in got.frames {
                        if sink.feed(f).await.is_err() {
                            return end(1006, "send failed".into());
                        }
                    }
                    storing.extend(got.storing);
                    if let Some(end) = got.end {
                        let _ = sink.flush().await;
                        return end;
                    }
                }
                Some(ack) = storing.next(), if !storing.is_empty() => {
                    if let Some(f) = ack && sink.feed(f).await.is_err() {
                        return end(1006, "send failed".into());
                    }
                }
                out = rx.recv() => match out {
                    Some(Outbound::Frame(f)) => {
                        if sink.feed(f).await.is_err() {
                            return end(1006, "send failed".into());
                        }
                    }
                    Some(Outbound::Close(e)) => {
                        let _ = sink.flush().await;
                        return e;
                    }
                    None => return end(1011, "session dropped".into()),
                },
                changed = wake.changed() => {
                    if changed.is_err() { return end(close::RESTART, "gateway stopping".into()); }
                    self.dispatch(worker_id).await;
                }
                _ = &mut silence => return end(close::HEARTBEAT_TIMEOUT, "no frame within dead_after".into()),
            }
            // Control frames queued meanwhile (the assignments of a dispatch) go out in the
            // same write as what this turn fed.
            while let Ok(out) = rx.try_recv() {
                match out {
                    Outbound::Frame(f) => {
                        if sink.feed(f).await.is_err() {
                            return end(1006, "send failed".into());
                        }
                    }
                    Outbound::Close(e) => {
                        let _ = sink.flush().await;
                        return e;
                    }
                }
            }
            if sink.flush().await.is_err() {
                return end(1006, "send failed".into());
            }
        }
    }

    /// Decodes and handles one received frame.
    async fn on_frame<'a>(
        &'a self,
        worker_id: &'a str,
        text: &str,
        bad_frames: &mut u32,
    ) -> Handled<'a> {
        match Envelope::decode(text, self.cfg.max_frame_bytes) {
            Ok(env) => self.handle(worker_id, env).await,
            Err(e @ DecodeError::Oversized { .. }) => {
                // Read whole (under the transport's hard limit): answered, not counted as a
                // protocol violation.
                Handled::frames(self.oversized_frame(worker_id, text, &e).await)
            }
            Err(e) if e.is_fatal() => Handled {
                end: Some(end(close::VERSION, e.to_string())),
                ..Handled::default()
            },
            Err(e) => {
                *bad_frames += 1;
                tracing::warn!(message = "bad frame from worker", worker_id = %worker_id, error = %e);
                Handled {
                    frames: vec![Envelope::error_reply(&e, now_ms()).encode()],
                    storing: None,
                    end: (*bad_frames >= MAX_BAD_FRAMES)
                        .then(|| end(close::PROTOCOL, format!("too many bad frames; last: {e}"))),
                }
            }
        }
    }

    /// Handles one frame from a worker: a result starts being stored (its `result_ack`
    /// comes when it is); other frames are handled at once.
    async fn handle<'a>(&'a self, worker_id: &'a str, env: Envelope) -> Handled<'a> {
        let now = now_ms();
        // A heartbeat renews below and reports the time; other frames renew through touch.
        let renew = !matches!(env.message, Message::Heartbeat(_));
        self.touch(worker_id, now, renew).await;
        let mut out = Handled::default();
        match env.message {
            Message::Ack(Ack { seq }) => self.acked(worker_id, seq).await,
            Message::Heartbeat(hb) => out.frames.push(self.on_heartbeat(worker_id, hb, now).await),
            Message::Progress(p) => self.on_progress(worker_id, p, now).await,
            Message::Preview(p) => self.preview(worker_id, p, now).await,
            Message::Result(r) => out.storing = Some(Box::pin(self.on_result(worker_id, r, now))),
            Message::Reject(r) => self.on_reject(worker_id, r, now).await,
            Message::Release(r) => self.on_release(worker_id, r, now).await,
            Message::Bye(b) => out.end = Some(end(1000, format!("bye: {}", b.reason))),
            Message::Error => {
                tracing::warn!(message = "worker reported an error", worker_id = %worker_id, error = ?env.error, error_msg = ?env.error_msg);
                if env.error.as_deref() == Some("oversized") {
                    // The worker could not take the oldest unacked assign.
                    let refused = self.take_refused(worker_id);
                    self.assignments_failed(worker_id, refused).await;
                }
            }
            other => {
                let e = DecodeError::UnknownType(format!(
                    "{} is not sent by workers",
                    other.type_name()
                ));
                out.frames.push(Envelope::error_reply(&e, now).encode());
            }
        }
        out
    }

    /// Renews the worker's leases; returns the `hb_ack` to send.
    async fn on_heartbeat(&self, worker_id: &str, hb: Heartbeat, now: u64) -> String {
        self.acked(worker_id, hb.ack_seq).await;
        if let Some(s) = self.sessions().get_mut(worker_id) {
            s.gpu = hb.gpu;
            s.last_renew = now;
        }
        let until = now + self.cfg.lease.as_millis() as u64;
        if let Err(e) = self.queue.renew(worker_id, until).await {
            tracing::warn!(message = "lease renewal failed", error = %e);
        }
        gateway_frame(Message::HeartbeatAck(HeartbeatAck {
            renewed_until: until,
        }))
    }

    async fn on_progress(&self, worker_id: &str, p: Progress, now: u64) {
        let data = self.previews.progress(&p);
        if let Err(e) = self
            .queue
            .progress(&p.lease, Some(worker_id), data, now)
            .await
        {
            tracing::warn!(message = "progress not stored", error = %e);
        }
        self.publish();
    }

    /// Stores a result; returns the `result_ack` to send (`None`: not stored, so not
    /// acknowledged).
    async fn on_result(&self, worker_id: &str, r: TaskResult, now: u64) -> Option<String> {
        if let Some(t) = r.timings.as_ref().filter(|t| !t.is_empty())
            && let Err(e) = self
                .queue
                .record_worker_timings(&r.lease, Some(worker_id), t)
                .await
        {
            tracing::warn!(message = "worker timings not stored", error = %e);
        }
        let completion = match r.status {
            ResultStatus::Ok => Completion::Ok(r.output.unwrap_or(serde_json::Value::Null)),
            ResultStatus::Cancelled => Completion::Cancelled,
            ResultStatus::Error => Completion::Error(r.error.unwrap_or(TaskError {
                code: "unknown".into(),
                message: "the worker reported an error without details".into(),
                retryable: false,
            })),
        };
        // The worker's slot is free once it sent the result, whether or not the store takes
        // it: the next tasks are reserved while the result is stored, and the store commits
        // both together.
        self.free_lease(worker_id, &r.lease);
        let (stored, ()) = tokio::join!(
            self.queue.complete_as(worker_id, &r.lease, completion, now),
            self.dispatch(worker_id)
        );
        let (accepted, reason) = match stored {
            Ok(o) => (o.accepted, o.reason),
            Err(e) => {
                // Not acknowledged: the worker keeps it in its outbox and resends.
                tracing::warn!(message = "result not stored", error = %e);
                return None;
            }
        };
        self.publish();
        Some(gateway_frame(Message::ResultAck(ResultAck {
            lease: r.lease,
            accepted,
            reason,
        })))
    }

    async fn on_reject(&self, worker_id: &str, r: Reject, now: u64) {
        let res = if r.retryable {
            // This worker is not offered the task again for the back-off.
            let until = now.saturating_add(self.cfg.reject_backoff.as_millis() as u64);
            let why = format!("rejected: {}", r.reason);
            self.queue
                .reject(&r.lease, Some(worker_id), &why, until, now)
                .await
                .map(|_| ())
        } else {
            let err = TaskError {
                code: "rejected".into(),
                message: r.reason,
                retryable: false,
            };
            self.queue
                .complete_as(worker_id, &r.lease, Completion::Error(err), now)
                .await
                .map(|_| ())
        };
        if let Err(e) = res {
            tracing::warn!(message = "reject not stored", error = %e);
        }
        self.publish();
        self.free_lease(worker_id, &r.lease);
        self.dispatch(worker_id).await;
    }

    async fn on_release(&self, worker_id: &str, r: Release, now: u64) {
        if let Err(e) = self
            .queue
            .release(&r.lease, Some(worker_id), "released by worker", now)
            .await
        {
            tracing::warn!(message = "release not stored", error = %e);
        }
        self.publish();
        self.free_lease(worker_id, &r.lease);
        self.wake_dispatch();
    }

    /// A worker frame over `max_frame_bytes` (but read, under the hard limit): answered with
    /// an `oversized` error envelope, and the session goes on. An oversized `result` fails
    /// its attempt with `result_too_large` (not retried) and gets a `result_ack` refusing
    /// it, so the worker drops it from its outbox instead of resending it forever.
    /// A worker frame over `max_frame_bytes` (but read, under the hard limit): answered with
    /// an `oversized` error envelope, and the session goes on. An oversized `result` fails
    /// its attempt with `result_too_large` (not retried) and gets a `result_ack` refusing
    /// it, so the worker drops it from its outbox instead of resending it forever. Returns
    /// the frames to send.
    async fn oversized_frame(&self, worker_id: &str, text: &str, err: &DecodeError) -> Vec<String> {
        tracing::warn!(message = "oversized frame from worker", worker_id = %worker_id, error = %err);
        let mut out = vec![Envelope::error_reply(err, now_ms()).encode()];
        let Some(peek) = Envelope::peek(text) else {
            return out;
        };
        let (Some(lease), "result") = (peek.lease, peek.kind.as_str()) else {
            return out;
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
            return out;
        }
        self.publish();
        out.push(gateway_frame(Message::ResultAck(ResultAck {
            lease,
            accepted: false,
            reason: Some(reason),
        })));
        self.dispatch(worker_id).await;
        out
    }

    async fn touch(&self, worker_id: &str, now: u64, renew_leases: bool) {
        let renew = {
            let mut sessions = self.sessions();
            let Some(s) = sessions.get_mut(worker_id) else {
                return;
            };
            s.last_seen = now;
            // Any frame renews the session's leases, at most twice per heartbeat interval.
            let due = renew_leases
                && now.saturating_sub(s.last_renew)
                    >= (self.cfg.heartbeat.as_millis() as u64 / 2).max(1);
            if due {
                s.last_renew = now;
            }
            due
        };
        if renew
            && let Err(e) = self
                .queue
                .renew(worker_id, now + self.cfg.lease.as_millis() as u64)
                .await
        {
            tracing::warn!(message = "lease renewal failed", error = %e);
        }
    }

    pub(crate) fn free_lease(&self, worker_id: &str, lease: &str) {
        self.previews.forget(lease);
        if let Some(s) = self.sessions().get_mut(worker_id) {
            s.inflight.remove(lease);
        }
    }

    /// The connection `conn_id` of `worker_id` ended with `outcome`: its session stays in
    /// the table (resumable for a lease) unless a newer connection took it over.
    pub(crate) fn disconnect(
        &self,
        worker_id: &str,
        conn_id: u64,
        outcome: SessionEnd,
    ) -> SessionEnd {
        if let Some(s) = self.sessions().get_mut(worker_id)
            && s.conn_id == conn_id
        {
            s.tx = None;
            s.disconnected_at = Some(now_ms());
        }
        tracing::info!(message = "worker disconnected", worker_id = %worker_id, code = outcome.code, reason = %outcome.reason);
        outcome
    }
}
