//! The effective configuration printed as TOML, every default written out: the validated
//! values serialized under the file's own key names, so that the output loads again to the
//! same configuration.

use std::path::Path;
use std::time::Duration;

use serde::{Serialize, Serializer};
use wazuh_proxy_core::balance::{BackendConfig, Policy};
use wazuh_proxy_core::health::HealthCheck;

use super::spec::{display, dur, ListenerSpec};
use super::{Config, Listener, ListenerKind};

/// A string as a TOML literal (user text may hold characters Rust's `{:?}` escapes in ways
/// TOML does not read, such as `\u{590}`).
#[cfg(test)]
pub(super) fn toml_str(s: &str) -> String {
    toml::Value::String(s.to_owned()).to_string()
}

/// The file as printed.
#[derive(Serialize)]
struct FileOut<'a> {
    #[serde(serialize_with = "dur")]
    drain_timeout: Duration,
    #[serde(serialize_with = "dur")]
    batch_window: Duration,
    admin: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    admin_token_file: Option<&'a Path>,
    #[serde(skip_serializing_if = "Option::is_none")]
    user: Option<&'a str>,
    log_format: &'static str,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    resolvers: Vec<String>,
}

/// One `[[listener]]` but its `backends`: the keys every kind has around its kind's own.
#[derive(Serialize)]
struct ListenerOut<'a> {
    name: &'a str,
    #[serde(serialize_with = "display")]
    listen: std::net::SocketAddr,
    #[serde(flatten)]
    spec: &'a ListenerSpec,
    #[serde(serialize_with = "display")]
    balance: Policy,
    max_connections_per_source: u32,
    connection_rate_per_source: f64,
    connection_burst_per_source: f64,
    #[serde(flatten)]
    health: HealthKeys,
    #[serde(skip_serializing_if = "Option::is_none")]
    resolve_interval: Option<String>,
}

/// One entry of `backends`.
#[derive(Serialize)]
struct BackendOut {
    #[serde(skip_serializing_if = "Option::is_none")]
    address: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    srv: Option<String>,
    weight: u32,
    max_fails: u32,
    #[serde(serialize_with = "dur")]
    fail_timeout: Duration,
    backup: bool,
    down: bool,
}

impl BackendOut {
    fn new(key_srv: bool, name: String, b: &BackendConfig) -> BackendOut {
        let (address, srv) = if key_srv {
            (None, Some(name))
        } else {
            (Some(name), None)
        };
        BackendOut {
            address,
            srv,
            weight: b.weight,
            max_fails: b.max_fails,
            fail_timeout: b.fail_timeout,
            backup: b.backup,
            down: b.down,
        }
    }
}

/// `health_check` and, when a probe runs, its timing keys.
struct HealthKeys(Option<HealthCheck>);

impl Serialize for HealthKeys {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        use wazuh_proxy_core::health::Probe;
        let mut map = s.serialize_map(None)?;
        match &self.0 {
            Some(h) => {
                let probe = match h.probe {
                    Probe::Connect => "tcp",
                    Probe::AgentTcp | Probe::AgentUdp => "agent",
                };
                map.serialize_entry("health_check", probe)?;
                map.serialize_entry(
                    "health_check_interval",
                    &super::spec::duration_text(h.interval),
                )?;
                map.serialize_entry(
                    "health_check_timeout",
                    &super::spec::duration_text(h.timeout),
                )?;
                map.serialize_entry("health_check_rise", &h.rise)?;
                map.serialize_entry("health_check_fall", &h.fall)?;
            }
            None => map.serialize_entry("health_check", "none")?,
        }
        map.end()
    }
}

impl<'a> ListenerOut<'a> {
    fn new(l: &'a Listener) -> ListenerOut<'a> {
        ListenerOut {
            name: &l.name,
            listen: l.listen,
            spec: &l.spec,
            balance: l.balance,
            max_connections_per_source: l.source_limits.max_open,
            connection_rate_per_source: l.source_limits.rate,
            connection_burst_per_source: l.source_limits.burst,
            health: HealthKeys(l.health),
            resolve_interval: l
                .resolve
                .as_ref()
                .map(|r| super::spec::duration_text(r.interval)),
        }
    }
}

/// The `backends` of `l`. With re-resolution the names stay names (and the output loads
/// again).
fn backends_of(l: &Listener) -> Vec<BackendOut> {
    match &l.resolve {
        Some(r) => r
            .literal
            .iter()
            .map(|b| BackendOut::new(false, b.addr.to_string(), b))
            .chain(
                r.named
                    .iter()
                    .map(|n| BackendOut::new(n.srv, n.name.clone(), &n.template)),
            )
            .collect(),
        None => l
            .backends
            .iter()
            .map(|b| BackendOut::new(false, b.addr.to_string(), b))
            .collect(),
    }
}

impl Config {
    /// The effective configuration as TOML, every default written out.
    pub fn to_toml(&self) -> String {
        self.print()
            .unwrap_or_else(|e| format!("# cannot print the configuration: {e}\n"))
    }

    /// Every value serialized under its key; only the layout is written here: each
    /// `[[listener]]` header, and `backends` as one inline table per line, as the file is
    /// usually written.
    fn print(&self) -> Result<String, toml::ser::Error> {
        let mut out = toml::to_string(&FileOut {
            drain_timeout: self.drain_timeout,
            batch_window: self.batch_window,
            admin: self
                .admin
                .listen
                .map_or_else(|| "none".to_owned(), |a| a.to_string()),
            admin_token_file: self.admin.token_file.as_deref(),
            user: self.user.as_deref(),
            log_format: self.log_format.name(),
            resolvers: self.resolvers.iter().map(ToString::to_string).collect(),
        })?;
        for l in &self.listeners {
            out.push_str("\n[[listener]]\n");
            out.push_str(&toml::to_string(&ListenerOut::new(l))?);
            out.push_str("backends = [\n");
            for b in backends_of(l) {
                // Inline, in the order of the fields.
                let mut line = String::new();
                b.serialize(toml::ser::ValueSerializer::new(&mut line))?;
                out.push_str(&format!("  {line},\n"));
            }
            out.push_str("]\n");
        }
        Ok(out)
    }
}

pub(super) fn serde_kind(k: ListenerKind) -> &'static str {
    match k {
        ListenerKind::Agent => "agent",
        ListenerKind::Udp => "udp",
        ListenerKind::Tcp => "tcp",
        ListenerKind::Enroll => "enroll",
    }
}
