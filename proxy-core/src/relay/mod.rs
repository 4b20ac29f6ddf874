//! The frame-aware relay for agent connections on 1514/TCP.
//!
//! For each accepted agent: read the first frame within a deadline, learn the agent from it,
//! register the session, pick a manager by the agent, connect, then relay both directions frame
//! by frame. Only whole frames are ever written to either side, so the relay always knows where
//! the next frame starts on both sides; that is what makes a later switch of manager at a frame
//! boundary possible.
//!
//! Each direction is a [`Pipe`]: one buffer that holds whole, checked frames at its front and
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
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::balance::{BalanceKey, Balancer, ConnectError, Connected};
use crate::envelope::{Envelope, EnvelopeError};
use crate::frame::{self, FrameError, HEADER_LEN, MAX_PAYLOAD};
use crate::handover::Handed;
use crate::keys::KeyStore;
use crate::net::tune;
use crate::session::{Claim, DuplicatePolicy, Session, SessionHandle, SessionKey, SessionRegistry};
use crate::stats::{Rejection, RelayStats};
use crate::verify::{verify_first, Tracker};

pub mod decide;
mod pipe;
mod unacked;

pub use decide::{judge, Attempts, GiveUp, Next, RefusalBook, StintCause, Verdict};
use pipe::Pipe;
use unacked::Unacked;

/// Settings of an agent listener. Defaults suit Wazuh 4.x agents and managers.
#[derive(Debug, Clone)]
pub struct AgentRelayConfig {
    /// Time allowed for the first whole frame (default 10 s; agents send their startup
    /// message right after connecting).
    pub first_frame_timeout: Duration,
    /// Largest payload accepted either way (default 65536, the manager's own limit).
    pub max_payload: u32,
    /// Time allowed to connect to one manager before trying the next (default 5 s).
    pub connect_timeout: Duration,
    /// Close a session with no frame either way for this long (default 10 min, as nginx's
    /// `proxy_timeout`; agents send a keepalive every 10-20 s). `None` disables it.
    pub idle_timeout: Option<Duration>,
    /// Bytes asked of the kernel per read (default 32 KiB).
    pub read_chunk: usize,
    /// What to do with a second live connection of one agent (default replace).
    pub duplicate_policy: DuplicatePolicy,
    /// TCP keepalive idle time on both sockets, so dead peers are noticed (default 60 s).
    pub tcp_keepalive: Option<Duration>,
    /// When a manager fails (closes, resets, refuses the agent, or does not answer), keep the
    /// agent's connection and continue its stream on another manager at the next frame
    /// boundary (default on). Off: the agent is disconnected, as with any TCP proxy.
    pub failover: bool,
    /// How long an agent is held while no manager can be reached, before it is disconnected
    /// (default 30 s; an agent waits 60 s for the answer to its startup message).
    pub hold_timeout: Duration,
    /// A manager that sends nothing back for this long after being handed an agent's startup
    /// (or replayed keepalive) is treated as failed (default 20 s). `None` disables it.
    pub reply_timeout: Option<Duration>,
    /// Per-source limits on open connections and on how fast new ones come.
    pub source_limits: crate::limits::SourceLimits,
    /// A manager that sends an agent nothing for this long while the agent keeps sending is
    /// taken for hung, and the agent continues elsewhere (default 45 s: remoted answers every
    /// keepalive, which agents send every 10 s, and agents themselves reconnect after 60 s
    /// without an answer). Judged by [`decide::judge`]: if the manager's TCP left data
    /// unacknowledged it is marked failed, otherwise only this agent moves. `None` disables it.
    pub liveness_timeout: Option<Duration>,
    /// `TCP_USER_TIMEOUT` on manager connections: a manager whose TCP leaves sent data
    /// unacknowledged this long is taken for dead, and its agents continue elsewhere
    /// (default 10 s; a blackholed manager is noticed within about this time once data is
    /// in flight, and agents send a keepalive every 10 s). `None`: the kernel's default
    /// (about 15 minutes of retransmissions).
    pub manager_user_timeout: Option<Duration>,
    /// A second connection claiming an agent that has a live session is refused while that
    /// session has heard from its agent within this time (default 60 s, remoted's
    /// `connection_overtake_time`), unless it proves with the agent's key that it is the agent
    /// reconnecting (see [`crate::session::overtake`]).
    pub overtake_time: Duration,
    /// How long an agent that every manager refused is first kept away (default 2 s, doubling
    /// per refusal in a row up to [`AgentRelayConfig::refused_backoff_max`]).
    pub refused_backoff: Duration,
    /// The longest an agent that every manager refused is kept away (default 60 s).
    pub refused_backoff_max: Duration,
    /// Connect to managers from the agent's own address (`IP_TRANSPARENT`; default false:
    /// from the proxy's address). Managers then check and log the agent's real address,
    /// which keys bound to an IP or a network need. Needs `CAP_NET_ADMIN`, and replies to the
    /// agents' addresses routed back through this host (see [`Balancer::connect_from`]).
    pub transparent: bool,
    /// Read a PROXY protocol header (v1 or v2) first, from trusted senders only, and take the
    /// client's address from it (default off).
    pub proxy_protocol: Option<crate::proxy_protocol::ProxyProtocol>,
}

/// A setting of [`AgentRelayConfig`] that cannot work, alone or with another one.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// A value out of its range.
    #[error("{name} must be {range} (got {value})")]
    OutOfRange {
        /// The setting.
        name: &'static str,
        /// What it may be.
        range: String,
        /// What it was.
        value: String,
    },
    /// Two settings that contradict each other.
    #[error("{0}")]
    Conflict(String),
}

/// The smallest `max_payload` accepted: an agent's startup and keepalive messages must fit.
pub const MIN_MAX_PAYLOAD: u32 = 1024;

impl AgentRelayConfig {
    /// Checks every setting against its range and against the settings it works with, so
    /// that a configuration accepted here never fails at run time.
    ///
    /// # Errors
    /// The first setting (or pair of settings) that cannot work.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let range = |name: &'static str, ok: bool, range: &str, value: String| {
            if ok {
                Ok(())
            } else {
                Err(ConfigError::OutOfRange {
                    name,
                    range: range.to_owned(),
                    value,
                })
            }
        };
        range(
            "max_payload",
            (MIN_MAX_PAYLOAD..=MAX_PAYLOAD).contains(&self.max_payload),
            &format!("{MIN_MAX_PAYLOAD}..={MAX_PAYLOAD}"),
            self.max_payload.to_string(),
        )?;
        range(
            "read_chunk",
            (1024..=1 << 20).contains(&self.read_chunk),
            "1024..=1048576",
            self.read_chunk.to_string(),
        )?;
        let secs = |d: Duration| format!("{d:?}");
        let positive = |name, d: Duration| range(name, !d.is_zero(), "more than 0", secs(d));
        positive("first_frame_timeout", self.first_frame_timeout)?;
        positive("connect_timeout", self.connect_timeout)?;
        positive("hold_timeout", self.hold_timeout)?;
        positive("refused_backoff", self.refused_backoff)?;
        if self.refused_backoff_max < self.refused_backoff {
            return Err(ConfigError::Conflict(format!(
                "refused_backoff_max ({:?}) is shorter than refused_backoff ({:?})",
                self.refused_backoff_max, self.refused_backoff
            )));
        }
        if let Some(t) = self.manager_user_timeout {
            range(
                "manager_user_timeout",
                t >= Duration::from_secs(1) && t.as_millis() <= u128::from(u32::MAX),
                "1s or more (0 to leave the kernel's default)",
                secs(t),
            )?;
        }
        if let Some(k) = self.tcp_keepalive {
            range(
                "tcp_keepalive",
                k >= Duration::from_secs(1) && k.as_secs() <= 32_767,
                "1s..=32767s (0 to disable)",
                secs(k),
            )?;
        }
        for (name, t) in [
            ("reply_timeout", self.reply_timeout),
            ("liveness_timeout", self.liveness_timeout),
        ] {
            let (Some(idle), Some(reply)) = (self.idle_timeout, t) else {
                continue;
            };
            if reply >= idle {
                return Err(ConfigError::Conflict(format!(
                    "{name} ({reply:?}) must be shorter than idle_timeout ({idle:?}): the idle timeout would close every session a silent manager holds before the failover could move it"
                )));
            }
        }
        if let Some(idle) = self.idle_timeout {
            if idle <= self.first_frame_timeout {
                return Err(ConfigError::Conflict(format!(
                    "idle_timeout ({idle:?}) must be longer than first_frame_timeout ({:?})",
                    self.first_frame_timeout
                )));
            }
        }
        if self.source_limits.rate.is_nan() || self.source_limits.burst.is_nan() {
            return Err(ConfigError::Conflict(
                "per-source rate and burst must be numbers".into(),
            ));
        }
        Ok(())
    }
}

impl Default for AgentRelayConfig {
    fn default() -> Self {
        AgentRelayConfig {
            first_frame_timeout: Duration::from_secs(10),
            max_payload: MAX_PAYLOAD,
            connect_timeout: Duration::from_secs(5),
            idle_timeout: Some(Duration::from_secs(600)),
            read_chunk: 32 * 1024,
            duplicate_policy: DuplicatePolicy::Replace,
            tcp_keepalive: Some(Duration::from_secs(60)),
            failover: true,
            hold_timeout: Duration::from_secs(30),
            reply_timeout: Some(Duration::from_secs(20)),
            source_limits: crate::limits::SourceLimits::default(),
            transparent: false,
            manager_user_timeout: Some(Duration::from_secs(10)),
            liveness_timeout: Some(Duration::from_secs(45)),
            overtake_time: Duration::from_secs(60),
            refused_backoff: Duration::from_secs(2),
            refused_backoff_max: Duration::from_secs(60),
            proxy_protocol: None,
        }
    }
}

/// Why a session ended.
#[derive(Debug)]
#[non_exhaustive]
pub enum End {
    /// The agent closed its connection.
    AgentClosed,
    /// The manager closed its connection.
    ManagerClosed,
    /// Reading from or writing to the agent failed.
    AgentIo(io::Error),
    /// Reading from or writing to the manager failed.
    ManagerIo(io::Error),
    /// The agent broke a framing rule.
    AgentFrame(FrameError),
    /// The agent sent a payload that is not a Wazuh envelope.
    AgentEnvelope(EnvelopeError),
    /// A frame carried another agent ID than the connection's first frame.
    AgentIdChanged,
    /// The manager broke a framing rule or sent something that is not a Wazuh envelope.
    ManagerProtocol(&'static str),
    /// The proxy closed it: replaced by a newer connection of the same agent, or shutdown.
    Closed,
    /// No frame either way for longer than the idle timeout.
    Idle,
    /// The manager did not answer the agent's handshake within the reply timeout.
    ManagerTimeout,
    /// The session was asked to move to another manager (drain or rebalance).
    Moved,
    /// No manager could be reached within the hold timeout.
    NoManager,
    /// The session was handed to another process (binary upgrade).
    HandedOver,
    /// With keys, a session whose first frame was not a verified message sent something other
    /// than `#ping`.
    Unverified,
    /// Every manager refused the agent, or its sessions kept failing (see [`GiveUp`]).
    Refused(GiveUp),
    /// The agent was refused by every manager a short while ago and is kept away until then.
    KeptAway(Duration),
}

impl End {
    /// The metric label of a protocol failure, if this end is one.
    pub fn rejection(&self) -> Option<Rejection> {
        match self {
            End::AgentFrame(e) => Some((*e).into()),
            End::AgentEnvelope(_) => Some(Rejection::BadEnvelope),
            End::AgentIdChanged => Some(Rejection::AgentIdChanged),
            End::ManagerProtocol(_) => Some(Rejection::ManagerProtocol),
            End::Idle => Some(Rejection::Idle),
            End::Refused(_) => Some(Rejection::AgentRefused),
            End::Unverified => Some(Rejection::Unverified),
            End::KeptAway(_) => Some(Rejection::AgentBackoff),
            _ => None,
        }
    }
}

impl fmt::Display for End {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            End::AgentClosed => f.write_str("agent closed the connection"),
            End::ManagerClosed => f.write_str("manager closed the connection"),
            End::AgentIo(e) => write!(f, "agent connection failed: {e}"),
            End::ManagerIo(e) => write!(f, "manager connection failed: {e}"),
            End::AgentFrame(e) => write!(f, "agent sent a bad frame: {e}"),
            End::AgentEnvelope(e) => write!(f, "agent sent a bad envelope: {e}"),
            End::AgentIdChanged => f.write_str("agent ID changed within the connection"),
            End::ManagerProtocol(why) => {
                write!(f, "manager sent a bad frame ({why}); not forwarded")
            }
            End::Closed => f.write_str("closed by the proxy"),
            End::Idle => f.write_str("idle timeout"),
            End::ManagerTimeout => f.write_str("manager did not answer the handshake in time"),
            End::Moved => f.write_str("moved to another manager"),
            End::NoManager => f.write_str("no manager reachable"),
            End::HandedOver => f.write_str("handed over to the new process"),
            End::Unverified => f.write_str(
                "a session that did not start with a verified message may only carry #ping",
            ),
            End::Refused(GiveUp::RefusedEverywhere) => f.write_str(
                "every manager refused the agent (closed it before answering, or never answered it)",
            ),
            End::Refused(GiveUp::RepeatedFaults) => {
                f.write_str("managers kept breaking the protocol on this session")
            }
            End::KeptAway(d) => write!(
                f,
                "every manager refused this agent recently; kept away for {}s more",
                d.as_secs().max(1)
            ),
        }
    }
}

/// Which way a pipe carries frames.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Dir {
    /// Agent -> manager.
    Up,
    /// Manager -> agent.
    Down,
}

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
    handover_to: std::sync::Mutex<Option<tokio::sync::mpsc::UnboundedSender<Handed>>>,
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

    /// Verifies agents with `keys` (see [`crate::verify`]): the first message of each
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

    /// Agents every manager refused that are kept away now (see [`RefusalBook`]).
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

    /// Restores the operator's drains (from the previous process, on an upgrade): marks them
    /// down without moving anyone (the sessions arrive afterwards, and go elsewhere).
    pub fn restore_drained(&self, backends: &[SocketAddr]) {
        {
            let mut drained = self.drained.lock().unwrap_or_else(|p| p.into_inner());
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
    pub fn hand_over_all(&self, to: tokio::sync::mpsc::UnboundedSender<Handed>) {
        *self.handover_to.lock().unwrap_or_else(|p| p.into_inner()) = Some(to);
        self.handover.store(true, Ordering::Relaxed);
        self.sessions.wake_all();
    }

    /// Ends a hand-over that failed: sessions not handed yet stay here. Sessions already on
    /// their way arrive on the hand-over channel, to be adopted again ([`AgentRelay::adopt`]).
    pub fn cancel_hand_over(&self) {
        self.handover.store(false, Ordering::Relaxed);
    }

    fn hand_over(&self, conn: Box<Conn>) {
        let Conn {
            agent,
            handle,
            up,
            replay,
            ..
        } = *conn;
        let key = handle.session().key();
        let peer = handle.session().client();
        let sink = self
            .handover_to
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let socket = agent.into_std();
        match (sink, socket) {
            (Some(sink), Ok(socket)) => {
                let handed = Handed {
                    listener: self.name.clone(),
                    client: peer,
                    key,
                    pending: up.buf.to_vec(),
                    replay,
                    socket: socket.into(),
                };
                if sink.send(handed).is_err() {
                    tracing::warn!(listener = %self.name, agent = %key, client = %peer,
                        "hand-over channel closed; closing the agent connection");
                } else {
                    tracing::debug!(listener = %self.name, agent = %key, client = %peer, "agent handed over");
                }
            }
            (_, Err(e)) => {
                tracing::warn!(listener = %self.name, agent = %key, client = %peer, error = %e,
                    "cannot detach the agent socket for the hand-over; closing it");
            }
            (None, _) => {}
        }
        drop(handle);
    }

    /// Takes over a session handed over by a previous process: reconnects the agent to a
    /// manager (the startup or keepalive frame first, then the bytes the previous process had
    /// not forwarded) and relays it as if it had connected here.
    pub async fn adopt(self: Arc<Self>, handed: Handed) {
        if handed.listener != self.name {
            tracing::warn!(listener = %self.name, other = %handed.listener, "adopting a session of another listener");
        }
        let std_socket = std::net::TcpStream::from(handed.socket);
        let agent = match std_socket
            .set_nonblocking(true)
            .and_then(|()| TcpStream::from_std(std_socket))
        {
            Ok(a) => a,
            Err(e) => {
                tracing::warn!(listener = %self.name, agent = %handed.key, client = %handed.client, error = %e,
                    "cannot adopt the agent socket");
                return;
            }
        };
        self.start_sweeper();
        self.stats.accepted.fetch_add(1, Ordering::Relaxed);
        self.stats.active.fetch_add(1, Ordering::Relaxed);
        let handle = match self
            .sessions
            .register(handed.key, handed.client, Claim::HandedOver)
            .await
        {
            Ok(h) => h,
            Err(e) => {
                tracing::warn!(listener = %self.name, agent = %handed.key, "cannot adopt: {e}");
                self.stats.active.fetch_sub(1, Ordering::Relaxed);
                return;
            }
        };
        let tracker = match (&self.keys, handed.key) {
            (Some(keys), SessionKey::Agent(id)) => keys.get(&id).map(|k| Box::new(Tracker::new(k))),
            _ => None,
        };
        let mut up = Pipe::default();
        up.buf.extend_from_slice(&handed.pending);
        tune(&agent, self.config.tcp_keepalive);
        let conn = Box::new(Conn::new(agent, handle, up, handed.replay, tracker, None));
        self.carry(conn, true).await;
        self.stats.active.fetch_sub(1, Ordering::Relaxed);
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

    /// [`AgentRelay::handle`] for a socket that already has the TCP settings (accepted from a
    /// listener tuned by [`crate::net::tune_listener`]).
    fn handle_tuned(
        self: Arc<Self>,
        agent: TcpStream,
        peer: SocketAddr,
    ) -> impl std::future::Future<Output = ()> + Send + 'static {
        self.start_sweeper();
        self.stats.accepted.fetch_add(1, Ordering::Relaxed);
        let admitted = match self.admission.admit(peer.ip(), Instant::now()) {
            Ok(a) => Some(a),
            Err(why) => {
                self.stats.reject(Rejection::SourceLimit);
                // A flood must not become a log flood.
                if self.may_log_refusal() {
                    tracing::warn!(listener = %self.name, client = %peer,
                        refused_total = self.stats.rejected(Rejection::SourceLimit), "refusing connection: {why}");
                }
                None
            }
        };
        let setup = admitted.map(|admitted| {
            self.stats.active.fetch_add(1, Ordering::Relaxed);
            let relay = self.clone();
            Box::pin(async move { relay.setup(agent, peer, admitted).await })
        });
        async move {
            let Some(setup) = setup else { return };
            if let Some(conn) = setup.await {
                self.carry(conn, false).await;
            }
            self.stats.active.fetch_sub(1, Ordering::Relaxed);
        }
    }

    /// The first frame, agent verification and the session: everything before frames flow.
    /// Returns `None` when the connection was refused (already logged and counted).
    async fn setup(
        &self,
        agent: TcpStream,
        peer: SocketAddr,
        admitted: crate::limits::Admitted,
    ) -> Option<Box<Conn>> {
        let cfg = &self.config;
        let mut up = Pipe::default();

        // 1. The first frame names the agent.
        let first = tokio::select! {
            r = tokio::time::timeout(cfg.first_frame_timeout, first_frame(&agent, peer, &mut up, cfg)) => r,
            _ = self.hard_stop.cancelled() => return None,
        };
        let (mut key, first_len) = match first {
            Ok(Ok(found)) => found,
            Ok(Err(end)) => {
                self.refuse(peer, None, &end);
                return None;
            }
            Err(_) => {
                self.stats.reject(Rejection::FirstFrameTimeout);
                tracing::warn!(listener = %self.name, client = %peer,
                    "closing agent connection: no complete first frame within {:?}", cfg.first_frame_timeout);
                return None;
            }
        };

        // With client.keys: the agent must be who it claims to be.
        let mut tracker = None;
        let mut info = None;
        let mut claim = Claim::Unverified;
        if let Some(keys) = &self.keys {
            match verify_first(keys, &up.buf[HEADER_LEN..first_len], peer.ip()) {
                Ok(Some(v)) => {
                    key = SessionKey::Agent(v.key.id());
                    tracker = Some(Box::new(Tracker::new(v.key)));
                    info = Some(v.info);
                    claim = Claim::Verified {
                        startup: v.startup,
                        counter: v.counter,
                    };
                }
                Ok(None) => {}
                Err(refusal) => {
                    self.stats.reject(refusal.rejection());
                    tracing::warn!(listener = %self.name, client = %peer, "closing agent connection: {refusal}");
                    return None;
                }
            }
        }

        // An agent every manager refused a moment ago is answered here, not by the managers.
        let kept_away = self.refused.lock().unwrap_or_else(|p| p.into_inner()).wait(
            key,
            peer.ip(),
            Instant::now(),
        );
        if let Some(wait) = kept_away {
            self.refuse(peer, Some(key), &End::KeptAway(wait));
            return None;
        }

        // 2. The session, under the duplicate policy.
        let counter = match claim {
            Claim::Verified { counter, .. } => Some(counter),
            _ => None,
        };
        let handle = match self.sessions.register(key, peer, claim).await {
            Ok(h) => h,
            Err(e) => {
                let why = match e {
                    crate::session::SessionError::Live { .. } => Rejection::Overtake,
                    _ => Rejection::Duplicate,
                };
                self.stats.reject(why);
                self.log_refusal(
                    peer,
                    Some(key),
                    format_args!("refusing agent connection: {e}"),
                );
                return None;
            }
        };
        let session = handle.session().clone();
        if let Some(info) = info {
            session.update_agent_info(|i| *i = info);
        }
        if let Some(c) = counter {
            session.note_counter(c);
        }

        let replay = up.buf[HEADER_LEN..first_len].to_vec();
        Some(Box::new(Conn::new(
            agent,
            handle,
            up,
            replay,
            tracker,
            Some(admitted),
        )))
    }

    /// Carries an agent's session to its end: a manager, then frames both ways. When the
    /// manager side fails, the agent's connection stays and its stream continues on another
    /// manager at a frame boundary. `conn.replay` is the frame a new manager must see first so
    /// that it registers the agent's reply socket (its startup message, or with keys its
    /// latest keepalive); `adopted` sessions come from a previous process and replay it at
    /// once.
    ///
    /// Everything that lasts the whole session lives in `conn` (one allocation), and the
    /// steps around relaying (finding a manager, handling its end) run boxed: while frames
    /// flow, this future holds a few words, so an idle agent's task is small.
    async fn carry(&self, mut conn: Box<Conn>, adopted: bool) {
        let session = conn.handle.session().clone();
        // When the manager carrying the agent failed (for the failover-time histogram).
        let mut failed_at: Option<Instant> = None;
        let end = loop {
            let awaiting_reply = match Box::pin(self.attach(&mut conn, &session, adopted)).await {
                Attach::Relay { awaiting_reply } => {
                    if let Some(t) = failed_at.take() {
                        crate::timing::FAILOVER.record(t.elapsed());
                    }
                    awaiting_reply
                }
                Attach::Retry => continue,
                Attach::Stop(end) => break end,
            };
            let replies_before = session.stats().frames_down.load(Ordering::Relaxed);
            let end = self.relay(&mut conn, &session, awaiting_reply).await;
            let answered = session.stats().frames_down.load(Ordering::Relaxed) != replies_before;
            let failing = (!matches!(end, End::Moved)).then(Instant::now);
            match Box::pin(self.detach(&mut conn, &session, end, answered)).await {
                Detach::Next => failed_at = failed_at.or(failing),
                Detach::Stop(end) => break end,
                Detach::HandOver => return self.hand_over(conn),
            }
        };
        self.finish(conn, &session, end);
    }

    /// Finds the session a manager (after the pause its last stint's end asked for, and
    /// avoiding the managers that refused the agent), sends it the control frame when it needs
    /// one, and leaves the connection in `conn.manager`.
    async fn attach(&self, conn: &mut Conn, session: &Session, adopted: bool) -> Attach {
        let cfg = &self.config;
        let key = session.key();
        let (pause, avoid) = match conn.trouble.as_deref_mut() {
            Some(t) => (std::mem::take(&mut t.pause), std::mem::take(&mut t.avoid)),
            None => (Duration::ZERO, Vec::new()),
        };
        if !pause.is_zero() {
            tokio::select! {
                _ = tokio::time::sleep(pause) => {}
                _ = session.closing() => return Attach::Stop(End::Closed),
            }
        }
        let connected = tokio::select! {
            r = self.connect_holding(session, &avoid) => r,
            _ = session.closing() => return Attach::Stop(End::Closed),
        };
        let connected = match connected {
            Ok(c) => c,
            Err(e) => {
                self.stats.reject(Rejection::NoBackend);
                tracing::warn!(listener = %self.name, agent = %key, client = %session.client(),
                    "closing agent connection: no manager reachable: {e}");
                return Attach::Stop(End::NoManager);
            }
        };
        // TCP_NODELAY is set by the balancer's connect.
        crate::net::set_keepalive(socket2::SockRef::from(&connected.stream), cfg.tcp_keepalive);
        crate::net::set_user_timeout(
            socket2::SockRef::from(&connected.stream),
            cfg.manager_user_timeout,
        );
        let addr = connected.addr;
        // The session's backend is the previous manager until now (none at the start).
        let moved_from = session.backend();
        session.set_backend(Some(addr));
        // A new manager gets the control frame that registers the agent before any newer
        // frame: after a hand-over from a previous process, and after a move to a manager
        // that has not registered this agent yet (never twice: a duplicate may close the
        // connection).
        let replay_first = match moved_from {
            None => adopted,
            Some(_) => !conn.fed.contains(&addr),
        } && !std::mem::take(&mut conn.unacked.replay_resent);
        if replay_first {
            if let Err(e) = write_frame(&connected.stream, &conn.replay).await {
                let during = if moved_from.is_none() {
                    "taking over the agent"
                } else {
                    "the hand-over"
                };
                tracing::warn!(listener = %self.name, agent = %key, backend = %addr, error = %e,
                    "manager failed during {during}; trying another");
                self.balancer
                    .load_full()
                    .report_failure(connected.index, Instant::now());
                if moved_from.is_none() {
                    session.set_backend(None);
                }
                return Attach::Retry;
            }
        }
        let client = session.client();
        match moved_from {
            Some(from) => {
                tracing::info!(listener = %self.name, agent = %key, client = %client, from = %from, to = %addr,
                    "agent moved to another manager without disconnecting");
            }
            None => {
                self.stats.sessions.fetch_add(1, Ordering::Relaxed);
                let how = if adopted { "taken_over" } else { "connected" };
                crate::access::session_start(&self.name, &session.snapshot(), how);
            }
        }
        conn.manager = Some(connected);
        conn.stint_started = pipe::clock_secs();
        Attach::Relay {
            awaiting_reply: replay_first || moved_from.is_none(),
        }
    }

    /// Decides what the end of relaying on `conn.manager` means (see [`decide`]): the
    /// session's end, a hand-over to the next process, or the old manager closed at a frame
    /// boundary and the next one to be found. Only a manager that is unreachable is reported
    /// failed; one that refused this agent, dropped a session it served, or broke the protocol
    /// on it stays available for every other agent. `answered`: the manager sent the agent
    /// something during this stint.
    async fn detach(&self, conn: &mut Conn, session: &Session, end: End, answered: bool) -> Detach {
        let Some(manager) = conn.manager.take() else {
            // Not reached: the relay ran on this manager connection.
            return Detach::Stop(end);
        };
        if matches!(end, End::HandedOver) {
            // A planned hand-over: complete the frame being written, deliver what the
            // agent is owed, close the manager connection (FIN) before the next process
            // opens its own, then pass the agent's socket on.
            if finish_head(&mut conn.up, &mut conn.unacked, &manager.stream)
                .await
                .is_err()
            {
                conn.up.drop_partial_head();
            }
            let _ =
                tokio::time::timeout(Duration::from_secs(2), flush(&mut conn.down, &conn.agent))
                    .await;
            drop(manager);
            return Detach::HandOver;
        }
        let cause = match stint_cause(&end, &manager.stream) {
            Some(cause) if self.config.failover => cause,
            _ => {
                drop(manager);
                return Detach::Stop(end);
            }
        };
        // A planned move waits for the frame being written to end, so none is cut.
        let cause = match cause {
            StintCause::Moved => {
                match finish_head(&mut conn.up, &mut conn.unacked, &manager.stream).await {
                    // Left only once its TCP acknowledged everything written: a manager moved
                    // away from because it stopped answering (its health checks failed) is a
                    // failure, and what it never acknowledged goes to the next one.
                    Ok(()) => match acknowledged(&manager.stream, MOVE_ACK_WAIT).await {
                        0 => StintCause::Moved,
                        unacked => StintCause::Silent { unacked },
                    },
                    Err(e) => stint_cause(&End::ManagerIo(e), &manager.stream)
                        .unwrap_or(StintCause::Closed),
                }
            }
            other => other,
        };
        let verdict = decide::judge(cause, answered);
        // What the old manager never received goes to the next one: nothing, after a move
        // (it was left at a boundary, everything acknowledged); every kept frame after a refusal
        // (it processed none); otherwise the frames its TCP never acknowledged.
        let resend = match verdict {
            Verdict::Moved => {
                conn.unacked.clear();
                None
            }
            Verdict::AgentRefused => Some(None),
            _ => Some(Some(
                crate::net::unacked_bytes(&manager.stream).map_or(usize::MAX, |n| n as usize),
            )),
        };
        // The manager failed or the agent is being moved: close the old upstream first.
        let Connected {
            stream,
            index,
            addr,
            guard,
            ..
        } = manager;
        drop(stream);
        let mut resent = 0;
        if let Some(unacked) = resend {
            let (bytes, frames) = conn.unacked.take_resend(unacked);
            resent = frames;
            if !bytes.is_empty() {
                conn.unacked.replay_resent = holds_frame(&bytes, &conn.replay);
                conn.up.requeue(bytes, frames);
            }
        }
        if answered {
            self.forget_refusal(session.key(), session.client().ip());
        }
        if answered && verdict != Verdict::Ended {
            // It registered the agent: a later return to it must not replay the frame.
            if !conn.fed.contains(&addr) {
                conn.fed.push(addr);
            }
        } else {
            // It did not register the agent, or dropped it (remoted forgets an agent's reply
            // socket with its connection): a later return to it needs the frame again.
            conn.fed.retain(|a| *a != addr);
        }
        drop(guard);
        let balancer = self.balancer.load_full();
        let (key, client) = (session.key(), session.client());
        match verdict {
            Verdict::Moved => {
                self.stats.moves.fetch_add(1, Ordering::Relaxed);
            }
            Verdict::ManagerFailed => {
                balancer.report_failure(index, Instant::now());
                self.stats.failovers.fetch_add(1, Ordering::Relaxed);
            }
            Verdict::AgentRefused => {
                self.stats.manager_refusals.fetch_add(1, Ordering::Relaxed);
            }
            Verdict::Ended => {
                // The agent is kept and reconnected: a failover, though not the manager's
                // failure (the connect attempt tells whether it is down).
                self.stats.manager_closes.fetch_add(1, Ordering::Relaxed);
                self.stats.failovers.fetch_add(1, Ordering::Relaxed);
            }
            Verdict::SessionFault => {
                // Counted; the manager stays available.
                self.stats.reject(Rejection::ManagerProtocol);
            }
        }
        // Every kind of move drops partial frames, both ways: the rest of a frame whose start
        // went to the old manager must not reach the next one, and the start of a frame the
        // old manager never finished must not be completed by the next one's bytes.
        let cut = u64::from(conn.up.drop_partial_head());
        if conn.down.drop_partial_tail() {
            self.stats.reject(Rejection::ManagerPartialFrame);
        }
        if resent > 0 {
            self.stats
                .frames_resent
                .fetch_add(resent, Ordering::Relaxed);
        }
        // A manager that refused the agent processed none of its frames (every kept one is
        // re-sent): nothing is at risk there.
        if !matches!(verdict, Verdict::Moved | Verdict::AgentRefused) {
            // Written, acknowledged by the manager's TCP, and perhaps lost with its process.
            let at_risk = conn.up.recently_written().saturating_sub(resent)
                + cut
                + u64::from(std::mem::take(&mut conn.unacked.unprotected));
            self.stats
                .frames_at_risk
                .fetch_add(at_risk, Ordering::Relaxed);
            session
                .stats()
                .frames_at_risk
                .fetch_add(at_risk, Ordering::Relaxed);
            match verdict {
                Verdict::ManagerFailed => {
                    tracing::warn!(listener = %self.name, agent = %key, client = %client, backend = %addr,
                        frames_at_risk = at_risk, frames_resent = resent, "manager failed ({end}); keeping the agent and moving it");
                }
                _ => {
                    tracing::info!(listener = %self.name, agent = %key, client = %client, backend = %addr,
                        frames_at_risk = at_risk, frames_resent = resent, answered, "manager ended the agent's connection ({end}); the manager stays in rotation");
                }
            }
        } else if verdict == Verdict::AgentRefused {
            // Debug: one refused agent retried a few times must not fill the log; the give-up
            // is logged once (rate-limited) and every refusal is counted.
            tracing::debug!(listener = %self.name, agent = %key, client = %client, backend = %addr,
                frames_resent = resent, "manager refused the agent ({end}); the manager stays in rotation");
        }
        session.stats().moves.fetch_add(1, Ordering::Relaxed);
        session.clear_move_request();
        let managers = balancer
            .backends()
            .iter()
            .filter(|b| !b.config().down)
            .count();
        let lasted = Duration::from_secs(u64::from(
            pipe::clock_secs().saturating_sub(conn.stint_started),
        ));
        let trouble = conn.trouble.get_or_insert_with(Box::default);
        match trouble.attempts.after(verdict, addr, lasted, managers) {
            Next::Reconnect { pause, avoid } => {
                trouble.pause = pause;
                trouble.avoid = avoid;
                Detach::Next
            }
            Next::GiveUp(why) => Detach::Stop(End::Refused(why)),
        }
    }

    /// Counts and logs a session's end, then closes it.
    fn finish(&self, mut conn: Box<Conn>, session: &Session, end: End) {
        if let Some(why) = end.rejection() {
            self.stats.reject(why);
        }
        let (key, ip) = (session.key(), session.client().ip());
        if let End::Refused(_) = end {
            let wait = self
                .refused
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .refused(key, ip, Instant::now());
            self.log_refusal(
                session.client(),
                Some(key),
                format_args!(
                    "agent disconnected: {end}; its reconnections are answered by the proxy for {}s",
                    wait.as_secs()
                ),
            );
        } else if session.stats().frames_down.load(Ordering::Relaxed) > 0 {
            self.forget_refusal(key, ip);
        }
        let clean = match (conn.tracker.as_deref_mut(), &end) {
            (Some(t), End::AgentClosed) => Some(t.ended_cleanly(session)),
            (Some(_), _) => Some(false),
            (None, _) => None,
        };
        let stop = match clean {
            Some(true) => "clean",
            Some(false) => "lost",
            None => "unknown",
        };
        match stop {
            "clean" => self.stats.clean_stops.fetch_add(1, Ordering::Relaxed),
            "lost" => self.stats.lost.fetch_add(1, Ordering::Relaxed),
            _ => 0,
        };
        let fault = end.rejection().is_some() || matches!(end, End::NoManager);
        crate::access::session_end(&self.name, &session.snapshot(), &end, stop, fault);
        // The manager connection is already closed (by `detach`), before the handle goes: a
        // replacing connection of the same agent must not reach a manager that still holds
        // this one. (Fields drop in order: the agent's socket, then the handle.)
        drop(conn);
    }

    /// Connects to a manager for `key`, holding the agent while none can be reached (up to
    /// `hold_timeout`), so that a short outage costs the agent a delay, not a disconnect.
    async fn connect_holding(
        &self,
        session: &Session,
        avoid: &[SocketAddr],
    ) -> Result<Connected, ConnectError> {
        let cfg = &self.config;
        let key = &balance_key(self.balancer.load_full().policy(), session);
        let deadline = Instant::now() + cfg.hold_timeout;
        let mut pause = Duration::from_millis(250);
        let mut _held = None;
        let source = cfg.transparent.then(|| session.client().ip());
        loop {
            let balancer = self.balancer.load_full();
            match balancer
                .connect_avoiding(key, cfg.connect_timeout, source, avoid)
                .await
            {
                Ok(c) => {
                    if c.attempts > 1 {
                        self.stats
                            .connect_failures
                            .fetch_add(u64::from(c.attempts - 1), Ordering::Relaxed);
                    }
                    return Ok(c);
                }
                Err(e) => {
                    self.stats.connect_failures.fetch_add(1, Ordering::Relaxed);
                    if !cfg.failover || Instant::now() + pause > deadline {
                        return Err(e);
                    }
                    tracing::debug!(listener = %self.name, agent = %session.key(), error = %e,
                        "no manager reachable; holding the agent");
                    _held.get_or_insert_with(crate::timing::Held::start);
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_secs(2));
                }
            }
        }
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

    /// Relays frames both ways on `conn.manager` until one side ends or the session needs
    /// attention.
    fn relay<'a>(
        &'a self,
        conn: &'a mut Conn,
        session: &'a Session,
        awaiting_reply: bool,
    ) -> Relaying<'a> {
        // A timeout noticed while no manager carried the session (held, or reconnecting) is
        // stale: the hold timeout governs that time, and a new manager connection is activity.
        let _ = session.take_expired();
        session.touch();
        if let (true, true, Some(t)) = (
            awaiting_reply,
            self.config.failover,
            self.config.reply_timeout,
        ) {
            session.arm_reply(t);
        } else {
            session.disarm_reply();
        }
        let mut relaying = Relaying {
            relay: self,
            conn,
            session,
        };
        relaying.prime();
        relaying
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
}

/// The steady state of a session: both directions relayed by one hand-written future, so that
/// an idle agent costs a few words of task state rather than a tree of futures and timers.
/// All state lives in the connection's pipes: dropping this future leaves them at a known byte
/// position (what a manager failover, a move and a hand-over rely on).
struct Relaying<'a> {
    relay: &'a AgentRelay,
    conn: &'a mut Conn,
    session: &'a Session,
}

/// Bytes asked of the kernel by the first read after an idle period: enough for a startup or
/// keepalive message, small enough that thousands of agents waking at once (a reconnect storm)
/// do not each allocate a full read chunk.
const FIRST_READ: usize = 4096;

/// Bytes a direction may hold before it stops reading (whole frames waiting to be written and
/// the start of the next). Above the largest frame, so a frame always fits.
const HIGH_WATER: usize = 128 * 1024;

/// Reads (or writes) a direction may do in one poll before yielding, so one busy agent cannot
/// hold a worker thread.
const POLL_BUDGET: u32 = 32;

impl Relaying<'_> {
    /// Takes the frames read before relaying started (the first frame, and what came with it).
    fn prime(&mut self) {
        let (relay, session) = (self.relay, self.session);
        let max = relay.config.max_payload;
        let key = session.key();
        let Conn {
            up,
            down,
            tracker,
            replay,
            ..
        } = &mut *self.conn;
        if up.ready == 0 && !up.buf.is_empty() {
            let check = agent_check(
                key,
                relay.keys.is_some(),
                tracker.as_deref_mut(),
                replay,
                session,
            );
            take_counted(up, Dir::Up, max, check, relay, session);
        }
        if down.ready == 0 && !down.buf.is_empty() {
            take_counted(down, Dir::Down, max, check_manager_frame, relay, session);
        }
    }

    fn attention(&self) -> Option<End> {
        let s = self.session;
        if s.is_closing() {
            return Some(End::Closed);
        }
        if self.relay.handover.load(Ordering::Relaxed) {
            return Some(End::HandedOver);
        }
        if self.relay.config.failover && s.is_move_requested() {
            return Some(End::Moved);
        }
        match s.take_expired() {
            Some(crate::session::Expiry::Idle) => Some(End::Idle),
            Some(crate::session::Expiry::Reply) => Some(End::ManagerTimeout),
            None => None,
        }
    }
}

impl std::future::Future for Relaying<'_> {
    type Output = End;

    fn poll(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<End> {
        use std::task::Poll;
        let this = self.get_mut();
        if let Some(end) = this.attention() {
            return Poll::Ready(end);
        }
        this.session.register_attention(cx.waker());
        // Checked again: a flag set between the first check and the registration would
        // otherwise wait for the next wake-up.
        if let Some(end) = this.attention() {
            return Poll::Ready(end);
        }
        let (relay, session) = (this.relay, this.session);
        let Conn {
            agent,
            manager,
            up,
            down,
            tracker,
            replay,
            unacked,
            ..
        } = &mut *this.conn;
        let Some(manager) = manager.as_ref().map(|m| &m.stream) else {
            return Poll::Ready(End::ManagerClosed);
        };
        let mut up_check = agent_check(
            session.key(),
            relay.keys.is_some(),
            tracker.as_deref_mut(),
            replay,
            session,
        );
        let up = drive(
            up,
            agent,
            manager,
            Dir::Up,
            relay,
            session,
            &mut up_check,
            Some(unacked),
            cx,
        );
        if let Poll::Ready(end) = up {
            return Poll::Ready(end);
        }
        let mut down_check = check_manager_frame;
        drive(
            down,
            manager,
            agent,
            Dir::Down,
            relay,
            session,
            &mut down_check,
            Some(unacked),
            cx,
        )
    }
}

/// The check every agent frame passes: the envelope names the connection's agent and, with
/// client.keys, decrypts; the latest keepalive becomes the frame a new manager sees first.
/// With keys, a session whose first frame was not a verified message (a `#ping`) has no
/// identity and may carry nothing but `#ping`.
fn agent_check<'a>(
    key: SessionKey,
    verifying: bool,
    tracker: Option<&'a mut Tracker>,
    replay: &'a mut Vec<u8>,
    session: &'a Session,
) -> impl FnMut(&[u8]) -> Result<(), End> + 'a {
    let mut tracker = tracker;
    move |payload: &[u8]| {
        if let Some(t) = tracker.as_deref_mut() {
            let env = check_agent_frame(key, payload)?;
            if t.observe(&env, session) {
                replay.clear();
                replay.extend_from_slice(payload);
            }
            Ok(())
        } else if verifying {
            match check_agent_frame(key, payload)? {
                Envelope::Ping => Ok(()),
                _ => Err(End::Unverified),
            }
        } else {
            check_agent_prefix(key, payload)
        }
    }
}

/// [`Pipe::take_frames`], counting the new frames for the session and the listener.
fn take_counted(
    pipe: &mut Pipe,
    dir: Dir,
    max: u32,
    check: impl FnMut(&[u8]) -> Result<(), End>,
    relay: &AgentRelay,
    session: &Session,
) {
    let (frames, bytes) = pipe.take_frames(max, check);
    if frames > 0 {
        let up = dir == Dir::Up;
        session.record(up, frames, bytes);
        relay.stats.record(up, frames, bytes);
        if up && relay.config.failover {
            // The manager owes an answer within the liveness time (keepalives are answered).
            if let Some(t) = relay.config.liveness_timeout {
                session.arm_reply_if_idle(t);
            }
        }
    }
}

/// Moves whole frames from `src` to `dst` until nothing more can be done without waiting
/// (`Pending`, with the right readiness registered) or the stream ends.
///
/// Reading goes on while earlier frames wait to be written, up to [`HIGH_WATER`] bytes held:
/// the two sockets work in parallel, and a peer that stops reading stops the other side's
/// reads once that much is buffered (backpressure with a bounded buffer).
#[allow(clippy::too_many_arguments)]
fn drive(
    pipe: &mut Pipe,
    src: &TcpStream,
    dst: &TcpStream,
    dir: Dir,
    relay: &AgentRelay,
    session: &Session,
    check: &mut impl FnMut(&[u8]) -> Result<(), End>,
    // Agent to manager: the copy of what was written; manager to agent: trimmed on answers.
    mut copy: Option<&mut Unacked>,
    cx: &mut std::task::Context<'_>,
) -> std::task::Poll<End> {
    use std::task::Poll;
    let cfg = &relay.config;
    let up = dir == Dir::Up;
    type IoEnd = fn(io::Error) -> End;
    let (src_io, dst_io): (IoEnd, IoEnd) = match dir {
        Dir::Up => (End::AgentIo, End::ManagerIo),
        Dir::Down => (End::ManagerIo, End::AgentIo),
    };
    for _ in 0..POLL_BUDGET {
        let mut progressed = false;
        if pipe.ready > 0 {
            match dst.try_write(&pipe.buf[..pipe.ready]) {
                Ok(n) => {
                    if let Some(copy) = copy.as_deref_mut().filter(|_| up) {
                        copy.record(&pipe.buf[..n]);
                        // Asked of the kernel only each time the copy doubled: one system
                        // call per many writes under load.
                        if copy.should_trim() {
                            if let Ok(left) = crate::net::unacked_bytes(dst) {
                                copy.trim(left as usize);
                            }
                        }
                    }
                    let done = pipe.consume(n);
                    if up {
                        pipe.note_written(done);
                    }
                    progressed = true;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => match dst.poll_write_ready(cx) {
                    Poll::Ready(Ok(())) => progressed = true,
                    Poll::Ready(Err(e)) => return Poll::Ready(dst_io(e)),
                    Poll::Pending => {}
                },
                Err(e) => return Poll::Ready(dst_io(e)),
            }
        }
        if pipe.failed.is_some() {
            // Every good frame before the bad one goes out first.
            if pipe.ready > 0 {
                if progressed {
                    continue;
                }
                return Poll::Pending;
            }
            return Poll::Ready(match (dir, pipe.failed.take().map(|b| *b)) {
                (Dir::Down, Some(End::AgentFrame(e))) => End::ManagerProtocol(e.reason()),
                (_, Some(end)) => end,
                (_, None) => End::Closed,
            });
        }
        if pipe.buf.len() < HIGH_WATER {
            // Room for a read, or for the rest of a large frame. A pipe that has been idle
            // starts small (agents mostly send small messages after a pause); one that is
            // streaming reads in full chunks.
            let want = match pipe
                .buf
                .get(pipe.ready..)
                .and_then(|t| t.first_chunk::<HEADER_LEN>())
            {
                Some(h) => (HEADER_LEN + u32::from_le_bytes(*h) as usize)
                    .saturating_sub(pipe.buf.len() - pipe.ready),
                None => 0,
            };
            let chunk = if pipe.buf.capacity() == 0 {
                FIRST_READ.min(cfg.read_chunk)
            } else {
                cfg.read_chunk
            };
            // At least a read's worth, and room for the rest of the frame being read (never
            // more than the largest frame: `want` comes from a checked header).
            pipe.buf.reserve(want.max(chunk));
            match src.try_read_buf(&mut pipe.buf) {
                Ok(0) => {
                    if pipe.ready > 0 {
                        // The source closed: deliver what is ready first, then end.
                        if progressed {
                            continue;
                        }
                        return Poll::Pending;
                    }
                    return Poll::Ready(if pipe.buf.is_empty() {
                        if up {
                            End::AgentClosed
                        } else {
                            End::ManagerClosed
                        }
                    } else {
                        let e = frame::truncated(&pipe.buf);
                        if up {
                            End::AgentFrame(e)
                        } else {
                            End::ManagerProtocol(e.reason())
                        }
                    });
                }
                Ok(n) => {
                    crate::pace::note(n);
                    let frames_before = pipe.ready;
                    take_counted(pipe, dir, cfg.max_payload, &mut *check, relay, session);
                    if !up && pipe.ready != frames_before {
                        // The manager answered: it has the agent's frames, so let go of what
                        // its TCP acknowledged (how an idle agent's copy is freed).
                        if let Some(copy) = copy.as_deref_mut().filter(|c| c.len() > 0) {
                            if let Ok(left) = crate::net::unacked_bytes(src) {
                                copy.trim_and_release(left as usize);
                            }
                        }
                    }
                    progressed = true;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if pipe.buf.is_empty() {
                        // Idle: give the buffer back so idle agents hold no buffer memory.
                        pipe.buf = BytesMut::new();
                        if let Some(copy) = copy.as_deref_mut() {
                            copy.release_if_empty();
                        }
                    }
                    match src.poll_read_ready(cx) {
                        Poll::Ready(Ok(())) => progressed = true,
                        Poll::Ready(Err(e)) => return Poll::Ready(src_io(e)),
                        Poll::Pending => {}
                    }
                }
                Err(e) => return Poll::Ready(src_io(e)),
            }
        }
        // (At the high-water mark the ready region is never empty: a lone incomplete frame
        // is smaller than HIGH_WATER.)
        if !progressed {
            return Poll::Pending;
        }
    }
    // Budget spent with work left: yield, and come back at once.
    cx.waker().wake_by_ref();
    Poll::Pending
}

/// What [`AgentRelay::attach`] found.
enum Attach {
    /// A manager is in `conn.manager`; relay (arming the reply timeout if asked).
    Relay { awaiting_reply: bool },
    /// That manager failed at once: find another.
    Retry,
    /// The session ends.
    Stop(End),
}

/// What [`AgentRelay::detach`] decided.
enum Detach {
    /// Find the next manager.
    Next,
    /// The session ends.
    Stop(End),
    /// Pass the agent's socket to the next process.
    HandOver,
}

/// A session's connection state from its first frame to its end, in one allocation. Fields
/// drop in order: the agent's socket closes before the session handle goes.
struct Conn {
    agent: TcpStream,
    handle: SessionHandle,
    /// Agent to manager, and manager to agent.
    up: Pipe,
    down: Pipe,
    /// The frame a new manager must see first (see [`AgentRelay::carry`]).
    replay: Vec<u8>,
    tracker: Option<Box<Tracker>>,
    /// The manager connection being relayed to, while there is one.
    manager: Option<Connected>,
    /// Managers that registered this agent (answered it) before it moved away: a return to
    /// one of them must not replay the control frame. Empty unless the agent has moved.
    fed: Vec<SocketAddr>,
    /// When the current manager connection was made (in [`pipe::clock_secs`]: a second's
    /// precision is enough to tell a working session from one that keeps failing).
    stint_started: u32,
    /// Refusals and faults met so far, once there has been one (boxed: most sessions have none).
    trouble: Option<Box<Trouble>>,
    /// Frames written to the current manager that its TCP may not have acknowledged.
    unacked: Unacked,

    /// The connection's place under the per-source limits (none for adopted sessions).
    _admitted: Option<crate::limits::Admitted>,
}

impl Conn {
    fn new(
        agent: TcpStream,
        handle: SessionHandle,
        up: Pipe,
        replay: Vec<u8>,
        tracker: Option<Box<Tracker>>,
        admitted: Option<crate::limits::Admitted>,
    ) -> Self {
        Conn {
            agent,
            handle,
            up,
            down: Pipe::default(),
            replay,
            tracker,
            manager: None,
            fed: Vec::new(),
            stint_started: pipe::clock_secs(),
            trouble: None,
            unacked: Unacked::default(),

            _admitted: admitted,
        }
    }
}

/// What a session's connection has met from managers (see [`decide::Attempts`]).
#[derive(Debug, Default)]
struct Trouble {
    attempts: Attempts,
    /// Time to wait before the next manager connection.
    pause: Duration,
    /// Managers not to try for it.
    avoid: Vec<SocketAddr>,
}

/// Refusal log lines allowed per second and listener; the metrics count every refusal.
const REFUSAL_LINES_PER_SECOND: u64 = 10;

/// Agents remembered as refused by every manager, per listener.
const REFUSAL_BOOK_CAPACITY: usize = 65_536;

/// What the end of relaying says about the manager connection, or `None` when the session
/// itself ends (the agent closed or broke a rule, the proxy closed it).
fn stint_cause(end: &End, manager: &TcpStream) -> Option<StintCause> {
    Some(match end {
        End::ManagerClosed => StintCause::Closed,
        End::ManagerIo(e) => match e.kind() {
            io::ErrorKind::TimedOut
            | io::ErrorKind::HostUnreachable
            | io::ErrorKind::NetworkUnreachable => StintCause::Unreachable,
            _ => StintCause::Closed,
        },
        End::ManagerTimeout => StintCause::Silent {
            // Unknown counts as unacknowledged: a socket that cannot be asked is not healthy.
            unacked: crate::net::unacked_bytes(manager).unwrap_or(u32::MAX),
        },
        End::ManagerProtocol(_) => StintCause::Protocol,
        End::Moved => StintCause::Moved,
        _ => return None,
    })
}

/// What a session is balanced by: its client's address under `balance = "source"` (what
/// nginx's `hash $remote_addr` does), otherwise the agent (ID-less agents by their address).
fn balance_key(policy: crate::balance::Policy, session: &Session) -> BalanceKey {
    match (policy, session.key()) {
        (crate::balance::Policy::Source, _) => BalanceKey::Source(session.client().ip()),
        (_, SessionKey::Agent(id)) => BalanceKey::Agent(id),
        (_, SessionKey::Source(ip)) => BalanceKey::Source(ip),
    }
}

/// How long a planned move waits for the old manager's TCP to acknowledge what was written.
const MOVE_ACK_WAIT: Duration = Duration::from_secs(2);

/// Waits (up to `limit`) until the peer's TCP acknowledged every byte written to `stream`;
/// returns what is still unacknowledged then (0: all of it, or the count is not available).
async fn acknowledged(stream: &TcpStream, limit: Duration) -> u32 {
    let until = Instant::now() + limit;
    loop {
        match crate::net::unacked_bytes(stream) {
            Ok(0) => return 0,
            Ok(n) if Instant::now() >= until => return n,
            Ok(_) => tokio::time::sleep(Duration::from_millis(5)).await,
            // Cannot tell (not Linux): a plain move, as before the count existed.
            Err(_) => return 0,
        }
    }
}

/// Whether `frames` (whole frames from the front) holds one whose payload is `payload`.
fn holds_frame(frames: &[u8], payload: &[u8]) -> bool {
    let mut at = 0;
    while let Some(header) = frames.get(at..).and_then(|b| b.first_chunk::<HEADER_LEN>()) {
        let end = at + HEADER_LEN + u32::from_le_bytes(*header) as usize;
        match frames.get(at + HEADER_LEN..end) {
            Some(p) if p == payload => return true,
            Some(_) => at = end,
            None => return false,
        }
    }
    false
}

/// Writes one whole frame (payload given without its header) to a manager.
async fn write_frame(manager: &TcpStream, payload: &[u8]) -> io::Result<()> {
    let mut frame = Vec::with_capacity(HEADER_LEN + payload.len());
    frame.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    frame.extend_from_slice(payload);
    let mut at = 0;
    while at < frame.len() {
        match manager.try_write(&frame[at..]) {
            Ok(n) => at += n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => manager.writable().await?,
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Writes every whole frame a pipe holds (a hand-over delivers what the agent is owed).
async fn flush(pipe: &mut Pipe, dst: &TcpStream) -> io::Result<()> {
    while pipe.ready > 0 {
        match dst.try_write(&pipe.buf[..pipe.ready]) {
            Ok(n) => {
                pipe.consume(n);
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => dst.writable().await?,
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Writes the rest of a partly written frame, so that a planned move happens at a boundary.
async fn finish_head(up: &mut Pipe, copy: &mut Unacked, manager: &TcpStream) -> io::Result<()> {
    while up.head_left > 0 {
        let n = up.head_left.min(up.ready);
        match manager.try_write(&up.buf[..n]) {
            Ok(w) => {
                copy.record(&up.buf[..w]);
                up.consume(w);
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => manager.writable().await?,
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Reads until the first whole frame is buffered and returns who it belongs to.
async fn first_frame(
    agent: &TcpStream,
    peer: SocketAddr,
    up: &mut Pipe,
    cfg: &AgentRelayConfig,
) -> Result<(SessionKey, usize), End> {
    let peer_ip = peer.ip();
    loop {
        match frame::check(&up.buf, cfg.max_payload) {
            Ok(Some(total)) => {
                return match Envelope::parse(&up.buf[HEADER_LEN..total]) {
                    Ok(env) => Ok((
                        env.agent_id()
                            .map_or(SessionKey::Source(peer_ip), SessionKey::Agent),
                        total,
                    )),
                    Err(e) => Err(End::AgentEnvelope(e)),
                };
            }
            Ok(None) => {}
            Err(e) => return Err(End::AgentFrame(e)),
        }
        up.buf.reserve(FIRST_READ.min(cfg.read_chunk));
        agent.readable().await.map_err(End::AgentIo)?;
        match agent.try_read_buf(&mut up.buf) {
            Ok(0) if up.buf.is_empty() => return Err(End::AgentClosed),
            Ok(0) => return Err(End::AgentFrame(frame::truncated(&up.buf))),
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(End::AgentIo(e)),
        }
    }
}

fn check_agent_frame(key: SessionKey, payload: &[u8]) -> Result<Envelope<'_>, End> {
    match Envelope::parse(payload) {
        Ok(env) => match (env.agent_id(), key) {
            (Some(id), SessionKey::Agent(owner)) if id != owner => Err(End::AgentIdChanged),
            // A session not identified by its first frame (ID-less, or a `#ping`) carries no
            // agent ID later: it would be routed and counted as something it never proved.
            (Some(_), SessionKey::Source(_)) => Err(End::AgentIdChanged),
            _ => Ok(env),
        },
        Err(e) => Err(End::AgentEnvelope(e)),
    }
}

/// The per-frame check of an agent's stream without keys: the `!ID!` prefix of the
/// connection's agent and a cipher tag, compared in place (no parsing on the fast path).
#[inline]
fn check_agent_prefix(key: SessionKey, payload: &[u8]) -> Result<(), End> {
    if let SessionKey::Agent(id) = key {
        let id = id.as_bytes();
        if let Some(rest) = payload
            .strip_prefix(b"!")
            .and_then(|p| p.strip_prefix(id))
            .and_then(|p| p.strip_prefix(b"!"))
        {
            if rest.starts_with(b"#AES:") || rest.first() == Some(&b':') {
                return Ok(());
            }
        }
    }
    // Anything else (ID-less, #ping, or wrong): the full parse says exactly what.
    check_agent_frame(key, payload).map(drop)
}

fn check_manager_frame(payload: &[u8]) -> Result<(), End> {
    // Managers never prefix an ID; anything else than a tagged ciphertext or #pong would make
    // the agent log an error, so it is not forwarded.
    match Envelope::parse(payload) {
        Ok(Envelope::Secure { agent_id: None, .. }) | Ok(Envelope::Pong) => Ok(()),
        Ok(_) => Err(End::ManagerProtocol("agent ID prefix on a manager frame")),
        Err(e) => Err(End::ManagerProtocol(e.reason())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::encode_frame;

    #[test]
    fn pipe_keeps_bad_frames_out_and_good_ones_in() {
        let mut p = Pipe::default();
        p.buf
            .extend_from_slice(&encode_frame(b"!001!#AES:x", MAX_PAYLOAD).unwrap());
        p.buf
            .extend_from_slice(&encode_frame(b"!001!:y", MAX_PAYLOAD).unwrap());
        p.buf.extend_from_slice(&[0, 0, 0, 0]);
        let key = SessionKey::Agent(crate::envelope::AgentId::parse(b"001").unwrap());
        let (frames, bytes) = p.take_frames(MAX_PAYLOAD, |pl| check_agent_frame(key, pl).map(drop));
        assert_eq!((frames, bytes), (2, 26));
        assert!(matches!(
            p.failed.as_deref(),
            Some(End::AgentFrame(FrameError::ZeroLength))
        ));
    }

    #[test]
    fn pipe_tracks_boundaries_across_partial_writes() {
        let mut p = Pipe::default();
        p.buf
            .extend_from_slice(&encode_frame(b"#AES:abcdef", MAX_PAYLOAD).unwrap()); // 15 bytes
        p.buf
            .extend_from_slice(&encode_frame(b"#AES:g", MAX_PAYLOAD).unwrap()); // 10 bytes
        p.buf.extend_from_slice(&[9, 0]);
        let (frames, _) = p.take_frames(MAX_PAYLOAD, check_manager_frame);
        assert_eq!(frames, 2);
        assert!(p.at_boundary());
        p.consume(3);
        assert!(!p.at_boundary());
        p.consume(12);
        assert!(p.at_boundary());
        p.consume(9);
        assert!(!p.at_boundary());
        p.consume(1);
        assert!(p.at_boundary());
        assert_eq!(p.ready, 0);
        assert_eq!(p.buffered(), 2);
    }

    #[test]
    fn id_change_and_manager_prefix_are_refused() {
        let key = SessionKey::Agent(crate::envelope::AgentId::parse(b"001").unwrap());
        assert!(matches!(
            check_agent_frame(key, b"!002!#AES:x"),
            Err(End::AgentIdChanged)
        ));
        assert!(check_agent_frame(key, b"#ping").is_ok());
        assert!(matches!(
            check_manager_frame(b"!001!#AES:x"),
            Err(End::ManagerProtocol(_))
        ));
        assert!(matches!(
            check_manager_frame(b"HTTP/1.1 200 OK"),
            Err(End::ManagerProtocol(_))
        ));
    }

    /// A small deterministic generator for the randomized tests below.
    struct Rng(u64);
    impl Rng {
        fn below(&mut self, n: usize) -> usize {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            (self.0 % n.max(1) as u64) as usize
        }
    }

    /// Frames with distinct payloads (`#AES:` + tag + index + filler), and their bytes.
    fn stream_of(rng: &mut Rng, tag: u8, n: usize) -> (Vec<Vec<u8>>, Vec<u8>) {
        let mut frames = Vec::new();
        let mut bytes = Vec::new();
        for i in 0..n {
            let mut p = format!("#AES:{}{i};", tag as char).into_bytes();
            p.resize(p.len() + rng.below(300), b'x');
            bytes.extend_from_slice(&encode_frame(&p, MAX_PAYLOAD).unwrap());
            frames.push(p);
        }
        (frames, bytes)
    }

    /// Splits a byte stream into its frames' payloads; `None` if it is not whole frames.
    fn parse_all(mut b: &[u8]) -> Option<Vec<Vec<u8>>> {
        let mut out = Vec::new();
        while !b.is_empty() {
            let total = frame::check(b, MAX_PAYLOAD).ok()??;
            out.push(b[HEADER_LEN..total].to_vec());
            b = &b[total..];
        }
        Some(out)
    }

    /// Feeds `pipe` up to `len` bytes of `src` from `*at` (one read).
    fn feed(pipe: &mut Pipe, src: &[u8], at: &mut usize, len: usize) {
        let n = len.min(src.len() - *at);
        pipe.buf.extend_from_slice(&src[*at..*at + n]);
        *at += n;
        pipe.take_frames(MAX_PAYLOAD, check_manager_frame);
    }

    /// Writes up to `len` ready bytes of `pipe` to `out` (one write).
    fn drain(pipe: &mut Pipe, out: &mut Vec<u8>, copy: Option<&mut Unacked>, len: usize) {
        let n = len.min(pipe.ready);
        out.extend_from_slice(&pipe.buf[..n]);
        if let Some(c) = copy {
            c.record(&pipe.buf[..n]);
        }
        pipe.consume(n);
    }

    #[test]
    fn a_move_never_splices_manager_frames_for_the_agent() {
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        for _ in 0..2000 {
            let n = 1 + rng.below(8);
            let (a_frames, a) = stream_of(&mut rng, b'a', n);
            let n = 1 + rng.below(8);
            let (b_frames, b) = stream_of(&mut rng, b'b', n);
            let mut down = Pipe::default();
            let mut to_agent = Vec::new();
            let (mut at, cut) = (0, rng.below(a.len() + 1));
            // Manager A, read and written in random pieces, until the move.
            while at < cut {
                feed(&mut down, &a[..cut], &mut at, 1 + rng.below(120));
                drain(&mut down, &mut to_agent, None, rng.below(150));
            }
            // The move: what detach does to the manager-to-agent pipe.
            down.drop_partial_tail();
            let mut at = 0;
            while at < b.len() || down.ready > 0 {
                if at < b.len() {
                    feed(&mut down, &b, &mut at, 1 + rng.below(120));
                }
                drain(&mut down, &mut to_agent, None, 1 + rng.below(150));
            }
            let got = parse_all(&to_agent).expect("the agent received a spliced frame");
            // A prefix of A's frames (whole), then all of B's.
            let from_a = got.len() - b_frames.len();
            assert_eq!(&got[..from_a], &a_frames[..from_a]);
            assert_eq!(&got[from_a..], &b_frames[..]);
        }
    }

    #[test]
    fn a_failover_sends_the_next_manager_exactly_what_the_dead_one_never_acknowledged() {
        let mut rng = Rng(0x2545_f491_4f6c_dd1d);
        for _ in 0..2000 {
            let n = 2 + rng.below(12);
            let (frames, agent) = stream_of(&mut rng, b'e', n);
            let mut up = Pipe::default();
            let mut copy = Unacked::default();
            let mut to_a = Vec::new();
            let (mut at, fail_at) = (0, rng.below(agent.len() + 1));
            while at < fail_at {
                feed(&mut up, &agent[..fail_at], &mut at, 1 + rng.below(90));
                drain(&mut up, &mut to_a, Some(&mut copy), rng.below(110));
                // Now and then the kernel says what it acknowledged.
                if rng.below(3) == 0 {
                    copy.trim(rng.below(copy.len() + 1).max(copy.len() / 2));
                }
            }
            // A dies: its TCP acknowledged a random prefix of what it was sent (never less
            // than what it already reported).
            let unacked = rng.below(copy.len() + 1);
            let acked = to_a.len() - unacked;
            let (resend, _) = copy.take_resend(Some(unacked));
            up.requeue(resend, 0);
            let mut to_b = Vec::new();
            while at < agent.len() || up.ready > 0 {
                if at < agent.len() {
                    feed(&mut up, &agent, &mut at, 1 + rng.below(90));
                }
                drain(&mut up, &mut to_b, None, 1 + rng.below(110));
            }
            // What A processed: the whole frames within what its TCP acknowledged.
            let mut a_got = Vec::new();
            let mut rest = &to_a[..acked];
            while let Ok(Some(total)) = frame::check(rest, MAX_PAYLOAD) {
                a_got.push(rest[HEADER_LEN..total].to_vec());
                rest = &rest[total..];
            }
            let b_got = parse_all(&to_b).expect("B received a spliced frame");
            let mut all = a_got.clone();
            all.extend(b_got);
            assert_eq!(all, frames, "lost, duplicated or reordered");
        }
    }
}
/// What an idle agent costs is mostly these two allocations; jemalloc rounds each up to a size
/// class (448 and 320 bytes with the session's Arc header), so a field that crosses a class
/// costs 64 bytes per agent. Grow them only on purpose.
#[cfg(test)]
mod size_classes {
    #[test]
    fn per_session_allocations_stay_in_their_size_classes() {
        assert!(std::mem::size_of::<super::Conn>() <= 448);
        assert!(std::mem::size_of::<crate::session::Session>() + 16 <= 320);
    }
}
