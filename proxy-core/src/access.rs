//! The access log: one line when an agent session starts and one when it ends, with the same
//! fields every time, so that a log pipeline can index them (`--log-format json` prints each
//! as one JSON object).
//!
//! Every line has the target [`TARGET`] and an `event` field:
//!
//! | field | `session_start` | `session_end` | meaning |
//! | --- | --- | --- | --- |
//! | `event` | yes | yes | `session_start` or `session_end` |
//! | `listener` | yes | yes | the listener's name |
//! | `session` | yes | yes | session number (unique in this process) |
//! | `agent` | yes | yes | agent ID (`001`), or `ip:ADDR` for agents whose frames carry no ID |
//! | `client` | yes | yes | the agent's address and port |
//! | `manager` | yes | yes | the manager's address, `-` when none was reached |
//! | `how` | yes | no | `connected` (new) or `taken_over` (from the previous process) |
//! | `duration_ms` | no | yes | time since the session started |
//! | `frames_up`, `bytes_up` | no | yes | agent to manager |
//! | `frames_down`, `bytes_down` | no | yes | manager to agent |
//! | `moves` | no | yes | moves to another manager without disconnecting |
//! | `frames_at_risk` | no | yes | frames written to managers that then failed |
//! | `reason` | no | yes | why it ended: one of [`END_REASONS`] |
//! | `stop` | no | yes | `clean` (the agent's shutdown message), `lost`, or `unknown` (no client.keys) |
//!
//! Ends that are faults (a refused agent, no manager) are logged at WARN, the others at INFO.

use std::net::SocketAddr;

use crate::session::SessionInfo;

/// The tracing target of every access-log line.
pub const TARGET: &str = "wazuh_proxy::access";

/// Every value of the `reason` field of a `session_end` line.
pub const END_REASONS: [&str; 19] = [
    "agent_closed",
    "manager_closed",
    "agent_io",
    "manager_io",
    "agent_frame",
    "agent_envelope",
    "agent_id_changed",
    "manager_protocol",
    "closed",
    "idle",
    "manager_timeout",
    "moved",
    "no_manager",
    "out_of_sockets",
    "handed_over",
    "unverified",
    "refused_everywhere",
    "repeated_manager_faults",
    "kept_away",
];

fn manager(backend: Option<SocketAddr>) -> String {
    backend.map_or_else(|| "-".to_owned(), |b| b.to_string())
}

/// Logs a session's start: `how` is `connected` or `taken_over`.
pub fn session_start(listener: &str, s: &SessionInfo, how: &'static str) {
    tracing::info!(target: TARGET, event = "session_start", listener, session = s.id,
        agent = %s.key, client = %s.client, manager = manager(s.backend), how,
        "agent connected");
}

/// Logs a session's end: `reason` is one of [`END_REASONS`], `detail` says more in words;
/// `stop` is `clean`, `lost` or `unknown`; `fault` logs at WARN.
pub fn session_end(
    listener: &str,
    s: &SessionInfo,
    reason: &'static str,
    detail: &dyn std::fmt::Display,
    stop: &'static str,
    fault: bool,
) {
    let duration_ms = u64::try_from(s.age.as_millis()).unwrap_or(u64::MAX);
    let detail = detail.to_string();
    if fault {
        tracing::warn!(target: TARGET, event = "session_end", listener, session = s.id,
            agent = %s.key, client = %s.client, manager = manager(s.backend), duration_ms,
            frames_up = s.frames_up, bytes_up = s.bytes_up, frames_down = s.frames_down,
            bytes_down = s.bytes_down, moves = s.moves, frames_at_risk = s.frames_at_risk,
            reason, detail, stop, "agent disconnected");
    } else {
        tracing::info!(target: TARGET, event = "session_end", listener, session = s.id,
            agent = %s.key, client = %s.client, manager = manager(s.backend), duration_ms,
            frames_up = s.frames_up, bytes_up = s.bytes_up, frames_down = s.frames_down,
            bytes_down = s.bytes_down, moves = s.moves, frames_at_risk = s.frames_at_risk,
            reason, detail, stop, "agent disconnected");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::relay::End;

    #[test]
    fn every_end_has_a_listed_reason() {
        let ends = [
            End::AgentClosed,
            End::ManagerClosed,
            End::AgentIo(std::io::Error::other("x")),
            End::ManagerIo(std::io::Error::other("x")),
            End::AgentFrame(crate::frame::FrameError::ZeroLength),
            End::AgentIdChanged,
            End::ManagerProtocol("x"),
            End::Closed,
            End::Idle,
            End::ManagerTimeout,
            End::Moved,
            End::NoManager,
            End::HandedOver,
        ];
        for e in &ends {
            assert!(END_REASONS.contains(&e.reason_code()), "{e:?}");
        }
    }
}
