//! The TOML configuration: parsed strictly (an unknown key is an error with file:line),
//! validated, and turned into the typed settings of proxy-core.
//!
//! ```toml
//! drain_timeout = "30s"
//! batch_window = "200us"    # pause after a busy round so the next moves more per call; 0 off
//! admin = "127.0.0.1:9514"  # admin HTTP API ("none" disables it)
//! admin_token_file = "/etc/wazuh-proxy/admin.token"  # optional bearer token
//!
//! [[listener]]
//! name = "agents"
//! listen = "0.0.0.0:1514"
//! kind = "agent"            # agent (1514/TCP, framed) | udp (1514/UDP) | tcp (plain relay)
//! balance = "agent-id"      # agent-id | source | least-conn | round-robin | random
//! source = "proxy"          # managers see: proxy (its own address) | transparent (the agent's)
//! backends = [
//!   { address = "10.0.0.11:1514" },
//!   { address = "10.0.0.12:1514", weight = 2 },
//!   { address = "10.0.0.13:1514", backup = true },
//! ]
//! ```

mod addr;
mod file;
mod print;
mod project;
mod spec;
#[cfg(test)]
mod tests;
mod validate;

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use wazuh_proxy_core::balance::{BackendConfig, Policy};
use wazuh_proxy_core::limits::SourceLimits;

use addr::{resolve_all, resolve_one};
pub use file::{kind_bit, known_keys, LISTENER_KEYS};
pub use spec::{
    AgentSpec, BackendTlsSpec, ClientCertSpec, EnrollSpec, KeysSpec, ListenerSpec,
    ProxyProtocolKeys, RebalanceKeys, ServerCertSpec, SourceAddress, TcpSpec, UdpSpec,
};

/// A configuration error, with the place it was found.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The file is not valid TOML, has an unknown key, or a value of the wrong form.
    #[error("{origin}:{line}:{column}: {message}")]
    Invalid {
        /// File name (or `<command line>`).
        origin: String,
        /// 1-based line.
        line: usize,
        /// 1-based column.
        column: usize,
        /// What is wrong.
        message: String,
    },
}

/// Where a config text came from, to turn byte offsets into file:line.
struct Source<'a> {
    origin: &'a str,
    text: &'a str,
}

impl Source<'_> {
    fn error(&self, span: Option<Range<usize>>, message: impl fmt::Display) -> ConfigError {
        let at = span.map_or(0, |s| s.start).min(self.text.len());
        let before = &self.text[..at];
        let line = before.matches('\n').count() + 1;
        let column = at - before.rfind('\n').map_or(0, |i| i + 1) + 1;
        ConfigError::Invalid {
            origin: self.origin.to_owned(),
            line,
            column,
            message: message.to_string(),
        }
    }
}

/// A duration written as text: `"10s"`, `"500ms"`, `"2m"`, `"1h 30m"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Dur(pub Duration);

impl<'de> Deserialize<'de> for Dur {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        humantime::parse_duration(&text).map(Dur).map_err(|e| {
            serde::de::Error::custom(format!(
                "invalid duration {text:?}: {e} (examples: \"10s\", \"500ms\", \"2m\")"
            ))
        })
    }
}

impl Serialize for Dur {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&humantime::format_duration(self.0).to_string())
    }
}

/// What a listener carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum ListenerKind {
    /// Wazuh agents on 1514/TCP: framed, routed by agent.
    Agent,
    /// Wazuh agents on 1514/UDP: one datagram per message.
    Udp,
    /// Any TCP service relayed as bytes (1515 enrollment in passthrough, 55000 API).
    Tcp,
    /// Enrollment (1515) with TLS terminated here: whole replies, delivery judged by what the
    /// agent acknowledged, lost-reply replay.
    Enroll,
}

impl std::str::FromStr for ListenerKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "agent" => Ok(ListenerKind::Agent),
            "udp" => Ok(ListenerKind::Udp),
            "tcp" => Ok(ListenerKind::Tcp),
            "enroll" => Ok(ListenerKind::Enroll),
            other => Err(format!(
                "unknown listener kind {other:?} (expected agent, udp, tcp or enroll)"
            )),
        }
    }
}

impl ListenerKind {
    /// Backend choice when `balance` is not set: by agent ID where IDs are read, else by
    /// source address.
    pub fn default_balance(self) -> Policy {
        match self {
            ListenerKind::Agent | ListenerKind::Udp => Policy::AgentId,
            ListenerKind::Tcp | ListenerKind::Enroll => Policy::Source,
        }
    }

    /// Active health probe when `health_check` is not set: a TCP connect, except on udp
    /// listeners, whose managers may have nothing on TCP.
    pub fn default_probe(self) -> Option<wazuh_proxy_core::health::Probe> {
        match self {
            ListenerKind::Udp => None,
            _ => Some(wazuh_proxy_core::health::Probe::Connect),
        }
    }

    /// Active health checks when none of the `health_check*` keys is set.
    pub fn default_health(self) -> Option<wazuh_proxy_core::health::HealthCheck> {
        self.default_probe()
            .map(|probe| wazuh_proxy_core::health::HealthCheck {
                probe,
                ..wazuh_proxy_core::health::HealthCheck::default()
            })
    }

    /// The settings only this kind has, where none of its keys is set; `None` for enroll
    /// listeners, which must say how the managers' certificates are checked.
    pub fn default_spec(self) -> Option<ListenerSpec> {
        match self {
            ListenerKind::Agent => Some(ListenerSpec::Agent(AgentSpec::default())),
            ListenerKind::Udp => Some(ListenerSpec::Udp(UdpSpec::default())),
            ListenerKind::Tcp => Some(ListenerSpec::Tcp(TcpSpec::default())),
            ListenerKind::Enroll => None,
        }
    }

    /// Automatic rebalancing when the `rebalance_*` keys are not set: agent listeners only.
    pub fn default_rebalance(self) -> Option<(Duration, usize)> {
        match self {
            ListenerKind::Agent => Some(DEFAULT_REBALANCE),
            _ => None,
        }
    }
}

/// One validated listener: what every kind has, and its kind's own settings.
#[derive(Debug, Clone, PartialEq)]
pub struct Listener {
    /// Name used in logs, metrics and the admin API.
    pub name: String,
    /// Address to bind.
    pub listen: SocketAddr,
    /// How backends are chosen.
    pub balance: Policy,
    /// The managers.
    pub backends: Vec<BackendConfig>,
    /// Active health checks (`None`: passive checks only).
    pub health: Option<wazuh_proxy_core::health::HealthCheck>,
    /// Backend names resolved again every interval (`resolve_interval`); `None`: resolved
    /// once, when the configuration is loaded.
    pub resolve: Option<Resolve>,
    /// Per-source limits: connections (agent, tcp, enroll) or flows (udp).
    pub source_limits: SourceLimits,
    /// What it carries, with the settings only that kind has.
    pub spec: ListenerSpec,
}

impl Listener {
    /// What it carries.
    pub fn kind(&self) -> ListenerKind {
        self.spec.kind()
    }

    /// A listener of `spec`'s kind with the settings every kind shares at their defaults for
    /// that kind (health checks, per-source limits; resolved once).
    pub fn new(
        name: String,
        listen: SocketAddr,
        balance: Policy,
        backends: Vec<BackendConfig>,
        spec: ListenerSpec,
    ) -> Listener {
        Listener {
            name,
            listen,
            balance,
            backends,
            health: spec.kind().default_health(),
            resolve: None,
            source_limits: SourceLimits::default(),
            spec,
        }
    }

    /// Checks the kind's settings against each other (see [`ListenerSpec::check`]).
    ///
    /// # Errors
    /// The first setting (or pair) that cannot work.
    pub fn check(&self) -> Result<(), String> {
        self.spec.check(self.source_limits)
    }
}

/// Periodic re-resolution of a listener's backend names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resolve {
    /// How often.
    pub interval: Duration,
    /// Backends given as addresses: always in the set.
    pub literal: Vec<BackendConfig>,
    /// Backends given as names: every address a name resolves to, with its settings.
    pub named: Vec<NamedBackend>,
    /// Name servers for SRV lookups (`resolvers`); empty: the system's (/etc/resolv.conf).
    pub resolvers: Vec<SocketAddr>,
}

/// A backend given as `host:port`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NamedBackend {
    /// The name as written: `host:port`, or an SRV record name.
    pub name: String,
    /// `name` is an SRV record (`srv = ...`): its targets and ports are the addresses.
    pub srv: bool,
    /// Its settings; `addr` is replaced by each resolved address.
    pub template: BackendConfig,
    /// Whether it resolved when the configuration was loaded.
    pub resolved_at_load: bool,
    /// Why it did not, then (shown by `/health` until the next lookup).
    pub load_error: Option<String>,
}

/// Where the admin HTTP API listens and who may use it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdminSettings {
    /// Address of the admin API; `None` disables it.
    pub listen: Option<SocketAddr>,
    /// File holding the bearer token every admin request must carry.
    pub token_file: Option<PathBuf>,
}

impl Default for AdminSettings {
    fn default() -> Self {
        AdminSettings {
            listen: Some(DEFAULT_ADMIN),
            token_file: None,
        }
    }
}

/// Default address of the admin API: loopback only.
pub const DEFAULT_ADMIN: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 9514);

/// Parses an admin address: `host:port`, or `none` to disable the admin API.
///
/// # Errors
/// When the text is neither `none` nor one resolvable address.
pub fn parse_admin(text: &str) -> Result<Option<SocketAddr>, String> {
    if text.eq_ignore_ascii_case("none") {
        return Ok(None);
    }
    resolve_one(text)
        .map(Some)
        .map_err(|e| format!("admin: {e} (or \"none\" to disable the admin API)"))
}

/// Where a self-signed enrollment certificate is kept by default.
pub const DEFAULT_TLS_DIR: &str = "/var/lib/wazuh-proxy";

/// The validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// How long sessions may run on after SIGTERM before they are closed.
    pub drain_timeout: Duration,
    /// The admin HTTP API.
    pub admin: AdminSettings,
    /// The listeners.
    pub listeners: Vec<Listener>,
    /// Run as this user (and its groups) once the listeners are bound, when started as root.
    pub user: Option<String>,
    /// How long a worker thread that has just moved a lot of data waits before sleeping, so
    /// that its next round moves more per system call (see `wazuh_proxy_core::pace`). Zero
    /// turns it off; a quiet proxy never waits.
    pub batch_window: Duration,
    /// How log lines are written (read at start; a reload does not change it).
    pub log_format: crate::logging::LogFormat,
    /// Name servers for SRV lookups (`resolvers`); empty: the system's (/etc/resolv.conf).
    pub resolvers: Vec<SocketAddr>,
}

/// Accepts a `batch_window` (file or command line) up to `pace::MAX_WINDOW`.
///
/// # Errors
/// The message to show when it is longer.
pub fn check_batch_window(window: Duration) -> Result<Duration, String> {
    let max = wazuh_proxy_core::pace::MAX_WINDOW;
    if window > max {
        return Err(format!(
            "batch_window must be at most {}",
            humantime::format_duration(max)
        ));
    }
    Ok(window)
}

/// Default batching pause under load: 200 µs (measured: about 1.5 times the frames per CPU
/// second of no pause on 256-byte events; BENCHMARKS.md).
pub const DEFAULT_BATCH_WINDOW: Duration = Duration::from_micros(200);

/// Default pace of automatic rebalancing: every 5 s, at most 50 agents.
pub const DEFAULT_REBALANCE: (Duration, usize) = (Duration::from_secs(5), 50);

/// Default drain time after SIGTERM.
pub const DEFAULT_DRAIN: Duration = Duration::from_secs(30);

/// The largest configuration file read (16 MiB; real ones are a few KiB).
pub const MAX_CONFIG_SIZE: u64 = 16 * 1024 * 1024;

/// The `log_format` of a TOML configuration file, read before the file is loaded (so that the
/// loading itself logs in that format); `None` when absent or unreadable (the load reports it).
pub fn log_format_in_file(path: &std::path::Path) -> Option<crate::logging::LogFormat> {
    use std::io::Read;
    let mut text = String::new();
    std::fs::File::open(path)
        .ok()?
        .take(MAX_CONFIG_SIZE)
        .read_to_string(&mut text)
        .ok()?;
    let value: toml::Table = text.parse().ok()?;
    match value.get("log_format")?.as_str()? {
        "text" => Some(crate::logging::LogFormat::Text),
        "json" => Some(crate::logging::LogFormat::Json),
        _ => None,
    }
}

impl Config {
    /// Reads and validates a configuration file.
    ///
    /// # Errors
    /// [`ConfigError`] with file:line:column for anything wrong in the file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        use std::io::Read;
        let read_err = |source: std::io::Error| ConfigError::Read {
            path: path.to_owned(),
            source,
        };
        let file = std::fs::File::open(path).map_err(read_err)?;
        // A size cap read with `take`, not from metadata (pipes and devices report none): a
        // huge or endless file is refused after MAX_CONFIG_SIZE bytes, never read whole.
        let mut bytes = Vec::new();
        file.take(MAX_CONFIG_SIZE + 1)
            .read_to_end(&mut bytes)
            .map_err(read_err)?;
        if bytes.len() as u64 > MAX_CONFIG_SIZE {
            return Err(read_err(std::io::Error::other(format!(
                "larger than {MAX_CONFIG_SIZE} bytes"
            ))));
        }
        let text = String::from_utf8(bytes).map_err(|e| {
            read_err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("not UTF-8 text (at byte {})", e.utf8_error().valid_up_to()),
            ))
        })?;
        Config::parse(&text, &path.display().to_string())
    }

    /// The quick form: one agent listener on `listen` in front of `backends`.
    ///
    /// # Errors
    /// When an address does not resolve or the backend set is invalid.
    pub fn quick(
        listen: &str,
        backends: &[String],
        balance: Policy,
    ) -> Result<Config, ConfigError> {
        let src = Source {
            origin: "<command line>",
            text: "",
        };
        let listen = resolve_one(listen).map_err(|e| src.error(None, format!("--listen: {e}")))?;
        let mut list = Vec::new();
        for b in backends {
            for addr in resolve_all(b).map_err(|e| src.error(None, format!("--backend: {e}")))? {
                list.push(BackendConfig::new(addr));
            }
        }
        wazuh_proxy_core::balance::Balancer::new(balance, list.clone())
            .map_err(|e| src.error(None, e))?;
        Ok(Config {
            drain_timeout: DEFAULT_DRAIN,
            batch_window: DEFAULT_BATCH_WINDOW,
            admin: AdminSettings::default(),
            user: None,
            log_format: crate::logging::LogFormat::default(),
            listeners: vec![Listener::new(
                "agents".into(),
                listen,
                balance,
                list,
                ListenerSpec::Agent(AgentSpec::default()),
            )],
            resolvers: Vec::new(),
        })
    }
}
