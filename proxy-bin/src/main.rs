//! `wazuh-proxy`: a load balancer that understands the Wazuh agent protocol.

mod admin;
mod demo;
mod inspect;
mod server;
mod upgrade;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use wazuh_proxy::{config, nginx};
use wazuh_proxy_core::balance::Policy;

use crate::config::Config;

/// jemalloc instead of the C library's allocator: an idle agent is a handful of small,
/// long-lived allocations (three of them 128-byte aligned, for the runtime's task and socket
/// registrations), which jemalloc packs in size classes without per-chunk headers or
/// alignment slack; with glibc each idle agent cost about 300 bytes more. It also returns
/// memory freed after a reconnect storm to the system.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[derive(Debug, Parser)]
#[command(
    name = "wazuh-proxy",
    version,
    about = "A load balancer that understands the Wazuh agent protocol"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the proxy from a config file, or in the quick form (--listen and --backend).
    Run(RunArgs),
    /// Validate a config file and print the effective configuration.
    CheckConfig {
        /// The TOML config file (or, with --nginx, an nginx.conf).
        file: PathBuf,
        /// Read the file as an nginx configuration (its stream {} block).
        #[arg(long)]
        nginx: bool,
    },
    /// Upgrade a running proxy to the binary now installed, without refusing a connection or
    /// disconnecting an agent (sends it SIGUSR2).
    Upgrade {
        /// The running proxy's process ID.
        #[arg(long)]
        pid: u32,
    },
    /// Re-read a running proxy's configuration (sends it SIGHUP).
    Reload {
        /// The running proxy's process ID.
        #[arg(long)]
        pid: u32,
    },
    /// Start two stand-in managers, the proxy and a few agents on loopback, and show where each agent goes.
    Demo {
        /// Number of simulated agents.
        #[arg(long, default_value_t = 8)]
        agents: usize,
    },
    /// Decrypt captured 1514 traffic with client.keys and print one JSON object per message.
    Inspect(inspect::InspectArgs),
    /// Ask a running proxy whether it is healthy (exit 0) or not (exit 1): for keepalived.
    Health(admin::client::HealthArgs),
    /// List the live agent sessions of a running proxy.
    Sessions(admin::client::SessionsArgs),
    /// List the backends of a running proxy and their state.
    Backends(admin::client::BackendsArgs),
    /// Move agents back to their preferred managers, without disconnecting them.
    Rebalance(admin::client::RebalanceArgs),
    /// Move every agent off a manager before its maintenance, without disconnecting them.
    Drain(admin::client::DrainArgs),
}

#[derive(Debug, clap::Args)]
struct RunArgs {
    /// TOML config file.
    #[arg(long, short, conflicts_with_all = ["listen", "backend"])]
    config: Option<PathBuf>,
    /// nginx configuration to read the listeners from (its stream {} block, with includes).
    #[arg(long, value_name = "FILE", conflicts_with_all = ["config", "listen", "backend"])]
    nginx_config: Option<PathBuf>,
    /// Unix socket where this process offers its sockets to a new process on upgrade.
    #[arg(
        long,
        value_name = "PATH",
        default_value = "/run/wazuh-proxy/upgrade.sock"
    )]
    upgrade_socket: PathBuf,
    /// Take over the sockets and agents of a running proxy (set by the upgrade itself).
    #[arg(long, value_name = "PATH", hide = true)]
    takeover: Option<PathBuf>,
    /// Quick form: address to accept agents on (1514/TCP).
    #[arg(long, requires = "backend")]
    listen: Option<String>,
    /// Quick form: a manager address (repeat for each manager).
    #[arg(long)]
    backend: Vec<String>,
    /// Quick form: how agents are spread.
    #[arg(long, default_value = "agent-id", value_parser = parse_policy)]
    balance: Policy,
    /// Admin HTTP API address, or "none" (default: the config's `admin`, else 127.0.0.1:9514).
    #[arg(long, value_name = "ADDR|none")]
    admin: Option<String>,
    /// File holding the bearer token every admin API request must carry.
    #[arg(long, value_name = "PATH")]
    admin_token_file: Option<PathBuf>,
    /// Pause under heavy load before sleeping, e.g. 200us; 0s turns batching off (default:
    /// the config's `batch_window`, else 200us).
    #[arg(long, value_name = "DURATION", value_parser = parse_window)]
    batch_window: Option<std::time::Duration>,
}

fn parse_window(s: &str) -> Result<std::time::Duration, String> {
    let d = humantime::parse_duration(s).map_err(|e| e.to_string())?;
    config::check_batch_window(d)
}

fn parse_policy(s: &str) -> Result<Policy, String> {
    s.parse::<Policy>().map_err(|e| e.to_string())
}

fn init_logs() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}

fn runtime() -> Result<tokio::runtime::Runtime, std::io::Error> {
    tokio::runtime::Builder::new_multi_thread()
        .on_thread_park(wazuh_proxy_core::pace::before_park)
        .enable_all()
        .build()
}

fn fail(message: impl std::fmt::Display) -> ExitCode {
    eprintln!("wazuh-proxy: {message}");
    ExitCode::FAILURE
}

/// Sends a signal to a running proxy (the `kill` utility: no libc binding needed for one call).
fn signal(pid: u32, sig: &str) -> ExitCode {
    match std::process::Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .status()
    {
        Ok(s) if s.success() => ExitCode::SUCCESS,
        Ok(s) => fail(format!("kill -{sig} {pid} failed ({s})")),
        Err(e) => fail(format!("cannot run kill: {e}")),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Run(args) => {
            init_logs();
            let admin_listen = match args.admin.as_deref().map(config::parse_admin).transpose() {
                Ok(a) => a,
                Err(e) => return fail(format!("--{e}")),
            };
            let token = args.admin_token_file.clone();
            let window = args.batch_window;
            // The command-line flags override the file, on every (re)load.
            let apply = move |mut c: Config| {
                if let Some(w) = window {
                    c.batch_window = w;
                }
                if let Some(listen) = admin_listen {
                    c.admin.listen = listen;
                }
                if let Some(t) = &token {
                    c.admin.token_file = Some(t.clone());
                }
                c
            };
            let reload: Option<Box<dyn Fn() -> Result<Config, config::ConfigError> + Send>> =
                match (&args.nginx_config, &args.config) {
                    (Some(file), _) => {
                        let (file, apply) = (file.clone(), apply.clone());
                        Some(Box::new(move || nginx::load(&file).map(&apply)))
                    }
                    (None, Some(file)) => {
                        let (file, apply) = (file.clone(), apply.clone());
                        Some(Box::new(move || Config::load(&file).map(&apply)))
                    }
                    _ => None,
                };
            let config = match (&reload, &args.listen) {
                (Some(load), _) => load(),
                (None, Some(listen)) => Config::quick(listen, &args.backend, args.balance).map(&apply),
                (None, None) => {
                    return fail("run needs --config FILE, --nginx-config FILE, or --listen ADDR with --backend ADDR")
                }
            };
            let config = match config {
                Ok(c) => c,
                Err(e) => return fail(e),
            };
            let options = server::RunOptions {
                reload,
                takeover: args.takeover.clone(),
                upgrade_socket: args.upgrade_socket.clone(),
            };
            let rt = match runtime() {
                Ok(rt) => rt,
                Err(e) => return fail(format!("cannot start the runtime: {e}")),
            };
            match rt.block_on(server::run(config, options)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => fail(e),
            }
        }
        Command::CheckConfig { file, nginx } => match if nginx {
            nginx::load(&file)
        } else {
            Config::load(&file)
        } {
            Ok(c) => {
                print!("{}", c.to_toml());
                ExitCode::SUCCESS
            }
            Err(e) => fail(e),
        },
        Command::Demo { agents } => {
            if std::env::var_os("RUST_LOG").is_some() {
                init_logs();
            }
            let rt = match runtime() {
                Ok(rt) => rt,
                Err(e) => return fail(format!("cannot start the runtime: {e}")),
            };
            match rt.block_on(demo::run(agents.clamp(1, 999))) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => fail(e),
            }
        }
        Command::Inspect(args) => match inspect::run(&args) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => fail(e),
        },
        Command::Upgrade { pid } => signal(pid, "USR2"),
        Command::Reload { pid } => signal(pid, "HUP"),
        Command::Health(args) => admin::client::health(&args),
        Command::Sessions(args) => admin::client::sessions(&args),
        Command::Backends(args) => admin::client::backends(&args),
        Command::Rebalance(args) => admin::client::rebalance(&args),
        Command::Drain(args) => admin::client::drain(&args),
    }
}
