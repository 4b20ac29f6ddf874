//! Counters shared by every simulated agent of a run, and the summary line.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Mutex;
use std::time::Duration;
use tokio::time::Instant;

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
    /// Round trips of events sent after the warm-up.
    latency: Mutex<Histogram<u64>>,
    /// Round trips of events sent during the warm-up (agents still connecting).
    warmup_latency: Mutex<Histogram<u64>>,
    timing: RttTiming,
}

/// How round trips are sorted and reported.
#[derive(Debug, Clone, Copy)]
pub struct RttTiming {
    /// When the run started.
    pub started: Instant,
    /// Events sent before this are counted apart: while agents still connect, a round trip
    /// measures the connection ramp (covered by the storm and churn workloads), not the steady
    /// relay.
    pub warm_until: Instant,
    /// Print each round trip over this many microseconds, with when its event was sent, so that
    /// a tail can be tied to what happened at that moment.
    pub slow_log_us: Option<u64>,
}

impl RttTiming {
    /// No warm-up, no slow log, starting now.
    pub fn now() -> RttTiming {
        let now = Instant::now();
        RttTiming {
            started: now,
            warm_until: now,
            slow_log_us: None,
        }
    }
}

impl Default for FleetStats {
    fn default() -> Self {
        FleetStats::new()
    }
}

impl FleetStats {
    /// Zeroed counters; the latency histogram covers 1 µs to 60 s at 3 significant digits.
    pub fn new() -> FleetStats {
        FleetStats::with_timing(RttTiming::now())
    }

    /// Zeroed counters, round trips sorted and reported as `timing` says.
    pub fn with_timing(timing: RttTiming) -> FleetStats {
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
            warmup_latency: Mutex::new(hist.clone()),
            latency: Mutex::new(hist),
            timing,
        }
    }

    /// Counts `n` frames of `bytes` bytes of which `events` are events.
    pub fn sent(&self, frames: u64, events: u64, bytes: u64) {
        self.frames.fetch_add(frames, Relaxed);
        self.events.fetch_add(events, Relaxed);
        self.bytes.fetch_add(bytes, Relaxed);
    }

    /// Records the round trip of an event sent at `sent`, answered now.
    pub fn record_rtt(&self, sent: Instant) {
        let rtt = sent.elapsed();
        let us = (rtt.as_micros() as u64).clamp(1, 60_000_000);
        let t = &self.timing;
        if t.slow_log_us.is_some_and(|s| us > s) {
            let at = sent.saturating_duration_since(t.started);
            eprintln!("slow sent_at_ms={:.3} rtt_us={us}", at.as_secs_f64() * 1e3);
        }
        let h = if sent < t.warm_until {
            &self.warmup_latency
        } else {
            &self.latency
        };
        if let Ok(mut h) = h.lock() {
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
        if let Ok(w) = self.warmup_latency.lock() {
            if !w.is_empty() {
                line.push_str(&format!(
                    " warmup_rtt_samples={} warmup_rtt_p99_us={} warmup_rtt_p999_us={} \
                     warmup_rtt_max_us={}",
                    w.len(),
                    w.value_at_quantile(0.99),
                    w.value_at_quantile(0.999),
                    w.max()
                ));
            }
        }
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
