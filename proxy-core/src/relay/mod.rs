//! The frame-aware relay for agent connections on 1514/TCP.
//!
//! For each accepted agent: read the first frame within a deadline, learn the agent from it,
//! register the session, pick a manager by the agent, connect, then relay both directions frame
//! by frame. Only whole frames are ever written to either side, so the relay always knows where
//! the next frame starts on both sides; that is what makes a later switch of manager at a frame
//! boundary possible.
//!
//! Each direction is a pipe (`Pipe`): one buffer that holds whole, checked frames at its front and
//! the start of an incomplete frame behind them. Reads are batched (one `read` may bring many
//! frames) and the whole frames of a batch leave in one `write`, so the cost per frame is a
//! header check and an envelope check, with no allocation and no syscall of its own. A pipe
//! reads only once everything it holds is written: a manager that stops reading stops the
//! agent's reads too (backpressure), and a pipe never holds more than one read plus one frame.
//! An idle pipe frees its buffer, so an idle agent costs no buffer memory.
//!
//! ```no_run
//! use std::sync::Arc;
//! use wazuh_proxy_core::balance::{BackendConfig, Balancer, Policy};
//! use wazuh_proxy_core::relay::{AgentRelay, AgentRelayConfig};
//! use tokio_util::sync::CancellationToken;
//! use tokio_util::task::TaskTracker;
//!
//! # async fn run() -> std::io::Result<()> {
//! let managers = vec![
//!     BackendConfig::new("10.0.0.11:1514".parse().unwrap()),
//!     BackendConfig::new("10.0.0.12:1514".parse().unwrap()),
//! ];
//! let balancer = Balancer::new(Policy::AgentId, managers).expect("valid backend set");
//! let relay = Arc::new(AgentRelay::new("agents", AgentRelayConfig::default(), balancer));
//! let listener = tokio::net::TcpListener::bind("0.0.0.0:1514").await?;
//! let stop = CancellationToken::new();
//! let tracker = TaskTracker::new();
//! relay.serve(listener, stop, tracker).await;
//! # Ok(()) }
//! ```

use std::fmt;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::balance::{BalanceKey, Balancer};
use crate::handover::AgentInTransit;
use crate::keys::KeyStore;
use crate::net::tune;
use crate::session::{Session, SessionKey, SessionRegistry};
use crate::stats::RelayStats;

mod check;
mod config;
mod decide;
mod drive;
mod end;
mod handed;
#[doc(hidden)]
pub mod harness;
mod machine;
mod pipe;
mod shell;
mod unacked;

pub use config::{AgentRelayConfig, ConfigError, MIN_MAX_PAYLOAD};
pub(crate) use decide::{GiveUp, RefusalBook};
pub(crate) use end::End;
use machine::Metric;

/// Relays agent connections on one listener.
pub struct AgentRelay {
    name: String,
    config: AgentRelayConfig,
    balancer: crate::balance::SharedBalancer,
    sessions: SessionRegistry,
    stats: Arc<RelayStats>,
    hard_stop: CancellationToken,
    keys: Option<KeyStore>,
    handover: std::sync::atomic::AtomicBool,
    sweeper: std::sync::atomic::AtomicBool,
    admission: crate::limits::Admission,
    refusals_logged: std::sync::atomic::AtomicU64,
    started: Instant,
    handover_to: std::sync::Mutex<Option<tokio::sync::mpsc::UnboundedSender<AgentInTransit>>>,
    /// Agents every manager refused, kept away for a while (see [`RefusalBook`]).
    refused: std::sync::Mutex<RefusalBook>,
    /// Operator state, apart from the configuration: the backends drained by hand. Applied on
    /// top of every backend set the configuration gives, so a reload keeps them drained.
    drained: std::sync::Mutex<Vec<SocketAddr>>,
    /// The backend set as configured (before operator state), to re-apply it to.
    configured: std::sync::Mutex<Arc<Balancer>>,
}

impl fmt::Debug for AgentRelay {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AgentRelay")
            .field("name", &self.name)
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl AgentRelay {
    /// A relay named `name` (used in logs) sending agents to `balancer`'s managers.
    pub fn new(name: impl Into<String>, config: AgentRelayConfig, balancer: Balancer) -> Self {
        let limits = config.source_limits;
        let hard_stop = CancellationToken::new();
        let configured = std::sync::Mutex::new(Arc::new(balancer.clone_config()));
        AgentRelay {
            name: name.into(),
            sessions: SessionRegistry::with_parent(config.duplicate_policy, hard_stop.clone())
                .with_overtake_time(config.overtake_time),
            balancer: crate::balance::SharedBalancer::new(balancer),
            stats: Arc::new(RelayStats::default()),
            hard_stop,
            keys: None,
            handover: std::sync::atomic::AtomicBool::new(false),
            sweeper: std::sync::atomic::AtomicBool::new(false),
            admission: crate::limits::Admission::new(limits),
            refusals_logged: std::sync::atomic::AtomicU64::new(0),
            started: Instant::now(),
            handover_to: std::sync::Mutex::new(None),
            refused: std::sync::Mutex::new(RefusalBook::new(
                REFUSAL_BOOK_CAPACITY,
                config.refused_backoff,
                config.refused_backoff_max,
            )),
            drained: std::sync::Mutex::default(),
            configured,
            config,
        }
    }

    /// Verifies agents with `keys` (see `crate::verify`): the first message of each
    /// connection must decrypt with the key of the agent it claims, ID-less agents are
    /// identified by their source address, and sessions learn the agent's name, version, OS,
    /// last keepalive and whether it stopped cleanly.
    pub fn with_keys(mut self, keys: KeyStore) -> Self {
        self.keys = Some(keys);
        self
    }

    /// The keys in use, if agents are verified.
    pub fn keys(&self) -> Option<&KeyStore> {
        self.keys.as_ref()
    }

    /// The listener's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The live sessions.
    pub fn sessions(&self) -> &SessionRegistry {
        &self.sessions
    }

    /// This listener's counters.
    pub fn stats(&self) -> &Arc<RelayStats> {
        &self.stats
    }

    /// The backend set in force.
    pub fn balancer(&self) -> Arc<Balancer> {
        self.balancer.load_full()
    }

    /// Replaces the backend set; new connections use it, established sessions keep theirs.
    /// Passive-health marks and connection counts of backends present in both sets carry over,
    /// and so do the operator's drains (see [`AgentRelay::drain_backend`]).
    pub fn set_balancer(&self, balancer: Balancer) {
        let configured = Arc::new(balancer.clone_config());
        *self.configured.lock().unwrap_or_else(|p| p.into_inner()) = configured.clone();
        self.balancer.replace(self.with_operator_state(balancer));
    }

    /// `balancer` with the drained backends marked down (unless that would leave none: a drain
    /// never takes the last backend away; it stays recorded and applies once others exist).
    fn with_operator_state(&self, balancer: Balancer) -> Balancer {
        let drained = self.drained.lock().unwrap_or_else(|p| p.into_inner());
        if !balancer
            .backends()
            .iter()
            .any(|b| drained.contains(&b.addr()))
        {
            return balancer;
        }
        let configs = balancer
            .backends()
            .iter()
            .map(|b| {
                let mut c = b.config().clone();
                c.down |= drained.contains(&c.addr);
                c
            })
            .collect();
        match Balancer::new(balancer.policy(), configs) {
            Ok(b) => b,
            Err(e) => {
                tracing::warn!(listener = %self.name, error = %e,
                    "drained backends left in rotation: draining them would leave no backend");
                balancer
            }
        }
    }

    /// Agents every manager refused that are kept away now (see `RefusalBook`).
    pub fn kept_away(&self) -> usize {
        self.refused
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .waiting(Instant::now())
    }

    /// The backends drained by the operator (they survive reloads and upgrades).
    pub fn drained(&self) -> Vec<SocketAddr> {
        self.drained
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Sets the operator's drains to exactly `backends` (from the previous process on an
    /// upgrade, or as a reload keeps them): marks them down without moving anyone (on an
    /// upgrade the sessions arrive afterwards, and go elsewhere).
    pub fn restore_drained(&self, backends: &[SocketAddr]) {
        {
            let mut drained = self.drained.lock().unwrap_or_else(|p| p.into_inner());
            drained.clear();
            for b in backends {
                if !drained.contains(b) {
                    drained.push(*b);
                }
            }
        }
        let configured = self
            .configured
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        self.balancer
            .replace(self.with_operator_state(configured.clone_config()));
    }

    /// Takes `backend` out of rotation and moves every agent on it to the others at a frame
    /// boundary, without disconnecting them (before a manager's maintenance). Returns the
    /// number of sessions asked to move. The drain is operator state: it outlives reloads of
    /// the configuration and binary upgrades, until [`AgentRelay::undrain_backend`].
    ///
    /// # Errors
    /// When `backend` is not in the set, or no other backend would be left.
    pub fn drain_backend(
        &self,
        backend: SocketAddr,
    ) -> Result<usize, crate::balance::BalanceError> {
        self.set_drained(backend, true)?;
        let mut moved = 0;
        for s in self.sessions.sessions() {
            if s.backend() == Some(backend) {
                s.request_move();
                moved += 1;
            }
        }
        tracing::info!(listener = %self.name, %backend, sessions = moved, "draining backend: moving its agents");
        Ok(moved)
    }

    /// Puts a drained backend back into rotation (agents return through [`AgentRelay::rebalance`]).
    ///
    /// # Errors
    /// When `backend` is not in the set.
    pub fn undrain_backend(&self, backend: SocketAddr) -> Result<(), crate::balance::BalanceError> {
        self.set_drained(backend, false)
    }

    fn set_drained(
        &self,
        backend: SocketAddr,
        drain: bool,
    ) -> Result<(), crate::balance::BalanceError> {
        let configured = self
            .configured
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        if configured.index_of(backend).is_none() {
            return Err(crate::balance::BalanceError::UnknownBackend(backend));
        }
        let mut drained = self.drained();
        drained.retain(|b| *b != backend);
        if drain {
            drained.push(backend);
        }
        // Checked before it is recorded: a drain that would leave no backend is refused.
        let configs = configured
            .backends()
            .iter()
            .map(|b| {
                let mut c = b.config().clone();
                c.down |= drained.contains(&c.addr);
                c
            })
            .collect();
        let next = Balancer::new(configured.policy(), configs)?;
        *self.drained.lock().unwrap_or_else(|p| p.into_inner()) = drained;
        self.balancer.replace(next);
        Ok(())
    }

    /// Moves up to `limit` sessions whose manager is not the one the policy now picks for them
    /// (after a manager returned or was added), at frame boundaries, without disconnecting.
    /// Returns the number asked to move. Call it repeatedly (for example every few seconds)
    /// to spread the moves out.
    pub fn rebalance(&self, limit: usize) -> usize {
        let balancer = self.balancer.load_full();
        let now = Instant::now();
        let mut moved = 0;
        for s in self.sessions.sessions() {
            if moved >= limit {
                break;
            }
            let key = balance_key(balancer.policy(), &s);
            let best = balancer
                .candidates(&key, now)
                .first()
                .map(|&i| balancer.backends()[i].addr());
            if best.is_some()
                && s.backend().is_some()
                && best != s.backend()
                && !s.is_move_requested()
            {
                s.request_move();
                moved += 1;
            }
        }
        if moved > 0 {
            tracing::info!(listener = %self.name, sessions = moved, "rebalancing: moving agents to their preferred manager");
        }
        moved
    }

    /// Hands every session to another process at a frame boundary: each agent's socket, with
    /// the bytes read from it but not yet forwarded, is sent to `to` (see [`crate::handover`])
    /// after the frame being written is complete and the manager connection is closed. The
    /// agents never see their connection close. Stop accepting first.
    pub fn hand_over_all(&self, to: tokio::sync::mpsc::UnboundedSender<AgentInTransit>) {
        *self.handover_to.lock().unwrap_or_else(|p| p.into_inner()) = Some(to);
        self.handover.store(true, Ordering::Relaxed);
        self.sessions.wake_all();
    }

    /// Ends a hand-over that failed: sessions not handed yet stay here. Sessions already on
    /// their way arrive on the hand-over channel, to be adopted again ([`AgentRelay::adopt`]).
    pub fn cancel_hand_over(&self) {
        self.handover.store(false, Ordering::Relaxed);
    }

    /// The settings in force.
    pub fn config(&self) -> &AgentRelayConfig {
        &self.config
    }

    /// Closes every session now (the end of a drain).
    pub fn close_all(&self) {
        self.hard_stop.cancel();
        self.sessions.wake_all();
    }

    /// Accepts agents until `stop` is cancelled; each connection runs as a task of `tracker`
    /// (wait on the tracker to drain).
    pub async fn serve(
        self: Arc<Self>,
        listener: TcpListener,
        stop: CancellationToken,
        tracker: TaskTracker,
    ) {
        // Accepted sockets inherit the listener's TCP settings: none to set per connection.
        crate::net::tune_listener(&listener, self.config.tcp_keepalive);
        crate::net::accept_loop(&listener, &self.name, &stop, |stream, peer| {
            let relay = self.clone();
            match self.config.proxy_protocol.clone() {
                None => drop(tracker.spawn(relay.handle_tuned(stream, peer))),
                Some(pp) => drop(tracker.spawn(pp.then(
                    stream,
                    peer,
                    self.stats.clone(),
                    self.name.clone(),
                    move |s, p| relay.handle_tuned(s, p),
                ))),
            }
        })
        .await;
    }

    /// Runs one agent connection to its end (spawn the returned future).
    ///
    /// The per-source limits are applied at once, before any task exists: a refused
    /// connection is closed here. The future keeps only what relaying needs once frames flow;
    /// the handshake's state lives in a box freed when it ends.
    pub fn handle(
        self: Arc<Self>,
        agent: TcpStream,
        peer: SocketAddr,
    ) -> impl std::future::Future<Output = ()> + Send + 'static {
        tune(&agent, self.config.tcp_keepalive);
        self.handle_tuned(agent, peer)
    }

    fn refuse(&self, peer: SocketAddr, key: Option<SessionKey>, end: &End) {
        if let Some(why) = end.rejection() {
            self.stats.reject(why);
        }
        if matches!(end, End::AgentClosed) {
            // A TCP health probe (keepalived, a monitoring check) connects and leaves.
            tracing::debug!(listener = %self.name, client = %peer, "connection closed before its first frame");
            return;
        }
        self.log_refusal(peer, key, format_args!("closing agent connection: {end}"));
    }

    /// Whether one more refusal line may be logged now: up to [`REFUSAL_LINES_PER_SECOND`]
    /// per second and listener (second and count packed in one atomic).
    fn may_log_refusal(&self) -> bool {
        let now = self.started.elapsed().as_secs();
        let mut allowed = false;
        let _ = self
            .refusals_logged
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |packed| {
                let (second, count) = (packed >> 16, packed & 0xffff);
                allowed = second != now || count < REFUSAL_LINES_PER_SECOND;
                Some(if second != now {
                    (now << 16) | 1
                } else {
                    (now << 16) | (count + 1).min(0xffff)
                })
            });
        allowed
    }

    /// Forgets that every manager refused an agent (one served it since).
    fn forget_refusal(&self, key: SessionKey, ip: std::net::IpAddr) {
        let mut book = self.refused.lock().unwrap_or_else(|p| p.into_inner());
        if !book.is_empty() {
            book.served(key, ip);
        }
    }

    /// Logs a refused connection, at most one line per second per listener (a flood of bad
    /// connections must not become a flood of log lines; the metrics count every one).
    fn log_refusal(&self, peer: SocketAddr, key: Option<SessionKey>, what: fmt::Arguments<'_>) {
        if !self.may_log_refusal() {
            return;
        }
        match key {
            Some(key) => {
                tracing::warn!(listener = %self.name, agent = %key, client = %peer, "{what}")
            }
            None => tracing::warn!(listener = %self.name, client = %peer, "{what}"),
        }
    }

    /// Notices idle sessions and unanswered handshakes (one task per listener, instead of a
    /// timer per connection).
    fn start_sweeper(self: &Arc<Self>) {
        if self.sweeper.swap(true, Ordering::AcqRel) {
            return;
        }
        let cfg = &self.config;
        let shortest = [
            cfg.idle_timeout,
            cfg.reply_timeout.filter(|_| cfg.failover),
            cfg.liveness_timeout.filter(|_| cfg.failover),
        ]
        .into_iter()
        .flatten()
        .min()
        .unwrap_or(Duration::from_secs(1));
        let tick = (shortest / 4).clamp(Duration::from_millis(20), Duration::from_secs(1));
        let weak = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut every = tokio::time::interval(tick);
            every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                every.tick().await;
                let Some(relay) = weak.upgrade() else { return };
                let idle = relay.config.idle_timeout;
                for s in relay.sessions.sessions() {
                    s.check_timeouts(idle);
                }
            }
        });
    }

    /// Adds one to the listener counter the state machine named.
    fn count(&self, metric: Metric) {
        let counter = match metric {
            Metric::Moves => &self.stats.moves,
            Metric::Failovers => &self.stats.failovers,
            Metric::ManagerRefusals => &self.stats.manager_refusals,
            Metric::ManagerCloses => &self.stats.manager_closes,
            Metric::Reject(why) => return self.stats.reject(why),
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

/// Refusal log lines allowed per second and listener; the metrics count every refusal.
const REFUSAL_LINES_PER_SECOND: u64 = 10;

/// Agents remembered as refused by every manager, per listener.
const REFUSAL_BOOK_CAPACITY: usize = 65_536;

/// What a session is balanced by: its client's address under `balance = "source"` (what
/// nginx's `hash $remote_addr` does), otherwise the agent (ID-less agents by their address).
pub(super) fn balance_key(policy: crate::balance::Policy, session: &Session) -> BalanceKey {
    match (policy, session.key()) {
        (crate::balance::Policy::Source, _) => BalanceKey::Source(session.client().ip()),
        (_, SessionKey::Agent(id)) => BalanceKey::Agent(id),
        (_, SessionKey::Source(ip)) => BalanceKey::Source(ip),
    }
}

#[cfg(test)]
mod tests;
