//! One connection to the gateway: open the socket, `hello` / `welcome` (identity, resume,
//! the gateway's limits), resend the outbox, then one loop that reads the gateway's frames,
//! writes what the tasks send, heartbeats, and drains on shutdown.

use std::path::Path;
use std::time::Instant;

use futures_util::{SinkExt, StreamExt};
use kiln_protocol::messages::{
    Ack, Bye, Capabilities, Heartbeat, Hello, Release, Resume as ResumeFrame, Welcome,
};
use kiln_protocol::{Envelope, Message, close};
use rand::Rng;
use tokio::net::TcpStream;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant as Deadline;
use tokio_tungstenite::tungstenite::{self, client::IntoClientRequest};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use crate::config::WorkerConfig;
use crate::runner::{Shared, lock};

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// How a connection ended.
pub(crate) enum Ended {
    /// Shut down or drained: the worker stops.
    Done,
    /// Closed (by either side, or lost): the worker reconnects unless the code says not to.
    Closed { code: u16, reason: String },
}

fn closed(code: u16, reason: impl Into<String>) -> Ended {
    Ended::Closed {
        code,
        reason: reason.into(),
    }
}

fn lost(reason: impl Into<String>) -> Ended {
    closed(1006, reason)
}

/// What the worker keeps across its connections to resume: the session and its last seq,
/// and the worker secret the gateway issued.
pub(crate) struct Resume {
    pub(crate) session: Option<(String, u64)>,
    pub(crate) secret: Option<String>,
}

/// One connection of the worker `w`.
pub(crate) struct Conn<'a> {
    pub(crate) w: &'a Shared,
}

/// The session loop's own state.
struct Live {
    draining: bool,
    drain_started: Option<Instant>,
    hb_ms: u64,
    next_hb: Deadline,
    /// When the `hb_ack` of the last heartbeat sent is due, while none came.
    ack_due: Option<Deadline>,
}

impl Conn<'_> {
    fn frame(&self, m: Message) -> tungstenite::Message {
        tungstenite::Message::Text(
            Envelope::new(m, kiln_protocol::now_ms())
                .from_source(&self.w.source)
                .encode()
                .into(),
        )
    }

    async fn send(&self, ws: &mut Ws, m: Message) -> Result<(), Ended> {
        ws.send(self.frame(m))
            .await
            .map_err(|_| lost("send failed"))
    }

    /// Queues a frame for the next flush: what one turn of the session loop sends goes out
    /// in one write.
    async fn feed(&self, ws: &mut Ws, m: Message) -> Result<(), Ended> {
        ws.feed(self.frame(m))
            .await
            .map_err(|_| lost("send failed"))
    }

    pub(crate) async fn run(
        &self,
        resume: &mut Resume,
        out_rx: &mut mpsc::UnboundedReceiver<Message>,
        stop: &mut watch::Receiver<bool>,
    ) -> Ended {
        let mut ws = match connect(&self.w.cfg).await {
            Ok(ws) => ws,
            Err(e) => return e,
        };
        let welcome = match self.handshake(&mut ws, resume).await {
            Ok(w) => w,
            Err(e) => return e,
        };
        let draining = *stop.borrow();
        let hb_ms = welcome.timers.heartbeat_ms.max(50);
        let mut live = Live {
            draining,
            drain_started: draining.then(Instant::now),
            hb_ms,
            next_hb: Deadline::now() + jitter(hb_ms),
            ack_due: None,
        };
        self.serve(&mut ws, &mut live, resume, out_rx, stop).await
    }

    /// `hello`, `welcome`, and the outbox resent under the gateway's limit.
    async fn handshake(&self, ws: &mut Ws, resume: &mut Resume) -> Result<Welcome, Ended> {
        let pending = self.w.outbox.all();
        let hello = Hello {
            worker_id: self.w.worker_id.clone(),
            boot_id: self.w.boot_id.clone(),
            capabilities: Capabilities {
                task_types: self.w.task_types(),
                models: self.w.cfg.models.clone(),
                labels: self.w.cfg.labels.clone(),
            },
            slots: self.w.cfg.slots,
            resume: resume.session.as_ref().map(|(s, seq)| ResumeFrame {
                session: s.clone(),
                last_seq: *seq,
            }),
            inflight: lock(&self.w.state).running.keys().cloned().collect(),
            outbox: pending.iter().map(|e| e.result.lease.clone()).collect(),
            worker_secret: resume.secret.clone(),
        };
        self.send(ws, Message::Hello(hello)).await?;
        let welcome = read_welcome(ws, &self.w.cfg).await?;
        let result_limit = self.accept(&welcome, resume).await?;
        tracing::info!(message = "connected", session = %welcome.session, resumed = welcome.resumed, keep = welcome.keep.len(), drop = welcome.drop.len());
        for mut e in pending {
            // An entry too large for the gateway (written before it said its limit, or by an
            // older version) is never resent as is: it becomes a `result_too_large` error.
            let fitted = crate::limits::fit_result(e.result.clone(), &self.w.source, result_limit);
            if fitted != e.result {
                e.result = fitted;
                if let Err(err) = self.w.outbox.put(&e).await {
                    tracing::error!(message = "outbox write failed", error = %err);
                }
            }
            self.send(ws, Message::Result(e.result)).await?;
        }
        Ok(welcome)
    }

    /// Takes in what the `welcome` says: the issued secret (stored before anything else
    /// happens), the session, the result limit, the leases to drop. Returns the limit.
    async fn accept(&self, welcome: &Welcome, resume: &mut Resume) -> Result<usize, Ended> {
        if let Some(issued) = &welcome.worker_secret {
            // Kept before anything else happens in the session: a later hello must prove it.
            if let Err(e) = store_secret(&self.w.cfg.state_dir, issued).await {
                tracing::error!(message = "cannot store the worker secret", error = %e);
                return Err(closed(
                    close::IDENTITY,
                    format!("cannot store the worker secret: {e}"),
                ));
            }
            resume.secret = Some(issued.clone());
        }
        if !welcome.resumed {
            resume.session = Some((welcome.session.clone(), 0));
        }
        let limit =
            crate::limits::result_limit(self.w.cfg.max_result_bytes, welcome.max_frame_bytes);
        let mut s = lock(&self.w.state);
        s.result_limit = limit;
        for lease in &welcome.drop {
            if let Some(r) = s.running.remove(lease) {
                let _ = r.cancel.send(true);
            }
        }
        Ok(limit)
    }

    /// The session loop, until the connection ends or the drain is done.
    async fn serve(
        &self,
        ws: &mut Ws,
        live: &mut Live,
        resume: &mut Resume,
        out_rx: &mut mpsc::UnboundedReceiver<Message>,
        stop: &mut watch::Receiver<bool>,
    ) -> Ended {
        let far = Deadline::now() + std::time::Duration::from_secs(86_400 * 365);
        loop {
            if live.draining && self.drained(live) {
                return self.say_bye(ws).await;
            }
            let step = tokio::select! {
                msg = ws.next() => self.on_read(ws, msg, live, resume).await,
                out = out_rx.recv() => match out {
                    Some(m) => self.feed(ws, m).await,
                    None => Ok(()),
                },
                _ = tokio::time::sleep_until(live.next_hb) => self.heartbeat(ws, live, resume).await,
                _ = tokio::time::sleep_until(live.ack_due.unwrap_or(far)) => Err(lost(format!(
                    "no heartbeat answer within {} ms",
                    self.w.cfg.heartbeat_timeout.as_millis()
                ))),
                _ = stop.changed(), if !live.draining => {
                    live.draining = true;
                    live.drain_started = Some(Instant::now());
                    Ok(())
                }
            };
            if let Err(end) = step {
                return end;
            }
            // Results finished meanwhile go out with this turn's frames, in one write.
            while let Ok(m) = out_rx.try_recv() {
                if let Err(end) = self.feed(ws, m).await {
                    return end;
                }
            }
            if ws.flush().await.is_err() {
                return lost("send failed");
            }
        }
    }

    /// Whether a drain may end: nothing runs and every result was acknowledged, or the
    /// grace period is over.
    fn drained(&self, live: &Live) -> bool {
        let running = lock(&self.w.state).running.len();
        let grace_over = live
            .drain_started
            .is_some_and(|t| t.elapsed() >= self.w.cfg.shutdown_grace);
        // Finished results wait for their `result_ack` too (within the grace period), so a
        // graceful stop leaves nothing in the outbox to resend.
        grace_over || (running == 0 && self.w.outbox.is_empty())
    }

    /// Releases what still runs, says `bye` and closes.
    async fn say_bye(&self, ws: &mut Ws) -> Ended {
        let leases: Vec<String> = lock(&self.w.state)
            .running
            .drain()
            .map(|(l, r)| {
                let _ = r.cancel.send(true);
                l
            })
            .collect();
        for lease in leases {
            let _ = self.send(ws, Message::Release(Release { lease })).await;
        }
        let bye = Bye {
            reason: "shutting down".into(),
        };
        let _ = self.send(ws, Message::Bye(bye)).await;
        let _ = ws.close(None).await;
        Ended::Done
    }

    async fn heartbeat(&self, ws: &mut Ws, live: &mut Live, resume: &Resume) -> Result<(), Ended> {
        live.next_hb = Deadline::now() + jitter(live.hb_ms);
        let (inflight, free) = {
            let s = lock(&self.w.state);
            let busy = u32::try_from(s.running.len()).unwrap_or(u32::MAX);
            (
                s.running.keys().cloned().collect::<Vec<_>>(),
                self.w.cfg.slots.saturating_sub(busy),
            )
        };
        let hb = Heartbeat {
            ack_seq: resume.session.as_ref().map_or(0, |(_, s)| *s),
            inflight,
            free,
            gpu: self.w.gpu(),
        };
        self.send(ws, Message::Heartbeat(hb)).await?;
        live.ack_due
            .get_or_insert_with(|| Deadline::now() + self.w.cfg.heartbeat_timeout);
        Ok(())
    }

    /// One read from the socket: a frame to handle, a close, or an error.
    async fn on_read(
        &self,
        ws: &mut Ws,
        msg: Option<Result<tungstenite::Message, tungstenite::Error>>,
        live: &mut Live,
        resume: &mut Resume,
    ) -> Result<(), Ended> {
        let text = match msg {
            Some(Ok(tungstenite::Message::Text(t))) => t,
            Some(Ok(tungstenite::Message::Close(c))) => {
                return Err(c.map_or_else(
                    || closed(1005, String::new()),
                    |c| closed(c.code.into(), c.reason.to_string()),
                ));
            }
            Some(Ok(_)) => return Ok(()),
            Some(Err(e)) => return Err(lost(e.to_string())),
            None => return Err(lost("connection closed")),
        };
        let env = match Envelope::decode(text.as_str(), self.w.cfg.max_frame_bytes) {
            Ok(e) => e,
            Err(e) => {
                tracing::warn!(message = "bad frame from gateway", error = %e);
                // Every control message before it was acked on arrival, so the gateway
                // takes the refused frame for its oldest unacked assign.
                if matches!(e, kiln_protocol::DecodeError::Oversized { .. }) {
                    let reply = Envelope::error_reply(&e, kiln_protocol::now_ms())
                        .from_source(&self.w.source);
                    let _ = ws
                        .feed(tungstenite::Message::Text(reply.encode().into()))
                        .await;
                }
                return Ok(());
            }
        };
        if let Some(seq) = env.message.seq()
            && let Some((_, last)) = resume.session.as_mut()
        {
            if seq <= *last {
                return Ok(()); // replayed twice; already handled
            }
            *last = seq;
        }
        self.dispatch(ws, env, live).await
    }

    /// Handles one frame of the gateway.
    async fn dispatch(&self, ws: &mut Ws, env: Envelope, live: &mut Live) -> Result<(), Ended> {
        match env.message {
            Message::Assign(a) => {
                for t in a.tasks {
                    let reply = if live.draining {
                        Some(Message::Release(Release { lease: t.lease }))
                    } else {
                        self.w.start(t)
                    };
                    if let Some(r) = reply {
                        let _ = self.feed(ws, r).await;
                    }
                }
                let _ = self.feed(ws, Message::Ack(Ack { seq: a.seq })).await;
            }
            Message::Cancel(c) => {
                if let Some(r) = lock(&self.w.state).running.get(&c.lease) {
                    let _ = r.cancel.send(true);
                }
                let _ = self.feed(ws, Message::Ack(Ack { seq: c.seq })).await;
            }
            Message::Drain(d) => {
                live.draining = true;
                live.drain_started.get_or_insert_with(Instant::now);
                let _ = self.feed(ws, Message::Ack(Ack { seq: d.seq })).await;
            }
            Message::ResultAck(r) => {
                if !r.accepted {
                    tracing::info!(message = "result not accepted", lease = %r.lease, reason = ?r.reason);
                }
                self.w.outbox.remove(&r.lease);
            }
            Message::HeartbeatAck(_) => live.ack_due = None,
            Message::Welcome(_) => {}
            Message::Error => {
                tracing::warn!(message = "gateway reported an error", error = ?env.error, error_msg = ?env.error_msg)
            }
            other => tracing::debug!(message = "ignored frame", kind = other.type_name()),
        }
        Ok(())
    }
}

/// Opens the WebSocket (subprotocol `kiln.v1`, the token as a bearer) within
/// [`WorkerConfig::connect_timeout`].
async fn connect(cfg: &WorkerConfig) -> Result<Ws, Ended> {
    let mut req = cfg
        .url
        .as_str()
        .into_client_request()
        .map_err(|e| closed(close::AUTH, format!("bad url: {e}")))?;
    req.headers_mut().insert(
        "Sec-WebSocket-Protocol",
        http_value(kiln_protocol::SUBPROTOCOL),
    );
    if let Some(t) = &cfg.token {
        req.headers_mut()
            .insert("Authorization", http_value(&format!("Bearer {t}")));
    }
    let opening = tokio_tungstenite::connect_async_with_config(req, Some(ws_config(cfg)), true);
    match tokio::time::timeout(cfg.connect_timeout, opening).await {
        Ok(Ok((ws, _))) => Ok(ws),
        Ok(Err(tungstenite::Error::Http(resp))) if resp.status() == 401 || resp.status() == 403 => {
            Err(closed(
                close::AUTH,
                format!("gateway answered {}", resp.status()),
            ))
        }
        Ok(Err(e)) => Err(lost(format!("connect failed: {e}"))),
        Err(_) => Err(lost("connect timed out")),
    }
}

/// The gateway's answer to `hello`, within [`WorkerConfig::welcome_timeout`] and
/// [`WorkerConfig::max_frame_bytes`].
async fn read_welcome(ws: &mut Ws, cfg: &WorkerConfig) -> Result<Welcome, Ended> {
    match tokio::time::timeout(cfg.welcome_timeout, ws.next()).await {
        Ok(Some(Ok(tungstenite::Message::Text(t)))) => {
            match Envelope::decode(t.as_str(), cfg.max_frame_bytes) {
                Ok(Envelope {
                    message: Message::Welcome(w),
                    ..
                }) => Ok(w),
                Ok(_) => Err(closed(close::PROTOCOL, "expected welcome")),
                Err(e) => Err(closed(close::PROTOCOL, format!("expected welcome: {e}"))),
            }
        }
        Ok(Some(Ok(tungstenite::Message::Close(c)))) => Err(c.map_or_else(
            || closed(1000, String::new()),
            |c| closed(c.code.into(), c.reason.to_string()),
        )),
        Ok(_) => Err(lost("no welcome")),
        Err(_) => Err(lost(format!(
            "no welcome within {} ms",
            cfg.welcome_timeout.as_millis()
        ))),
    }
}

/// File in the state dir holding the secret the gateway issued to this worker id.
const SECRET_FILE: &str = "worker_secret";

pub(crate) async fn load_secret(dir: &Path) -> std::io::Result<Option<String>> {
    match tokio::fs::read_to_string(dir.join(SECRET_FILE)).await {
        Ok(s) if !s.trim().is_empty() => Ok(Some(s.trim().to_owned())),
        Ok(_) => Ok(None),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// Writes the secret durably before the session goes on: a temporary file (owner-only),
/// fsync'd, renamed over the old one, and the directory fsync'd, so that a crash or power
/// loss right after leaves either no secret or the whole one, never a worker that the
/// gateway knows by a secret it lost.
async fn store_secret(dir: &Path, secret: &str) -> std::io::Result<()> {
    let (dir, secret) = (dir.to_owned(), secret.to_owned());
    tokio::task::spawn_blocking(move || {
        use std::io::Write as _;
        let tmp = dir.join(format!("{SECRET_FILE}.tmp"));
        let mut opts = std::fs::OpenOptions::new();
        opts.write(true).create(true).truncate(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
        let mut f = opts.open(&tmp)?;
        f.write_all(secret.as_bytes())?;
        f.sync_all()?;
        drop(f);
        std::fs::rename(&tmp, dir.join(SECRET_FILE))?;
        std::fs::File::open(&dir)?.sync_all()
    })
    .await
    .map_err(std::io::Error::other)?
}

/// The WebSocket's read limits: frames up to four times `max_frame_bytes` are read (and
/// refused when over it); larger ones fail the connection.
fn ws_config(cfg: &WorkerConfig) -> tungstenite::protocol::WebSocketConfig {
    let hard = Some(cfg.max_frame_bytes.saturating_mul(4));
    tungstenite::protocol::WebSocketConfig::default()
        .max_message_size(hard)
        .max_frame_size(hard)
}

fn http_value(s: &str) -> tungstenite::http::HeaderValue {
    tungstenite::http::HeaderValue::from_str(s)
        .unwrap_or_else(|_| tungstenite::http::HeaderValue::from_static(""))
}

/// `ms` with up to 20% jitter either way.
fn jitter(ms: u64) -> std::time::Duration {
    let spread = (ms / 5).max(1);
    let j = rand::rng().random_range(0..=2 * spread);
    std::time::Duration::from_millis(ms - spread + j)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heartbeats_jitter_within_a_fifth() {
        for _ in 0..200 {
            let d = jitter(1000).as_millis();
            assert!((800..=1200).contains(&d), "{d}");
        }
        assert!(jitter(1).as_millis() <= 2);
    }

    #[tokio::test]
    async fn the_secret_is_stored_owner_only_and_read_back() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(load_secret(dir.path()).await.unwrap(), None);
        store_secret(dir.path(), "s3cret").await.unwrap();
        assert_eq!(
            load_secret(dir.path()).await.unwrap().as_deref(),
            Some("s3cret")
        );
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt as _;
            let mode = std::fs::metadata(dir.path().join(SECRET_FILE))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
        }
    }
}
