//! Load tools for wazuh-proxy: simulated agents and a stand-in manager that speak the real
//! 1514 protocol (framing, envelope, AES/Blowfish, zlib, MD5) through `wazuh-proxy-core`.
//!
//! - [`fleetkeys`]: a generated `client.keys` shared by the agents and the manager.
//! - [`wire`]: frame I/O and the event text that carries a per-agent sequence number.
//! - [`agent`]: one simulated agent (handshake, events, keepalives, reconnection).
//! - [`fleet`]: the load modes built on it (throughput, latency, connect storm, idle).
//! - [`manager`]: the stand-in manager counting loss, duplication and reordering.
//!
//! The `wazuh-fleet` binary is the command-line front end; `benches/compare.sh` runs it
//! against wazuh-proxy, nginx and HAProxy.
#![warn(missing_docs, unreachable_pub)]
#![forbid(unsafe_code)]

pub mod agent;
pub mod fleet;
pub mod fleetkeys;
pub mod manager;
pub mod stats;
pub mod wire;

/// Everything that can go wrong in the load tools, with the place it happened.
#[derive(Debug, thiserror::Error)]
pub enum FleetError {
    /// A socket or file operation failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The underlying error.
        source: std::io::Error,
    },
    /// The peer broke the protocol (bad frame, bad envelope, undecryptable message...).
    #[error("protocol: {0}")]
    Protocol(String),
    /// The keys file is missing entries or unreadable.
    #[error("keys: {0}")]
    Keys(String),
    /// A deadline passed.
    #[error("timed out: {0}")]
    Timeout(String),
}

impl FleetError {
    /// Wraps an I/O error with what was being done.
    pub fn io(what: impl Into<String>, source: std::io::Error) -> FleetError {
        FleetError::Io {
            what: what.into(),
            source,
        }
    }
}
