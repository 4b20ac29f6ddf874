//! One direction of a relayed connection: a buffer of whole, checked frames and the start of
//! the next one, with the byte position of the frame boundary always known.

use std::time::Instant;

use bytes::{Buf, BytesMut};

use super::End;
use crate::frame::{self, HEADER_LEN};

/// One direction of a relayed connection.
///
/// Layout of `buf`: `[0, ready)` whole, checked frames not yet written; `[ready, len)` the
/// start of the next, incomplete frame. `head_left` is how much of the frame at the front is
/// still to be written (0 at a frame boundary).
#[derive(Debug, Default)]
pub(crate) struct Pipe {
    pub(super) buf: BytesMut,
    pub(super) ready: usize,
    pub(super) head_left: usize,
    /// A protocol failure found behind the ready frames: reported once they are written, so
    /// every good frame that preceded a bad one is delivered. (Boxed: rare, and a pipe stays
    /// small.)
    pub(super) failed: Option<Box<End>>,
    /// Whole frames in the ready region (a frame being written counts until it is done).
    ready_frames: u32,
    /// Frames written in the second `written_at` (of [`clock_secs`]) and in the one before
    /// (see `recently_written`); `written_at` 0: nothing written yet.
    written_now: u32,
    written_before: u32,
    written_at: u32,
}

/// Whole seconds since the process's first call, plus one (0 stays free to mean "never"):
/// a clock four bytes wide, for counters that only need to know the current second.
pub(super) fn clock_secs() -> u32 {
    static EPOCH: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    let epoch = *EPOCH.get_or_init(Instant::now);
    u32::try_from(epoch.elapsed().as_secs())
        .unwrap_or(u32::MAX - 1)
        .saturating_add(1)
}

impl Pipe {
    /// Bytes held (whole frames waiting plus the incomplete tail).
    #[cfg(test)]
    pub(super) fn buffered(&self) -> usize {
        self.buf.len()
    }

    /// Whether the next byte to write starts a frame.
    #[cfg(test)]
    pub(super) fn at_boundary(&self) -> bool {
        self.head_left == 0
    }

    /// Checks the frames that arrived, moving whole ones into the ready region.
    /// Returns the number of new frames and their bytes.
    pub(super) fn take_frames(
        &mut self,
        max: u32,
        mut inspect: impl FnMut(&[u8]) -> Result<(), End>,
    ) -> (u64, u64) {
        let mut at = self.ready;
        let mut frames = 0u64;
        loop {
            match frame::check(&self.buf[at..], max) {
                Ok(Some(total)) => {
                    if let Err(e) = inspect(&self.buf[at + HEADER_LEN..at + total]) {
                        self.failed = Some(Box::new(e));
                        break;
                    }
                    at += total;
                    frames += 1;
                }
                Ok(None) => break,
                Err(e) => {
                    // Recorded as the agent's; `pump` re-labels it for the manager side.
                    self.failed = Some(Box::new(End::AgentFrame(e)));
                    break;
                }
            }
        }
        let bytes = (at - self.ready) as u64;
        self.ready = at;
        self.ready_frames = self
            .ready_frames
            .saturating_add(u32::try_from(frames).unwrap_or(u32::MAX));
        (frames, bytes)
    }

    /// Counts frames fully written now.
    pub(super) fn note_written(&mut self, frames: u64) {
        let now = clock_secs();
        if now != self.written_at {
            self.written_before = if now == self.written_at.wrapping_add(1) {
                self.written_now
            } else {
                0
            };
            self.written_now = 0;
            self.written_at = now;
        }
        let frames = u32::try_from(frames).unwrap_or(u32::MAX);
        self.written_now = self.written_now.saturating_add(frames);
    }

    /// Frames written during the last one to two seconds: when the peer just failed, these
    /// may have been lost in its buffers (TCP does not say which were processed).
    pub(super) fn recently_written(&self) -> u64 {
        if self.written_at == 0 {
            return 0;
        }
        let now = clock_secs();
        let n = if now == self.written_at {
            self.written_now.saturating_add(self.written_before)
        } else if now == self.written_at.wrapping_add(1) {
            self.written_now
        } else {
            0
        };
        u64::from(n)
    }

    /// Forgets the frames written so far for [`recently_written`](Self::recently_written): they
    /// were counted at risk with the manager that failed, and must not be counted again if
    /// the next one fails right after.
    pub(super) fn forget_written(&mut self) {
        self.written_now = 0;
        self.written_before = 0;
    }

    /// Drops the unwritten rest of a partly written frame (its start went to a manager that
    /// failed; the rest must not reach another one). Returns whether a frame was cut.
    pub(super) fn drop_partial_head(&mut self) -> bool {
        if self.head_left == 0 {
            return false;
        }
        let rest = self.head_left.min(self.ready);
        self.buf.advance(rest);
        self.ready -= rest;
        self.head_left = 0;
        self.ready_frames = self.ready_frames.saturating_sub(1);
        true
    }

    /// Puts frames back at the front, to be written again (to the next manager): `front` is
    /// whole frames (`frames` of them), possibly ending with the written start of the frame
    /// whose rest is at the front of the pipe, so that frame is whole again.
    pub(super) fn requeue(&mut self, mut front: BytesMut, frames: u64) {
        let added = front.len();
        front.extend_from_slice(&self.buf);
        self.buf = front;
        self.ready += added;
        self.head_left = 0;
        self.ready_frames = self
            .ready_frames
            .saturating_add(u32::try_from(frames).unwrap_or(u32::MAX));
    }

    /// Drops the incomplete frame at the tail (from a manager that failed: never forwarded).
    pub(super) fn drop_partial_tail(&mut self) -> bool {
        let cut = self.buf.len() > self.ready;
        self.buf.truncate(self.ready);
        if self.failed.is_some() {
            self.failed = None;
        }
        cut
    }

    /// Marks `n` written bytes as gone, tracking the frame boundary; returns the number of
    /// frames that were completed.
    pub(super) fn consume(&mut self, mut n: usize) -> u64 {
        if self.head_left == 0 && n == self.ready {
            // Everything ready went out, starting at a boundary: it ends at one too (the ready
            // region only ever holds whole frames), so no header needs to be walked.
            self.buf.advance(n);
            self.ready = 0;
            return u64::from(std::mem::take(&mut self.ready_frames));
        }
        let mut done = 0;
        self.ready -= n;
        while n > 0 {
            if self.head_left == 0 {
                // At a boundary: the header of the next frame is at the front.
                let header = self
                    .buf
                    .first_chunk::<HEADER_LEN>()
                    .copied()
                    .unwrap_or_default();
                self.head_left = HEADER_LEN + u32::from_le_bytes(header) as usize;
            }
            let step = n.min(self.head_left);
            self.buf.advance(step);
            self.head_left -= step;
            n -= step;
            if self.head_left == 0 {
                done += 1;
            }
        }
        self.ready_frames = self
            .ready_frames
            .saturating_sub(u32::try_from(done).unwrap_or(u32::MAX));
        done
    }
}
