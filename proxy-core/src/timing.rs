//! Process-wide latency histograms and the count of agents held without a manager, read by
//! the metrics exporter. Recording is a few relaxed atomic additions; nothing allocates.

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::Duration;

/// Upper bounds of the buckets, in seconds (the last, implicit one is +Inf).
pub(crate) const BUCKETS: [f64; 14] = [
    0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// A fixed-bucket histogram of durations.
#[derive(Debug)]
pub struct Histogram {
    /// Per-bucket counts (not cumulative); the last one is over the largest bound.
    counts: [AtomicU64; BUCKETS.len() + 1],
    sum_nanos: AtomicU64,
}

/// A copy of a histogram's state.
#[derive(Debug, Clone, PartialEq)]
pub struct HistogramSnapshot {
    /// (upper bound in seconds, count in that bucket, not cumulative); +Inf is `f64::MAX`.
    pub buckets: Vec<(f64, u64)>,
    /// Number of observations.
    pub count: u64,
    /// Sum of the observations, in seconds.
    pub sum: f64,
}

impl Histogram {
    /// An empty histogram.
    pub const fn new() -> Self {
        Histogram {
            counts: [const { AtomicU64::new(0) }; BUCKETS.len() + 1],
            sum_nanos: AtomicU64::new(0),
        }
    }

    /// Records one observation.
    pub fn record(&self, d: Duration) {
        let secs = d.as_secs_f64();
        let i = BUCKETS
            .iter()
            .position(|b| secs <= *b)
            .unwrap_or(BUCKETS.len());
        self.counts[i].fetch_add(1, Ordering::Relaxed);
        let nanos = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        self.sum_nanos.fetch_add(nanos, Ordering::Relaxed);
    }

    /// Reads the histogram.
    pub fn snapshot(&self) -> HistogramSnapshot {
        let buckets: Vec<(f64, u64)> = BUCKETS
            .iter()
            .copied()
            .chain([f64::MAX])
            .zip(self.counts.iter().map(|c| c.load(Ordering::Relaxed)))
            .collect();
        HistogramSnapshot {
            count: buckets.iter().map(|b| b.1).sum(),
            buckets,
            sum: self.sum_nanos.load(Ordering::Relaxed) as f64 / 1e9,
        }
    }
}

impl Default for Histogram {
    fn default() -> Self {
        Histogram::new()
    }
}

/// Time to establish a TCP connection to a manager (successful connects only; failures are
/// counted, not timed).
pub static UPSTREAM_CONNECT: Histogram = Histogram::new();

/// Time from a manager's failure to the agent relaying through the next manager, without the
/// agent being disconnected (agent listeners with `failover`).
pub static FAILOVER: Histogram = Histogram::new();

/// Agents held now: connected, waiting for a manager to become reachable (`hold_timeout`).
pub(crate) static HELD: AtomicI64 = AtomicI64::new(0);

/// Counts an agent as held while it lives.
#[derive(Debug)]
pub(crate) struct Held(());

impl Held {
    /// Starts holding.
    pub(crate) fn start() -> Held {
        HELD.fetch_add(1, Ordering::Relaxed);
        Held(())
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        HELD.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Agents held now.
pub fn held() -> i64 {
    HELD.load(Ordering::Relaxed).max(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn observations_land_in_their_buckets() {
        let h = Histogram::new();
        h.record(Duration::from_micros(100));
        h.record(Duration::from_millis(3));
        h.record(Duration::from_secs(60));
        let s = h.snapshot();
        assert_eq!(s.count, 3);
        assert_eq!(s.buckets[0], (0.0005, 1));
        assert_eq!(s.buckets[3], (0.005, 1));
        assert_eq!(*s.buckets.last().unwrap(), (f64::MAX, 1));
        assert!((s.sum - 60.0031).abs() < 1e-6, "{}", s.sum);
    }
}
