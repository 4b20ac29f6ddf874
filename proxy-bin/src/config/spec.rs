//! What each kind of listener is configured with: one struct per kind holding only the keys
//! that kind uses, named as in the file, with that kind's defaults (`Default`). Both readers
//! (TOML and nginx) build these; the binary converts them to proxy-core's relay settings
//! (`relay`/`settings`/`config` below), and the effective configuration is printed by
//! serializing them.

use std::path::PathBuf;
use std::time::Duration;

use serde::{Serialize, Serializer};
use wazuh_proxy_core::enroll::{BackendTls, ClientCert, EnrollConfig, ServerCert};
use wazuh_proxy_core::limits::SourceLimits;
use wazuh_proxy_core::proxy::{AgentSettings, KeysFile, Rebalance};
use wazuh_proxy_core::proxy_protocol::ProxyProtocol;
use wazuh_proxy_core::relay::AgentRelayConfig;
use wazuh_proxy_core::session::DuplicatePolicy;
use wazuh_proxy_core::tcp::TcpRelayConfig;
use wazuh_proxy_core::udp::UdpRelayConfig;

use super::{ListenerKind, DEFAULT_TLS_DIR};

/// A listener's kind with the settings only that kind has. Serialized with its `kind` key
/// first, then the kind's keys.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum ListenerSpec {
    /// Wazuh agents on 1514/TCP.
    Agent(AgentSpec),
    /// Wazuh agents on 1514/UDP.
    Udp(UdpSpec),
    /// Any TCP service relayed as bytes.
    Tcp(TcpSpec),
    /// Enrollment with TLS terminated here.
    Enroll(EnrollSpec),
}

impl ListenerSpec {
    /// The kind.
    pub fn kind(&self) -> ListenerKind {
        match self {
            ListenerSpec::Agent(_) => ListenerKind::Agent,
            ListenerSpec::Udp(_) => ListenerKind::Udp,
            ListenerSpec::Tcp(_) => ListenerKind::Tcp,
            ListenerSpec::Enroll(_) => ListenerKind::Enroll,
        }
    }

    /// The settings of an agent listener, when this is one.
    pub fn agent(&self) -> Option<&AgentSpec> {
        match self {
            ListenerSpec::Agent(a) => Some(a),
            _ => None,
        }
    }

    /// The idle timeout of the kinds that have one (`None`: off; on udp, the relay's default).
    pub fn idle_timeout(&self) -> Option<Duration> {
        match self {
            ListenerSpec::Agent(a) => a.idle_timeout,
            ListenerSpec::Udp(u) => u.idle_timeout,
            ListenerSpec::Tcp(t) => t.idle_timeout,
            ListenerSpec::Enroll(_) => None,
        }
    }

    /// The connect timeout of the kinds that connect over TCP.
    pub fn connect_timeout(&self) -> Option<Duration> {
        match self {
            ListenerSpec::Agent(a) => Some(a.connect_timeout),
            ListenerSpec::Tcp(t) => Some(t.connect_timeout),
            ListenerSpec::Enroll(e) => Some(e.connect_timeout),
            ListenerSpec::Udp(_) => None,
        }
    }

    /// The PROXY protocol settings of the kinds that read the header (none on udp).
    pub fn proxy_protocol(&self) -> Option<&ProxyProtocol> {
        match self {
            ListenerSpec::Agent(a) => a.proxy_protocol.0.as_ref(),
            ListenerSpec::Tcp(t) => t.proxy_protocol.0.as_ref(),
            ListenerSpec::Enroll(e) => e.proxy_protocol.0.as_ref(),
            ListenerSpec::Udp(_) => None,
        }
    }

    /// Checks every setting against its range and the settings it works with, so that what
    /// is accepted never fails at run time. Only the keys of the listener's own kind are
    /// checked (an agent relay's timeouts do not constrain a tcp listener).
    ///
    /// # Errors
    /// The first setting (or pair) that cannot work.
    pub fn check(&self, limits: SourceLimits) -> Result<(), String> {
        if limits.rate.is_nan() || limits.burst.is_nan() {
            return Err("per-source rate and burst must be numbers".into());
        }
        match self {
            ListenerSpec::Agent(a) => a.relay(limits).validate().map_err(|e| e.to_string()),
            ListenerSpec::Udp(u) => in_range(
                "max_payload",
                (wazuh_proxy_core::relay::MIN_MAX_PAYLOAD..=wazuh_proxy_core::frame::MAX_PAYLOAD)
                    .contains(&u.max_payload),
                &format!(
                    "{}..={}",
                    wazuh_proxy_core::relay::MIN_MAX_PAYLOAD,
                    wazuh_proxy_core::frame::MAX_PAYLOAD
                ),
                u.max_payload.to_string(),
            ),
            ListenerSpec::Tcp(t) => {
                positive("connect_timeout", t.connect_timeout)?;
                if let Some(first) = t.first_frame_timeout {
                    positive("first_frame_timeout", first)?;
                    if let Some(idle) = t.idle_timeout.filter(|idle| *idle <= first) {
                        return Err(format!(
                            "idle_timeout ({idle:?}) must be longer than first_frame_timeout ({first:?})"
                        ));
                    }
                }
                match t.tcp_keepalive {
                    Some(k) => in_range(
                        "tcp_keepalive",
                        k >= Duration::from_secs(1) && k.as_secs() <= 32_767,
                        "1s..=32767s (0 to disable)",
                        format!("{k:?}"),
                    ),
                    None => Ok(()),
                }
            }
            ListenerSpec::Enroll(e) => {
                positive("first_frame_timeout", e.first_frame_timeout)?;
                positive("connect_timeout", e.connect_timeout)
            }
        }
    }
}

/// The message of [`AgentRelayConfig::validate`] for a value out of its range.
fn in_range(name: &str, ok: bool, range: &str, value: String) -> Result<(), String> {
    if ok {
        return Ok(());
    }
    Err(format!("{name} must be {range} (got {value})"))
}

fn positive(name: &str, d: Duration) -> Result<(), String> {
    in_range(name, !d.is_zero(), "more than 0", format!("{d:?}"))
}

/// Who managers see as the client of an agent listener.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SourceAddress {
    /// The proxy's own address.
    #[default]
    Proxy,
    /// The agent's address (`IP_TRANSPARENT`).
    Transparent,
}

/// An agent listener (`kind = "agent"`).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AgentSpec {
    /// What to do with a second live connection of one agent.
    #[serde(serialize_with = "display")]
    pub duplicate: DuplicatePolicy,
    /// Time allowed for the first whole frame.
    #[serde(serialize_with = "dur")]
    pub first_frame_timeout: Duration,
    /// Largest payload either way.
    pub max_payload: u32,
    /// Continue an agent's stream on another manager when one fails.
    pub failover: bool,
    /// Keep what a manager has not acknowledged, to send it to the next one.
    pub resend_unacknowledged: bool,
    /// How long an agent is held while no manager can be reached.
    #[serde(serialize_with = "dur")]
    pub hold_timeout: Duration,
    /// A manager silent this long after an agent's startup is taken for failed (`None`: off).
    #[serde(serialize_with = "off")]
    pub reply_timeout: Option<Duration>,
    /// `TCP_USER_TIMEOUT` on manager connections (`None`: the kernel's).
    #[serde(serialize_with = "off")]
    pub manager_user_timeout: Option<Duration>,
    /// A manager silent this long while its agent sends is taken for hung (`None`: off).
    #[serde(serialize_with = "off")]
    pub liveness_timeout: Option<Duration>,
    /// How long a live session keeps its agent from a second connection.
    #[serde(serialize_with = "dur")]
    pub overtake_time: Duration,
    /// First pause of an agent every manager refused.
    #[serde(serialize_with = "dur")]
    pub refused_backoff: Duration,
    /// Longest pause of an agent every manager refused.
    #[serde(serialize_with = "dur")]
    pub refused_backoff_max: Duration,
    /// The address managers see.
    pub source: SourceAddress,
    /// Time allowed to connect to one manager.
    #[serde(serialize_with = "dur")]
    pub connect_timeout: Duration,
    /// Close a session quiet this long (`None`: never).
    #[serde(serialize_with = "off")]
    pub idle_timeout: Option<Duration>,
    /// TCP keepalive on both sockets (`None`: off).
    #[serde(serialize_with = "off")]
    pub tcp_keepalive: Option<Duration>,
    /// `proxy_protocol` and `proxy_protocol_trusted`.
    #[serde(flatten)]
    pub proxy_protocol: ProxyProtocolKeys,
    /// `rebalance_interval` and `rebalance_batch`.
    #[serde(flatten)]
    pub rebalance: RebalanceKeys,
    /// `keys` and `keys_reload`.
    #[serde(flatten)]
    pub keys: Option<KeysSpec>,
}

impl Default for AgentSpec {
    /// The relay's defaults, with automatic rebalancing.
    fn default() -> Self {
        let r = AgentRelayConfig::default();
        AgentSpec {
            duplicate: r.duplicate_policy,
            first_frame_timeout: r.first_frame_timeout,
            max_payload: r.max_payload,
            failover: r.failover,
            resend_unacknowledged: r.resend_unacknowledged,
            hold_timeout: r.hold_timeout,
            reply_timeout: r.reply_timeout,
            manager_user_timeout: r.manager_user_timeout,
            liveness_timeout: r.liveness_timeout,
            overtake_time: r.overtake_time,
            refused_backoff: r.refused_backoff,
            refused_backoff_max: r.refused_backoff_max,
            source: SourceAddress::Proxy,
            connect_timeout: r.connect_timeout,
            idle_timeout: r.idle_timeout,
            tcp_keepalive: r.tcp_keepalive,
            proxy_protocol: ProxyProtocolKeys(r.proxy_protocol),
            rebalance: RebalanceKeys(ListenerKind::Agent.default_rebalance()),
            keys: None,
        }
    }
}

impl AgentSpec {
    /// The frame relay's settings.
    pub fn relay(&self, source_limits: SourceLimits) -> AgentRelayConfig {
        AgentRelayConfig {
            first_frame_timeout: self.first_frame_timeout,
            max_payload: self.max_payload,
            connect_timeout: self.connect_timeout,
            idle_timeout: self.idle_timeout,
            duplicate_policy: self.duplicate,
            tcp_keepalive: self.tcp_keepalive,
            failover: self.failover,
            resend_unacknowledged: self.resend_unacknowledged,
            hold_timeout: self.hold_timeout,
            reply_timeout: self.reply_timeout,
            source_limits,
            liveness_timeout: self.liveness_timeout,
            manager_user_timeout: self.manager_user_timeout,
            overtake_time: self.overtake_time,
            refused_backoff: self.refused_backoff,
            refused_backoff_max: self.refused_backoff_max,
            transparent: self.source == SourceAddress::Transparent,
            proxy_protocol: self.proxy_protocol.0.clone(),
            ..AgentRelayConfig::default()
        }
    }

    /// Everything the core runs an agent listener with.
    pub fn settings(&self, source_limits: SourceLimits) -> AgentSettings {
        AgentSettings {
            relay: self.relay(source_limits),
            keys: self.keys.as_ref().map(|k| KeysFile {
                path: k.keys.clone(),
                reload_every: k.keys_reload,
            }),
            rebalance: self
                .rebalance
                .0
                .map(|(every, batch)| Rebalance { every, batch }),
        }
    }
}

/// The client.keys file an agent listener verifies agents with.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct KeysSpec {
    /// The file.
    pub keys: PathBuf,
    /// How often it is checked for changes.
    #[serde(serialize_with = "dur")]
    pub keys_reload: Duration,
}

/// A udp listener (`kind = "udp"`).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct UdpSpec {
    /// Largest datagram either way.
    pub max_payload: u32,
    /// Close a flow quiet this long (`None`, written `"0s"`: the relay's default, since a
    /// flow holds a socket).
    #[serde(serialize_with = "off")]
    pub idle_timeout: Option<Duration>,
}

impl Default for UdpSpec {
    fn default() -> Self {
        let r = UdpRelayConfig::default();
        UdpSpec {
            max_payload: AgentRelayConfig::default().max_payload,
            // A UDP flow holds a socket: expire it soon after the agent goes quiet.
            idle_timeout: Some(r.idle_timeout),
        }
    }
}

impl UdpSpec {
    /// The UDP relay's settings.
    pub fn relay(&self, source_limits: SourceLimits) -> UdpRelayConfig {
        let mut config = UdpRelayConfig {
            max_datagram: self.max_payload as usize,
            source_limits,
            ..UdpRelayConfig::default()
        };
        if let Some(idle) = self.idle_timeout {
            config.idle_timeout = idle;
        }
        config
    }
}

/// A tcp listener (`kind = "tcp"`).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TcpSpec {
    /// Time allowed for the client's first byte (`None`: no deadline, since a relayed service
    /// may be one where the server speaks first).
    #[serde(serialize_with = "opt_dur", skip_serializing_if = "Option::is_none")]
    pub first_frame_timeout: Option<Duration>,
    /// Time allowed to connect to one backend.
    #[serde(serialize_with = "dur")]
    pub connect_timeout: Duration,
    /// Close a connection quiet this long (`None`: never).
    #[serde(serialize_with = "off")]
    pub idle_timeout: Option<Duration>,
    /// TCP keepalive on both sockets (`None`: off).
    #[serde(serialize_with = "off")]
    pub tcp_keepalive: Option<Duration>,
    /// `proxy_protocol` and `proxy_protocol_trusted`.
    #[serde(flatten)]
    pub proxy_protocol: ProxyProtocolKeys,
}

impl Default for TcpSpec {
    fn default() -> Self {
        let r = TcpRelayConfig::default();
        TcpSpec {
            first_frame_timeout: r.first_byte_timeout,
            connect_timeout: r.connect_timeout,
            idle_timeout: r.idle_timeout,
            tcp_keepalive: r.tcp_keepalive,
            proxy_protocol: ProxyProtocolKeys(r.proxy_protocol),
        }
    }
}

impl TcpSpec {
    /// The byte relay's settings.
    pub fn relay(&self, source_limits: SourceLimits) -> TcpRelayConfig {
        TcpRelayConfig {
            connect_timeout: self.connect_timeout,
            idle_timeout: self.idle_timeout,
            tcp_keepalive: self.tcp_keepalive,
            proxy_protocol: self.proxy_protocol.0.clone(),
            source_limits,
            first_byte_timeout: self.first_frame_timeout,
            ..TcpRelayConfig::default()
        }
    }
}

/// The certificate an enroll listener shows agents.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(untagged)]
pub enum ServerCertSpec {
    /// PEM files (`tls_cert`, `tls_key`).
    Files {
        /// The certificate chain.
        tls_cert: PathBuf,
        /// Its key.
        tls_key: PathBuf,
    },
    /// A self-signed certificate kept in `tls_dir`.
    SelfSigned {
        /// The directory.
        tls_dir: PathBuf,
    },
}

/// How an enroll listener checks the managers' certificates.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(untagged)]
pub enum BackendTlsSpec {
    /// Against `backend_ca`, by `backend_server_name` (or the manager's IP address).
    VerifyCa {
        /// The PEM file of trusted certificates.
        backend_ca: PathBuf,
        /// The name checked.
        #[serde(skip_serializing_if = "Option::is_none")]
        backend_server_name: Option<String>,
    },
    /// Not at all (`backend_verify = false`).
    NoVerify {
        /// Always false.
        backend_verify: bool,
    },
}

/// The certificate an enroll listener shows managers that require one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ClientCertSpec {
    /// The certificate chain.
    pub backend_cert: PathBuf,
    /// Its key.
    pub backend_key: PathBuf,
}

/// An enroll listener (`kind = "enroll"`).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct EnrollSpec {
    /// Time allowed for the TLS handshake and the request line.
    #[serde(serialize_with = "dur")]
    pub first_frame_timeout: Duration,
    /// Time allowed to connect to one manager.
    #[serde(serialize_with = "dur")]
    pub connect_timeout: Duration,
    /// `proxy_protocol` and `proxy_protocol_trusted`.
    #[serde(flatten)]
    pub proxy_protocol: ProxyProtocolKeys,
    /// `tls_cert` and `tls_key`, or `tls_dir`.
    #[serde(flatten)]
    pub server_cert: ServerCertSpec,
    /// `backend_ca` (and `backend_server_name`), or `backend_verify = false`.
    #[serde(flatten)]
    pub backend_tls: BackendTlsSpec,
    /// `backend_cert` and `backend_key`.
    #[serde(flatten)]
    pub backend_client_cert: Option<ClientCertSpec>,
    /// How long an unacknowledged key reply is kept for a retry (0: no replay).
    #[serde(serialize_with = "dur")]
    pub replay_ttl: Duration,
}

impl EnrollSpec {
    /// An enroll listener checking managers with `backend_tls`, every other setting at its
    /// default (a self-signed certificate in [`DEFAULT_TLS_DIR`]).
    pub fn new(backend_tls: BackendTlsSpec) -> Self {
        let r = AgentRelayConfig::default();
        EnrollSpec {
            // The agent relay's first-frame and connect timeouts, as for agent listeners.
            first_frame_timeout: r.first_frame_timeout,
            connect_timeout: r.connect_timeout,
            proxy_protocol: ProxyProtocolKeys(None),
            server_cert: ServerCertSpec::SelfSigned {
                tls_dir: PathBuf::from(DEFAULT_TLS_DIR),
            },
            backend_tls,
            backend_client_cert: None,
            replay_ttl: Duration::from_secs(600),
        }
    }

    /// The enrollment front's settings.
    pub fn config(&self, source_limits: SourceLimits) -> EnrollConfig {
        let server_cert = match &self.server_cert {
            ServerCertSpec::Files { tls_cert, tls_key } => ServerCert::Files {
                cert: tls_cert.clone(),
                key: tls_key.clone(),
            },
            ServerCertSpec::SelfSigned { tls_dir } => ServerCert::self_signed(
                tls_dir.join("enroll-cert.pem"),
                tls_dir.join("enroll-key.pem"),
            ),
        };
        let backend_tls = match &self.backend_tls {
            BackendTlsSpec::VerifyCa {
                backend_ca,
                backend_server_name,
            } => BackendTls::VerifyCa {
                ca_file: backend_ca.clone(),
                server_name: backend_server_name.clone(),
            },
            BackendTlsSpec::NoVerify { .. } => BackendTls::NoVerify,
        };
        let mut config = EnrollConfig::new(server_cert, backend_tls);
        config.connect_timeout = self.connect_timeout;
        config.replay_ttl = self.replay_ttl;
        config.backend_client_cert = self.backend_client_cert.as_ref().map(|c| ClientCert {
            cert: c.backend_cert.clone(),
            key: c.backend_key.clone(),
        });
        config.source_limits = source_limits;
        // The deadline for the TLS handshake and the request line.
        config.request_timeout = self.first_frame_timeout;
        config.proxy_protocol = self.proxy_protocol.0.clone();
        config
    }
}

/// `proxy_protocol = true` with `proxy_protocol_trusted`, or neither key (off).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ProxyProtocolKeys(pub Option<ProxyProtocol>);

impl Serialize for ProxyProtocolKeys {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut map = s.serialize_map(None)?;
        if let Some(pp) = &self.0 {
            let trusted: Vec<String> = pp.trusted.iter().map(ToString::to_string).collect();
            map.serialize_entry("proxy_protocol", &true)?;
            map.serialize_entry("proxy_protocol_trusted", &trusted)?;
        }
        map.end()
    }
}

/// Automatic rebalancing: every interval, at most this many agents; `None` (written
/// `rebalance_interval = "0s"`): only on request.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RebalanceKeys(pub Option<(Duration, usize)>);

impl Serialize for RebalanceKeys {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut map = s.serialize_map(None)?;
        match self.0 {
            Some((every, batch)) => {
                map.serialize_entry("rebalance_interval", &duration_text(every))?;
                map.serialize_entry("rebalance_batch", &batch)?;
            }
            None => map.serialize_entry("rebalance_interval", "0s")?,
        }
        map.end()
    }
}

/// A duration as the file writes it: `"10s"`, `"1h 30m"`.
pub(super) fn duration_text(d: Duration) -> String {
    humantime::format_duration(d).to_string()
}

pub(super) fn dur<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&duration_text(*d))
}

/// An optional timeout: `"0s"` is off.
pub(super) fn off<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&d.map_or_else(|| "0s".to_owned(), duration_text))
}

fn opt_dur<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
    match d {
        Some(d) => dur(d, s),
        None => s.serialize_none(),
    }
}

pub(super) fn display<T: std::fmt::Display, S: Serializer>(v: &T, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(v)
}
