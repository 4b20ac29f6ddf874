//! The secure envelope's clear-text header: agent ID and cipher, read without decrypting.
//!
//! ```text
//! agent -> manager, prefixed:   "!" ID "!" TAG CIPHERTEXT
//! agent -> manager, ID-less:            TAG CIPHERTEXT
//! manager -> agent (always):            TAG CIPHERTEXT
//! TAG = "#AES:" (AES) or ":" (Blowfish)
//! ```
//!
//! The ciphertext is binary and may hold any byte, so nothing past the tag is ever searched.
//! Parsing borrows the payload and costs at most a few dozen byte comparisons.
//!
//! ```
//! use wazuh_proxy_core::envelope::{Envelope, Cipher};
//! let env = Envelope::parse(b"!001!#AES:\x01\x02").unwrap();
//! assert_eq!(env.agent_id().unwrap().as_str(), "001");
//! assert_eq!(env.cipher(), Some(Cipher::Aes));
//! assert_eq!(env.ciphertext(), b"\x01\x02");
//! ```

use std::fmt;

/// The longest agent ID accepted (client.keys IDs have 1 to 8 digits).
pub const MAX_ID_LEN: usize = 8;

/// An agent ID exactly as written in `client.keys` (leading zeros kept: `001` is not `1`).
///
/// Stored inline: copying it costs nothing and it never allocates.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AgentId {
    len: u8,
    digits: [u8; MAX_ID_LEN],
}

impl AgentId {
    /// Parses 1 to 8 ASCII digits.
    ///
    /// ```
    /// use wazuh_proxy_core::envelope::AgentId;
    /// assert_eq!(AgentId::parse(b"042").unwrap().to_string(), "042");
    /// assert!(AgentId::parse(b"").is_none());
    /// assert!(AgentId::parse(b"123456789").is_none());
    /// assert!(AgentId::parse(b"12a").is_none());
    /// ```
    pub fn parse(text: &[u8]) -> Option<AgentId> {
        if text.is_empty() || text.len() > MAX_ID_LEN || !text.iter().all(u8::is_ascii_digit) {
            return None;
        }
        let mut digits = [0u8; MAX_ID_LEN];
        digits[..text.len()].copy_from_slice(text);
        Some(AgentId {
            len: text.len() as u8,
            digits,
        })
    }

    /// The ID's bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.digits[..self.len as usize]
    }

    /// The ID as text.
    pub fn as_str(&self) -> &str {
        // Only ASCII digits are ever stored (see `parse`).
        std::str::from_utf8(self.as_bytes()).unwrap_or("")
    }
}

impl std::str::FromStr for AgentId {
    type Err = EnvelopeError;
    fn from_str(s: &str) -> Result<Self, EnvelopeError> {
        AgentId::parse(s.as_bytes()).ok_or(EnvelopeError::BadId)
    }
}

impl fmt::Display for AgentId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Debug for AgentId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "AgentId({})", self.as_str())
    }
}

/// The cipher an envelope's tag names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Cipher {
    /// `#AES:`: AES-256-CBC (the default since 3.5).
    Aes,
    /// `:`: Blowfish-CBC.
    Blowfish,
}

impl Cipher {
    /// The tag that precedes the ciphertext.
    pub fn tag(self) -> &'static [u8] {
        match self {
            Cipher::Aes => b"#AES:",
            Cipher::Blowfish => b":",
        }
    }

    /// A short lowercase name (`aes`, `blowfish`).
    pub fn name(self) -> &'static str {
        match self {
            Cipher::Aes => "aes",
            Cipher::Blowfish => "blowfish",
        }
    }
}

/// Why a payload is not a well-formed envelope.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum EnvelopeError {
    /// An empty payload.
    #[error("empty payload")]
    Empty,
    /// `!` not followed by 1 to 8 digits and a closing `!`.
    #[error("malformed agent ID after '!' (expected 1 to 8 digits and '!')")]
    BadId,
    /// Neither `#AES:` nor `:` where the cipher tag belongs.
    #[error("unknown cipher tag (expected '#AES:' or ':')")]
    UnknownTag,
}

impl EnvelopeError {
    /// A short static name for logs and metric labels.
    pub fn reason(&self) -> &'static str {
        match self {
            EnvelopeError::Empty => "empty",
            EnvelopeError::BadId => "bad_id",
            EnvelopeError::UnknownTag => "unknown_tag",
        }
    }
}

/// What a payload is, as far as the clear-text header tells.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Envelope<'a> {
    /// An encrypted message; `agent_id` is `None` for ID-less agents (fixed-IP keys) and for
    /// every manager -> agent message.
    Secure {
        /// The `!ID!` prefix, if present.
        agent_id: Option<AgentId>,
        /// The cipher the tag names.
        cipher: Cipher,
        /// Everything after the tag.
        ciphertext: &'a [u8],
    },
    /// The clear-text `#ping` health probe (4.0/4.1 agents).
    Ping,
    /// The clear-text `#pong` answer.
    Pong,
}

impl<'a> Envelope<'a> {
    /// Reads the header of one frame's payload (without the 4-byte length).
    ///
    /// # Errors
    /// [`EnvelopeError`] names the rule that broke.
    pub fn parse(payload: &'a [u8]) -> Result<Envelope<'a>, EnvelopeError> {
        match payload.first() {
            None => Err(EnvelopeError::Empty),
            Some(b'!') => {
                let rest = &payload[1..];
                // Look for the closing '!' within 1..=8 digits only.
                let window = &rest[..rest.len().min(MAX_ID_LEN + 1)];
                let end = window
                    .iter()
                    .position(|&b| b == b'!')
                    .ok_or(EnvelopeError::BadId)?;
                let agent_id = AgentId::parse(&rest[..end]).ok_or(EnvelopeError::BadId)?;
                let (cipher, ciphertext) = split_tag(&rest[end + 1..])?;
                Ok(Envelope::Secure {
                    agent_id: Some(agent_id),
                    cipher,
                    ciphertext,
                })
            }
            Some(_) if payload == b"#ping" => Ok(Envelope::Ping),
            Some(_) if payload == b"#pong" => Ok(Envelope::Pong),
            Some(_) => {
                let (cipher, ciphertext) = split_tag(payload)?;
                Ok(Envelope::Secure {
                    agent_id: None,
                    cipher,
                    ciphertext,
                })
            }
        }
    }

    /// The `!ID!` prefix's agent ID, if any.
    pub fn agent_id(&self) -> Option<AgentId> {
        match self {
            Envelope::Secure { agent_id, .. } => *agent_id,
            _ => None,
        }
    }

    /// The cipher, for encrypted messages.
    pub fn cipher(&self) -> Option<Cipher> {
        match self {
            Envelope::Secure { cipher, .. } => Some(*cipher),
            _ => None,
        }
    }

    /// The ciphertext (empty for `#ping`/`#pong`).
    pub fn ciphertext(&self) -> &'a [u8] {
        match self {
            Envelope::Secure { ciphertext, .. } => ciphertext,
            _ => &[],
        }
    }
}

fn split_tag(rest: &[u8]) -> Result<(Cipher, &[u8]), EnvelopeError> {
    if let Some(ct) = rest.strip_prefix(b"#AES:") {
        Ok((Cipher::Aes, ct))
    } else if let Some(ct) = rest.strip_prefix(b":") {
        Ok((Cipher::Blowfish, ct))
    } else {
        Err(EnvelopeError::UnknownTag)
    }
}

/// Builds the clear-text header for an agent -> manager payload: `!ID!` (when `agent_id` is
/// given) and the cipher tag. Encryption itself lives in the `cipher` module.
pub fn write_header(out: &mut Vec<u8>, agent_id: Option<AgentId>, cipher: Cipher) {
    if let Some(id) = agent_id {
        out.push(b'!');
        out.extend_from_slice(id.as_bytes());
        out.push(b'!');
    }
    out.extend_from_slice(cipher.tag());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixed_and_id_less() {
        let e = Envelope::parse(b"!12345678!:xyz").unwrap();
        assert_eq!(e.agent_id().unwrap().as_str(), "12345678");
        assert_eq!(e.cipher(), Some(Cipher::Blowfish));
        assert_eq!(e.ciphertext(), b"xyz");
        let e = Envelope::parse(b"#AES::!!").unwrap();
        assert_eq!(e.agent_id(), None);
        assert_eq!(e.cipher(), Some(Cipher::Aes));
        assert_eq!(e.ciphertext(), b":!!");
        assert_eq!(Envelope::parse(b"#ping"), Ok(Envelope::Ping));
        assert_eq!(Envelope::parse(b"#pong"), Ok(Envelope::Pong));
    }

    #[test]
    fn malformed() {
        for bad in [
            &b"!"[..],
            b"!!#AES:",
            b"!123456789!#AES:",
            b"!12a!#AES:",
            b"!001",
            b"!001#AES:",
        ] {
            assert_eq!(Envelope::parse(bad), Err(EnvelopeError::BadId), "{bad:?}");
        }
        for bad in [
            &b"!001!#AE"[..],
            b"!001!x",
            b"GET / HTTP/1.1",
            b"#pin",
            b"\x16\x03\x01",
        ] {
            assert_eq!(
                Envelope::parse(bad),
                Err(EnvelopeError::UnknownTag),
                "{bad:?}"
            );
        }
        assert_eq!(Envelope::parse(b""), Err(EnvelopeError::Empty));
    }

    #[test]
    fn header_round_trip() {
        let mut out = Vec::new();
        write_header(&mut out, AgentId::parse(b"007"), Cipher::Aes);
        out.extend_from_slice(b"ct");
        let e = Envelope::parse(&out).unwrap();
        assert_eq!(e.agent_id(), AgentId::parse(b"007"));
        assert_eq!(e.ciphertext(), b"ct");
    }
}
