//! Task states and the W3C trace context helper.

use serde::{Deserialize, Serialize};

/// Where a task is in its life. Terminal states never change again.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TaskState {
    /// Waiting for a worker.
    Queued,
    /// Leased to a worker.
    Running,
    /// Finished with an output.
    Succeeded,
    /// Failed for good (including past its maximum attempts: dead-lettered).
    Failed,
    /// Canceled by a client. `cancelled` is accepted as input too.
    #[serde(alias = "cancelled")]
    Canceled,
    /// Its deadline passed before it finished.
    Expired,
}

impl TaskState {
    /// Every state, in the order of a task's life.
    pub const ALL: [TaskState; 6] = [
        TaskState::Queued,
        TaskState::Running,
        TaskState::Succeeded,
        TaskState::Failed,
        TaskState::Canceled,
        TaskState::Expired,
    ];

    /// Whether the state is final.
    pub fn is_terminal(self) -> bool {
        !matches!(self, TaskState::Queued | TaskState::Running)
    }

    /// The lowercase name.
    pub fn as_str(self) -> &'static str {
        match self {
            TaskState::Queued => "queued",
            TaskState::Running => "running",
            TaskState::Succeeded => "succeeded",
            TaskState::Failed => "failed",
            TaskState::Canceled => "canceled",
            TaskState::Expired => "expired",
        }
    }

    /// Parses the lowercase name (`cancelled` is read as `canceled`).
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "queued" => TaskState::Queued,
            "running" => TaskState::Running,
            "succeeded" => TaskState::Succeeded,
            "failed" => TaskState::Failed,
            "canceled" | "cancelled" => TaskState::Canceled,
            "expired" => TaskState::Expired,
            _ => return None,
        })
    }
}

/// The current time in Unix milliseconds, as carried in `ts` and every timestamp of the
/// protocol.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// The trace id of a W3C `traceparent` value (`00-<32 hex>-<16 hex>-<2 hex>`), or of a
/// bare 32-hex trace id. `None` when it is neither, or all zeros.
pub fn trace_id(value: &str) -> Option<&str> {
    let hex = |s: &str, n: usize| {
        s.len() == n
            && s.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    };
    let id = match value.split('-').collect::<Vec<_>>().as_slice() {
        [version, id, parent, flags] => {
            if !hex(version, 2) || *version == "ff" || !hex(parent, 16) || !hex(flags, 2) {
                return None;
            }
            *id
        }
        [id] => *id,
        _ => return None,
    };
    (hex(id, 32) && id.bytes().any(|b| b != b'0')).then_some(id)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traceparent() {
        let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        assert_eq!(trace_id(tp), Some("4bf92f3577b34da6a3ce929d0e0e4736"));
        assert_eq!(
            trace_id("4bf92f3577b34da6a3ce929d0e0e4736"),
            Some("4bf92f3577b34da6a3ce929d0e0e4736")
        );
        assert_eq!(
            trace_id("00-00000000000000000000000000000000-00f067aa0ba902b7-01"),
            None
        );
        assert_eq!(
            trace_id("00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01"),
            None
        );
        assert_eq!(trace_id("nope"), None);
    }

    #[test]
    fn states() {
        for s in [
            "queued",
            "running",
            "succeeded",
            "failed",
            "canceled",
            "expired",
        ] {
            assert_eq!(TaskState::parse(s).map(TaskState::as_str), Some(s));
        }
        assert!(TaskState::Expired.is_terminal());
        assert!(!TaskState::Running.is_terminal());
    }
}
