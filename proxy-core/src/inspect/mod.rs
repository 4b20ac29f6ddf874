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

mod flows;
mod packet;
mod reader;

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;

pub use flows::{Held, ReadLimits};
pub use reader::CaptureReader;

use crate::cipher::{Counters, Decoder};
use crate::control;
use crate::envelope::{AgentId, Cipher, Envelope};
use crate::frame;
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
    /// The capture ends inside a packet record (cut short, or its writer was stopped).
    #[error("capture: truncated at byte {offset}: it ends inside a packet record")]
    Truncated {
        /// Bytes of the capture read whole before the cut.
        offset: u64,
    },
    /// Reading the input failed.
    #[error("capture: read failed after byte {offset}: {error}")]
    Read {
        /// Bytes read before the failure.
        offset: u64,
        /// The cause.
        error: String,
    },
    /// A flow's state was dropped to keep memory bounded (too many flows, or too many bytes
    /// held in all): what it held is not decoded.
    #[error("{origin}: flow state dropped to bound memory, {held} bytes not decoded")]
    Evicted {
        /// The flow.
        origin: String,
        /// Bytes it held.
        held: usize,
    },
    /// A TCP stream has a hole (lost segments): frames after it are not decoded (the flow's
    /// bytes are held until the hole fills, the flow ends or its bound is reached).
    #[error("{origin}: missing TCP data at stream offset {offset}")]
    Gap {
        /// The flow.
        origin: String,
        /// Bytes decoded before the gap.
        offset: u64,
    },
}

/// Splits a capture held in memory into payloads (see [`CaptureReader`] to read one as a
/// stream). The format is detected: pcap / pcapng (TCP segments to or from `port`,
/// reassembled per flow; direction from the port), base64 text (one frame, several
/// back-to-back frames, or a bare payload per line), or raw length-prefixed frames. For the
/// last two, every payload gets `direction`.
pub fn read_capture(
    data: &[u8],
    direction: Direction,
    port: u16,
) -> Vec<Result<Captured, CaptureError>> {
    CaptureReader::new(data, direction, port).collect()
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cipher;
    use crate::frame::MAX_PAYLOAD;

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
        let pcap = packet::classic_from_segments(&[
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
        // In the order they complete: the reply is whole first, the agent's frames once the
        // earlier segment arrives.
        assert_eq!(outs.len(), 3, "{outs:?}");
        assert_eq!(outs[0].direction, Direction::ManagerToAgent);
        assert_eq!(outs[0].kind, Some("ack"));
        assert_eq!(outs[0].agent_id, Some(b.id()));
        assert_eq!(outs[1].kind, Some("startup"));
        assert_eq!(outs[1].agent_id, Some(b.id()));
        assert_eq!(outs[2].kind, Some("ping"));
        // A hole is reported.
        let pcap = packet::classic_from_segments(&[(true, 1000, x), (true, 1100, y)]);
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

    /// Hands the input over a few bytes at a time, as a pipe does.
    struct Trickle<'a> {
        data: &'a [u8],
        step: usize,
    }

    impl std::io::Read for Trickle<'_> {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            let n = self.step.min(buf.len()).min(self.data.len());
            buf[..n].copy_from_slice(&self.data[..n]);
            self.data = &self.data[n..];
            self.step = self.step % 97 + 13;
            Ok(n)
        }
    }

    fn up_frame(key: &AgentKey, text: &[u8]) -> Vec<u8> {
        let p = cipher::agent_payload(key, Cipher::Aes, &Counters::default(), text).unwrap();
        frame::encode_frame(&p, MAX_PAYLOAD).unwrap()
    }

    fn render(items: Vec<Result<Captured, CaptureError>>) -> Vec<String> {
        items.into_iter().map(|c| format!("{c:?}")).collect()
    }

    #[test]
    fn a_stream_read_piecemeal_gives_what_the_whole_file_gives() {
        let (_, a, _) = keys();
        let mut stream = Vec::new();
        for i in 0..40 {
            stream.extend(up_frame(&a, format!("#!-agent message {i} ").as_bytes()));
        }
        let segs: Vec<(bool, u32, &[u8])> = stream
            .chunks(37)
            .scan(1000u32, |seq, c| {
                let s = *seq;
                *seq += c.len() as u32;
                Some((true, s, c))
            })
            .collect();
        let pcap = packet::classic_from_segments(&segs);
        let whole = render(read_capture(&pcap, Direction::AgentToManager, 1514));
        assert_eq!(whole.len(), 40, "{whole:?}");
        assert!(whole.iter().all(|w| w.starts_with("Ok(")), "{whole:?}");
        let trickled = render(
            CaptureReader::new(
                Trickle {
                    data: &pcap,
                    step: 1,
                },
                Direction::AgentToManager,
                1514,
            )
            .collect(),
        );
        assert_eq!(whole, trickled);
    }

    #[test]
    fn a_truncated_capture_ends_with_its_error_after_the_messages_before_it() {
        let (_, a, _) = keys();
        let one = up_frame(&a, b"#!-agent one ");
        let two = up_frame(&a, b"#!-agent two ");
        let pcap = packet::classic_from_segments(&[
            (true, 1000, &one),
            (true, 1000 + one.len() as u32, &two),
        ]);
        // Cut inside the second packet record.
        let cut = &pcap[..pcap.len() - 10];
        let out = read_capture(cut, Direction::AgentToManager, 1514);
        assert_eq!(out.len(), 2, "{out:?}");
        assert!(out[0].is_ok());
        let last = out[1].as_ref().unwrap_err();
        assert!(matches!(last, CaptureError::Truncated { .. }), "{last:?}");
        assert!(last.to_string().contains("truncated"), "{last}");
        // Through a pipe as well.
        let piped: Vec<_> = CaptureReader::new(
            Trickle { data: cut, step: 5 },
            Direction::AgentToManager,
            1514,
        )
        .collect();
        assert_eq!(render(piped), render(out));
    }

    #[test]
    fn reassembly_holds_bounded_state_and_says_what_it_dropped() {
        use packet::TestPacket;
        let (_, a, _) = keys();
        let f = up_frame(&a, b"#!-agent hello ");
        let limits = ReadLimits {
            max_flows: 8,
            max_flow_bytes: 4 * f.len(),
            max_held_bytes: 16 * f.len(),
        };
        let mut packets = Vec::new();
        // 100 connections, each opened, sending half a frame and never finishing it: more
        // flows and more bytes than the bounds.
        for i in 0..100u16 {
            packets.push(TestPacket {
                agent_port: 20000 + i,
                to_manager: true,
                seq: 99,
                flags: 0x02,
                data: &[],
            });
            packets.push(TestPacket {
                agent_port: 20000 + i,
                to_manager: true,
                seq: 100,
                flags: 0x18,
                data: &f[..f.len() / 2],
            });
        }
        // One connection with a hole that never fills, and data after it beyond the flow's
        // bound.
        let tail: Vec<Vec<u8>> = (0..10).map(|_| f.clone()).collect();
        packets.push(TestPacket {
            agent_port: 30000,
            to_manager: true,
            seq: 99,
            flags: 0x02,
            data: &[],
        });
        for (k, t) in tail.iter().enumerate() {
            packets.push(TestPacket {
                agent_port: 30000,
                to_manager: true,
                seq: 100 + 1000 + (k * f.len()) as u32,
                flags: 0x18,
                data: t,
            });
        }
        // And a whole frame on a last connection, still decoded.
        packets.push(TestPacket {
            agent_port: 40000,
            to_manager: true,
            seq: 500,
            flags: 0x18,
            data: &f,
        });
        let pcap = packet::classic_pcap(&packets);
        let mut reader =
            CaptureReader::with_limits(&pcap[..], Direction::AgentToManager, 1514, limits);
        let out: Vec<_> = reader.by_ref().collect();
        let peak = reader.peak_held();
        assert!(peak.flows <= limits.max_flows, "{peak:?}");
        assert!(peak.bytes <= limits.max_held_bytes, "{peak:?}");
        assert_eq!(reader.held(), Held::default());
        let evicted = out
            .iter()
            .filter(|c| matches!(c, Err(CaptureError::Evicted { .. })))
            .count();
        assert!(evicted >= 90, "{evicted} evictions in {out:?}");
        assert!(out.iter().any(
            |c| matches!(c, Err(CaptureError::Gap { origin, .. }) if origin.contains(":30000"))
        ));
        assert!(out
            .iter()
            .any(|c| matches!(c, Ok(c) if c.origin.contains(":40000"))));
    }

    /// The packets of a classic pcap written as pcapng (one Ethernet interface).
    fn pcapng_of(classic: &[u8]) -> Vec<u8> {
        let block = |out: &mut Vec<u8>, kind: u32, body: &[u8]| {
            let len = (12 + body.len().div_ceil(4) * 4) as u32;
            out.extend_from_slice(&kind.to_le_bytes());
            out.extend_from_slice(&len.to_le_bytes());
            out.extend_from_slice(body);
            out.resize(out.len() + (4 - body.len() % 4) % 4, 0);
            out.extend_from_slice(&len.to_le_bytes());
        };
        let mut out = Vec::new();
        let mut shb = 0x1a2b_3c4d_u32.to_le_bytes().to_vec();
        shb.extend_from_slice(&[1, 0, 0, 0]);
        shb.extend_from_slice(&u64::MAX.to_le_bytes());
        block(&mut out, 0x0a0d_0d0a, &shb);
        block(&mut out, 1, &[1, 0, 0, 0, 0xff, 0xff, 0, 0]);
        let mut at = 24;
        while at < classic.len() {
            let caplen = u32::from_le_bytes(classic[at + 8..at + 12].try_into().unwrap()) as usize;
            let pkt = &classic[at + 16..at + 16 + caplen];
            let mut epb = vec![0u8; 12];
            epb.extend_from_slice(&(caplen as u32).to_le_bytes());
            epb.extend_from_slice(&(caplen as u32).to_le_bytes());
            epb.extend_from_slice(pkt);
            block(&mut out, 6, &epb);
            at += 16 + caplen;
        }
        out
    }

    #[test]
    fn pcapng_reads_as_pcap_does() {
        let (_, a, _) = keys();
        let mut stream = up_frame(&a, b"#!-agent one ");
        stream.extend(up_frame(&a, b"#!-agent two "));
        let (x, y) = stream.split_at(21);
        let classic = packet::classic_from_segments(&[(true, 7, x), (true, 7 + 21, y)]);
        let ng = pcapng_of(&classic);
        assert_eq!(&ng[..4], &[0x0a, 0x0d, 0x0d, 0x0a]);
        let from_ng = render(read_capture(&ng, Direction::AgentToManager, 1514));
        assert_eq!(from_ng.len(), 2, "{from_ng:?}");
        assert_eq!(
            from_ng,
            render(read_capture(&classic, Direction::AgentToManager, 1514))
        );
    }

    /// A pipe whose writer has sent `first` and waits: reading past it before `open` is set
    /// would block a live capture.
    struct Gate {
        first: Vec<u8>,
        rest: Vec<u8>,
        open: std::rc::Rc<std::cell::Cell<bool>>,
    }

    impl std::io::Read for Gate {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            let from = if self.first.is_empty() {
                assert!(
                    self.open.get(),
                    "read past the first packet before it was printed"
                );
                &mut self.rest
            } else {
                &mut self.first
            };
            let n = buf.len().min(from.len());
            buf[..n].copy_from_slice(&from[..n]);
            from.drain(..n);
            Ok(n)
        }
    }

    #[test]
    fn a_live_capture_gives_each_message_once_its_packet_is_read() {
        let (_, a, _) = keys();
        let one = up_frame(&a, b"#!-agent one ");
        let two = up_frame(&a, b"#!-agent two ");
        let pcap = packet::classic_from_segments(&[
            (true, 1000, &one),
            (true, 1000 + one.len() as u32, &two),
        ]);
        // The file header and the first packet record.
        let first_len = 24 + 16 + 54 + one.len();
        let open = std::rc::Rc::new(std::cell::Cell::new(false));
        let gate = Gate {
            first: pcap[..first_len].to_vec(),
            rest: pcap[first_len..].to_vec(),
            open: open.clone(),
        };
        let mut reader = CaptureReader::new(gate, Direction::AgentToManager, 1514);
        let first = reader.next().unwrap().unwrap();
        assert_eq!(first.payload, one[4..]);
        open.set(true);
        let second = reader.next().unwrap().unwrap();
        assert_eq!(second.payload, two[4..]);
        assert!(reader.next().is_none());
    }
}
