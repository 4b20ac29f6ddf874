//! Batching under load: a worker thread that has just moved a lot of data pauses briefly
//! before it sleeps in the kernel, so that its next round finds more bytes waiting on each
//! socket.
//!
//! A relay's cost is mostly per system call and per wake-up, not per byte: every `recv` and
//! `send` takes socket locks and builds or frees a segment, and every write that reaches a
//! sleeping manager wakes it. Under a heavy stream of small agent messages, a relay that
//! reacts to each readiness at once spends most of its time on those fixed costs. Waiting
//! a fraction of a millisecond when (and only when) the last round was busy lets each call
//! carry several times more frames, the same technique as interrupt moderation in network
//! cards. A quiet proxy never pauses: its rounds move little, and it reacts at once.
//!
//! The relay counts the bytes it reads with [`note`]; the runtime calls [`before_park`] each
//! time a worker is about to sleep (`tokio::runtime::Builder::on_thread_park`).
//!
//! ```
//! use std::time::Duration;
//! use wazuh_proxy_core::pace;
//!
//! pace::set_window(Duration::from_micros(200));
//! let rt = tokio::runtime::Builder::new_multi_thread()
//!     .on_thread_park(pace::before_park)
//!     .enable_all()
//!     .build()
//!     .unwrap();
//! # drop(rt);
//! ```

use std::cell::Cell;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Bytes a worker must have read since it last slept for its round to count as busy.
pub const BUSY_BYTES: u64 = 64 * 1024;

/// The longest pause accepted (a longer one would add latency without saving more work).
pub const MAX_WINDOW: Duration = Duration::from_millis(5);

/// The pause in nanoseconds (0: never pause).
static WINDOW_NS: AtomicU64 = AtomicU64::new(0);

/// Pauses taken since the process started.
static PAUSES: AtomicU64 = AtomicU64::new(0);

thread_local! {
    /// Bytes read by relays on this thread since it last slept.
    static MOVED: Cell<u64> = const { Cell::new(0) };
}

/// Sets the pause taken before sleeping after a busy round (zero turns batching off;
/// capped at [`MAX_WINDOW`]).
pub fn set_window(window: Duration) {
    let ns = window.min(MAX_WINDOW).as_nanos();
    WINDOW_NS.store(u64::try_from(ns).unwrap_or(u64::MAX), Ordering::Relaxed);
}

/// The pause in force.
pub fn window() -> Duration {
    Duration::from_nanos(WINDOW_NS.load(Ordering::Relaxed))
}

/// Pauses taken since the process started, by every worker (how often the proxy was busy
/// enough to batch).
pub fn pauses() -> u64 {
    PAUSES.load(Ordering::Relaxed)
}

/// Counts bytes read by a relay on the current thread.
#[inline]
pub fn note(bytes: usize) {
    MOVED.with(|m| m.set(m.get().saturating_add(bytes as u64)));
}

/// To be called by the runtime just before a worker thread sleeps: pauses for the window
/// when this thread's last round read at least [`BUSY_BYTES`].
pub fn before_park() {
    let moved = MOVED.with(|m| m.replace(0));
    let ns = WINDOW_NS.load(Ordering::Relaxed);
    if ns > 0 && moved >= BUSY_BYTES {
        PAUSES.fetch_add(1, Ordering::Relaxed);
        std::thread::sleep(Duration::from_nanos(ns));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // One test: the window is process-wide.
    #[test]
    fn window_is_capped_and_a_quiet_round_never_pauses() {
        set_window(Duration::from_secs(1));
        assert_eq!(window(), MAX_WINDOW);
        set_window(Duration::ZERO);
        assert_eq!(window(), Duration::ZERO);
        note(BUSY_BYTES as usize);
        let t = std::time::Instant::now();
        before_park();
        assert_eq!(
            MOVED.with(Cell::get),
            0,
            "the count restarts after each round"
        );
        set_window(Duration::from_millis(2));
        note(100);
        before_park();
        set_window(Duration::ZERO);
        // Neither round paused: the first had batching off, the second was quiet.
        assert!(t.elapsed() < Duration::from_millis(2));
    }
}
