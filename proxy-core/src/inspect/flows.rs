//! Per-flow TCP reassembly of a capture read as a stream, with the state it holds bounded: a
//! flow keeps only the bytes of a frame not yet complete and the segments beyond a hole, up to
//! [`ReadLimits::max_flow_bytes`]; at most [`ReadLimits::max_flows`] flows are tracked and at
//! most [`ReadLimits::max_held_bytes`] held in all, the least recently seen flow giving way.
//! Whatever is given up is reported, never silently dropped.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::SocketAddr;

use super::packet::{Endpoint, Segment};
use super::{CaptureError, Captured, Connection, Direction};
use crate::frame::{self, FrameError, MAX_PAYLOAD};

/// Bounds on what reading a capture holds in memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReadLimits {
    /// TCP flows tracked at once.
    pub max_flows: usize,
    /// Bytes one flow may hold: a frame not yet complete plus segments waiting for a hole.
    pub max_flow_bytes: usize,
    /// Bytes all flows may hold together.
    pub max_held_bytes: usize,
}

impl Default for ReadLimits {
    fn default() -> Self {
        // Room for a few largest frames per flow; 64 MiB in all whatever the capture's size.
        ReadLimits {
            max_flows: 4096,
            max_flow_bytes: 4 * (MAX_PAYLOAD as usize + frame::HEADER_LEN),
            max_held_bytes: 64 << 20,
        }
    }
}

/// What the reassembly holds: flows tracked and bytes buffered.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Held {
    /// Flows tracked.
    pub flows: usize,
    /// Bytes buffered across them.
    pub bytes: usize,
}

type FlowKey = (Endpoint, Endpoint);

#[derive(Debug, Default)]
struct Flow {
    /// Sequence number of the next byte expected (`None` before the first segment).
    next: Option<u32>,
    /// The start of the stream is known (a SYN was seen, or a frame was decoded).
    anchored: bool,
    /// Bytes of the stream from `next - buf.len()`, not yet a whole frame.
    buf: Vec<u8>,
    /// Stream offset of `buf[0]`.
    offset: u64,
    /// Segments beyond a hole: (sequence number, data).
    ahead: Vec<(u32, Vec<u8>)>,
    /// Frames decoded so far (for the origin).
    frames: u64,
    /// Framing broke or a hole was given up on: later segments are ignored.
    dead: bool,
    /// Recency, for eviction.
    tick: u64,
}

impl Flow {
    fn held(&self) -> usize {
        self.buf.len() + self.ahead.iter().map(|(_, d)| d.len()).sum::<usize>()
    }
}

/// The flows of one capture.
#[derive(Debug)]
pub(super) struct Flows {
    port: u16,
    limits: ReadLimits,
    flows: HashMap<FlowKey, Flow>,
    /// Flows by recency (tick -> key), oldest first.
    lru: BTreeMap<u64, FlowKey>,
    tick: u64,
    held: usize,
    peak: Held,
}

fn origin(key: &FlowKey) -> String {
    format!("{} -> {}", SocketAddr::from(key.0), SocketAddr::from(key.1))
}

impl Flows {
    pub(super) fn new(port: u16, limits: ReadLimits) -> Flows {
        Flows {
            port,
            limits,
            flows: HashMap::new(),
            lru: BTreeMap::new(),
            tick: 0,
            held: 0,
            peak: Held::default(),
        }
    }

    pub(super) fn held(&self) -> Held {
        Held {
            flows: self.flows.len(),
            bytes: self.held,
        }
    }

    pub(super) fn peak(&self) -> Held {
        self.peak
    }

    fn note_peak(&mut self) {
        self.peak.flows = self.peak.flows.max(self.flows.len());
        self.peak.bytes = self.peak.bytes.max(self.held);
    }

    fn direction(&self, key: &FlowKey) -> (Direction, Connection) {
        let (src, dst) = *key;
        if dst.1 == self.port {
            let c = Connection {
                agent: src,
                manager: dst,
            };
            (Direction::AgentToManager, c)
        } else {
            let c = Connection {
                agent: dst,
                manager: src,
            };
            (Direction::ManagerToAgent, c)
        }
    }

    /// Takes one segment from `src` to `dst`; what it completes goes to `out`.
    pub(super) fn push(
        &mut self,
        src: Endpoint,
        dst: Endpoint,
        seg: Segment,
        out: &mut VecDeque<Result<Captured, CaptureError>>,
    ) {
        if src.1 != self.port && dst.1 != self.port {
            return;
        }
        let key = (src, dst);
        if seg.data.is_empty() && !seg.syn && !self.flows.contains_key(&key) {
            return;
        }
        if !self.flows.contains_key(&key) {
            while self.flows.len() >= self.limits.max_flows.max(1) {
                if !self.evict_oldest(out) {
                    break;
                }
            }
        }
        self.tick += 1;
        let tick = self.tick;
        let flow = self.flows.entry(key).or_default();
        self.lru.remove(&flow.tick);
        flow.tick = tick;
        self.lru.insert(tick, key);
        let before = flow.held();
        let ended = seg.end;
        if !flow.dead {
            add(flow, seg);
        }
        let after = flow.held();
        self.held = self.held - before + after;
        self.note_peak();
        self.decode(&key, out);
        let flow_bytes = self.flows.get(&key).map_or(0, Flow::held);
        if flow_bytes > self.limits.max_flow_bytes {
            self.give_up(&key, out);
        }
        if ended {
            self.finish(&key, out);
        }
        while self.held > self.limits.max_held_bytes {
            if !self.evict_oldest(out) {
                break;
            }
        }
    }

    /// Splits the flow's contiguous bytes into frames.
    fn decode(&mut self, key: &FlowKey, out: &mut VecDeque<Result<Captured, CaptureError>>) {
        let (direction, connection) = self.direction(key);
        let Some(flow) = self.flows.get_mut(key) else {
            return;
        };
        if flow.dead {
            return;
        }
        let before = flow.held();
        let mut at = 0;
        loop {
            match frame::check(&flow.buf[at..], MAX_PAYLOAD) {
                Ok(Some(total)) => {
                    flow.frames += 1;
                    flow.anchored = true;
                    out.push_back(Ok(Captured {
                        origin: format!("{} frame {}", origin(key), flow.frames),
                        direction,
                        connection: Some(connection),
                        payload: flow.buf[at + frame::HEADER_LEN..at + total].to_vec(),
                    }));
                    at += total;
                }
                Ok(None) => break,
                // Before the start is known an earlier segment may still come (captures
                // reorder): wait for it, within the flow's bound.
                Err(_) if !flow.anchored => break,
                Err(error) => {
                    out.push_back(Err(CaptureError::Frame {
                        origin: format!("{} frame {}", origin(key), flow.frames + 1),
                        error,
                    }));
                    flow.dead = true;
                    flow.buf = Vec::new();
                    flow.ahead = Vec::new();
                    at = 0;
                    break;
                }
            }
        }
        if at > 0 {
            flow.buf.drain(..at);
            flow.offset += at as u64;
        }
        let after = flow.held();
        self.held = self.held - before + after;
    }

    /// The flow holds more than its bound: report why and drop its bytes.
    fn give_up(&mut self, key: &FlowKey, out: &mut VecDeque<Result<Captured, CaptureError>>) {
        let Some(flow) = self.flows.get_mut(key) else {
            return;
        };
        let held = flow.held();
        report_pending(key, flow, out);
        flow.dead = true;
        flow.buf = Vec::new();
        flow.ahead = Vec::new();
        self.held -= held;
    }

    /// FIN or RST: what is left is reported and the flow forgotten.
    fn finish(&mut self, key: &FlowKey, out: &mut VecDeque<Result<Captured, CaptureError>>) {
        if let Some(flow) = self.flows.remove(key) {
            self.lru.remove(&flow.tick);
            self.held -= flow.held();
            if !flow.dead {
                report_pending(key, &flow, out);
            }
        }
    }

    /// Forgets the least recently seen flow, saying what it held; false when there is none.
    fn evict_oldest(&mut self, out: &mut VecDeque<Result<Captured, CaptureError>>) -> bool {
        let Some((_, key)) = self.lru.pop_first() else {
            return false;
        };
        if let Some(flow) = self.flows.remove(&key) {
            let held = flow.held();
            self.held -= held;
            if held > 0 && !flow.dead {
                out.push_back(Err(CaptureError::Evicted {
                    origin: origin(&key),
                    held,
                }));
            }
        }
        true
    }

    /// End of the capture: every flow's unfinished frame or hole is reported, oldest first.
    pub(super) fn flush(&mut self, out: &mut VecDeque<Result<Captured, CaptureError>>) {
        while let Some((_, key)) = self.lru.pop_first() {
            if let Some(flow) = self.flows.remove(&key) {
                self.held -= flow.held();
                if !flow.dead {
                    report_pending(&key, &flow, out);
                }
            }
        }
    }
}

/// Reports what a flow still holds: a frame cut short (or a start that never read as one),
/// then a hole.
fn report_pending(key: &FlowKey, flow: &Flow, out: &mut VecDeque<Result<Captured, CaptureError>>) {
    if !flow.buf.is_empty() {
        let error = match frame::check(&flow.buf, MAX_PAYLOAD) {
            Err(e) => e,
            Ok(_) => FrameError::Truncated {
                buffered: flow.buf.len(),
                needed: flow
                    .buf
                    .first_chunk::<4>()
                    .map_or(4, |h| 4 + u32::from_le_bytes(*h) as usize),
            },
        };
        out.push_back(Err(CaptureError::Frame {
            origin: format!("{} frame {}", origin(key), flow.frames + 1),
            error,
        }));
    }
    if !flow.ahead.is_empty() {
        out.push_back(Err(CaptureError::Gap {
            origin: origin(key),
            offset: flow.offset + flow.buf.len() as u64,
        }));
    }
}

/// Adds a segment's bytes to the flow in sequence order.
fn add(flow: &mut Flow, seg: Segment) {
    let data_seq = if seg.syn {
        seg.seq.wrapping_add(1)
    } else {
        seg.seq
    };
    if seg.syn && !flow.anchored && flow.frames == 0 && flow.offset == 0 {
        // The start of the stream: whatever was held from before it is not part of it.
        flow.next = Some(data_seq);
        flow.anchored = true;
        flow.buf.clear();
        flow.ahead
            .retain(|(s, _)| (s.wrapping_sub(data_seq) as i32) >= 0);
    }
    if seg.data.is_empty() {
        return;
    }
    let next = *flow.next.get_or_insert(data_seq);
    let rel = data_seq.wrapping_sub(next) as i32;
    if rel > 0 {
        flow.ahead.push((data_seq, seg.data));
        return;
    }
    if rel < 0 && !flow.anchored && flow.frames == 0 && flow.offset == 0 {
        // No SYN and nothing decoded: this earlier segment moves the start back. What was
        // held waits beyond it.
        let held = std::mem::take(&mut flow.buf);
        if !held.is_empty() {
            flow.ahead
                .push((next.wrapping_sub(held.len() as u32), held));
        }
        flow.next = Some(data_seq);
        append(flow, data_seq, seg.data);
    } else {
        append(flow, data_seq, seg.data);
    }
    // Segments that the new bytes reach.
    while let Some(next) = flow.next {
        let Some(i) = flow
            .ahead
            .iter()
            .position(|(s, _)| (s.wrapping_sub(next) as i32) <= 0)
        else {
            break;
        };
        let (s, d) = flow.ahead.swap_remove(i);
        append(flow, s, d);
    }
}

/// Appends the part of a segment at `seq` that lies at or after `next`.
fn append(flow: &mut Flow, seq: u32, data: Vec<u8>) {
    let Some(next) = flow.next else { return };
    let skip = next.wrapping_sub(seq) as usize;
    if skip >= data.len() {
        return; // a retransmission of bytes already had
    }
    flow.buf.extend_from_slice(&data[skip..]);
    flow.next = Some(next.wrapping_add((data.len() - skip) as u32));
}
