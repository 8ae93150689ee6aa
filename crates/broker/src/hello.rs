//! The hello phase of a session: the first frame must be `hello`; its ids are checked, the
//! worker's identity is proven against the secret the store keeps, the hello is registered
//! (resume, restart or fresh session) and answered with `welcome` and the control frames to
//! replay.

use std::collections::HashSet;
use std::sync::atomic::Ordering;

use futures_util::{Sink, SinkExt, Stream, StreamExt};
use kiln_protocol::messages::*;
use kiln_protocol::{Envelope, Message, close};
use sha2::{Digest, Sha256};
use tokio::sync::mpsc;

use crate::broker::{Broker, SessionEnd, end, now_ms};
use crate::model::QueueError;
use crate::session::{Outbound, SessionState, gateway_frame};

/// A welcomed connection, handed to the session loop.
pub(crate) struct Connected {
    pub(crate) worker_id: String,
    pub(crate) conn_id: u64,
    /// Control frames and closes for this connection.
    pub(crate) rx: mpsc::UnboundedReceiver<Outbound>,
}

/// What the session table held for a worker when its new hello arrived: boot id, session
/// id and the leases it ran.
type Previous = (String, String, HashSet<String>);

/// The control frames a resuming worker did not receive (seq above its `last_seq`), oldest
/// first: `(seq, leases of an assign)`.
struct Unreceived(Vec<(u64, Vec<String>)>);

impl Unreceived {
    /// Splits them into the frame the connection failed on — the first one, when it is an
    /// assign: its seq and its leases the worker does not claim — and the leases of the
    /// assigns replayed after it.
    fn split(self, claimed: &HashSet<&String>) -> (Option<u64>, Vec<String>, HashSet<String>) {
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

/// The close for a hello the store could not answer: try again in a second.
fn store_unavailable(e: &QueueError) -> SessionEnd {
    end(
        close::TRY_LATER,
        close::reason_with_retry_after(&format!("queue store: {e}"), 1000),
    )
}

impl Broker {
    /// Reads and answers the hello of a new connection. `Err` is the close to send; once
    /// the hello is registered, a failed send also disconnects the session.
    pub(crate) async fn hello_phase<S, K, E>(
        &self,
        frames: &mut S,
        sink: &mut K,
    ) -> Result<Connected, SessionEnd>
    where
        S: Stream<Item = Result<String, E>> + Unpin,
        K: Sink<String> + Unpin,
    {
        let hello = self.read_hello(frames).await?;
        let issued = self.admit(&hello).await?;
        let worker_id = hello.worker_id.clone();
        let (tx, rx) = mpsc::unbounded_channel::<Outbound>();
        let conn_id = self.conn_ids.fetch_add(1, Ordering::Relaxed);
        let (mut welcome, replay) = self
            .register(&hello, tx, conn_id)
            .await
            .map_err(|e| store_unavailable(&e))?;
        welcome.worker_secret = issued;
        tracing::info!(message = "worker connected", worker_id = %worker_id, boot_id = %hello.boot_id, resumed = welcome.resumed, keep = welcome.keep.len(), drop = welcome.drop.len());
        // Remembered so that its task types are accepted while it is offline.
        if let Err(e) = self
            .queue
            .note_task_types(&hello.capabilities.task_types, now_ms())
            .await
        {
            tracing::warn!(message = "task types of a worker not recorded", worker_id = %worker_id, error = %e);
        }
        let welcome = gateway_frame(Message::Welcome(welcome));
        for f in std::iter::once(welcome).chain(replay) {
            if sink.send(f).await.is_err() {
                return Err(self.disconnect(&worker_id, conn_id, end(1006, "send failed".into())));
            }
        }
        Ok(Connected {
            worker_id,
            conn_id,
            rx,
        })
    }

    /// The first frame, which must be a `hello` within `hello_timeout`.
    async fn read_hello<S, E>(&self, frames: &mut S) -> Result<Hello, SessionEnd>
    where
        S: Stream<Item = Result<String, E>> + Unpin,
    {
        let text = match tokio::time::timeout(self.cfg.hello_timeout, frames.next()).await {
            Ok(Some(Ok(text))) => text,
            Ok(_) => return Err(end(1000, "closed before hello".into())),
            Err(_) => {
                return Err(end(
                    close::PROTOCOL,
                    "no hello within the hello timeout".into(),
                ));
            }
        };
        match Envelope::decode(&text, self.cfg.max_frame_bytes) {
            Ok(Envelope {
                message: Message::Hello(h),
                ..
            }) => Ok(h),
            Ok(other) => Err(end(
                close::PROTOCOL,
                format!(
                    "first frame must be hello, got {}",
                    other.message.type_name()
                ),
            )),
            Err(e) if e.is_fatal() => Err(end(close::VERSION, e.to_string())),
            Err(e) => Err(end(close::PROTOCOL, e.to_string())),
        }
    }

    /// Checks the hello's ids and proves its identity. Returns the secret issued now, if
    /// any.
    async fn admit(&self, hello: &Hello) -> Result<Option<String>, SessionEnd> {
        for (field, id) in [("worker_id", &hello.worker_id), ("boot_id", &hello.boot_id)] {
            if let Err(why) = check_id(id) {
                tracing::warn!(message = "hello refused", field, error = %why);
                return Err(end(close::PROTOCOL, format!("invalid {field}: {why}")));
            }
        }
        match self.prove_identity(hello).await {
            Ok(Ok(issued)) => Ok(issued),
            Ok(Err(why)) => {
                tracing::warn!(message = "hello refused: worker identity not proven", worker_id = %hello.worker_id, boot_id = %hello.boot_id, reason = why);
                Err(end(close::IDENTITY, why.into()))
            }
            Err(e) => Err(store_unavailable(&e)),
        }
    }

    /// Checks the hello's `worker_secret` against the one issued to its `worker_id`, before
    /// anything about a connected session changes. `Ok(Ok(Some(secret)))`: first
    /// registration, `secret` was issued now (sent in `welcome`); `Ok(Ok(None))`: proven (or
    /// a presented secret adopted because none was stored); `Ok(Err(why))`: refused.
    async fn prove_identity(
        &self,
        hello: &Hello,
    ) -> Result<Result<Option<String>, &'static str>, QueueError> {
        let id = &hello.worker_id;
        let presented = hello.worker_secret.as_deref().filter(|s| !s.is_empty());
        if presented.is_some_and(|s| s.len() > 256) {
            return Ok(Err("worker_secret longer than 256 bytes"));
        }
        for _ in 0..2 {
            if let Some(stored) = self.queue.identity(id).await? {
                return Ok(match presented {
                    Some(s) if same_digest(&sha256_hex(s), &stored) => Ok(None),
                    Some(_) => Err("wrong worker_secret for this worker_id"),
                    None => {
                        Err("this worker_id is registered: the hello must carry its worker_secret")
                    }
                });
            }
            let (secret, issued) = match presented {
                Some(s) => (s.to_owned(), None),
                None => {
                    let s = format!(
                        "wks_{}{}",
                        uuid::Uuid::new_v4().simple(),
                        uuid::Uuid::new_v4().simple()
                    );
                    (s.clone(), Some(s))
                }
            };
            if self
                .queue
                .set_identity(id, &sha256_hex(&secret), now_ms())
                .await?
            {
                tracing::info!(message = "worker registered", worker_id = %id, issued = issued.is_some());
                return Ok(Ok(issued));
            }
            // Another hello registered this id meanwhile: check against its secret.
        }
        Ok(Err("this worker_id was registered concurrently"))
    }

    /// Forgets the secret issued to `worker_id` (an operator's reset after a worker lost its
    /// state dir): its next hello registers afresh. Returns whether one was stored.
    pub async fn forget_identity(&self, worker_id: &str) -> Result<bool, QueueError> {
        let forgot = self.queue.forget_identity(worker_id).await?;
        tracing::warn!(message = "worker identity forgotten", worker_id = %worker_id, forgot);
        Ok(forgot)
    }

    /// Registers a hello: resume, restart or fresh session. Returns the welcome and the
    /// control frames to replay.
    async fn register(
        &self,
        hello: &Hello,
        tx: mpsc::UnboundedSender<Outbound>,
        conn_id: u64,
    ) -> Result<(Welcome, Vec<String>), QueueError> {
        let previous = self.close_previous(hello);
        let unreceived = self.unreceived(hello);
        let resumable = match (&previous, &hello.resume) {
            (Some((boot, session, _)), Some(r)) => *boot == hello.boot_id && *session == r.session,
            _ => false,
        };
        // The worker holds the leases it runs and those whose result waits in its outbox (the
        // result follows the welcome): neither is given back, or a finished task would run
        // again.
        let claimed: HashSet<&String> = hello.inflight.iter().chain(&hello.outbox).collect();
        match previous {
            Some((_, session, inflight)) if resumable => {
                self.register_resume(
                    hello, &session, &inflight, unreceived, &claimed, tx, conn_id,
                )
                .await
            }
            previous => {
                self.register_fresh(hello, previous, claimed, tx, conn_id)
                    .await
            }
        }
    }

    /// The previous session stays in place while the store is asked, so that cancels sent
    /// meanwhile are retained; its connection is closed now and it assigns nothing.
    fn close_previous(&self, hello: &Hello) -> Option<Previous> {
        let now = now_ms();
        let worker_id = &hello.worker_id;
        let mut sessions = self.sessions();
        sessions.get_mut(worker_id).map(|p| {
            if p.tx.is_some() && p.boot_id != hello.boot_id {
                tracing::warn!(message = "worker session taken over", worker_id = %worker_id, old_boot_id = %p.boot_id, new_boot_id = %hello.boot_id, old_session = %p.session);
            }
            if let Some(old) = p.tx.take() {
                let _ = old.send(Outbound::Close(SessionEnd {
                    code: close::REPLACED,
                    reason: "replaced by a newer session".into(),
                }));
            }
            p.disconnected_at.get_or_insert(now);
            (p.boot_id.clone(), p.session.clone(), p.inflight.clone())
        })
    }

    /// The control frames of the worker's session that a resuming `hello` says it did not
    /// receive.
    fn unreceived(&self, hello: &Hello) -> Unreceived {
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

    /// A hello resuming the session it names: the store forgets the leases the worker no
    /// longer has, and the session takes the new connection.
    #[allow(clippy::too_many_arguments)]
    async fn register_resume(
        &self,
        hello: &Hello,
        session: &str,
        inflight: &HashSet<String>,
        unreceived: Unreceived,
        claimed: &HashSet<&String>,
        tx: mpsc::UnboundedSender<Outbound>,
        conn_id: u64,
    ) -> Result<(Welcome, Vec<String>), QueueError> {
        let now = now_ms();
        let worker_id = &hello.worker_id;
        // The first control frame the worker did not receive is the one its connection
        // failed on: when it is an assign, that assignment failed (counted; the task is
        // queued again and the frame not replayed). Later ones are replayed.
        let (blamed_seq, blamed, replayed) = unreceived.split(claimed);
        // Leases the worker no longer has go back to the queue.
        let lost: Vec<&String> = inflight
            .iter()
            .filter(|l| !claimed.contains(l) && !replayed.contains(*l) && !blamed.contains(*l))
            .collect();
        for l in &lost {
            self.queue
                .release(l, None, "worker no longer holds the lease", now)
                .await?;
        }
        self.queue
            .renew(worker_id, now + self.cfg.lease.as_millis() as u64)
            .await?;
        let resumed = self.resume_session(hello, session, tx, conn_id, &lost, &blamed, blamed_seq);
        self.publish();
        if resumed.is_ok() {
            self.assignments_failed(worker_id, blamed).await;
        }
        resumed
    }

    /// The session's state after a resuming `hello`, with the welcome and the frames to
    /// replay.
    #[allow(clippy::too_many_arguments)]
    fn resume_session(
        &self,
        hello: &Hello,
        session: &str,
        tx: mpsc::UnboundedSender<Outbound>,
        conn_id: u64,
        lost: &[&String],
        blamed: &[String],
        blamed_seq: Option<u64>,
    ) -> Result<(Welcome, Vec<String>), QueueError> {
        let now = now_ms();
        let worker_id = &hello.worker_id;
        let mut sessions = self.sessions();
        let Some(s) = sessions
            .get_mut(worker_id)
            .filter(|s| s.session == *session)
        else {
            return Err(QueueError::Unavailable(
                "another hello for this worker arrived meanwhile".into(),
            ));
        };
        for l in lost.iter().copied().chain(blamed) {
            s.inflight.remove(l);
        }
        let last = hello.resume.as_ref().map(|r| r.last_seq).unwrap_or(0);
        s.retained
            .retain(|r| r.seq > last && Some(r.seq) != blamed_seq);
        let replay: Vec<String> = s.retained.iter().map(|r| r.frame.clone()).collect();
        let keep: Vec<String> = hello
            .inflight
            .iter()
            .chain(&hello.outbox)
            .filter(|l| s.inflight.contains(*l))
            .cloned()
            .collect();
        s.tx = Some(tx);
        s.conn_id = conn_id;
        s.slots = hello.slots;
        s.capabilities = hello.capabilities.clone();
        s.last_seen = now;
        s.disconnected_at = None;
        let welcome = self.welcome(s.session.clone(), true, keep, hello, &s.inflight);
        Ok((welcome, replay))
    }

    /// A new session, after a restart or a hello the gateway cannot resume.
    async fn register_fresh(
        &self,
        hello: &Hello,
        previous: Option<Previous>,
        claimed: HashSet<&String>,
        tx: mpsc::UnboundedSender<Outbound>,
        conn_id: u64,
    ) -> Result<(Welcome, Vec<String>), QueueError> {
        let now = now_ms();
        let worker_id = &hello.worker_id;
        // Not a resume: a dispatch still running for the old session hands its leases back.
        if let Some(p) = self.sessions().get_mut(worker_id) {
            p.replacing = true;
        }
        let (keep, inflight) = self.settle_leases(hello, previous, claimed).await?;
        let session = format!("sess_{}", uuid::Uuid::new_v4().simple());
        let welcome = self.welcome(session.clone(), false, keep, hello, &inflight);
        self.sessions().insert(
            worker_id.clone(),
            SessionState {
                session,
                boot_id: hello.boot_id.clone(),
                capabilities: hello.capabilities.clone(),
                slots: hello.slots,
                inflight,
                retained: Vec::new(),
                next_seq: 1,
                reserving: 0,
                replacing: false,
                tx: Some(tx),
                conn_id,
                draining: false,
                last_seen: now,
                last_renew: now,
                disconnected_at: None,
                gpu: None,
            },
        );
        self.publish();
        self.wake_dispatch();
        Ok((welcome, Vec::new()))
    }

    /// What a fresh session keeps of the leases the store holds for the worker. Returns the
    /// kept leases, in the store's order and as a set.
    ///
    /// The queue's lease table decides: with the same boot (gateway restarted, or resume
    /// data lost) leases it still runs or holds a result for are kept; a new boot keeps only
    /// the leases whose results survived in its outbox (they are sent right after the
    /// welcome) and releases the rest of what the old process held, and those lost attempts
    /// count (a task that crashes its worker every time ends dead-lettered).
    async fn settle_leases(
        &self,
        hello: &Hello,
        previous: Option<Previous>,
        claimed: HashSet<&String>,
    ) -> Result<(Vec<String>, HashSet<String>), QueueError> {
        let now = now_ms();
        let worker_id = &hello.worker_id;
        let restarted = match &previous {
            Some((boot, _, _)) => *boot != hello.boot_id,
            // No session here (this gateway restarted, the worker was on another instance, or
            // it was gone longer than a lease): a hello with no session to resume and nothing
            // running or unsent comes from a new process, so what the store still leases to
            // this worker belonged to an earlier boot.
            None => hello.resume.is_none() && hello.inflight.is_empty() && hello.outbox.is_empty(),
        };
        // A new boot holds only what its outbox names; the same boot also what it runs.
        let held: HashSet<&String> = if restarted {
            self.queue
                .release_worker(worker_id, &hello.outbox, now)
                .await?;
            hello.outbox.iter().collect()
        } else {
            claimed
        };
        // What the store still leases to this worker and it holds is kept, and tracked so
        // that the arriving result frees its slot. Anything else (after a restart: reserved
        // meanwhile for the replaced session) goes back without counting.
        let mut keep = Vec::new();
        let mut inflight = HashSet::new();
        for (lease, _) in self.queue.leases_of(worker_id).await? {
            if held.contains(&lease) {
                keep.push(lease.clone());
                inflight.insert(lease);
            } else {
                self.queue
                    .release(&lease, None, "worker no longer holds the lease", now)
                    .await?;
            }
        }
        self.queue
            .renew(worker_id, now + self.cfg.lease.as_millis() as u64)
            .await?;
        Ok((keep, inflight))
    }

    /// The `welcome` for a session that tracks `inflight`: the worker drops the leases it
    /// runs that are not in it.
    fn welcome(
        &self,
        session: String,
        resumed: bool,
        keep: Vec<String>,
        hello: &Hello,
        inflight: &HashSet<String>,
    ) -> Welcome {
        let dropped: Vec<String> = hello
            .inflight
            .iter()
            .filter(|l| !inflight.contains(*l))
            .cloned()
            .collect();
        Welcome {
            session,
            timers: Timers {
                heartbeat_ms: self.cfg.heartbeat.as_millis() as u64,
                lease_ms: self.cfg.lease.as_millis() as u64,
                dead_after_ms: self.cfg.dead_after.as_millis() as u64,
            },
            max_frame_bytes: Some(self.cfg.max_frame_bytes as u64),
            resumed,
            keep,
            drop: dropped,
            worker_secret: None,
        }
    }
}

fn sha256_hex(s: &str) -> String {
    hex::encode(Sha256::digest(s.as_bytes()))
}

/// Compares two digests in time independent of where they differ.
fn same_digest(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
}
