//! A copy of the frames written to a manager that its TCP may not have acknowledged yet, so
//! that a manager that dies silently (a blackholed link, a crashed host) loses none of them:
//! what its kernel never acknowledged is re-sent, whole and in order, to the next manager, and
//! what it did acknowledge is not (no duplicates).
//!
//! The kernel says how many written bytes are unacknowledged (`SIOCOUTQ`); these are always the
//! last ones written, so the copy is trimmed from the front, one whole frame at a time. The
//! copy starts at a frame boundary; its last frame may be partly written (its rest is still at
//! the front of the agent's pipe).

use bytes::{Buf, BytesMut};

use crate::frame::HEADER_LEN;

/// Bytes copied before the copy is first trimmed against the kernel's count while writing;
/// after that, each time it doubled.
pub(super) const TRIM_AT: usize = 4 * 1024;
/// The most kept: past it the oldest frames are let go unprotected (counted at risk if the
/// manager then fails). Above the default socket send buffer on loopback and LANs.
pub(super) const KEEP_MAX: usize = 1024 * 1024;

/// Frames written to the current manager, from a frame boundary.
#[derive(Debug, Default)]
pub(super) struct Unacked {
    sent: BytesMut,
    /// Whole frames let go while over [`KEEP_MAX`] since the last failover.
    pub(super) unprotected: u32,
    /// The frames re-sent to the next manager include the control frame it must see first.
    pub(super) replay_resent: bool,
    /// Twice what was kept after the last trim, in KiB (0: [`TRIM_AT`]).
    next_trim_kib: u16,
}

impl Unacked {
    /// Bytes held.
    pub(super) fn len(&self) -> usize {
        self.sent.len()
    }

    /// Whether the copy grew enough to be worth asking the kernel what was acknowledged.
    pub(super) fn should_trim(&self) -> bool {
        self.sent.len() > TRIM_AT.max(usize::from(self.next_trim_kib) * 1024)
    }

    /// Notes bytes just written to the manager (in order, continuing the previous ones).
    pub(super) fn record(&mut self, written: &[u8]) {
        self.sent.extend_from_slice(written);
        if self.sent.len() > KEEP_MAX {
            let excess = self.sent.len() - KEEP_MAX;
            let (cut, frames) = whole_frames_within(&self.sent, excess);
            // Never cut into a frame: keep it all if the oldest frame is larger than the excess.
            self.sent.advance(cut);
            self.unprotected = self
                .unprotected
                .saturating_add(u32::try_from(frames).unwrap_or(u32::MAX));
        }
    }

    /// Drops the frames the manager's TCP acknowledged, given the bytes it has not
    /// (`unacked`, counted from the end). Frees the buffer when nothing is left.
    pub(super) fn trim(&mut self, unacked: usize) {
        let acked = self.sent.len().saturating_sub(unacked);
        let (cut, _) = whole_frames_within(&self.sent, acked);
        self.sent.advance(cut);
        if self.sent.is_empty() {
            self.sent = BytesMut::new();
        }
        self.next_trim_kib = u16::try_from(self.sent.len() * 2 / 1024).unwrap_or(u16::MAX);
    }

    /// Takes what must be re-sent after the manager failed with `unacked` bytes not
    /// acknowledged (`None`: it processed nothing at all, say it refused the agent: every
    /// frame kept). Returns the bytes (whole frames, then the written start of a frame whose
    /// rest is still in the pipe) and the number of whole frames among them.
    pub(super) fn take_resend(&mut self, unacked: Option<usize>) -> (BytesMut, u64) {
        if let Some(unacked) = unacked {
            self.trim(unacked);
        }
        let sent = std::mem::take(&mut self.sent);
        let (_, frames) = whole_frames_within(&sent, sent.len());
        (sent, frames)
    }

    /// Forgets everything (a planned move: the manager was left at a boundary, gracefully).
    pub(super) fn clear(&mut self) {
        self.sent = BytesMut::new();
    }
}

/// The length of the longest run of whole frames at the front of `buf` that ends at or before
/// `limit`, and how many frames it holds.
fn whole_frames_within(buf: &[u8], limit: usize) -> (usize, u64) {
    let (mut at, mut frames) = (0usize, 0u64);
    while let Some(header) = buf.get(at..).and_then(|b| b.first_chunk::<HEADER_LEN>()) {
        let end = at + HEADER_LEN + u32::from_le_bytes(*header) as usize;
        if end > limit || end > buf.len() {
            break;
        }
        at = end;
        frames += 1;
    }
    (at, frames)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::{encode_frame, MAX_PAYLOAD};

    fn frames(sizes: &[usize]) -> Vec<u8> {
        let mut out = Vec::new();
        for (i, &n) in sizes.iter().enumerate() {
            out.extend_from_slice(&encode_frame(&vec![b'a' + i as u8; n], MAX_PAYLOAD).unwrap());
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
    fn trimming_frees_acknowledged_frames_and_the_buffer() {
        let all = frames(&[10, 20]);
        let mut u = Unacked::default();
        u.record(&all);
        u.trim(24);
        assert_eq!(u.len(), 24);
        u.trim(0);
        assert_eq!(u.len(), 0);
        assert_eq!(u.sent.capacity(), 0);
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
        assert_eq!(
            whole_frames_within(&resend, resend.len()),
            (resend.len(), n)
        );
    }
}
