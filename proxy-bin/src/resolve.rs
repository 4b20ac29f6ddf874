//! `resolve_interval`: backend names resolved again periodically, as HAProxy and nginx (1.27.3+)
//! do, so that managers rescheduled with new addresses (Kubernetes pods, DNS failover) are
//! followed without a reload.
//!
//! Every interval each name of a listener is looked up; when the resulting set of addresses
//! differs from the running one it is applied the way a reload applies a backend set (the
//! balancer is replaced; live sessions stay), and agents on an address that is gone are moved
//! to their manager in the new set at a frame boundary, without disconnecting them. A name
//! that does not resolve keeps nothing: its backend is unavailable and `/health` names it. If
//! nothing resolves at all, the previous set is kept.
//!
//! Host names go through the system's resolver (getaddrinfo: /etc/hosts, then DNS), as at
//! load. SRV records (`srv = "_wazuh._tcp.NAME"`) go through hickory-resolver, asking the
//! configuration's `resolvers` or else the name servers of /etc/resolv.conf; each record's
//! target is looked up (A and AAAA) with the record's port, and targets of a priority above
//! the lowest become backups, as DNS SRV intends.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Mutex, OnceLock};

use hickory_resolver::TokioResolver;
use tokio_util::sync::CancellationToken;
use wazuh_proxy::dns::{dns_resolver, srv_lookup, LOOKUP_TIMEOUT};
use wazuh_proxy_core::balance::{BackendConfig, Balancer};

use crate::config::{Config, Listener, Resolve};
use tokio_util::task::TaskTracker;
use wazuh_proxy_core::proxy::ListenerHandle;

/// Per listener, the names that did not resolve at the last lookup: `(name, error)`.
type Table = HashMap<String, Vec<(String, String)>>;

/// The process's table, read by `/health`.
fn unresolved_table() -> &'static Mutex<Table> {
    static TABLE: OnceLock<Mutex<Table>> = OnceLock::new();
    TABLE.get_or_init(|| Mutex::new(HashMap::new()))
}

/// The names of `listener` that did not resolve at the last lookup, with the error.
pub(crate) fn unresolved(listener: &str) -> Vec<(String, String)> {
    unresolved_table()
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .get(listener)
        .cloned()
        .unwrap_or_default()
}

fn set_unresolved(listener: &str, names: Vec<(String, String)>) {
    let mut t = unresolved_table().lock().unwrap_or_else(|p| p.into_inner());
    if names.is_empty() {
        t.remove(listener);
    } else {
        t.insert(listener.to_owned(), names);
    }
}

/// The running re-resolution tasks of one configuration.
#[derive(Debug)]
pub(crate) struct Watchers {
    stop: CancellationToken,
}

impl Watchers {
    /// Stops every task (before a reload starts the new configuration's).
    pub(crate) fn stop(&self) {
        self.stop.cancel();
    }
}

/// Starts one task per listener with `resolve_interval`, on `tracker`; `running` pairs each
/// running listener with its configuration.
pub(crate) fn start(
    config: &Config,
    running: &[(Listener, ListenerHandle)],
    tracker: &TaskTracker,
) -> Watchers {
    let stop = CancellationToken::new();
    unresolved_table()
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clear();
    for l in &config.listeners {
        let Some(resolve) = &l.resolve else { continue };
        let Some((_, relay)) = running.iter().find(|(s, _)| s.name == l.name) else {
            continue;
        };
        // Names that did not resolve when the configuration was loaded.
        let missing: Vec<(String, String)> = resolve
            .named
            .iter()
            .filter(|n| !n.resolved_at_load)
            .map(|n| {
                let why = n.load_error.as_deref().unwrap_or("no address");
                (
                    n.name.clone(),
                    format!("did not resolve when the configuration was loaded: {why}"),
                )
            })
            .collect();
        set_unresolved(&l.name, missing);
        tracker.spawn(watch(
            l.clone(),
            resolve.clone(),
            relay.clone(),
            stop.clone(),
        ));
    }
    Watchers { stop }
}

async fn watch(
    listener: Listener,
    resolve: Resolve,
    relay: ListenerHandle,
    stop: CancellationToken,
) {
    let dns = resolve
        .named
        .iter()
        .any(|n| n.srv)
        .then(|| dns_resolver(&resolve.resolvers, resolve.interval));
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(resolve.interval) => {}
        }
        let (found, failed) = lookup(&resolve, dns.as_ref()).await;
        for (name, e) in &failed {
            tracing::debug!(listener = %listener.name, backend = %name, error = %e, "backend name does not resolve");
        }
        set_unresolved(&listener.name, failed);
        apply(&listener, &relay, found);
    }
}

/// Looks every name up: the backend set (literal backends first) and the names that failed.
async fn lookup(
    resolve: &Resolve,
    dns: Option<&TokioResolver>,
) -> (Vec<BackendConfig>, Vec<(String, String)>) {
    let mut set = resolve.literal.clone();
    let mut failed = Vec::new();
    for n in &resolve.named {
        let found: Result<Vec<(SocketAddr, bool)>, String> = match (n.srv, dns) {
            (true, Some(dns)) => srv_lookup(dns, &n.name).await,
            (true, None) => Err("no DNS resolver".to_owned()),
            (false, _) => {
                match tokio::time::timeout(LOOKUP_TIMEOUT, tokio::net::lookup_host(&n.name)).await {
                    Ok(Ok(addrs)) => Ok(addrs.map(|a| (a, false)).collect()),
                    Ok(Err(e)) => Err(e.to_string()),
                    Err(_) => Err(format!("lookup timed out after {LOOKUP_TIMEOUT:?}")),
                }
            }
        };
        match found {
            Ok(addrs) => {
                for (addr, srv_backup) in addrs {
                    if !set.iter().any(|b| b.addr == addr) {
                        let mut b = BackendConfig {
                            addr,
                            ..n.template.clone()
                        };
                        if srv_backup {
                            b = b.as_backup();
                        }
                        set.push(b);
                    }
                }
            }
            Err(e) => failed.push((n.name.clone(), e)),
        }
    }
    (set, failed)
}

fn sorted(mut v: Vec<BackendConfig>) -> Vec<BackendConfig> {
    v.sort_by_key(|b| b.addr);
    v
}

/// Replaces the running backend set with `found` when it differs, and moves the agents whose
/// manager's address is gone.
fn apply(listener: &Listener, relay: &ListenerHandle, found: Vec<BackendConfig>) {
    let balancer = relay.balancer();
    let current: Vec<BackendConfig> = balancer
        .backends()
        .iter()
        .map(|b| b.config().clone())
        .collect();
    let (current, found) = (sorted(current), sorted(found));
    if current == found {
        return;
    }
    if found.is_empty() {
        tracing::warn!(listener = %listener.name, "no backend name resolves; keeping the previous addresses");
        return;
    }
    let next = match Balancer::new(listener.balance, found.clone()) {
        Ok(b) => b,
        Err(e) => {
            tracing::warn!(listener = %listener.name, error = %e, "resolved backends refused; keeping the previous addresses");
            return;
        }
    };
    let added: Vec<String> = found
        .iter()
        .filter(|b| !current.iter().any(|c| c.addr == b.addr))
        .map(|b| b.addr.to_string())
        .collect();
    let gone: Vec<SocketAddr> = current
        .iter()
        .filter(|c| !found.iter().any(|b| b.addr == c.addr))
        .map(|c| c.addr)
        .collect();
    relay.set_balancer(next);
    let mut moved = 0;
    if let Some(r) = relay.as_agent() {
        for s in r.sessions().sessions() {
            if s.backend().is_some_and(|b| gone.contains(&b)) {
                s.request_move();
                moved += 1;
            }
        }
    }
    let gone: Vec<String> = gone.iter().map(ToString::to_string).collect();
    tracing::info!(listener = %listener.name, added = %added.join(","), removed = %gone.join(","),
        moved_agents = moved, "backend names resolved to new addresses; applied like a reload");
}
