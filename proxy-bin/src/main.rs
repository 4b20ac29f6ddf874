//! `wazuh-proxy`: a load balancer that understands the Wazuh agent protocol.

mod admin;
mod config;
mod demo;
mod inspect;
mod nginx;
mod server;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use wazuh_proxy_core::balance::Policy;

use crate::config::Config;

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
        /// The TOML config file.
        file: PathBuf,
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
}

#[derive(Debug, clap::Args)]
struct RunArgs {
    /// TOML config file.
    #[arg(long, short, conflicts_with_all = ["listen", "backend"])]
    config: Option<PathBuf>,
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
        .init();
}

fn runtime() -> Result<tokio::runtime::Runtime, std::io::Error> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
}

fn fail(message: impl std::fmt::Display) -> ExitCode {
    eprintln!("wazuh-proxy: {message}");
    ExitCode::FAILURE
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Run(args) => {
            init_logs();
            let config = match (&args.config, &args.listen) {
                (Some(file), _) => Config::load(file),
                (None, Some(listen)) => Config::quick(listen, &args.backend, args.balance),
                (None, None) => {
                    return fail("run needs --config FILE, or --listen ADDR with --backend ADDR")
                }
            };
            let mut config = match config {
                Ok(c) => c,
                Err(e) => return fail(e),
            };
            if let Some(admin) = &args.admin {
                match config::parse_admin(admin) {
                    Ok(listen) => config.admin.listen = listen,
                    Err(e) => return fail(format!("--{e}")),
                }
            }
            if let Some(token) = args.admin_token_file {
                config.admin.token_file = Some(token);
            }
            let rt = match runtime() {
                Ok(rt) => rt,
                Err(e) => return fail(format!("cannot start the runtime: {e}")),
            };
            match rt.block_on(server::run(config)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => fail(e),
            }
        }
        Command::CheckConfig { file } => match Config::load(&file) {
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
        Command::Health(args) => admin::client::health(&args),
        Command::Sessions(args) => admin::client::sessions(&args),
        Command::Backends(args) => admin::client::backends(&args),
    }
}
