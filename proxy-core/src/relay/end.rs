//! Why a session (or one of its manager connections) ended.

use std::fmt;
use std::io;
use std::time::Duration;

use super::decide::GiveUp;
use crate::envelope::EnvelopeError;
use crate::frame::FrameError;
use crate::stats::Rejection;

/// Why a session ended.
#[derive(Debug)]
#[non_exhaustive]
pub(crate) enum End {
    /// The agent closed its connection.
    AgentClosed,
    /// The manager closed its connection.
    ManagerClosed,
    /// Reading from or writing to the agent failed.
    AgentIo(io::Error),
    /// Reading from or writing to the manager failed.
    ManagerIo(io::Error),
    /// The agent broke a framing rule.
    AgentFrame(FrameError),
    /// The agent sent a payload that is not a Wazuh envelope.
    AgentEnvelope(EnvelopeError),
    /// A frame carried another agent ID than the connection's first frame.
    AgentIdChanged,
    /// The manager broke a framing rule or sent something that is not a Wazuh envelope.
    ManagerProtocol(&'static str),
    /// The proxy closed it: replaced by a newer connection of the same agent, or shutdown.
    Closed,
    /// No frame either way for longer than the idle timeout.
    Idle,
    /// The manager did not answer the agent's handshake within the reply timeout.
    ManagerTimeout,
    /// The session was asked to move to another manager (drain or rebalance).
    Moved,
    /// No manager could be reached within the hold timeout.
    NoManager,
    /// This host could not open a connection to any manager (out of descriptors, local ports
    /// or kernel memory): the agent is closed at once, as nginx does, and reconnects later.
    OutOfSockets,
    /// The session was handed to another process (binary upgrade).
    HandedOver,
    /// With keys, a session whose first frame was not a verified message sent something other
    /// than `#ping`.
    Unverified,
    /// Every manager refused the agent, or its sessions kept failing (see [`GiveUp`]).
    Refused(GiveUp),
    /// The agent was refused by every manager a short while ago and is kept away until then.
    KeptAway(Duration),
}

impl End {
    /// The metric label of a protocol failure, if this end is one.
    pub(crate) fn rejection(&self) -> Option<Rejection> {
        match self {
            End::AgentFrame(e) => Some((*e).into()),
            End::AgentEnvelope(_) => Some(Rejection::BadEnvelope),
            End::AgentIdChanged => Some(Rejection::AgentIdChanged),
            End::ManagerProtocol(_) => Some(Rejection::ManagerProtocol),
            End::Idle => Some(Rejection::Idle),
            End::Refused(_) => Some(Rejection::AgentRefused),
            End::Unverified => Some(Rejection::Unverified),
            End::KeptAway(_) => Some(Rejection::AgentBackoff),
            End::OutOfSockets => Some(Rejection::OutOfSockets),
            _ => None,
        }
    }
}

impl fmt::Display for End {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            End::AgentClosed => f.write_str("agent closed the connection"),
            End::ManagerClosed => f.write_str("manager closed the connection"),
            End::AgentIo(e) => write!(f, "agent connection failed: {e}"),
            End::ManagerIo(e) => write!(f, "manager connection failed: {e}"),
            End::AgentFrame(e) => write!(f, "agent sent a bad frame: {e}"),
            End::AgentEnvelope(e) => write!(f, "agent sent a bad envelope: {e}"),
            End::AgentIdChanged => f.write_str("agent ID changed within the connection"),
            End::ManagerProtocol(why) => {
                write!(f, "manager sent a bad frame ({why}); not forwarded")
            }
            End::Closed => f.write_str("closed by the proxy"),
            End::Idle => f.write_str("idle timeout"),
            End::ManagerTimeout => f.write_str("manager did not answer the handshake in time"),
            End::Moved => f.write_str("moved to another manager"),
            End::NoManager => f.write_str("no manager reachable"),
            End::OutOfSockets => f.write_str(
                "this host could not open a connection to a manager (out of descriptors or local ports)",
            ),
            End::HandedOver => f.write_str("handed over to the new process"),
            End::Unverified => f.write_str(
                "a session that did not start with a verified message may only carry #ping",
            ),
            End::Refused(GiveUp::RefusedEverywhere) => f.write_str(
                "every manager refused the agent (closed it before answering, or never answered it)",
            ),
            End::Refused(GiveUp::RepeatedFaults) => {
                f.write_str("managers kept breaking the protocol on this session")
            }
            End::KeptAway(d) => write!(
                f,
                "every manager refused this agent recently; kept away for {}s more",
                d.as_secs().max(1)
            ),
        }
    }
}

impl End {
    /// The stable code of this end: the `reason` field of the access log's `session_end`
    /// line (one of [`crate::access::END_REASONS`]).
    pub(crate) fn reason_code(&self) -> &'static str {
        match self {
            End::AgentClosed => "agent_closed",
            End::ManagerClosed => "manager_closed",
            End::AgentIo(_) => "agent_io",
            End::ManagerIo(_) => "manager_io",
            End::AgentFrame(_) => "agent_frame",
            End::AgentEnvelope(_) => "agent_envelope",
            End::AgentIdChanged => "agent_id_changed",
            End::ManagerProtocol(_) => "manager_protocol",
            End::Closed => "closed",
            End::Idle => "idle",
            End::ManagerTimeout => "manager_timeout",
            End::Moved => "moved",
            End::NoManager => "no_manager",
            End::OutOfSockets => "out_of_sockets",
            End::HandedOver => "handed_over",
            End::Unverified => "unverified",
            End::Refused(super::GiveUp::RefusedEverywhere) => "refused_everywhere",
            End::Refused(super::GiveUp::RepeatedFaults) => "repeated_manager_faults",
            End::KeptAway(_) => "kept_away",
        }
    }
}
