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

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, ToSocketAddrs};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use toml::Spanned;
use wazuh_proxy_core::balance::{BackendConfig, Policy};
use wazuh_proxy_core::relay::AgentRelayConfig;
use wazuh_proxy_core::session::DuplicatePolicy;

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

/// The file as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    drain_timeout: Option<Dur>,
    batch_window: Option<Spanned<Dur>>,
    admin: Option<Spanned<String>>,
    admin_token_file: Option<Spanned<PathBuf>>,
    user: Option<Spanned<String>>,
    log_format: Option<crate::logging::LogFormat>,
    resolvers: Option<Spanned<Vec<Spanned<String>>>>,
    #[serde(default)]
    listener: Vec<Spanned<FileListener>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileListener {
    name: Option<String>,
    listen: Spanned<String>,
    kind: Option<Spanned<String>>,
    balance: Option<Spanned<String>>,
    duplicate: Option<Spanned<String>>,
    first_frame_timeout: Option<Dur>,
    connect_timeout: Option<Dur>,
    idle_timeout: Option<Dur>,
    max_payload: Option<Spanned<u32>>,
    tcp_keepalive: Option<Dur>,
    keys: Option<Spanned<PathBuf>>,
    keys_reload: Option<Dur>,
    health_check: Option<Spanned<String>>,
    health_check_interval: Option<Dur>,
    health_check_timeout: Option<Dur>,
    health_check_rise: Option<u32>,
    health_check_fall: Option<u32>,
    rebalance_interval: Option<Dur>,
    rebalance_batch: Option<usize>,
    tls_cert: Option<Spanned<PathBuf>>,
    tls_key: Option<Spanned<PathBuf>>,
    tls_dir: Option<PathBuf>,
    backend_ca: Option<Spanned<PathBuf>>,
    backend_server_name: Option<String>,
    backend_verify: Option<Spanned<bool>>,
    backend_cert: Option<Spanned<PathBuf>>,
    backend_key: Option<Spanned<PathBuf>>,
    replay_ttl: Option<Dur>,
    failover: Option<bool>,
    hold_timeout: Option<Dur>,
    reply_timeout: Option<Dur>,
    manager_user_timeout: Option<Dur>,
    liveness_timeout: Option<Dur>,
    overtake_time: Option<Dur>,
    refused_backoff: Option<Dur>,
    refused_backoff_max: Option<Dur>,
    max_connections_per_source: Option<u32>,
    connection_rate_per_source: Option<f64>,
    connection_burst_per_source: Option<f64>,
    source: Option<Spanned<String>>,
    resolve_interval: Option<Dur>,
    proxy_protocol: Option<Spanned<bool>>,
    proxy_protocol_trusted: Option<Spanned<Vec<Spanned<String>>>>,
    backends: Spanned<Vec<Spanned<FileBackend>>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileBackend {
    address: Option<Spanned<String>>,
    srv: Option<Spanned<String>>,
    weight: Option<u32>,
    max_fails: Option<u32>,
    fail_timeout: Option<Dur>,
    #[serde(default)]
    backup: bool,
    #[serde(default)]
    down: bool,
}

/// Every key the configuration file accepts, by section: `top`, `listener` (`[[listener]]`)
/// and `backend` (an entry of `backends`). Read from the parser itself (serde lists the
/// expected fields when it meets an unknown one), so it cannot drift from what is parsed.
pub fn known_keys() -> Vec<(&'static str, Vec<String>)> {
    fn expected(text: &str) -> Vec<String> {
        let message = match toml::from_str::<FileConfig>(text) {
            Err(e) => e.message().to_owned(),
            Ok(_) => String::new(),
        };
        let list = message.split_once("expected").map_or("", |(_, l)| l);
        let mut keys: Vec<String> = list
            .split('`')
            .skip(1)
            .step_by(2)
            .map(str::to_owned)
            .collect();
        keys.sort();
        keys
    }
    vec![
        ("top", expected("zz_unknown = 1\n")),
        ("listener", expected("[[listener]]\nzz_unknown = 1\n")),
        (
            "backend",
            expected("[[listener]]\nlisten = \"x\"\nbackends = [{ zz_unknown = 1 }]\n"),
        ),
    ]
}

/// The kinds a `[[listener]]` key applies to, as bits of [`kind_bit`].
const AGENT: u8 = 1;
const UDP: u8 = 2;
const TCP: u8 = 4;
const ENROLL: u8 = 8;
const EVERY: u8 = AGENT | UDP | TCP | ENROLL;

/// Every `[[listener]]` key and the listener kinds it changes something on. A key set on a
/// listener of another kind is refused by `check-config` (never accepted and ignored); a unit
/// test checks that every key is listed and that each listed pair changes what runs.
pub const LISTENER_KEYS: &[(&str, u8)] = &[
    ("name", EVERY),
    ("listen", EVERY),
    ("kind", EVERY),
    ("balance", EVERY),
    ("backends", EVERY),
    ("resolve_interval", EVERY),
    ("health_check", EVERY),
    ("health_check_interval", EVERY),
    ("health_check_timeout", EVERY),
    ("health_check_rise", EVERY),
    ("health_check_fall", EVERY),
    // Per source address: connections (agent, tcp, enroll) or flows (udp).
    ("max_connections_per_source", EVERY),
    ("connection_rate_per_source", EVERY),
    ("connection_burst_per_source", EVERY),
    // agent: the first whole frame; tcp: the first byte; enroll: TLS and the request line.
    ("first_frame_timeout", AGENT | TCP | ENROLL),
    ("connect_timeout", AGENT | TCP | ENROLL),
    ("idle_timeout", AGENT | UDP | TCP),
    ("tcp_keepalive", AGENT | TCP),
    ("max_payload", AGENT | UDP),
    ("proxy_protocol", AGENT | TCP | ENROLL),
    ("proxy_protocol_trusted", AGENT | TCP | ENROLL),
    ("duplicate", AGENT),
    ("keys", AGENT),
    ("keys_reload", AGENT),
    ("rebalance_interval", AGENT),
    ("rebalance_batch", AGENT),
    ("failover", AGENT),
    ("hold_timeout", AGENT),
    ("reply_timeout", AGENT),
    ("manager_user_timeout", AGENT),
    ("liveness_timeout", AGENT),
    ("overtake_time", AGENT),
    ("refused_backoff", AGENT),
    ("refused_backoff_max", AGENT),
    ("source", AGENT),
    ("tls_cert", ENROLL),
    ("tls_key", ENROLL),
    ("tls_dir", ENROLL),
    ("backend_ca", ENROLL),
    ("backend_server_name", ENROLL),
    ("backend_verify", ENROLL),
    ("backend_cert", ENROLL),
    ("backend_key", ENROLL),
    ("replay_ttl", ENROLL),
];

/// The bit of `kind` in [`LISTENER_KEYS`].
pub fn kind_bit(kind: ListenerKind) -> u8 {
    match kind {
        ListenerKind::Agent => AGENT,
        ListenerKind::Udp => UDP,
        ListenerKind::Tcp => TCP,
        ListenerKind::Enroll => ENROLL,
    }
}

/// The kinds in `bits`, for messages: `"agent" and "tcp"`.
fn kinds_text(bits: u8) -> String {
    let names: Vec<String> = [
        ListenerKind::Agent,
        ListenerKind::Udp,
        ListenerKind::Tcp,
        ListenerKind::Enroll,
    ]
    .into_iter()
    .filter(|k| bits & kind_bit(*k) != 0)
    .map(|k| format!("{:?}", serde_kind(k)))
    .collect();
    match names.split_last() {
        Some((last, rest)) if !rest.is_empty() => format!("{} and {last}", rest.join(", ")),
        _ => names.concat(),
    }
}

/// Where `key` is written inside the listener table that starts at `start`: the span of its
/// line, or `None` (then the listener's own position is used).
fn key_span(text: &str, start: usize, key: &str) -> Option<Range<usize>> {
    let start = start.min(text.len());
    let region = &text[start..];
    // The table ends where the next table header starts.
    let body_from = if region.trim_start().starts_with('[') {
        region.find('\n').map_or(region.len(), |i| i + 1)
    } else {
        0
    };
    let end = region[body_from..]
        .find("\n[")
        .map_or(region.len(), |i| body_from + i + 1);
    let mut at = start + body_from;
    for line in region[body_from..end].split_inclusive('\n') {
        let t = line.trim_start();
        if let Some(rest) = t.strip_prefix(key) {
            let rest = rest.trim_start();
            if rest.starts_with('=') {
                let col = line.len() - t.len();
                return Some(at + col..at + col + key.len());
            }
        }
        at += line.len();
    }
    None
}

/// Why a key does not apply to a kind, where that is not obvious.
fn why_not(key: &str, kind: ListenerKind) -> &'static str {
    match (key, kind) {
        ("proxy_protocol" | "proxy_protocol_trusted", ListenerKind::Udp) => {
            " (load balancers in front of Wazuh send the PROXY header on TCP only; PROXY v2 over UDP, one header per datagram, is not what nginx, HAProxy or cloud load balancers forward to 1514/udp)"
        }
        _ => "",
    }
}

/// Refuses every key of a listener that does not apply to its kind, with the key's line.
fn check_keys_apply(
    keys: &[String],
    kind: ListenerKind,
    start: usize,
    src: &Source<'_>,
) -> Result<(), ConfigError> {
    for key in keys {
        let Some((_, bits)) = LISTENER_KEYS.iter().find(|(k, _)| k == key) else {
            continue;
        };
        if bits & kind_bit(kind) == 0 {
            let at = key_span(src.text, start, key).or(Some(start..start));
            return Err(src.error(
                at,
                format!(
                    "{key} is only used by kind = {} listeners; this listener is kind = {:?}{}",
                    kinds_text(*bits),
                    serde_kind(kind),
                    why_not(key, kind)
                ),
            ));
        }
    }
    Ok(())
}

/// Active health checks: `health_check` (`none`, `tcp`, `agent`; default `tcp`, and `none` on
/// udp listeners, whose managers may have nothing on TCP) and its timing keys, which are
/// refused when no check runs.
fn health_of(
    l: &FileListener,
    kind: ListenerKind,
    start: usize,
    src: &Source<'_>,
) -> Result<Option<wazuh_proxy_core::health::HealthCheck>, ConfigError> {
    use wazuh_proxy_core::health::{HealthCheck, Probe};
    let kind_name = serde_kind(kind);
    let probe = match &l.health_check {
        None if kind == ListenerKind::Udp => None,
        None => Some(Probe::Connect),
        Some(h) => match (h.get_ref().as_str(), kind) {
            ("none", _) => None,
            ("tcp", _) => Some(Probe::Connect),
            ("agent", ListenerKind::Agent) => Some(Probe::AgentTcp),
            ("agent", ListenerKind::Udp) => Some(Probe::AgentUdp),
            ("agent", _) => {
                return Err(src.error(
                    Some(h.span()),
                    format!("health_check = \"agent\" sends the agent protocol's #ping: only for kind = \"agent\" and \"udp\" listeners; this listener is kind = {kind_name:?} (use \"tcp\" or \"none\")"),
                ))
            }
            (other, _) => {
                return Err(src.error(
                    Some(h.span()),
                    format!("unknown health_check {other:?} (expected none, tcp or agent)"),
                ))
            }
        },
    };
    let off_by_interval = matches!(l.health_check_interval, Some(Dur(d)) if d.is_zero());
    if off_by_interval {
        if let (Some(h), Some(_)) = (&l.health_check, probe) {
            return Err(src.error(
                Some(h.span()),
                "health_check asks for probes but health_check_interval = \"0s\" turns them off",
            ));
        }
    }
    let Some(probe) = probe.filter(|_| !off_by_interval) else {
        let set = [
            (
                "health_check_interval",
                l.health_check_interval.is_some() && !off_by_interval,
            ),
            ("health_check_timeout", l.health_check_timeout.is_some()),
            ("health_check_rise", l.health_check_rise.is_some()),
            ("health_check_fall", l.health_check_fall.is_some()),
        ];
        if let Some((key, _)) = set.iter().find(|(_, on)| *on) {
            return Err(src.error(
                key_span(src.text, start, key).or(Some(start..start)),
                format!("{key} is only used with active health checks, and this kind = {kind_name:?} listener has none (health_check = \"none\"{}): set health_check = \"tcp\" or \"agent\"",
                    if l.health_check.is_none() { ", the default for udp" } else { "" }),
            ));
        }
        return Ok(None);
    };
    let defaults = HealthCheck::default();
    Ok(Some(HealthCheck {
        probe,
        interval: l.health_check_interval.map_or(defaults.interval, |d| d.0),
        timeout: l.health_check_timeout.map_or(defaults.timeout, |d| d.0),
        rise: l.health_check_rise.unwrap_or(defaults.rise).max(1),
        fall: l.health_check_fall.unwrap_or(defaults.fall).max(1),
    }))
}

/// `proxy_protocol` and `proxy_protocol_trusted`: both or neither; agent, tcp and enroll kinds.
fn proxy_protocol_of(
    l: &FileListener,
    kind: ListenerKind,
    src: &Source<'_>,
) -> Result<Option<wazuh_proxy_core::proxy_protocol::ProxyProtocol>, ConfigError> {
    let on = l.proxy_protocol.as_ref().map(|p| (*p.get_ref(), p.span()));
    match (on, &l.proxy_protocol_trusted) {
        (None | Some((false, _)), None) => Ok(None),
        (None | Some((false, _)), Some(t)) => Err(src.error(
            Some(t.span()),
            "proxy_protocol_trusted is only used with proxy_protocol = true",
        )),
        (Some((true, span)), None) => Err(src.error(
            Some(span),
            "proxy_protocol = true needs proxy_protocol_trusted = [\"CIDR\", ...]: the load balancers allowed to send the header",
        )),
        (Some((true, span)), Some(t)) => {
            if kind == ListenerKind::Udp {
                // Load balancers in front of Wazuh (nginx stream, HAProxy, cloud NLBs) send
                // PROXY headers on TCP only; over UDP nothing would send the per-datagram v2
                // header this would have to expect.
                return Err(src.error(
                    Some(span),
                    "proxy_protocol is not supported on kind = \"udp\" listeners: load balancers in front of Wazuh send the PROXY header on TCP only (PROXY v2 over UDP, one header per datagram, is not what nginx, HAProxy or cloud load balancers forward to 1514/udp); use it on agent, tcp and enroll listeners",
                ));
            }
            if t.get_ref().is_empty() {
                return Err(src.error(Some(t.span()), "proxy_protocol_trusted is empty"));
            }
            let mut trusted = Vec::new();
            for c in t.get_ref() {
                trusted.push(c.get_ref().parse().map_err(|e| src.error(Some(c.span()), e))?);
            }
            Ok(Some(wazuh_proxy_core::proxy_protocol::ProxyProtocol { trusted }))
        }
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

/// One validated listener.
#[derive(Debug, Clone)]
pub struct Listener {
    /// Name used in logs, metrics and the admin API.
    pub name: String,
    /// Address to bind.
    pub listen: SocketAddr,
    /// What it carries.
    pub kind: ListenerKind,
    /// How backends are chosen.
    pub balance: Policy,
    /// The managers.
    pub backends: Vec<BackendConfig>,
    /// Settings of the framed agent relay (kind `agent`); timeouts also used by the others.
    pub agent: AgentRelayConfig,
    /// client.keys to verify agents with (kind `agent`), and how often to check it for changes.
    pub keys: Option<(PathBuf, Duration)>,
    /// Active health checks (`None`: passive checks only).
    pub health: Option<wazuh_proxy_core::health::HealthCheck>,
    /// TLS settings of an `enroll` listener.
    pub enroll: Option<EnrollSettings>,
    /// Agents moved back to their preferred manager every interval, at most this many (kind
    /// `agent`; `None`: only on request).
    pub rebalance: Option<(Duration, usize)>,
    /// Backend names resolved again every interval (`resolve_interval`); `None`: resolved
    /// once, when the configuration is loaded.
    pub resolve: Option<Resolve>,
    /// Kind `tcp`: time allowed for the client's first byte (`first_frame_timeout`; `None`
    /// unless set).
    pub first_byte_timeout: Option<Duration>,
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

/// TLS settings of an enrollment listener in terminate mode.
#[derive(Debug, Clone)]
pub struct EnrollSettings {
    /// The certificate agents see.
    pub server_cert: wazuh_proxy_core::enroll::ServerCert,
    /// How managers' certificates are checked.
    pub backend_tls: wazuh_proxy_core::enroll::BackendTls,
    /// The certificate presented to managers that require one (`<ssl_agent_ca>`).
    pub backend_client_cert: Option<wazuh_proxy_core::enroll::ClientCert>,
    /// How long an unacknowledged key reply is kept for a retry (0: no replay).
    pub replay_ttl: Duration,
    /// Where a self-signed certificate is kept.
    pub tls_dir: PathBuf,
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

/// A string as a TOML literal (user text may hold characters Rust's `{:?}` escapes in ways
/// TOML does not read, such as `\u{590}`).
fn toml_str(s: &str) -> String {
    toml::Value::String(s.to_owned()).to_string()
}

/// Default pace of automatic rebalancing: every 5 s, at most 50 agents.
pub const DEFAULT_REBALANCE: (Duration, usize) = (Duration::from_secs(5), 50);

/// Default drain time after SIGTERM.
pub const DEFAULT_DRAIN: Duration = Duration::from_secs(30);

/// The largest configuration file read (16 MiB; real ones are a few KiB).
pub const MAX_CONFIG_SIZE: u64 = 16 * 1024 * 1024;

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

    /// Parses and validates configuration text; `origin` names it in errors.
    ///
    /// # Errors
    /// [`ConfigError::Invalid`] with the position of the problem.
    pub fn parse(text: &str, origin: &str) -> Result<Config, ConfigError> {
        let src = Source { origin, text };
        let file: FileConfig =
            toml::from_str(text).map_err(|e| src.error(e.span(), e.message()))?;
        if file.listener.is_empty() {
            return Err(src.error(None, "no [[listener]] defined"));
        }
        let mut admin = AdminSettings::default();
        if let Some(a) = &file.admin {
            admin.listen = parse_admin(a.get_ref()).map_err(|e| src.error(Some(a.span()), e))?;
        }
        if let Some(t) = &file.admin_token_file {
            if t.get_ref().as_os_str().is_empty() {
                return Err(src.error(Some(t.span()), "admin_token_file is empty"));
            }
            admin.token_file = Some(t.get_ref().clone());
        }
        // The keys each listener sets, as written (to refuse those its kind does not use).
        let raw: toml::Table =
            toml::from_str(text).map_err(|e| src.error(e.span(), e.message()))?;
        let raw_keys = |i: usize| -> Vec<String> {
            raw.get("listener")
                .and_then(|l| l.as_array())
                .and_then(|a| a.get(i))
                .and_then(|t| t.as_table())
                .map(|t| t.keys().cloned().collect())
                .unwrap_or_default()
        };
        let mut resolvers = Vec::new();
        for r in file.resolvers.iter().flat_map(|r| r.get_ref()) {
            let text = r.get_ref();
            let addr = text
                .parse::<SocketAddr>()
                .or_else(|_| {
                    text.parse::<std::net::IpAddr>()
                        .map(|ip| SocketAddr::new(ip, 53))
                })
                .map_err(|_| {
                    src.error(
                        Some(r.span()),
                        format!("resolvers: {text:?} is not an IP address or IP:port"),
                    )
                })?;
            resolvers.push(addr);
        }
        let mut listeners = Vec::new();
        for (i, l) in file.listener.into_iter().enumerate() {
            let span = l.span();
            let l = l.into_inner();
            let listen =
                resolve_one(l.listen.get_ref()).map_err(|e| src.error(Some(l.listen.span()), e))?;
            let kind = match &l.kind {
                Some(k) => k
                    .get_ref()
                    .parse()
                    .map_err(|e| src.error(Some(k.span()), e))?,
                None => ListenerKind::Agent,
            };
            check_keys_apply(&raw_keys(i), kind, span.start, &src)?;
            if l.keys_reload.is_some() && l.keys.is_none() {
                let at = key_span(text, span.start, "keys_reload");
                return Err(src.error(at, "keys_reload is only used with keys"));
            }
            if l.backend_server_name.is_some() && l.backend_ca.is_none() {
                let at = key_span(text, span.start, "backend_server_name");
                return Err(src.error(at, "backend_server_name is only used with backend_ca"));
            }
            let balance = match &l.balance {
                Some(b) => b
                    .get_ref()
                    .parse::<Policy>()
                    .map_err(|e| src.error(Some(b.span()), e))?,
                None if matches!(kind, ListenerKind::Tcp | ListenerKind::Enroll) => Policy::Source,
                None => Policy::AgentId,
            };
            if matches!(kind, ListenerKind::Tcp | ListenerKind::Enroll)
                && balance == Policy::AgentId
            {
                let span = l.balance.as_ref().map(|b| b.span());
                return Err(src.error(span, "balance = \"agent-id\" needs a listener that reads agent IDs (kind agent or udp)"));
            }
            let mut agent = AgentRelayConfig::default();
            if let Some(d) = &l.duplicate {
                agent.duplicate_policy = d
                    .get_ref()
                    .parse::<DuplicatePolicy>()
                    .map_err(|e| src.error(Some(d.span()), e))?;
            }
            if let Some(Dur(d)) = l.first_frame_timeout {
                agent.first_frame_timeout = d;
            }
            // On tcp listeners only when asked for: a relayed service may be one where the
            // server speaks first.
            let first_byte_timeout = match (kind, l.first_frame_timeout) {
                (ListenerKind::Tcp, Some(Dur(d))) => Some(d),
                _ => None,
            };
            if let Some(Dur(d)) = l.connect_timeout {
                agent.connect_timeout = d;
            }
            match l.idle_timeout {
                Some(Dur(d)) => agent.idle_timeout = (!d.is_zero()).then_some(d),
                // A UDP flow holds a socket: expire it soon after the agent goes quiet.
                None if kind == ListenerKind::Udp => {
                    agent.idle_timeout = Some(Duration::from_secs(120))
                }
                None => {}
            }
            if let Some(Dur(d)) = l.tcp_keepalive {
                agent.tcp_keepalive = (!d.is_zero()).then_some(d);
            }
            if let Some(m) = &l.max_payload {
                let min = wazuh_proxy_core::relay::MIN_MAX_PAYLOAD;
                let max = wazuh_proxy_core::frame::MAX_PAYLOAD;
                if !(min..=max).contains(m.get_ref()) {
                    return Err(src.error(
                        Some(m.span()),
                        format!("max_payload must be {min}..={max} (agents' startup and keepalive messages must fit)"),
                    ));
                }
                agent.max_payload = *m.get_ref();
            }
            let mut backends = Vec::new();
            let resolve_every = l.resolve_interval.map(|d| d.0).filter(|d| !d.is_zero());
            let mut named = Vec::new();
            let mut literal = Vec::new();
            for b in l.backends.get_ref() {
                let fb = b.get_ref();
                let (text, srv, text_span) = match (&fb.address, &fb.srv) {
                    (Some(a), None) => (a.get_ref(), false, a.span()),
                    (None, Some(s)) => (s.get_ref(), true, s.span()),
                    (Some(_), Some(s)) => {
                        return Err(
                            src.error(Some(s.span()), "a backend has address or srv, not both")
                        )
                    }
                    (None, None) => {
                        return Err(src.error(
                            Some(b.span()),
                            "a backend needs address (host:port) or srv (an SRV record name)",
                        ))
                    }
                };
                if srv && resolve_every.is_none() {
                    return Err(src.error(
                        Some(text_span),
                        "srv needs resolve_interval on the listener (how often the SRV record is looked up again)",
                    ));
                }
                let is_literal = !srv && text.parse::<SocketAddr>().is_ok();
                // (address, a backup because of its SRV priority)
                let mut load_error = None;
                let addrs: Vec<(SocketAddr, bool)> = if srv {
                    // Not resolving yet is allowed: the backend waits for the record.
                    crate::dns::srv_at_load(text, &resolvers).unwrap_or_else(|e| {
                        load_error = Some(e);
                        Vec::new()
                    })
                } else {
                    match resolve_all(text) {
                        Ok(a) => a.into_iter().map(|a| (a, false)).collect(),
                        // With re-resolution a name may resolve later: the backend waits.
                        Err(e) if resolve_every.is_some() && !is_literal => {
                            load_error = Some(e);
                            Vec::new()
                        }
                        Err(e) => return Err(src.error(Some(text_span), e)),
                    }
                };
                let mut template = BackendConfig::new(SocketAddr::from(([0, 0, 0, 0], 0)));
                if let Some(w) = fb.weight {
                    template = template.with_weight(w);
                }
                if let Some(m) = fb.max_fails {
                    template = template.with_max_fails(m);
                }
                if let Some(Dur(t)) = fb.fail_timeout {
                    template = template.with_fail_timeout(t);
                }
                if fb.backup {
                    template = template.as_backup();
                }
                if fb.down {
                    template = template.as_down();
                }
                if resolve_every.is_some() && !is_literal {
                    named.push(NamedBackend {
                        name: text.clone(),
                        srv,
                        template: template.clone(),
                        resolved_at_load: !addrs.is_empty(),
                        load_error: load_error.clone(),
                    });
                }
                for (addr, srv_backup) in addrs {
                    // Named twice (a name and an SRV target): one backend.
                    if backends.iter().any(|b: &BackendConfig| b.addr == addr) && !is_literal {
                        continue;
                    }
                    let mut c = BackendConfig::new(addr);
                    if srv_backup {
                        c = c.as_backup();
                    }
                    if let Some(w) = fb.weight {
                        c = c.with_weight(w);
                    }
                    if let Some(m) = fb.max_fails {
                        c = c.with_max_fails(m);
                    }
                    if let Some(Dur(t)) = fb.fail_timeout {
                        c = c.with_fail_timeout(t);
                    }
                    if fb.backup {
                        c = c.as_backup();
                    }
                    if fb.down {
                        c = c.as_down();
                    }
                    if is_literal || resolve_every.is_none() {
                        literal.push(c.clone());
                    }
                    backends.push(c);
                }
            }
            if backends.is_empty() && !named.is_empty() {
                return Err(src.error(
                    Some(l.backends.span()),
                    "no backend of this listener resolves yet: at least one must, to start (the others are added when they resolve)",
                ));
            }
            let resolve = resolve_every
                .filter(|_| !named.is_empty())
                .map(|interval| Resolve {
                    interval,
                    literal,
                    named,
                    resolvers: resolvers.clone(),
                });
            // The balancer's own validation (empty set, duplicates, weights, all down).
            if let Err(e) = wazuh_proxy_core::balance::Balancer::new(balance, backends.clone()) {
                return Err(src.error(Some(l.backends.span()), e));
            }
            let keys = match &l.keys {
                Some(path) if kind != ListenerKind::Agent => {
                    return Err(src.error(
                        Some(path.span()),
                        "keys is only used by kind = \"agent\" listeners",
                    ));
                }
                Some(path) => Some((
                    path.get_ref().clone(),
                    l.keys_reload
                        .map_or(wazuh_proxy_core::keys::DEFAULT_RELOAD_INTERVAL, |d| d.0),
                )),
                None => None,
            };
            if let Some(f) = l.failover {
                agent.failover = f;
            }
            if let Some(Dur(d)) = l.hold_timeout {
                agent.hold_timeout = d;
            }
            if let Some(Dur(d)) = l.reply_timeout {
                agent.reply_timeout = (!d.is_zero()).then_some(d);
            }
            if let Some(Dur(d)) = l.manager_user_timeout {
                agent.manager_user_timeout = (!d.is_zero()).then_some(d);
            }
            if let Some(Dur(d)) = l.liveness_timeout {
                agent.liveness_timeout = (!d.is_zero()).then_some(d);
            }
            if let Some(Dur(d)) = l.overtake_time {
                agent.overtake_time = d;
            }
            if let Some(Dur(d)) = l.refused_backoff {
                agent.refused_backoff = d;
            }
            if let Some(Dur(d)) = l.refused_backoff_max {
                agent.refused_backoff_max = d;
            }
            if let Some(n) = l.max_connections_per_source {
                agent.source_limits.max_open = n;
            }
            if let Some(r) = l.connection_rate_per_source {
                agent.source_limits.rate = r.max(0.0);
            }
            if let Some(b) = l.connection_burst_per_source {
                agent.source_limits.burst = b.max(1.0);
            }
            if let Some(s) = &l.source {
                if kind != ListenerKind::Agent {
                    return Err(src.error(
                        Some(s.span()),
                        "source is only used by kind = \"agent\" listeners",
                    ));
                }
                agent.transparent = match s.get_ref().as_str() {
                    "proxy" => false,
                    "transparent" => true,
                    other => {
                        return Err(src.error(
                            Some(s.span()),
                            format!("unknown source {other:?} (expected proxy or transparent)"),
                        ))
                    }
                };
            }
            // Every setting against its range and the ones it works with: what is accepted
            // here must never fail at run time.
            agent
                .validate()
                .map_err(|e| src.error(Some(span.clone()), format!("listener {}: {e}", i + 1)))?;
            agent.proxy_protocol = proxy_protocol_of(&l, kind, &src)?;
            let enroll = if kind == ListenerKind::Enroll {
                use wazuh_proxy_core::enroll::{BackendTls, ServerCert};
                let tls_dir = l
                    .tls_dir
                    .clone()
                    .unwrap_or_else(|| PathBuf::from(DEFAULT_TLS_DIR));
                let server_cert = match (&l.tls_cert, &l.tls_key) {
                    (Some(c), Some(k)) => ServerCert::Files {
                        cert: c.get_ref().clone(),
                        key: k.get_ref().clone(),
                    },
                    (None, None) => ServerCert::self_signed(
                        tls_dir.join("enroll-cert.pem"),
                        tls_dir.join("enroll-key.pem"),
                    ),
                    (Some(s), None) | (None, Some(s)) => {
                        return Err(src.error(Some(s.span()), "tls_cert and tls_key go together"));
                    }
                };
                let verify = l.backend_verify.as_ref().map(|v| (*v.get_ref(), v.span()));
                let backend_tls = match (&l.backend_ca, verify) {
                    (Some(ca), None | Some((true, _))) => BackendTls::VerifyCa {
                        ca_file: ca.get_ref().clone(),
                        server_name: l.backend_server_name.clone(),
                    },
                    (None, Some((false, _))) => BackendTls::NoVerify,
                    (Some(_), Some((false, span))) | (None, Some((true, span))) => {
                        return Err(src.error(Some(span), "backend_verify = false cannot go with backend_ca; backend_verify = true needs backend_ca"));
                    }
                    (None, None) => {
                        return Err(src.error(Some(span), "an enroll listener needs backend_ca (the managers' certificate or CA) or an explicit backend_verify = false"));
                    }
                };
                let backend_client_cert = match (&l.backend_cert, &l.backend_key) {
                    (Some(c), Some(k)) => {
                        let cert = wazuh_proxy_core::enroll::ClientCert {
                            cert: c.get_ref().clone(),
                            key: k.get_ref().clone(),
                        };
                        // Checked here so that check-config points at the setting.
                        if let Err(e) = cert.check() {
                            let at = match &e {
                                wazuh_proxy_core::enroll::TlsError::Io { path, .. }
                                | wazuh_proxy_core::enroll::TlsError::Pem { path, .. }
                                    if path == k.get_ref() && path != c.get_ref() =>
                                {
                                    k.span()
                                }
                                _ => c.span(),
                            };
                            return Err(
                                src.error(Some(at), format!("backend_cert/backend_key: {e}"))
                            );
                        }
                        Some(cert)
                    }
                    (None, None) => None,
                    (Some(s), None) | (None, Some(s)) => {
                        return Err(
                            src.error(Some(s.span()), "backend_cert and backend_key go together")
                        );
                    }
                };
                Some(EnrollSettings {
                    server_cert,
                    backend_tls,
                    backend_client_cert,
                    replay_ttl: l.replay_ttl.map_or(Duration::from_secs(600), |d| d.0),
                    tls_dir,
                })
            } else {
                let stray = [
                    (l.tls_cert.as_ref().map(|s| s.span()), "tls_cert"),
                    (l.tls_key.as_ref().map(|s| s.span()), "tls_key"),
                    (l.backend_ca.as_ref().map(|s| s.span()), "backend_ca"),
                    (
                        l.backend_verify.as_ref().map(|s| s.span()),
                        "backend_verify",
                    ),
                    (l.backend_cert.as_ref().map(|s| s.span()), "backend_cert"),
                    (l.backend_key.as_ref().map(|s| s.span()), "backend_key"),
                ];
                for (set, what) in stray {
                    if let Some(span) = set {
                        return Err(src.error(
                            Some(span),
                            format!("{what} is only used by kind = \"enroll\" listeners"),
                        ));
                    }
                }
                None
            };
            let health = health_of(&l, kind, span.start, &src)?;
            let rebalance = match (kind, l.rebalance_interval, l.rebalance_batch) {
                (ListenerKind::Agent, Some(Dur(d)), _) if d.is_zero() => None,
                (ListenerKind::Agent, _, Some(0)) => None,
                (ListenerKind::Agent, every, batch) => Some((
                    every.map_or(DEFAULT_REBALANCE.0, |d| d.0),
                    batch.unwrap_or(DEFAULT_REBALANCE.1),
                )),
                _ => None,
            };
            let name = l.name.unwrap_or_else(|| format!("listener{}", i + 1));
            if listeners.iter().any(|o: &Listener| o.name == name) {
                return Err(src.error(Some(span), format!("listener name {name:?} is used twice")));
            }
            if listeners.iter().any(|o: &Listener| {
                o.listen == listen && (o.kind == ListenerKind::Udp) == (kind == ListenerKind::Udp)
            }) {
                return Err(src.error(
                    Some(l.listen.span()),
                    format!("address {listen} is used by two listeners"),
                ));
            }
            listeners.push(Listener {
                name,
                listen,
                kind,
                balance,
                backends,
                agent,
                keys,
                health,
                rebalance,
                enroll,
                resolve,
                first_byte_timeout,
            });
        }
        if let Some(u) = &file.user {
            if u.get_ref().is_empty() || u.get_ref().contains(char::is_whitespace) {
                return Err(src.error(Some(u.span()), "user must be a user name"));
            }
        }
        let batch_window = match &file.batch_window {
            None => DEFAULT_BATCH_WINDOW,
            Some(w) => {
                check_batch_window(w.get_ref().0).map_err(|e| src.error(Some(w.span()), e))?
            }
        };
        Ok(Config {
            drain_timeout: file.drain_timeout.map_or(DEFAULT_DRAIN, |d| d.0),
            batch_window,
            admin,
            listeners,
            user: file.user.map(|u| u.into_inner()),
            log_format: file.log_format.unwrap_or_default(),
            resolvers,
        })
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
            listeners: vec![Listener {
                name: "agents".into(),
                listen,
                kind: ListenerKind::Agent,
                balance,
                backends: list,
                agent: AgentRelayConfig::default(),
                keys: None,
                health: Some(wazuh_proxy_core::health::HealthCheck::default()),
                rebalance: Some(DEFAULT_REBALANCE),
                enroll: None,
                resolve: None,
                first_byte_timeout: None,
            }],
            resolvers: Vec::new(),
        })
    }

    /// The effective configuration as TOML, every default written out.
    pub fn to_toml(&self) -> String {
        use std::fmt::Write;
        let d = |d: Duration| humantime::format_duration(d).to_string();
        // An optional timeout: "0s" means off.
        let od = |o: Option<Duration>| o.map_or_else(|| "0s".to_owned(), d);
        let mut out = String::new();
        let _ = writeln!(out, "drain_timeout = {:?}", d(self.drain_timeout));
        let _ = writeln!(out, "batch_window = {:?}", d(self.batch_window));
        match self.admin.listen {
            Some(a) => {
                let _ = writeln!(out, "admin = \"{a}\"");
            }
            None => {
                let _ = writeln!(out, "admin = \"none\"");
            }
        }
        if let Some(t) = &self.admin.token_file {
            let _ = writeln!(
                out,
                "admin_token_file = {}",
                toml_str(&t.display().to_string())
            );
        }
        if let Some(u) = &self.user {
            let _ = writeln!(out, "user = {}", toml_str(u));
        }
        let _ = writeln!(out, "log_format = \"{}\"", self.log_format.name());
        if !self.resolvers.is_empty() {
            let list: Vec<String> = self.resolvers.iter().map(|r| format!("\"{r}\"")).collect();
            let _ = writeln!(out, "resolvers = [{}]", list.join(", "));
        }
        for l in &self.listeners {
            let a = &l.agent;
            let _ = writeln!(out, "\n[[listener]]");
            let _ = writeln!(out, "name = {}", toml_str(&l.name));
            let _ = writeln!(out, "listen = \"{}\"", l.listen);
            let _ = writeln!(out, "kind = {:?}", serde_kind(l.kind));
            let _ = writeln!(out, "balance = \"{}\"", l.balance);
            if l.kind == ListenerKind::Agent {
                let _ = writeln!(out, "duplicate = \"{}\"", a.duplicate_policy);
                let _ = writeln!(out, "first_frame_timeout = {:?}", d(a.first_frame_timeout));
                let _ = writeln!(out, "max_payload = {}", a.max_payload);
                let _ = writeln!(out, "failover = {}", a.failover);
                let _ = writeln!(out, "hold_timeout = {:?}", d(a.hold_timeout));
                let _ = writeln!(out, "reply_timeout = {:?}", od(a.reply_timeout));
                let _ = writeln!(
                    out,
                    "manager_user_timeout = {:?}",
                    od(a.manager_user_timeout)
                );
                let _ = writeln!(out, "liveness_timeout = {:?}", od(a.liveness_timeout));
                let _ = writeln!(out, "overtake_time = {:?}", d(a.overtake_time));
                let _ = writeln!(out, "refused_backoff = {:?}", d(a.refused_backoff));
                let _ = writeln!(out, "refused_backoff_max = {:?}", d(a.refused_backoff_max));
                let source = if a.transparent {
                    "transparent"
                } else {
                    "proxy"
                };
                let _ = writeln!(out, "source = {source:?}");
            }
            // Only what the listener's kind uses: the output loads again.
            match l.kind {
                ListenerKind::Udp => {
                    let _ = writeln!(out, "max_payload = {}", a.max_payload);
                }
                ListenerKind::Enroll => {
                    let _ = writeln!(out, "first_frame_timeout = {:?}", d(a.first_frame_timeout));
                }
                ListenerKind::Tcp => {
                    if let Some(t) = l.first_byte_timeout {
                        let _ = writeln!(out, "first_frame_timeout = {:?}", d(t));
                    }
                }
                ListenerKind::Agent => {}
            }
            let _ = writeln!(
                out,
                "max_connections_per_source = {}",
                a.source_limits.max_open
            );
            let _ = writeln!(
                out,
                "connection_rate_per_source = {:?}",
                a.source_limits.rate
            );
            let _ = writeln!(
                out,
                "connection_burst_per_source = {:?}",
                a.source_limits.burst
            );
            if let Some(pp) = &a.proxy_protocol {
                let trusted: Vec<String> = pp.trusted.iter().map(|c| format!("\"{c}\"")).collect();
                let _ = writeln!(out, "proxy_protocol = true");
                let _ = writeln!(out, "proxy_protocol_trusted = [{}]", trusted.join(", "));
            }
            if l.kind != ListenerKind::Udp {
                let _ = writeln!(out, "connect_timeout = {:?}", d(a.connect_timeout));
            }
            if l.kind != ListenerKind::Enroll {
                let _ = writeln!(out, "idle_timeout = {:?}", od(a.idle_timeout));
            }
            if matches!(l.kind, ListenerKind::Agent | ListenerKind::Tcp) {
                let _ = writeln!(out, "tcp_keepalive = {:?}", od(a.tcp_keepalive));
            }
            match &l.health {
                Some(h) => {
                    use wazuh_proxy_core::health::Probe;
                    let probe = match h.probe {
                        Probe::Connect => "tcp",
                        Probe::AgentTcp | Probe::AgentUdp => "agent",
                    };
                    let _ = writeln!(out, "health_check = {probe:?}");
                    let _ = writeln!(out, "health_check_interval = {:?}", d(h.interval));
                    let _ = writeln!(out, "health_check_timeout = {:?}", d(h.timeout));
                    let _ = writeln!(out, "health_check_rise = {}", h.rise);
                    let _ = writeln!(out, "health_check_fall = {}", h.fall);
                }
                None => {
                    let _ = writeln!(out, "health_check = \"none\"");
                }
            }
            if l.kind == ListenerKind::Agent {
                match l.rebalance {
                    Some((every, batch)) => {
                        let _ = writeln!(out, "rebalance_interval = {:?}", d(every));
                        let _ = writeln!(out, "rebalance_batch = {batch}");
                    }
                    None => {
                        let _ = writeln!(out, "rebalance_interval = \"0s\"");
                    }
                }
            }
            if let Some(e) = &l.enroll {
                use wazuh_proxy_core::enroll::{BackendTls, ServerCert};
                match &e.server_cert {
                    ServerCert::Files { cert, key } => {
                        let _ =
                            writeln!(out, "tls_cert = {}", toml_str(&cert.display().to_string()));
                        let _ = writeln!(out, "tls_key = {}", toml_str(&key.display().to_string()));
                    }
                    _ => {
                        let _ = writeln!(
                            out,
                            "tls_dir = {}",
                            toml_str(&e.tls_dir.display().to_string())
                        );
                    }
                }
                match &e.backend_tls {
                    BackendTls::VerifyCa {
                        ca_file,
                        server_name,
                    } => {
                        let _ = writeln!(
                            out,
                            "backend_ca = {}",
                            toml_str(&ca_file.display().to_string())
                        );
                        if let Some(n) = server_name {
                            let _ = writeln!(out, "backend_server_name = {}", toml_str(n));
                        }
                    }
                    _ => {
                        let _ = writeln!(out, "backend_verify = false");
                    }
                }
                if let Some(c) = &e.backend_client_cert {
                    let _ = writeln!(
                        out,
                        "backend_cert = {}",
                        toml_str(&c.cert.display().to_string())
                    );
                    let _ = writeln!(
                        out,
                        "backend_key = {}",
                        toml_str(&c.key.display().to_string())
                    );
                }
                let _ = writeln!(out, "replay_ttl = {:?}", d(e.replay_ttl));
            }
            if let Some((path, every)) = &l.keys {
                let _ = writeln!(out, "keys = {}", toml_str(&path.display().to_string()));
                let _ = writeln!(out, "keys_reload = {:?}", d(*every));
            }
            // With re-resolution the names stay names (and the output loads again).
            let shown: Vec<(&str, String, &BackendConfig)> = match &l.resolve {
                Some(r) => {
                    let _ = writeln!(out, "resolve_interval = {:?}", d(r.interval));
                    r.literal
                        .iter()
                        .map(|b| ("address", b.addr.to_string(), b))
                        .chain(r.named.iter().map(|n| {
                            let key = if n.srv { "srv" } else { "address" };
                            (key, n.name.clone(), &n.template)
                        }))
                        .collect()
                }
                None => l
                    .backends
                    .iter()
                    .map(|b| ("address", b.addr.to_string(), b))
                    .collect(),
            };
            let _ = writeln!(out, "backends = [");
            for (key, address, b) in shown {
                let _ = writeln!(
                    out,
                    "  {{ {key} = {}, weight = {}, max_fails = {}, fail_timeout = {:?}, backup = {}, down = {} }},",
                    toml_str(&address), b.weight, b.max_fails, d(b.fail_timeout), b.backup, b.down
                );
            }
            let _ = writeln!(out, "]");
        }
        out
    }
}

fn serde_kind(k: ListenerKind) -> &'static str {
    match k {
        ListenerKind::Agent => "agent",
        ListenerKind::Udp => "udp",
        ListenerKind::Tcp => "tcp",
        ListenerKind::Enroll => "enroll",
    }
}

fn resolve_all(text: &str) -> Result<Vec<SocketAddr>, String> {
    if let Ok(a) = text.parse::<SocketAddr>() {
        return Ok(vec![a]);
    }
    let mut addrs: Vec<SocketAddr> = text
        .to_socket_addrs()
        .map_err(|e| format!("cannot resolve {text:?} (expected host:port): {e}"))?
        .collect();
    addrs.sort();
    addrs.dedup();
    if addrs.is_empty() {
        return Err(format!("{text:?} resolves to no address"));
    }
    Ok(addrs)
}

fn resolve_one(text: &str) -> Result<SocketAddr, String> {
    let all = resolve_all(text)?;
    match all.as_slice() {
        [one] => Ok(*one),
        _ => Err(format!(
            "{text:?} resolves to {} addresses; give one",
            all.len()
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
drain_timeout = "5s"

[[listener]]
name = "agents"
listen = "127.0.0.1:1514"
backends = [
  { address = "127.0.0.1:11514" },
  { address = "127.0.0.2:11514", weight = 3, backup = true },
]

[[listener]]
name = "enrollment"
listen = "127.0.0.1:1515"
kind = "tcp"
backends = [{ address = "127.0.0.1:11515" }]
"#;

    #[test]
    fn a_good_file_and_its_defaults() {
        let c = Config::parse(GOOD, "good.toml").unwrap();
        assert_eq!(c.drain_timeout, Duration::from_secs(5));
        assert_eq!(c.batch_window, DEFAULT_BATCH_WINDOW);
        assert_eq!(c.listeners.len(), 2);
        let a = &c.listeners[0];
        assert_eq!((a.kind, a.balance), (ListenerKind::Agent, Policy::AgentId));
        assert_eq!(a.backends[1].weight, 3);
        assert!(a.backends[1].backup);
        assert_eq!(c.listeners[1].balance, Policy::Source);
        // The printed effective config parses back to the same thing.
        let again = Config::parse(&c.to_toml(), "effective").unwrap();
        assert_eq!(again.to_toml(), c.to_toml());
    }

    fn err(text: &str) -> String {
        Config::parse(text, "x.toml").unwrap_err().to_string()
    }

    // Found by the config_toml fuzz target: Rust's `{:?}` wrote U+0590 as `\u{590}`, which
    // TOML does not read back.
    #[test]
    fn printed_strings_are_toml_whatever_they_hold() {
        let odd = "/var\u{590}ssec/etc/cl\tient \"keys\"\u{0}.keys";
        let text = GOOD.replacen(
            "name = \"agents\"",
            &format!(
                "name = {}\nkeys = {}",
                toml_str("a\u{7f}b\u{590}"),
                toml_str(odd)
            ),
            1,
        );
        let c = Config::parse(&text, "x.toml").unwrap();
        let printed = c.to_toml();
        let again = Config::parse(&printed, "printed.toml").unwrap();
        assert_eq!(again.to_toml(), printed);
        assert_eq!(again.listeners[0].name, "a\u{7f}b\u{590}");
        assert_eq!(
            again.listeners[0].keys.as_ref().unwrap().0,
            std::path::Path::new(odd)
        );
    }

    #[test]
    fn batch_window_is_bounded() {
        let with = |w: &str| {
            GOOD.replace(
                "drain_timeout = \"5s\"",
                &format!("drain_timeout = \"5s\"\nbatch_window = \"{w}\""),
            )
        };
        let c = Config::parse(&with("0s"), "x.toml").unwrap();
        assert_eq!(c.batch_window, Duration::ZERO);
        let c = Config::parse(&with("1ms"), "x.toml").unwrap();
        assert_eq!(c.batch_window, Duration::from_millis(1));
        let e = err(&with("1s"));
        assert!(
            e.starts_with("x.toml:3:") && e.contains("at most 5ms"),
            "{e}"
        );
    }

    #[test]
    fn unknown_keys_are_errors_with_their_line() {
        let bad = GOOD.replace("weight = 3", "wieght = 3");
        let e = err(&bad);
        assert!(e.starts_with("x.toml:9:"), "{e}");
        assert!(e.contains("wieght"), "{e}");
        let e = err("bogus = 1\n[[listener]]\nlisten = \"127.0.0.1:1\"\nbackends = []\n");
        assert!(e.starts_with("x.toml:1:"), "{e}");
    }

    #[test]
    fn bad_values_name_their_line() {
        let e = err(&GOOD.replace("\"5s\"", "\"5 parsecs\""));
        assert!(e.starts_with("x.toml:2:") && e.contains("duration"), "{e}");
        let e = err(&GOOD.replace("kind = \"tcp\"", "kind = \"http\""));
        assert!(
            e.starts_with("x.toml:15:") && e.contains("unknown listener kind"),
            "{e}"
        );
        let e = err(&GOOD.replace("127.0.0.1:11515", "nowhere"));
        assert!(e.starts_with("x.toml:16:"), "{e}");
        let e = err(&GOOD.replace("[{ address = \"127.0.0.1:11515\" }]", "[]"));
        assert!(e.starts_with("x.toml:16:"), "{e}");
        let e = err(&GOOD.replace("kind = \"tcp\"", "kind = \"tcp\"\nbalance = \"agent-id\""));
        assert!(e.contains("agent-id"), "{e}");
        let e = err(&GOOD.replace("1515\"", "1514\""));
        assert!(e.contains("used by two listeners"), "{e}");
        assert!(err("").contains("no [[listener]]"));
    }

    #[test]
    fn admin_settings() {
        let c = Config::parse(GOOD, "good.toml").unwrap();
        assert_eq!(c.admin, AdminSettings::default());
        assert_eq!(c.admin.listen, Some(DEFAULT_ADMIN));
        let text = format!("admin = \"none\"\n{GOOD}");
        let c = Config::parse(&text, "x.toml").unwrap();
        assert_eq!(c.admin.listen, None);
        assert_eq!(Config::parse(&c.to_toml(), "e").unwrap().admin, c.admin);
        let text = format!("admin = \"127.0.0.1:9600\"\nadmin_token_file = \"/etc/t\"\n{GOOD}");
        let c = Config::parse(&text, "x.toml").unwrap();
        assert_eq!(c.admin.listen, Some("127.0.0.1:9600".parse().unwrap()));
        assert_eq!(c.admin.token_file, Some(PathBuf::from("/etc/t")));
        assert_eq!(Config::parse(&c.to_toml(), "e").unwrap().admin, c.admin);
        let e = err(&format!("\nadmin = \"nowhere\"\n{GOOD}"));
        assert!(e.starts_with("x.toml:2:") && e.contains("none"), "{e}");
        let e = err(&format!("admin_token_file = \"\"\n{GOOD}"));
        assert!(e.starts_with("x.toml:1:"), "{e}");
    }

    #[test]
    fn enroll_listeners_need_an_explicit_backend_tls_choice() {
        let base = "[[listener]]\nlisten = \"127.0.0.1:1515\"\nkind = \"enroll\"\nbackends = [{ address = \"127.0.0.1:11515\" }]\n";
        let e = err(base);
        assert!(
            e.contains("backend_ca") && e.contains("backend_verify = false"),
            "{e}"
        );
        let c = Config::parse(
            &format!("{base}backend_verify = false\ntls_dir = \"/tmp/x\"\n"),
            "x.toml",
        )
        .unwrap();
        let l = &c.listeners[0];
        assert_eq!((l.kind, l.balance), (ListenerKind::Enroll, Policy::Source));
        let e = l.enroll.as_ref().unwrap();
        assert!(matches!(
            e.backend_tls,
            wazuh_proxy_core::enroll::BackendTls::NoVerify
        ));
        assert_eq!(e.replay_ttl, Duration::from_secs(600));
        let again = Config::parse(&c.to_toml(), "effective").unwrap();
        assert_eq!(again.to_toml(), c.to_toml());
        let e = err(&format!(
            "{base}tls_cert = \"/a.pem\"\nbackend_verify = false\n"
        ));
        assert!(e.contains("tls_cert and tls_key go together"), "{e}");
        let e = err(&GOOD.replace("kind = \"tcp\"", "kind = \"tcp\"\nbackend_ca = \"/ca.pem\""));
        assert!(e.contains("only used by kind = \"enroll\""), "{e}");
    }

    #[test]
    fn backend_client_certificate_is_checked_with_its_line() {
        let dir = std::env::temp_dir().join(format!("wazuh-proxy-cfg-cert-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let pair = rcgen::generate_simple_self_signed(vec!["proxy".to_owned()]).unwrap();
        let (cert, key) = (dir.join("c.pem"), dir.join("k.pem"));
        std::fs::write(&cert, pair.cert.pem()).unwrap();
        std::fs::write(&key, pair.key_pair.serialize_pem()).unwrap();
        let base = "[[listener]]\nlisten = \"127.0.0.1:1515\"\nkind = \"enroll\"\nbackend_verify = false\nbackends = [{ address = \"127.0.0.1:11515\" }]\n";
        let good = format!(
            "{base}backend_cert = {:?}\nbackend_key = {:?}\n",
            cert.display().to_string(),
            key.display().to_string()
        );
        let c = Config::parse(&good, "x.toml").unwrap();
        let e = c.listeners[0].enroll.as_ref().unwrap();
        assert_eq!(
            e.backend_client_cert,
            Some(wazuh_proxy_core::enroll::ClientCert {
                cert: cert.clone(),
                key: key.clone()
            })
        );
        let again = Config::parse(&c.to_toml(), "effective").unwrap();
        assert_eq!(again.to_toml(), c.to_toml());

        let e = err(&format!("{base}backend_cert = \"/a.pem\"\n"));
        assert!(e.contains(":6:"), "{e}");
        assert!(
            e.contains("backend_cert and backend_key go together"),
            "{e}"
        );
        let missing = good.replace("k.pem", "missing.pem");
        let e = err(&missing);
        assert!(e.contains(":7:") && e.contains("missing.pem"), "{e}");
        // A key that is not the certificate's.
        let other = rcgen::KeyPair::generate().unwrap();
        std::fs::write(dir.join("other.pem"), other.serialize_pem()).unwrap();
        let e = err(&good.replace("k.pem", "other.pem"));
        assert!(
            e.contains(":6:") && e.contains("backend_cert/backend_key"),
            "{e}"
        );
        let e = err(&GOOD.replace("kind = \"tcp\"", "kind = \"tcp\"\nbackend_key = \"/k.pem\""));
        assert!(e.contains("only used by kind = \"enroll\""), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn source_address_mode() {
        let c = Config::parse(GOOD, "good.toml").unwrap();
        assert!(!c.listeners[0].agent.transparent);
        assert!(c.to_toml().contains("source = \"proxy\""));
        let text = GOOD.replace(
            "name = \"agents\"",
            "name = \"agents\"\nsource = \"transparent\"",
        );
        let c = Config::parse(&text, "x.toml").unwrap();
        assert!(c.listeners[0].agent.transparent);
        let shown = c.to_toml();
        assert!(shown.contains("source = \"transparent\""), "{shown}");
        assert!(
            Config::parse(&shown, "e").unwrap().listeners[0]
                .agent
                .transparent
        );
        let e = err(&GOOD.replace("name = \"agents\"", "name = \"agents\"\nsource = \"agent\""));
        assert!(
            e.starts_with("x.toml:6:") && e.contains("expected proxy or transparent"),
            "{e}"
        );
        let e = err(&GOOD.replace("kind = \"tcp\"", "kind = \"tcp\"\nsource = \"transparent\""));
        assert!(
            e.starts_with("x.toml:16:") && e.contains("only used by kind = \"agent\""),
            "{e}"
        );
    }

    #[test]
    fn health_checks_match_the_listener() {
        use wazuh_proxy_core::health::Probe;
        let udp = "[[listener]]\nlisten = \"127.0.0.1:1514\"\nkind = \"udp\"\nbackends = [{ address = \"127.0.0.1:11514\" }]\n";
        // UDP: no probe unless asked; "agent" is the UDP #ping probe.
        let c = Config::parse(udp, "x.toml").unwrap();
        assert_eq!(c.listeners[0].health, None);
        let c = Config::parse(&format!("{udp}health_check = \"agent\"\n"), "x.toml").unwrap();
        assert_eq!(c.listeners[0].health.unwrap().probe, Probe::AgentUdp);
        let again = Config::parse(&c.to_toml(), "e").unwrap();
        assert_eq!(again.listeners[0].health, c.listeners[0].health);
        // Timing without a probe is refused, with its line and the kind.
        let e = err(&format!("{udp}health_check_fall = 2\n"));
        assert!(
            e.starts_with("x.toml:5:") && e.contains("kind = \"udp\""),
            "{e}"
        );
        // Agent listeners: tcp by default, agent on request.
        let c = Config::parse(GOOD, "x.toml").unwrap();
        assert_eq!(c.listeners[0].health.unwrap().probe, Probe::Connect);
        let text = GOOD.replace(
            "name = \"agents\"",
            "name = \"agents\"\nhealth_check = \"agent\"",
        );
        let c = Config::parse(&text, "x.toml").unwrap();
        assert_eq!(c.listeners[0].health.unwrap().probe, Probe::AgentTcp);
        assert_eq!(
            Config::parse(&c.to_toml(), "e").unwrap().listeners[0].health,
            c.listeners[0].health
        );
        // #ping means nothing to a byte relay or the enrollment port.
        let e = err(&GOOD.replace("kind = \"tcp\"", "kind = \"tcp\"\nhealth_check = \"agent\""));
        assert!(
            e.starts_with("x.toml:16:") && e.contains("kind = \"tcp\""),
            "{e}"
        );
        let e = err(&GOOD.replace("kind = \"tcp\"", "kind = \"tcp\"\nhealth_check = \"icmp\""));
        assert!(e.contains("expected none, tcp or agent"), "{e}");
        let e = err(&GOOD.replace(
            "kind = \"tcp\"",
            "kind = \"tcp\"\nhealth_check = \"tcp\"\nhealth_check_interval = \"0s\"",
        ));
        assert!(e.contains("turns them off"), "{e}");
        let c = Config::parse(
            &GOOD.replace("kind = \"tcp\"", "kind = \"tcp\"\nhealth_check = \"none\""),
            "x",
        )
        .unwrap();
        assert_eq!(c.listeners[1].health, None);
    }

    #[test]
    fn keys_of_other_kinds_are_refused_with_their_line_and_the_kind() {
        let e = err(&GOOD.replace("kind = \"tcp\"", "kind = \"tcp\"\nduplicate = \"reject\""));
        assert!(e.starts_with("x.toml:16:"), "{e}");
        assert!(e.contains("duplicate is only used by kind = \"agent\" listeners; this listener is kind = \"tcp\""), "{e}");
        let udp = "[[listener]]\nlisten = \"127.0.0.1:1514\"\nkind = \"udp\"\n  connect_timeout = \"2s\"\nbackends = [{ address = \"127.0.0.1:11514\" }]\n";
        let e = err(udp);
        assert!(
            e.starts_with("x.toml:4:3:") && e.contains("kind = \"udp\""),
            "{e}"
        );
        // Per-source limits and the first-byte deadline apply to tcp listeners.
        let text = GOOD.replace(
            "kind = \"tcp\"",
            "kind = \"tcp\"\nmax_connections_per_source = 5\nfirst_frame_timeout = \"3s\"",
        );
        let c = Config::parse(&text, "x.toml").unwrap();
        assert_eq!(c.listeners[1].agent.source_limits.max_open, 5);
        assert_eq!(
            c.listeners[1].first_byte_timeout,
            Some(Duration::from_secs(3))
        );
        assert_eq!(
            Config::parse(GOOD, "x").unwrap().listeners[1].first_byte_timeout,
            None
        );
        let again = Config::parse(&c.to_toml(), "e").unwrap();
        assert_eq!(again.to_toml(), c.to_toml());
    }

    #[test]
    fn quick_form() {
        let c = Config::quick(
            "127.0.0.1:1514",
            &["127.0.0.1:1".into(), "127.0.0.1:2".into()],
            Policy::LeastConn,
        )
        .unwrap();
        assert_eq!(c.listeners[0].backends.len(), 2);
        assert!(Config::quick("127.0.0.1:1514", &[], Policy::AgentId).is_err());
    }

    #[test]
    fn srv_backends_and_resolvers_are_checked_with_their_line() {
        let l = "[[listener]]\nlisten = \"127.0.0.1:0\"\n";
        let e = err(&format!(
            "{l}backends = [{{ srv = \"_wazuh._tcp.x.test\" }}]\n"
        ));
        assert!(
            e.contains("srv needs resolve_interval") && e.contains("x.toml:3"),
            "{e}"
        );
        let e = err(&format!(
            "{l}resolve_interval = \"10s\"\nbackends = [{{ srv = \"_a._tcp.x\", address = \"127.0.0.1:1\" }}]\n"
        ));
        assert!(e.contains("address or srv, not both"), "{e}");
        let e = err(&format!("{l}backends = [{{ weight = 2 }}]\n"));
        assert!(e.contains("needs address (host:port) or srv"), "{e}");
        let e = err(&format!(
            "resolvers = [\"10.0.0.1\", \"dns.example\"]\n{l}backends = [{{ address = \"127.0.0.1:1\" }}]\n"
        ));
        assert!(
            e.contains("\"dns.example\" is not an IP address") && e.contains("x.toml:1"),
            "{e}"
        );
        let c = Config::parse(
            &format!("resolvers = [\"10.0.0.1\", \"[::1]:5353\"]\n{l}backends = [{{ address = \"127.0.0.1:1\" }}]\n"),
            "x.toml",
        )
        .unwrap();
        assert_eq!(
            c.resolvers,
            vec![
                "10.0.0.1:53".parse::<SocketAddr>().unwrap(),
                "[::1]:5353".parse().unwrap()
            ]
        );
        let again = Config::parse(&c.to_toml(), "e").unwrap();
        assert_eq!(again.resolvers, c.resolvers);
    }
}
