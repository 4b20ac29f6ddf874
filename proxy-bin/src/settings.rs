//! What a validated listener runs with: the settings handed to proxy-core for its kind. The
//! server builds its relays from here, so what is listed here is what takes effect.

use wazuh_proxy_core::proxy::{ListenerConfig, ListenerSettings, ProxyConfig};

use crate::config::{Config, Listener, ListenerSpec};

/// What the core's proxy runs for `config`. Every field of the binary's configuration is
/// either converted or named here as the binary's own (a new field must be placed).
pub(crate) fn proxy_config(config: &Config) -> ProxyConfig {
    let Config {
        drain_timeout,
        // The binary's own: the admin API, the user to run as and the log format are read
        // at start (a reload does not change them).
        admin: _,
        listeners,
        user: _,
        batch_window,
        log_format: _,
        // The binary's own: the name servers the resolver tasks ask for SRV records.
        resolvers: _,
    } = config;
    ProxyConfig {
        listeners: listeners.iter().map(listener_config).collect(),
        drain_timeout: *drain_timeout,
        batch_window: *batch_window,
    }
}

/// What the core's proxy runs for one listener.
pub(crate) fn listener_config(l: &Listener) -> ListenerConfig {
    let Listener {
        name,
        listen,
        balance,
        backends,
        health,
        // The binary's own: the re-resolution tasks (`crate::resolve`), restarted by a reload.
        resolve: _,
        // With `spec`: each kind's relay settings carry them.
        source_limits,
        spec,
    } = l;
    let settings = match spec {
        ListenerSpec::Agent(a) => ListenerSettings::Agent(a.settings(*source_limits)),
        ListenerSpec::Tcp(t) => ListenerSettings::Tcp(t.relay(*source_limits)),
        ListenerSpec::Udp(u) => ListenerSettings::Udp(u.relay(*source_limits)),
        ListenerSpec::Enroll(e) => ListenerSettings::Enroll(e.config(*source_limits)),
    };
    ListenerConfig {
        name: name.clone(),
        listen: *listen,
        balance: *balance,
        backends: backends.clone(),
        health: *health,
        settings,
    }
}

/// Everything a listener runs with, as text: what the core runs (relay settings, backends,
/// balancing, health checks, keys, rebalancing) and the re-resolution the binary runs beside
/// it. Two listeners with the same text behave the same.
#[cfg(test)]
pub(crate) fn effective(l: &Listener) -> String {
    format!("{:?} {:?}", listener_config(l), l.resolve)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{kind_bit, Config, ListenerKind, LISTENER_KEYS};

    const KINDS: [(ListenerKind, &str); 4] = [
        (ListenerKind::Agent, "kind = \"agent\"\n"),
        (
            ListenerKind::Udp,
            "kind = \"udp\"\nhealth_check = \"agent\"\n",
        ),
        (
            ListenerKind::Tcp,
            "kind = \"tcp\"\nfirst_frame_timeout = \"7s\"\n",
        ),
        (
            ListenerKind::Enroll,
            "kind = \"enroll\"\nbackend_verify = false\n",
        ),
    ];

    /// A value for `key` unlike its default (and unlike the bases above), with what it needs
    /// beside it; `None` for the keys every listener is built from.
    fn sample(key: &str, kind: ListenerKind) -> Option<String> {
        let s = match key {
            "listen" | "kind" | "backends" => return None,
            "name" => "name = \"renamed\"",
            "balance" => "balance = \"round-robin\"",
            "resolve_interval" => {
                "resolve_interval = \"30s\"\nbackends = [{ address = \"localhost:9\" }]"
            }
            "health_check" if kind == ListenerKind::Agent => "health_check = \"agent\"",
            "health_check" => "health_check = \"none\"",
            "health_check_interval" => "health_check_interval = \"0s\"",
            "health_check_timeout" => "health_check_timeout = \"300ms\"",
            "health_check_rise" => "health_check_rise = 5",
            "health_check_fall" => "health_check_fall = 7",
            "max_connections_per_source" => "max_connections_per_source = 3",
            "connection_rate_per_source" => "connection_rate_per_source = 2.5",
            "connection_burst_per_source" => "connection_burst_per_source = 4.0",
            "first_frame_timeout" => "first_frame_timeout = \"3s\"",
            "connect_timeout" => "connect_timeout = \"2s\"",
            "idle_timeout" => "idle_timeout = \"50s\"",
            "tcp_keepalive" => "tcp_keepalive = \"30s\"",
            "max_payload" => "max_payload = 2048",
            "proxy_protocol" | "proxy_protocol_trusted" => {
                "proxy_protocol = true\nproxy_protocol_trusted = [\"127.0.0.1/32\"]"
            }
            "duplicate" => "duplicate = \"reject\"",
            "keys" => "keys = \"/etc/client.keys\"",
            "keys_reload" => "keys = \"/etc/client.keys\"\nkeys_reload = \"9s\"",
            "rebalance_interval" => "rebalance_interval = \"0s\"",
            "rebalance_batch" => "rebalance_batch = 3",
            "failover" => "failover = false",
            "resend_unacknowledged" => "resend_unacknowledged = false",
            "hold_timeout" => "hold_timeout = \"9s\"",
            "reply_timeout" => "reply_timeout = \"9s\"",
            "manager_user_timeout" => "manager_user_timeout = \"3s\"",
            "liveness_timeout" => "liveness_timeout = \"9s\"",
            "overtake_time" => "overtake_time = \"9s\"",
            "refused_backoff" => "refused_backoff = \"1s\"",
            "refused_backoff_max" => "refused_backoff_max = \"9s\"",
            "source" => "source = \"transparent\"",
            "tls_cert" | "tls_key" => "tls_cert = \"/c.pem\"\ntls_key = \"/k.pem\"",
            "tls_dir" => "tls_dir = \"/tmp/elsewhere\"",
            "backend_ca" | "backend_server_name" if kind == ListenerKind::Enroll => {
                // Replaces the base's `backend_verify = false` (see `with`).
                "backend_ca = \"/ca.pem\"\nbackend_server_name = \"manager\""
            }
            "backend_ca" => "backend_ca = \"/ca.pem\"",
            "backend_server_name" => "backend_ca = \"/ca.pem\"\nbackend_server_name = \"m\"",
            "backend_verify" => "backend_verify = false",
            "backend_cert" | "backend_key" => {
                let (cert, key) = client_cert();
                return Some(format!("backend_cert = {cert:?}\nbackend_key = {key:?}"));
            }
            "replay_ttl" => "replay_ttl = \"9s\"",
            other => panic!("no sample value for listener key {other:?}: add one"),
        };
        Some(s.to_owned())
    }

    /// A client certificate and key on disk (the configuration checks that they load).
    fn client_cert() -> &'static (String, String) {
        static FILES: std::sync::OnceLock<(String, String)> = std::sync::OnceLock::new();
        FILES.get_or_init(|| {
            let dir =
                std::env::temp_dir().join(format!("wazuh-proxy-settings-{}", std::process::id()));
            std::fs::create_dir_all(&dir).unwrap();
            let pair = rcgen::generate_simple_self_signed(vec!["proxy".to_owned()]).unwrap();
            let (cert, key) = (dir.join("c.pem"), dir.join("k.pem"));
            std::fs::write(&cert, pair.cert.pem()).unwrap();
            std::fs::write(&key, pair.key_pair.serialize_pem()).unwrap();
            (cert.display().to_string(), key.display().to_string())
        })
    }

    fn text(kind_lines: &str, extra: &str) -> String {
        // A later `backends` line replaces the base one (TOML refuses a key twice).
        let backends = if extra.contains("backends =") {
            ""
        } else {
            "backends = [{ address = \"127.0.0.1:9\" }, { address = \"127.0.0.2:9\" }]\n"
        };
        let mut kind_lines = kind_lines.to_owned();
        if extra.contains("backend_ca") {
            kind_lines = kind_lines.replace("backend_verify = false\n", "");
        }
        if extra.contains("health_check =") || extra.contains("health_check_interval = \"0s\"") {
            kind_lines = kind_lines.replace("health_check = \"agent\"\n", "");
        }
        if extra.contains("first_frame_timeout") {
            kind_lines = kind_lines.replace("first_frame_timeout = \"7s\"\n", "");
        }
        format!("[[listener]]\nlisten = \"127.0.0.1:1\"\n{kind_lines}{backends}{extra}\n")
    }

    /// For every listener kind and every key: setting the key either changes what the
    /// listener runs with, or `check-config` refuses it with its line and the listener's
    /// kind. Nothing is accepted and ignored.
    #[test]
    fn every_key_changes_behaviour_or_is_refused_on_every_kind() {
        let keys = &wazuh_proxy::config::known_keys()
            .into_iter()
            .find(|(s, _)| *s == "listener")
            .unwrap()
            .1;
        assert!(keys.len() > 30, "{keys:?}");
        for key in keys {
            let bits = LISTENER_KEYS
                .iter()
                .find(|(k, _)| k == key)
                .unwrap_or_else(|| panic!("listener key {key:?} is not in LISTENER_KEYS"))
                .1;
            for (kind, kind_lines) in KINDS {
                let Some(extra) = sample(key, kind) else {
                    continue;
                };
                let (base, with) = if key == "backend_verify" && kind == ListenerKind::Enroll {
                    // An enroll listener must choose: the base already says `false`; the
                    // other choice is a CA.
                    let ca =
                        kind_lines.replace("backend_verify = false", "backend_ca = \"/ca.pem\"");
                    (text(&ca, ""), text(kind_lines, ""))
                } else {
                    (text(kind_lines, ""), text(kind_lines, &extra))
                };
                let base = Config::parse(&base, "base.toml").unwrap();
                match Config::parse(&with, "x.toml") {
                    Ok(c) => {
                        assert!(
                            bits & kind_bit(kind) != 0,
                            "{key} accepted on kind {kind:?}, which does not use it"
                        );
                        assert_ne!(
                            effective(&c.listeners[0]),
                            effective(&base.listeners[0]),
                            "{key} on kind {kind:?} is accepted but changes nothing"
                        );
                        // The effective configuration loads again, to the same thing.
                        let again = Config::parse(&c.to_toml(), "effective").unwrap();
                        assert_eq!(
                            effective(&again.listeners[0]),
                            effective(&c.listeners[0]),
                            "{key} on kind {kind:?}"
                        );
                    }
                    Err(e) => {
                        let e = e.to_string();
                        assert!(
                            bits & kind_bit(kind) == 0,
                            "{key} refused on kind {kind:?}, which uses it: {e}"
                        );
                        // The line of a key of this sample that the kind does not use.
                        let refused_line = |n: usize, l: &str| {
                            let k = l.split(' ').next().unwrap_or("");
                            LISTENER_KEYS
                                .iter()
                                .any(|(x, b)| *x == k && b & kind_bit(kind) == 0)
                                && e.starts_with(&format!("x.toml:{}:", n + 1))
                        };
                        let kind_name = format!("{:?}", kind).to_lowercase();
                        assert!(
                            with.lines().enumerate().any(|(n, l)| refused_line(n, l)),
                            "{key} on {kind:?}: error without the key's line: {e}"
                        );
                        assert!(
                            e.contains(&format!("kind = \"{kind_name}\"")),
                            "{key} on {kind:?}: error does not name the kind: {e}"
                        );
                    }
                }
            }
        }
    }
}
