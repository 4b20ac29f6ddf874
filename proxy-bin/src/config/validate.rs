//! Validation of the file as written into [`Config`], every error with its file:line.

use std::net::SocketAddr;
use std::ops::Range;

use wazuh_proxy_core::balance::{BackendConfig, Policy};

use super::addr::{resolve_all, resolve_one};
use super::file::{kind_bit, kinds_text, FileConfig, FileListener, LISTENER_KEYS};
use super::print::serde_kind;
use super::project::{source_limits_of, spec_of};
use super::{
    check_batch_window, parse_admin, AdminSettings, Config, ConfigError, Dur, Listener,
    ListenerKind, NamedBackend, Resolve, Source, DEFAULT_BATCH_WINDOW, DEFAULT_DRAIN,
};

/// Where `key` is written inside the listener table that starts at `start`: the span of its
/// line, or `None` (then the listener's own position is used).
pub(super) fn key_span(text: &str, start: usize, key: &str) -> Option<Range<usize>> {
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
pub(super) fn why_not(key: &str, kind: ListenerKind) -> &'static str {
    match (key, kind) {
        ("proxy_protocol" | "proxy_protocol_trusted", ListenerKind::Udp) => {
            " (load balancers in front of Wazuh send the PROXY header on TCP only; PROXY v2 over UDP, one header per datagram, is not what nginx, HAProxy or cloud load balancers forward to 1514/udp)"
        }
        _ => "",
    }
}

/// Refuses every key of a listener that does not apply to its kind, with the key's line.
pub(super) fn check_keys_apply(
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
pub(super) fn health_of(
    l: &FileListener,
    kind: ListenerKind,
    start: usize,
    src: &Source<'_>,
) -> Result<Option<wazuh_proxy_core::health::HealthCheck>, ConfigError> {
    use wazuh_proxy_core::health::{HealthCheck, Probe};
    let kind_name = serde_kind(kind);
    let probe = match &l.health_check {
        None => kind.default_probe(),
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

impl Config {
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
                None => kind.default_balance(),
            };
            if matches!(kind, ListenerKind::Tcp | ListenerKind::Enroll)
                && balance == Policy::AgentId
            {
                let span = l.balance.as_ref().map(|b| b.span());
                return Err(src.error(span, "balance = \"agent-id\" needs a listener that reads agent IDs (kind agent or udp)"));
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
            let source_limits = source_limits_of(&l);
            let spec = spec_of(&l, kind, span.clone(), &src)?;
            let health = health_of(&l, kind, span.start, &src)?;
            let name = l.name.unwrap_or_else(|| format!("listener{}", i + 1));
            if listeners.iter().any(|o: &Listener| o.name == name) {
                return Err(src.error(
                    Some(span.clone()),
                    format!("listener name {name:?} is used twice"),
                ));
            }
            if listeners.iter().any(|o: &Listener| {
                o.listen == listen && (o.kind() == ListenerKind::Udp) == (kind == ListenerKind::Udp)
            }) {
                return Err(src.error(
                    Some(l.listen.span()),
                    format!("address {listen} is used by two listeners"),
                ));
            }
            let listener = Listener {
                name,
                listen,
                balance,
                backends,
                health,
                resolve,
                source_limits,
                spec,
            };
            // Every setting against its range and the ones it works with: what is accepted
            // here must never fail at run time.
            listener
                .check()
                .map_err(|e| src.error(Some(span), format!("listener {}: {e}", i + 1)))?;
            listeners.push(listener);
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
}
