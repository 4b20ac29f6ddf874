//! A whole proxy: every listener of a [`ProxyConfig`], bound (or adopted from a previous
//! process) and serving, with reload, drain, operator actions and hand-over.
//!
//! ```no_run
//! # async fn run() -> Result<(), wazuh_proxy_core::proxy::ProxyError> {
//! use wazuh_proxy_core::proxy::{ListenerConfig, Proxy, ProxyConfig};
//! let managers = ["10.0.0.11:1514".parse().unwrap(), "10.0.0.12:1514".parse().unwrap()];
//! let agents = ListenerConfig::agent("agents", "0.0.0.0:1514".parse().unwrap(), &managers);
//! let mut proxy = Proxy::start(ProxyConfig::new(vec![agents])).await?;
//! let _ = tokio::signal::ctrl_c().await;
//! proxy.drain().await;
//! # Ok(()) }
//! ```
//!
//! - [`config`](ProxyConfig): what it runs, typed per listener kind.
//! - [`listener`]: the trait every kind implements and the handle the proxy keeps.
//! - [`reload`]: the diff of two configurations, every setting classified.
//! - [`view`](ProxyView): the narrow view the admin API and hand-over read.
//! - [`state`](OperatorState): the operator's decisions (drained backends), apart from the
//!   configuration, kept across reloads and upgrades.
//! - [`handover`]: moving listeners and sessions to a successor process.

mod config;
pub mod handover;
pub mod listener;
pub mod reload;
pub mod state;
mod view;

use std::net::SocketAddr;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::balance::{BalanceError, Balancer};
use crate::keys::{KeyStore, KeysError};
use crate::net;
use crate::relay::AgentRelay;
use crate::tcp::TcpRelay;
use crate::udp::UdpRelay;

pub use self::config::{
    AgentSettings, KeysFile, ListenerConfig, ListenerSettings, ProxyConfig, Rebalance,
    DEFAULT_BATCH_WINDOW, DEFAULT_DRAIN_TIMEOUT,
};
pub use self::handover::{Inheritance, InheritedListener};
pub use self::listener::{BoundSocket, Listener, ListenerHandle, ListenerKind};
pub use self::reload::{Applies, Change, ReloadPlan};
pub use self::state::{Forgotten, ListenerState, OperatorState};
pub use self::view::{ListenerEntry, OperatorError, ProxyView};

/// Why a listener could not start (at start or reload).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ProxyError {
    /// A listener could not bind its address (or use the socket it inherited).
    #[error("listener {name:?}: cannot bind {addr}: {source}")]
    Bind {
        /// Listener name.
        name: String,
        /// Its address.
        addr: SocketAddr,
        /// The cause.
        source: std::io::Error,
    },
    /// client.keys could not be read.
    #[error("listener {name:?}: {source}")]
    Keys {
        /// Listener name.
        name: String,
        /// The cause.
        source: KeysError,
    },
    /// A backend set was refused.
    #[error("listener {name:?}: {source}")]
    Backends {
        /// Listener name.
        name: String,
        /// The cause.
        source: BalanceError,
    },
    /// The enrollment front could not start (certificates, TLS settings).
    #[cfg(feature = "enroll")]
    #[error("listener {name:?}: {source}")]
    Enroll {
        /// Listener name.
        name: String,
        /// The cause.
        source: crate::enroll::EnrollError,
    },
    /// Two listeners have the same name.
    #[error("two listeners are named {0:?}")]
    DuplicateName(String),
}

/// One bound listener.
struct BoundListener {
    config: ListenerConfig,
    /// The address bound (the configured one, with the port the system chose for port 0).
    bound: SocketAddr,
    handle: ListenerHandle,
    /// Stops this listener's accept loop and upkeep (a child of the proxy's `stop_accepting`).
    stop: CancellationToken,
    /// A duplicate of the listening socket, handed to a successor on upgrade and used to
    /// accept again after a failed one (dropped when the drain starts).
    socket: Option<OwnedFd>,
}

/// Every listener of a configuration, bound and serving.
pub struct Proxy {
    live: Vec<BoundListener>,
    stop_accepting: CancellationToken,
    tracker: TaskTracker,
    drain_timeout: Duration,
    batch_window: Duration,
}

impl std::fmt::Debug for Proxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Proxy")
            .field(
                "listeners",
                &self.live.iter().map(|l| &l.config.name).collect::<Vec<_>>(),
            )
            .field("drain_timeout", &self.drain_timeout)
            .finish_non_exhaustive()
    }
}

impl Proxy {
    /// Binds every listener and starts serving.
    ///
    /// # Errors
    /// When a listener cannot start; those already started stop again.
    pub async fn start(config: ProxyConfig) -> Result<Proxy, ProxyError> {
        Proxy::start_with(config, Inheritance::default()).await
    }

    /// Like [`Proxy::start`], serving on sockets inherited from a previous process where the
    /// name, address and transport match (the others are bound anew), with the operator's
    /// state of that process (its drains) applied before anything is accepted, as far as
    /// this configuration has room for it ([`OperatorState::retain_for`]; what it forgets is
    /// logged).
    ///
    /// # Errors
    /// When a listener cannot start; those already started stop again.
    pub async fn start_with(
        config: ProxyConfig,
        inherited: Inheritance,
    ) -> Result<Proxy, ProxyError> {
        check_names(&config)?;
        crate::pace::set_window(config.batch_window);
        let Inheritance {
            listeners: mut inherited,
            mut state,
        } = inherited;
        for f in state.retain_for(&config) {
            tracing::warn!("upgrade: {f}");
        }
        let stop_accepting = CancellationToken::new();
        let tracker = TaskTracker::new();
        let mut live: Vec<BoundListener> = Vec::new();
        for l in config.listeners {
            let udp = l.kind().is_udp();
            let socket = inherited
                .iter()
                .position(|i| i.name == l.name && i.addr == l.listen && i.udp == udp)
                .map(|at| inherited.swap_remove(at).socket);
            let drained = state.drained_on(&l.name);
            match start_listener(l, stop_accepting.child_token(), &tracker, socket, &drained) {
                Ok(l) => live.push(l),
                Err(e) => {
                    stop_accepting.cancel();
                    return Err(e);
                }
            }
        }
        Ok(Proxy {
            live,
            stop_accepting,
            tracker,
            drain_timeout: config.drain_timeout,
            batch_window: config.batch_window,
        })
    }

    /// The configuration in force: what the listeners run with (after a reload, the
    /// settings it could not apply keep their old values).
    pub fn config(&self) -> ProxyConfig {
        ProxyConfig {
            listeners: self.live.iter().map(|l| l.config.clone()).collect(),
            drain_timeout: self.drain_timeout,
            batch_window: self.batch_window,
        }
    }

    /// The address listener `name` is bound to: its configured address, with the port the
    /// system chose when that was 0.
    pub fn local_addr(&self, name: &str) -> Option<SocketAddr> {
        self.live
            .iter()
            .find(|l| l.config.name == name)
            .map(|l| l.bound)
    }

    /// The running listeners, in configuration order.
    pub fn listeners(&self) -> impl Iterator<Item = (&ListenerConfig, &ListenerHandle)> {
        self.live.iter().map(|l| (&l.config, &l.handle))
    }

    /// A view of the running listeners for the admin API and operator actions; take a new
    /// one after a reload.
    pub fn view(&self) -> ProxyView {
        ProxyView::new(
            self.live
                .iter()
                .map(|l| ListenerEntry {
                    name: l.config.name.clone(),
                    listen: l.config.listen,
                    handle: l.handle.clone(),
                })
                .collect(),
            self.stop_accepting.clone(),
        )
    }

    /// The operator's decisions in force (the backends drained by hand), read from the
    /// running listeners: what a successor process receives on an upgrade.
    pub fn operator_state(&self) -> OperatorState {
        operator_state(
            self.live
                .iter()
                .map(|l| (l.config.name.as_str(), &l.handle)),
        )
    }

    /// The task tracker every session runs on (embedders may run their own tasks on it so
    /// that a drain waits for them).
    pub fn tracker(&self) -> &TaskTracker {
        &self.tracker
    }

    /// The drain timeout in force.
    pub fn drain_timeout(&self) -> Duration {
        self.drain_timeout
    }

    /// Cancelled once the proxy stops accepting new connections (a drain or a hand-over
    /// has begun).
    pub fn stop_accepting(&self) -> CancellationToken {
        self.stop_accepting.clone()
    }

    /// Applies a new configuration without dropping anything established: listeners that
    /// stay (same name, address and kind) get the new backend set (passive-health state
    /// carried over); new ones are bound; removed ones stop accepting while their sessions
    /// run on. All or nothing: every new backend set is built and every new listener bound
    /// before anything running changes. Returns what changed; the settings classified
    /// [`Applies::AfterUpgrade`] keep their running values.
    ///
    /// The operator's state is kept as far as the new configuration has room for it
    /// ([`OperatorState::retain_for`]): a listener keeps its drains under the same name (also
    /// at a new address), a listener removed forgets them, and so does a backend no longer
    /// in its set (added back later, it is in rotation). What is forgotten is logged.
    ///
    /// # Errors
    /// When a new listener cannot start or a backend set is refused; the running
    /// configuration is then untouched.
    pub async fn reload(&mut self, config: ProxyConfig) -> Result<ReloadPlan, ProxyError> {
        check_names(&config)?;
        let plan = reload::diff(&self.config(), &config);
        let mut state = self.operator_state();
        let forgotten = state.retain_for(&config);
        // 1. Everything that can fail, first.
        let mut balancers = Vec::new();
        for x in &self.live {
            if let Some(l) = config
                .listeners
                .iter()
                .find(|l| reload::same_listener(&x.config, l))
            {
                let b = Balancer::new(l.balance, l.backends.clone()).map_err(|source| {
                    ProxyError::Backends {
                        name: l.name.clone(),
                        source,
                    }
                })?;
                balancers.push(Some((b, l.balance, l.backends.clone())));
            } else {
                balancers.push(None);
            }
        }
        let mut added = Vec::new();
        for l in &config.listeners {
            if self
                .live
                .iter()
                .any(|x| reload::same_listener(&x.config, l))
            {
                continue;
            }
            match start_listener(
                l.clone(),
                self.stop_accepting.child_token(),
                &self.tracker,
                None,
                &state.drained_on(&l.name),
            ) {
                Ok(live) => added.push(live),
                Err(e) => {
                    for a in &added {
                        a.stop.cancel();
                    }
                    return Err(e);
                }
            }
        }
        // 2. Nothing fails from here: swap.
        let mut kept = Vec::new();
        for (mut x, next) in self.live.drain(..).zip(balancers) {
            match next {
                Some((balancer, balance, backends)) => {
                    x.handle.set_balancer(balancer);
                    if let Some(relay) = x.handle.as_agent() {
                        // Only drains of backends gone from the set are dropped: the
                        // balancer just built is the same either way.
                        relay.restore_drained(&state.drained_on(&x.config.name));
                    }
                    tracing::info!(listener = %x.config.name, backends = backends.len(), balance = %balance, "reload: backends updated");
                    x.config.balance = balance;
                    x.config.backends = backends;
                    kept.push(x);
                }
                None => {
                    tracing::info!(listener = %x.config.name, address = %x.config.listen,
                        "reload: listener removed; it stops accepting, its sessions run on");
                    x.stop.cancel();
                }
            }
        }
        for a in &added {
            tracing::info!(listener = %a.config.name, address = %a.config.listen, "reload: listener added");
        }
        for f in &forgotten {
            tracing::info!("reload: {f}");
        }
        kept.extend(added);
        // Keep the configuration's order.
        kept.sort_by_key(|x| {
            config
                .listeners
                .iter()
                .position(|l| l.name == x.config.name)
                .unwrap_or(usize::MAX)
        });
        self.live = kept;
        self.drain_timeout = config.drain_timeout;
        self.batch_window = config.batch_window;
        crate::pace::set_window(config.batch_window);
        Ok(plan)
    }

    /// Accepts again on every listener after a hand-over to a successor failed (the
    /// successor died or broke the protocol after it said it was ready): each accept loop
    /// starts again on this process's own copy of its listening socket, with its health
    /// checks, rebalancing and client.keys watch. UDP flows ended when receiving stopped;
    /// agents' next datagrams open new ones.
    pub fn resume_accepting(&mut self) {
        self.stop_accepting = CancellationToken::new();
        for l in &mut self.live {
            let stop = self.stop_accepting.child_token();
            let Some(socket) = &l.socket else {
                continue;
            };
            let started = socket
                .try_clone()
                .and_then(|fd| adopt_socket(l.config.kind().is_udp(), fd));
            match started {
                Ok(bound) => {
                    l.handle.spawn_serve(bound, stop.clone(), &self.tracker);
                    spawn_upkeep(&l.config, &l.handle, &stop, &self.tracker);
                    if let (ListenerSettings::Agent(a), ListenerHandle::Agent(relay)) =
                        (&l.config.settings, &l.handle)
                    {
                        if let (Some(keys), Some(store)) = (&a.keys, relay.keys()) {
                            self.tracker.spawn(store.clone().watch(
                                keys.path.clone(),
                                keys.reload_every,
                                stop.clone(),
                            ));
                        }
                    }
                    l.stop = stop;
                    tracing::info!(listener = %l.config.name, address = %l.config.listen, "accepting again");
                }
                Err(e) => tracing::error!(listener = %l.config.name, error = %e,
                    "cannot accept again after the failed upgrade"),
            }
        }
    }

    /// Stops accepting, lets sessions finish for up to the drain timeout, then closes the
    /// rest. Logs `drained` when done.
    pub async fn drain(&mut self) {
        self.stop_accepting.cancel();
        for l in &mut self.live {
            l.socket = None;
        }
        self.tracker.close();
        let open = self.open_sessions();
        tracing::info!(sessions = open, timeout = ?self.drain_timeout, "draining: no new connections; waiting for sessions to end");
        if tokio::time::timeout(self.drain_timeout, self.tracker.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                sessions = self.open_sessions(),
                "drain timeout reached; closing the remaining sessions"
            );
            for l in &self.live {
                l.handle.close_all();
            }
            let _ = tokio::time::timeout(Duration::from_secs(5), self.tracker.wait()).await;
        }
        tracing::info!("drained");
    }

    /// Sessions open now, over every listener.
    pub fn open_sessions(&self) -> usize {
        self.live.iter().map(|l| l.handle.open_sessions()).sum()
    }

    /// The listening sockets, for a successor process: name, address, whether UDP.
    pub(crate) fn listener_sockets(&self) -> Vec<(String, SocketAddr, bool, &OwnedFd)> {
        self.live
            .iter()
            .filter_map(|l| {
                let socket = l.socket.as_ref()?;
                Some((
                    l.config.name.clone(),
                    l.config.listen,
                    l.config.kind().is_udp(),
                    socket,
                ))
            })
            .collect()
    }

    /// The agent relays.
    pub(crate) fn agent_relays(&self) -> Vec<Arc<AgentRelay>> {
        self.live
            .iter()
            .filter_map(|l| l.handle.as_agent().cloned())
            .collect()
    }

    /// Every enroll listener's front, by listener name.
    #[cfg(feature = "enroll")]
    pub(crate) fn enroll_fronts(&self) -> Vec<(String, Arc<crate::enroll::EnrollFront>)> {
        self.live
            .iter()
            .filter_map(|l| Some((l.config.name.clone(), l.handle.as_enroll()?.clone())))
            .collect()
    }
}

/// The operator's state of these listeners (drains exist on agent listeners only).
fn operator_state<'a>(
    listeners: impl Iterator<Item = (&'a str, &'a ListenerHandle)>,
) -> OperatorState {
    let mut state = OperatorState::new();
    for (name, handle) in listeners {
        if let Some(relay) = handle.as_agent() {
            state.set_listener(name, relay.drained().into_iter().collect());
        }
    }
    state
}

fn check_names(config: &ProxyConfig) -> Result<(), ProxyError> {
    for (i, l) in config.listeners.iter().enumerate() {
        if config.listeners[..i].iter().any(|o| o.name == l.name) {
            return Err(ProxyError::DuplicateName(l.name.clone()));
        }
    }
    Ok(())
}

/// A socket inherited (or duplicated) as a descriptor, ready for tokio.
fn adopt_socket(udp: bool, fd: OwnedFd) -> std::io::Result<BoundSocket> {
    if udp {
        let s = std::net::UdpSocket::from(fd);
        s.set_nonblocking(true)?;
        Ok(BoundSocket::Udp(tokio::net::UdpSocket::from_std(s)?))
    } else {
        let l = std::net::TcpListener::from(fd);
        l.set_nonblocking(true)?;
        Ok(BoundSocket::Tcp(tokio::net::TcpListener::from_std(l)?))
    }
}

/// Binds `l`'s address (or adopts the inherited socket), and keeps a duplicate of it.
fn bind(l: &ListenerConfig, inherited: Option<OwnedFd>) -> std::io::Result<(BoundSocket, OwnedFd)> {
    let udp = l.kind().is_udp();
    let bound = match inherited {
        Some(fd) => adopt_socket(udp, fd)?,
        None if udp => BoundSocket::Udp(net::bind_udp(l.listen)?),
        None => BoundSocket::Tcp(net::bind_tcp(l.listen, net::DEFAULT_BACKLOG)?),
    };
    let dup = match &bound {
        BoundSocket::Tcp(s) => s.as_fd().try_clone_to_owned()?,
        BoundSocket::Udp(s) => s.as_fd().try_clone_to_owned()?,
    };
    Ok((bound, dup))
}

/// Builds the relay of `l`'s kind (the one place that turns settings into a listener).
fn build(
    l: &ListenerConfig,
    balancer: Balancer,
    stop: &CancellationToken,
    tracker: &TaskTracker,
) -> Result<ListenerHandle, ProxyError> {
    Ok(match &l.settings {
        ListenerSettings::Agent(a) => {
            let mut relay = AgentRelay::new(l.name.clone(), a.relay.clone(), balancer);
            if let Some(keys) = &a.keys {
                let (store, problems) =
                    KeyStore::open(&keys.path).map_err(|source| ProxyError::Keys {
                        name: l.name.clone(),
                        source,
                    })?;
                for p in &problems {
                    tracing::warn!(listener = %l.name, file = %keys.path.display(), "client.keys: {p}");
                }
                tracing::info!(listener = %l.name, file = %keys.path.display(), agents = store.len(),
                    "verifying agents with client.keys");
                tracker.spawn(store.clone().watch(
                    keys.path.clone(),
                    keys.reload_every,
                    stop.clone(),
                ));
                relay = relay.with_keys(store);
            }
            ListenerHandle::Agent(Arc::new(relay))
        }
        ListenerSettings::Tcp(c) => {
            ListenerHandle::Tcp(Arc::new(TcpRelay::new(l.name.clone(), c.clone(), balancer)))
        }
        ListenerSettings::Udp(c) => {
            ListenerHandle::Udp(Arc::new(UdpRelay::new(l.name.clone(), c.clone(), balancer)))
        }
        #[cfg(feature = "enroll")]
        ListenerSettings::Enroll(c) => {
            if let crate::enroll::ServerCert::SelfSigned { cert, .. } = &c.server_cert {
                if let Some(dir) = cert.parent() {
                    // A failure shows as the front's own error on the certificate file.
                    let _ = std::fs::create_dir_all(dir);
                }
            }
            let front = crate::enroll::EnrollFront::new(c.clone(), balancer).map_err(|source| {
                ProxyError::Enroll {
                    name: l.name.clone(),
                    source,
                }
            })?;
            ListenerHandle::Enroll(Arc::new(front))
        }
    })
}

fn start_listener(
    l: ListenerConfig,
    stop: CancellationToken,
    tracker: &TaskTracker,
    inherited: Option<OwnedFd>,
    drained: &[SocketAddr],
) -> Result<BoundListener, ProxyError> {
    let balancer =
        Balancer::new(l.balance, l.backends.clone()).map_err(|source| ProxyError::Backends {
            name: l.name.clone(),
            source,
        })?;
    let (bound, socket) = bind(&l, inherited).map_err(|source| ProxyError::Bind {
        name: l.name.clone(),
        addr: l.listen,
        source,
    })?;
    let bound_addr = match &bound {
        BoundSocket::Tcp(s) => s.local_addr(),
        BoundSocket::Udp(s) => s.local_addr(),
    }
    .unwrap_or(l.listen);
    let handle = build(&l, balancer, &stop, tracker)?;
    if let (Some(relay), false) = (handle.as_agent(), drained.is_empty()) {
        // Operator state (from the previous process, or the listener this one replaces),
        // before anything is accepted.
        tracing::info!(listener = %l.name, ?drained, "backends stay drained");
        relay.restore_drained(drained);
    }
    #[cfg(feature = "enroll")]
    if let Some(front) = handle.as_enroll() {
        tracing::info!(listener = %l.name, address = %l.listen, kind = %l.kind(), balance = %l.balance,
            backends = l.backends.len(), certificate_sha256 = %front.fingerprint(), "listening (TLS terminated here)");
    }
    if handle.kind() != ListenerKind::Enroll {
        tracing::info!(listener = %l.name, address = %l.listen, kind = %l.kind(), balance = %l.balance,
            backends = l.backends.len(), "listening");
    }
    handle.spawn_serve(bound, stop.clone(), tracker);
    spawn_upkeep(&l, &handle, &stop, tracker);
    Ok(BoundListener {
        config: l,
        bound: bound_addr,
        handle,
        stop,
        socket: Some(socket),
    })
}

/// Active health checks, and for agent listeners the paced rebalancing.
fn spawn_upkeep(
    l: &ListenerConfig,
    handle: &ListenerHandle,
    stop: &CancellationToken,
    tracker: &TaskTracker,
) {
    if let Some(check) = l.health {
        let name = l.name.clone();
        let h = handle.clone();
        let on_change = move |backend: SocketAddr, up: bool| {
            tracing::info!(listener = %name, %backend, up, "active health check changed a backend's state");
        };
        tracker.spawn(crate::health::run(
            move || h.balancer(),
            check,
            stop.clone(),
            on_change,
        ));
    }
    if let (ListenerSettings::Agent(a), Some(relay)) = (&l.settings, handle.as_agent()) {
        if let Some(Rebalance { every, batch }) = a.rebalance {
            let (relay, stop) = (relay.clone(), stop.clone());
            tracker.spawn(async move {
                let mut tick = tokio::time::interval(every);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        _ = tick.tick() => { relay.rebalance(batch); }
                    }
                }
            });
        }
    }
}
