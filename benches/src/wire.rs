//! Frames on the socket and the texts the fleet sends.
//!
//! An event is `1:/var/log/test:<seq> <filler>` where `<seq>` counts the agent's events from 1
//! across reconnections. Events replayed from a pre-built pool (flat-out mode) say so with
//! `cycle=<P>` after the sequence number: their numbers run 1..=P over and over.

use std::sync::Arc;
use tokio::io::{AsyncRead, AsyncReadExt};

use wazuh_proxy_core::cipher::{self, Counters};
use wazuh_proxy_core::envelope::Cipher;
use wazuh_proxy_core::frame::{check_header, HEADER_LEN, MAX_PAYLOAD};
use wazuh_proxy_core::keys::AgentKey;

use crate::FleetError;

/// The location every fleet event names.
pub const EVENT_PREFIX: &[u8] = b"1:/var/log/test:";

/// The text of the stand-in manager's echo of event `seq` (latency measurements).
pub fn echo_text(seq: u64) -> String {
    format!("#!-echo {seq}")
}

/// The sequence number of an echo text.
pub fn echo_seq(message: &[u8]) -> Option<u64> {
    parse_u64(message.strip_prefix(b"#!-echo ")?).map(|(n, _)| n)
}

fn parse_u64(text: &[u8]) -> Option<(u64, &[u8])> {
    let end = text
        .iter()
        .position(|b| !b.is_ascii_digit())
        .unwrap_or(text.len());
    if end == 0 || end > 19 {
        return None;
    }
    let n = std::str::from_utf8(&text[..end]).ok()?.parse().ok()?;
    Some((n, &text[end..]))
}

/// The sequence number and cycle length (0: no cycle) of a fleet event, `None` for any other
/// message.
///
/// ```
/// use wazuh_proxy_benches::wire::{event_seq, EventText};
/// let mut t = EventText::new(1);
/// let mut buf = Vec::new();
/// t.write(&mut buf, 42, 0, 64);
/// assert_eq!(buf.len(), 64);
/// assert_eq!(event_seq(&buf), Some((42, 0)));
/// t.write(&mut buf, 7, 16, 300);
/// assert_eq!(event_seq(&buf), Some((7, 16)));
/// ```
pub fn event_seq(message: &[u8]) -> Option<(u64, u64)> {
    let (seq, rest) = parse_u64(message.strip_prefix(EVENT_PREFIX)?)?;
    let cycle = match rest.strip_prefix(b" cycle=") {
        Some(r) => parse_u64(r)?.0,
        None => 0,
    };
    Some((seq, cycle))
}

/// Builds event texts with pseudo-random printable filler (about as compressible as logs).
#[derive(Debug, Clone)]
pub struct EventText {
    rng: u64,
}

impl EventText {
    /// A builder whose filler is seeded by `seed` (e.g. the agent's index).
    pub fn new(seed: u64) -> EventText {
        EventText {
            rng: seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1,
        }
    }

    /// Replaces `out` with the event `seq` (with `cycle=` when `cycle` is not 0), padded to
    /// `size` bytes (never shorter than the header).
    pub fn write(&mut self, out: &mut Vec<u8>, seq: u64, cycle: u64, size: usize) {
        const FILL: &[u8; 64] = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 .";
        out.clear();
        out.extend_from_slice(EVENT_PREFIX);
        out.extend_from_slice(seq.to_string().as_bytes());
        if cycle != 0 {
            out.extend_from_slice(format!(" cycle={cycle}").as_bytes());
        }
        out.push(b' ');
        while out.len() < size {
            // xorshift64: cheap, and one draw gives ten filler characters.
            let mut x = self.rng;
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            self.rng = x;
            for i in 0..10 {
                if out.len() >= size {
                    break;
                }
                out.push(FILL[((x >> (6 * i)) & 63) as usize]);
            }
        }
    }
}

/// One side's sealing state: key, cipher and counters. The compressor is the thread's (see
/// [`cipher::agent_payload`]), so ten thousand agents do not hold ten thousand deflate states.
pub struct Sealer {
    key: Arc<AgentKey>,
    cipher: Cipher,
    counters: Counters,
    agent_side: bool,
}

impl std::fmt::Debug for Sealer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sealer")
            .field("agent", &self.key.id().as_str())
            .field("cipher", &self.cipher.name())
            .finish()
    }
}

impl Sealer {
    /// A sealer for agent -> manager messages (`agent_side`: `!ID!` written as the key's IP
    /// column asks) or manager -> agent messages (never prefixed). `rnd` seeds the RND field.
    pub fn new(key: Arc<AgentKey>, cipher: Cipher, agent_side: bool, rnd: u32) -> Sealer {
        Sealer {
            key,
            cipher,
            counters: Counters {
                rnd: rnd % 65536,
                global: 0,
                local: 0,
            },
            agent_side,
        }
    }

    /// The key this sealer uses.
    pub fn key(&self) -> &Arc<AgentKey> {
        &self.key
    }

    /// The cipher this sealer uses.
    pub fn cipher(&self) -> Cipher {
        self.cipher
    }

    /// Appends one whole frame (length, envelope, ciphertext) carrying `message` to `out`.
    ///
    /// # Errors
    /// [`FleetError::Protocol`] when the message cannot be sealed (too large).
    pub fn frame_into(&mut self, message: &[u8], out: &mut Vec<u8>) -> Result<(), FleetError> {
        self.counters.advance();
        let payload = if self.agent_side {
            cipher::agent_payload(&self.key, self.cipher, &self.counters, message)
        } else {
            cipher::manager_payload(&self.key, self.cipher, &self.counters, message)
        }
        .map_err(|e| FleetError::Protocol(format!("sealing a message: {e}")))?;
        let len = u32::try_from(payload.len())
            .ok()
            .filter(|&l| l <= MAX_PAYLOAD)
            .ok_or_else(|| {
                FleetError::Protocol(format!("payload of {} bytes is too long", payload.len()))
            })?;
        out.extend_from_slice(&len.to_le_bytes());
        out.extend_from_slice(&payload);
        Ok(())
    }

    /// One whole frame carrying `message`.
    ///
    /// # Errors
    /// See [`Sealer::frame_into`].
    pub fn frame(&mut self, message: &[u8]) -> Result<Vec<u8>, FleetError> {
        let mut out = Vec::with_capacity(message.len() + 96);
        self.frame_into(message, &mut out)?;
        Ok(out)
    }
}

/// Reads one frame's payload into `buf`; `Ok(false)` on a clean end of stream before a header.
///
/// # Errors
/// [`FleetError::Io`] on a socket error or a stream cut inside a frame,
/// [`FleetError::Protocol`] on a bad length.
pub async fn read_frame<R: AsyncRead + Unpin>(
    r: &mut R,
    buf: &mut Vec<u8>,
) -> Result<bool, FleetError> {
    let mut header = [0u8; HEADER_LEN];
    let mut got = 0;
    while got < HEADER_LEN {
        let n = r
            .read(&mut header[got..])
            .await
            .map_err(|e| FleetError::io("reading a frame header", e))?;
        if n == 0 {
            if got == 0 {
                return Ok(false);
            }
            return Err(FleetError::Protocol(
                "stream ended inside a frame header".into(),
            ));
        }
        got += n;
    }
    let len = check_header(header, MAX_PAYLOAD)
        .map_err(|e| FleetError::Protocol(format!("frame header: {e}")))?;
    buf.clear();
    buf.resize(len, 0);
    r.read_exact(buf)
        .await
        .map_err(|e| FleetError::io(format!("reading a {len}-byte frame body"), e))?;
    Ok(true)
}
