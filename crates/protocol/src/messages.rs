//! Payloads of the kiln.v1 messages, one struct per `type`.

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// What a worker can run.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Capabilities {
    /// Task types the worker's handlers serve, e.g. `txt2img`.
    pub task_types: Vec<String>,
    /// Models the worker serves. A task that names a model goes only to workers listing
    /// it; a worker with no models gets only tasks that name none.
    pub models: Vec<String>,
    /// Free-form labels matched by routing, e.g. `gpu=a100`: a task that asks for labels
    /// goes only to workers that have all of them.
    pub labels: Vec<String>,
}

/// Where a reconnecting worker left off.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Resume {
    /// The session id from the previous `welcome`.
    pub session: String,
    /// The highest control `seq` the worker received.
    pub last_seq: u64,
}

/// `hello` (worker -> gateway): the first frame of every connection.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    /// Stable across restarts (persisted by the worker).
    pub worker_id: String,
    /// New for every process start; tells a restart from a network blip.
    pub boot_id: String,
    /// What the worker can run.
    #[serde(default)]
    pub capabilities: Capabilities,
    /// Tasks the worker runs at once.
    pub slots: u32,
    /// Present when reconnecting to an earlier session.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resume: Option<Resume>,
    /// Leases of tasks the worker is still running.
    #[serde(default)]
    pub inflight: Vec<String>,
    /// Leases whose results wait in the worker's outbox for a `result_ack`.
    #[serde(default)]
    pub outbox: Vec<String>,
    /// The secret the gateway issued to this `worker_id` in an earlier `welcome` (kept in
    /// the worker's state dir). Absent only on a worker's first registration; a hello for a
    /// `worker_id` that has a secret without the right one is closed with
    /// [`close::IDENTITY`](crate::close::IDENTITY).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub worker_secret: Option<String>,
}

/// Timers the gateway applies to the session, in milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Timers {
    /// Send `hb` this often (with up to 20% jitter). Default: 15,000.
    pub heartbeat_ms: u64,
    /// A lease lapses this long after its last renewal. Default: 90,000.
    pub lease_ms: u64,
    /// The gateway closes a connection silent for this long. Default: 45,000.
    pub dead_after_ms: u64,
}

impl Default for Timers {
    fn default() -> Self {
        Self {
            heartbeat_ms: 15_000,
            lease_ms: 90_000,
            dead_after_ms: 45_000,
        }
    }
}

/// `welcome` (gateway -> worker): the answer to `hello`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Welcome {
    /// The session id, for `resume` after a reconnect.
    pub session: String,
    /// Timers for this session.
    pub timers: Timers,
    /// Whether the earlier session was resumed (its unacked control messages follow).
    pub resumed: bool,
    /// Leases the worker should keep running.
    #[serde(default)]
    pub keep: Vec<String>,
    /// Leases the worker must stop (the gateway gave the task to someone else or it ended).
    #[serde(default)]
    pub drop: Vec<String>,
    /// The largest frame the gateway accepts, bytes: a worker sends nothing larger (a
    /// result that would be larger is replaced by a `result_too_large` error). Absent from
    /// older gateways: assume [`DEFAULT_MAX_FRAME_BYTES`](crate::DEFAULT_MAX_FRAME_BYTES).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_frame_bytes: Option<u64>,
    /// A secret issued now, on the first registration of this `worker_id`: the worker
    /// stores it durably before going on and sends it in every later `hello`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub worker_secret: Option<String>,
}

/// Longest `worker_id` or `boot_id`, in bytes.
pub const MAX_ID_LEN: usize = 128;

/// Checks a `worker_id` or `boot_id`: 1 to [`MAX_ID_LEN`] characters from
/// `A-Z a-z 0-9 . _ : @ -`. The error says what is wrong (not the whole value).
pub fn check_id(id: &str) -> Result<(), String> {
    if id.is_empty() {
        return Err("empty".into());
    }
    if id.len() > MAX_ID_LEN {
        return Err(format!("{} bytes (at most {MAX_ID_LEN})", id.len()));
    }
    match id
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | ':' | '@' | '-')))
    {
        Some(c) => Err(format!("character {c:?} (allowed: A-Z a-z 0-9 . _ : @ -)")),
        None => Ok(()),
    }
}

/// One task inside an `assign`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskAssignment {
    /// Task id.
    pub task_id: String,
    /// 1-based attempt number.
    pub attempt: u32,
    /// Lease id of this attempt; every later message about it names this lease.
    pub lease: String,
    /// The client's idempotency key, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_id: Option<String>,
    /// Task type.
    pub task_type: String,
    /// Higher runs first.
    #[serde(default)]
    pub priority: i32,
    /// Absolute deadline, Unix ms; the worker should give up past it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deadline: Option<u64>,
    /// The model the task needs (one of the worker's `models`), when it names one: the
    /// model to load for it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    /// The task's input, as the client sent it.
    pub input: Value,
}

/// `assign` (gateway -> worker): tasks to start, never more than the free slots.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Assign {
    /// Per-session control sequence number.
    pub seq: u64,
    /// The tasks.
    pub tasks: Vec<TaskAssignment>,
}

/// `ack` (worker -> gateway): every control message up to `seq` arrived.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ack {
    /// Cumulative sequence number.
    pub seq: u64,
}

/// `reject` (worker -> gateway): the worker will not run this lease.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reject {
    /// The lease.
    pub lease: String,
    /// Why.
    pub reason: String,
    /// Whether another attempt may succeed (then the attempt is not counted).
    pub retryable: bool,
}

/// `progress` (worker -> gateway): how far a task is. Renews the session's leases.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Progress {
    /// The lease.
    pub lease: String,
    /// A short stage name, e.g. `sampling`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stage: Option<String>,
    /// Steps done.
    #[serde(default)]
    pub step: u64,
    /// Steps in all (0: unknown).
    #[serde(default)]
    pub total: u64,
    /// Estimated time left.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eta_ms: Option<u64>,
}

/// How a task attempt ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ResultStatus {
    /// Finished with an output.
    Ok,
    /// Failed.
    Error,
    /// Stopped after a `cancel`. Sent as `canceled` (the spelling of the task status);
    /// `cancelled` is accepted too.
    #[serde(rename = "canceled", alias = "cancelled")]
    Cancelled,
}

/// A task failure.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskError {
    /// Stable machine code, e.g. `out_of_memory`.
    pub code: String,
    /// For people.
    pub message: String,
    /// Whether another attempt may succeed.
    #[serde(default)]
    pub retryable: bool,
}

impl TaskError {
    /// A failure another attempt may not repeat (the GPU was busy, a service was down):
    /// the gateway runs the task again within its attempt budget.
    pub fn retryable(code: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            code: code.into(),
            message: message.into(),
            retryable: true,
        }
    }

    /// A failure every attempt would repeat (bad input, an unsupported option): the task
    /// fails at once.
    pub fn fatal(code: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            code: code.into(),
            message: message.into(),
            retryable: false,
        }
    }

    /// The failure a worker reports instead of a result whose frame would be `size` bytes,
    /// over the `limit` the gateway accepts: code `result_too_large`, not retryable (the
    /// same handler would produce the same output), pointing to the files API.
    pub fn result_too_large(size: usize, limit: usize) -> Self {
        Self::fatal(
            "result_too_large",
            format!(
                "the result frame is {size} bytes, over the {limit}-byte frame limit; upload large \
                 outputs with the files API (POST /v1/files) and return {{\"files\":[{{\"id\":\"...\"}}]}}"
            ),
        )
    }
}

/// `result` (worker -> gateway): the outcome of a lease. Kept in the worker's outbox until
/// `result_ack`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskResult {
    /// The lease.
    pub lease: String,
    /// How it ended.
    pub status: ResultStatus,
    /// The output, for `ok`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output: Option<Value>,
    /// The failure, for `error`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<TaskError>,
    /// Resource usage, free-form (e.g. `{"gpu_ms": 5120}`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage: Option<Value>,
    /// Time the worker spent per stage of this attempt, milliseconds, keyed by stage name
    /// ending in `_ms` (e.g. `{"decode_ms": 12, "render_ms": 840, "upload_ms": 35}`).
    /// Optional; the gateway shows it as the task's `timings.worker`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timings: Option<std::collections::BTreeMap<String, u64>>,
}

/// `result_ack` (gateway -> worker): the result was recorded (`accepted`) or refused
/// (stale or duplicate). Either way the worker clears it from its outbox.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResultAck {
    /// The lease.
    pub lease: String,
    /// Whether this result became the task's result.
    pub accepted: bool,
    /// Why not, when refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// `cancel` (gateway -> worker): stop this lease and answer `result{canceled}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cancel {
    /// Per-session control sequence number.
    pub seq: u64,
    /// The lease.
    pub lease: String,
    /// Why.
    #[serde(default)]
    pub reason: String,
}

/// `release` (worker -> gateway): give a lease back without failing it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Release {
    /// The lease.
    pub lease: String,
}

/// `drain` (gateway -> worker): finish what you run, take nothing new.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Drain {
    /// Per-session control sequence number.
    pub seq: u64,
    /// Unix ms by which the worker should be done, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deadline: Option<u64>,
}

/// `bye` (either side): the sender is closing on purpose.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Bye {
    /// Why.
    #[serde(default)]
    pub reason: String,
}

/// GPU statistics a worker may add to `hb`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct GpuStats {
    /// Utilisation, 0 to 100.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub util: Option<f32>,
    /// Memory in use, MiB.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mem_used_mb: Option<u64>,
    /// Memory in all, MiB.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mem_total_mb: Option<u64>,
}

/// `hb` (worker -> gateway): alive; renews every lease of the session and updates credits.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Heartbeat {
    /// Highest control seq received (same meaning as `ack`).
    pub ack_seq: u64,
    /// Leases the worker is running.
    #[serde(default)]
    pub inflight: Vec<String>,
    /// Free slots.
    pub free: u32,
    /// Optional GPU statistics.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gpu: Option<GpuStats>,
}

/// `hb_ack` (gateway -> worker): leases are renewed until this time (Unix ms).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeartbeatAck {
    /// Unix ms.
    pub renewed_until: u64,
}

/// Largest preview image carried inline in a `preview` frame, bytes (before base64). A
/// larger preview is uploaded with the files API and named by `file`.
pub const MAX_PREVIEW_BYTES: usize = 64 << 10;

/// Image types a preview may have.
pub const PREVIEW_TYPES: &[&str] = &["image/png", "image/jpeg", "image/webp", "image/gif"];

/// `preview` (worker -> gateway): a partial image of a running task (a coarse render, an
/// intermediate step). Lossy: the gateway keeps the latest per task, rate-limits them per
/// task and drops the rest. Exactly one of `data` and `file` is set.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Preview {
    /// The lease.
    pub lease: String,
    /// 0-based number of this preview within the attempt.
    #[serde(default)]
    pub index: u32,
    /// The image type, one of [`PREVIEW_TYPES`].
    pub mime: String,
    /// The image, base64 (standard alphabet, padded), at most [`MAX_PREVIEW_BYTES`]
    /// decoded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<String>,
    /// Instead of `data`: the id of a file uploaded with `POST /v1/files`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file: Option<String>,
    /// Width, pixels, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub width: Option<u32>,
    /// Height, pixels, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub height: Option<u32>,
}

impl Preview {
    /// Checks the shape: a known `mime`, exactly one of `data` and `file`, `data` not over
    /// [`MAX_PREVIEW_BYTES`] once decoded. The error says what is wrong. (Whether `data` is
    /// valid base64 of an image is for the receiver to find out.)
    pub fn check(&self) -> Result<(), String> {
        if !PREVIEW_TYPES.contains(&self.mime.as_str()) {
            return Err(format!(
                "preview mime {:?} is not one of {}",
                self.mime,
                PREVIEW_TYPES.join(", ")
            ));
        }
        match (&self.data, &self.file) {
            (Some(d), None) => {
                let decoded = d.len() / 4 * 3;
                if d.is_empty() || decoded > MAX_PREVIEW_BYTES + 2 {
                    return Err(format!(
                        "preview data is {decoded} bytes (1 to {MAX_PREVIEW_BYTES}); upload a larger \
                         preview with POST /v1/files and send its id as `file`"
                    ));
                }
                Ok(())
            }
            (None, Some(f)) if !f.is_empty() && f.len() <= MAX_ID_LEN => Ok(()),
            _ => Err(
                "a preview carries exactly one of `data` (base64) and `file` (a file id)".into(),
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn task_error_constructors_set_the_retry_flag() {
        let e = TaskError::retryable("gpu_busy", format!("{} in use", "GPU 0"));
        assert_eq!(
            (e.code.as_str(), e.message.as_str(), e.retryable),
            ("gpu_busy", "GPU 0 in use", true)
        );
        let e = TaskError::fatal("invalid_input", "no prompt");
        assert_eq!((e.code.as_str(), e.retryable), ("invalid_input", false));
        let json = serde_json::to_value(&e).unwrap();
        assert_eq!(
            json,
            serde_json::json!({"code": "invalid_input", "message": "no prompt", "retryable": false})
        );
    }
}
