//! A copy of the frames written to a manager that its TCP may not have acknowledged yet, so
//! that a manager that dies silently (a blackholed link, a crashed host) loses none of them:
//! what its kernel never acknowledged is re-sent, whole and in order, to the next manager, and
//! what it did acknowledge is not (no duplicates).
//!
//! The kernel says how many written bytes are unacknowledged (`SIOCOUTQ`); these are always the
//! last ones written, so the copy is trimmed from the front, one whole frame at a time. The
//! copy starts at a frame boundary; its last frame may be partly written (its rest is still at
//! the front of the agent's pipe).

use std::collections::VecDeque;

use bytes::BytesMut;

use crate::frame::HEADER_LEN;

/// Bytes copied before the copy is first trimmed against the kernel's count while writing;
/// after that, each time it doubled.
pub(super) const TRIM_AT: usize = 4 * 1024;
/// The most kept: past it the oldest frames are let go unprotected (counted at risk if the
/// manager then fails). Above the default socket send buffer on loopback and LANs.
pub(super) const KEEP_MAX: usize = 1024 * 1024;

/// Distance between remembered frame starts: trimming walks at most this far through the
/// frames (cold in memory) instead of through everything acknowledged.
const MARK_EVERY: u64 = 4 * 1024;

/// Frames written to the current manager, from a frame boundary.
///
/// A ring: while an agent streams, the copy follows the manager's send queue, adding at the
/// back and trimming at the front, so it reaches its working size once and then neither
/// grows nor moves (a contiguous buffer trimmed at the front reallocates and copies itself
/// again and again, which cost more than the copy). Frame starts are read once, as the bytes
/// are recorded (still in cache), and one every [`MARK_EVERY`] bytes is remembered, so a trim
/// does not walk the frame headers of the whole copy again. An agent that is not streaming
/// holds none of it (one pointer).
#[derive(Debug, Default)]
pub(super) struct Unacked {
    ring: Option<Box<Ring>>,
    /// Whole frames let go while over [`KEEP_MAX`] since the last failover.
    pub(super) unprotected: u32,
    /// The frames re-sent to the next manager include the control frame it must see first.
    pub(super) replay_resent: bool,
    /// Twice what was kept after the last trim, in KiB (0: [`TRIM_AT`]).
    next_trim_kib: u16,
}

/// The copy itself.
#[derive(Debug, Default)]
struct Ring {
    sent: VecDeque<u8>,
    /// Stream position of `sent[0]` (always a frame start) and that frame's number.
    front: Position,
    /// The next frame start whose header has not been read yet.
    scan: Position,
    /// Remembered frame starts after `front`, in order, at least [`MARK_EVERY`] apart.
    marks: VecDeque<Position>,
}

/// A frame start in the stream written to the manager: its byte offset and frame number.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct Position {
    at: u64,
    frame: u64,
}

impl Unacked {
    /// Bytes held.
    pub(super) fn len(&self) -> usize {
        self.ring.as_ref().map_or(0, |r| r.sent.len())
    }

    /// Whether the copy grew enough to be worth asking the kernel what was acknowledged.
    pub(super) fn should_trim(&self) -> bool {
        self.len() > TRIM_AT.max(usize::from(self.next_trim_kib) * 1024)
    }

    /// Notes bytes just written to the manager (in order, continuing the previous ones).
    pub(super) fn record(&mut self, written: &[u8]) {
        let ring = self.ring.get_or_insert_with(|| {
            // Room for the writes up to the first trim at once, rather than growing to it.
            Box::new(Ring {
                sent: VecDeque::with_capacity(written.len().max(2 * TRIM_AT)),
                ..Ring::default()
            })
        });
        let frames = ring.record(written);
        self.unprotected = self
            .unprotected
            .saturating_add(u32::try_from(frames).unwrap_or(u32::MAX));
    }

    /// Drops the frames the manager's TCP acknowledged, given the bytes it has not
    /// (`unacked`, counted from the end). The buffer is kept for the next writes.
    pub(super) fn trim(&mut self, unacked: usize) {
        if let Some(ring) = &mut self.ring {
            let acked = ring.sent.len().saturating_sub(unacked) as u64;
            ring.cut_to(ring.front.at + acked);
            self.next_trim_kib = u16::try_from(ring.sent.len() * 2 / 1024).unwrap_or(u16::MAX);
        }
    }

    /// [`trim`](Self::trim), then frees the buffer if nothing is left (the manager answered,
    /// so the agent is not streaming: an idle agent holds no copy).
    pub(super) fn trim_and_release(&mut self, unacked: usize) {
        self.trim(unacked);
        self.release_if_empty();
    }

    /// Frees the buffers if they hold nothing.
    pub(super) fn release_if_empty(&mut self) {
        if self.ring.as_ref().is_some_and(|r| r.sent.is_empty()) {
            self.ring = None;
        }
    }

    /// Takes what must be re-sent after the manager failed with `unacked` bytes not
    /// acknowledged (`None`: it processed nothing at all, say it refused the agent: every
    /// frame kept). Returns the bytes (whole frames, then the written start of a frame whose
    /// rest is still in the pipe) and the number of whole frames among them.
    pub(super) fn take_resend(&mut self, unacked: Option<usize>) -> (BytesMut, u64) {
        if let Some(unacked) = unacked {
            self.trim(unacked);
        }
        let Some(ring) = self.ring.take() else {
            return (BytesMut::new(), 0);
        };
        let end = ring.end();
        // Whole frames: up to the last frame start read, or one before if that frame is
        // not all here.
        let whole = if ring.scan.at <= end {
            ring.scan.frame
        } else {
            ring.scan.frame.saturating_sub(1)
        };
        let frames = whole.saturating_sub(ring.front.frame);
        let (a, b) = ring.sent.as_slices();
        let mut out = BytesMut::with_capacity(a.len() + b.len());
        out.extend_from_slice(a);
        out.extend_from_slice(b);
        (out, frames)
    }

    /// Forgets everything (a planned move: the manager was left at a boundary, gracefully).
    /// What is written next starts a new stream at a frame boundary.
    pub(super) fn clear(&mut self) {
        self.ring = None;
    }
}

impl Ring {
    /// Appends written bytes; returns how many whole frames were let go past [`KEEP_MAX`].
    fn record(&mut self, written: &[u8]) -> u64 {
        self.sent.extend(written);
        let end = self.end();
        while self.scan.at + HEADER_LEN as u64 <= end {
            let len = self.header_at(self.scan.at);
            self.scan = Position {
                at: self.scan.at + HEADER_LEN as u64 + u64::from(len),
                frame: self.scan.frame + 1,
            };
            let last = self.marks.back().unwrap_or(&self.front).at;
            if self.scan.at <= end && self.scan.at - last >= MARK_EVERY {
                self.marks.push_back(self.scan);
            }
        }
        if self.sent.len() <= KEEP_MAX {
            return 0;
        }
        let before = self.front.frame;
        // Never cut into a frame: keep it all if the oldest frame is larger than the excess.
        self.cut_to(end - KEEP_MAX as u64);
        self.front.frame - before
    }

    /// Stream position just past the last byte recorded.
    fn end(&self) -> u64 {
        self.front.at + self.sent.len() as u64
    }

    /// The length field of the frame header at stream position `at` (fully recorded).
    fn header_at(&self, at: u64) -> u32 {
        let i = (at - self.front.at) as usize;
        let mut header = [0u8; HEADER_LEN];
        for (k, b) in header.iter_mut().enumerate() {
            *b = self.sent[i + k];
        }
        u32::from_le_bytes(header)
    }

    /// Drops the whole frames at the front that end at or before stream position `limit`.
    fn cut_to(&mut self, limit: u64) {
        let mut to = self.front;
        while let Some(&m) = self.marks.front() {
            if m.at > limit {
                break;
            }
            to = m;
            self.marks.pop_front();
        }
        // Walk the rest (less than MARK_EVERY bytes) frame by frame, only through frames
        // whose headers were read (a frame start past `scan` is not known yet).
        while to.at < self.scan.at {
            let next = to.at + HEADER_LEN as u64 + u64::from(self.header_at(to.at));
            if next > limit {
                break;
            }
            to = Position {
                at: next,
                frame: to.frame + 1,
            };
        }
        self.sent.drain(..(to.at - self.front.at) as usize);
        self.front = to;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::{encode_frame, MAX_PAYLOAD};

    fn frames(sizes: &[usize]) -> Vec<u8> {
        let mut out = Vec::new();
        for (i, &n) in sizes.iter().enumerate() {
            out.extend_from_slice(
                &encode_frame(&vec![b'a'.wrapping_add(i as u8); n], MAX_PAYLOAD).unwrap(),
            );
        }
        out
    }

    #[test]
    fn only_frames_the_kernel_did_not_fully_acknowledge_are_resent() {
        let all = frames(&[10, 20, 30]); // 14 + 24 + 34 bytes
        let mut u = Unacked::default();
        u.record(&all[..50]);
        u.record(&all[50..]);
        // 40 bytes unacknowledged: the third frame entirely, the last 6 bytes of the second.
        let (resend, n) = u.take_resend(Some(40));
        assert_eq!(n, 2);
        assert_eq!(&resend[..], &all[14..]);
        assert_eq!(u.len(), 0);
    }

    #[test]
    fn a_partly_written_frame_is_kept_with_its_written_start() {
        let all = frames(&[10, 20]);
        let mut u = Unacked::default();
        u.record(&all[..20]); // the first frame and 6 bytes of the second
        let (resend, n) = u.take_resend(Some(8));
        // The first frame's last 2 bytes were not acknowledged: it goes again, then the start.
        assert_eq!(n, 1);
        assert_eq!(&resend[..], &all[..20]);
        let mut u = Unacked::default();
        u.record(&all[..20]);
        let (resend, n) = u.take_resend(Some(0));
        assert_eq!(n, 0);
        assert_eq!(&resend[..], &all[14..20]);
    }

    #[test]
    fn a_refusing_manager_processed_nothing_so_everything_goes_again() {
        let all = frames(&[10, 20, 30]);
        let mut u = Unacked::default();
        u.record(&all);
        let (resend, n) = u.take_resend(None);
        assert_eq!((resend.len(), n), (all.len(), 3));
    }

    #[test]
    fn trimming_frees_acknowledged_frames_and_releasing_the_buffer() {
        let all = frames(&[10, 20]);
        let mut u = Unacked::default();
        u.record(&all);
        u.trim(24);
        assert_eq!(u.len(), 24);
        // While writing: the buffer stays for the next frames.
        u.trim(0);
        assert_eq!(u.len(), 0);
        assert!(u.ring.is_some());
        // Once the manager answered (or the agent went quiet): nothing held at all.
        u.record(&all);
        u.trim_and_release(24);
        assert_eq!(u.len(), 24);
        assert!(u.ring.is_some());
        u.trim_and_release(0);
        assert_eq!(u.len(), 0);
        assert!(u.ring.is_none());
    }

    #[test]
    fn the_copy_is_bounded_by_whole_frames() {
        let big = frames(&[60_000; 40]);
        let mut u = Unacked::default();
        for chunk in big.chunks(7_000) {
            u.record(chunk);
        }
        assert!(u.len() <= KEEP_MAX + 60_004);
        assert!(u.unprotected > 0);
        // What is kept still starts at a boundary: everything unacknowledged parses whole.
        let (resend, n) = u.take_resend(Some(u.len()));
        let mut check = Unacked::default();
        check.record(&resend);
        assert_eq!(check.take_resend(None), (resend.clone(), n));
        assert_eq!(resend.len() % 60_004, 0);
    }

    /// The ring, its remembered frame starts and the walk between them agree with a plain
    /// reading of the frames, for random frame sizes, write sizes and acknowledgements (the
    /// ring wraps and the marks are crossed many times).
    #[test]
    fn the_ring_matches_a_plain_copy_under_random_writes_and_trims() {
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let mut rnd = |n: usize| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            (seed % n.max(1) as u64) as usize
        };
        for _ in 0..50 {
            let sizes: Vec<usize> = (0..300).map(|_| 1 + rnd(3000)).collect();
            let all = frames(&sizes);
            let starts: Vec<usize> = sizes
                .iter()
                .scan(0, |at, n| {
                    let s = *at;
                    *at += HEADER_LEN + n;
                    Some(s)
                })
                .collect();
            let mut u = Unacked::default();
            let (mut written, mut front) = (0usize, 0usize);
            while written < all.len() {
                let n = (1 + rnd(9000)).min(all.len() - written);
                u.record(&all[written..written + n]);
                written += n;
                if rnd(3) == 0 {
                    let unacked = rnd(written - front + 1);
                    u.trim(unacked);
                    // Plain: the last frame start at or before the acknowledged point whose
                    // frame ends there or before.
                    let acked = written - unacked;
                    while let Some(&next) = starts.iter().find(|&&s| s > front) {
                        if next > acked {
                            break;
                        }
                        front = next;
                    }
                    if acked == all.len() {
                        front = all.len();
                    }
                    assert_eq!(u.len(), written - front);
                }
            }
            let unacked = rnd(u.len() + 1);
            let (resend, n) = u.take_resend(Some(unacked));
            let start = all.len() - resend.len();
            assert_eq!(&resend[..], &all[start..]);
            assert!(starts.contains(&start) || start == all.len());
            assert_eq!(n as usize, starts.iter().filter(|&&s| s >= start).count());
        }
    }
}
