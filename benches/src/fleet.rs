//! The load modes: many agents at once, against a proxy or a manager.
//!
//! - [`run_agents`]: throughput (rate or flat out), latency (with the manager's echo) and idle
//!   (keepalives only, with the resident memory of a watched process before and after).
//! - [`connect_storm`]: N agents handshaking at the same instant.
//! - [`churn`]: workers that each connect as an agent, send the startup, wait for its ACK and
//!   close, over and over (new connections per second).

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Semaphore;
use tokio::time::Instant;
use wazuh_proxy_core::envelope::Cipher;

use crate::agent::{Agent, AgentConfig, Load};
use crate::fleetkeys;
use crate::stats::{FleetStats, RttTiming};
use crate::FleetError;

/// Pre-sealed pools are sized to stay under this many bytes for the whole fleet.
const POOL_BUDGET: usize = 64 << 20;

/// Options shared by every mode.
#[derive(Debug, Clone)]
pub struct FleetOptions {
    /// Proxy or manager address.
    pub target: SocketAddr,
    /// Number of agents.
    pub agents: usize,
    /// Cipher of every agent.
    pub cipher: Cipher,
    /// Event text length.
    pub event_size: usize,
    /// How events are sent ([`Load::FlatOut`] with `pool == usize::MAX`: sized automatically).
    pub load: Load,
    /// How long to send.
    pub duration: Duration,
    /// The shared keys file (written if absent).
    pub keys: PathBuf,
    /// Keepalive period.
    pub notify_time: Duration,
    /// Sleep between handshake attempts.
    pub retry_interval: Duration,
    /// Attempts per round.
    pub max_retries: u32,
    /// Wait for the startup ACK.
    pub recv_timeout: Duration,
    /// Record echo round trips.
    pub echo: bool,
    /// Loopback source addresses to spread agents over.
    pub sources: Vec<IpAddr>,
    /// Handshakes in flight at once (0: all at once).
    pub ramp: usize,
    /// Wait for the other side to close after the shutdown message.
    pub drain: Duration,
    /// Connection log lines to print at most.
    pub log_lines: u64,
    /// Round trips of events sent this long after the start count apart (see [`RttTiming`]).
    pub warmup: Duration,
    /// Print round trips over this many microseconds (see [`RttTiming`]).
    pub slow_log_us: Option<u64>,
}

/// The result of a run: the summary line and whether it went as expected.
#[derive(Debug)]
pub struct Outcome {
    /// Extra report lines, then the `key=value` summary line.
    pub report: String,
    /// False on failures that were not expected.
    pub ok: bool,
}

fn config(o: &FleetOptions, load: Load) -> AgentConfig {
    AgentConfig {
        target: o.target,
        cipher: o.cipher,
        event_size: o.event_size,
        load,
        deadline: Instant::now() + o.duration,
        drain: o.drain,
        notify_time: o.notify_time,
        retry_interval: o.retry_interval,
        max_retries: o.max_retries,
        recv_timeout: o.recv_timeout,
        connect_timeout: Duration::from_secs(10),
        echo: o.echo,
        sources: o.sources.clone(),
        log_budget: AtomicU64::new(o.log_lines),
    }
}

fn build(o: &FleetOptions, load: Load) -> Result<Vec<Agent>, FleetError> {
    let keys = fleetkeys::load_or_create(&o.keys, o.agents)?;
    keys.into_iter()
        .enumerate()
        .map(|(i, k)| Agent::new(i, k, o.cipher, load, o.event_size, &o.sources))
        .collect()
}

fn resolve_load(o: &FleetOptions) -> Load {
    match o.load {
        Load::FlatOut { pool } if pool == usize::MAX => {
            let per = POOL_BUDGET / (o.agents.max(1) * (o.event_size + 128));
            Load::FlatOut {
                pool: per.clamp(4, 256),
            }
        }
        l => l,
    }
}

/// Whose resident memory an idle run watches, and when.
#[derive(Debug, Clone, Copy)]
pub struct RssProbe {
    /// The process (the proxy).
    pub pid: u32,
    /// A second reading this long after every agent connected (besides the one at 2 s), if
    /// the run lasts that long: memory right after a reconnect storm and once it settled.
    pub late: Option<Duration>,
}

/// Resident memory of process `pid` in kB (`VmRSS` of `/proc/PID/status`).
///
/// # Errors
/// [`FleetError::Io`] when the file cannot be read, [`FleetError::Protocol`] without `VmRSS`.
pub fn rss_kb(pid: u32) -> Result<u64, FleetError> {
    let path = format!("/proc/{pid}/status");
    let text = std::fs::read_to_string(&path).map_err(|e| FleetError::io(path.clone(), e))?;
    text.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .ok_or_else(|| FleetError::Protocol(format!("{path}: no VmRSS line")))
}

/// Runs `o.agents` agents until the duration ends and they have drained.
///
/// With `rss`, reads that process's resident memory before the first connection and once
/// every agent is connected (plus two seconds to settle), and reports the difference per agent;
/// with `rss.late`, once more that long after the agents connected.
///
/// # Errors
/// Keys that cannot be read or written, or events that cannot be sealed.
pub async fn run_agents(
    o: &FleetOptions,
    mode: &str,
    rss: Option<RssProbe>,
    expect_reconnects: bool,
) -> Result<Outcome, FleetError> {
    let rss_pid = rss.map(|r| r.pid);
    let load = resolve_load(o);
    let agents = build(o, load)?;
    if let Load::FlatOut { pool } = load {
        eprintln!(
            "wazuh-fleet: {} agents, {pool} pre-sealed events each",
            agents.len()
        );
    }
    let rss_before = rss_pid.map(rss_kb).transpose()?;
    let now = Instant::now();
    let stats = Arc::new(FleetStats::with_timing(RttTiming {
        started: now,
        warm_until: now + o.warmup,
        slow_log_us: o.slow_log_us,
    }));
    let cfg = Arc::new(config(o, load));
    let gate = (o.ramp > 0).then(|| Arc::new(Semaphore::new(o.ramp)));
    let start = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for a in agents {
        tasks.spawn(a.run(Arc::clone(&cfg), Arc::clone(&stats), gate.clone()));
    }
    let mut extra = String::new();
    if let (Some(pid), Some(before)) = (rss_pid, rss_before) {
        let n = o.agents as u64;
        while stats.connects.load(Relaxed) < n && Instant::now() < cfg.deadline {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let connected = stats.connects.load(Relaxed);
        let connected_at = Instant::now();
        let ramp = start.elapsed();
        tokio::time::sleep(Duration::from_secs(2)).await;
        let after = rss_kb(pid)?;
        let per_agent =
            |kb: u64| (kb.saturating_sub(before) * 1024) as f64 / connected.max(1) as f64;
        extra = format!(
            " rss_pid={pid} rss_before_kb={before} rss_after_kb={after} connected={connected} \
             ramp_s={:.2} rss_per_agent_bytes={:.0}",
            ramp.as_secs_f64(),
            per_agent(after)
        );
        // Only while every agent is still connected (before the end of the run).
        if let Some(late) = rss.and_then(|r| r.late) {
            let at = connected_at + late;
            if at + Duration::from_millis(500) < cfg.deadline {
                tokio::time::sleep_until(at).await;
                let later = rss_kb(pid)?;
                extra.push_str(&format!(
                    " rss_late_s={:.0} rss_late_kb={later} rss_late_per_agent_bytes={:.0}",
                    late.as_secs_f64(),
                    per_agent(later)
                ));
            }
        }
    }
    let mut per_agent = Vec::with_capacity(o.agents);
    while let Some(r) = tasks.join_next().await {
        if let Ok(n) = r {
            per_agent.push(n);
        }
    }
    let elapsed = start.elapsed();
    let mut report = stats.summary(mode, o.agents, elapsed);
    per_agent.sort_unstable();
    if let (Some(min), Some(max)) = (per_agent.first(), per_agent.last()) {
        // Fairness: how evenly the path served agents that all sent as fast as they could.
        report.push_str(&format!(
            " send_s={:.3} agent_events_min={min} agent_events_median={} agent_events_max={max}",
            o.duration.as_secs_f64(),
            per_agent[per_agent.len() / 2]
        ));
    }
    report.push_str(&extra);
    let failed = stats.errors.load(Relaxed) > 0
        || (!expect_reconnects && stats.lost_connections.load(Relaxed) > 0)
        || (o.echo && stats.echoes.load(Relaxed) == 0);
    Ok(Outcome {
        report,
        ok: !failed,
    })
}

/// Opens `o.agents` connections at the same instant, each sending its (pre-sealed) startup
/// and waiting for the ACK; reports when the last one was acknowledged and the rate.
///
/// Connections stay open until every agent is done (or the duration ends), then close.
///
/// # Errors
/// Keys that cannot be read or written.
pub async fn connect_storm(o: &FleetOptions) -> Result<Outcome, FleetError> {
    let mut agents = build(o, Load::Idle)?;
    for a in &mut agents {
        a.prepare_startup()?;
    }
    let stats = Arc::new(FleetStats::new());
    let cfg = Arc::new(config(o, Load::Idle));
    let done = Arc::new(tokio::sync::Notify::new());
    let remaining = Arc::new(AtomicU64::new(o.agents as u64));
    let start = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for mut a in agents {
        let (cfg, stats, done, remaining) = (
            Arc::clone(&cfg),
            Arc::clone(&stats),
            Arc::clone(&done),
            Arc::clone(&remaining),
        );
        tasks.spawn(async move {
            let stream = a.connect(&cfg, &stats, None).await;
            let took = start.elapsed();
            match &stream {
                Some(_) => {
                    stats.connects.fetch_add(1, Relaxed);
                    stats.record_rtt(start);
                }
                None => {
                    stats.errors.fetch_add(1, Relaxed);
                }
            }
            let notified = done.notified();
            if remaining.fetch_sub(1, Relaxed) == 1 {
                done.notify_waiters();
            } else {
                let _ = tokio::time::timeout_at(cfg.deadline, notified).await;
            }
            drop(stream);
            took
        });
    }
    let mut last = Duration::ZERO;
    while let Some(r) = tasks.join_next().await {
        if let Ok(t) = r {
            last = last.max(t);
        }
    }
    let n = stats.connects.load(Relaxed);
    let errors = stats.errors.load(Relaxed);
    let (_, p50, p99, _) = stats.latency();
    let secs = last.as_secs_f64().max(1e-9);
    let report = format!(
        "summary mode=connect-storm agents={} acked={n} errors={errors} failed_attempts={} \
         all_acked_ms={:.1} connect_p50_ms={:.1} connect_p99_ms={:.1} conns_per_s={:.0}",
        o.agents,
        stats.failed_attempts.load(Relaxed),
        secs * 1e3,
        p50 as f64 / 1e3,
        p99 as f64 / 1e3,
        n as f64 / secs,
    );
    Ok(Outcome {
        report,
        ok: errors == 0,
    })
}

/// Connection churn: `workers` loops run until the duration ends, each taking its agents in
/// turn (agent `i` belongs to worker `i % workers`), connecting as the agent, sending its
/// (pre-sealed) startup, waiting for the ACK and closing. Reports new connections per second
/// and the connect-to-ACK time. A failed attempt is counted and followed by a 10 ms pause, so
/// that a target that refuses everything is not hammered.
///
/// Each agent comes back only after the others of its worker: with a few agents per worker the
/// proxy has seen the previous connection close before the next one arrives.
///
/// # Errors
/// Keys that cannot be read or written.
pub async fn churn(o: &FleetOptions, workers: usize) -> Result<Outcome, FleetError> {
    let workers = workers.clamp(1, o.agents.max(1));
    let mut agents = build(o, Load::Idle)?;
    for a in &mut agents {
        a.prepare_startup()?;
    }
    let mut groups: Vec<Vec<Agent>> = (0..workers).map(|_| Vec::new()).collect();
    for (i, a) in agents.into_iter().enumerate() {
        groups[i % workers].push(a);
    }
    let stats = Arc::new(FleetStats::new());
    let cfg = Arc::new(config(o, Load::Idle));
    let start = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for mut group in groups {
        let (cfg, stats) = (Arc::clone(&cfg), Arc::clone(&stats));
        tasks.spawn(async move {
            let mut next = 0;
            while Instant::now() < cfg.deadline && !group.is_empty() {
                let len = group.len();
                let a = &mut group[next];
                next = (next + 1) % len;
                let t0 = Instant::now();
                match tokio::time::timeout_at(cfg.deadline + cfg.drain, a.handshake(&cfg)).await {
                    Ok(Ok(stream)) => {
                        stats.record_rtt(t0);
                        stats.connects.fetch_add(1, Relaxed);
                        drop(stream);
                    }
                    Ok(Err(_)) | Err(_) => {
                        stats.failed_attempts.fetch_add(1, Relaxed);
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                }
            }
        });
    }
    while tasks.join_next().await.is_some() {}
    let secs = start.elapsed().as_secs_f64().max(1e-9);
    let n = stats.connects.load(Relaxed);
    let failed = stats.failed_attempts.load(Relaxed);
    let (_, p50, p99, _) = stats.latency();
    let report = format!(
        "summary mode=churn agents={} workers={workers} conns={n} failed_attempts={failed} \
         elapsed_s={secs:.3} conns_per_s={:.0} handshake_p50_us={p50} handshake_p99_us={p99}",
        o.agents,
        n as f64 / secs,
    );
    Ok(Outcome {
        report,
        // A few failures (a port still in TIME_WAIT) are tolerated; mostly failing is not.
        ok: n > 0 && failed * 100 <= n,
    })
}
