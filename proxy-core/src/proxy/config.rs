//! What a [`Proxy`](super::Proxy) runs: plain structs, typed per listener kind, with the
//! defaults of the relays they carry. Reading files is the embedder's job (the binary reads
//! TOML and nginx configurations and converts them to these).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use crate::balance::{BackendConfig, Policy};
#[cfg(feature = "enroll")]
use crate::enroll::EnrollConfig;
use crate::health::HealthCheck;
use crate::relay::AgentRelayConfig;
use crate::tcp::TcpRelayConfig;
use crate::udp::UdpRelayConfig;

use super::listener::ListenerKind;

/// Default time sessions may run on after a drain starts before they are closed.
pub const DEFAULT_DRAIN_TIMEOUT: Duration = Duration::from_secs(30);

/// Default batching pause under load (see [`crate::pace`]): 200 µs.
pub const DEFAULT_BATCH_WINDOW: Duration = Duration::from_micros(200);

/// Everything a proxy runs.
#[derive(Debug, Clone)]
pub struct ProxyConfig {
    /// The listeners, in order (names are unique).
    pub listeners: Vec<ListenerConfig>,
    /// How long sessions may run on after a drain starts before they are closed (default
    /// [`DEFAULT_DRAIN_TIMEOUT`]).
    pub drain_timeout: Duration,
    /// How long a worker thread that has just moved a lot of data waits before sleeping (see
    /// [`crate::pace`]; default [`DEFAULT_BATCH_WINDOW`], zero turns it off).
    pub batch_window: Duration,
}

impl ProxyConfig {
    /// A configuration of these listeners with the default timeouts.
    pub fn new(listeners: Vec<ListenerConfig>) -> Self {
        ProxyConfig {
            listeners,
            drain_timeout: DEFAULT_DRAIN_TIMEOUT,
            batch_window: DEFAULT_BATCH_WINDOW,
        }
    }

    /// The listener named `name`.
    pub fn listener(&self, name: &str) -> Option<&ListenerConfig> {
        self.listeners.iter().find(|l| l.name == name)
    }
}

/// One listener: where it listens, to which backends, and its kind's settings.
#[derive(Debug, Clone)]
pub struct ListenerConfig {
    /// Name used in logs, metrics, the admin API and the hand-over.
    pub name: String,
    /// Address to bind.
    pub listen: SocketAddr,
    /// How backends are chosen.
    pub balance: Policy,
    /// The backends (managers).
    pub backends: Vec<BackendConfig>,
    /// Active health checks (`None`: passive checks only).
    pub health: Option<HealthCheck>,
    /// What the listener carries, with the settings of that kind.
    pub settings: ListenerSettings,
}

impl ListenerConfig {
    /// A listener of `settings`' kind with the default balancing and no active health checks.
    pub fn new(
        name: impl Into<String>,
        listen: SocketAddr,
        backends: Vec<BackendConfig>,
        settings: ListenerSettings,
    ) -> Self {
        ListenerConfig {
            name: name.into(),
            listen,
            balance: Policy::default(),
            backends,
            health: None,
            settings,
        }
    }

    /// An agent listener (TCP 1514) with the relay's defaults, to these managers.
    pub fn agent(name: impl Into<String>, listen: SocketAddr, managers: &[SocketAddr]) -> Self {
        let backends = managers.iter().map(|a| BackendConfig::new(*a)).collect();
        ListenerConfig::new(
            name,
            listen,
            backends,
            ListenerSettings::Agent(AgentSettings::default()),
        )
    }

    /// Its kind.
    pub fn kind(&self) -> ListenerKind {
        self.settings.kind()
    }
}

/// A listener's kind and the settings only that kind has.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum ListenerSettings {
    /// Wazuh agents over TCP, relayed frame by frame.
    Agent(AgentSettings),
    /// Any TCP service, relayed byte by byte.
    Tcp(TcpRelayConfig),
    /// Wazuh agents over UDP.
    Udp(UdpRelayConfig),
    /// Agent enrollment, TLS terminated here.
    #[cfg(feature = "enroll")]
    Enroll(EnrollConfig),
}

impl ListenerSettings {
    /// The agent listener's settings, when these are.
    pub fn agent(&self) -> Option<&AgentSettings> {
        match self {
            ListenerSettings::Agent(a) => Some(a),
            _ => None,
        }
    }

    /// The kind these settings are for.
    pub fn kind(&self) -> ListenerKind {
        match self {
            ListenerSettings::Agent(_) => ListenerKind::Agent,
            ListenerSettings::Tcp(_) => ListenerKind::Tcp,
            ListenerSettings::Udp(_) => ListenerKind::Udp,
            #[cfg(feature = "enroll")]
            ListenerSettings::Enroll(_) => ListenerKind::Enroll,
        }
    }
}

/// Settings of an agent listener: the relay's, and what the proxy runs beside it.
#[derive(Debug, Clone, Default)]
pub struct AgentSettings {
    /// The frame relay's settings.
    pub relay: AgentRelayConfig,
    /// client.keys to verify agents with (`None`: agents are not verified).
    pub keys: Option<KeysFile>,
    /// Agents moved back to their preferred manager periodically (`None`: only when the
    /// operator asks, [`ProxyView::rebalance`](super::ProxyView::rebalance)).
    pub rebalance: Option<Rebalance>,
}

/// A client.keys file, watched for changes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeysFile {
    /// The file.
    pub path: PathBuf,
    /// How often it is checked for changes.
    pub reload_every: Duration,
}

/// Periodic rebalancing of agent sessions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rebalance {
    /// How often.
    pub every: Duration,
    /// Most agents moved each time.
    pub batch: usize,
}
