//! The one shape every listener kind has: a balancer that a reload or the operator replaces,
//! sessions that a drain closes, counters, and an accept loop on a bound socket.
//!
//! Adding a kind: implement [`Listener`] for its relay, add a variant to [`ListenerHandle`]
//! (and to the `dispatch!` below), and one to
//! [`ListenerSettings`](super::ListenerSettings) with its `build` arm. Nothing else in the
//! proxy or the binary names kinds.

use std::future::Future;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::balance::Balancer;
#[cfg(feature = "enroll")]
use crate::enroll::EnrollFront;
use crate::relay::AgentRelay;
use crate::stats::RelayStats;
use crate::tcp::TcpRelay;
use crate::udp::UdpRelay;

/// What a listener carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ListenerKind {
    /// Wazuh agents over TCP (1514), relayed frame by frame.
    Agent,
    /// Wazuh agents over UDP (1514), relayed datagram by datagram.
    Udp,
    /// Any TCP service, relayed byte by byte (the API, enrollment without inspection).
    Tcp,
    /// Agent enrollment (1515), TLS terminated here.
    Enroll,
}

impl ListenerKind {
    /// The kind as written in configurations, logs and metrics.
    pub fn name(self) -> &'static str {
        match self {
            ListenerKind::Agent => "agent",
            ListenerKind::Udp => "udp",
            ListenerKind::Tcp => "tcp",
            ListenerKind::Enroll => "enroll",
        }
    }

    /// Whether the listener's socket is UDP.
    pub fn is_udp(self) -> bool {
        self == ListenerKind::Udp
    }

    /// Kinds that carry agents' events: a node that cannot reach a manager for them must not
    /// hold the virtual address.
    pub fn is_agent_facing(self) -> bool {
        matches!(self, ListenerKind::Agent | ListenerKind::Udp)
    }
}

impl std::fmt::Display for ListenerKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// A bound listening socket, of the transport its kind uses.
#[derive(Debug)]
pub enum BoundSocket {
    /// A TCP listener.
    Tcp(tokio::net::TcpListener),
    /// A UDP socket.
    Udp(tokio::net::UdpSocket),
}

/// What every listener kind offers the proxy.
pub trait Listener: Send + Sync + 'static {
    /// Its kind.
    const KIND: ListenerKind;
    /// The backend set in force.
    fn balancer(&self) -> Arc<Balancer>;
    /// Replaces the backend set (reload, re-resolution); live sessions stay.
    fn set_balancer(&self, balancer: Balancer);
    /// Closes every session now (the end of a drain).
    fn close_all(&self);
    /// Sessions (connections, flows) open now.
    fn open_sessions(&self) -> usize;
    /// Relay counters; `None` for a kind that counts outcomes its own way (enrollment).
    fn relay_stats(&self) -> Option<&RelayStats>;
    /// Serves `socket` until `stop`, each session on `tracker`. A socket of the wrong
    /// transport is dropped with an error log (the proxy binds by [`ListenerKind::is_udp`]).
    fn serve(
        self: Arc<Self>,
        socket: BoundSocket,
        stop: CancellationToken,
        tracker: TaskTracker,
    ) -> impl Future<Output = ()> + Send + 'static;
}

fn wrong_transport(kind: ListenerKind) {
    tracing::error!(%kind, "listener given a socket of the wrong transport; not serving");
}

impl Listener for AgentRelay {
    const KIND: ListenerKind = ListenerKind::Agent;
    fn balancer(&self) -> Arc<Balancer> {
        AgentRelay::balancer(self)
    }
    fn set_balancer(&self, balancer: Balancer) {
        AgentRelay::set_balancer(self, balancer)
    }
    fn close_all(&self) {
        AgentRelay::close_all(self)
    }
    fn open_sessions(&self) -> usize {
        self.sessions().len()
    }
    fn relay_stats(&self) -> Option<&RelayStats> {
        Some(self.stats())
    }
    async fn serve(
        self: Arc<Self>,
        socket: BoundSocket,
        stop: CancellationToken,
        tracker: TaskTracker,
    ) {
        match socket {
            BoundSocket::Tcp(l) => AgentRelay::serve(self, l, stop, tracker).await,
            BoundSocket::Udp(_) => wrong_transport(Self::KIND),
        }
    }
}

impl Listener for TcpRelay {
    const KIND: ListenerKind = ListenerKind::Tcp;
    fn balancer(&self) -> Arc<Balancer> {
        TcpRelay::balancer(self)
    }
    fn set_balancer(&self, balancer: Balancer) {
        TcpRelay::set_balancer(self, balancer)
    }
    fn close_all(&self) {
        TcpRelay::close_all(self)
    }
    fn open_sessions(&self) -> usize {
        usize::try_from(self.stats().active.load(Ordering::Relaxed)).unwrap_or(0)
    }
    fn relay_stats(&self) -> Option<&RelayStats> {
        Some(self.stats())
    }
    async fn serve(
        self: Arc<Self>,
        socket: BoundSocket,
        stop: CancellationToken,
        tracker: TaskTracker,
    ) {
        match socket {
            BoundSocket::Tcp(l) => TcpRelay::serve(self, l, stop, tracker).await,
            BoundSocket::Udp(_) => wrong_transport(Self::KIND),
        }
    }
}

impl Listener for UdpRelay {
    const KIND: ListenerKind = ListenerKind::Udp;
    fn balancer(&self) -> Arc<Balancer> {
        UdpRelay::balancer(self)
    }
    fn set_balancer(&self, balancer: Balancer) {
        UdpRelay::set_balancer(self, balancer)
    }
    fn close_all(&self) {
        UdpRelay::close_all(self)
    }
    fn open_sessions(&self) -> usize {
        self.flows()
    }
    fn relay_stats(&self) -> Option<&RelayStats> {
        Some(self.stats())
    }
    async fn serve(
        self: Arc<Self>,
        socket: BoundSocket,
        stop: CancellationToken,
        tracker: TaskTracker,
    ) {
        match socket {
            BoundSocket::Udp(s) => UdpRelay::serve(self, s, stop, tracker).await,
            BoundSocket::Tcp(_) => wrong_transport(Self::KIND),
        }
    }
}

#[cfg(feature = "enroll")]
impl Listener for EnrollFront {
    const KIND: ListenerKind = ListenerKind::Enroll;
    fn balancer(&self) -> Arc<Balancer> {
        EnrollFront::balancer(self)
    }
    fn set_balancer(&self, balancer: Balancer) {
        EnrollFront::set_balancer(self, balancer)
    }
    fn close_all(&self) {
        // An enrollment is one short exchange: the drain timeout bounds it.
    }
    fn open_sessions(&self) -> usize {
        self.active()
    }
    fn relay_stats(&self) -> Option<&RelayStats> {
        None
    }
    async fn serve(
        self: Arc<Self>,
        socket: BoundSocket,
        stop: CancellationToken,
        tracker: TaskTracker,
    ) {
        match socket {
            BoundSocket::Tcp(l) => EnrollFront::serve(self, l, stop, tracker).await,
            BoundSocket::Udp(_) => wrong_transport(Self::KIND),
        }
    }
}

/// A running listener of any kind: the trait's methods without naming the kind, and typed
/// access (`if let ListenerHandle::Agent(relay) = ...`) for what only one kind has (agent
/// sessions, UDP flow counters, kept enrollment replies). Cloning is cheap.
#[derive(Debug, Clone)]
pub enum ListenerHandle {
    /// An agent relay.
    Agent(Arc<AgentRelay>),
    /// A plain TCP relay.
    Tcp(Arc<TcpRelay>),
    /// A UDP agent relay.
    Udp(Arc<UdpRelay>),
    /// An enrollment front.
    #[cfg(feature = "enroll")]
    Enroll(Arc<EnrollFront>),
}

/// Runs `$body` with `$r` bound to the listener inside `$handle`, whatever its kind: the one
/// place that lists the variants.
macro_rules! dispatch {
    ($handle:expr, $r:ident => $body:expr) => {
        match $handle {
            ListenerHandle::Agent($r) => $body,
            ListenerHandle::Tcp($r) => $body,
            ListenerHandle::Udp($r) => $body,
            #[cfg(feature = "enroll")]
            ListenerHandle::Enroll($r) => $body,
        }
    };
}

/// The kind of a listener type, for generic code.
fn kind_of<L: Listener>(_: &Arc<L>) -> ListenerKind {
    L::KIND
}

impl ListenerHandle {
    /// Its kind.
    pub fn kind(&self) -> ListenerKind {
        dispatch!(self, r => kind_of(r))
    }
    /// The backend set in force.
    pub fn balancer(&self) -> Arc<Balancer> {
        dispatch!(self, r => Listener::balancer(&**r))
    }
    /// Replaces the backend set; live sessions stay.
    pub fn set_balancer(&self, balancer: Balancer) {
        dispatch!(self, r => Listener::set_balancer(&**r, balancer))
    }
    /// Closes every session now.
    pub fn close_all(&self) {
        dispatch!(self, r => Listener::close_all(&**r))
    }
    /// Sessions (connections, flows) open now.
    pub fn open_sessions(&self) -> usize {
        dispatch!(self, r => Listener::open_sessions(&**r))
    }
    /// Relay counters (`None` for enrollment).
    pub fn stats(&self) -> Option<&RelayStats> {
        dispatch!(self, r => Listener::relay_stats(&**r))
    }
    /// The agent relay, when this is one.
    pub fn as_agent(&self) -> Option<&Arc<AgentRelay>> {
        match self {
            ListenerHandle::Agent(r) => Some(r),
            _ => None,
        }
    }
    /// The enrollment front, when this is one.
    #[cfg(feature = "enroll")]
    pub fn as_enroll(&self) -> Option<&Arc<EnrollFront>> {
        match self {
            ListenerHandle::Enroll(f) => Some(f),
            _ => None,
        }
    }
    /// Starts serving `socket` on `tracker` until `stop`.
    pub(crate) fn spawn_serve(
        &self,
        socket: BoundSocket,
        stop: CancellationToken,
        tracker: &TaskTracker,
    ) {
        let t = tracker.clone();
        dispatch!(self, r => drop(tracker.spawn(Listener::serve(r.clone(), socket, stop, t))))
    }
}
