//! `/metrics`: a Prometheus collector that reads the relays' atomics at scrape time, so the
//! hot path keeps one set of counters and nothing is copied between scrapes.
//!
//! Labels are bounded: `listener`, `backend` (a configured address), `direction`, `reason`
//! (every [`Rejection::ALL`] label), `state`. An agent ID or name is never a label; per-agent
//! detail is in `/sessions`.
//!
//! Counter names are written without `_total` here: the OpenMetrics encoder appends it.

use std::fmt;
use std::sync::Arc;
use std::time::Instant;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, NoLabelSet};
use prometheus_client::metrics::MetricType;
use wazuh_proxy_core::balance::Backend;
use wazuh_proxy_core::stats::{Rejection, RelayStats};

use super::api::{backend_state, listener_problem, BACKEND_STATES};
use super::{Shared, Target};
use wazuh_proxy_core::proxy::ListenerHandle;

/// Every metric name, in one place.
pub(crate) mod names {
    /// Gauge 1 per listener, labels `listener`, `kind`, `address`.
    pub(crate) const LISTENER_INFO: &str = "wazuh_proxy_listener_info";
    /// Gauge: 1 when the listener counts as healthy in `/health`.
    pub(crate) const LISTENER_HEALTHY: &str = "wazuh_proxy_listener_healthy";
    /// Counter: connections accepted (UDP: new flows asked for).
    pub(crate) const CONNECTIONS_ACCEPTED: &str = "wazuh_proxy_connections_accepted";
    /// Gauge: connections open now (UDP: flows).
    pub(crate) const CONNECTIONS_ACTIVE: &str = "wazuh_proxy_connections_active";
    /// Counter: sessions that reached a backend.
    pub(crate) const SESSIONS: &str = "wazuh_proxy_sessions";
    /// Gauge: agent sessions in the session registry now (agent listeners).
    pub(crate) const SESSIONS_LIVE: &str = "wazuh_proxy_sessions_live";
    /// Counter, label `direction` (`to_manager`, `to_agent`): frames (UDP: datagrams).
    pub(crate) const FRAMES: &str = "wazuh_proxy_frames";
    /// Counter, label `direction`: bytes relayed.
    pub(crate) const BYTES: &str = "wazuh_proxy_bytes";
    /// Counter: failed connection attempts to backends.
    pub(crate) const CONNECT_FAILURES: &str = "wazuh_proxy_connect_failures";
    /// Counter, label `reason`: connections (or datagrams) refused or closed.
    pub(crate) const REJECTED: &str = "wazuh_proxy_rejected";
    /// Counter: sessions that ended with the agent's shutdown message.
    pub(crate) const CLEAN_STOPS: &str = "wazuh_proxy_clean_stops";
    /// Counter: sessions that ended any other way.
    pub(crate) const LOST_SESSIONS: &str = "wazuh_proxy_lost_sessions";
    pub(crate) const ENROLLMENTS: &str = "wazuh_proxy_enrollments";
    /// Counter, label `reason` (`too_many_connections`, `source_limit`, `proxy_protocol`): enrollment
    /// connections closed at accept.
    pub(crate) const ENROLL_REFUSED: &str = "wazuh_proxy_enroll_refused";
    /// Counter: key replies kept for a retry because the agent's TCP did not acknowledge them.
    pub(crate) const ENROLL_KEPT: &str = "wazuh_proxy_enroll_kept";
    /// Gauge per backend, label `state` (`available`, `failed`, `down`): 1 for the current one.
    pub(crate) const BACKEND_STATE: &str = "wazuh_proxy_backend_state";
    /// Gauge per backend: 1 for a backup server.
    pub(crate) const BACKEND_BACKUP: &str = "wazuh_proxy_backend_backup";
    /// Gauge per backend: connections open now.
    pub(crate) const BACKEND_ACTIVE: &str = "wazuh_proxy_backend_active_connections";
    /// Counter per backend: connections opened (attempts included).
    pub(crate) const BACKEND_OPENED: &str = "wazuh_proxy_backend_connections_opened";
    /// Counter per backend: successful connects.
    pub(crate) const BACKEND_SUCCESSES: &str = "wazuh_proxy_backend_successes";
    /// Counter per backend: failed connects (and connections dropped at once).
    pub(crate) const BACKEND_FAILURES: &str = "wazuh_proxy_backend_failures";
    /// Counter per backend: times it was marked failed by passive health.
    pub(crate) const BACKEND_MARKED_FAILED: &str = "wazuh_proxy_backend_marked_failed";
    /// Gauge: UDP flows open now.
    pub(crate) const UDP_FLOWS_ACTIVE: &str = "wazuh_proxy_udp_flows_active";
    /// Counter: datagrams dropped because the flow table was full.
    pub(crate) const UDP_FLOWS_REFUSED: &str = "wazuh_proxy_udp_flows_refused";
    /// Counter: flows closed by the idle timeout.
    pub(crate) const UDP_FLOWS_EXPIRED: &str = "wazuh_proxy_udp_flows_expired";
    /// Counter: datagrams that could not be sent on.
    pub(crate) const UDP_SEND_FAILURES: &str = "wazuh_proxy_udp_send_failures";
    /// Counter (process-wide): pauses taken before sleeping after a busy round (`batch_window`).
    pub(crate) const BATCH_PAUSES: &str = "wazuh_proxy_batch_pauses";
    /// Counter: agents kept connected and moved after their manager failed.
    pub(crate) const FAILOVERS: &str = "wazuh_proxy_failovers";
    /// Counter: agents moved on request (drain, rebalance) without disconnecting.
    pub(crate) const MOVES: &str = "wazuh_proxy_moves";
    /// Counter: frames written to managers that then failed.
    pub(crate) const FRAMES_AT_RISK: &str = "wazuh_proxy_frames_at_risk";
    /// Counter: frames re-sent to the next manager (the failed one's TCP never acknowledged them).
    pub(crate) const FRAMES_RESENT: &str = "wazuh_proxy_frames_resent";
    /// Counter: manager connections a manager closed (or never answered) before answering the
    /// agent: refusals of one agent, which never mark the manager failed.
    pub(crate) const MANAGER_REFUSALS: &str = "wazuh_proxy_manager_refusals";
    /// Counter: manager connections a manager closed after serving the agent.
    pub(crate) const MANAGER_CLOSES: &str = "wazuh_proxy_manager_closes";
    /// Gauge: agents every manager refused that the proxy keeps away for now.
    pub(crate) const AGENTS_KEPT_AWAY: &str = "wazuh_proxy_agents_kept_away";
    /// Gauge (process-wide): agents held, waiting for a reachable manager.
    pub(crate) const AGENTS_HELD: &str = "wazuh_proxy_agents_held";
    /// Gauge 1, label `version`.
    pub(crate) const BUILD_INFO: &str = "wazuh_proxy_build_info";
    /// Histogram (process-wide): TCP connect time to managers.
    pub(crate) const UPSTREAM_CONNECT_SECONDS: &str = "wazuh_proxy_upstream_connect_seconds";
    /// Histogram (process-wide): manager failure to relaying through the next one.
    pub(crate) const FAILOVER_SECONDS: &str = "wazuh_proxy_failover_seconds";
    /// Process metrics, the names client libraries use.
    pub(crate) const PROCESS_OPEN_FDS: &str = "process_open_fds";
    pub(crate) const PROCESS_MAX_FDS: &str = "process_max_fds";
    pub(crate) const PROCESS_RESIDENT_MEMORY: &str = "process_resident_memory_bytes";
    pub(crate) const PROCESS_VIRTUAL_MEMORY: &str = "process_virtual_memory_bytes";
    pub(crate) const PROCESS_CPU_SECONDS: &str = "process_cpu_seconds";
    pub(crate) const PROCESS_START_TIME: &str = "process_start_time_seconds";
}

use names::*;

type Labels = Vec<(&'static str, String)>;

/// Reads every listener's counters on each scrape.
#[derive(Debug)]
pub(crate) struct RelayCollector {
    shared: Arc<Shared>,
}

impl RelayCollector {
    pub(crate) fn new(shared: Arc<Shared>) -> Self {
        RelayCollector { shared }
    }
}

/// Writes a family of one sample without labels (a process-wide value).
fn single<V: Sample>(
    enc: &mut DescriptorEncoder,
    name: &'static str,
    help: &str,
    v: V,
) -> fmt::Result {
    let mut metric = enc.encode_descriptor(name, help, None, V::TYPE)?;
    v.encode(&mut metric)
}

/// Writes one family: its descriptor, then one sample per label set.
fn family<V: Sample>(
    enc: &mut DescriptorEncoder,
    name: &'static str,
    help: &str,
    samples: impl IntoIterator<Item = (Labels, V)>,
) -> fmt::Result {
    let mut metric = enc.encode_descriptor(name, help, None, V::TYPE)?;
    for (labels, v) in samples {
        let mut m = metric.encode_family(&labels)?;
        v.encode(&mut m)?;
    }
    Ok(())
}

trait Sample {
    const TYPE: MetricType;
    fn encode(&self, m: &mut prometheus_client::encoding::MetricEncoder) -> fmt::Result;
}

/// A counter value.
struct C(u64);
/// A gauge value.
struct G(i64);

impl Sample for C {
    const TYPE: MetricType = MetricType::Counter;
    fn encode(&self, m: &mut prometheus_client::encoding::MetricEncoder) -> fmt::Result {
        m.encode_counter::<NoLabelSet, u64, u64>(&self.0, None)
    }
}

impl Sample for G {
    const TYPE: MetricType = MetricType::Gauge;
    fn encode(&self, m: &mut prometheus_client::encoding::MetricEncoder) -> fmt::Result {
        m.encode_gauge(&self.0)
    }
}

/// A counter with a fractional value (seconds).
struct CF(f64);

impl Sample for CF {
    const TYPE: MetricType = MetricType::Counter;
    fn encode(&self, m: &mut prometheus_client::encoding::MetricEncoder) -> fmt::Result {
        m.encode_counter::<NoLabelSet, f64, u64>(&self.0, None)
    }
}

/// A histogram.
struct H(wazuh_proxy_core::timing::HistogramSnapshot);

impl Sample for H {
    const TYPE: MetricType = MetricType::Histogram;
    fn encode(&self, m: &mut prometheus_client::encoding::MetricEncoder) -> fmt::Result {
        m.encode_histogram::<NoLabelSet>(self.0.sum, self.0.count, &self.0.buckets, None)
    }
}

/// Build, process and process-wide relay metrics (no listener label).
fn process_wide(e: &mut DescriptorEncoder) -> fmt::Result {
    family(
        e,
        BUILD_INFO,
        "The running build (always 1).",
        [(
            vec![("version", env!("CARGO_PKG_VERSION").to_owned())],
            G(1),
        )],
    )?;
    single(
        e,
        AGENTS_HELD,
        "Agents held now: connected, waiting for a manager to become reachable (hold_timeout).",
        gauge_of(wazuh_proxy_core::timing::held()),
    )?;
    single(
        e,
        UPSTREAM_CONNECT_SECONDS,
        "Time to establish a TCP connection to a manager (successful connects).",
        H(wazuh_proxy_core::timing::UPSTREAM_CONNECT.snapshot()),
    )?;
    single(
        e,
        FAILOVER_SECONDS,
        "Time from a manager's failure to the agent relaying through the next manager, without disconnecting it.",
        H(wazuh_proxy_core::timing::FAILOVER.snapshot()),
    )?;
    let p = super::process::read();
    if let Some(v) = p.open_fds {
        single(e, PROCESS_OPEN_FDS, "Open file descriptors.", G(v))?;
    }
    if let Some(v) = p.max_fds {
        single(
            e,
            PROCESS_MAX_FDS,
            "Limit of open file descriptors (soft).",
            G(v),
        )?;
    }
    if let Some(v) = p.resident_bytes {
        single(
            e,
            PROCESS_RESIDENT_MEMORY,
            "Resident memory, in bytes.",
            G(v),
        )?;
    }
    if let Some(v) = p.virtual_bytes {
        single(e, PROCESS_VIRTUAL_MEMORY, "Virtual memory, in bytes.", G(v))?;
    }
    if let Some(v) = p.cpu_seconds {
        single(
            e,
            PROCESS_CPU_SECONDS,
            "User and system CPU time, in seconds.",
            CF(v),
        )?;
    }
    single(
        e,
        PROCESS_START_TIME,
        "Start of the process, in seconds since the Unix epoch.",
        G(p.start_time_seconds),
    )
}

fn gauge_of(n: impl TryInto<i64>) -> G {
    G(n.try_into().unwrap_or(i64::MAX))
}

fn listener(t: &Target) -> Labels {
    vec![("listener", t.name.clone())]
}

fn load(a: &std::sync::atomic::AtomicU64) -> u64 {
    a.load(std::sync::atomic::Ordering::Relaxed)
}

impl Collector for RelayCollector {
    fn encode(&self, mut enc: DescriptorEncoder) -> fmt::Result {
        let loaded = self.shared.targets.load();
        let targets: &[Target] = &loaded;
        single(
            &mut enc,
            BATCH_PAUSES,
            "Pauses of batch_window taken by a worker before sleeping, after a round that read 64 KiB or more.",
            C(wazuh_proxy_core::pace::pauses()),
        )?;
        process_wide(&mut enc)?;
        let now = Instant::now();
        let draining = self.shared.draining();
        let per = |f: &dyn Fn(&RelayStats) -> u64| -> Vec<(Labels, C)> {
            targets
                .iter()
                .filter_map(|t| Some((listener(t), C(f(t.stats()?)))))
                .collect()
        };
        let e = &mut enc;

        family(
            e,
            LISTENER_INFO,
            "A configured listener (always 1).",
            targets.iter().map(|t| {
                let mut l = listener(t);
                l.push(("kind", t.kind_name().to_owned()));
                l.push(("address", t.listen.to_string()));
                (l, G(1))
            }),
        )?;
        family(
            e,
            LISTENER_HEALTHY,
            "1 when the listener is accepting and (agent and udp kinds) has a backend available now.",
            targets.iter().map(|t| {
                let ok = !draining && listener_problem(t, &t.balancer(), now).is_none();
                (listener(t), G(i64::from(ok)))
            }),
        )?;
        family(
            e,
            CONNECTIONS_ACCEPTED,
            "Connections accepted (udp: new flows asked for).",
            per(&|s| load(&s.accepted)),
        )?;
        family(
            e,
            CONNECTIONS_ACTIVE,
            "Connections open now (udp: flows).",
            targets.iter().filter_map(|t| {
                let active = t.stats()?.active.load(std::sync::atomic::Ordering::Relaxed);
                Some((listener(t), G(active.max(0))))
            }),
        )?;
        family(
            e,
            SESSIONS,
            "Sessions that reached a backend.",
            per(&|s| load(&s.sessions)),
        )?;
        family(
            e,
            SESSIONS_LIVE,
            "Agent sessions live now (agent listeners).",
            targets.iter().filter_map(|t| match &t.relay {
                ListenerHandle::Agent(r) => Some((listener(t), gauge_of(r.sessions().len()))),
                _ => None,
            }),
        )?;
        let directed = |up: &dyn Fn(&RelayStats) -> u64, down: &dyn Fn(&RelayStats) -> u64| {
            let mut v = Vec::new();
            for t in targets {
                let Some(stats) = t.stats() else { continue };
                for (dir, f) in [("to_manager", up), ("to_agent", down)] {
                    let mut l = listener(t);
                    l.push(("direction", dir.to_owned()));
                    v.push((l, C(f(stats))));
                }
            }
            v
        };
        family(
            e,
            FRAMES,
            "Frames relayed (udp: datagrams; tcp: 0, the stream is not framed).",
            directed(&|s| load(&s.frames_up), &|s| load(&s.frames_down)),
        )?;
        family(
            e,
            BYTES,
            "Bytes relayed.",
            directed(&|s| load(&s.bytes_up), &|s| load(&s.bytes_down)),
        )?;
        family(
            e,
            CONNECT_FAILURES,
            "Failed connection attempts to backends.",
            per(&|s| load(&s.connect_failures)),
        )?;
        family(
            e,
            REJECTED,
            "Connections (udp: datagrams) refused or closed, by reason.",
            targets
                .iter()
                .filter_map(|t| Some((t, t.stats()?)))
                .flat_map(|(t, stats)| {
                    Rejection::ALL.iter().map(move |r| {
                        let mut l = listener(t);
                        l.push(("reason", r.label().to_owned()));
                        (l, C(stats.rejected(*r)))
                    })
                }),
        )?;
        // The plain per-listener counters, one family each.
        type Field = fn(&RelayStats) -> &std::sync::atomic::AtomicU64;
        let counters: [(&'static str, &str, Field); 8] = [
            (
                CLEAN_STOPS,
                "Sessions that ended with the agent's shutdown message (needs client.keys).",
                |s| &s.clean_stops,
            ),
            (LOST_SESSIONS, "Sessions that ended any other way.", |s| &s.lost),
            (
                FAILOVERS,
                "Agents kept connected and reconnected after their manager failed or dropped them.",
                |s| &s.failovers,
            ),
            (
                MOVES,
                "Agents moved on request (drain, rebalance) without disconnecting.",
                |s| &s.moves,
            ),
            (
                FRAMES_AT_RISK,
                "Frames written to managers that then failed, acknowledged by their TCP (so not re-sent), which they may not have processed.",
                |s| &s.frames_at_risk,
            ),
            (
                FRAMES_RESENT,
                "Frames re-sent to the next manager because the failed one's TCP never acknowledged them.",
                |s| &s.frames_resent,
            ),
            (
                MANAGER_REFUSALS,
                "Manager connections closed (or never answered) before the manager answered the agent: one agent refused, the manager not marked failed.",
                |s| &s.manager_refusals,
            ),
            (
                MANAGER_CLOSES,
                "Manager connections the manager closed after serving the agent (the agent was reconnected).",
                |s| &s.manager_closes,
            ),
        ];
        for (name, help, field) in counters {
            family(e, name, help, per(&|s| load(field(s))))?;
        }
        family(
            e,
            AGENTS_KEPT_AWAY,
            "Agents every manager refused that the proxy keeps away for now (their reconnections are closed by the proxy).",
            targets.iter().filter_map(|t| match &t.relay {
                ListenerHandle::Agent(r) => Some((listener(t), gauge_of(r.kept_away()))),
                _ => None,
            }),
        )?;
        family(
            e,
            ENROLLMENTS,
            "Enrollment requests by outcome (enroll listeners).",
            targets
                .iter()
                .filter_map(|t| match &t.relay {
                    ListenerHandle::Enroll(f) => Some((t, f.stats().clone())),
                    _ => None,
                })
                .flat_map(|(t, stats)| {
                    wazuh_proxy_core::enroll::Outcome::ALL.iter().map(move |o| {
                        let mut l = listener(t);
                        l.push(("outcome", o.label().to_owned()));
                        (l, C(stats.count(*o)))
                    })
                }),
        )?;
        family(
            e,
            ENROLL_KEPT,
            "Key replies kept for a retry because the agent's TCP did not acknowledge them (enroll listeners).",
            targets.iter().filter_map(|t| match &t.relay {
                ListenerHandle::Enroll(f) => Some((listener(t), C(load(&f.stats().kept_for_replay)))),
                _ => None,
            }),
        )?;
        family(
            e,
            ENROLL_REFUSED,
            "Enrollment connections closed at accept, by reason (enroll listeners).",
            targets
                .iter()
                .filter_map(|t| match &t.relay {
                    ListenerHandle::Enroll(f) => Some((t, f.stats().clone())),
                    _ => None,
                })
                .flat_map(|(t, stats)| {
                    [
                        ("too_many_connections", load(&stats.refused)),
                        ("source_limit", load(&stats.refused_source)),
                        ("proxy_protocol", load(&stats.refused_proxy_protocol)),
                    ]
                    .into_iter()
                    .map(move |(reason, n)| {
                        let mut l = listener(t);
                        l.push(("reason", reason.to_owned()));
                        (l, C(n))
                    })
                }),
        )?;

        // Per backend.
        let balancers: Vec<_> = targets.iter().map(|t| (t, t.balancer())).collect();
        let backends: Vec<(Labels, &Backend)> = balancers
            .iter()
            .flat_map(|(t, b)| {
                b.backends().iter().map(|be| {
                    let mut l = listener(t);
                    l.push(("backend", be.addr().to_string()));
                    (l, be)
                })
            })
            .collect();
        let counter = |f: fn(&Backend) -> u64| {
            backends
                .iter()
                .map(move |(l, b)| (l.clone(), C(f(b))))
                .collect::<Vec<_>>()
        };
        family(
            e,
            BACKEND_STATE,
            "Backend state: 1 for the current one of available, failed (passive health), down.",
            backends.iter().flat_map(|(l, b)| {
                let state = backend_state(b, now);
                BACKEND_STATES.iter().map(move |s| {
                    let mut l = l.clone();
                    l.push(("state", (*s).to_owned()));
                    (l, G(i64::from(*s == state)))
                })
            }),
        )?;
        family(
            e,
            BACKEND_BACKUP,
            "1 for a backup server (used when no primary is available).",
            backends
                .iter()
                .map(|(l, b)| (l.clone(), G(i64::from(b.config().backup)))),
        )?;
        family(
            e,
            BACKEND_ACTIVE,
            "Connections open to the backend now.",
            backends
                .iter()
                .map(|(l, b)| (l.clone(), gauge_of(b.active()))),
        )?;
        family(
            e,
            BACKEND_OPENED,
            "Connections opened to the backend (attempts included).",
            counter(Backend::opened_total),
        )?;
        family(
            e,
            BACKEND_SUCCESSES,
            "Successful connects to the backend.",
            counter(Backend::successes_total),
        )?;
        family(
            e,
            BACKEND_FAILURES,
            "Failed connects to the backend.",
            counter(Backend::failures_total),
        )?;
        family(
            e,
            BACKEND_MARKED_FAILED,
            "Times passive health marked the backend failed.",
            counter(Backend::unavailable_total),
        )?;

        // UDP only.
        let udp: Vec<_> = targets
            .iter()
            .filter_map(|t| match &t.relay {
                ListenerHandle::Udp(r) => Some((t, r)),
                _ => None,
            })
            .collect();
        family(
            e,
            UDP_FLOWS_ACTIVE,
            "UDP flows (agents) open now.",
            udp.iter().map(|(t, r)| (listener(t), gauge_of(r.flows()))),
        )?;
        family(
            e,
            UDP_FLOWS_REFUSED,
            "Datagrams dropped because the flow table was full.",
            udp.iter()
                .map(|(t, r)| (listener(t), C(load(&r.flow_stats().flows_refused)))),
        )?;
        family(
            e,
            UDP_FLOWS_EXPIRED,
            "UDP flows closed by the idle timeout.",
            udp.iter()
                .map(|(t, r)| (listener(t), C(load(&r.flow_stats().flows_expired)))),
        )?;
        family(
            e,
            UDP_SEND_FAILURES,
            "Datagrams that could not be sent on.",
            udp.iter()
                .map(|(t, r)| (listener(t), C(load(&r.flow_stats().send_failures)))),
        )?;
        Ok(())
    }
}
