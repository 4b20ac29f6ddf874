//! Counters shared by every simulated agent of a run, and the summary line.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Mutex;
use std::time::Duration;

use hdrhistogram::Histogram;

/// Run-wide counters (relaxed atomics: read once at the end).
#[derive(Debug)]
pub struct FleetStats {
    /// Events written to sockets.
    pub events: AtomicU64,
    /// Frames written (events, startups, keepalives, shutdowns).
    pub frames: AtomicU64,
    /// Bytes of frames written, headers included.
    pub bytes: AtomicU64,
    /// Successful handshakes (startup acknowledged).
    pub connects: AtomicU64,
    /// Handshakes after a lost connection.
    pub reconnects: AtomicU64,
    /// Connections lost while in use.
    pub lost_connections: AtomicU64,
    /// Failed handshake attempts (each retried).
    pub failed_attempts: AtomicU64,
    /// Agents that gave up (all attempts failed) or saw a protocol error.
    pub errors: AtomicU64,
    /// ACKs received after the handshake (keepalive ACKs).
    pub acks: AtomicU64,
    /// Echoes received.
    pub echoes: AtomicU64,
    latency: Mutex<Histogram<u64>>,
}

impl Default for FleetStats {
    fn default() -> Self {
        FleetStats::new()
    }
}

impl FleetStats {
    /// Zeroed counters; the latency histogram covers 1 µs to 60 s at 3 significant digits.
    pub fn new() -> FleetStats {
        // Constant, valid bounds: construction cannot fail.
        #[allow(clippy::expect_used)]
        let hist = Histogram::new_with_bounds(1, 60_000_000, 3).expect("valid histogram bounds");
        FleetStats {
            events: AtomicU64::new(0),
            frames: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
            connects: AtomicU64::new(0),
            reconnects: AtomicU64::new(0),
            lost_connections: AtomicU64::new(0),
            failed_attempts: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            acks: AtomicU64::new(0),
            echoes: AtomicU64::new(0),
            latency: Mutex::new(hist),
        }
    }

    /// Counts `n` frames of `bytes` bytes of which `events` are events.
    pub fn sent(&self, frames: u64, events: u64, bytes: u64) {
        self.frames.fetch_add(frames, Relaxed);
        self.events.fetch_add(events, Relaxed);
        self.bytes.fetch_add(bytes, Relaxed);
    }

    /// Records one round trip.
    pub fn record_rtt(&self, rtt: Duration) {
        let us = (rtt.as_micros() as u64).clamp(1, 60_000_000);
        if let Ok(mut h) = self.latency.lock() {
            let _ = h.record(us);
        }
    }

    /// The round trip at quantile `q` (0.999 for p99.9) in microseconds (0 without samples).
    pub fn quantile(&self, q: f64) -> u64 {
        self.latency
            .lock()
            .map(|h| {
                if h.is_empty() {
                    0
                } else {
                    h.value_at_quantile(q)
                }
            })
            .unwrap_or(0)
    }

    /// (samples, p50, p99, max) of the round trips in microseconds.
    pub fn latency(&self) -> (u64, u64, u64, u64) {
        match self.latency.lock() {
            Ok(h) => (
                h.len(),
                h.value_at_quantile(0.50),
                h.value_at_quantile(0.99),
                h.max(),
            ),
            Err(_) => (0, 0, 0, 0),
        }
    }

    /// The `key=value` summary line of a run that took `elapsed`.
    pub fn summary(&self, mode: &str, agents: usize, elapsed: Duration) -> String {
        let secs = elapsed.as_secs_f64().max(1e-9);
        let events = self.events.load(Relaxed);
        let bytes = self.bytes.load(Relaxed);
        let mut line = format!(
            "summary mode={mode} agents={agents} sent={events} frames={} bytes={bytes} connects={} \
             reconnects={} lost_connections={} failed_attempts={} errors={} acks={} elapsed_s={:.3} \
             events_per_s={:.0} mb_per_s={:.2}",
            self.frames.load(Relaxed),
            self.connects.load(Relaxed),
            self.reconnects.load(Relaxed),
            self.lost_connections.load(Relaxed),
            self.failed_attempts.load(Relaxed),
            self.errors.load(Relaxed),
            self.acks.load(Relaxed),
            secs,
            events as f64 / secs,
            bytes as f64 / secs / 1e6,
        );
        let (n, p50, p99, max) = self.latency();
        if n > 0 {
            line.push_str(&format!(
                " echoes={} rtt_samples={n} rtt_p50_us={p50} rtt_p99_us={p99} rtt_p999_us={} \
                 rtt_max_us={max}",
                self.echoes.load(Relaxed),
                self.quantile(0.999)
            ));
        }
        line
    }
}
