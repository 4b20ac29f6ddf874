//! DNS lookups of SRV records for backends (`srv = "_wazuh._tcp.NAME"`), with hickory-resolver:
//! the configuration's `resolvers`, or the name servers of /etc/resolv.conf.

use std::net::SocketAddr;
use std::time::Duration;

use hickory_resolver::config::{NameServerConfigGroup, ResolveHosts, ResolverConfig};
use hickory_resolver::name_server::TokioConnectionProvider;
use hickory_resolver::TokioResolver;

/// How long one name's lookup may take.
pub const LOOKUP_TIMEOUT: Duration = Duration::from_secs(10);

/// How long an SRV lookup may hold up loading a configuration.
const LOAD_TIMEOUT: Duration = Duration::from_secs(3);

/// A DNS resolver for SRV lookups: `servers`, or the system's name servers when empty.
/// Answers are cached no longer than `interval`, so each round sees changes.
pub fn dns_resolver(servers: &[SocketAddr], interval: Duration) -> TokioResolver {
    let provider = TokioConnectionProvider::default();
    let mut builder = if servers.is_empty() {
        match TokioResolver::builder(provider.clone()) {
            Ok(b) => b,
            Err(e) => {
                // No usable /etc/resolv.conf: lookups fail (and say so) until one is given.
                tracing::warn!(error = %e, "cannot read the system's DNS configuration; SRV lookups will fail");
                TokioResolver::builder_with_config(
                    ResolverConfig::from_parts(None, vec![], NameServerConfigGroup::new()),
                    provider,
                )
            }
        }
    } else {
        // One group per port (a test or a sidecar may listen elsewhere than 53).
        let mut group = NameServerConfigGroup::new();
        for s in servers {
            let one = NameServerConfigGroup::from_ips_clear(&[s.ip()], s.port(), true);
            group.merge(one);
        }
        TokioResolver::builder_with_config(
            ResolverConfig::from_parts(None, vec![], group),
            provider,
        )
    };
    let opts = builder.options_mut();
    opts.positive_max_ttl = Some(interval);
    opts.negative_max_ttl = Some(interval);
    opts.timeout = Duration::from_secs(3);
    if !servers.is_empty() {
        opts.use_hosts_file = ResolveHosts::Never;
    }
    builder.build()
}

/// An SRV record's addresses: `(address, backup)`, a target of a priority above the lowest
/// being a backup.
pub async fn srv_lookup(
    dns: &TokioResolver,
    name: &str,
) -> Result<Vec<(SocketAddr, bool)>, String> {
    let records = tokio::time::timeout(LOOKUP_TIMEOUT, dns.srv_lookup(name))
        .await
        .map_err(|_| format!("SRV lookup timed out after {LOOKUP_TIMEOUT:?}"))?
        .map_err(|e| e.to_string())?;
    let records: Vec<(u16, u16, String)> = records
        .iter()
        .map(|r| (r.priority(), r.port(), r.target().to_ascii()))
        .collect();
    let best = records.iter().map(|r| r.0).min();
    let mut out = Vec::new();
    let mut errors = Vec::new();
    for (priority, port, target) in records {
        match tokio::time::timeout(LOOKUP_TIMEOUT, dns.lookup_ip(target.as_str())).await {
            Ok(Ok(ips)) => {
                for ip in ips.iter() {
                    let addr = SocketAddr::new(ip, port);
                    if !out.iter().any(|(a, _)| *a == addr) {
                        out.push((addr, Some(priority) != best));
                    }
                }
            }
            Ok(Err(e)) => errors.push(format!("{target}: {e}")),
            Err(_) => errors.push(format!("{target}: lookup timed out")),
        }
    }
    if out.is_empty() {
        return Err(if errors.is_empty() {
            "the SRV record has no target".to_owned()
        } else {
            errors.join("; ")
        });
    }
    Ok(out)
}

/// An SRV record's addresses while a configuration is loaded (outside the runtime: a thread
/// of its own with a small runtime, so that this works wherever the load runs).
pub fn srv_at_load(name: &str, servers: &[SocketAddr]) -> Result<Vec<(SocketAddr, bool)>, String> {
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .map_err(|e| format!("cannot start a runtime for the lookup: {e}"))?;
                rt.block_on(async {
                    let dns = dns_resolver(servers, Duration::from_secs(1));
                    // A load (check-config, reload) does not wait long on DNS: a record that
                    // does not answer soon is looked up again at the next interval.
                    tokio::time::timeout(LOAD_TIMEOUT, srv_lookup(&dns, name))
                        .await
                        .unwrap_or_else(|_| {
                            Err(format!("SRV lookup timed out after {LOAD_TIMEOUT:?}"))
                        })
                })
            })
            .join()
            .unwrap_or_else(|_| Err("the lookup failed".to_owned()))
    })
}
