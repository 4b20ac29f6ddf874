//! The effective configuration printed as TOML, every default written out.

use std::time::Duration;

use wazuh_proxy_core::balance::BackendConfig;

use super::{Config, ListenerKind};

/// A string as a TOML literal (user text may hold characters Rust's `{:?}` escapes in ways
/// TOML does not read, such as `\u{590}`).
pub(super) fn toml_str(s: &str) -> String {
    toml::Value::String(s.to_owned()).to_string()
}

impl Config {
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
                let _ = writeln!(out, "resend_unacknowledged = {}", a.resend_unacknowledged);
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

pub(super) fn serde_kind(k: ListenerKind) -> &'static str {
    match k {
        ListenerKind::Agent => "agent",
        ListenerKind::Udp => "udp",
        ListenerKind::Tcp => "tcp",
        ListenerKind::Enroll => "enroll",
    }
}
