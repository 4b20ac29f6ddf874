//! Offline decoding of captured 1514 traffic with the agents' keys: reads captures (base64
//! lines, raw length-prefixed frames, or a classic/pcapng capture of a TCP port), splits them
//! into payloads, and decrypts and classifies each one.
//!
//! ```
//! use wazuh_proxy_core::inspect::{read_capture, Direction, Inspector};
//! use wazuh_proxy_core::keys::KeySet;
//! use wazuh_proxy_core::cipher::{self, Counters};
//! use wazuh_proxy_core::envelope::Cipher;
//!
//! let (keys, _) = KeySet::parse(b"001 web-01 any 61f01f71\n");
//! let key = keys.iter().next().unwrap().clone();
//! let payload = cipher::agent_payload(&key, Cipher::Aes, &Counters::default(), b"#!-agent startup ").unwrap();
//! let frame = wazuh_proxy_core::frame::encode_frame(&payload, 65536).unwrap();
//! let captured = read_capture(&frame, Direction::AgentToManager, 1514);
//! let mut inspector = Inspector::new(keys.into());
//! let out = inspector.inspect(captured[0].as_ref().unwrap());
//! assert_eq!(out.kind, Some("startup"));
//! ```

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::Arc;

use crate::cipher::{Counters, Decoder};
use crate::control;
use crate::envelope::{AgentId, Cipher, Envelope};
use crate::frame::{self, MAX_PAYLOAD};
use crate::keys::{AgentKey, KeySet};

/// Which way a payload travelled.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Direction {
    /// Agent to manager.
    AgentToManager,
    /// Manager to agent.
    ManagerToAgent,
}

impl Direction {
    /// `agent_to_manager` or `manager_to_agent`.
    pub fn name(self) -> &'static str {
        match self {
            Direction::AgentToManager => "agent_to_manager",
            Direction::ManagerToAgent => "manager_to_agent",
        }
    }
}

/// A TCP connection between an agent and a manager, as seen in a capture.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Connection {
    /// Agent address and port.
    pub agent: (IpAddr, u16),
    /// Manager address and port.
    pub manager: (IpAddr, u16),
}

/// One payload read from a capture.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Captured {
    /// Where it came from (`line 3`, `frame 2`, `10.0.0.5:40000 -> 10.0.0.1:1514 frame 1`).
    pub origin: String,
    /// Which way it travelled.
    pub direction: Direction,
    /// The TCP connection, for pcap input.
    pub connection: Option<Connection>,
    /// The payload, without the 4-byte length.
    pub payload: Vec<u8>,
}

/// Why part of a capture could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CaptureError {
    /// A base64 line did not decode.
    #[error("{origin}: invalid base64")]
    Base64 {
        /// Where.
        origin: String,
    },
    /// Framing broke (bad length or truncated stream).
    #[error("{origin}: {error}")]
    Frame {
        /// Where.
        origin: String,
        /// What.
        error: frame::FrameError,
    },
    /// The capture file is malformed.
    #[error("capture: {0}")]
    Pcap(String),
    /// A TCP stream has a hole (lost segments): frames after it are not decoded.
    #[error("{origin}: missing TCP data at stream offset {offset}")]
    Gap {
        /// The flow.
        origin: String,
        /// Bytes decoded before the gap.
        offset: u64,
    },
}

/// Splits a capture into payloads. The format is detected: pcap / pcapng (TCP segments to or
/// from `port`, reassembled per flow; direction from the port), base64 text (one frame, several
/// back-to-back frames, or a bare payload per line), or raw length-prefixed frames. For the
/// last two, every payload gets `direction`.
pub fn read_capture(
    data: &[u8],
    direction: Direction,
    port: u16,
) -> Vec<Result<Captured, CaptureError>> {
    match data.first_chunk::<4>() {
        Some([0xd4, 0xc3, 0xb2, 0xa1] | [0xa1, 0xb2, 0xc3, 0xd4])
        | Some([0x4d, 0x3c, 0xb2, 0xa1] | [0xa1, 0xb2, 0x3c, 0x4d])
        | Some([0x0a, 0x0d, 0x0d, 0x0a]) => pcap::read(data, port),
        _ if is_base64_text(data) => read_base64_lines(data, direction),
        _ => split_frames(data, "frame", direction, None),
    }
}

fn is_base64_text(data: &[u8]) -> bool {
    !data.is_empty()
        && data
            .iter()
            .all(|&b| b.is_ascii_graphic() || b.is_ascii_whitespace())
}

fn read_base64_lines(data: &[u8], direction: Direction) -> Vec<Result<Captured, CaptureError>> {
    let mut out = Vec::new();
    for (i, line) in data.split(|&b| b == b'\n').enumerate() {
        let line = line.trim_ascii();
        if line.is_empty() {
            continue;
        }
        let origin = format!("line {}", i + 1);
        let Some(bytes) = base64_decode(line) else {
            out.push(Err(CaptureError::Base64 { origin }));
            continue;
        };
        // Length-prefixed frames when the headers tile the line exactly; a bare payload
        // otherwise (payloads start with '!', '#' or ':', which never read as a valid length
        // covering the rest).
        let (frames, used, err) = frame::scan(&bytes, MAX_PAYLOAD);
        if frames > 0 && used == bytes.len() && err.is_none() {
            out.extend(split_frames(&bytes, &origin, direction, None));
        } else {
            out.push(Ok(Captured {
                origin,
                direction,
                connection: None,
                payload: bytes,
            }));
        }
    }
    out
}

fn split_frames(
    stream: &[u8],
    origin: &str,
    direction: Direction,
    connection: Option<Connection>,
) -> Vec<Result<Captured, CaptureError>> {
    let mut out = Vec::new();
    let mut at = 0;
    let mut n = 0;
    while at < stream.len() {
        n += 1;
        match frame::check(&stream[at..], MAX_PAYLOAD) {
            Ok(Some(total)) => {
                out.push(Ok(Captured {
                    origin: format!("{origin} frame {n}"),
                    direction,
                    connection,
                    payload: stream[at + frame::HEADER_LEN..at + total].to_vec(),
                }));
                at += total;
            }
            Ok(None) => {
                let needed = stream[at..]
                    .first_chunk::<4>()
                    .map_or(4, |h| 4 + u32::from_le_bytes(*h) as usize);
                out.push(Err(CaptureError::Frame {
                    origin: format!("{origin} frame {n}"),
                    error: frame::FrameError::Truncated {
                        buffered: stream.len() - at,
                        needed,
                    },
                }));
                break;
            }
            Err(error) => {
                out.push(Err(CaptureError::Frame {
                    origin: format!("{origin} frame {n}"),
                    error,
                }));
                break;
            }
        }
    }
    out
}

/// Decodes one base64 line: the standard alphabet, padding optional and whitespace ignored
/// (captures are pasted by hand), with the `base64` crate.
fn base64_decode(text: &[u8]) -> Option<Vec<u8>> {
    use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};
    use base64::Engine;
    const LENIENT: GeneralPurpose = GeneralPurpose::new(
        &base64::alphabet::STANDARD,
        GeneralPurposeConfig::new()
            .with_decode_padding_mode(DecodePaddingMode::Indifferent)
            .with_decode_allow_trailing_bits(true),
    );
    let text: Vec<u8> = text
        .iter()
        .copied()
        .filter(|c| !c.is_ascii_whitespace())
        .collect();
    LENIENT.decode(text).ok()
}

/// The decoding of one payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Inspected {
    /// Where it came from.
    pub origin: String,
    /// Which way it travelled.
    pub direction: Direction,
    /// The agent: from the header, the key's IP column, or the connection.
    pub agent_id: Option<AgentId>,
    /// The cipher named by the tag.
    pub cipher: Option<Cipher>,
    /// Counters of the inner header.
    pub counters: Option<Counters>,
    /// Whether the MD5 matched.
    pub checksum_ok: Option<bool>,
    /// [`control::Message::kind`] of the plaintext, or `ping`/`pong`.
    pub kind: Option<&'static str>,
    /// The decrypted message.
    pub plaintext: Option<Vec<u8>>,
    /// What went wrong, if anything.
    pub error: Option<String>,
}

/// Decrypts captured payloads with a key set.
#[derive(Debug)]
pub struct Inspector {
    keys: Arc<KeySet>,
    decoder: Decoder,
    // Agent of each TCP connection, learned from its agent -> manager frames.
    agents: HashMap<Connection, AgentId>,
}

/// How many keys are tried on a payload that names no agent.
const MAX_TRIAL_KEYS: usize = 4096;

impl Inspector {
    /// An inspector using `keys`.
    pub fn new(keys: Arc<KeySet>) -> Inspector {
        Inspector {
            keys,
            decoder: Decoder::new(),
            agents: HashMap::new(),
        }
    }

    /// Decodes one payload.
    pub fn inspect(&mut self, c: &Captured) -> Inspected {
        let mut out = Inspected {
            origin: c.origin.clone(),
            direction: c.direction,
            agent_id: None,
            cipher: None,
            counters: None,
            checksum_ok: None,
            kind: None,
            plaintext: None,
            error: None,
        };
        let env = match Envelope::parse(&c.payload) {
            Ok(env) => env,
            Err(e) => {
                out.error = Some(format!("envelope: {e}"));
                return out;
            }
        };
        let (agent_id, cipher, ciphertext) = match env {
            Envelope::Ping => {
                out.kind = Some("ping");
                return out;
            }
            Envelope::Pong => {
                out.kind = Some("pong");
                return out;
            }
            Envelope::Secure {
                agent_id,
                cipher,
                ciphertext,
            } => (agent_id, cipher, ciphertext),
        };
        out.cipher = Some(cipher);
        if let (Some(id), Some(conn), Direction::AgentToManager) =
            (agent_id, c.connection, c.direction)
        {
            self.agents.insert(conn, id);
        }
        let key = self.find_key(c, agent_id, cipher, ciphertext);
        let Some(key) = key else {
            out.agent_id = agent_id;
            out.error = Some(match agent_id {
                Some(id) => format!("no key for agent {id}"),
                None => "no key decrypts this message".to_owned(),
            });
            return out;
        };
        out.agent_id = Some(key.id());
        if let (None, Some(conn), Direction::AgentToManager) = (agent_id, c.connection, c.direction)
        {
            self.agents.insert(conn, key.id());
        }
        match self.decoder.open_unverified(&key, cipher, ciphertext) {
            Ok(o) => {
                out.counters = Some(o.counters);
                out.checksum_ok = Some(o.checksum_ok);
                out.kind = Some(control::parse(o.message).kind());
                out.plaintext = Some(o.message.to_vec());
                if !o.checksum_ok {
                    out.error = Some("MD5 checksum mismatch".to_owned());
                }
            }
            Err(e) => out.error = Some(e.to_string()),
        }
        out
    }

    fn find_key(
        &mut self,
        c: &Captured,
        agent_id: Option<AgentId>,
        cipher: Cipher,
        ciphertext: &[u8],
    ) -> Option<Arc<AgentKey>> {
        if let Some(id) = agent_id {
            return self.keys.get(&id).cloned();
        }
        if let Some(conn) = c.connection {
            if let Some(key) = self.agents.get(&conn).and_then(|id| self.keys.get(id)) {
                return Some(key.clone());
            }
            if let Some(key) = self.keys.by_ip(conn.agent.0) {
                return Some(key.clone());
            }
        }
        // Nothing names the agent: try the keys (an offline tool can afford it).
        let keys = self.keys.clone();
        let found = keys
            .iter()
            .take(MAX_TRIAL_KEYS)
            .find(|k| self.decoder.open(k, cipher, ciphertext).is_ok())
            .cloned();
        found
    }
}

/// Capture file parsing and per-flow TCP reassembly.
mod pcap {
    use super::*;

    struct Segment {
        seq: u32,
        syn: bool,
        data: Vec<u8>,
    }

    #[derive(Default)]
    struct Flow {
        segments: Vec<Segment>,
    }

    type Endpoint = (IpAddr, u16);
    type FlowKey = (Endpoint, Endpoint);

    pub(super) fn read(data: &[u8], port: u16) -> Vec<Result<Captured, CaptureError>> {
        let mut flows: Vec<(FlowKey, Flow)> = Vec::new();
        let mut index: HashMap<FlowKey, usize> = HashMap::new();
        let mut on_packet = |link: u32, pkt: &[u8]| {
            if let Some((src, dst, seg)) = tcp_segment(link, pkt) {
                if src.1 != port && dst.1 != port {
                    return;
                }
                if seg.data.is_empty() && !seg.syn {
                    return;
                }
                let i = *index.entry((src, dst)).or_insert_with(|| {
                    flows.push(((src, dst), Flow::default()));
                    flows.len() - 1
                });
                flows[i].1.segments.push(seg);
            }
        };
        let parsed = if data.starts_with(&[0x0a, 0x0d, 0x0d, 0x0a]) {
            read_pcapng(data, &mut on_packet)
        } else {
            read_classic(data, &mut on_packet)
        };
        let mut out = Vec::new();
        if let Err(e) = parsed {
            out.push(Err(CaptureError::Pcap(e)));
        }
        // Each agent -> manager flow is followed by its reply flow, so replies (which carry no
        // ID) find the agent learned from the other direction.
        let mut flows: Vec<Option<(FlowKey, Flow)>> = flows.into_iter().map(Some).collect();
        let mut order = Vec::with_capacity(flows.len());
        for (i, flow) in flows.iter().enumerate() {
            let Some(((src, dst), _)) = flow else {
                continue;
            };
            if dst.1 != port {
                continue;
            }
            let reverse = index.get(&(*dst, *src)).copied();
            order.push(i);
            if let Some(r) = reverse {
                order.push(r);
            }
        }
        order.extend(0..flows.len());
        for i in order {
            let Some(((src, dst), flow)) = flows[i].take() else {
                continue;
            };
            let (direction, connection) = if dst.1 == port {
                (
                    Direction::AgentToManager,
                    Connection {
                        agent: src,
                        manager: dst,
                    },
                )
            } else {
                (
                    Direction::ManagerToAgent,
                    Connection {
                        agent: dst,
                        manager: src,
                    },
                )
            };
            let origin = format!(
                "{} -> {}",
                std::net::SocketAddr::from(src),
                std::net::SocketAddr::from(dst)
            );
            let (stream, gap) = reassemble(flow);
            out.extend(split_frames(&stream, &origin, direction, Some(connection)));
            if let Some(offset) = gap {
                out.push(Err(CaptureError::Gap { origin, offset }));
            }
        }
        out
    }

    /// Orders a flow's segments by sequence number and joins them, dropping retransmitted
    /// bytes; stops at the first hole.
    fn reassemble(flow: Flow) -> (Vec<u8>, Option<u64>) {
        let mut segs = flow.segments;
        let base = segs
            .iter()
            .find(|s| s.syn)
            .map(|s| s.seq.wrapping_add(1))
            .or_else(|| {
                // No SYN captured: start at the earliest sequence number (within 2^31 of the
                // first segment seen, which handles wrap-around).
                let first = segs.first()?.seq;
                let earliest = segs
                    .iter()
                    .map(|s| s.seq.wrapping_sub(first) as i32)
                    .min()?;
                Some(first.wrapping_add(earliest as u32))
            })
            .unwrap_or(0);
        // Offsets relative to the start; a segment before it (wrapped) sorts last and is
        // dropped as a hole or duplicate.
        segs.sort_by_key(|s| s.seq.wrapping_sub(base));
        let mut stream = Vec::new();
        for s in segs {
            if s.data.is_empty() {
                continue;
            }
            let off = u64::from(s.seq.wrapping_sub(base));
            let have = stream.len() as u64;
            if off > have {
                return (stream, Some(have));
            }
            let skip = (have - off) as usize;
            if skip < s.data.len() {
                stream.extend_from_slice(&s.data[skip..]);
            }
        }
        (stream, None)
    }

    fn read_classic(data: &[u8], on: &mut dyn FnMut(u32, &[u8])) -> Result<(), String> {
        let magic = data.get(..4).ok_or("truncated header")?;
        let le = matches!(magic, [0xd4, 0xc3, 0xb2, 0xa1] | [0x4d, 0x3c, 0xb2, 0xa1]);
        let u32_at = |b: &[u8], at: usize| -> Option<u32> {
            let x = *b.get(at..at + 4)?.first_chunk::<4>()?;
            Some(if le {
                u32::from_le_bytes(x)
            } else {
                u32::from_be_bytes(x)
            })
        };
        let link = u32_at(data, 20).ok_or("truncated header")? & 0x0fff_ffff;
        let mut at = 24;
        while at < data.len() {
            let incl = u32_at(data, at + 8).ok_or("truncated record header")? as usize;
            let start = at + 16;
            let pkt = data
                .get(start..start + incl)
                .ok_or("truncated packet record")?;
            on(link, pkt);
            at = start + incl;
        }
        Ok(())
    }

    fn read_pcapng(data: &[u8], on: &mut dyn FnMut(u32, &[u8])) -> Result<(), String> {
        let mut links: Vec<u32> = Vec::new();
        let mut le = true;
        let mut at = 0;
        while at + 12 <= data.len() {
            let raw_type = *data[at..].first_chunk::<4>().ok_or("truncated")?;
            if raw_type == [0x0a, 0x0d, 0x0d, 0x0a] {
                le = data.get(at + 8..at + 12) == Some(&[0x4d, 0x3c, 0x2b, 0x1a]);
                links.clear();
            }
            let rd = |at: usize| -> Option<u32> {
                let x = *data.get(at..at + 4)?.first_chunk::<4>()?;
                Some(if le {
                    u32::from_le_bytes(x)
                } else {
                    u32::from_be_bytes(x)
                })
            };
            let btype = rd(at).ok_or("truncated block")?;
            let blen = rd(at + 4).ok_or("truncated block")? as usize;
            if blen < 12 || at + blen > data.len() {
                return Err(format!("bad block length {blen} at offset {at}"));
            }
            let body = &data[at + 8..at + blen - 4];
            match btype {
                1 => {
                    let lt = body
                        .get(..2)
                        .map(|b| {
                            if le {
                                u16::from_le_bytes([b[0], b[1]])
                            } else {
                                u16::from_be_bytes([b[0], b[1]])
                            }
                        })
                        .ok_or("truncated interface block")?;
                    links.push(u32::from(lt));
                }
                6 => {
                    let iface = rd(at + 8).ok_or("truncated packet block")? as usize;
                    let caplen = rd(at + 20).ok_or("truncated packet block")? as usize;
                    let pkt = body.get(20..20 + caplen).ok_or("truncated packet block")?;
                    on(*links.get(iface).unwrap_or(&1), pkt);
                }
                3 => {
                    let pkt = body.get(4..).unwrap_or_default();
                    on(*links.first().unwrap_or(&1), pkt);
                }
                _ => {}
            }
            at += blen;
        }
        Ok(())
    }

    /// Link layer -> IP -> TCP. `None` for anything that is not an unfragmented TCP segment.
    fn tcp_segment(link: u32, pkt: &[u8]) -> Option<(Endpoint, Endpoint, Segment)> {
        let ip = match link {
            // Ethernet, with 802.1Q tags.
            1 => {
                let mut at = 12;
                let mut ethertype = u16::from_be_bytes([*pkt.get(at)?, *pkt.get(at + 1)?]);
                while ethertype == 0x8100 || ethertype == 0x88a8 {
                    at += 4;
                    ethertype = u16::from_be_bytes([*pkt.get(at)?, *pkt.get(at + 1)?]);
                }
                pkt.get(at + 2..)?
            }
            // BSD loopback / null: 4-byte address family.
            0 | 108 => pkt.get(4..)?,
            // Raw IP.
            12 | 14 | 101 | 228 | 229 => pkt,
            // Linux cooked capture v1 and v2.
            113 => pkt.get(16..)?,
            276 => pkt.get(20..)?,
            _ => return None,
        };
        let (src, dst, tcp) = match ip.first()? >> 4 {
            4 => {
                let ihl = usize::from(ip[0] & 0x0f) * 4;
                let total = usize::from(u16::from_be_bytes([*ip.get(2)?, *ip.get(3)?]));
                let frag = u16::from_be_bytes([*ip.get(6)?, *ip.get(7)?]);
                if *ip.get(9)? != 6 || frag & 0x3fff != 0 || ihl < 20 {
                    return None;
                }
                let src = Ipv4Addr::from(*ip.get(12..16)?.first_chunk::<4>()?);
                let dst = Ipv4Addr::from(*ip.get(16..20)?.first_chunk::<4>()?);
                // Ethernet may pad short frames: trust the IP total length.
                let end = total.min(ip.len());
                (IpAddr::V4(src), IpAddr::V4(dst), ip.get(ihl..end)?)
            }
            6 => {
                let plen = usize::from(u16::from_be_bytes([*ip.get(4)?, *ip.get(5)?]));
                let mut next = *ip.get(6)?;
                let src = Ipv6Addr::from(*ip.get(8..24)?.first_chunk::<16>()?);
                let dst = Ipv6Addr::from(*ip.get(24..40)?.first_chunk::<16>()?);
                let end = (40 + plen).min(ip.len());
                let mut at = 40;
                // Hop-by-hop, routing, destination options.
                while matches!(next, 0 | 43 | 60) {
                    next = *ip.get(at)?;
                    at += (usize::from(*ip.get(at + 1)?) + 1) * 8;
                }
                if next != 6 {
                    return None;
                }
                (IpAddr::V6(src), IpAddr::V6(dst), ip.get(at..end)?)
            }
            _ => return None,
        };
        let sport = u16::from_be_bytes([*tcp.first()?, *tcp.get(1)?]);
        let dport = u16::from_be_bytes([*tcp.get(2)?, *tcp.get(3)?]);
        let seq = u32::from_be_bytes(*tcp.get(4..8)?.first_chunk::<4>()?);
        let off = usize::from(tcp.get(12)? >> 4) * 4;
        let syn = tcp.get(13)? & 0x02 != 0;
        let data = tcp.get(off..)?.to_vec();
        Some(((src, sport), (dst, dport), Segment { seq, syn, data }))
    }

    #[cfg(test)]
    pub(super) fn classic_from_segments(segs: &[(bool, u32, &[u8])]) -> Vec<u8> {
        // Ethernet + IPv4 + TCP between 10.0.0.5:40000 (agent) and 10.0.0.1:1514.
        let mut out = vec![0xd4, 0xc3, 0xb2, 0xa1, 2, 0, 4, 0];
        out.extend_from_slice(&[0; 8]);
        out.extend_from_slice(&65535u32.to_le_bytes());
        out.extend_from_slice(&1u32.to_le_bytes());
        for &(to_manager, seq, data) in segs {
            let mut pkt = vec![0u8; 12];
            pkt.extend_from_slice(&[0x08, 0x00]);
            let total = (20 + 20 + data.len()) as u16;
            let (s, d, sp, dp) = if to_manager {
                ([10, 0, 0, 5], [10, 0, 0, 1], 40000u16, 1514u16)
            } else {
                ([10, 0, 0, 1], [10, 0, 0, 5], 1514, 40000)
            };
            pkt.extend_from_slice(&[
                0x45,
                0,
                (total >> 8) as u8,
                total as u8,
                0,
                0,
                0x40,
                0,
                64,
                6,
                0,
                0,
            ]);
            pkt.extend_from_slice(&s);
            pkt.extend_from_slice(&d);
            pkt.extend_from_slice(&sp.to_be_bytes());
            pkt.extend_from_slice(&dp.to_be_bytes());
            pkt.extend_from_slice(&seq.to_be_bytes());
            pkt.extend_from_slice(&[0, 0, 0, 0, 0x50, 0x18, 0xff, 0xff, 0, 0, 0, 0]);
            pkt.extend_from_slice(data);
            out.extend_from_slice(&[0; 8]);
            out.extend_from_slice(&(pkt.len() as u32).to_le_bytes());
            out.extend_from_slice(&(pkt.len() as u32).to_le_bytes());
            out.extend_from_slice(&pkt);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cipher;

    fn keys() -> (Arc<KeySet>, Arc<AgentKey>, Arc<AgentKey>) {
        let (set, _) = KeySet::parse(b"001 web-01 any k1\n007 fixed 10.0.0.5 k7\n");
        let a = set.get(&"001".parse().unwrap()).unwrap().clone();
        let b = set.get(&"007".parse().unwrap()).unwrap().clone();
        (Arc::new(set), a, b)
    }

    #[test]
    fn base64_matches_reference() {
        for (plain, enc) in [
            (&b""[..], &b""[..]),
            (b"f", b"Zg=="),
            (b"fo", b"Zm8="),
            (b"foo", b"Zm9v"),
            (b"foobar", b"Zm9vYmFy"),
        ] {
            assert_eq!(base64_decode(enc).unwrap(), plain);
        }
        assert!(base64_decode(b"Zm9v!").is_none());
        // Unpadded and wrapped lines, as pasted by hand.
        assert_eq!(base64_decode(b"Zg").unwrap(), b"f");
        assert_eq!(base64_decode(b"Zm9v\nYmFy").unwrap(), b"foobar");
        assert!(base64_decode(b"Z").is_none());
    }

    #[test]
    fn lines_raw_and_errors() {
        let (set, a, _) = keys();
        let p = cipher::agent_payload(&a, Cipher::Aes, &Counters::default(), b"#!-agent startup ")
            .unwrap();
        let f = frame::encode_frame(&p, MAX_PAYLOAD).unwrap();
        let enc = |b: &[u8]| {
            // Test-only encoder.
            const T: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
            let mut s = String::new();
            for c in b.chunks(3) {
                let n = (u32::from(c[0]) << 16)
                    | (u32::from(*c.get(1).unwrap_or(&0)) << 8)
                    | u32::from(*c.get(2).unwrap_or(&0));
                for i in 0..4 {
                    if i <= c.len() {
                        s.push(T[(n >> (18 - 6 * i) & 63) as usize] as char);
                    } else {
                        s.push('=');
                    }
                }
            }
            s
        };
        let text = format!("{}\n{}\n\n%%%\n", enc(&f), enc(&p));
        let caps = read_capture(text.as_bytes(), Direction::AgentToManager, 1514);
        assert_eq!(caps.len(), 3);
        let mut insp = Inspector::new(set);
        for c in &caps[..2] {
            let out = insp.inspect(c.as_ref().unwrap());
            assert_eq!(out.kind, Some("startup"), "{out:?}");
            assert_eq!(out.checksum_ok, Some(true));
        }
        assert!(caps[2].is_err());
        // Raw frames, the last one truncated.
        let mut raw = f.clone();
        raw.extend_from_slice(&f[..10]);
        let caps = read_capture(&raw, Direction::AgentToManager, 1514);
        assert!(caps[0].is_ok());
        assert!(matches!(caps[1], Err(CaptureError::Frame { .. })));
    }

    #[test]
    fn pcap_reassembles_out_of_order_and_attributes_replies() {
        let (set, _, b) = keys();
        // An ID-less agent (fixed IP 10.0.0.5) and its manager's ACK.
        let up = cipher::agent_payload(
            &b,
            Cipher::Blowfish,
            &Counters::default(),
            b"#!-agent startup ",
        )
        .unwrap();
        assert!(!up.starts_with(b"!"));
        let down =
            cipher::manager_payload(&b, Cipher::Blowfish, &Counters::default(), b"#!-agent ack ")
                .unwrap();
        let mut stream = frame::encode_frame(&up, MAX_PAYLOAD).unwrap();
        stream.extend(frame::encode_frame(b"#ping", MAX_PAYLOAD).unwrap());
        let down = frame::encode_frame(&down, MAX_PAYLOAD).unwrap();
        let (x, y) = stream.split_at(7);
        // Out of order, with a retransmission.
        let pcap = pcap::classic_from_segments(&[
            (true, 1007, y),
            (false, 5000, &down),
            (true, 1000, x),
            (true, 1007, y),
        ]);
        let caps = read_capture(&pcap, Direction::ManagerToAgent, 1514);
        let mut insp = Inspector::new(set);
        let outs: Vec<_> = caps
            .iter()
            .map(|c| insp.inspect(c.as_ref().unwrap()))
            .collect();
        assert_eq!(outs.len(), 3, "{outs:?}");
        assert_eq!(outs[0].kind, Some("startup"));
        assert_eq!(outs[0].agent_id, Some(b.id()));
        assert_eq!(outs[1].kind, Some("ping"));
        assert_eq!(outs[2].direction, Direction::ManagerToAgent);
        assert_eq!(outs[2].kind, Some("ack"));
        assert_eq!(outs[2].agent_id, Some(b.id()));
        // A hole is reported.
        let pcap = pcap::classic_from_segments(&[(true, 1000, x), (true, 1100, y)]);
        let caps = read_capture(&pcap, Direction::AgentToManager, 1514);
        assert!(caps
            .iter()
            .any(|c| matches!(c, Err(CaptureError::Gap { .. }))));
    }

    #[test]
    fn unknown_agent_and_garbage_are_reported_not_fatal() {
        let (set, _, _) = keys();
        let stranger = AgentKey::new("555".parse().unwrap(), "s", crate::keys::KeyIp::Any, b"x");
        let p = cipher::agent_payload(&stranger, Cipher::Aes, &Counters::default(), b"hi").unwrap();
        let mut insp = Inspector::new(set);
        for payload in [p, b"GET / HTTP/1.1".to_vec(), b"#AES:abc".to_vec()] {
            let out = insp.inspect(&Captured {
                origin: "t".into(),
                direction: Direction::AgentToManager,
                connection: None,
                payload,
            });
            assert!(out.error.is_some(), "{out:?}");
        }
    }
}
