//! The JSON documents of `/health`, `/sessions` and `/backends`.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::{json, Value};
use wazuh_proxy_core::balance::{Backend, Balancer};
use wazuh_proxy_core::session::SessionInfo;

use super::{Shared, Target};
use wazuh_proxy_core::proxy::OperatorError;

/// A backend's state: `down` (configured so), `failed` (marked by passive health until its
/// fail_timeout passes), or `available`.
pub(crate) fn backend_state(b: &Backend, now: Instant) -> &'static str {
    if b.config().down {
        "down"
    } else if b.is_available(now) {
        "available"
    } else {
        "failed"
    }
}

/// Every state [`backend_state`] can return.
pub(crate) const BACKEND_STATES: [&str; 3] = ["available", "failed", "down"];

/// Why a listener is unhealthy, if it is.
pub(crate) fn listener_problem(t: &Target, balancer: &Balancer, now: Instant) -> Option<String> {
    if !t.is_agent_facing() || balancer.any_available(now) {
        return None;
    }
    let each: Vec<String> = balancer
        .backends()
        .iter()
        .map(|b| match (b.config().down, b.failed_until(now)) {
            (true, _) => format!("{} down", b.addr()),
            (false, Some(until)) => format!(
                "{} failed (retried in {:.1}s)",
                b.addr(),
                until.saturating_duration_since(now).as_secs_f64()
            ),
            (false, None) => format!("{} failed", b.addr()),
        })
        .collect();
    Some(format!(
        "listener {:?} ({}): no backend available: {}",
        t.name,
        t.kind_name(),
        each.join(", ")
    ))
}

/// `/health`: whether the node may hold the VIP, and the document saying why.
pub(crate) fn health(shared: &Shared) -> (bool, Value) {
    let now = Instant::now();
    let draining = shared.draining();
    let mut reasons = Vec::new();
    if draining {
        reasons.push("draining: shutting down, not accepting new connections".to_owned());
    }
    let listeners: Vec<Value> = shared
        .targets
        .load()
        .iter()
        .map(|t| {
            let balancer = t.balancer();
            let problem = listener_problem(t, &balancer, now);
            let available = balancer
                .backends()
                .iter()
                .filter(|b| b.is_available(now))
                .count();
            let mut v = json!({
                "name": t.name,
                "kind": t.kind_name(),
                "address": t.listen.to_string(),
                "bound": true,
                "accepting": !draining,
                "healthy": problem.is_none() && !draining,
                "backends_available": available,
                "backends_total": balancer.backends().len(),
            });
            // Backend names that do not resolve (resolve_interval): unavailable until they do.
            let unresolved = crate::resolve::unresolved(&t.name);
            if !unresolved.is_empty() {
                v["unresolved"] = json!(unresolved
                    .iter()
                    .map(|(name, error)| json!({"backend": name, "error": error}))
                    .collect::<Vec<_>>());
            }
            if let Some(mut p) = problem {
                if !unresolved.is_empty() {
                    let names: Vec<&str> = unresolved.iter().map(|(n, _)| n.as_str()).collect();
                    p.push_str(&format!("; not resolving: {}", names.join(", ")));
                }
                v["reason"] = json!(p);
                reasons.push(p);
            }
            v
        })
        .collect();
    let healthy = reasons.is_empty();
    let mut doc = json!({
        "status": if healthy { "ok" } else { "unhealthy" },
        "listeners": listeners,
    });
    if !healthy {
        doc["reason"] = json!(reasons.join("; "));
    }
    (healthy, doc)
}

/// The optional filters of `/sessions`.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct SessionFilter {
    pub(crate) agent: Option<String>,
    pub(crate) backend: Option<String>,
}

impl SessionFilter {
    /// Reads `agent=ID&backend=ADDR` (percent-encoded); other keys are errors.
    pub(crate) fn from_query(query: Option<&str>) -> Result<SessionFilter, String> {
        let mut f = SessionFilter::default();
        for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            let v = percent_decode(v).ok_or_else(|| format!("bad percent-encoding in {k:?}"))?;
            match k {
                "agent" => f.agent = Some(v),
                "backend" => f.backend = Some(v),
                other => {
                    return Err(format!(
                        "unknown parameter {other:?} (expected agent or backend)"
                    ))
                }
            }
        }
        Ok(f)
    }

    fn matches(&self, s: &SessionInfo) -> bool {
        let agent_ok = self.agent.as_deref().map_or(true, |a| {
            let key = s.key.to_string();
            key == a || key.trim_start_matches('0') == a.trim_start_matches('0')
        });
        let backend_ok = self
            .backend
            .as_deref()
            .map_or(true, |b| s.backend.is_some_and(|sb| sb.to_string() == b));
        agent_ok && backend_ok
    }
}

fn percent_decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                let hex = std::str::from_utf8(bytes.get(i + 1..i + 3)?).ok()?;
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8(out).ok()
}

fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_seconds(t).to_string()
}

fn unix(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

fn secs(d: Duration) -> f64 {
    (d.as_secs_f64() * 1000.0).round() / 1000.0
}

fn session_json(listener: &str, s: &SessionInfo) -> Value {
    json!({
        "listener": listener,
        "id": s.id,
        "agent": s.key.to_string(),
        "client": s.client.to_string(),
        "backend": s.backend.map(|b| b.to_string()),
        "started": rfc3339(s.started),
        "started_unix": unix(s.started),
        "age_s": secs(s.age),
        "idle_s": secs(s.idle),
        "frames_up": s.frames_up,
        "bytes_up": s.bytes_up,
        "frames_down": s.frames_down,
        "bytes_down": s.bytes_down,
        "name": s.agent.name,
        "version": s.agent.version,
        "os": s.agent.os,
        "last_keepalive": s.agent.last_keepalive.map(rfc3339),
        "shutdown": s.agent.shutdown,
    })
}

/// `/sessions`: every live agent session that passes `filter`, by listener then session number.
pub(crate) fn sessions(shared: &Shared, filter: &SessionFilter) -> Value {
    let out = shared
        .view
        .load()
        .sessions()
        .iter()
        .filter(|(_, s)| filter.matches(s))
        .map(|(name, s)| session_json(name, s))
        .collect();
    Value::Array(out)
}

/// `/backends`: per listener, every backend with its state and counters.
pub(crate) fn backends(shared: &Shared) -> Value {
    let now = Instant::now();
    let listeners: Vec<Value> = shared
        .targets
        .load()
        .iter()
        .map(|t| {
            let balancer = t.balancer();
            let list: Vec<Value> = balancer
                .backends()
                .iter()
                .map(|b| {
                    let c = b.config();
                    json!({
                        "address": b.addr().to_string(),
                        "state": backend_state(b, now),
                        "weight": c.weight,
                        "backup": c.backup,
                        "down": c.down,
                        "available": b.is_available(now),
                        "failed_for_s": b.failed_until(now)
                            .map(|u| secs(u.saturating_duration_since(now))),
                        "fails": b.fails(),
                        "max_fails": c.max_fails,
                        "fail_timeout_s": secs(c.fail_timeout),
                        "active": b.active(),
                        "opened_total": b.opened_total(),
                        "successes_total": b.successes_total(),
                        "failures_total": b.failures_total(),
                        "marked_failed_total": b.unavailable_total(),
                    })
                })
                .collect();
            json!({
                "listener": t.name,
                "kind": t.kind_name(),
                "address": t.listen.to_string(),
                "balance": balancer.policy().to_string(),
                "backends": list,
            })
        })
        .collect();
    Value::Array(listeners)
}

/// `POST /rebalance[?limit=N]`, `POST /drain?backend=ADDR`, `POST /undrain?backend=ADDR`:
/// move agents between managers without disconnecting them.
pub(crate) fn act(
    shared: &Shared,
    path: &str,
    query: Option<&str>,
) -> Result<Value, (hyper::StatusCode, String)> {
    use hyper::StatusCode;
    let param = |name: &str| -> Option<String> {
        query?.split('&').find_map(|kv| {
            let (k, v) = kv.split_once('=')?;
            (k == name).then(|| v.replace("%3A", ":").replace("%3a", ":"))
        })
    };
    let view = shared.view.load();
    match path {
        "/rebalance" => {
            let limit = match param("limit") {
                Some(l) => l
                    .parse::<usize>()
                    .map_err(|_| (StatusCode::BAD_REQUEST, format!("bad limit {l:?}")))?,
                None => usize::MAX,
            };
            let moved: Vec<Value> = view
                .rebalance(limit)
                .into_iter()
                .map(|(name, n)| json!({"listener": name, "moving": n}))
                .collect();
            Ok(json!({"rebalance": moved}))
        }
        "/drain" | "/undrain" => {
            let backend = param("backend").ok_or((
                StatusCode::BAD_REQUEST,
                "backend=ADDR is required".to_owned(),
            ))?;
            let addr: std::net::SocketAddr = backend.parse().map_err(|_| {
                (
                    StatusCode::BAD_REQUEST,
                    format!("bad backend address {backend:?}"),
                )
            })?;
            let refused = |e: OperatorError| {
                let status = match e {
                    OperatorError::NoSuchBackend(_) => StatusCode::NOT_FOUND,
                    _ => StatusCode::CONFLICT,
                };
                (status, e.to_string())
            };
            let done: Vec<Value> = if path == "/drain" {
                view.drain_backend(addr)
                    .map_err(refused)?
                    .into_iter()
                    .map(|(name, n)| json!({"listener": name, "moving": n}))
                    .collect()
            } else {
                view.undrain_backend(addr)
                    .map_err(refused)?
                    .into_iter()
                    .map(|name| json!({"listener": name, "back_in_rotation": true}))
                    .collect()
            };
            Ok(json!({"backend": addr.to_string(), "listeners": done}))
        }
        _ => Err((StatusCode::NOT_FOUND, format!("no such action {path:?}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn session_filters_parse() {
        assert_eq!(
            SessionFilter::from_query(None).unwrap(),
            SessionFilter::default()
        );
        let f = SessionFilter::from_query(Some("agent=001&backend=127.0.0.1%3A1514")).unwrap();
        assert_eq!(f.agent.as_deref(), Some("001"));
        assert_eq!(f.backend.as_deref(), Some("127.0.0.1:1514"));
        assert!(SessionFilter::from_query(Some("agnet=1")).is_err());
        assert!(SessionFilter::from_query(Some("agent=%zz")).is_err());
        assert!(SessionFilter::from_query(Some("agent=%4")).is_err());
    }
}
