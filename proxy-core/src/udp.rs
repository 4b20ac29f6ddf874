//! The relay for agents on 1514/UDP.
//!
//! Over UDP one datagram is one message: the payload of a TCP frame, without the 4-byte length.
//! Manager replies carry no agent ID, so every agent (every source `ip:port`) gets a *flow*: its
//! own upstream socket, connected to the manager chosen for it, with a source port of its own.
//! A reply arriving on that socket belongs to that agent and leaves from the listening socket
//! to the agent's address, so the agent sees answers from the address it sent to.
//!
//! The manager is chosen from the first datagram of a flow: a `!ID!` prefix gives
//! [`BalanceKey::Agent`] (the same agent reaches the same manager from every proxy node, as on
//! TCP), an ID-less envelope gives [`BalanceKey::Source`]. Every datagram is checked with
//! [`Envelope::parse`] (a few byte comparisons); anything else is dropped and counted, never
//! forwarded. A datagram carrying another agent ID than its flow's starts a new flow.
//!
//! Flows end after [`UdpRelayConfig::idle_timeout`] without a datagram either way (agents send
//! a keepalive every 10-20 s), when the manager answers with ICMP port unreachable (the
//! manager is marked failed and the agent's next datagram opens a flow to another one), and
//! when the listener stops. Memory is bounded: at most [`UdpRelayConfig::max_flows`] flows,
//! and a flow holds a receive buffer only while replies are being read.
//!
//! Counters in [`UdpRelay::stats`] ([`RelayStats`]): `accepted` = new flows asked for,
//! `sessions` = flows opened, `active` = flows open now, `frames_*`/`bytes_*` = datagrams and
//! their bytes, `connect_failures` = upstream sockets that could not be opened or were refused
//! by the manager; rejections [`Rejection::BadEnvelope`] and [`Rejection::TooLong`] (agent
//! datagrams dropped), [`Rejection::NoBackend`], [`Rejection::ManagerProtocol`] (manager
//! datagrams dropped), [`Rejection::SourceLimit`] (datagrams that would open a flow beyond
//! the source address's limits, [`UdpRelayConfig::source_limits`]). UDP-only counters are in [`UdpRelay::flow_stats`].
//!
//! ```no_run
//! use std::sync::Arc;
//! use wazuh_proxy_core::balance::{BackendConfig, Balancer, Policy};
//! use wazuh_proxy_core::udp::{UdpRelay, UdpRelayConfig};
//! use tokio_util::sync::CancellationToken;
//! use tokio_util::task::TaskTracker;
//!
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! let managers = vec![
//!     BackendConfig::new("10.0.0.11:1514".parse()?),
//!     BackendConfig::new("10.0.0.12:1514".parse()?),
//! ];
//! let balancer = Balancer::new(Policy::AgentId, managers)?;
//! let relay = Arc::new(UdpRelay::new("agents-udp", UdpRelayConfig::default(), balancer));
//! let socket = tokio::net::UdpSocket::bind("0.0.0.0:1514").await?;
//! let stop = CancellationToken::new();
//! let tracker = TaskTracker::new();
//! relay.serve(socket, stop, tracker).await;
//! # Ok(()) }
//! ```

use std::fmt;
use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::BytesMut;
use dashmap::DashMap;
use tokio::net::UdpSocket;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::balance::{BalanceKey, Balancer, ConnGuard};
use crate::envelope::{AgentId, Envelope};
use crate::frame::MAX_PAYLOAD;
use crate::limits::{Admission, Admitted, LogLimit, SourceLimits};
use crate::stats::{Rejection, RelayStats};

/// Settings of a UDP agent listener.
#[derive(Debug, Clone)]
pub struct UdpRelayConfig {
    /// Close a flow with no datagram either way for this long (default 120 s; UDP agents send
    /// a keepalive every 10-20 s, so a live agent never reaches it).
    pub idle_timeout: Duration,
    /// Largest datagram relayed either way (default 65536, the manager's own limit); larger
    /// ones are dropped.
    pub max_datagram: usize,
    /// Most flows (agents) open at once (default 16384). Each flow holds one socket, so keep
    /// it below the file descriptor limit. Datagrams that would open a flow beyond it are
    /// dropped and counted in [`UdpFlowStats::flows_refused`].
    pub max_flows: usize,
    /// Per-source flow limits: most flows one IP address may hold open (`max_open`), and new
    /// flows per second one address may open (`rate`, `burst`). Agents behind one NAT share
    /// an address, so the defaults are those of the TCP listeners. Datagrams that would open
    /// a flow beyond them are dropped and counted as [`Rejection::SourceLimit`].
    pub source_limits: SourceLimits,
}

impl Default for UdpRelayConfig {
    fn default() -> Self {
        UdpRelayConfig {
            idle_timeout: Duration::from_secs(120),
            max_datagram: MAX_PAYLOAD as usize,
            max_flows: 16_384,
            source_limits: SourceLimits::default(),
        }
    }
}

/// Counters that only UDP listeners have.
#[derive(Debug, Default)]
pub struct UdpFlowStats {
    /// Datagrams dropped because [`UdpRelayConfig::max_flows`] flows were open.
    pub flows_refused: AtomicU64,
    /// Flows closed by the idle timeout.
    pub flows_expired: AtomicU64,
    /// Datagrams that could not be sent on (socket buffer full or a send error).
    pub send_failures: AtomicU64,
}

/// Why a flow ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FlowEnd {
    /// No datagram either way for the idle timeout.
    Idle,
    /// The manager answered with ICMP port unreachable.
    Refused,
    /// The agent's address sent another agent ID: a new flow took over.
    Replaced,
    /// The listener stopped, or [`UdpRelay::close_all`].
    Shutdown,
    /// Receiving from the manager failed.
    Io,
}

impl fmt::Display for FlowEnd {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            FlowEnd::Idle => "idle timeout",
            FlowEnd::Refused => "manager refused (port unreachable)",
            FlowEnd::Replaced => "another agent ID from the same address",
            FlowEnd::Shutdown => "closed by the proxy",
            FlowEnd::Io => "receive from manager failed",
        })
    }
}

/// One agent's flow: its upstream socket and what it has moved.
struct Flow {
    /// The agent ID of the datagram that opened the flow, if it had one.
    agent_id: Option<AgentId>,
    /// Connected to the manager; its local port is this agent's alone.
    upstream: UdpSocket,
    backend: SocketAddr,
    index: usize,
    /// The backend set the manager was chosen from (health is reported there after a reload).
    balancer: Arc<Balancer>,
    _guard: ConnGuard,
    /// The flow's place under its source's limits, released when the flow ends.
    _admitted: Admitted,
    /// Milliseconds since the relay's epoch of the last datagram either way.
    last_ms: AtomicU64,
    answered: AtomicBool,
    datagrams_up: AtomicU64,
    datagrams_down: AtomicU64,
    bytes_up: AtomicU64,
    bytes_down: AtomicU64,
    closed: CancellationToken,
    why: OnceLock<FlowEnd>,
}

impl Flow {
    /// Asks the flow's task to end, for `why` (the first reason given wins).
    fn close(&self, why: FlowEnd) {
        let _ = self.why.set(why);
        self.closed.cancel();
    }
}

/// The flows of one listening socket, by agent address.
type FlowTable = DashMap<SocketAddr, Arc<Flow>>;

/// What [`UdpRelay::serve`] shares with its flow tasks.
struct Listener {
    socket: Arc<UdpSocket>,
    table: Arc<FlowTable>,
    /// Cancelled when the listener stops; every flow's token is a child.
    closing: CancellationToken,
    tracker: TaskTracker,
}

/// Relays agent datagrams on one UDP socket.
pub struct UdpRelay {
    name: String,
    config: UdpRelayConfig,
    balancer: crate::balance::SharedBalancer,
    stats: Arc<RelayStats>,
    flow_stats: UdpFlowStats,
    hard_stop: CancellationToken,
    admission: Admission,
    /// Time base of every flow's `last_ms`.
    epoch: Instant,
    bad_log: LogLimit,
    refused_log: LogLimit,
    send_log: LogLimit,
    manager_log: LogLimit,
}

impl fmt::Debug for UdpRelay {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UdpRelay")
            .field("name", &self.name)
            .field("config", &self.config)
            .field("flows", &self.flows())
            .finish_non_exhaustive()
    }
}

impl UdpRelay {
    /// A relay named `name` (used in logs) sending agents to `balancer`'s managers.
    pub fn new(name: impl Into<String>, config: UdpRelayConfig, balancer: Balancer) -> Self {
        UdpRelay {
            name: name.into(),
            admission: Admission::new(config.source_limits),
            config,
            balancer: crate::balance::SharedBalancer::new(balancer),
            stats: Arc::new(RelayStats::default()),
            flow_stats: UdpFlowStats::default(),
            hard_stop: CancellationToken::new(),
            epoch: Instant::now(),
            bad_log: LogLimit::new(),
            refused_log: LogLimit::new(),
            send_log: LogLimit::new(),
            manager_log: LogLimit::new(),
        }
    }

    /// The listener's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The settings in force.
    pub fn config(&self) -> &UdpRelayConfig {
        &self.config
    }

    /// This listener's counters (see the module documentation for what they count over UDP).
    pub fn stats(&self) -> &Arc<RelayStats> {
        &self.stats
    }

    /// The counters only UDP listeners have.
    pub fn flow_stats(&self) -> &UdpFlowStats {
        &self.flow_stats
    }

    /// Flows open now.
    pub fn flows(&self) -> usize {
        usize::try_from(self.stats.active.load(Ordering::Relaxed)).unwrap_or(0)
    }

    /// The backend set in force.
    pub fn balancer(&self) -> Arc<Balancer> {
        self.balancer.load_full()
    }

    /// Replaces the backend set; new flows use it, open flows keep their manager.
    /// Passive-health marks and connection counts of backends present in both sets carry over.
    pub fn set_balancer(&self, balancer: Balancer) {
        self.balancer.replace(balancer);
    }

    /// Closes every flow and stops [`UdpRelay::serve`] (the end of a drain).
    pub fn close_all(&self) {
        self.hard_stop.cancel();
    }

    /// Relays datagrams received on `socket` until `stop` is cancelled (or
    /// [`UdpRelay::close_all`]); then every flow of this socket ends. Flow tasks run on
    /// `tracker`.
    pub async fn serve(
        self: Arc<Self>,
        socket: UdpSocket,
        stop: CancellationToken,
        tracker: TaskTracker,
    ) {
        let listener = Listener {
            socket: Arc::new(socket),
            table: Arc::new(FlowTable::new()),
            closing: self.hard_stop.child_token(),
            tracker,
        };
        // One byte more than the limit, so an oversized datagram is seen as such instead of
        // being silently cut to the limit.
        let mut buf = vec![0u8; self.config.max_datagram.saturating_add(1)];
        let mut backoff = Duration::from_millis(5);
        loop {
            let received = tokio::select! {
                _ = stop.cancelled() => break,
                _ = listener.closing.cancelled() => break,
                r = listener.socket.recv_from(&mut buf) => r,
            };
            match received {
                Ok((n, agent)) => {
                    backoff = Duration::from_millis(5);
                    self.forward(&listener, agent, &buf[..n]);
                }
                Err(e) => {
                    // Nothing here is specific to one agent; a persistent error must not spin.
                    tracing::warn!(listener = %self.name, error = %e, "receive failed; retrying in {backoff:?}");
                    tokio::select! {
                        _ = stop.cancelled() => break,
                        _ = listener.closing.cancelled() => break,
                        _ = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                }
            }
        }
        listener.closing.cancel();
        tracing::info!(listener = %self.name, "stopped receiving");
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// Routes one agent datagram: to its flow, or to a new one.
    fn forward(self: &Arc<Self>, listener: &Listener, agent: SocketAddr, datagram: &[u8]) {
        if datagram.len() > self.config.max_datagram {
            self.stats.reject(Rejection::TooLong);
            if let Some(held) = self.bad_log.allow(self.now_ms()) {
                tracing::warn!(listener = %self.name, client = %agent, len = datagram.len(),
                    max = self.config.max_datagram, held_back = held, "dropping oversized datagram");
            }
            return;
        }
        let agent_id = match Envelope::parse(datagram) {
            Ok(env) => env.agent_id(),
            Err(e) => {
                self.stats.reject(Rejection::BadEnvelope);
                if let Some(held) = self.bad_log.allow(self.now_ms()) {
                    tracing::warn!(listener = %self.name, client = %agent, held_back = held,
                        "dropping datagram that is not a Wazuh message: {e}");
                }
                return;
            }
        };
        let now_ms = self.now_ms();
        // Touched under the table's shard lock, so an expiring flow either sees this datagram
        // and stays, or is already gone and a new flow is opened.
        let existing = listener.table.get(&agent).map(|f| {
            if agent_id.is_none() || f.agent_id == agent_id {
                f.last_ms.fetch_max(now_ms, Ordering::Relaxed);
            }
            Arc::clone(f.value())
        });
        if let Some(flow) = existing {
            if agent_id.is_none() || flow.agent_id == agent_id {
                if self.send_up(&flow, datagram) {
                    return;
                }
                // Refused: the manager is marked failed; one more try on a fresh flow.
            } else {
                tracing::info!(listener = %self.name, client = %agent, backend = %flow.backend,
                    "another agent ID from this address; opening a new flow");
                listener
                    .table
                    .remove_if(&agent, |_, f| Arc::ptr_eq(f, &flow));
                flow.close(FlowEnd::Replaced);
            }
        }
        if let Some(flow) = self.open_flow(listener, agent, agent_id, now_ms) {
            self.send_up(&flow, datagram);
        }
    }

    /// Sends one datagram on a flow's upstream socket. `false` when the manager refused it
    /// (the flow is then closed and the manager marked failed).
    fn send_up(&self, flow: &Flow, datagram: &[u8]) -> bool {
        // A plain non-blocking send, not `try_send`: tokio's cached readiness says "not
        // writable" until the reactor has polled a new socket once, which would drop every
        // flow's first datagram. A full buffer drops the datagram either way (never waited on).
        match socket2::SockRef::from(&flow.upstream).send(datagram) {
            Ok(n) => {
                flow.datagrams_up.fetch_add(1, Ordering::Relaxed);
                flow.bytes_up.fetch_add(n as u64, Ordering::Relaxed);
                self.stats.record(true, 1, n as u64);
                true
            }
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                self.stats.connect_failures.fetch_add(1, Ordering::Relaxed);
                flow.balancer
                    .report_failure(flow.index, std::time::Instant::now());
                flow.close(FlowEnd::Refused);
                false
            }
            Err(e) => {
                // UDP is lossy by nature; the agent resends what matters.
                self.flow_stats
                    .send_failures
                    .fetch_add(1, Ordering::Relaxed);
                if let Some(held) = self.send_log.allow(self.now_ms()) {
                    tracing::warn!(listener = %self.name, backend = %flow.backend, held_back = held,
                        "could not send a datagram to the manager: {e}");
                }
                true
            }
        }
    }

    /// Opens a flow for `agent` to the best available manager and starts its task.
    fn open_flow(
        self: &Arc<Self>,
        listener: &Listener,
        agent: SocketAddr,
        agent_id: Option<AgentId>,
        now_ms: u64,
    ) -> Option<Arc<Flow>> {
        self.stats.accepted.fetch_add(1, Ordering::Relaxed);
        if self.flows() >= self.config.max_flows {
            self.flow_stats
                .flows_refused
                .fetch_add(1, Ordering::Relaxed);
            if let Some(held) = self.refused_log.allow(now_ms) {
                tracing::warn!(listener = %self.name, client = %agent, max_flows = self.config.max_flows,
                    held_back = held, "dropping datagram: too many flows open");
            }
            return None;
        }
        let admitted = match self
            .admission
            .admit(agent.ip().to_canonical(), std::time::Instant::now())
        {
            Ok(a) => a,
            Err(why) => {
                self.stats.reject(Rejection::SourceLimit);
                if let Some(held) = self.refused_log.allow(now_ms) {
                    tracing::warn!(listener = %self.name, client = %agent, held_back = held,
                        "dropping datagram: no new flow for this address: {why}");
                }
                return None;
            }
        };
        let key = agent_id.map_or(BalanceKey::Source(agent.ip()), BalanceKey::Agent);
        let balancer = self.balancer.load_full();
        let mut opened = None;
        let mut socket_error = None;
        for idx in balancer.candidates(&key, std::time::Instant::now()) {
            let Some(backend) = balancer.backends().get(idx).map(|b| b.addr()) else {
                continue;
            };
            match upstream_socket(backend) {
                Ok(sock) => {
                    opened = Some((idx, backend, sock));
                    break;
                }
                Err(e) => {
                    self.stats.connect_failures.fetch_add(1, Ordering::Relaxed);
                    // Nothing was sent: never the manager's fault. Logged once below.
                    socket_error = Some(e);
                }
            }
        }
        let Some((index, backend, upstream)) = opened else {
            let out_of_sockets = socket_error
                .as_ref()
                .is_some_and(crate::balance::out_of_sockets);
            self.stats.reject(if out_of_sockets {
                Rejection::OutOfSockets
            } else {
                Rejection::NoBackend
            });
            if let Some(held) = self.refused_log.allow(now_ms) {
                match socket_error {
                    Some(e) => {
                        tracing::warn!(listener = %self.name, client = %agent, held_back = held,
                        "dropping datagram: could not open an upstream socket: {e}")
                    }
                    None => {
                        tracing::warn!(listener = %self.name, client = %agent, held_back = held,
                        "dropping datagram: no manager available")
                    }
                }
            }
            return None;
        };
        let flow = Arc::new(Flow {
            agent_id,
            upstream,
            backend,
            index,
            _guard: balancer.open(index),
            _admitted: admitted,
            balancer,
            last_ms: AtomicU64::new(now_ms),
            answered: AtomicBool::new(false),
            datagrams_up: AtomicU64::new(0),
            datagrams_down: AtomicU64::new(0),
            bytes_up: AtomicU64::new(0),
            bytes_down: AtomicU64::new(0),
            closed: listener.closing.child_token(),
            why: OnceLock::new(),
        });
        self.stats.active.fetch_add(1, Ordering::Relaxed);
        self.stats.sessions.fetch_add(1, Ordering::Relaxed);
        if let Some(old) = listener.table.insert(agent, Arc::clone(&flow)) {
            // Only reachable if a flow was inserted between the lookup and here; keep one.
            old.close(FlowEnd::Replaced);
        }
        let upstream_port = flow.upstream.local_addr().map(|a| a.port()).unwrap_or(0);
        match agent_id {
            Some(id) => tracing::info!(listener = %self.name, agent = %id, client = %agent,
                backend = %backend, upstream_port, "flow opened"),
            None => tracing::info!(listener = %self.name, client = %agent, backend = %backend,
                upstream_port, "flow opened"),
        }
        listener.tracker.spawn(Arc::clone(self).run_flow(
            Arc::clone(&listener.socket),
            Arc::clone(&listener.table),
            agent,
            Arc::clone(&flow),
        ));
        Some(flow)
    }

    /// Carries a flow's replies to its agent until the flow ends.
    async fn run_flow(
        self: Arc<Self>,
        socket: Arc<UdpSocket>,
        table: Arc<FlowTable>,
        agent: SocketAddr,
        flow: Arc<Flow>,
    ) {
        let end = self.flow_loop(&socket, &table, agent, &flow).await;
        table.remove_if(&agent, |_, f| Arc::ptr_eq(f, &flow));
        self.stats.active.fetch_sub(1, Ordering::Relaxed);
        if end == FlowEnd::Idle {
            self.flow_stats
                .flows_expired
                .fetch_add(1, Ordering::Relaxed);
        }
        let (datagrams_up, datagrams_down) = (
            flow.datagrams_up.load(Ordering::Relaxed),
            flow.datagrams_down.load(Ordering::Relaxed),
        );
        let (bytes_up, bytes_down) = (
            flow.bytes_up.load(Ordering::Relaxed),
            flow.bytes_down.load(Ordering::Relaxed),
        );
        match flow.agent_id {
            Some(id) => tracing::info!(listener = %self.name, agent = %id, client = %agent,
                backend = %flow.backend, datagrams_up, datagrams_down, bytes_up, bytes_down,
                reason = %end, "flow closed"),
            None => tracing::info!(listener = %self.name, client = %agent, backend = %flow.backend,
                datagrams_up, datagrams_down, bytes_up, bytes_down, reason = %end, "flow closed"),
        }
    }

    async fn flow_loop(
        &self,
        socket: &UdpSocket,
        table: &FlowTable,
        agent: SocketAddr,
        flow: &Arc<Flow>,
    ) -> FlowEnd {
        let idle = self.config.idle_timeout;
        let last = |f: &Flow| self.epoch + Duration::from_millis(f.last_ms.load(Ordering::Relaxed));
        let sleep = tokio::time::sleep_until(last(flow) + idle);
        tokio::pin!(sleep);
        loop {
            tokio::select! {
                _ = flow.closed.cancelled() => {
                    return flow.why.get().copied().unwrap_or(FlowEnd::Shutdown);
                }
                _ = &mut sleep => {
                    // Checked again under the table's lock: a datagram touching the flow
                    // concurrently keeps it open.
                    let expired = |f: &Arc<Flow>| Arc::ptr_eq(f, flow) && Instant::now() >= last(f) + idle;
                    if table.remove_if(&agent, |_, f| expired(f)).is_some() {
                        return FlowEnd::Idle;
                    }
                    if !table.get(&agent).is_some_and(|f| Arc::ptr_eq(f.value(), flow)) {
                        // Replaced in the table already; its closer sets the reason.
                        return flow.why.get().copied().unwrap_or(FlowEnd::Replaced);
                    }
                    sleep.as_mut().reset(last(flow) + idle);
                }
                r = flow.upstream.readable() => {
                    if let Err(e) = r {
                        tracing::warn!(listener = %self.name, client = %agent, backend = %flow.backend,
                            "upstream socket failed: {e}");
                        return FlowEnd::Io;
                    }
                    if let Some(end) = self.drain_replies(socket, agent, flow).await {
                        return end;
                    }
                }
            }
        }
    }

    /// Reads every reply waiting on the flow's socket and sends each to the agent.
    async fn drain_replies(
        &self,
        socket: &UdpSocket,
        agent: SocketAddr,
        flow: &Flow,
    ) -> Option<FlowEnd> {
        // Allocated per wake-up, so an idle flow holds no buffer.
        let mut buf = BytesMut::with_capacity(self.config.max_datagram.saturating_add(1));
        loop {
            buf.clear();
            match flow.upstream.try_recv_buf(&mut buf) {
                Ok(n) => {
                    if !flow.answered.swap(true, Ordering::Relaxed) {
                        flow.balancer.report_success(flow.index);
                    }
                    flow.last_ms.fetch_max(self.now_ms(), Ordering::Relaxed);
                    if let Some(why) = self.check_reply(&buf[..n]) {
                        self.stats.reject(Rejection::ManagerProtocol);
                        if let Some(held) = self.manager_log.allow(self.now_ms()) {
                            tracing::warn!(listener = %self.name, client = %agent, backend = %flow.backend,
                                held_back = held, "dropping manager datagram: {why}");
                        }
                        continue;
                    }
                    match socket.send_to(&buf[..n], agent).await {
                        Ok(sent) => {
                            flow.datagrams_down.fetch_add(1, Ordering::Relaxed);
                            flow.bytes_down.fetch_add(sent as u64, Ordering::Relaxed);
                            self.stats.record(false, 1, sent as u64);
                        }
                        Err(e) => {
                            self.flow_stats
                                .send_failures
                                .fetch_add(1, Ordering::Relaxed);
                            if let Some(held) = self.send_log.allow(self.now_ms()) {
                                tracing::warn!(listener = %self.name, client = %agent, held_back = held,
                                    "could not send a datagram to the agent: {e}");
                            }
                        }
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return None,
                Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                    // ICMP port unreachable for something sent earlier: nobody listens there.
                    self.stats.connect_failures.fetch_add(1, Ordering::Relaxed);
                    flow.balancer
                        .report_failure(flow.index, std::time::Instant::now());
                    tracing::warn!(listener = %self.name, client = %agent, backend = %flow.backend,
                        "manager port unreachable; the agent's next datagram picks another manager");
                    return Some(FlowEnd::Refused);
                }
                Err(e) => {
                    tracing::warn!(listener = %self.name, client = %agent, backend = %flow.backend,
                        "receive from manager failed: {e}");
                    return Some(FlowEnd::Io);
                }
            }
        }
    }

    /// Why a manager datagram must not reach the agent, if it must not.
    fn check_reply(&self, datagram: &[u8]) -> Option<&'static str> {
        if datagram.len() > self.config.max_datagram {
            return Some("oversized");
        }
        // Managers never prefix an ID; anything but a tagged ciphertext or #pong would only
        // make the agent log an error.
        match Envelope::parse(datagram) {
            Ok(Envelope::Secure { agent_id: None, .. }) | Ok(Envelope::Pong) => None,
            Ok(_) => Some("agent ID prefix or #ping on a manager datagram"),
            Err(e) => Some(e.reason()),
        }
    }
}

/// A socket of its own for one flow, connected to `backend`: the kernel picks a distinct
/// source port and delivers only that manager's datagrams to it.
fn upstream_socket(backend: SocketAddr) -> io::Result<UdpSocket> {
    let local: SocketAddr = if backend.is_ipv4() {
        (Ipv4Addr::UNSPECIFIED, 0).into()
    } else {
        (Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let sock = std::net::UdpSocket::bind(local)?;
    sock.connect(backend)?;
    sock.set_nonblocking(true)?;
    UdpSocket::from_std(sock)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_documented_values() {
        let c = UdpRelayConfig::default();
        assert_eq!(c.idle_timeout, Duration::from_secs(120));
        assert_eq!(c.max_datagram, 65536);
        assert_eq!(c.max_flows, 16_384);
    }
}
