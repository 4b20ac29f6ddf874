//! Process-wide traffic counters and the reasons a connection or frame is refused.
//!
//! Counters are plain atomics updated once per read batch, never per byte. Labels are static
//! and bounded: an agent ID or name is never a label (those belong to the session registry).

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};

/// Why the proxy closed or refused an agent connection. Each variant is one metric label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Rejection {
    /// No complete first frame within the deadline.
    FirstFrameTimeout,
    /// A frame header announced 0 bytes.
    ZeroLength,
    /// A frame header announced more than the limit (also HTTP and TLS probes).
    TooLong,
    /// The stream ended inside a frame.
    Truncated,
    /// A payload that is not a Wazuh envelope (bad `!ID!` or unknown cipher tag).
    BadEnvelope,
    /// A frame carried another agent ID than the connection's first frame.
    AgentIdChanged,
    /// Refused by the duplicate-connection policy.
    Duplicate,
    /// No manager could be reached.
    NoBackend,
    /// The manager sent a zero-length, oversized or malformed frame (never forwarded).
    ManagerProtocol,
    /// No traffic either way for longer than the idle timeout.
    Idle,
    /// The agent ID (or, for ID-less agents, the source address) is not in client.keys.
    UnknownAgent,
    /// The source address is not allowed by the agent's key (its IP column).
    SourceNotAllowed,
    /// The first message does not decrypt with the claimed agent's key (spoofed or stale).
    Unverified,
    /// A manager failed in the middle of a frame; the partial frame was dropped, never forwarded.
    ManagerPartialFrame,
    /// The source address reached its connection limit or opened connections too fast.
    SourceLimit,
    /// Every manager refused the agent (closed it before answering it, or never answered).
    AgentRefused,
    /// The agent was refused by every manager a short while ago and is kept away for now.
    AgentBackoff,
    /// Another connection of the same agent is live and was heard from recently.
    Overtake,
    /// A PROXY protocol listener got no valid header, or one from an untrusted sender.
    ProxyProtocol,
    /// This host could not open a connection to a manager (out of descriptors, local ports or
    /// kernel memory); the managers were not asked and are not held at fault.
    OutOfSockets,
}

impl Rejection {
    /// Every reason, in label order.
    pub const ALL: [Rejection; 20] = [
        Rejection::FirstFrameTimeout,
        Rejection::ZeroLength,
        Rejection::TooLong,
        Rejection::Truncated,
        Rejection::BadEnvelope,
        Rejection::AgentIdChanged,
        Rejection::Duplicate,
        Rejection::NoBackend,
        Rejection::ManagerProtocol,
        Rejection::Idle,
        Rejection::UnknownAgent,
        Rejection::SourceNotAllowed,
        Rejection::Unverified,
        Rejection::ManagerPartialFrame,
        Rejection::SourceLimit,
        Rejection::AgentRefused,
        Rejection::AgentBackoff,
        Rejection::Overtake,
        Rejection::ProxyProtocol,
        Rejection::OutOfSockets,
    ];

    /// The metric label.
    pub fn label(self) -> &'static str {
        match self {
            Rejection::FirstFrameTimeout => "first_frame_timeout",
            Rejection::ZeroLength => "zero_length",
            Rejection::TooLong => "too_long",
            Rejection::Truncated => "truncated",
            Rejection::BadEnvelope => "bad_envelope",
            Rejection::AgentIdChanged => "agent_id_changed",
            Rejection::Duplicate => "duplicate",
            Rejection::NoBackend => "no_backend",
            Rejection::ManagerProtocol => "manager_protocol",
            Rejection::Idle => "idle",
            Rejection::UnknownAgent => "unknown_agent",
            Rejection::SourceNotAllowed => "source_not_allowed",
            Rejection::Unverified => "unverified",
            Rejection::ManagerPartialFrame => "manager_partial_frame",
            Rejection::SourceLimit => "source_limit",
            Rejection::AgentRefused => "agent_refused",
            Rejection::AgentBackoff => "agent_backoff",
            Rejection::Overtake => "overtake",
            Rejection::ProxyProtocol => "proxy_protocol",
            Rejection::OutOfSockets => "out_of_sockets",
        }
    }

    fn index(self) -> usize {
        Rejection::ALL.iter().position(|r| *r == self).unwrap_or(0)
    }
}

impl From<crate::frame::FrameError> for Rejection {
    fn from(e: crate::frame::FrameError) -> Self {
        match e {
            crate::frame::FrameError::ZeroLength => Rejection::ZeroLength,
            crate::frame::FrameError::TooLong { .. } => Rejection::TooLong,
            _ => Rejection::Truncated,
        }
    }
}

/// Counters of one listener (or of the whole process, summed by the caller).
#[derive(Debug, Default)]
pub struct RelayStats {
    /// Connections accepted.
    pub accepted: AtomicU64,
    /// Connections open now.
    pub active: AtomicI64,
    /// Sessions that reached a manager.
    pub sessions: AtomicU64,
    /// Frames agent -> manager.
    pub frames_up: AtomicU64,
    /// Bytes agent -> manager.
    pub bytes_up: AtomicU64,
    /// Frames manager -> agent.
    pub frames_down: AtomicU64,
    /// Bytes manager -> agent.
    pub bytes_down: AtomicU64,
    /// Failed connection attempts to managers.
    pub connect_failures: AtomicU64,
    /// Sessions that ended with the agent's shutdown message (known only with client.keys).
    pub clean_stops: AtomicU64,
    /// Sessions that ended any other way.
    pub lost: AtomicU64,
    /// Agents kept connected and reconnected after their manager failed or dropped them.
    pub failovers: AtomicU64,
    /// Agents moved on request (drain, rebalance) without disconnecting.
    pub moves: AtomicU64,
    /// Frames written to managers that then failed, which they may not have processed.
    pub frames_at_risk: AtomicU64,
    /// Manager connections a manager closed (or never answered) before answering the agent:
    /// refusals of one agent, which never mark the manager failed.
    pub manager_refusals: AtomicU64,
    /// Manager connections a manager closed after serving the agent (a restart, or a
    /// per-agent close such as a removed key); the agent is reconnected.
    pub manager_closes: AtomicU64,
    /// Frames re-sent to the next manager because the failed one's TCP never acknowledged them.
    pub frames_resent: AtomicU64,
    rejected: [AtomicU64; Rejection::ALL.len()],
}

impl RelayStats {
    /// Counts one refused or closed connection.
    pub fn reject(&self, why: Rejection) {
        self.rejected[why.index()].fetch_add(1, Ordering::Relaxed);
    }

    /// How many connections were refused or closed for `why`.
    pub fn rejected(&self, why: Rejection) -> u64 {
        self.rejected[why.index()].load(Ordering::Relaxed)
    }

    /// Counts relayed traffic.
    #[inline]
    pub fn record(&self, up: bool, frames: u64, bytes: u64) {
        let (f, b) = if up {
            (&self.frames_up, &self.bytes_up)
        } else {
            (&self.frames_down, &self.bytes_down)
        };
        f.fetch_add(frames, Ordering::Relaxed);
        b.fetch_add(bytes, Ordering::Relaxed);
    }
}
