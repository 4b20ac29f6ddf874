//! Runs a configuration: binds every listener, serves until SIGTERM/SIGINT, then drains.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use wazuh_proxy_core::balance::Balancer;
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
}

impl Running {
    fn close_all(&self) {
        match self {
            Running::Agent(r) => r.close_all(),
            Running::Tcp(r) => r.close_all(),
            Running::Udp(r) => r.close_all(),
        }
    }
    fn open_sessions(&self) -> usize {
        match self {
            Running::Agent(r) => r.sessions().len(),
            Running::Tcp(r) => r.stats().active.load(Ordering::Relaxed).max(0) as usize,
            Running::Udp(r) => r.flows(),
        }
    }
}

/// The proxy: every listener of a configuration, bound.
pub struct Proxy {
    running: Vec<Running>,
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
        let stop_accepting = CancellationToken::new();
        let tracker = TaskTracker::new();
        let mut running = Vec::new();
        for l in &config.listeners {
            running.push(start_listener(l, &stop_accepting, &tracker).await?);
        }
        Ok(Proxy {
            running,
            stop_accepting,
            tracker,
            drain_timeout: config.drain_timeout,
        })
    }

    /// The bound listeners, in configuration order.
    pub(crate) fn running(&self) -> &[Running] {
        &self.running
    }

    /// Cancelled once the proxy stops accepting new connections (the drain has begun).
    pub(crate) fn stop_accepting(&self) -> CancellationToken {
        self.stop_accepting.clone()
    }

    /// Stops accepting, lets sessions finish for up to the drain timeout, then closes the rest.
    pub async fn drain(self) {
        self.stop_accepting.cancel();
        self.tracker.close();
        let open: usize = self.running.iter().map(Running::open_sessions).sum();
        tracing::info!(sessions = open, timeout = ?self.drain_timeout, "draining: no new connections; waiting for sessions to end");
        if tokio::time::timeout(self.drain_timeout, self.tracker.wait())
            .await
            .is_err()
        {
            let open: usize = self.running.iter().map(Running::open_sessions).sum();
            tracing::warn!(
                sessions = open,
                "drain timeout reached; closing the remaining sessions"
            );
            for r in &self.running {
                r.close_all();
            }
            let _ = tokio::time::timeout(Duration::from_secs(5), self.tracker.wait()).await;
        }
        tracing::info!("drained");
    }
}

async fn start_listener(
    l: &Listener,
    stop: &CancellationToken,
    tracker: &TaskTracker,
) -> Result<Running, StartError> {
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
    match l.kind {
        ListenerKind::Tcp => {
            let listener = net::bind_tcp(l.listen, net::DEFAULT_BACKLOG).map_err(bind_err)?;
            let config = TcpRelayConfig {
                connect_timeout: l.agent.connect_timeout,
                idle_timeout: l.agent.idle_timeout,
                tcp_keepalive: l.agent.tcp_keepalive,
                ..TcpRelayConfig::default()
            };
            let relay = Arc::new(TcpRelay::new(l.name.clone(), config, balancer));
            tracing::info!(listener = %l.name, address = %l.listen, kind = "tcp", balance = %l.balance,
                backends = l.backends.len(), "listening");
            tracker.spawn(relay.clone().serve(listener, stop.clone(), tracker.clone()));
            Ok(Running::Tcp(relay))
        }
        ListenerKind::Udp => {
            let socket = net::bind_udp(l.listen).map_err(bind_err)?;
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
            tracker.spawn(relay.clone().serve(socket, stop.clone(), tracker.clone()));
            Ok(Running::Udp(relay))
        }
        ListenerKind::Agent => {
            let listener = net::bind_tcp(l.listen, net::DEFAULT_BACKLOG).map_err(bind_err)?;
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
            tracing::info!(listener = %l.name, address = %l.listen, kind = "agent", balance = %l.balance,
                backends = l.backends.len(), "listening");
            tracker.spawn(relay.clone().serve(listener, stop.clone(), tracker.clone()));
            Ok(Running::Agent(relay))
        }
    }
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

/// Runs `config` until a shutdown signal, then drains. A second signal closes everything at once.
///
/// # Errors
/// When a listener cannot start.
pub async fn run(config: Config) -> Result<(), StartError> {
    let proxy = Proxy::start(&config).await?;
    let admin = crate::admin::AdminServer::start(&config, &proxy).await?;
    shutdown_signal().await;
    tokio::select! {
        _ = proxy.drain() => {}
        _ = shutdown_signal() => tracing::warn!("second signal: exiting without waiting for sessions"),
    }
    if let Some(admin) = admin {
        admin.stop().await;
    }
    Ok(())
}
