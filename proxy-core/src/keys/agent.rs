//! One agent's key: the IP column of `client.keys` and the derivation of the cipher keys.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::OnceLock;

use blowfish::Blowfish;
use md5::{Digest, Md5};
use zeroize::Zeroizing;

use crate::envelope::AgentId;

use super::{AES_KEY_LEN, DERIVED_KEY_LEN};

const HEX: &[u8; 16] = b"0123456789abcdef";

/// The 32-character lowercase hex MD5 of `data`.
pub(crate) fn md5_hex(data: &[u8]) -> [u8; 32] {
    hex32(&Md5::digest(data).into())
}

/// Lowercase hex of a 16-byte digest.
pub(crate) fn hex32(digest: &[u8; 16]) -> [u8; 32] {
    let mut out = [0u8; 32];
    for (i, b) in digest.iter().enumerate() {
        out[2 * i] = HEX[usize::from(b >> 4)];
        out[2 * i + 1] = HEX[usize::from(b & 0x0f)];
    }
    out
}

/// The IP column of a key line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum KeyIp {
    /// `any`: the agent may connect from anywhere (the 4.x enrollment default).
    Any,
    /// One address without a prefix length.
    Host(IpAddr),
    /// An address with a prefix length (`10.0.0.0/8`, `2001:db8::/32`, or a dotted IPv4 mask).
    Network {
        /// The address part, as written.
        addr: IpAddr,
        /// The prefix length.
        prefix: u8,
    },
}

impl KeyIp {
    /// Parses the IP column: `any`, an address, or `address/prefix` (prefix as a length or, for
    /// IPv4, a dotted mask).
    pub fn parse(text: &str) -> Option<KeyIp> {
        if text.eq_ignore_ascii_case("any") {
            return Some(KeyIp::Any);
        }
        let Some((addr, prefix)) = text.split_once('/') else {
            return text.parse().ok().map(KeyIp::Host);
        };
        let addr: IpAddr = addr.parse().ok()?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix.parse::<u8>() {
            Ok(p) => p,
            Err(_) if addr.is_ipv4() => mask_to_prefix(prefix.parse::<Ipv4Addr>().ok()?)?,
            Err(_) => return None,
        };
        (prefix <= max).then_some(KeyIp::Network { addr, prefix })
    }

    /// The address the manager matches ID-less messages against: the IP column with any CIDR
    /// suffix dropped (`None` for `any`).
    pub(crate) fn lookup_addr(&self) -> Option<IpAddr> {
        match *self {
            KeyIp::Any => None,
            KeyIp::Host(a) | KeyIp::Network { addr: a, .. } => Some(a),
        }
    }

    /// Whether an agent with this IP column prefixes its messages with `!ID!`: every form except
    /// a single IPv4 host does.
    pub fn sends_id_prefix(&self) -> bool {
        !matches!(self, KeyIp::Host(IpAddr::V4(_)))
    }

    /// The manager's source-address rule for prefixed messages: `any` matches everything, a
    /// network must contain the source, a host must equal it.
    pub fn allows(&self, source: IpAddr) -> bool {
        let source = source.to_canonical();
        match *self {
            KeyIp::Any => true,
            KeyIp::Host(a) => a == source,
            KeyIp::Network { addr, prefix } => match (addr, source) {
                (IpAddr::V4(n), IpAddr::V4(s)) => {
                    let mask = u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0);
                    u32::from(n) & mask == u32::from(s) & mask
                }
                (IpAddr::V6(n), IpAddr::V6(s)) => {
                    let mask = u128::MAX.checked_shl(128 - u32::from(prefix)).unwrap_or(0);
                    u128::from(n) & mask == u128::from(s) & mask
                }
                _ => false,
            },
        }
    }
}

impl fmt::Display for KeyIp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KeyIp::Any => f.write_str("any"),
            KeyIp::Host(a) => write!(f, "{a}"),
            KeyIp::Network { addr, prefix } => write!(f, "{addr}/{prefix}"),
        }
    }
}

fn mask_to_prefix(mask: Ipv4Addr) -> Option<u8> {
    let m = u32::from(mask);
    let ones = m.leading_ones();
    // A netmask must be contiguous ones followed by zeros.
    (m.checked_shl(ones).unwrap_or(0) == 0).then_some(ones as u8)
}

/// One agent's identity and key material.
///
/// Only the derived keys are kept (the KEY column itself is not needed once they are derived),
/// and they are zeroized on drop; `Debug` shows only the ID, name and IP column.
pub struct AgentKey {
    id: AgentId,
    name: Box<str>,
    ip: KeyIp,
    derived: Zeroizing<[u8; DERIVED_KEY_LEN]>,
    // Blowfish's key schedule costs about 500 block encryptions, so it is built once, on
    // first use: agents that only speak AES never pay its 4 KiB.
    blowfish: OnceLock<Box<Blowfish>>,
}

impl AgentKey {
    /// Builds an agent's key from its `client.keys` fields, deriving the cipher keys as the
    /// manager does.
    pub fn new(id: AgentId, name: &str, ip: KeyIp, key: &[u8]) -> AgentKey {
        AgentKey {
            id,
            name: name.into(),
            ip,
            derived: derive(id.as_bytes(), name.as_bytes(), key),
            blowfish: OnceLock::new(),
        }
    }

    /// The agent ID.
    pub fn id(&self) -> AgentId {
        self.id
    }

    /// The agent name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The IP column.
    pub fn ip(&self) -> KeyIp {
        self.ip
    }

    /// Whether this agent prefixes its messages with `!ID!` (see [`KeyIp::sends_id_prefix`]).
    pub fn sends_id_prefix(&self) -> bool {
        self.ip.sends_id_prefix()
    }

    /// The AES-256 key: the 32 ASCII bytes of `md5hex(KEY)` (secret).
    pub fn aes_key(&self) -> &[u8; AES_KEY_LEN] {
        // The first 32 bytes of a 47-byte array always form a 32-byte array.
        self.derived
            .first_chunk::<AES_KEY_LEN>()
            .unwrap_or(&[0; AES_KEY_LEN])
    }

    /// The Blowfish key: all 47 bytes of the derived key (secret).
    pub fn blowfish_key(&self) -> &[u8; DERIVED_KEY_LEN] {
        &self.derived
    }

    /// The Blowfish cipher for this key, built on first use and kept.
    pub(crate) fn blowfish(&self) -> &Blowfish {
        self.blowfish.get_or_init(|| {
            // 47 bytes is within Blowfish's 4..=56 byte key range, so this cannot fail; the
            // fallback only keeps the function total.
            Box::new(
                <Blowfish as blowfish::cipher::KeyInit>::new_from_slice(&self.derived[..])
                    .unwrap_or_else(|_| {
                        <Blowfish as blowfish::cipher::KeyInit>::new(&[0u8; 56].into())
                    }),
            )
        })
    }
}

impl fmt::Debug for AgentKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AgentKey")
            .field("id", &self.id)
            .field("name", &self.name)
            .field("ip", &self.ip)
            .field("key", &"<redacted>")
            .finish()
    }
}

/// The manager's key derivation:
/// `md5hex(KEY) || md5hex(md5hex(NAME) || md5hex(ID))[..15]`.
fn derive(id: &[u8], name: &[u8], key: &[u8]) -> Zeroizing<[u8; DERIVED_KEY_LEN]> {
    let mut out = Zeroizing::new([0u8; DERIVED_KEY_LEN]);
    let mut ni = [0u8; 64];
    ni[..32].copy_from_slice(&md5_hex(name));
    ni[32..].copy_from_slice(&md5_hex(id));
    let h_ni = md5_hex(&ni);
    let h_key = Zeroizing::new(md5_hex(key));
    out[..32].copy_from_slice(&h_key[..]);
    out[32..].copy_from_slice(&h_ni[..15]);
    out
}
