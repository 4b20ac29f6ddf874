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
//! The pause is adaptive: it is taken only while the worker is saturated, that is while it has
//! spent most of its recent rounds working rather than sleeping in the kernel. A worker that
//! moved a lot of data in one round only because it caught up after a hiccup (a moderate load
//! of many agents, a moment without the CPU) goes back to sleep at once: there, a pause would
//! only add its length to the round trip of every message that arrives meanwhile, and save
//! little, since the next round is small anyway.
//!
//! The relay counts the bytes it reads with [`note`]; the runtime calls [`before_park`] each
//! time a worker is about to sleep (`tokio::runtime::Builder::on_thread_park`) and
//! [`after_unpark`] each time it wakes (`on_thread_unpark`). Without [`after_unpark`] a worker
//! never counts as saturated and never pauses.
//!
//! ```
//! use std::time::Duration;
//! use wazuh_proxy_core::pace;
//!
//! pace::set_window(Duration::from_micros(200));
//! let rt = tokio::runtime::Builder::new_multi_thread()
//!     .on_thread_park(pace::before_park)
//!     .on_thread_unpark(pace::after_unpark)
//!     .enable_all()
//!     .build()
//!     .unwrap();
//! # drop(rt);
//! ```

use std::cell::Cell;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Bytes a worker must have read since it last slept for its round to count as busy.
pub const BUSY_BYTES: u64 = 64 * 1024;

/// The longest pause accepted (a longer one would add latency without saving more work).
pub const MAX_WINDOW: Duration = Duration::from_millis(5);

/// The pause in nanoseconds (0: never pause).
static WINDOW_NS: AtomicU64 = AtomicU64::new(0);

/// Pauses taken since the process started.
static PAUSES: AtomicU64 = AtomicU64::new(0);

/// Share of its time a worker must spend working (not asleep in the kernel), averaged over its
/// recent rounds, to count as saturated: [`LOAD_ONE`] is all of it.
pub const SATURATED: u32 = LOAD_ONE * 3 / 4;

/// The fixed-point 1.0 of a worker's load.
pub const LOAD_ONE: u32 = 1024;

thread_local! {
    /// Bytes read by relays on this thread since it last slept.
    static MOVED: Cell<u64> = const { Cell::new(0) };
    /// When this worker last woke, and when it last went to sleep.
    static WOKE: Cell<Option<Instant>> = const { Cell::new(None) };
    static SLEPT: Cell<Option<Instant>> = const { Cell::new(None) };
    /// How long it slept the last time.
    static IDLE: Cell<Duration> = const { Cell::new(Duration::ZERO) };
    /// Its load: the share of time spent working, averaged over recent rounds.
    static LOAD: Cell<u32> = const { Cell::new(0) };
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

/// The load after one more round of `busy` work that followed `idle` sleep: an average over
/// about the last eight rounds, so that one long round (a catch-up after a hiccup) does not
/// make a lightly loaded worker look saturated.
pub fn next_load(load: u32, busy: Duration, idle: Duration) -> u32 {
    let total = busy.saturating_add(idle).as_nanos().max(1);
    let share = u32::try_from(busy.as_nanos() * u128::from(LOAD_ONE) / total).unwrap_or(LOAD_ONE);
    (load.min(LOAD_ONE) * 7 + share.min(LOAD_ONE)) / 8
}

/// Whether a worker pauses before sleeping: batching is on, its last round read at least
/// [`BUSY_BYTES`], and it is saturated (its load at least [`SATURATED`]).
pub fn should_pause(window_ns: u64, moved: u64, load: u32) -> bool {
    window_ns > 0 && moved >= BUSY_BYTES && load >= SATURATED
}

/// To be called by the runtime just after a worker thread wakes: notes how long it slept.
pub fn after_unpark() {
    let now = Instant::now();
    if let Some(slept) = SLEPT.with(Cell::get) {
        IDLE.with(|i| i.set(now.saturating_duration_since(slept)));
    }
    WOKE.with(|w| w.set(Some(now)));
}

/// To be called by the runtime just before a worker thread sleeps: pauses for the window
/// when this thread's last round read at least [`BUSY_BYTES`] and the thread is saturated
/// (see the module documentation). The pause counts as work: while batching keeps the worker
/// busy, batching stays on.
pub fn before_park() {
    let moved = MOVED.with(|m| m.replace(0));
    let ns = WINDOW_NS.load(Ordering::Relaxed);
    if ns == 0 {
        return;
    }
    let load = match WOKE.with(Cell::get) {
        Some(woke) => {
            let busy = woke.elapsed();
            let idle = IDLE.with(Cell::get);
            LOAD.with(|l| {
                let load = next_load(l.get(), busy, idle);
                l.set(load);
                load
            })
        }
        None => 0,
    };
    if should_pause(ns, moved, load) {
        PAUSES.fetch_add(1, Ordering::Relaxed);
        std::thread::sleep(Duration::from_nanos(ns));
    }
    SLEPT.with(|s| s.set(Some(Instant::now())));
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    // One test touches the window: it is process-wide.
    #[test]
    fn window_is_capped_and_the_count_restarts_each_round() {
        set_window(Duration::from_secs(1));
        assert_eq!(window(), MAX_WINDOW);
        set_window(Duration::ZERO);
        assert_eq!(window(), Duration::ZERO);
        note(BUSY_BYTES as usize);
        let before = pauses();
        before_park();
        assert_eq!(
            MOVED.with(Cell::get),
            0,
            "the count restarts after each round"
        );
        assert_eq!(pauses(), before, "batching off never pauses");
    }

    #[test]
    fn only_a_saturated_worker_after_a_busy_round_pauses() {
        let w = 200_000;
        assert!(should_pause(w, BUSY_BYTES, SATURATED));
        assert!(!should_pause(0, BUSY_BYTES, LOAD_ONE), "batching off");
        assert!(!should_pause(w, BUSY_BYTES - 1, LOAD_ONE), "a quiet round");
        assert!(!should_pause(w, u64::MAX, SATURATED - 1), "not saturated");
    }

    #[test]
    fn load_follows_the_share_of_time_spent_working() {
        // Flat out: rounds that end to find work waiting at once.
        let mut load = 0;
        for _ in 0..40 {
            load = next_load(load, MS, Duration::ZERO);
        }
        assert!(load >= SATURATED, "{load}");
        // Many agents at a moderate rate: 15 µs of work per 100 µs.
        let mut moderate = 0;
        for _ in 0..1000 {
            moderate = next_load(moderate, MS * 15 / 1000, MS * 85 / 1000);
        }
        assert!(moderate < LOAD_ONE / 4, "{moderate}");
        // A catch-up round after a hiccup does not make it saturated...
        let after = next_load(moderate, MS * 20, MS * 85 / 1000);
        assert!(after < SATURATED, "{after}");
        // ...and a quiet stretch brings a saturated worker back down.
        for _ in 0..20 {
            load = next_load(load, MS / 100, MS);
        }
        assert!(load < SATURATED, "{load}");
        // Degenerate rounds stay in range.
        assert!(next_load(LOAD_ONE, Duration::ZERO, Duration::ZERO) <= LOAD_ONE);
        assert!(next_load(u32::MAX, Duration::MAX, Duration::MAX) <= LOAD_ONE);
    }
}
