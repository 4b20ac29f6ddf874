//! Agent verification and tracking with `client.keys` (optional: only when keys are configured).
//!
//! [`verify_first`] checks the first message of a connection: the agent must be in
//! client.keys, its source address must be allowed by the key's IP column (the check a manager
//! behind a proxy can no longer make, since it sees the proxy's address), and the message must
//! decrypt with that agent's key. [`KeepaliveWatch`] then watches the agent's stream for keepalives
//! (name, version, OS, last keepalive) and for the shutdown message that marks a clean stop,
//! decrypting as few messages as it can: the relay stays a relay.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use crate::cipher::{CipherError, Decoder};
use crate::control::{self, Control, Message};
use crate::envelope::{AgentId, Cipher, Envelope};
use crate::keys::{AgentKey, KeyStore};
use crate::session::{AgentInfo, Session};
use crate::stats::Rejection;

/// Why a first message was refused.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub(crate) enum Refusal {
    /// The agent ID is not in client.keys (removed, or never enrolled here).
    #[error("agent {0} is not in client.keys")]
    UnknownId(AgentId),
    /// An ID-less message from an address that no key is bound to.
    #[error("no key in client.keys is bound to source address {0}")]
    UnknownSource(IpAddr),
    /// The key's IP column does not allow the source address.
    #[error("agent {id}: source address {source_ip} is not allowed by its key ({allowed})")]
    SourceNotAllowed {
        /// The agent.
        id: AgentId,
        /// Where it connected from.
        source_ip: IpAddr,
        /// The key's IP column.
        allowed: String,
    },
    /// The message does not decrypt with the agent's key.
    #[error("agent {id}: first message does not decrypt with its key ({reason}): spoofed agent or stale key")]
    Undecryptable {
        /// The agent.
        id: AgentId,
        /// What failed (a static reason; never key material).
        reason: &'static str,
    },
}

impl Refusal {
    /// The metric label.
    pub(crate) fn rejection(&self) -> Rejection {
        match self {
            Refusal::UnknownId(_) | Refusal::UnknownSource(_) => Rejection::UnknownAgent,
            Refusal::SourceNotAllowed { .. } => Rejection::SourceNotAllowed,
            Refusal::Undecryptable { .. } => Rejection::Unverified,
        }
    }
}

/// A verified first message.
#[derive(Debug)]
pub(crate) struct Verified {
    /// The agent's key.
    pub key: Arc<AgentKey>,
    /// What the message told about the agent.
    pub info: AgentInfo,
    /// The message's counters, ordered (see [`crate::session::pack_counter`]).
    pub counter: u64,
    /// Whether it is the agent's startup message (what it sends first on a connection).
    pub startup: bool,
}

/// Verifies the first message of a connection (`payload` without the 4-byte length).
/// Returns `Ok(None)` for a `#ping` probe, which carries nothing to verify.
///
/// # Errors
/// [`Refusal`] says which check failed.
pub(crate) fn verify_first(
    keys: &KeyStore,
    payload: &[u8],
    source: IpAddr,
) -> Result<Option<Verified>, Refusal> {
    let (agent_id, cipher, ciphertext) = match Envelope::parse(payload) {
        Ok(Envelope::Secure {
            agent_id,
            cipher,
            ciphertext,
        }) => (agent_id, cipher, ciphertext),
        _ => return Ok(None),
    };
    let key = match agent_id {
        Some(id) => {
            let key = keys.get(&id).ok_or(Refusal::UnknownId(id))?;
            if !key.ip().allows(source) {
                return Err(Refusal::SourceNotAllowed {
                    id,
                    source_ip: source,
                    allowed: key.ip().to_string(),
                });
            }
            key
        }
        None => keys.by_ip(source).ok_or(Refusal::UnknownSource(source))?,
    };
    let mut decoder = Decoder::new();
    let opened = decoder
        .open(&key, cipher, ciphertext)
        .map_err(|e: CipherError| Refusal::Undecryptable {
            id: key.id(),
            reason: e.reason(),
        })?;
    let mut info = AgentInfo {
        name: Some(key.name().to_owned()),
        ..AgentInfo::default()
    };
    learn(&mut info, opened.message);
    let counter = crate::session::pack_counter(opened.counters.global, opened.counters.local);
    let startup = matches!(
        control::parse(opened.message),
        Message::Control(Control::Startup(_))
    );
    Ok(Some(Verified {
        key,
        info,
        counter,
        startup,
    }))
}

/// Updates `info` from one decrypted message; returns whether it was a keepalive.
fn learn(info: &mut AgentInfo, message: &[u8]) -> bool {
    match control::parse(message) {
        Message::Control(Control::Startup(s)) => {
            if s.version.is_some() {
                info.version = s.version;
            }
            false
        }
        Message::Control(Control::Keepalive(k)) => {
            if let Some(v) = k.version {
                info.version = Some(v.into_owned());
            }
            info.os = Some(k.uname.into_owned());
            info.last_keepalive = Some(SystemTime::now());
            true
        }
        Message::Control(Control::Shutdown) => {
            info.shutdown = true;
            false
        }
        _ => false,
    }
}

/// Largest ciphertext looked at when searching for a keepalive (they are a few hundred bytes).
const KEEPALIVE_MAX: usize = 4096;
/// Largest ciphertext kept as a possible shutdown message (it is under 100 bytes).
const SHUTDOWN_MAX: usize = 256;
/// Decryptions allowed per [`SCAN_PERIOD`] while a keepalive is due.
const SCAN_BUDGET: u32 = 8;
/// See [`SCAN_BUDGET`].
const SCAN_PERIOD: Duration = Duration::from_millis(100);
/// Time after a keepalive before looking for the next (agents send one every 10-20 s).
const KEEPALIVE_QUIET: Duration = Duration::from_secs(15);

/// Watches one agent's frames for keepalives and its shutdown message.
///
/// Cost: while a keepalive is due, up to 8 small messages per 100 ms are decrypted until one
/// is found; then nothing for 15 s. The last message of each batch, if tiny, is kept
/// (at most 256 bytes) so that the connection's final message can be checked for a shutdown.
pub(crate) struct KeepaliveWatch {
    key: Arc<AgentKey>,
    decoder: Decoder,
    next_scan: Instant,
    budget: u32,
    budget_reset: Instant,
    last_small: Option<(Cipher, Vec<u8>)>,
}

impl std::fmt::Debug for KeepaliveWatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeepaliveWatch")
            .field("agent", &self.key.id())
            .finish_non_exhaustive()
    }
}

impl KeepaliveWatch {
    /// A tracker for the agent whose key verified the first message.
    pub(crate) fn new(key: Arc<AgentKey>) -> KeepaliveWatch {
        let now = Instant::now();
        KeepaliveWatch {
            key,
            decoder: Decoder::new(),
            next_scan: now,
            budget: SCAN_BUDGET,
            budget_reset: now,
            last_small: None,
        }
    }

    /// Looks at one agent -> manager message; returns whether it is a keepalive.
    pub(crate) fn observe(&mut self, env: &Envelope<'_>, session: &Session) -> bool {
        let (Some(cipher), ct) = (env.cipher(), env.ciphertext()) else {
            return false;
        };
        if ct.len() <= SHUTDOWN_MAX {
            let slot = self
                .last_small
                .get_or_insert_with(|| (cipher, Vec::with_capacity(SHUTDOWN_MAX)));
            slot.0 = cipher;
            slot.1.clear();
            slot.1.extend_from_slice(ct);
        } else {
            self.last_small = None;
        }
        if ct.len() > KEEPALIVE_MAX {
            return false;
        }
        let now = Instant::now();
        if now < self.next_scan {
            return false;
        }
        if now >= self.budget_reset {
            self.budget = SCAN_BUDGET;
            self.budget_reset = now + SCAN_PERIOD;
        }
        if self.budget == 0 {
            return false;
        }
        self.budget -= 1;
        if let Ok(opened) = self.decoder.open(&self.key, cipher, ct) {
            session.note_counter(crate::session::pack_counter(
                opened.counters.global,
                opened.counters.local,
            ));
            let mut found = false;
            session.update_agent_info(|info| found = learn(info, opened.message));
            if found {
                self.next_scan = now + KEEPALIVE_QUIET;
            }
            return found;
        }
        false
    }

    /// Called when the agent closed its connection: whether its last message was its shutdown.
    pub(crate) fn ended_cleanly(&mut self, session: &Session) -> bool {
        if let Some((cipher, ct)) = self.last_small.take() {
            if let Ok(opened) = self.decoder.open(&self.key, cipher, &ct) {
                session.update_agent_info(|info| {
                    learn(info, opened.message);
                });
            }
        }
        session.agent_info().shutdown
    }
}
