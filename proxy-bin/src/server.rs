//! Runs a configuration: binds every listener, serves until SIGTERM/SIGINT, then drains.

use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use wazuh_proxy_core::balance::Balancer;
use wazuh_proxy_core::enroll::EnrollFront;
use wazuh_proxy_core::handover::InheritedListener;
use wazuh_proxy_core::keys::KeyStore;
use wazuh_proxy_core::net;
use wazuh_proxy_core::relay::AgentRelay;
use wazuh_proxy_core::tcp::{TcpRelay, TcpRelayConfig};
use wazuh_proxy_core::udp::{UdpRelay, UdpRelayConfig};

use crate::config::{Config, Listener, ListenerKind};

/// Why the proxy could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// A listener could not bind its address.
    #[error("listener {name:?}: cannot bind {addr}: {source}")]
    Bind {
        /// Listener name.
        name: String,
        /// Its address.
        addr: std::net::SocketAddr,
        /// The cause.
        source: std::io::Error,
    },
    /// client.keys could not be read.
    #[error("listener {name:?}: {source}")]
    Keys {
        /// Listener name.
        name: String,
        /// The cause.
        source: wazuh_proxy_core::keys::KeysError,
    },
    /// A backend set was refused (already validated with the config; kept for embedders).
    #[error("listener {name:?}: {source}")]
    Backends {
        /// Listener name.
        name: String,
        /// The cause.
        source: wazuh_proxy_core::balance::BalanceError,
    },
    /// The enrollment front could not start (certificates, TLS settings).
    #[error("listener {name:?}: {why}")]
    Enroll {
        /// Listener name.
        name: String,
        /// What went wrong.
        why: String,
    },
    /// Privileges could not be dropped to the configured user.
    #[error("cannot run as user {user:?}: {why}")]
    Privileges {
        /// The user.
        user: String,
        /// What failed.
        why: String,
    },
    /// Signal handlers could not be installed.
    #[error("cannot install signal handlers: {0}")]
    Signal(std::io::Error),
    /// Taking over from a previous process failed.
    #[error(transparent)]
    Upgrade(#[from] crate::upgrade::UpgradeError),
    /// The PID file could not be written.
    #[error(transparent)]
    PidFile(#[from] crate::pidfile::PidFileError),
    /// The admin API could not start.
    #[error(transparent)]
    Admin(#[from] crate::admin::AdminError),
}

/// A listener that is bound and serving.
#[derive(Debug, Clone)]
pub(crate) enum Running {
    Agent(Arc<AgentRelay>),
    Tcp(Arc<TcpRelay>),
    Udp(Arc<UdpRelay>),
    Enroll(Arc<EnrollFront>),
}

impl Running {
    fn close_all(&self) {
        match self {
            Running::Agent(r) => r.close_all(),
            Running::Tcp(r) => r.close_all(),
            Running::Udp(r) => r.close_all(),
            // An enrollment is one short exchange: the drain timeout bounds it.
            Running::Enroll(_) => {}
        }
    }
    fn open_sessions(&self) -> usize {
        match self {
            Running::Agent(r) => r.sessions().len(),
            Running::Tcp(r) => r.stats().active.load(Ordering::Relaxed).max(0) as usize,
            Running::Udp(r) => r.flows(),
            Running::Enroll(f) => f.active(),
        }
    }
}

/// One bound listener.
struct Live {
    spec: Listener,
    running: Running,
    /// Stops this listener's accept loop (a child of the proxy's `stop_accepting`).
    stop: CancellationToken,
    /// A duplicate of the listening socket, handed to a successor on upgrade (closed when
    /// the drain starts, so the address stops accepting).
    socket: Option<OwnedFd>,
}

/// The proxy: every listener of a configuration, bound.
pub struct Proxy {
    live: Vec<Live>,
    stop_accepting: CancellationToken,
    tracker: TaskTracker,
    drain_timeout: Duration,
}

impl Proxy {
    /// Binds every listener and starts serving.
    ///
    /// # Errors
    /// When an address cannot be bound.
    pub async fn start(config: &Config) -> Result<Proxy, StartError> {
        Proxy::start_with(config, Vec::new()).await
    }

    /// Like [`Proxy::start`], serving on sockets inherited from a previous process where the
    /// name, address and kind match (the others are bound anew).
    ///
    /// # Errors
    /// When an address cannot be bound.
    pub async fn start_with(
        config: &Config,
        mut inherited: Vec<InheritedListener>,
    ) -> Result<Proxy, StartError> {
        wazuh_proxy_core::pace::set_window(config.batch_window);
        let stop_accepting = CancellationToken::new();
        let tracker = TaskTracker::new();
        let mut live = Vec::new();
        for l in &config.listeners {
            let udp = l.kind == ListenerKind::Udp;
            let (socket, drained) = match inherited
                .iter()
                .position(|i| i.name == l.name && i.addr == l.listen && i.udp == udp)
            {
                Some(at) => {
                    let i = inherited.swap_remove(at);
                    (Some(i.socket), i.drained)
                }
                None => (None, Vec::new()),
            };
            live.push(
                start_listener(l, stop_accepting.child_token(), &tracker, socket, &drained).await?,
            );
        }
        Ok(Proxy {
            live,
            stop_accepting,
            tracker,
            drain_timeout: config.drain_timeout,
        })
    }

    /// The bound listeners, in configuration order, with their configuration.
    pub(crate) fn listeners(&self) -> Vec<(Listener, Running)> {
        self.live
            .iter()
            .map(|l| (l.spec.clone(), l.running.clone()))
            .collect()
    }

    /// The agent relays.
    pub(crate) fn agent_relays(&self) -> Vec<Arc<AgentRelay>> {
        self.live
            .iter()
            .filter_map(|l| match &l.running {
                Running::Agent(r) => Some(r.clone()),
                _ => None,
            })
            .collect()
    }

    /// Every enroll listener's front, by listener name.
    pub(crate) fn enroll_fronts(&self) -> Vec<(String, Arc<EnrollFront>)> {
        self.live
            .iter()
            .filter_map(|l| match &l.running {
                Running::Enroll(f) => Some((l.spec.name.clone(), f.clone())),
                _ => None,
            })
            .collect()
    }

    /// Every listening socket, for a successor process.
    pub(crate) fn listener_sockets(&self) -> Vec<(String, std::net::SocketAddr, bool, &OwnedFd)> {
        self.live
            .iter()
            .filter_map(|l| {
                let socket = l.socket.as_ref()?;
                Some((
                    l.spec.name.clone(),
                    l.spec.listen,
                    l.spec.kind == ListenerKind::Udp,
                    socket,
                ))
            })
            .collect()
    }

    /// The task tracker every connection runs on.
    pub(crate) fn tracker(&self) -> &TaskTracker {
        &self.tracker
    }

    /// The drain timeout in force.
    pub(crate) fn drain_timeout(&self) -> Duration {
        self.drain_timeout
    }

    /// Cancelled once the proxy stops accepting new connections (the drain has begun).
    pub(crate) fn stop_accepting(&self) -> CancellationToken {
        self.stop_accepting.clone()
    }

    /// Applies a new configuration without dropping anything established: listeners that
    /// stay (same name, address and kind) get the new backend set (passive-health state
    /// carried over); new ones are bound; removed ones stop accepting while their sessions
    /// run on. If a new listener cannot be bound, nothing changes.
    ///
    /// # Errors
    /// When a new listener cannot start; the running configuration is then untouched.
    pub async fn reload(&mut self, config: &Config) -> Result<(), StartError> {
        let same = |l: &Listener, o: &Listener| {
            l.name == o.name && l.kind == o.kind && l.listen == o.listen
        };
        // 1. Bind what is new first: a failure leaves everything as it was.
        let mut added = Vec::new();
        for l in &config.listeners {
            if self.live.iter().any(|x| same(&x.spec, l)) {
                continue;
            }
            // A listener moving to another address or kind: its old socket may hold the
            // address; it is released below, so retry the bind after.
            match start_listener(
                l,
                self.stop_accepting.child_token(),
                &self.tracker,
                None,
                &[],
            )
            .await
            {
                Ok(live) => added.push(live),
                Err(e) => {
                    for a in &added {
                        a.stop.cancel();
                    }
                    return Err(e);
                }
            }
        }
        // 2. Update the listeners that stay; stop the ones that are gone.
        let mut kept = Vec::new();
        for x in self.live.drain(..) {
            match config.listeners.iter().find(|l| same(&x.spec, l)) {
                Some(l) => {
                    let balancer =
                        Balancer::new(l.balance, l.backends.clone()).map_err(|source| {
                            StartError::Backends {
                                name: l.name.clone(),
                                source,
                            }
                        })?;
                    match &x.running {
                        Running::Agent(r) => r.set_balancer(balancer),
                        Running::Tcp(r) => r.set_balancer(balancer),
                        Running::Udp(r) => r.set_balancer(balancer),
                        Running::Enroll(f) => f.set_balancer(balancer),
                    }
                    if l.agent.first_frame_timeout != x.spec.agent.first_frame_timeout
                        || l.agent.idle_timeout != x.spec.agent.idle_timeout
                        || l.agent.connect_timeout != x.spec.agent.connect_timeout
                        || l.agent.duplicate_policy != x.spec.agent.duplicate_policy
                        || l.agent.max_payload != x.spec.agent.max_payload
                        || l.keys != x.spec.keys
                        || l.health != x.spec.health
                        || l.rebalance != x.spec.rebalance
                        || l.agent.transparent != x.spec.agent.transparent
                        || l.agent.proxy_protocol != x.spec.agent.proxy_protocol
                    {
                        tracing::warn!(listener = %l.name,
                            "reload: only backends and balancing change in place; other settings of this listener apply after an upgrade or restart");
                    }
                    tracing::info!(listener = %l.name, backends = l.backends.len(), balance = %l.balance, "reload: backends updated");
                    let mut x = x;
                    let agent = x.spec.agent.clone();
                    let (keys, health, rebalance) =
                        (x.spec.keys.clone(), x.spec.health, x.spec.rebalance);
                    x.spec = Listener {
                        agent,
                        keys,
                        health,
                        rebalance,
                        ..l.clone()
                    };
                    kept.push(x);
                }
                None => {
                    tracing::info!(listener = %x.spec.name, address = %x.spec.listen,
                        "reload: listener removed; it stops accepting, its sessions run on");
                    x.stop.cancel();
                }
            }
        }
        for a in &added {
            tracing::info!(listener = %a.spec.name, address = %a.spec.listen, "reload: listener added");
        }
        kept.extend(added);
        // Keep the configuration's order.
        kept.sort_by_key(|x| {
            config
                .listeners
                .iter()
                .position(|l| l.name == x.spec.name)
                .unwrap_or(usize::MAX)
        });
        self.live = kept;
        self.drain_timeout = config.drain_timeout;
        wazuh_proxy_core::pace::set_window(config.batch_window);
        Ok(())
    }

    fn open_sessions(&self) -> usize {
        self.live.iter().map(|l| l.running.open_sessions()).sum()
    }

    /// Stops accepting, lets sessions finish for up to the drain timeout, then closes the rest.
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
                l.running.close_all();
            }
            let _ = tokio::time::timeout(Duration::from_secs(5), self.tracker.wait()).await;
        }
        tracing::info!("drained");
    }
}

async fn start_listener(
    l: &Listener,
    stop: CancellationToken,
    tracker: &TaskTracker,
    inherited: Option<OwnedFd>,
    drained: &[std::net::SocketAddr],
) -> Result<Live, StartError> {
    let stop = &stop;
    let balancer =
        Balancer::new(l.balance, l.backends.clone()).map_err(|source| StartError::Backends {
            name: l.name.clone(),
            source,
        })?;
    let bind_err = |source| StartError::Bind {
        name: l.name.clone(),
        addr: l.listen,
        source,
    };
    let live: Result<Live, StartError> = match l.kind {
        ListenerKind::Tcp => {
            let listener = tcp_listener(l, inherited).map_err(bind_err)?;
            let socket = dup_fd(&listener).map_err(bind_err)?;
            let config = TcpRelayConfig {
                connect_timeout: l.agent.connect_timeout,
                idle_timeout: l.agent.idle_timeout,
                tcp_keepalive: l.agent.tcp_keepalive,
                proxy_protocol: l.agent.proxy_protocol.clone(),
                ..TcpRelayConfig::default()
            };
            let relay = Arc::new(TcpRelay::new(l.name.clone(), config, balancer));
            tracing::info!(listener = %l.name, address = %l.listen, kind = "tcp", balance = %l.balance,
                backends = l.backends.len(), "listening");
            tracker.spawn(relay.clone().serve(listener, stop.clone(), tracker.clone()));
            Ok(Live {
                spec: l.clone(),
                running: Running::Tcp(relay),
                stop: stop.clone(),
                socket: Some(socket),
            })
        }
        ListenerKind::Udp => {
            let udp = match inherited {
                Some(fd) => {
                    let std_socket = std::net::UdpSocket::from(fd);
                    std_socket
                        .set_nonblocking(true)
                        .and_then(|()| tokio::net::UdpSocket::from_std(std_socket))
                }
                None => net::bind_udp(l.listen),
            }
            .map_err(bind_err)?;
            let socket = dup_fd(&udp).map_err(bind_err)?;
            let mut config = UdpRelayConfig {
                max_datagram: l.agent.max_payload as usize,
                ..UdpRelayConfig::default()
            };
            if let Some(idle) = l.agent.idle_timeout {
                config.idle_timeout = idle;
            }
            let relay = Arc::new(UdpRelay::new(l.name.clone(), config, balancer));
            tracing::info!(listener = %l.name, address = %l.listen, kind = "udp", balance = %l.balance,
                backends = l.backends.len(), "listening");
            tracker.spawn(relay.clone().serve(udp, stop.clone(), tracker.clone()));
            Ok(Live {
                spec: l.clone(),
                running: Running::Udp(relay),
                stop: stop.clone(),
                socket: Some(socket),
            })
        }
        ListenerKind::Enroll => {
            let listener = tcp_listener(l, inherited).map_err(bind_err)?;
            let socket = dup_fd(&listener).map_err(bind_err)?;
            let settings = l.enroll.clone().ok_or_else(|| StartError::Enroll {
                name: l.name.clone(),
                why: "missing TLS settings".into(),
            })?;
            if let wazuh_proxy_core::enroll::ServerCert::SelfSigned { cert, .. } =
                &settings.server_cert
            {
                if let Some(dir) = cert.parent() {
                    let _ = std::fs::create_dir_all(dir);
                }
            }
            let mut config = wazuh_proxy_core::enroll::EnrollConfig::new(
                settings.server_cert,
                settings.backend_tls,
            );
            config.connect_timeout = l.agent.connect_timeout;
            config.replay_ttl = settings.replay_ttl;
            config.backend_client_cert = settings.backend_client_cert;
            config.source_limits = l.agent.source_limits;
            config.proxy_protocol = l.agent.proxy_protocol.clone();
            // The deadline for the TLS handshake and the request line.
            config.request_timeout = l.agent.first_frame_timeout;
            let front = EnrollFront::new(config, balancer).map_err(|e| StartError::Enroll {
                name: l.name.clone(),
                why: e.to_string(),
            })?;
            let front = Arc::new(front);
            tracing::info!(listener = %l.name, address = %l.listen, kind = "enroll", balance = %l.balance,
                backends = l.backends.len(), certificate_sha256 = %front.fingerprint(), "listening (TLS terminated here)");
            tracker.spawn(front.clone().serve(listener, stop.clone(), tracker.clone()));
            Ok(Live {
                spec: l.clone(),
                running: Running::Enroll(front),
                stop: stop.clone(),
                socket: Some(socket),
            })
        }
        ListenerKind::Agent => {
            let listener = tcp_listener(l, inherited).map_err(bind_err)?;
            let socket = dup_fd(&listener).map_err(bind_err)?;
            let mut relay = AgentRelay::new(l.name.clone(), l.agent.clone(), balancer);
            if let Some((path, every)) = &l.keys {
                let (store, problems) =
                    KeyStore::open(path).map_err(|source| StartError::Keys {
                        name: l.name.clone(),
                        source,
                    })?;
                for p in &problems {
                    tracing::warn!(listener = %l.name, file = %path.display(), "client.keys: {p}");
                }
                tracing::info!(listener = %l.name, file = %path.display(), agents = store.len(),
                    "verifying agents with client.keys");
                tracker.spawn(store.clone().watch(path.clone(), *every, stop.clone()));
                relay = relay.with_keys(store);
            }
            let relay = Arc::new(relay);
            if !drained.is_empty() {
                // Operator state from the previous process, before anything is accepted.
                tracing::info!(listener = %l.name, ?drained, "upgrade: backends stay drained");
                relay.restore_drained(drained);
            }
            tracing::info!(listener = %l.name, address = %l.listen, kind = "agent", balance = %l.balance,
                backends = l.backends.len(), "listening");
            tracker.spawn(relay.clone().serve(listener, stop.clone(), tracker.clone()));
            Ok(Live {
                spec: l.clone(),
                running: Running::Agent(relay),
                stop: stop.clone(),
                socket: Some(socket),
            })
        }
    };
    let live = live?;
    spawn_upkeep(&live, stop, tracker);
    Ok(live)
}

/// Active health checks, and for agent listeners the paced rebalancing.
fn spawn_upkeep(live: &Live, stop: &CancellationToken, tracker: &TaskTracker) {
    let name = live.spec.name.clone();
    if let Some(check) = live.spec.health {
        let running = live.running.clone();
        let balancer = move || match &running {
            Running::Agent(r) => r.balancer(),
            Running::Tcp(r) => r.balancer(),
            Running::Udp(r) => r.balancer(),
            Running::Enroll(f) => f.balancer(),
        };
        let on_change = move |backend: std::net::SocketAddr, up: bool| {
            tracing::info!(listener = %name, %backend, up, "active health check changed a backend's state");
        };
        tracker.spawn(wazuh_proxy_core::health::run(
            balancer,
            check,
            stop.clone(),
            on_change,
        ));
    }
    if let (Some((every, batch)), Running::Agent(relay)) = (live.spec.rebalance, &live.running) {
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

fn tcp_listener(
    l: &Listener,
    inherited: Option<OwnedFd>,
) -> std::io::Result<tokio::net::TcpListener> {
    match inherited {
        Some(fd) => {
            let std_listener = std::net::TcpListener::from(fd);
            std_listener.set_nonblocking(true)?;
            tokio::net::TcpListener::from_std(std_listener)
        }
        None => net::bind_tcp(l.listen, net::DEFAULT_BACKLOG),
    }
}

fn dup_fd(socket: &impl AsFd) -> std::io::Result<OwnedFd> {
    socket.as_fd().try_clone_to_owned()
}

/// Switches to `user` (its primary group and supplementary groups) after the listeners are
/// bound, when running as root; a no-op, with a notice, when already running as that user.
fn drop_privileges(user: &str) -> Result<(), StartError> {
    use nix::unistd::{getuid, initgroups, setgid, setuid, User};
    let fail = |why: String| StartError::Privileges {
        user: user.to_owned(),
        why,
    };
    let entry = User::from_name(user)
        .map_err(|e| fail(e.to_string()))?
        .ok_or_else(|| fail("no such user".into()))?;
    if getuid() == entry.uid {
        return Ok(());
    }
    if !getuid().is_root() {
        return Err(fail(
            "only root can switch users; start as root or as that user".into(),
        ));
    }
    let name = std::ffi::CString::new(user).map_err(|_| fail("bad user name".into()))?;
    initgroups(&name, entry.gid).map_err(|e| fail(format!("initgroups: {e}")))?;
    setgid(entry.gid).map_err(|e| fail(format!("setgid: {e}")))?;
    setuid(entry.uid).map_err(|e| fail(format!("setuid: {e}")))?;
    tracing::info!(
        user,
        uid = entry.uid.as_raw(),
        "listeners bound; running as {user}"
    );
    Ok(())
}

/// `source = "transparent"` sets `IP_TRANSPARENT`, which needs `CAP_NET_ADMIN` (or
/// `CAP_NET_RAW`); without it every connect to a manager fails, so say so once, after
/// privileges are dropped (switching users clears the capabilities), rather than once per
/// agent.
fn warn_if_not_transparent_capable(config: &Config) {
    let transparent: Vec<&str> = config
        .listeners
        .iter()
        .filter(|l| l.kind == ListenerKind::Agent && l.agent.transparent)
        .map(|l| l.name.as_str())
        .collect();
    if transparent.is_empty() {
        return;
    }
    match std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| may_set_transparent(&s))
    {
        Some(true) => {}
        Some(false) => tracing::warn!(listeners = ?transparent,
            "source = \"transparent\" needs CAP_NET_ADMIN (or CAP_NET_RAW), which this process lacks: connections to managers will fail (run as root without `user`, or grant the capability, e.g. AmbientCapabilities=CAP_NET_ADMIN)"),
        None => tracing::warn!(listeners = ?transparent,
            "cannot read this process's capabilities; source = \"transparent\" needs CAP_NET_ADMIN (or CAP_NET_RAW)"),
    }
}

/// Whether the effective capabilities in a `/proc/<pid>/status` text allow `IP_TRANSPARENT`:
/// CAP_NET_ADMIN (bit 12) or CAP_NET_RAW (bit 13). `None` when the line is missing or
/// malformed.
fn may_set_transparent(status: &str) -> Option<bool> {
    const CAP_NET_ADMIN: u32 = 12;
    const CAP_NET_RAW: u32 = 13;
    let hex = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))?
        .trim();
    let bits = u64::from_str_radix(hex, 16).ok()?;
    Some(bits & (1 << CAP_NET_ADMIN | 1 << CAP_NET_RAW) != 0)
}

/// Resolves on the first SIGTERM or SIGINT.
pub async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) {
            (Ok(mut term), Ok(mut int)) => {
                tokio::select! {
                    _ = term.recv() => tracing::info!("SIGTERM received"),
                    _ = int.recv() => tracing::info!("SIGINT received"),
                }
            }
            _ => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// How `run` reloads and upgrades.
pub struct RunOptions {
    /// Where to write this process's ID once it serves.
    pub pid_file: Option<std::path::PathBuf>,
    /// Reads the configuration again (SIGHUP); `None` when it came from the command line.
    pub reload: Option<Box<dyn Fn() -> Result<Config, crate::config::ConfigError> + Send>>,
    /// Set in a successor process: the old process's hand-over socket.
    pub takeover: Option<std::path::PathBuf>,
    /// Where this process offers its sockets to a successor on SIGUSR2.
    pub upgrade_socket: std::path::PathBuf,
}

/// Runs `config` until a shutdown signal, then drains. A second signal closes everything at
/// once. SIGHUP reloads the configuration; SIGUSR2 upgrades to a new process.
///
/// # Errors
/// When a listener cannot start.
pub async fn run(config: Config, options: RunOptions) -> Result<(), StartError> {
    use tokio::signal::unix::{signal, SignalKind};
    let (mut proxy, takeover) = match &options.takeover {
        Some(path) => {
            let (stream, inherited) = crate::upgrade::connect(path).await?;
            tracing::info!(
                listeners = inherited.len(),
                "taking over from the previous process"
            );
            (Proxy::start_with(&config, inherited).await?, Some(stream))
        }
        None => (Proxy::start(&config).await?, None),
    };
    let mut admin = match takeover {
        Some(stream) => {
            match crate::upgrade::adopt(stream, &proxy).await {
                Ok(n) => {
                    tracing::info!(sessions = n, "upgrade complete: agent sessions taken over")
                }
                Err(e) => tracing::error!("upgrade: taking over agent sessions failed: {e}"),
            }
            // The previous process releases the admin address once it has handed everything
            // over: wait for it.
            let mut tries = 0;
            loop {
                match crate::admin::AdminServer::start(&config, &proxy).await {
                    Ok(a) => break a,
                    Err(e) if tries < 100 => {
                        tries += 1;
                        tracing::debug!("admin API not yet available: {e}");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                    Err(e) => return Err(e.into()),
                }
            }
        }
        None => {
            let admin = crate::admin::AdminServer::start(&config, &proxy).await?;
            crate::upgrade::notify_systemd("READY=1\n");
            admin
        }
    };
    // Before dropping privileges: the file may live where only root writes (/run).
    let _pid_file = match &options.pid_file {
        Some(path) => Some(crate::pidfile::PidFile::write(path)?),
        None => None,
    };
    if let Some(user) = &config.user {
        drop_privileges(user)?;
    }
    warn_if_not_transparent_capable(&config);
    let mut watchers = crate::resolve::start(&config, &proxy);
    let mut hup = signal(SignalKind::hangup()).map_err(StartError::Signal)?;
    let mut usr2 = signal(SignalKind::user_defined2()).map_err(StartError::Signal)?;
    loop {
        tokio::select! {
            _ = shutdown_signal() => break,
            _ = hup.recv() => {
                let Some(reload) = &options.reload else {
                    tracing::warn!("SIGHUP: the configuration came from the command line; nothing to reload");
                    continue;
                };
                tracing::info!("SIGHUP: reloading the configuration");
                match reload() {
                    Err(e) => tracing::error!("reload refused, the running configuration stays: {e}"),
                    Ok(new) => match proxy.reload(&new).await {
                        Err(e) => tracing::error!("reload refused, the running configuration stays: {e}"),
                        Ok(()) => {
                            if let Some(admin) = &admin {
                                admin.refresh(&proxy);
                            }
                            watchers.stop();
                            watchers = crate::resolve::start(&new, &proxy);
                            warn_if_not_transparent_capable(&new);
                            tracing::info!("reload applied");
                        }
                    },
                }
            }
            _ = usr2.recv() => {
                tracing::info!("SIGUSR2: upgrading to a new process");
                match crate::upgrade::hand_over(&proxy, &options.upgrade_socket).await {
                    Ok(n) => {
                        tracing::info!(sessions = n, "upgrade: handed over; draining what is left and exiting");
                        // The new process serves the admin API from now on.
                        if let Some(a) = admin.take() {
                            a.stop().await;
                        }
                        break;
                    }
                    Err(e) => tracing::error!("upgrade failed, this process keeps serving: {e}"),
                }
            }
        }
    }
    watchers.stop();
    tokio::select! {
        _ = proxy.drain() => {}
        _ = shutdown_signal() => tracing::warn!("second signal: exiting without waiting for sessions"),
    }
    if let Some(admin) = admin {
        admin.stop().await;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::may_set_transparent;

    #[test]
    fn reads_the_network_capabilities_from_proc_status() {
        let root = "Name:\twazuh-proxy\nCapPrm:\t000001ffffffffff\nCapEff:\t000001ffffffffff\n";
        assert_eq!(may_set_transparent(root), Some(true));
        // CAP_NET_BIND_SERVICE (bit 10) alone.
        assert_eq!(
            may_set_transparent("CapEff:\t0000000000000400\n"),
            Some(false)
        );
        assert_eq!(
            may_set_transparent("CapEff:\t0000000000001000\n"),
            Some(true)
        );
        // CAP_NET_RAW alone is enough too.
        assert_eq!(
            may_set_transparent("CapEff:\t0000000000002000\n"),
            Some(true)
        );
        assert_eq!(may_set_transparent("CapEff:\tzz\n"), None);
        assert_eq!(may_set_transparent("Name:\tx\n"), None);
    }
}
