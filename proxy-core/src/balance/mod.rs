//! Backend selection and passive health, in nginx `upstream` terms.
//!
//! A [`Balancer`] holds the manager nodes (primaries and `backup`s), orders them for each new
//! agent connection according to a [`Policy`], and tracks passive health the way nginx does:
//! `max_fails` failures within `fail_timeout` make a server unavailable for `fail_timeout`.
//!
//! The default policy, [`Policy::AgentId`], is a consistent hash of the agent ID: every proxy
//! node with the same backend list sends an agent to the same manager without sharing any state,
//! and adding or removing a manager moves only the agents that must move. That matters for
//! Wazuh because a manager refuses a second live connection for an agent it already holds.
//!
//! Everything on the selection path is lock-free (atomics only) and takes the current time as
//! an argument, so health transitions are tested with synthetic instants.
//!
//! ```
//! use std::time::Instant;
//! use wazuh_proxy_core::balance::{BackendConfig, BalanceKey, Balancer, Policy};
//! use wazuh_proxy_core::envelope::AgentId;
//!
//! let backends = vec![
//!     BackendConfig::new("10.0.0.1:1514".parse().unwrap()),
//!     BackendConfig::new("10.0.0.2:1514".parse().unwrap()),
//! ];
//! let balancer = Balancer::new(Policy::AgentId, backends).unwrap();
//! let key = BalanceKey::Agent(AgentId::parse(b"001").unwrap());
//! let now = Instant::now();
//! let order = balancer.candidates(&key, now);
//! assert_eq!(order.len(), 2);
//! // The same agent always gets the same first choice.
//! assert_eq!(balancer.candidates(&key, now).first(), order.first());
//! // Once that one fails (max_fails = 1), the other is the first choice.
//! balancer.report_failure(order[0], now);
//! assert_eq!(balancer.candidates(&key, now).as_slice(), &order[1..]);
//! ```

use std::collections::hash_map::RandomState;
use std::fmt;
use std::hash::BuildHasher;
use std::net::{IpAddr, SocketAddr};
use std::ops::Deref;
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use md5::{Digest, Md5};

use crate::envelope::AgentId;

mod connect;
mod health;
mod ring;
#[cfg(test)]
mod tests;

pub(crate) use connect::out_of_sockets;
pub use connect::{AttemptError, ConnectAttempt, ConnectError, Connected};
pub use health::{Backend, ConnGuard};
use ring::{digest_u64, smooth_schedule};

/// Default `weight` (nginx).
pub const DEFAULT_WEIGHT: u32 = 1;
/// Default `max_fails` (nginx).
pub const DEFAULT_MAX_FAILS: u32 = 1;
/// Default `fail_timeout` (nginx).
pub const DEFAULT_FAIL_TIMEOUT: Duration = Duration::from_secs(10);
/// The largest accepted weight. Round robin expands weights into a schedule, so they are
/// bounded to keep it small.
pub const MAX_WEIGHT: u32 = 1000;

/// One backend (manager node) as configured.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendConfig {
    /// Where the manager listens.
    pub addr: SocketAddr,
    /// Relative share of agents (1 to [`MAX_WEIGHT`]; default 1).
    pub weight: u32,
    /// Failures within `fail_timeout` that make the server unavailable (default 1; 0 disables
    /// passive health for this server).
    pub max_fails: u32,
    /// The window in which failures are counted, and how long the server then stays
    /// unavailable (default 10 s).
    pub fail_timeout: Duration,
    /// Used only while every primary server is unavailable.
    pub backup: bool,
    /// Never used (nginx `down`). With a hash policy only the agents of this server move, and
    /// they come back when the flag is cleared.
    pub down: bool,
}

impl BackendConfig {
    /// A primary server with nginx's defaults: weight 1, max_fails 1, fail_timeout 10 s.
    pub fn new(addr: SocketAddr) -> Self {
        BackendConfig {
            addr,
            weight: DEFAULT_WEIGHT,
            max_fails: DEFAULT_MAX_FAILS,
            fail_timeout: DEFAULT_FAIL_TIMEOUT,
            backup: false,
            down: false,
        }
    }

    /// Sets the weight.
    pub fn with_weight(mut self, weight: u32) -> Self {
        self.weight = weight;
        self
    }

    /// Sets `max_fails`.
    pub fn with_max_fails(mut self, max_fails: u32) -> Self {
        self.max_fails = max_fails;
        self
    }

    /// Sets `fail_timeout`.
    pub fn with_fail_timeout(mut self, fail_timeout: Duration) -> Self {
        self.fail_timeout = fail_timeout;
        self
    }

    /// Marks the server as a backup.
    pub fn as_backup(mut self) -> Self {
        self.backup = true;
        self
    }

    /// Marks the server as permanently down.
    pub fn as_down(mut self) -> Self {
        self.down = true;
        self
    }
}

/// How a backend is chosen for a new agent connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
#[non_exhaustive]
pub enum Policy {
    /// Consistent hash of the agent ID (default for 1514): an agent sticks to one manager.
    /// Callers that cannot know the ID pass [`BalanceKey::Source`] instead: hash policies hash
    /// whatever key they are given.
    #[default]
    AgentId,
    /// Consistent hash of the agent's source IP address.
    Source,
    /// Fewest active connections relative to weight; ties go round robin.
    LeastConn,
    /// Smooth weighted round robin.
    RoundRobin,
    /// Weighted random.
    Random,
}

impl Policy {
    /// Every policy, in documentation order.
    pub const ALL: [Policy; 5] = [
        Policy::AgentId,
        Policy::Source,
        Policy::LeastConn,
        Policy::RoundRobin,
        Policy::Random,
    ];

    /// The configuration name (`agent-id`, `source`, `least-conn`, `round-robin`, `random`).
    pub fn name(self) -> &'static str {
        match self {
            Policy::AgentId => "agent-id",
            Policy::Source => "source",
            Policy::LeastConn => "least-conn",
            Policy::RoundRobin => "round-robin",
            Policy::Random => "random",
        }
    }

    /// Whether the policy is a consistent hash (the same key always gets the same order).
    pub fn is_hash(self) -> bool {
        matches!(self, Policy::AgentId | Policy::Source)
    }
}

impl fmt::Display for Policy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A policy name that is not one of [`Policy::ALL`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown balancing policy {name:?} (expected agent-id, source, least-conn, round-robin or random)")]
pub struct ParsePolicyError {
    /// The name given.
    pub name: String,
}

impl FromStr for Policy {
    type Err = ParsePolicyError;
    fn from_str(s: &str) -> Result<Self, ParsePolicyError> {
        Policy::ALL
            .into_iter()
            .find(|p| p.name() == s)
            .ok_or_else(|| ParsePolicyError { name: s.to_owned() })
    }
}

/// What a hash policy hashes for one connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BalanceKey {
    /// The agent ID (from the `!ID!` prefix or the `client.keys` source-IP lookup).
    Agent(AgentId),
    /// The agent's source address.
    Source(IpAddr),
    /// Nothing known: hash policies fall back to round robin.
    None,
}

impl BalanceKey {
    /// The 64-bit hash the consistent policies use: the first 8 bytes (little-endian) of the
    /// MD5 of `"agent:" ID` or `"ip:" ADDRESS-BYTES` (IPv4-mapped IPv6 addresses hash as IPv4).
    /// `None` for [`BalanceKey::None`]. Fixed by design: proxy nodes must agree on it.
    pub fn hash64(&self) -> Option<u64> {
        let mut md5 = Md5::new();
        match self {
            BalanceKey::Agent(id) => {
                md5.update(b"agent:");
                md5.update(id.as_bytes());
            }
            BalanceKey::Source(ip) => {
                md5.update(b"ip:");
                match ip.to_canonical() {
                    IpAddr::V4(v4) => md5.update(v4.octets()),
                    IpAddr::V6(v6) => md5.update(v6.octets()),
                }
            }
            BalanceKey::None => return None,
        }
        Some(digest_u64(&md5.finalize()))
    }
}

/// Why a backend set was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum BalanceError {
    /// No backend at all.
    #[error("no backend configured")]
    Empty,
    /// The same address listed twice.
    #[error("backend {0} is listed more than once")]
    DuplicateAddress(SocketAddr),
    /// A weight of 0 or above [`MAX_WEIGHT`].
    #[error("backend {addr} has weight {weight} (allowed: 1 to {max})", max = MAX_WEIGHT)]
    BadWeight {
        /// The backend.
        addr: SocketAddr,
        /// The weight given.
        weight: u32,
    },
    /// Every backend is `down`.
    #[error("every backend is marked down")]
    AllDown,
    /// An operation named a backend that is not in the set.
    #[error("backend {0} is not in this backend set")]
    UnknownBackend(SocketAddr),
}

/// Which servers a [`Candidates`] list was drawn from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tier {
    /// Available primary servers.
    Primary,
    /// Available backups (every primary is unavailable).
    Backup,
    /// Every server is marked failed: all of them, primaries first, are tried anyway.
    AllFailed,
}

/// Backend indexes to try, best first. Dereferences to `[usize]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidates {
    list: Vec<usize>,
    tier: Tier,
}

impl Candidates {
    /// The indexes.
    pub fn as_slice(&self) -> &[usize] {
        &self.list
    }

    /// Which servers the list was drawn from.
    pub fn tier(&self) -> Tier {
        self.tier
    }
}

impl Deref for Candidates {
    type Target = [usize];
    fn deref(&self) -> &[usize] {
        &self.list
    }
}

impl IntoIterator for Candidates {
    type Item = usize;
    type IntoIter = std::vec::IntoIter<usize>;
    fn into_iter(self) -> Self::IntoIter {
        self.list.into_iter()
    }
}

/// The backend set, its policy and its live state. `Send + Sync`; share it as `Arc<Balancer>`.
///
/// Indexes everywhere refer to the order of the `Vec<BackendConfig>` given to
/// [`Balancer::new`], but no choice depends on that order: consistent hashing ranks backends
/// by a hash of their address text, so two proxy nodes agree even if their lists differ in
/// order.
///
/// Time is kept in "ticks": nanoseconds since the balancer was built, plus one (0 means
/// "never"), so every instant fits in an `AtomicU64`.
#[derive(Debug)]
pub struct Balancer {
    policy: Policy,
    backends: Vec<Backend>,
    base: Instant,
    /// Smooth weighted round-robin schedules (backend indexes), primaries and backups.
    schedule: [Vec<u32>; 2],
    cursor: [AtomicU64; 2],
    rng: AtomicU64,
}

/// Index into `schedule`/`cursor`.
const PRIMARY: usize = 0;
const BACKUP: usize = 1;

impl Balancer {
    /// Validates the backend set and builds the balancer.
    ///
    /// # Errors
    /// [`BalanceError`]: an empty set, a duplicate address, a weight of 0 or above
    /// [`MAX_WEIGHT`], or every server `down`.
    pub fn new(policy: Policy, backends: Vec<BackendConfig>) -> Result<Balancer, BalanceError> {
        if backends.is_empty() {
            return Err(BalanceError::Empty);
        }
        let mut seen: Vec<SocketAddr> = Vec::with_capacity(backends.len());
        for b in &backends {
            if seen.contains(&b.addr) {
                return Err(BalanceError::DuplicateAddress(b.addr));
            }
            seen.push(b.addr);
            if b.weight == 0 || b.weight > MAX_WEIGHT {
                return Err(BalanceError::BadWeight {
                    addr: b.addr,
                    weight: b.weight,
                });
            }
        }
        if backends.iter().all(|b| b.down) {
            return Err(BalanceError::AllDown);
        }
        Ok(Self::build(policy, backends))
    }

    /// A new set with this one's policy and backends, without its live state.
    pub fn clone_config(&self) -> Balancer {
        Self::build(
            self.policy,
            self.backends.iter().map(|b| b.config.clone()).collect(),
        )
    }

    /// Builds a validated set.
    fn build(policy: Policy, backends: Vec<BackendConfig>) -> Balancer {
        let base = Instant::now();
        let backends: Vec<Backend> = backends
            .into_iter()
            .map(|c| Backend::new(c, base))
            .collect();
        let schedule = [
            smooth_schedule(&backends, |b| !b.config.backup),
            smooth_schedule(&backends, |b| b.config.backup),
        ];
        Balancer {
            policy,
            backends,
            base,
            schedule,
            cursor: [AtomicU64::new(0), AtomicU64::new(0)],
            rng: AtomicU64::new(RandomState::new().hash_one(0x5eed_u64)),
        }
    }

    /// Seeds the generator behind [`Policy::Random`] (reproducible tests and simulations).
    pub fn with_seed(self, seed: u64) -> Self {
        self.rng.store(seed, Ordering::Relaxed);
        self
    }

    /// The policy.
    pub fn policy(&self) -> Policy {
        self.policy
    }

    /// The backends, in configuration order.
    pub fn backends(&self) -> &[Backend] {
        &self.backends
    }

    /// The index of the backend with this address.
    pub fn index_of(&self, addr: SocketAddr) -> Option<usize> {
        self.backends.iter().position(|b| b.config.addr == addr)
    }

    /// The backends to try for a new connection, best first.
    ///
    /// - Primaries that are neither `down` nor marked failed, ordered by the policy. For hash
    ///   policies the order itself is consistent: the first choice, then the next ones in an
    ///   order fixed by the key, so failover lands on the same node from every proxy.
    /// - If no primary is available: the available backups, ordered the same way.
    /// - If every server (primary and backup) is marked failed: all of them anyway, primaries
    ///   first. nginx does the same (it clears the failure marks when everything is down), so
    ///   a set that was marked dead as a whole recovers at the next attempt instead of waiting
    ///   out `fail_timeout`.
    ///
    /// `down` servers are never listed. Hash policies given [`BalanceKey::None`] order by
    /// round robin.
    pub fn candidates(&self, key: &BalanceKey, now: Instant) -> Candidates {
        self.candidates_excluding(key, now, &[])
    }

    fn candidates_excluding(&self, key: &BalanceKey, now: Instant, tried: &[usize]) -> Candidates {
        let usable = |i: &usize| !tried.contains(i);
        let primaries: Vec<usize> = (0..self.backends.len())
            .filter(|&i| self.backends[i].is_primary_candidate() && self.is_available(i, now))
            .collect();
        if !primaries.is_empty() {
            let mut list = self.order(PRIMARY, primaries, key);
            list.retain(usable);
            return Candidates {
                list,
                tier: Tier::Primary,
            };
        }
        let backups: Vec<usize> = (0..self.backends.len())
            .filter(|&i| self.backends[i].is_backup_candidate() && self.is_available(i, now))
            .collect();
        if !backups.is_empty() {
            let mut list = self.order(BACKUP, backups, key);
            list.retain(usable);
            return Candidates {
                list,
                tier: Tier::Backup,
            };
        }
        let all_primaries = (0..self.backends.len())
            .filter(|&i| self.backends[i].is_primary_candidate())
            .collect();
        let all_backups = (0..self.backends.len())
            .filter(|&i| self.backends[i].is_backup_candidate())
            .collect();
        let mut list = self.order(PRIMARY, all_primaries, key);
        list.extend(self.order(BACKUP, all_backups, key));
        list.retain(usable);
        Candidates {
            list,
            tier: Tier::AllFailed,
        }
    }
}

/// A backend set that can be replaced while connections use it (a reload): readers get the
/// set in force without locking; a replacement carries the passive-health marks, totals and
/// connection counts of the backends present in both sets (see [`Balancer::with_state_from`]).
#[derive(Debug)]
pub(crate) struct SharedBalancer(arc_swap::ArcSwap<Balancer>);

impl SharedBalancer {
    /// Shares `balancer`.
    pub(crate) fn new(balancer: Balancer) -> Self {
        SharedBalancer(arc_swap::ArcSwap::from_pointee(balancer))
    }

    /// The set in force.
    pub(crate) fn load_full(&self) -> Arc<Balancer> {
        self.0.load_full()
    }

    /// Replaces the set; connections already made keep their backend.
    pub(crate) fn replace(&self, balancer: Balancer) {
        let old = self.0.load_full();
        self.0.store(Arc::new(balancer.with_state_from(&old)));
    }
}
