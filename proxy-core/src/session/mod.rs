//! The registry of live agent sessions: who is connected, from where, to which manager, and how
//! much traffic each has moved.
//!
//! A manager (4.4+) refuses a second live connection for the same agent ("Agent key already in
//! use"), so the registry also decides what happens when an agent connects while an older
//! connection of it is still open ([`DuplicatePolicy`]).
//! (`session/tests.rs` walks through it: a second connection claiming a live agent is
//! refused unless it is that agent's own newer session, which then takes the first one's place.)

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use crate::envelope::AgentId;

mod claim;
mod registry;
mod state;
#[cfg(test)]
mod tests;

pub(crate) use claim::{overtake, pack_counter, Claim, Incumbent, Overtake};
pub(crate) use registry::{SessionHandle, SessionRegistry};
pub use state::{AgentInfo, Expiry, Session, SessionInfo, SessionStats};

/// Who a session belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SessionKey {
    /// An agent that sends its ID in every frame (`!ID!`).
    Agent(AgentId),
    /// An ID-less agent (fixed-IP key) or a `#ping` probe, known by its source address only.
    Source(IpAddr),
}

impl fmt::Display for SessionKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SessionKey::Agent(id) => write!(f, "{id}"),
            SessionKey::Source(ip) => write!(f, "ip:{ip}"),
        }
    }
}

/// What to do when an agent connects while an older connection of the same agent is live.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DuplicatePolicy {
    /// Replace the old connection when the new one is the agent reconnecting (default): the
    /// old one has not been heard from within the overtake time (60 s, remoted's
    /// `connection_overtake_time`), or, with keys, the new one's startup message decrypts
    /// with the agent's key and is newer than anything seen on the old one. Otherwise the new
    /// connection is refused and the live one kept, as remoted 4.6+ does: a connection
    /// never evicts a live agent on its word alone. The old connection is closed before the
    /// new one is forwarded, so the manager does not refuse it with "Agent key already in use".
    #[default]
    Replace,
    /// Refuse the new connection while the old one lives.
    Reject,
    /// Let both live (for managers older than 4.4, which accept both).
    Allow,
}

impl std::str::FromStr for DuplicatePolicy {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "replace" => Ok(DuplicatePolicy::Replace),
            "reject" => Ok(DuplicatePolicy::Reject),
            "allow" => Ok(DuplicatePolicy::Allow),
            other => Err(format!(
                "unknown duplicate policy {other:?} (expected replace, reject or allow)"
            )),
        }
    }
}

impl fmt::Display for DuplicatePolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DuplicatePolicy::Replace => "replace",
            DuplicatePolicy::Reject => "reject",
            DuplicatePolicy::Allow => "allow",
        })
    }
}

/// Why a session could not be registered.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum SessionError {
    /// The policy is [`DuplicatePolicy::Reject`] and the agent already has a live connection.
    #[error("agent {key} already has a live connection from {existing}")]
    Duplicate {
        /// The agent.
        key: SessionKey,
        /// The client address of the live connection.
        existing: SocketAddr,
    },
    /// The policy is [`DuplicatePolicy::Replace`], but the live connection was heard from
    /// within the overtake time and the newcomer proved nothing (see `overtake`).
    #[error("agent {key} is live on another connection from {existing}, heard from {heard_ago:?} ago; refusing the newcomer")]
    Live {
        /// The agent.
        key: SessionKey,
        /// The client address of the live connection.
        existing: SocketAddr,
        /// Time since the live connection's agent last sent a frame.
        heard_ago: Duration,
    },
}
