//! The configuration file as written: the serde structs (strict: an unknown key is an error)
//! and the table of which `[[listener]]` keys apply to which kind.

use std::path::PathBuf;

use serde::Deserialize;
use toml::Spanned;

use super::print::serde_kind;
use super::{Dur, ListenerKind};

/// The file as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FileConfig {
    pub(super) drain_timeout: Option<Dur>,
    pub(super) batch_window: Option<Spanned<Dur>>,
    pub(super) admin: Option<Spanned<String>>,
    pub(super) admin_token_file: Option<Spanned<PathBuf>>,
    pub(super) user: Option<Spanned<String>>,
    pub(super) log_format: Option<crate::logging::LogFormat>,
    pub(super) resolvers: Option<Spanned<Vec<Spanned<String>>>>,
    #[serde(default)]
    pub(super) listener: Vec<Spanned<FileListener>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FileListener {
    pub(super) name: Option<String>,
    pub(super) listen: Spanned<String>,
    pub(super) kind: Option<Spanned<String>>,
    pub(super) balance: Option<Spanned<String>>,
    pub(super) duplicate: Option<Spanned<String>>,
    pub(super) first_frame_timeout: Option<Dur>,
    pub(super) connect_timeout: Option<Dur>,
    pub(super) idle_timeout: Option<Dur>,
    pub(super) max_payload: Option<Spanned<u32>>,
    pub(super) tcp_keepalive: Option<Dur>,
    pub(super) keys: Option<Spanned<PathBuf>>,
    pub(super) keys_reload: Option<Dur>,
    pub(super) health_check: Option<Spanned<String>>,
    pub(super) health_check_interval: Option<Dur>,
    pub(super) health_check_timeout: Option<Dur>,
    pub(super) health_check_rise: Option<u32>,
    pub(super) health_check_fall: Option<u32>,
    pub(super) rebalance_interval: Option<Dur>,
    pub(super) rebalance_batch: Option<usize>,
    pub(super) tls_cert: Option<Spanned<PathBuf>>,
    pub(super) tls_key: Option<Spanned<PathBuf>>,
    pub(super) tls_dir: Option<PathBuf>,
    pub(super) backend_ca: Option<Spanned<PathBuf>>,
    pub(super) backend_server_name: Option<String>,
    pub(super) backend_verify: Option<Spanned<bool>>,
    pub(super) backend_cert: Option<Spanned<PathBuf>>,
    pub(super) backend_key: Option<Spanned<PathBuf>>,
    pub(super) replay_ttl: Option<Dur>,
    pub(super) failover: Option<bool>,
    pub(super) resend_unacknowledged: Option<bool>,
    pub(super) hold_timeout: Option<Dur>,
    pub(super) reply_timeout: Option<Dur>,
    pub(super) manager_user_timeout: Option<Dur>,
    pub(super) liveness_timeout: Option<Dur>,
    pub(super) overtake_time: Option<Dur>,
    pub(super) refused_backoff: Option<Dur>,
    pub(super) refused_backoff_max: Option<Dur>,
    pub(super) max_connections_per_source: Option<u32>,
    pub(super) connection_rate_per_source: Option<f64>,
    pub(super) connection_burst_per_source: Option<f64>,
    pub(super) source: Option<Spanned<String>>,
    pub(super) resolve_interval: Option<Dur>,
    pub(super) proxy_protocol: Option<Spanned<bool>>,
    pub(super) proxy_protocol_trusted: Option<Spanned<Vec<Spanned<String>>>>,
    pub(super) backends: Spanned<Vec<Spanned<FileBackend>>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FileBackend {
    pub(super) address: Option<Spanned<String>>,
    pub(super) srv: Option<Spanned<String>>,
    pub(super) weight: Option<u32>,
    pub(super) max_fails: Option<u32>,
    pub(super) fail_timeout: Option<Dur>,
    #[serde(default)]
    pub(super) backup: bool,
    #[serde(default)]
    pub(super) down: bool,
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
pub(super) const AGENT: u8 = 1;
pub(super) const UDP: u8 = 2;
pub(super) const TCP: u8 = 4;
pub(super) const ENROLL: u8 = 8;
pub(super) const EVERY: u8 = AGENT | UDP | TCP | ENROLL;

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
    ("resend_unacknowledged", AGENT),
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
pub(super) fn kinds_text(bits: u8) -> String {
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
