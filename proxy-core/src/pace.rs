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
//! The relay counts the bytes it reads with `note`; the runtime calls [`before_park`] each
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
pub(crate) const BUSY_BYTES: u64 = 64 * 1024;

/// The longest pause accepted (a longer one would add latency without saving more work).
pub const MAX_WINDOW: Duration = Duration::from_millis(5);

/// The pause in nanoseconds (0: never pause).
static WINDOW_NS: AtomicU64 = AtomicU64::new(0);

/// Pauses taken since the process started.
static PAUSES: AtomicU64 = AtomicU64::new(0);

/// Share of its time a worker must spend working (not asleep in the kernel), averaged over its
/// recent time, to count as saturated: [`LOAD_ONE`] is all of it.
pub(crate) const SATURATED: u32 = LOAD_ONE * 3 / 4;

/// The fixed-point 1.0 of a worker's load.
pub(crate) const LOAD_ONE: u32 = 1024;

/// Bytes per second a worker must read, averaged over its recent time, to count as
/// streaming ([`BUSY_BYTES`] every millisecond): a flood that the load side, not the worker's
/// CPU, limits. Loads of many agents at moderate rates read far less (1,000 agents at
/// 10 events/s: about 4 MB/s).
pub(crate) const STREAMING: u64 = BUSY_BYTES * 1000;

/// The stretch of a worker's time (work and sleep) over which its load and rate are measured
/// before they enter the averages.
pub(crate) const SPAN: Duration = Duration::from_millis(1);

/// What a worker thread's recent rounds say about its load.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Worker {
    /// The share of its time spent working ([`LOAD_ONE`]: all of it), averaged over the last
    /// few [`SPAN`]s.
    pub load: u32,
    /// Bytes read per second, averaged over the last few [`SPAN`]s.
    pub rate: u64,
    /// The span being measured: nanoseconds of work, of work and sleep, and bytes read.
    busy_ns: u64,
    span_ns: u64,
    bytes: u64,
}

impl Worker {
    /// The state after one more round of `busy` work that read `moved` bytes and followed
    /// `idle` sleep. Time-weighted: rounds add up to spans of at least [`SPAN`], and each span
    /// enters the averages with a weight of 1/4. One long round that catches up after a hiccup
    /// of a lightly loaded worker is one span: it neither makes the worker saturated nor (its
    /// bytes spread over the hiccup) streaming; several in a row do.
    pub(crate) fn round(self, moved: u64, busy: Duration, idle: Duration) -> Worker {
        let ns = |d: Duration| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        let mut w = self;
        w.busy_ns = w.busy_ns.saturating_add(ns(busy));
        w.span_ns = w.span_ns.saturating_add(ns(busy.saturating_add(idle)));
        w.bytes = w.bytes.saturating_add(moved);
        if w.span_ns < ns(SPAN) {
            return w;
        }
        let span = u128::from(w.span_ns.max(1));
        let share = u128::from(w.busy_ns) * u128::from(LOAD_ONE) / span;
        let share = u32::try_from(share).unwrap_or(LOAD_ONE).min(LOAD_ONE);
        let rate = u64::try_from(u128::from(w.bytes) * 1_000_000_000 / span).unwrap_or(u64::MAX);
        Worker {
            load: (w.load.min(LOAD_ONE) * 3 + share) / 4,
            rate: w.rate / 4 * 3 + rate / 4,
            busy_ns: 0,
            span_ns: 0,
            bytes: 0,
        }
    }

    /// Saturated: busy most of the time, or streaming.
    pub(crate) fn saturated(self) -> bool {
        self.load >= SATURATED || self.rate >= STREAMING
    }
}

thread_local! {
    /// Bytes read by relays on this thread since it last slept.
    static MOVED: Cell<u64> = const { Cell::new(0) };
    /// When this worker last woke, and when it last went to sleep.
    static WOKE: Cell<Option<Instant>> = const { Cell::new(None) };
    static SLEPT: Cell<Option<Instant>> = const { Cell::new(None) };
    /// How long it slept the last time.
    static IDLE: Cell<Duration> = const { Cell::new(Duration::ZERO) };
    /// Its recent rounds.
    static WORKER: Cell<Worker> = const {
        Cell::new(Worker { load: 0, rate: 0, busy_ns: 0, span_ns: 0, bytes: 0 })
    };
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
pub(crate) fn note(bytes: usize) {
    MOVED.with(|m| m.set(m.get().saturating_add(bytes as u64)));
}

/// Whether a worker pauses before sleeping: batching is on, its last round read at least
/// [`BUSY_BYTES`], and it is saturated ([`Worker::saturated`]).
pub(crate) fn should_pause(window_ns: u64, moved: u64, worker: Worker) -> bool {
    window_ns > 0 && moved >= BUSY_BYTES && worker.saturated()
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
/// when this thread's last round read at least `BUSY_BYTES` and the thread is saturated
/// (see the module documentation). The pause counts as work: while batching keeps the worker
/// busy, batching stays on.
pub fn before_park() {
    let moved = MOVED.with(|m| m.replace(0));
    let ns = WINDOW_NS.load(Ordering::Relaxed);
    if ns == 0 {
        return;
    }
    let worker = match WOKE.with(Cell::get) {
        Some(woke) => {
            let busy = woke.elapsed();
            let idle = IDLE.with(Cell::get);
            WORKER.with(|w| {
                let next = w.get().round(moved, busy, idle);
                w.set(next);
                next
            })
        }
        None => Worker::default(),
    };
    if should_pause(ns, moved, worker) {
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
        let busy = Worker {
            load: SATURATED,
            ..Worker::default()
        };
        let streaming = Worker {
            rate: STREAMING,
            ..Worker::default()
        };
        assert!(should_pause(w, BUSY_BYTES, busy));
        assert!(should_pause(w, BUSY_BYTES, streaming));
        assert!(!should_pause(0, BUSY_BYTES, busy), "batching off");
        assert!(!should_pause(w, BUSY_BYTES - 1, busy), "a quiet round");
        let neither = Worker {
            load: SATURATED - 1,
            rate: STREAMING - 1,
            ..Worker::default()
        };
        assert!(!should_pause(w, u64::MAX, neither), "not saturated");
    }

    fn rounds(mut w: Worker, n: usize, moved: u64, busy: Duration, idle: Duration) -> Worker {
        for _ in 0..n {
            w = w.round(moved, busy, idle);
        }
        w
    }

    #[test]
    fn saturation_follows_the_time_spent_working_and_the_bytes_read() {
        let us = Duration::from_micros(1);
        // Flat out on the CPU: rounds that find work waiting at once.
        let cpu_bound = rounds(Worker::default(), 40, 1000, MS, Duration::ZERO);
        assert!(cpu_bound.load >= SATURATED, "{cpu_bound:?}");
        // A flood the load side limits: half the time asleep, but 32 KiB every 40 µs.
        let flood = rounds(Worker::default(), 1000, 32 << 10, us * 20, us * 20);
        assert!(flood.load < SATURATED && flood.saturated(), "{flood:?}");
        // 1,000 agents at 10 events/s: 15 µs of work and 400 bytes per 100 µs.
        let moderate = rounds(Worker::default(), 1000, 400, us * 15, us * 85);
        assert!(!moderate.saturated(), "{moderate:?}");
        // A catch-up round after a 20 ms hiccup (its backlog read at once) does not make it
        // saturated, whether the hiccup came while it worked or while it slept.
        let after = moderate.round(80_000, MS * 20, us * 85);
        assert!(!after.saturated(), "{after:?}");
        let after = moderate.round(80_000, us * 300, MS * 20);
        assert!(!after.saturated(), "{after:?}");
        // ...though several in a row do.
        let hiccups = rounds(moderate, 6, 80_000, MS * 20, us * 85);
        assert!(hiccups.saturated(), "{hiccups:?}");
        // Many short rounds at a moderate load are not a flood: rates are taken over time.
        let short = rounds(Worker::default(), 10_000, 400, us * 5, us * 5);
        assert!(short.rate < STREAMING, "{short:?}");
        // A quiet stretch brings a saturated worker back down.
        let calm = rounds(cpu_bound, 20, 100, us * 10, MS);
        assert!(!calm.saturated(), "{calm:?}");
        // Degenerate rounds stay in range.
        let top = Worker {
            load: u32::MAX,
            rate: u64::MAX,
            ..Worker::default()
        };
        let w = top.round(u64::MAX, Duration::MAX, Duration::MAX);
        assert!(w.load <= LOAD_ONE, "{w:?}");
        let w = top
            .round(0, Duration::MAX, Duration::ZERO)
            .round(u64::MAX, MS, MS);
        assert!(w.load <= LOAD_ONE, "{w:?}");
    }
}
