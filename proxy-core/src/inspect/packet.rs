//! Link layer -> IP -> TCP: the TCP segment a captured packet carries.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// An address and port.
pub(super) type Endpoint = (IpAddr, u16);

/// One TCP segment, its payload copied out of the capture's buffer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Segment {
    pub(super) seq: u32,
    pub(super) syn: bool,
    /// FIN or RST: the flow ends here.
    pub(super) end: bool,
    pub(super) data: Vec<u8>,
}

/// Link layer -> IP -> TCP. `None` for anything that is not an unfragmented TCP segment.
pub(super) fn tcp_segment(link: u32, pkt: &[u8]) -> Option<(Endpoint, Endpoint, Segment)> {
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
    let flags = *tcp.get(13)?;
    let syn = flags & 0x02 != 0;
    let end = flags & 0x05 != 0;
    let data = tcp.get(off..)?.to_vec();
    Some((
        (src, sport),
        (dst, dport),
        Segment {
            seq,
            syn,
            end,
            data,
        },
    ))
}

/// A packet of a test capture: Ethernet + IPv4 + TCP between 10.0.0.5:`agent_port` (the
/// agent) and 10.0.0.1:1514.
#[cfg(test)]
pub(crate) struct TestPacket<'a> {
    pub(crate) agent_port: u16,
    pub(crate) to_manager: bool,
    pub(crate) seq: u32,
    /// TCP flags: 0x18 (PSH, ACK) for data, 0x02 SYN, 0x01 FIN.
    pub(crate) flags: u8,
    pub(crate) data: &'a [u8],
}

/// A classic pcap holding `packets`.
#[cfg(test)]
pub(crate) fn classic_pcap(packets: &[TestPacket<'_>]) -> Vec<u8> {
    let mut out = vec![0xd4, 0xc3, 0xb2, 0xa1, 2, 0, 4, 0];
    out.extend_from_slice(&[0; 8]);
    out.extend_from_slice(&65535u32.to_le_bytes());
    out.extend_from_slice(&1u32.to_le_bytes());
    for p in packets {
        let mut pkt = vec![0u8; 12];
        pkt.extend_from_slice(&[0x08, 0x00]);
        let total = (20 + 20 + p.data.len()) as u16;
        let (s, d, sp, dp) = if p.to_manager {
            ([10, 0, 0, 5], [10, 0, 0, 1], p.agent_port, 1514u16)
        } else {
            ([10, 0, 0, 1], [10, 0, 0, 5], 1514, p.agent_port)
        };
        pkt.extend_from_slice(&[0x45, 0]);
        pkt.extend_from_slice(&total.to_be_bytes());
        pkt.extend_from_slice(&[0, 0, 0x40, 0, 64, 6, 0, 0]);
        pkt.extend_from_slice(&s);
        pkt.extend_from_slice(&d);
        pkt.extend_from_slice(&sp.to_be_bytes());
        pkt.extend_from_slice(&dp.to_be_bytes());
        pkt.extend_from_slice(&p.seq.to_be_bytes());
        pkt.extend_from_slice(&[0, 0, 0, 0, 0x50, p.flags, 0xff, 0xff, 0, 0, 0, 0]);
        pkt.extend_from_slice(p.data);
        out.extend_from_slice(&[0; 8]);
        out.extend_from_slice(&(pkt.len() as u32).to_le_bytes());
        out.extend_from_slice(&(pkt.len() as u32).to_le_bytes());
        out.extend_from_slice(&pkt);
    }
    out
}

/// A classic pcap of data segments `(to_manager, seq, data)` on one connection.
#[cfg(test)]
pub(crate) fn classic_from_segments(segs: &[(bool, u32, &[u8])]) -> Vec<u8> {
    let packets: Vec<TestPacket<'_>> = segs
        .iter()
        .map(|&(to_manager, seq, data)| TestPacket {
            agent_port: 40000,
            to_manager,
            seq,
            flags: 0x18,
            data,
        })
        .collect();
    classic_pcap(&packets)
}
