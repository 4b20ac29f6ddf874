//! The manager's answer to an enrollment request.
//!
//! ```text
//! OSSEC K:'<ID> <NAME> <IP> <KEY>'     success (3.x and the QA simulators add line feeds)
//! ERROR: <text>. Unable to add agent    refusal (4.13+; older managers differ, see below)
//! ```
//!
//! ```
//! use wazuh_proxy_core::enroll::EnrollReply;
//! let reply = EnrollReply::parse(b"OSSEC K:'003 web-01 any 2516cd7d80fbbf04'");
//! let EnrollReply::Key(key) = &reply else { panic!() };
//! assert_eq!((key.id(), key.name(), key.ip()), ("003", "web-01", "any"));
//! assert!(!format!("{reply:?}").contains("2516cd7d80fbbf04"));
//! assert!(EnrollReply::parse(b"ERROR: Duplicate agent name: web-01. Unable to add agent").is_error());
//! ```

use std::fmt;

use zeroize::Zeroizing;

use crate::keys::KeyIp;

use super::request::valid_name;

/// What 4.13+ managers append to every refusal.
pub const ERROR_SUFFIX: &str = ". Unable to add agent";

/// The reply an agent gets for a refused request, in the 4.13+ form: the error text and
/// [`ERROR_SUFFIX`] in one write, no line feed. Agents of every 4.x version accept it (they log
/// whatever follows `ERROR: `).
pub fn error_reply(text: &str) -> Vec<u8> {
    format!("{text}{ERROR_SUFFIX}").into_bytes()
}

/// A key issued by the manager. The key is zeroized on drop and never shown by `Debug`.
#[derive(Clone, PartialEq, Eq)]
pub struct IssuedKey {
    id: String,
    name: String,
    ip: String,
    key: Zeroizing<String>,
}

impl IssuedKey {
    /// The agent ID the manager assigned.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The agent name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The IP column (`any`, an address or a network).
    pub fn ip(&self) -> &str {
        &self.ip
    }

    /// The key. Handle with care: never log it.
    pub fn key(&self) -> &str {
        &self.key
    }
}

impl fmt::Debug for IssuedKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IssuedKey")
            .field("id", &self.id)
            .field("name", &self.name)
            .field("ip", &self.ip)
            .field("key", &"<redacted>")
            .finish()
    }
}

/// A manager reply, classified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EnrollReply {
    /// `OSSEC K:'...'` with four valid fields.
    Key(IssuedKey),
    /// Anything else: the text as received (lossy UTF-8, surrounding whitespace trimmed). An
    /// empty text means the manager closed without answering.
    Error(String),
}

impl EnrollReply {
    /// Classifies a whole reply. A reply is a key only when the agent itself would accept it:
    /// it starts with `OSSEC K:'`, the fields up to the next `'` are ID (1 to 8 digits), a valid
    /// name, an IP column and a key of `[A-Za-z0-9_.-]`, as the agent checks them.
    pub fn parse(reply: &[u8]) -> EnrollReply {
        match parse_key(reply) {
            Some(key) => EnrollReply::Key(key),
            None => EnrollReply::Error(String::from_utf8_lossy(reply).trim().to_owned()),
        }
    }

    /// Whether this is a key.
    pub fn is_key(&self) -> bool {
        matches!(self, EnrollReply::Key(_))
    }

    /// Whether this is a refusal (or no answer).
    pub fn is_error(&self) -> bool {
        matches!(self, EnrollReply::Error(_))
    }
}

/// How far a manager's reply has come, judged from the bytes received so far.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplyProgress {
    /// Nothing yet, or the start of `OSSEC K:'` without its closing quote: wait for more.
    Partial,
    /// A key reply, complete up to its closing quote; the value is its length, line feeds
    /// already received right after the quote included (3.x and the QA simulators send them).
    /// Nothing the agent needs follows: answer it now, whether or not the manager closes.
    Key(usize),
    /// Anything else (a refusal): complete only when the manager closes or goes quiet, since
    /// 4.0-4.12 managers send it in two writes.
    Other,
}

/// Where a reply stands after `received` (pure; see [`ReplyProgress`]).
///
/// ```
/// use wazuh_proxy_core::enroll::reply::{reply_progress, ReplyProgress};
/// assert_eq!(reply_progress(b"OSSEC K:'001 a1 any k"), ReplyProgress::Partial);
/// assert_eq!(reply_progress(b"OSSEC K:'001 a1 any k'\n"), ReplyProgress::Key(23));
/// assert_eq!(reply_progress(b"ERROR: Invalid password"), ReplyProgress::Other);
/// ```
pub fn reply_progress(received: &[u8]) -> ReplyProgress {
    const PREFIX: &[u8] = b"OSSEC K:'";
    if received.len() < PREFIX.len() {
        return if PREFIX.starts_with(received) {
            ReplyProgress::Partial
        } else {
            ReplyProgress::Other
        };
    }
    if !received.starts_with(PREFIX) {
        return ReplyProgress::Other;
    }
    match received[PREFIX.len()..].iter().position(|&b| b == b'\'') {
        Some(at) => {
            let mut end = PREFIX.len() + at + 1;
            while matches!(received.get(end), Some(b'\n' | b'\r')) {
                end += 1;
            }
            ReplyProgress::Key(end)
        }
        None => ReplyProgress::Partial,
    }
}

fn parse_key(reply: &[u8]) -> Option<IssuedKey> {
    let body = reply.strip_prefix(b"OSSEC K:'")?;
    let end = body.iter().position(|&b| b == b'\'')?;
    let fields = std::str::from_utf8(&body[..end]).ok()?;
    // Only line feeds may follow (3.x sends two, the simulators one).
    if !body[end + 1..].iter().all(|&b| b == b'\n' || b == b'\r') {
        return None;
    }
    let mut parts = fields.splitn(4, ' ');
    let (id, name, ip, key) = (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    let id_ok = (1..=8).contains(&id.len()) && id.bytes().all(|b| b.is_ascii_digit());
    // The agent checks the key with the name rule's character set, without its length bounds.
    let key_ok = !key.is_empty()
        && key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'));
    (id_ok && valid_name(name) && KeyIp::parse(ip).is_some() && key_ok).then(|| IssuedKey {
        id: id.to_owned(),
        name: name.to_owned(),
        ip: ip.to_owned(),
        key: Zeroizing::new(key.to_owned()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys() {
        for line in [
            &b"OSSEC K:'003 web-01 any 2516cd7d80fbbf0462a4bf315d80f37a'"[..],
            b"OSSEC K:'003 web-01 any 2516cd7d80fbbf0462a4bf315d80f37a'\n",
            b"OSSEC K:'003 web-01 any 2516cd7d80fbbf0462a4bf315d80f37a'\n\n",
            b"OSSEC K:'001 a1 10.0.0.0/24 TopSecret'\n",
            b"OSSEC K:'12345678 a1 2001:db8::1 k'",
        ] {
            assert!(
                matches!(EnrollReply::parse(line), EnrollReply::Key(_)),
                "{line:?}"
            );
        }
    }

    #[test]
    fn errors() {
        for line in [
            &b"ERROR: Duplicate agent name: web-01. Unable to add agent"[..],
            b"ERROR",
            b"",
            b". Unable to add agent",
            b"OSSEC K:'003 web-01 any'",
            b"OSSEC K:'x03 web-01 any k'",
            b"OSSEC K:'003 web-01 nowhere k'",
            b"OSSEC K:'003 web-01 any k'junk",
            b"OSSEC K:'003 web-01 any k",
        ] {
            assert!(EnrollReply::parse(line).is_error(), "{line:?}");
        }
        assert_eq!(
            EnrollReply::parse(b"ERROR: Invalid password\n"),
            EnrollReply::Error("ERROR: Invalid password".into())
        );
    }

    #[test]
    fn progress() {
        for partial in [
            &b""[..],
            b"O",
            b"OSSEC K",
            b"OSSEC K:'",
            b"OSSEC K:'001 a1 any 0123",
        ] {
            assert_eq!(
                reply_progress(partial),
                ReplyProgress::Partial,
                "{partial:?}"
            );
        }
        for other in [
            &b"E"[..],
            b"ERROR: Invalid password",
            b"OSSEC A:'x'",
            b". Unable to add agent",
        ] {
            assert_eq!(reply_progress(other), ReplyProgress::Other, "{other:?}");
        }
        assert_eq!(
            reply_progress(b"OSSEC K:'001 a1 any k'"),
            ReplyProgress::Key(22)
        );
        assert_eq!(
            reply_progress(b"OSSEC K:'001 a1 any k'\n\n"),
            ReplyProgress::Key(24)
        );
        // Whatever follows the quote and its line feeds is not part of the reply.
        assert_eq!(
            reply_progress(b"OSSEC K:'001 a1 any k'\nxyz"),
            ReplyProgress::Key(23)
        );
    }

    #[test]
    fn error_reply_format() {
        assert_eq!(
            error_reply("ERROR: Invalid agent name: x"),
            b"ERROR: Invalid agent name: x. Unable to add agent".to_vec()
        );
    }
}
