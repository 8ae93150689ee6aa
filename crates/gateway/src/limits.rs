//! Size limits of what clients put in a task, and their consistency with the worker
//! protocol's frame limits (docs/PROTOCOL.md, "Limits").

use kiln_broker::BrokerConfig;
use serde_json::Value;

use crate::GatewayConfig;
use crate::error::ApiError;

/// Room an assign frame needs beside the task input: the envelope, ids, lease, and the
/// client's `request_id`, `task_type` and `model` at their longest, JSON-escaped.
pub const ASSIGN_OVERHEAD_BYTES: usize = 8 << 10;

/// Largest task `metadata`, bytes of its JSON.
pub const MAX_METADATA_BYTES: usize = 16 << 10;

/// Checks that the frame limits fit together: a task input at its limit fits an assign
/// frame, and the ordinary frame limit is under the hard one. The message names the keys.
pub fn check_frame_limits(gateway: &GatewayConfig, broker: &BrokerConfig) -> Result<(), String> {
    let room = broker.max_frame_bytes.saturating_sub(ASSIGN_OVERHEAD_BYTES);
    if gateway.max_task_input_bytes > room {
        return Err(format!(
            "gateway.max_task_input_bytes ({}) does not fit an assign frame: it must be at most \
             broker.max_frame_bytes ({}) minus {ASSIGN_OVERHEAD_BYTES} bytes for the rest of the \
             frame, i.e. {room}",
            gateway.max_task_input_bytes, broker.max_frame_bytes
        ));
    }
    if broker.frame_hard_limit_bytes < broker.max_frame_bytes {
        return Err(format!(
            "broker.frame_hard_limit_bytes ({}) is below broker.max_frame_bytes ({})",
            broker.frame_hard_limit_bytes, broker.max_frame_bytes
        ));
    }
    Ok(())
}

/// Bytes of a JSON value as it is stored and sent.
fn json_len(v: &Value) -> usize {
    serde_json::to_vec(v).map_or(usize::MAX, |b| b.len())
}

/// 413 when a task's input is over `gateway.max_task_input_bytes`.
pub(crate) fn check_input(cfg: &GatewayConfig, input: &Value) -> Result<(), ApiError> {
    let len = json_len(input);
    if len > cfg.max_task_input_bytes {
        return Err(ApiError::too_large(format!(
            "the task input is {len} bytes of JSON, over the {}-byte limit \
             (gateway.max_task_input_bytes); upload images and other bulk data with \
             POST /v1/files and pass their ids",
            cfg.max_task_input_bytes
        )));
    }
    Ok(())
}

/// 413 when a task's metadata is over [`MAX_METADATA_BYTES`].
pub(crate) fn check_metadata(metadata: Option<&Value>) -> Result<(), ApiError> {
    let len = metadata.map_or(0, json_len);
    if len > MAX_METADATA_BYTES {
        return Err(ApiError::too_large(format!(
            "metadata is {len} bytes of JSON, over the {MAX_METADATA_BYTES}-byte limit"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_input_limit_that_cannot_fit_an_assign_frame_is_refused() {
        let broker = BrokerConfig::default();
        assert!(check_frame_limits(&GatewayConfig::default(), &broker).is_ok());
        let too_big = GatewayConfig {
            max_task_input_bytes: broker.max_frame_bytes,
            ..GatewayConfig::default()
        };
        let err = check_frame_limits(&too_big, &broker).unwrap_err();
        assert!(err.contains("gateway.max_task_input_bytes"), "{err}");
        let inverted = BrokerConfig {
            frame_hard_limit_bytes: broker.max_frame_bytes - 1,
            ..BrokerConfig::default()
        };
        let err = check_frame_limits(&GatewayConfig::default(), &inverted).unwrap_err();
        assert!(err.contains("broker.frame_hard_limit_bytes"), "{err}");
    }
}
