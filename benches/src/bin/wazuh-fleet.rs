//! `wazuh-fleet`: simulated Wazuh agents and a stand-in manager for load tests.
//!
//! ```text
//! wazuh-fleet manager --listen 127.0.0.1:1601 --keys keys.txt [--echo] [--sample N] [--duration S]
//!                     [--refuse-agent ID]...
//! wazuh-fleet agents  --target 127.0.0.1:1514 --agents 100 --event-size 256 --flat-out --duration 10
//! wazuh-fleet latency --target 127.0.0.1:1514 --agents 100 --rate 10 --duration 10
//! wazuh-fleet connect-storm --target 127.0.0.1:1514 --agents 10000
//! wazuh-fleet idle --target 127.0.0.1:1514 --agents 10000 --duration 40 --rss-pid PID --rss-late 30
//! wazuh-fleet churn --target 127.0.0.1:1514 --agents 2000 --workers 32 --duration 8
//! wazuh-fleet keygen --agents 10000 --out keys.txt
//! ```
//!
//! Every mode ends by itself and prints a `summary ...` (or `manager-summary ...`) line of
//! `key=value` pairs; the exit status is non-zero on failures that were not expected.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use wazuh_proxy_benches::agent::Load;
use wazuh_proxy_benches::fleet::{self, FleetOptions, Outcome};
use wazuh_proxy_benches::manager::{self, ManagerConfig, ManagerState};
use wazuh_proxy_benches::{fleetkeys, FleetError};
use wazuh_proxy_core::envelope::Cipher;

#[derive(Debug, Parser)]
#[command(
    name = "wazuh-fleet",
    about = "Simulated Wazuh agents and a stand-in manager"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Agents sending events at a rate or flat out; prints sent, connects, events/s, MB/s.
    Agents {
        #[command(flatten)]
        common: Common,
        /// Events per second per agent (0: keepalives only).
        #[arg(long, default_value_t = 1.0, conflicts_with = "flat_out")]
        rate: f64,
        /// Send as fast as the sockets take it.
        #[arg(long)]
        flat_out: bool,
        /// Flat out: pre-sealed events replayed per agent (0: seal each event; default: sized
        /// to keep all pools under 64 MiB, 4 to 256).
        #[arg(long)]
        pool: Option<usize>,
        /// Expect the manager's echo and report round trips.
        #[arg(long)]
        echo: bool,
        /// Do not fail on lost connections (they are still counted and logged).
        #[arg(long)]
        expect_reconnects: bool,
    },
    /// Event -> echo round trips at a moderate rate (the manager must run with --echo).
    Latency {
        #[command(flatten)]
        common: Common,
        /// Events per second per agent.
        #[arg(long, default_value_t = 10.0)]
        rate: f64,
        /// Seconds from the start whose events are reported apart (`warmup_rtt_*`): while
        /// agents still connect, round trips measure the connection ramp, not the relay.
        #[arg(long, default_value_t = 0.0)]
        warmup: f64,
        /// Print every round trip over this many microseconds to stderr, with the time its
        /// event was sent (`slow sent_at_ms=... rtt_us=...`), to tie a tail to a moment.
        #[arg(long)]
        slow_log_us: Option<u64>,
    },
    /// Open every agent's connection at once; report when the last startup was acknowledged.
    ConnectStorm {
        #[command(flatten)]
        common: Common,
    },
    /// Agents that only handshake and send keepalives; optionally measure a process's memory.
    Idle {
        #[command(flatten)]
        common: Common,
        /// Read VmRSS of this process (the proxy) before and 2 s after connecting.
        #[arg(long)]
        rss_pid: Option<u32>,
        /// With --rss-pid: read it once more this many seconds after connecting (if the run
        /// lasts that long).
        #[arg(long, requires = "rss_pid")]
        rss_late: Option<f64>,
    },
    /// Connection churn: workers that connect as an agent, send the startup, wait for the ACK
    /// and close, over and over; prints new connections per second.
    Churn {
        #[command(flatten)]
        common: Common,
        /// Connections in flight at once (each worker loops over its share of the agents).
        #[arg(long, default_value_t = 32)]
        workers: usize,
    },
    /// A stand-in manager: decrypts, checks, ACKs, counts loss, duplication and reordering.
    Manager {
        /// Address to listen on.
        #[arg(long)]
        listen: SocketAddr,
        /// The agents' client.keys.
        #[arg(long)]
        keys: PathBuf,
        /// Answer each event with a small sealed frame (for round trips).
        #[arg(long)]
        echo: bool,
        /// Decrypt one frame in N (1: all; sequence checks need 1).
        #[arg(long, default_value_t = 1)]
        sample: u64,
        /// Stop after this many seconds (default: on SIGINT/SIGTERM only).
        #[arg(long)]
        duration: Option<f64>,
        /// Do not fail when events were lost or duplicated.
        #[arg(long)]
        expect_loss: bool,
        /// Name printed in the summary line.
        #[arg(long, default_value = "manager")]
        name: String,
        /// Refuse this agent ID as remoted refuses a removed one: close its connection,
        /// unanswered, at its first frame (repeatable).
        #[arg(long = "refuse-agent", value_name = "ID")]
        refuse: Vec<String>,
    },
    /// Write a client.keys with N agents (IDs 001..).
    Keygen {
        /// Number of agents.
        #[arg(long)]
        agents: usize,
        /// Output file (overwritten).
        #[arg(long)]
        out: PathBuf,
    },
}

#[derive(Debug, Args)]
struct Common {
    /// The proxy (or manager) address.
    #[arg(long)]
    target: SocketAddr,
    /// Number of agents.
    #[arg(long, default_value_t = 10)]
    agents: usize,
    /// Cipher.
    #[arg(long, default_value = "aes", value_parser = ["aes", "blowfish"])]
    cipher: String,
    /// Event text length in bytes.
    #[arg(long, default_value_t = 256)]
    event_size: usize,
    /// How long to send, in seconds.
    #[arg(long, default_value_t = 10.0)]
    duration: f64,
    /// client.keys shared with the manager (generated if absent).
    #[arg(long, default_value = "fleet-client.keys")]
    keys: PathBuf,
    /// Keepalive period in seconds.
    #[arg(long, default_value_t = 20.0)]
    notify_time: f64,
    /// Seconds between handshake attempts.
    #[arg(long, default_value_t = 10.0)]
    reconnect_interval: f64,
    /// Handshake attempts per round of the server loop.
    #[arg(long, default_value_t = 5)]
    max_retries: u32,
    /// Seconds to wait for the startup ACK.
    #[arg(long, default_value_t = 60.0)]
    recv_timeout: f64,
    /// Spread agents over this many loopback source addresses (127.1.0.1...; 0: default).
    #[arg(long, default_value_t = 0)]
    source_ips: u32,
    /// Handshakes in flight at once (0: all at once).
    #[arg(long, default_value_t = 512)]
    ramp: usize,
    /// Seconds to wait, after the shutdown message, for the other side to close.
    #[arg(long, default_value_t = 10.0)]
    drain: f64,
    /// Connection log lines to print at most.
    #[arg(long, default_value_t = 20)]
    log_lines: u64,
}

fn secs(s: f64) -> Duration {
    Duration::try_from_secs_f64(s.max(0.0)).unwrap_or(Duration::from_secs(3600))
}

impl Common {
    fn options(&self, load: Load, echo: bool) -> FleetOptions {
        let base = u32::from(Ipv4Addr::new(127, 1, 0, 1));
        FleetOptions {
            target: self.target,
            agents: self.agents,
            cipher: if self.cipher == "blowfish" {
                Cipher::Blowfish
            } else {
                Cipher::Aes
            },
            event_size: self.event_size,
            load,
            duration: secs(self.duration),
            keys: self.keys.clone(),
            notify_time: secs(self.notify_time.max(0.1)),
            retry_interval: secs(self.reconnect_interval),
            max_retries: self.max_retries,
            recv_timeout: secs(self.recv_timeout),
            echo,
            sources: (0..self.source_ips)
                .map(|i| IpAddr::V4(Ipv4Addr::from(base + i)))
                .collect(),
            ramp: self.ramp,
            drain: secs(self.drain),
            log_lines: self.log_lines,
            warmup: Duration::ZERO,
            slow_log_us: None,
        }
    }
}

fn runtime() -> Result<tokio::runtime::Runtime, FleetError> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| FleetError::io("starting the runtime", e))
}

fn finish(result: Result<Outcome, FleetError>) -> ExitCode {
    match result {
        Ok(o) => {
            println!("{}", o.report);
            if o.ok {
                ExitCode::SUCCESS
            } else {
                eprintln!("wazuh-fleet: the run had unexpected failures (see the summary)");
                ExitCode::FAILURE
            }
        }
        Err(e) => {
            eprintln!("wazuh-fleet: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run_manager(
    listen: SocketAddr,
    keys: PathBuf,
    cfg: (bool, u64, Option<f64>, bool, String),
    refuse: Vec<String>,
) -> Result<Outcome, FleetError> {
    let (echo, sample, duration, expect_loss, name) = cfg;
    let keys = std::sync::Arc::new(fleetkeys::read(&keys)?);
    // A large backlog, like the proxy's: a connect storm must not be limited by the manager.
    let listen_err = |e| FleetError::io(format!("listening on {listen}"), e);
    let socket = match listen {
        SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4(),
        SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6(),
    }
    .map_err(listen_err)?;
    socket.set_reuseaddr(true).map_err(listen_err)?;
    socket.bind(listen).map_err(listen_err)?;
    let listener = socket.listen(65535).map_err(listen_err)?;
    eprintln!(
        "manager {name}: listening on {listen} with {} keys{}",
        keys.len(),
        if refuse.is_empty() {
            String::new()
        } else {
            format!(", refusing agent(s) {}", refuse.join(" "))
        }
    );
    let state = ManagerState::new(ManagerConfig {
        keys,
        echo,
        sample,
        refuse: refuse.into_iter().collect(),
    });
    let server = tokio::spawn(manager::serve(listener, std::sync::Arc::clone(&state)));
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(|e| FleetError::io("installing the SIGTERM handler", e))?;
    let limit = async {
        match duration {
            Some(d) => tokio::time::sleep(secs(d)).await,
            None => std::future::pending().await,
        }
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
        _ = limit => {}
    }
    server.abort();
    // Let connections whose senders are gone finish reading what is still buffered.
    let until = tokio::time::Instant::now() + Duration::from_secs(5);
    while state.open.load(std::sync::atomic::Ordering::Relaxed) > 0
        && tokio::time::Instant::now() < until
    {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (report, ok) = state.report(&name, expect_loss);
    Ok(Outcome {
        report: report.trim_end().to_owned(),
        ok,
    })
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let rt = match runtime() {
        Ok(rt) => rt,
        Err(e) => return finish(Err(e)),
    };
    let result = rt.block_on(async {
        match cli.command {
            Command::Agents {
                common,
                rate,
                flat_out,
                pool,
                echo,
                expect_reconnects,
            } => {
                let load = if flat_out {
                    Load::FlatOut {
                        pool: pool.unwrap_or(usize::MAX),
                    }
                } else if rate > 0.0 {
                    Load::Rate(rate)
                } else {
                    Load::Idle
                };
                fleet::run_agents(
                    &common.options(load, echo),
                    "agents",
                    None,
                    expect_reconnects,
                )
                .await
            }
            Command::Latency {
                common,
                rate,
                warmup,
                slow_log_us,
            } => {
                let mut o = common.options(Load::Rate(rate), true);
                o.warmup = secs(warmup);
                o.slow_log_us = slow_log_us;
                fleet::run_agents(&o, "latency", None, false).await
            }
            Command::ConnectStorm { common } => {
                fleet::connect_storm(&common.options(Load::Idle, false)).await
            }
            Command::Idle {
                common,
                rss_pid,
                rss_late,
            } => {
                let probe = rss_pid.map(|pid| fleet::RssProbe {
                    pid,
                    late: rss_late.map(secs),
                });
                fleet::run_agents(&common.options(Load::Idle, false), "idle", probe, false).await
            }
            Command::Churn { common, workers } => {
                fleet::churn(&common.options(Load::Idle, false), workers).await
            }
            Command::Manager {
                listen,
                keys,
                echo,
                sample,
                duration,
                expect_loss,
                name,
                refuse,
            } => {
                run_manager(
                    listen,
                    keys,
                    (echo, sample, duration, expect_loss, name),
                    refuse,
                )
                .await
            }
            Command::Keygen { agents, out } => fleetkeys::write(&out, agents).map(|()| Outcome {
                report: format!("wrote {agents} keys to {}", out.display()),
                ok: true,
            }),
        }
    });
    let code = finish(result);
    // Detached agent tasks may still hold sockets: do not wait for them.
    rt.shutdown_timeout(Duration::from_millis(100));
    code
}
