//! The per-frame events of the session state machine: an agent frame and a manager frame are
//! each judged here, without sockets, and either forwarded (`Ok`) or end the session (`Err`).
//!
//! These run for every frame, inside the pipes' header walk (see [`super::pipe::Pipe::take_frames`]):
//! they are plain functions, inlined, with no allocation and no dynamic dispatch.
//!
//! Identity binding: a session is bound to the identity its first frame established. A frame
//! naming another agent, or naming one on a session identified only by its source address (an
//! ID-less agent, or with keys a `#ping` first), ends the session; with keys, a session whose
//! first frame was not a verified secure message may carry nothing but `#ping`.

use super::End;
use crate::envelope::Envelope;
use crate::session::{Session, SessionKey};
use crate::verify::KeepaliveWatch;

/// The check every agent frame passes: the envelope names the connection's agent and, with
/// client.keys, decrypts; the latest keepalive becomes the frame a new manager sees first.
/// With keys, a session whose first frame was not a verified message (a `#ping`) has no
/// identity and may carry nothing but `#ping`.
pub(super) fn agent_check<'a>(
    key: SessionKey,
    verifying: bool,
    keepalives: Option<&'a mut KeepaliveWatch>,
    replay: &'a mut Vec<u8>,
    session: &'a Session,
) -> impl FnMut(&[u8]) -> Result<(), End> + 'a {
    let mut keepalives = keepalives;
    move |payload: &[u8]| {
        if let Some(t) = keepalives.as_deref_mut() {
            let env = check_agent_frame(key, payload)?;
            if t.observe(&env, session) {
                replay.clear();
                replay.extend_from_slice(payload);
            }
            Ok(())
        } else {
            check_unbound(key, verifying, payload)
        }
    }
}

/// An agent frame on a session without a key keepalives: with keys (`verifying`), the session's
/// first frame was not a verified message, so it may carry only `#ping`; without keys, the
/// frame must name the session's agent (or none, on a source-keyed session).
#[inline]
pub(super) fn check_unbound(key: SessionKey, verifying: bool, payload: &[u8]) -> Result<(), End> {
    if verifying {
        match check_agent_frame(key, payload)? {
            Envelope::Ping => Ok(()),
            _ => Err(End::Unverified),
        }
    } else {
        check_agent_prefix(key, payload)
    }
}

pub(super) fn check_agent_frame(key: SessionKey, payload: &[u8]) -> Result<Envelope<'_>, End> {
    match Envelope::parse(payload) {
        Ok(env) => match (env.agent_id(), key) {
            (Some(id), SessionKey::Agent(owner)) if id != owner => Err(End::AgentIdChanged),
            // A session not identified by its first frame (ID-less, or a `#ping`) carries no
            // agent ID later: it would be routed and counted as something it never proved.
            (Some(_), SessionKey::Source(_)) => Err(End::AgentIdChanged),
            _ => Ok(env),
        },
        Err(e) => Err(End::AgentEnvelope(e)),
    }
}

/// The per-frame check of an agent's stream without keys: the `!ID!` prefix of the
/// connection's agent and a cipher tag, compared in place (no parsing on the fast path).
#[inline]
pub(super) fn check_agent_prefix(key: SessionKey, payload: &[u8]) -> Result<(), End> {
    if let SessionKey::Agent(id) = key {
        let id = id.as_bytes();
        if let Some(rest) = payload
            .strip_prefix(b"!")
            .and_then(|p| p.strip_prefix(id))
            .and_then(|p| p.strip_prefix(b"!"))
        {
            if rest.starts_with(b"#AES:") || rest.first() == Some(&b':') {
                return Ok(());
            }
        }
    }
    // Anything else (ID-less, #ping, or wrong): the full parse says exactly what.
    check_agent_frame(key, payload).map(drop)
}

pub(super) fn check_manager_frame(payload: &[u8]) -> Result<(), End> {
    // Managers never prefix an ID; anything else than a tagged ciphertext or #pong would make
    // the agent log an error, so it is not forwarded.
    match Envelope::parse(payload) {
        Ok(Envelope::Secure { agent_id: None, .. }) | Ok(Envelope::Pong) => Ok(()),
        Ok(_) => Err(End::ManagerProtocol("agent ID prefix on a manager frame")),
        Err(e) => Err(End::ManagerProtocol(e.reason())),
    }
}
