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
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use md5::{Digest, Md5};
use tokio::net::TcpStream;

use crate::envelope::AgentId;

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

/// One backend: its configuration and live state (readable for metrics and the admin API).
#[derive(Debug)]
pub struct Backend {
    config: BackendConfig,
    /// MD5-derived hash of the address text, the backend's identity for consistent hashing.
    addr_hash: u64,
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
    fn new(config: BackendConfig, base: Instant) -> Self {
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

    fn is_primary_candidate(&self) -> bool {
        !self.config.down && !self.config.backup
    }

    fn is_backup_candidate(&self) -> bool {
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

/// A connected backend stream.
#[derive(Debug)]
pub struct Connected {
    /// The stream (TCP_NODELAY set).
    pub stream: TcpStream,
    /// The backend's index in [`Balancer::backends`].
    pub index: usize,
    /// The backend's address.
    pub addr: SocketAddr,
    /// Counts the connection as active until dropped.
    pub guard: ConnGuard,
    /// Connection attempts made, this one included.
    pub attempts: u32,
}

/// Why one connection attempt failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AttemptError {
    /// No answer within the connect timeout.
    #[error("timed out after {0:?}")]
    Timeout(Duration),
    /// The connect call failed.
    #[error("{0}")]
    Io(#[from] std::io::Error),
    /// The agent's address is of the other family than the backend's (IPv4 and IPv6), so
    /// the manager cannot be reached from it.
    #[error("cannot connect from {from} to an {family} backend", family = if .from.is_ipv4() { "IPv6" } else { "IPv4" })]
    FamilyMismatch {
        /// The source address asked for.
        from: IpAddr,
    },
    /// The socket could not be made to connect from the agent's address (`IP_TRANSPARENT`
    /// needs `CAP_NET_ADMIN` or `CAP_NET_RAW`).
    #[error("cannot connect from {from}: {error}")]
    Source {
        /// The source address asked for.
        from: IpAddr,
        /// What the system said.
        error: std::io::Error,
    },
}

impl AttemptError {
    /// Whether this host, not the backend, is at fault (the attempt is not held against the
    /// backend's health).
    fn is_local(&self) -> bool {
        matches!(
            self,
            AttemptError::FamilyMismatch { .. } | AttemptError::Source { .. }
        )
    }
}

/// Opens one connection to `addr`, from `source` when given (see [`Balancer::connect_from`]).
async fn dial(addr: SocketAddr, source: Option<IpAddr>) -> Result<TcpStream, AttemptError> {
    let Some(from) = source else {
        return Ok(TcpStream::connect(addr).await?);
    };
    if from.is_ipv4() != addr.is_ipv4() {
        return Err(AttemptError::FamilyMismatch { from });
    }
    let socket =
        transparent_socket(addr, from).map_err(|error| AttemptError::Source { from, error })?;
    Ok(socket.connect(addr).await?)
}

/// A socket bound to the non-local address `from`, ready to connect to `addr`.
#[cfg(target_os = "linux")]
fn transparent_socket(addr: SocketAddr, from: IpAddr) -> std::io::Result<tokio::net::TcpSocket> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    // IP_TRANSPARENT (SOL_IP) also covers IPv6 sockets on Linux: binding to an address this
    // host does not own, and receiving the replies sent to it.
    socket2::SockRef::from(&socket).set_ip_transparent(true)?;
    socket.set_reuseaddr(true)?;
    socket.bind(SocketAddr::new(from, 0))?;
    Ok(socket)
}

#[cfg(not(target_os = "linux"))]
fn transparent_socket(_: SocketAddr, _: IpAddr) -> std::io::Result<tokio::net::TcpSocket> {
    Err(std::io::Error::new(
        std::io::ErrorKind::Unsupported,
        "transparent source addresses need Linux (IP_TRANSPARENT)",
    ))
}

/// One failed connection attempt.
#[derive(Debug)]
pub struct ConnectAttempt {
    /// The backend's index.
    pub index: usize,
    /// The backend's address.
    pub addr: SocketAddr,
    /// What went wrong.
    pub error: AttemptError,
}

/// Why [`Balancer::connect`] found no backend.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConnectError {
    /// There was nothing to try (every server `down`, or none eligible).
    #[error("no backend available")]
    NoBackend,
    /// Every candidate was tried and failed.
    #[error("could not connect to any backend: {}", list_attempts(.0))]
    AllFailed(Vec<ConnectAttempt>),
}

fn list_attempts(attempts: &[ConnectAttempt]) -> String {
    attempts
        .iter()
        .map(|a| format!("{} ({})", a.addr, a.error))
        .collect::<Vec<_>>()
        .join(", ")
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

    /// Orders a set of indexes from one group (primaries or backups) by the policy.
    fn order(&self, group: usize, set: Vec<usize>, key: &BalanceKey) -> Vec<usize> {
        if set.len() <= 1 {
            return set;
        }
        match self.policy {
            Policy::AgentId | Policy::Source => match key.hash64() {
                Some(h) => self.rendezvous(set, h),
                None => self.round_robin(group, &set),
            },
            Policy::RoundRobin => self.round_robin(group, &set),
            Policy::LeastConn => {
                // Round robin first, then a stable sort by load: ties keep the rotating order
                // (nginx breaks least_conn ties with weighted round robin too).
                let mut list = self.round_robin(group, &set);
                list.sort_by(|&a, &b| {
                    let (a, b) = (&self.backends[a], &self.backends[b]);
                    // active/weight compared without division.
                    let la = u128::from(a.active()) * u128::from(b.config.weight);
                    let lb = u128::from(b.active()) * u128::from(a.config.weight);
                    la.cmp(&lb)
                });
                list
            }
            Policy::Random => self.weighted_shuffle(set),
        }
    }

    /// Weighted rendezvous (highest random weight) hashing.
    ///
    /// Chosen over a ketama ring because: the share of each backend equals its weight share
    /// exactly in expectation (a ring with a few hundred points per backend is off by several
    /// percent); the failover order is simply the ranking, with no ring walk; and the minimal
    /// movement property is exact (removing a backend moves only its agents, adding one moves
    /// agents only onto it). The O(n) cost per new connection is negligible for a handful of
    /// managers, and nothing is computed per frame.
    ///
    /// Score of backend b for key k: `weight_b / -ln(u)` with `u` uniform in (0, 1) from a
    /// 64-bit mix of the key's hash and the hash of b's address text. Ties (practically
    /// impossible) go to the smaller address, so no input order matters.
    fn rendezvous(&self, mut set: Vec<usize>, key_hash: u64) -> Vec<usize> {
        let mut scored: Vec<(f64, usize)> = set
            .iter()
            .map(|&i| {
                let b = &self.backends[i];
                let u = unit_interval(mix64(key_hash ^ b.addr_hash));
                (f64::from(b.config.weight) / -portable_ln(u), i)
            })
            .collect();
        scored.sort_by(|(sa, ia), (sb, ib)| {
            sb.total_cmp(sa)
                .then_with(|| self.backends[*ia].addr().cmp(&self.backends[*ib].addr()))
        });
        set.clear();
        set.extend(scored.into_iter().map(|(_, i)| i));
        set
    }

    /// Walks the group's smooth weighted round-robin schedule from the next position,
    /// collecting the members of `set` in the order first met.
    fn round_robin(&self, group: usize, set: &[usize]) -> Vec<usize> {
        let schedule = &self.schedule[group];
        let mut list = Vec::with_capacity(set.len());
        if !schedule.is_empty() {
            let len = schedule.len() as u64;
            let start = self.cursor[group].fetch_add(1, Ordering::Relaxed) % len;
            for step in 0..len {
                let i = schedule[((start + step) % len) as usize] as usize;
                if set.contains(&i) && !list.contains(&i) {
                    list.push(i);
                    if list.len() == set.len() {
                        break;
                    }
                }
            }
        }
        // Every member is in the schedule; this only guards against a caller mixing groups.
        for &i in set {
            if !list.contains(&i) {
                list.push(i);
            }
        }
        list
    }

    /// Repeated weighted draws without replacement: the first element is a weighted random
    /// choice, and so is each following one among the rest.
    fn weighted_shuffle(&self, mut set: Vec<usize>) -> Vec<usize> {
        let mut list = Vec::with_capacity(set.len());
        while !set.is_empty() {
            let total: u64 = set
                .iter()
                .map(|&i| u64::from(self.backends[i].config.weight))
                .sum();
            let mut r = self.next_random() % total.max(1);
            let mut pick = set.len() - 1;
            for (pos, &i) in set.iter().enumerate() {
                let w = u64::from(self.backends[i].config.weight);
                if r < w {
                    pick = pos;
                    break;
                }
                r -= w;
            }
            list.push(set.remove(pick));
        }
        list
    }

    fn next_random(&self) -> u64 {
        // splitmix64: a Weyl sequence through a bijective mixer; one atomic add per draw.
        mix64(
            self.rng
                .fetch_add(0x9e37_79b9_7f4a_7c15, Ordering::Relaxed)
                .wrapping_add(0x9e37_79b9_7f4a_7c15),
        )
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

    /// Connects to the first candidate that answers, failing over in candidate order.
    ///
    /// Each attempt is bounded by `connect_timeout` and reported ([`Balancer::report_failure`]
    /// or [`Balancer::report_success`]). When a tier runs out (say every primary failed and
    /// got marked), the candidates are computed again, so backups and then the all-failed
    /// fallback are reached in the same call; no backend is tried twice.
    ///
    /// # Errors
    /// [`ConnectError::AllFailed`] lists every address tried and its error.
    pub async fn connect(
        &self,
        key: &BalanceKey,
        connect_timeout: Duration,
    ) -> Result<Connected, ConnectError> {
        self.connect_from(key, connect_timeout, None).await
    }

    /// Like [`Balancer::connect`], from the address `source` when one is given: the socket is
    /// made IP-transparent (`IP_TRANSPARENT`, which needs `CAP_NET_ADMIN` or `CAP_NET_RAW`)
    /// and bound to `(source, 0)` before it connects, so the manager sees the agent's own
    /// address. Replies reach the socket only if the managers route `source` back through
    /// this host and the host delivers them locally (see docs/configuration.md, "Agent source
    /// addresses"); replies that go elsewhere look like a manager that does not answer.
    ///
    /// A source of the other address family than a backend, or a socket that cannot be set up
    /// (no capability), fails that attempt without counting against the backend: the fault
    /// is not the manager's.
    ///
    /// # Errors
    /// [`ConnectError::AllFailed`] lists every address tried and its error.
    pub async fn connect_from(
        &self,
        key: &BalanceKey,
        connect_timeout: Duration,
        source: Option<IpAddr>,
    ) -> Result<Connected, ConnectError> {
        self.connect_avoiding(key, connect_timeout, source, &[])
            .await
    }

    /// Like [`Balancer::connect_from`], never trying the backends in `avoid` (those that
    /// refused this agent already). Nothing is reported against an avoided backend.
    ///
    /// # Errors
    /// [`ConnectError::AllFailed`] lists every address tried and its error;
    /// [`ConnectError::NoBackend`] when every candidate is avoided.
    pub async fn connect_avoiding(
        &self,
        key: &BalanceKey,
        connect_timeout: Duration,
        source: Option<IpAddr>,
        avoid: &[SocketAddr],
    ) -> Result<Connected, ConnectError> {
        // An IPv4 agent on a dual-stack listener shows as ::ffff:a.b.c.d.
        let source = source.map(|ip| ip.to_canonical());
        let mut tried: Vec<usize> = (0..self.backends.len())
            .filter(|&i| avoid.contains(&self.backends[i].addr()))
            .collect();
        let skipped = tried.len();
        let mut failed: Vec<ConnectAttempt> = Vec::new();
        loop {
            let list = self.candidates_excluding(key, Instant::now(), &tried);
            if list.is_empty() {
                break;
            }
            for idx in list {
                tried.push(idx);
                let addr = self.backends[idx].addr();
                // Only a newly failing backend is worth a warning; retries of one already
                // marked (the all-failed fallback) would repeat it for every agent.
                let was_available = self.is_available(idx, Instant::now());
                let guard = self.open(idx);
                let dialed = Instant::now();
                let error = match tokio::time::timeout(connect_timeout, dial(addr, source)).await {
                    Ok(Ok(stream)) => {
                        crate::timing::UPSTREAM_CONNECT.record(dialed.elapsed());
                        if let Err(e) = stream.set_nodelay(true) {
                            tracing::debug!(backend = %addr, error = %e, "TCP_NODELAY not set");
                        }
                        self.report_success(idx);
                        return Ok(Connected {
                            stream,
                            index: idx,
                            addr,
                            guard,
                            attempts: (tried.len() - skipped) as u32,
                        });
                    }
                    Ok(Err(e)) => e,
                    Err(_) => AttemptError::Timeout(connect_timeout),
                };
                drop(guard);
                if error.is_local() {
                    // Reported once by the caller with the whole list; per attempt it would
                    // repeat for every retry of every such agent.
                    tracing::debug!(backend = %addr, error = %error, "cannot connect to backend from the agent's address");
                    failed.push(ConnectAttempt {
                        index: idx,
                        addr,
                        error,
                    });
                    continue;
                }
                if was_available {
                    tracing::warn!(backend = %addr, error = %error, "connect to backend failed");
                } else {
                    tracing::debug!(backend = %addr, error = %error,
                        "connect to backend marked unavailable failed");
                }
                self.report_failure(idx, Instant::now());
                failed.push(ConnectAttempt {
                    index: idx,
                    addr,
                    error,
                });
            }
        }
        if failed.is_empty() {
            Err(ConnectError::NoBackend)
        } else {
            Err(ConnectError::AllFailed(failed))
        }
    }
}

/// Nanoseconds since `base`, plus one (0 is reserved for "never").
fn ticks(base: Instant, now: Instant) -> u64 {
    duration_ticks(now.saturating_duration_since(base)).saturating_add(1)
}

fn duration_ticks(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

fn digest_u64(digest: &[u8]) -> u64 {
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest[..8]);
    u64::from_le_bytes(first)
}

/// The splitmix64 finalizer: a bijection with full avalanche, so related inputs (the same key
/// against different backends) give unrelated outputs.
fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Maps a hash to (0, 1) exactly: the top 52 bits, centred in their interval (53 bits of
/// precision hold `n + 0.5` for every 52-bit `n`, so neither 0 nor 1 is reached).
fn unit_interval(h: u64) -> f64 {
    ((h >> 12) as f64 + 0.5) / (1u64 << 52) as f64
}

/// Natural logarithm for `x` in (0, 1], from basic IEEE operations only.
///
/// `f64::ln` comes from the platform's libm, which may differ in the last bit between glibc,
/// musl and macOS; a one-ulp difference could flip a near tie and send an agent to different
/// managers from two proxy nodes. Additions, multiplications and divisions are correctly
/// rounded everywhere, so this gives the same bits on every machine.
fn portable_ln(x: f64) -> f64 {
    let bits = x.to_bits();
    // Only called with normal numbers (unit_interval's output is at least 2^-53).
    let mut exp = ((bits >> 52) & 0x7ff) as i64 - 1023;
    let mut m = f64::from_bits((bits & 0x000f_ffff_ffff_ffff) | 0x3ff0_0000_0000_0000);
    if m > std::f64::consts::SQRT_2 {
        m *= 0.5;
        exp += 1;
    }
    // ln m = 2 atanh(s) = 2 (s + s^3/3 + s^5/5 + ...), |s| < 0.172: 12 terms reach 1e-18.
    let s = (m - 1.0) / (m + 1.0);
    let s2 = s * s;
    let mut term = s;
    let mut sum = 0.0;
    for k in 0..12 {
        sum += term / f64::from(2 * k + 1);
        term *= s2;
    }
    exp as f64 * std::f64::consts::LN_2 + 2.0 * sum
}

/// nginx's smooth weighted round robin, run once over the static weights: each backend appears
/// `weight / gcd` times, spread out (weights 5,1,1 give a a b a c a a, not a a a a a b c).
fn smooth_schedule(backends: &[Backend], member: impl Fn(&Backend) -> bool) -> Vec<u32> {
    let mut members: Vec<(usize, i64)> = backends
        .iter()
        .enumerate()
        .filter(|(_, b)| member(b))
        .map(|(i, b)| (i, i64::from(b.config.weight)))
        .collect();
    if members.is_empty() {
        return Vec::new();
    }
    // Address order, so the schedule does not depend on configuration order.
    members.sort_by_key(|&(i, _)| backends[i].addr());
    let g = members.iter().fold(0, |g, &(_, w)| gcd(g, w));
    for m in &mut members {
        m.1 /= g.max(1);
    }
    let total: i64 = members.iter().map(|m| m.1).sum();
    let mut current = vec![0i64; members.len()];
    let mut schedule = Vec::with_capacity(total as usize);
    for _ in 0..total {
        let mut best = 0;
        for (pos, &(_, w)) in members.iter().enumerate() {
            current[pos] += w;
            if current[pos] > current[best] {
                best = pos;
            }
        }
        current[best] -= total;
        schedule.push(members[best].0 as u32);
    }
    schedule
}

fn gcd(a: i64, b: i64) -> i64 {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(last: u8) -> SocketAddr {
        SocketAddr::from(([10, 0, 0, last], 1514))
    }

    #[test]
    fn portable_ln_matches_std() {
        for i in 1..10_000u64 {
            let x = unit_interval(mix64(i));
            let (ours, std) = (portable_ln(x), x.ln());
            assert!(
                (ours - std).abs() <= 1e-14 * std.abs().max(1.0),
                "{x}: {ours} vs {std}"
            );
        }
        assert_eq!(portable_ln(1.0), 0.0);
        assert!((portable_ln(0.5) + std::f64::consts::LN_2).abs() < 1e-16);
    }

    #[test]
    fn unit_interval_is_open() {
        assert!(unit_interval(0) > 0.0);
        assert!(unit_interval(u64::MAX) < 1.0);
    }

    #[test]
    fn smooth_schedule_spreads_weights() {
        let base = Instant::now();
        let backends: Vec<Backend> = [(1, 5), (2, 1), (3, 1)]
            .into_iter()
            .map(|(a, w)| Backend::new(BackendConfig::new(addr(a)).with_weight(w), base))
            .collect();
        assert_eq!(smooth_schedule(&backends, |_| true), [0, 0, 1, 0, 2, 0, 0]);
        // Common factors are removed.
        let backends: Vec<Backend> = [(1, 20), (2, 10)]
            .into_iter()
            .map(|(a, w)| Backend::new(BackendConfig::new(addr(a)).with_weight(w), base))
            .collect();
        assert_eq!(smooth_schedule(&backends, |_| true), [0, 1, 0]);
        assert!(smooth_schedule(&backends, |_| false).is_empty());
    }

    #[test]
    fn policy_names_round_trip() {
        for p in Policy::ALL {
            assert_eq!(p.to_string().parse::<Policy>(), Ok(p));
        }
        let err = "ip-hash".parse::<Policy>().unwrap_err();
        assert!(err.to_string().contains("\"ip-hash\""), "{err}");
        assert_eq!(Policy::default(), Policy::AgentId);
    }

    #[test]
    fn ticks_saturate_before_base() {
        let base = Instant::now() + Duration::from_secs(5);
        assert_eq!(ticks(base, Instant::now()), 1);
    }

    #[test]
    fn source_key_canonical() {
        let v4: IpAddr = "192.0.2.7".parse().unwrap();
        let mapped: IpAddr = "::ffff:192.0.2.7".parse().unwrap();
        assert_eq!(
            BalanceKey::Source(v4).hash64(),
            BalanceKey::Source(mapped).hash64()
        );
        assert_eq!(BalanceKey::None.hash64(), None);
    }

    #[test]
    fn bad_indexes_are_harmless() {
        let b = Balancer::new(Policy::RoundRobin, vec![BackendConfig::new(addr(1))]).unwrap();
        let now = Instant::now();
        b.report_failure(7, now);
        b.report_success(7);
        assert!(!b.is_available(7, now));
        drop(b.open(7));
        assert_eq!(b.backends()[0].active(), 0);
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
