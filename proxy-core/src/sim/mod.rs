//! A stand-in manager and agent payloads that speak the 1514 framing over real sockets.
//!
//! They exist for the demo, the integration tests and the load tools. [`Manager`] behaves like
//! `wazuh-remoted` where a proxy can tell the difference (see [`remoted`]): it closes the
//! connection of an agent it will not serve (removed key, "Agent key already in use" within the
//! overtake time), forgets an agent's reply socket when its connection closes, answers `#ping`
//! with `#pong`, and, given the agents' keys, decrypts every message, drops replayed counters
//! (`verify_msg_id`) and answers startups and keepalives with a sealed `#!-agent ack `. It can
//! also hang (stop reading and answering, connections kept: a silent death) and mistreat one
//! agent's connections ([`Misbehave`]). Without keys, [`agent_payload`] frames carry clear
//! marker bytes and a sequence number, so routing, loss, duplication and reordering can be
//! counted cheaply on the other side.

mod manager;
pub mod remoted;

pub use manager::{Manager, ManagerOptions, Reply};
pub use remoted::{Misbehave, Refusal};

use crate::envelope::{AgentId, Envelope};

/// Builds an agent -> manager payload: `!ID!#AES:` (or `#AES:` without an ID), then
/// `seq=<n>;`, then filler up to `size` bytes in total (at least the marker is written).
///
/// ```
/// use wazuh_proxy_core::envelope::AgentId;
/// use wazuh_proxy_core::sim::{agent_payload, payload_seq};
/// let p = agent_payload(AgentId::parse(b"001"), 42, 64);
/// assert!(p.starts_with(b"!001!#AES:seq=42;"));
/// assert_eq!(p.len(), 64);
/// assert_eq!(payload_seq(&p), Some(42));
/// ```
pub fn agent_payload(agent: Option<AgentId>, seq: u64, size: usize) -> Vec<u8> {
    let mut p = Vec::with_capacity(size.max(32));
    crate::envelope::write_header(&mut p, agent, crate::envelope::Cipher::Aes);
    p.extend_from_slice(format!("seq={seq};").as_bytes());
    let fill = b"abcdefghijklmnopqrstuvwxyz0123456789";
    let mut i = 0;
    while p.len() < size {
        p.push(fill[i % fill.len()]);
        i += 1;
    }
    p
}

/// Reads the sequence number written by [`agent_payload`].
pub fn payload_seq(payload: &[u8]) -> Option<u64> {
    let ct = Envelope::parse(payload).ok()?.ciphertext();
    let rest = ct.strip_prefix(b"seq=")?;
    let end = rest.iter().position(|&b| b == b';')?;
    std::str::from_utf8(&rest[..end]).ok()?.parse().ok()
}

/// The reply a stand-in sends as its ACK without keys: a tagged ciphertext carrying the
/// manager's name.
pub fn ack_payload(manager: &str) -> Vec<u8> {
    format!("#AES:ack from {manager}").into_bytes()
}
