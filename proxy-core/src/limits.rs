//! Per-source admission limits: how many connections one address may hold open, and how fast
//! it may open new ones.
//!
//! The defaults let a whole fleet behind one NAT address reconnect at once (a storm of
//! 10,000 agents after a failover is legitimate); lower them where agents are not NATed.
//!
//! A flood from one address (a misbehaving host, a scan, a reconnect loop) must not exhaust
//! the proxy's descriptors or memory for everyone else. Agents behind one NAT share an
//! address, so the defaults are generous; lower them where agents are not NATed.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Instant;

use dashmap::DashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::Duration;

/// Limits per source address.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SourceLimits {
    /// Most connections one address may hold open (default 20,000; 0: no limit).
    pub max_open: u32,
    /// New connections per second one address may open, on average (default 10,000; 0: no limit).
    pub rate: f64,
    /// How many new connections may come at once above the rate (default 20,000).
    pub burst: f64,
}

impl Default for SourceLimits {
    fn default() -> Self {
        SourceLimits {
            max_open: 20_000,
            rate: 10_000.0,
            burst: 20_000.0,
        }
    }
}

/// Why a connection was not admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    /// The address already holds `max_open` connections.
    #[error("too many open connections from this address (limit {0})")]
    TooManyOpen(u32),
    /// The address opens connections faster than `rate`.
    #[error("connections opened too fast from this address (limit {0}/s)")]
    TooFast(u32),
}

#[derive(Debug)]
struct Entry {
    open: u32,
    tokens: f64,
    last: Instant,
}

/// The admission state of every source with an open connection (or recent activity).
#[derive(Debug, Clone)]
pub struct Admission {
    limits: SourceLimits,
    sources: Arc<DashMap<IpAddr, Entry>>,
}

/// Holds one admitted connection's place until dropped.
#[derive(Debug)]
pub(crate) struct Admitted {
    ip: IpAddr,
    sources: Arc<DashMap<IpAddr, Entry>>,
}

impl Drop for Admitted {
    fn drop(&mut self) {
        // Forget the source once it holds nothing: memory follows open connections. The
        // token bucket refills while the source is gone, so forgetting it is what a full
        // bucket would say anyway, give or take the burst.
        self.sources.remove_if_mut(&self.ip, |_, e| {
            e.open = e.open.saturating_sub(1);
            e.open == 0
        });
    }
}

impl Admission {
    /// Admission under `limits`.
    pub fn new(limits: SourceLimits) -> Self {
        Admission {
            limits,
            sources: Arc::default(),
        }
    }

    /// Admits a new connection from `ip` at `now`, or says why not.
    ///
    /// # Errors
    /// [`Refused`] when a limit is reached.
    pub(crate) fn admit(&self, ip: IpAddr, now: Instant) -> Result<Admitted, Refused> {
        let l = self.limits;
        let mut e = self.sources.entry(ip).or_insert_with(|| Entry {
            open: 0,
            tokens: l.burst.max(1.0),
            last: now,
        });
        if l.max_open > 0 && e.open >= l.max_open {
            return Err(Refused::TooManyOpen(l.max_open));
        }
        if l.rate > 0.0 {
            let elapsed = now.saturating_duration_since(e.last).as_secs_f64();
            e.tokens = (e.tokens + elapsed * l.rate).min(l.burst.max(1.0));
            e.last = now;
            if e.tokens < 1.0 {
                return Err(Refused::TooFast(l.rate as u32));
            }
            e.tokens -= 1.0;
        }
        e.open += 1;
        Ok(Admitted {
            ip,
            sources: self.sources.clone(),
        })
    }

    /// Number of sources tracked now.
    pub fn sources(&self) -> usize {
        self.sources.len()
    }
}

/// Least time between two log lines of one kind about refused or dropped traffic: a flood
/// must not become a flood of logs. Suppressed lines are counted in the next one.
pub(crate) const LOG_INTERVAL: Duration = Duration::from_secs(1);

/// Allows one log line per [`LOG_INTERVAL`] and counts the ones it holds back.
#[derive(Debug)]
pub(crate) struct LogLimit {
    next_ms: AtomicU64,
    held: AtomicU64,
}

impl Default for LogLimit {
    fn default() -> Self {
        LogLimit::new()
    }
}

impl LogLimit {
    /// A limit that lets the first line through.
    pub(crate) const fn new() -> Self {
        LogLimit {
            next_ms: AtomicU64::new(0),
            held: AtomicU64::new(0),
        }
    }

    /// `Some(lines held back since the last one)` when a line may be written at `now_ms`
    /// (milliseconds on any clock that only goes forward).
    pub(crate) fn allow(&self, now_ms: u64) -> Option<u64> {
        let next = self.next_ms.load(Ordering::Relaxed);
        let step = u64::try_from(LOG_INTERVAL.as_millis()).unwrap_or(u64::MAX);
        if now_ms >= next
            && self
                .next_ms
                .compare_exchange(
                    next,
                    now_ms.saturating_add(step),
                    Ordering::Relaxed,
                    Ordering::Relaxed,
                )
                .is_ok()
        {
            Some(self.held.swap(0, Ordering::Relaxed))
        } else {
            self.held.fetch_add(1, Ordering::Relaxed);
            None
        }
    }

    /// [`LogLimit::allow`] on the process's monotonic clock.
    pub(crate) fn allow_now(&self) -> Option<u64> {
        static EPOCH: OnceLock<Instant> = OnceLock::new();
        let epoch = *EPOCH.get_or_init(Instant::now);
        self.allow(u64::try_from(epoch.elapsed().as_millis()).unwrap_or(u64::MAX))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn open_connections_are_capped_and_released() {
        let a = Admission::new(SourceLimits {
            max_open: 2,
            rate: 0.0,
            burst: 0.0,
        });
        let ip: IpAddr = "192.0.2.1".parse().unwrap();
        let now = Instant::now();
        let one = a.admit(ip, now).unwrap();
        let _two = a.admit(ip, now).unwrap();
        assert_eq!(a.admit(ip, now).unwrap_err(), Refused::TooManyOpen(2));
        // Another address is not affected.
        a.admit("192.0.2.2".parse().unwrap(), now).unwrap();
        drop(one);
        a.admit(ip, now).unwrap();
    }

    #[test]
    fn the_rate_refills_over_time() {
        let a = Admission::new(SourceLimits {
            max_open: 0,
            rate: 10.0,
            burst: 5.0,
        });
        let ip: IpAddr = "192.0.2.1".parse().unwrap();
        let t0 = Instant::now();
        let mut held = Vec::new();
        for _ in 0..5 {
            held.push(a.admit(ip, t0).unwrap());
        }
        assert_eq!(a.admit(ip, t0).unwrap_err(), Refused::TooFast(10));
        held.push(a.admit(ip, t0 + Duration::from_millis(150)).unwrap());
        assert!(a.admit(ip, t0 + Duration::from_millis(150)).is_err());
    }

    #[test]
    fn log_limit_lets_one_line_through_per_interval() {
        let l = LogLimit::new();
        assert_eq!(l.allow(0), Some(0));
        assert_eq!(l.allow(10), None);
        assert_eq!(l.allow(999), None);
        assert_eq!(l.allow(1000), Some(2));
        assert_eq!(l.allow(1001), None);
        let l = LogLimit::new();
        assert_eq!(l.allow_now(), Some(0));
        assert_eq!(l.allow_now(), None);
    }

    #[test]
    fn memory_follows_open_connections() {
        let a = Admission::new(SourceLimits::default());
        let now = Instant::now();
        let held: Vec<_> = (0..100u8)
            .map(|i| a.admit(IpAddr::from([192, 0, 2, i]), now).unwrap())
            .collect();
        assert_eq!(a.sources(), 100);
        drop(held);
        assert_eq!(a.sources(), 0);
    }
}
