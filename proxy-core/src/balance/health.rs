//! Passive health and failure accounting: each backend's live state, the nginx-style
//! `max_fails`/`fail_timeout` marks, active-probe results and connection counting.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use md5::{Digest, Md5};

use super::ring::digest_u64;
use super::{BackendConfig, Balancer};

/// One backend: its configuration and live state (readable for metrics and the admin API).
#[derive(Debug)]
pub struct Backend {
    pub(super) config: BackendConfig,
    /// MD5-derived hash of the address text, the backend's identity for consistent hashing.
    pub(super) addr_hash: u64,
    base: Instant,
    /// Failures counted in the current window.
    fails: AtomicU32,
    /// Start of the failure window, in ticks (see [`Balancer`]); 0 = no window.
    window_start: AtomicU64,
    /// Unavailable until this tick; 0 = healthy. Stays set after it passes (the server is
    /// then "on trial") until a success clears it.
    failed_until: AtomicU64,
    active: Arc<AtomicU64>,
    /// Set by active health checks after `fall` failed probes, cleared after `rise` good ones.
    probe_down: AtomicBool,
    probe_ok: AtomicU32,
    probe_fail: AtomicU32,
    opened_total: AtomicU64,
    successes_total: AtomicU64,
    failures_total: AtomicU64,
    unavailable_total: AtomicU64,
}

impl Backend {
    pub(super) fn new(config: BackendConfig, base: Instant) -> Self {
        let mut md5 = Md5::new();
        md5.update(config.addr.to_string().as_bytes());
        Backend {
            addr_hash: digest_u64(&md5.finalize()),
            config,
            base,
            fails: AtomicU32::new(0),
            window_start: AtomicU64::new(0),
            failed_until: AtomicU64::new(0),
            active: Arc::new(AtomicU64::new(0)),
            probe_down: AtomicBool::new(false),
            probe_ok: AtomicU32::new(0),
            probe_fail: AtomicU32::new(0),
            opened_total: AtomicU64::new(0),
            successes_total: AtomicU64::new(0),
            failures_total: AtomicU64::new(0),
            unavailable_total: AtomicU64::new(0),
        }
    }

    /// The configuration.
    pub fn config(&self) -> &BackendConfig {
        &self.config
    }

    /// The address.
    pub fn addr(&self) -> SocketAddr {
        self.config.addr
    }

    /// Connections currently open (live [`ConnGuard`]s).
    pub fn active(&self) -> u64 {
        self.active.load(Ordering::Relaxed)
    }

    /// Failures counted in the current `fail_timeout` window.
    pub fn fails(&self) -> u32 {
        self.fails.load(Ordering::Relaxed)
    }

    /// When the server becomes usable again, if it is marked failed and that time has not
    /// passed by `now`.
    pub fn failed_until(&self, now: Instant) -> Option<Instant> {
        let until = self.failed_until.load(Ordering::Acquire);
        (until > ticks(self.base, now)).then(|| self.base + Duration::from_nanos(until - 1))
    }

    /// Whether the server may be chosen at `now`: not `down`, not marked failed, and not
    /// failing its active health checks.
    pub fn is_available(&self, now: Instant) -> bool {
        !self.config.down
            && !self.probe_down.load(Ordering::Acquire)
            && self.failed_until.load(Ordering::Acquire) <= ticks(self.base, now)
    }

    /// Whether active health checks currently consider the server down.
    pub fn probe_failed(&self) -> bool {
        self.probe_down.load(Ordering::Acquire)
    }

    /// Connection guards ever opened (attempts included).
    pub fn opened_total(&self) -> u64 {
        self.opened_total.load(Ordering::Relaxed)
    }

    /// Successes reported.
    pub fn successes_total(&self) -> u64 {
        self.successes_total.load(Ordering::Relaxed)
    }

    /// Failures reported.
    pub fn failures_total(&self) -> u64 {
        self.failures_total.load(Ordering::Relaxed)
    }

    /// Times the server was marked unavailable.
    pub fn unavailable_total(&self) -> u64 {
        self.unavailable_total.load(Ordering::Relaxed)
    }

    pub(super) fn is_primary_candidate(&self) -> bool {
        !self.config.down && !self.config.backup
    }

    pub(super) fn is_backup_candidate(&self) -> bool {
        !self.config.down && self.config.backup
    }
}

/// Counts one active connection to a backend until dropped.
#[derive(Debug)]
pub struct ConnGuard {
    index: usize,
    active: Option<Arc<AtomicU64>>,
}

impl ConnGuard {
    /// The backend's index.
    pub fn index(&self) -> usize {
        self.index
    }
}

impl Drop for ConnGuard {
    fn drop(&mut self) {
        if let Some(active) = &self.active {
            active.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

impl Balancer {
    /// Carries live state over from the balancer this one replaces (configuration reload):
    /// for every backend whose address is in both, the failure marks and counts, the totals,
    /// and the active-connection counter itself, so guards opened under `previous` keep
    /// counting here and least-conn stays accurate across the swap.
    pub fn with_state_from(mut self, previous: &Balancer) -> Self {
        let base = self.base;
        // A tick of `previous` as a tick of this balancer (0 stays "never").
        let convert = |t: u64| -> u64 {
            if t == 0 {
                0
            } else {
                ticks(base, previous.base + Duration::from_nanos(t - 1))
            }
        };
        for b in &mut self.backends {
            let Some(old) = previous.backends.iter().find(|o| o.addr() == b.addr()) else {
                continue;
            };
            b.active = Arc::clone(&old.active);
            let copy = |to: &AtomicU64, from: &AtomicU64| {
                to.store(from.load(Ordering::Acquire), Ordering::Release)
            };
            b.probe_down
                .store(old.probe_down.load(Ordering::Acquire), Ordering::Release);
            b.probe_ok
                .store(old.probe_ok.load(Ordering::Acquire), Ordering::Release);
            b.probe_fail
                .store(old.probe_fail.load(Ordering::Acquire), Ordering::Release);
            copy(&b.opened_total, &old.opened_total);
            copy(&b.successes_total, &old.successes_total);
            copy(&b.failures_total, &old.failures_total);
            copy(&b.unavailable_total, &old.unavailable_total);
            b.fails
                .store(old.fails.load(Ordering::Acquire), Ordering::Release);
            b.window_start.store(
                convert(old.window_start.load(Ordering::Acquire)),
                Ordering::Release,
            );
            b.failed_until.store(
                convert(old.failed_until.load(Ordering::Acquire)),
                Ordering::Release,
            );
        }
        self
    }

    fn backend(&self, idx: usize) -> Option<&Backend> {
        self.backends.get(idx)
    }

    /// Records a failed attempt (or a connection the manager dropped at once).
    ///
    /// nginx semantics: `max_fails` failures within `fail_timeout` mark the server unavailable
    /// for `fail_timeout`. Once that time passes the server is on trial: the next failure marks
    /// it again at once, a success clears everything. `max_fails = 0` only counts the failure.
    /// Unknown indexes are ignored.
    pub fn report_failure(&self, idx: usize, now: Instant) {
        let Some(b) = self.backend(idx) else { return };
        b.failures_total.fetch_add(1, Ordering::Relaxed);
        let max_fails = b.config.max_fails;
        if max_fails == 0 {
            return;
        }
        let t = ticks(self.base, now);
        let timeout = duration_ticks(b.config.fail_timeout);
        let until = t.saturating_add(timeout);
        if b.failed_until.load(Ordering::Acquire) != 0 {
            // Marked before and not yet proven healthy: on trial (or tried anyway while
            // everything was failed). One failure is enough.
            b.failed_until.fetch_max(until, Ordering::AcqRel);
            b.unavailable_total.fetch_add(1, Ordering::Relaxed);
            // Debug only: while a whole set is dead this repeats for every agent reconnect.
            tracing::debug!(backend = %b.addr(), fail_timeout = ?b.config.fail_timeout,
                "backend on trial failed, marked unavailable again");
            return;
        }
        let start = b.window_start.load(Ordering::Acquire);
        let fails = if start == 0 || t.saturating_sub(start) > timeout {
            // A new window. Concurrent reports may both open one; the count is then low by
            // one at most, which only delays the mark by one failure.
            b.window_start.store(t, Ordering::Release);
            b.fails.store(1, Ordering::Release);
            1
        } else {
            b.fails.fetch_add(1, Ordering::AcqRel).saturating_add(1)
        };
        if fails >= max_fails {
            b.failed_until.fetch_max(until, Ordering::AcqRel);
            b.unavailable_total.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(backend = %b.addr(), fails, fail_timeout = ?b.config.fail_timeout,
                "backend marked unavailable");
        }
    }

    /// Records the result of an active health probe of backend `idx`: after `fall`
    /// consecutive failures the backend is taken out of rotation, after `rise` consecutive
    /// successes it returns. Returns the new state when it changed (`true` = up).
    pub fn probe_result(&self, idx: usize, ok: bool, rise: u32, fall: u32) -> Option<bool> {
        let b = self.backends.get(idx)?;
        if ok {
            b.probe_fail.store(0, Ordering::Relaxed);
            let streak = b.probe_ok.fetch_add(1, Ordering::Relaxed).saturating_add(1);
            if streak >= rise.max(1) && b.probe_down.swap(false, Ordering::AcqRel) {
                tracing::info!(backend = %b.addr(), "backend passes its health checks again; back in rotation");
                return Some(true);
            }
        } else {
            b.probe_ok.store(0, Ordering::Relaxed);
            let streak = b
                .probe_fail
                .fetch_add(1, Ordering::Relaxed)
                .saturating_add(1);
            if streak >= fall.max(1) && !b.probe_down.swap(true, Ordering::AcqRel) {
                tracing::warn!(backend = %b.addr(), failed_probes = streak, "backend fails its health checks; out of rotation");
                return Some(false);
            }
        }
        None
    }

    /// Records a success: clears the failure count and any failure mark. Unknown indexes are
    /// ignored.
    pub fn report_success(&self, idx: usize) {
        let Some(b) = self.backend(idx) else { return };
        b.successes_total.fetch_add(1, Ordering::Relaxed);
        if b.failed_until.swap(0, Ordering::AcqRel) != 0 {
            tracing::info!(backend = %b.addr(), "backend available again");
        }
        b.fails.store(0, Ordering::Release);
        b.window_start.store(0, Ordering::Release);
    }

    /// Counts an active connection to backend `idx` until the guard is dropped (used by
    /// least-conn and metrics). An unknown index gives a guard that counts nothing.
    pub fn open(&self, idx: usize) -> ConnGuard {
        let active = self.backend(idx).map(|b| {
            b.opened_total.fetch_add(1, Ordering::Relaxed);
            b.active.fetch_add(1, Ordering::Relaxed);
            Arc::clone(&b.active)
        });
        ConnGuard { index: idx, active }
    }

    /// Whether backend `idx` may be chosen at `now` (not `down`, not marked failed).
    pub fn is_available(&self, idx: usize, now: Instant) -> bool {
        self.backend(idx).is_some_and(|b| b.is_available(now))
    }

    /// Whether at least one backend (primary or backup) is available at `now`.
    pub fn any_available(&self, now: Instant) -> bool {
        self.backends.iter().any(|b| b.is_available(now))
    }
}

/// Nanoseconds since `base`, plus one (0 is reserved for "never").
pub(super) fn ticks(base: Instant, now: Instant) -> u64 {
    duration_ticks(now.saturating_duration_since(base)).saturating_add(1)
}

fn duration_ticks(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}
