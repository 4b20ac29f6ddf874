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

use bytes::{Buf, BytesMut};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::balance::{BalanceKey, Balancer, ConnectError, Connected};
use crate::envelope::{Envelope, EnvelopeError};
use crate::frame::{self, FrameError, HEADER_LEN, MAX_PAYLOAD};
use crate::handover::Handed;
use crate::keys::KeyStore;
use crate::net::tune;
use crate::session::{DuplicatePolicy, Session, SessionHandle, SessionKey, SessionRegistry};
use crate::stats::{Rejection, RelayStats};
use crate::verify::{verify_first, Tracker};

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
    /// Connect to managers from the agent's own address (`IP_TRANSPARENT`; default false:
    /// from the proxy's address). Managers then check and log the agent's real address,
    /// which keys bound to an IP or a network need. Needs `CAP_NET_ADMIN`, and replies to the
    /// agents' addresses routed back through this host (see [`Balancer::connect_from`]).
    pub transparent: bool,
    /// Read a PROXY protocol header (v1 or v2) first, from trusted senders only, and take the
    /// client's address from it (default off).
    pub proxy_protocol: Option<crate::proxy_protocol::ProxyProtocol>,
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
}

impl End {
    /// Whether the manager side failed (the agent can be kept and moved).
    fn manager_failed(&self) -> bool {
        matches!(
            self,
            End::ManagerClosed | End::ManagerIo(_) | End::ManagerTimeout | End::ManagerProtocol(_)
        )
    }
    /// The metric label of a protocol failure, if this end is one.
    pub fn rejection(&self) -> Option<Rejection> {
        match self {
            End::AgentFrame(e) => Some((*e).into()),
            End::AgentEnvelope(_) => Some(Rejection::BadEnvelope),
            End::AgentIdChanged => Some(Rejection::AgentIdChanged),
            End::ManagerProtocol(_) => Some(Rejection::ManagerProtocol),
            End::Idle => Some(Rejection::Idle),
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
        }
    }
}

/// One direction of a relayed connection.
///
/// Layout of `buf`: `[0, ready)` whole, checked frames not yet written; `[ready, len)` the
/// start of the next, incomplete frame. `head_left` is how much of the frame at the front is
/// still to be written (0 at a frame boundary).
#[derive(Debug, Default)]
pub struct Pipe {
    buf: BytesMut,
    ready: usize,
    head_left: usize,
    /// A protocol failure found behind the ready frames: reported once they are written, so
    /// every good frame that preceded a bad one is delivered. (Boxed: rare, and a pipe stays
    /// small.)
    failed: Option<Box<End>>,
    /// Whole frames in the ready region (a frame being written counts until it is done).
    ready_frames: u32,
    /// Frames written in the second `written_at` (of [`clock_secs`]) and in the one before
    /// (see `recently_written`); `written_at` 0: nothing written yet.
    written_now: u32,
    written_before: u32,
    written_at: u32,
}

/// Whole seconds since the process's first call, plus one (0 stays free to mean "never"):
/// a clock four bytes wide, for counters that only need to know the current second.
fn clock_secs() -> u32 {
    static EPOCH: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    let epoch = *EPOCH.get_or_init(Instant::now);
    u32::try_from(epoch.elapsed().as_secs())
        .unwrap_or(u32::MAX - 1)
        .saturating_add(1)
}

impl Pipe {
    /// Bytes held (whole frames waiting plus the incomplete tail).
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }

    /// Whether the next byte to write starts a frame.
    pub fn at_boundary(&self) -> bool {
        self.head_left == 0
    }

    /// Checks the frames that arrived, moving whole ones into the ready region.
    /// Returns the number of new frames and their bytes.
    fn take_frames(
        &mut self,
        max: u32,
        mut inspect: impl FnMut(&[u8]) -> Result<(), End>,
    ) -> (u64, u64) {
        let mut at = self.ready;
        let mut frames = 0u64;
        loop {
            match frame::check(&self.buf[at..], max) {
                Ok(Some(total)) => {
                    if let Err(e) = inspect(&self.buf[at + HEADER_LEN..at + total]) {
                        self.failed = Some(Box::new(e));
                        break;
                    }
                    at += total;
                    frames += 1;
                }
                Ok(None) => break,
                Err(e) => {
                    // Recorded as the agent's; `pump` re-labels it for the manager side.
                    self.failed = Some(Box::new(End::AgentFrame(e)));
                    break;
                }
            }
        }
        let bytes = (at - self.ready) as u64;
        self.ready = at;
        self.ready_frames = self
            .ready_frames
            .saturating_add(u32::try_from(frames).unwrap_or(u32::MAX));
        (frames, bytes)
    }

    /// Counts frames fully written now.
    fn note_written(&mut self, frames: u64) {
        let now = clock_secs();
        if now != self.written_at {
            self.written_before = if now == self.written_at.wrapping_add(1) {
                self.written_now
            } else {
                0
            };
            self.written_now = 0;
            self.written_at = now;
        }
        let frames = u32::try_from(frames).unwrap_or(u32::MAX);
        self.written_now = self.written_now.saturating_add(frames);
    }

    /// Frames written during the last one to two seconds: when the peer just failed, these
    /// may have been lost in its buffers (TCP does not say which were processed).
    pub fn recently_written(&self) -> u64 {
        if self.written_at == 0 {
            return 0;
        }
        let now = clock_secs();
        let n = if now == self.written_at {
            self.written_now.saturating_add(self.written_before)
        } else if now == self.written_at.wrapping_add(1) {
            self.written_now
        } else {
            0
        };
        u64::from(n)
    }

    /// Drops the unwritten rest of a partly written frame (its start went to a manager that
    /// failed; the rest must not reach another one). Returns whether a frame was cut.
    fn drop_partial_head(&mut self) -> bool {
        if self.head_left == 0 {
            return false;
        }
        let rest = self.head_left.min(self.ready);
        self.buf.advance(rest);
        self.ready -= rest;
        self.head_left = 0;
        self.ready_frames = self.ready_frames.saturating_sub(1);
        true
    }

    /// Drops the incomplete frame at the tail (from a manager that failed: never forwarded).
    fn drop_partial_tail(&mut self) -> bool {
        let cut = self.buf.len() > self.ready;
        self.buf.truncate(self.ready);
        if self.failed.is_some() {
            self.failed = None;
        }
        cut
    }

    /// Marks `n` written bytes as gone, tracking the frame boundary; returns the number of
    /// frames that were completed.
    fn consume(&mut self, mut n: usize) -> u64 {
        if self.head_left == 0 && n == self.ready {
            // Everything ready went out, starting at a boundary: it ends at one too (the ready
            // region only ever holds whole frames), so no header needs to be walked.
            self.buf.advance(n);
            self.ready = 0;
            return u64::from(std::mem::take(&mut self.ready_frames));
        }
        let mut done = 0;
        self.ready -= n;
        while n > 0 {
            if self.head_left == 0 {
                // At a boundary: the header of the next frame is at the front.
                let header = self
                    .buf
                    .first_chunk::<HEADER_LEN>()
                    .copied()
                    .unwrap_or_default();
                self.head_left = HEADER_LEN + u32::from_le_bytes(header) as usize;
            }
            let step = n.min(self.head_left);
            self.buf.advance(step);
            self.head_left -= step;
            n -= step;
            if self.head_left == 0 {
                done += 1;
            }
        }
        self.ready_frames = self
            .ready_frames
            .saturating_sub(u32::try_from(done).unwrap_or(u32::MAX));
        done
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
    handover: CancellationToken,
    sweeper: std::sync::atomic::AtomicBool,
    admission: crate::limits::Admission,
    refusals_logged: std::sync::atomic::AtomicU64,
    started: Instant,
    handover_to: std::sync::Mutex<Option<tokio::sync::mpsc::UnboundedSender<Handed>>>,
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
        AgentRelay {
            name: name.into(),
            sessions: SessionRegistry::with_parent(config.duplicate_policy, hard_stop.clone()),
            config,
            balancer: crate::balance::SharedBalancer::new(balancer),
            stats: Arc::new(RelayStats::default()),
            hard_stop,
            keys: None,
            handover: CancellationToken::new(),
            sweeper: std::sync::atomic::AtomicBool::new(false),
            admission: crate::limits::Admission::new(limits),
            refusals_logged: std::sync::atomic::AtomicU64::new(u64::MAX),
            started: Instant::now(),
            handover_to: std::sync::Mutex::new(None),
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
    /// Passive-health marks and connection counts of backends present in both sets carry over.
    pub fn set_balancer(&self, balancer: Balancer) {
        self.balancer.replace(balancer);
    }

    /// Takes `backend` out of rotation and moves every agent on it to the others at a frame
    /// boundary, without disconnecting them (before a manager's maintenance). Returns the
    /// number of sessions asked to move.
    ///
    /// # Errors
    /// When `backend` is not in the set, or no other backend would be left.
    pub fn drain_backend(
        &self,
        backend: SocketAddr,
    ) -> Result<usize, crate::balance::BalanceError> {
        self.set_down(backend, true)?;
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
        self.set_down(backend, false)
    }

    fn set_down(
        &self,
        backend: SocketAddr,
        down: bool,
    ) -> Result<(), crate::balance::BalanceError> {
        let current = self.balancer.load_full();
        let mut configs: Vec<_> = current
            .backends()
            .iter()
            .map(|b| b.config().clone())
            .collect();
        let entry = configs
            .iter_mut()
            .find(|c| c.addr == backend)
            .ok_or(crate::balance::BalanceError::UnknownBackend(backend))?;
        entry.down = down;
        self.set_balancer(Balancer::new(current.policy(), configs)?);
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
            let key = match s.key() {
                SessionKey::Agent(id) => BalanceKey::Agent(id),
                SessionKey::Source(ip) => BalanceKey::Source(ip),
            };
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
        self.handover.cancel();
        self.sessions.wake_all();
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
        let handle = match self.sessions.register(handed.key, handed.client).await {
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
                // One line per second at most: a flood must not become a log flood.
                let now = self.started.elapsed().as_secs();
                if self.refusals_logged.swap(now, Ordering::Relaxed) != now {
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
        if let Some(keys) = &self.keys {
            match verify_first(keys, &up.buf[HEADER_LEN..first_len], peer.ip()) {
                Ok(Some(v)) => {
                    key = SessionKey::Agent(v.key.id());
                    tracker = Some(Box::new(Tracker::new(v.key)));
                    info = Some(v.info);
                }
                Ok(None) => {}
                Err(refusal) => {
                    self.stats.reject(refusal.rejection());
                    tracing::warn!(listener = %self.name, client = %peer, "closing agent connection: {refusal}");
                    return None;
                }
            }
        }

        // 2. The session, under the duplicate policy.
        let handle = match self.sessions.register(key, peer).await {
            Ok(h) => h,
            Err(e) => {
                self.stats.reject(Rejection::Duplicate);
                tracing::warn!(listener = %self.name, agent = %key, client = %peer, "refusing agent connection: {e}");
                return None;
            }
        };
        let session = handle.session().clone();
        if let Some(info) = info {
            session.update_agent_info(|i| *i = info);
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
        // Managers that failed one after the other without answering (refusals such as
        // "Agent key already in use" last up to a minute): back off, and give up after the
        // hold timeout.
        let mut unanswered: Option<(Instant, u32)> = None;
        // When the manager carrying the agent failed (for the failover-time histogram).
        let mut failed_at: Option<Instant> = None;
        let end = loop {
            let awaiting_reply =
                match Box::pin(self.attach(&mut conn, &session, adopted, unanswered)).await {
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
                Detach::Next => {
                    failed_at = failed_at.or(failing);
                    // A manager that never answered (refused the agent, or died first) counts
                    // towards the hold timeout.
                    unanswered = if answered {
                        None
                    } else {
                        Some(unanswered.map_or((Instant::now(), 0), |(t, n)| (t, n + 1)))
                    };
                }
                Detach::Stop(end) => break end,
                Detach::HandOver => return self.hand_over(conn),
            }
        };
        self.finish(conn, &session, end);
    }

    /// Finds the session a manager (after a pause when the last ones did not answer), sends
    /// it the control frame when it needs one, and leaves the connection in `conn.manager`.
    async fn attach(
        &self,
        conn: &mut Conn,
        session: &Session,
        adopted: bool,
        unanswered: Option<(Instant, u32)>,
    ) -> Attach {
        let cfg = &self.config;
        let key = session.key();
        if let Some((since, n)) = unanswered {
            if since.elapsed() > cfg.hold_timeout {
                tracing::warn!(listener = %self.name, agent = %key, client = %session.client(),
                    "closing agent connection: no manager accepted it within {:?}", cfg.hold_timeout);
                return Attach::Stop(End::NoManager);
            }
            let pause = Duration::from_millis(100 << n.min(5)).min(Duration::from_secs(3));
            tokio::select! {
                _ = tokio::time::sleep(pause) => {}
                _ = session.closing() => return Attach::Stop(End::Closed),
            }
        }
        let connected = tokio::select! {
            r = self.connect_holding(session) => r,
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
        };
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
        Attach::Relay {
            awaiting_reply: replay_first || moved_from.is_none(),
        }
    }

    /// Decides what the end of relaying on `conn.manager` means: the session's end, a
    /// hand-over to the next process, or (when the manager failed or the session is being
    /// moved) the old manager closed at a frame boundary and the next one to be found.
    /// `answered`: the manager sent the agent something during this stint.
    async fn detach(&self, conn: &mut Conn, session: &Session, end: End, answered: bool) -> Detach {
        let Some(manager) = conn.manager.take() else {
            // Not reached: the relay ran on this manager connection.
            return Detach::Stop(end);
        };
        if matches!(end, End::HandedOver) {
            // A planned hand-over: complete the frame being written, deliver what the
            // agent is owed, close the manager connection (FIN) before the next process
            // opens its own, then pass the agent's socket on.
            if finish_head(&mut conn.up, &manager.stream).await.is_err() {
                conn.up.drop_partial_head();
            }
            let _ =
                tokio::time::timeout(Duration::from_secs(2), flush(&mut conn.down, &conn.agent))
                    .await;
            drop(manager);
            return Detach::HandOver;
        }
        if !(self.config.failover && (end.manager_failed() || matches!(end, End::Moved))) {
            drop(manager);
            return Detach::Stop(end);
        }
        // A planned move waits for the frame being written to end, so none is cut.
        let end = match end {
            End::Moved => match finish_head(&mut conn.up, &manager.stream).await {
                Ok(()) => End::Moved,
                Err(e) => End::ManagerIo(e),
            },
            other => other,
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
        if answered {
            // It registered the agent: a later return to it must not replay the frame.
            if !conn.fed.contains(&addr) {
                conn.fed.push(addr);
            }
        } else {
            // It did not register the agent: a later return to it needs the frame again.
            conn.fed.retain(|a| *a != addr);
        }
        drop(guard);
        if matches!(end, End::Moved) {
            self.stats.moves.fetch_add(1, Ordering::Relaxed);
        } else {
            self.balancer
                .load_full()
                .report_failure(index, Instant::now());
            self.stats.failovers.fetch_add(1, Ordering::Relaxed);
            // A manager that broke the protocol is counted even though the agent is kept.
            if let Some(why) = end.rejection() {
                self.stats.reject(why);
            }
            let cut = u64::from(conn.up.drop_partial_head());
            let at_risk = conn.up.recently_written() + cut;
            self.stats
                .frames_at_risk
                .fetch_add(at_risk, Ordering::Relaxed);
            session
                .stats()
                .frames_at_risk
                .fetch_add(at_risk, Ordering::Relaxed);
            if conn.down.drop_partial_tail() {
                self.stats.reject(Rejection::ManagerPartialFrame);
            }
            tracing::warn!(listener = %self.name, agent = %session.key(), client = %session.client(), backend = %addr,
                frames_at_risk = at_risk, "manager failed ({end}); keeping the agent and moving it");
        }
        session.stats().moves.fetch_add(1, Ordering::Relaxed);
        session.clear_move_request();
        Detach::Next
    }

    /// Counts and logs a session's end, then closes it.
    fn finish(&self, mut conn: Box<Conn>, session: &Session, end: End) {
        if let Some(why) = end.rejection() {
            self.stats.reject(why);
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
    async fn connect_holding(&self, session: &Session) -> Result<Connected, ConnectError> {
        let cfg = &self.config;
        let key = &match session.key() {
            SessionKey::Agent(id) => BalanceKey::Agent(id),
            SessionKey::Source(ip) => BalanceKey::Source(ip),
        };
        let deadline = Instant::now() + cfg.hold_timeout;
        let mut pause = Duration::from_millis(250);
        let mut _held = None;
        let source = cfg.transparent.then(|| session.client().ip());
        loop {
            let balancer = self.balancer.load_full();
            match balancer
                .connect_from(key, cfg.connect_timeout, source)
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
        match key {
            Some(key) => {
                tracing::warn!(listener = %self.name, agent = %key, client = %peer, "closing agent connection: {end}")
            }
            None => {
                tracing::warn!(listener = %self.name, client = %peer, "closing agent connection: {end}")
            }
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
        let shortest = [cfg.idle_timeout, cfg.reply_timeout.filter(|_| cfg.failover)]
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
            let check = agent_check(key, tracker.as_deref_mut(), replay, session);
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
        if self.relay.handover.is_cancelled() {
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
            ..
        } = &mut *this.conn;
        let Some(manager) = manager.as_ref().map(|m| &m.stream) else {
            return Poll::Ready(End::ManagerClosed);
        };
        let mut up_check = agent_check(session.key(), tracker.as_deref_mut(), replay, session);
        let up = drive(
            up,
            agent,
            manager,
            Dir::Up,
            relay,
            session,
            &mut up_check,
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
            cx,
        )
    }
}

/// The check every agent frame passes: the envelope names the connection's agent and, with
/// client.keys, decrypts; the latest keepalive becomes the frame a new manager sees first.
fn agent_check<'a>(
    key: SessionKey,
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
            pipe.buf
                .reserve(want.clamp(chunk, HEADER_LEN + cfg.max_payload as usize));
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
                    take_counted(pipe, dir, cfg.max_payload, &mut *check, relay, session);
                    progressed = true;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if pipe.buf.is_empty() {
                        // Idle: give the buffer back so idle agents hold no buffer memory.
                        pipe.buf = BytesMut::new();
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

            _admitted: admitted,
        }
    }
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
async fn finish_head(up: &mut Pipe, manager: &TcpStream) -> io::Result<()> {
    while up.head_left > 0 {
        let n = up.head_left.min(up.ready);
        match manager.try_write(&up.buf[..n]) {
            Ok(w) => {
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
}
