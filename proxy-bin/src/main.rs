//! `wazuh-proxy`: a load balancer that understands the Wazuh agent protocol.

mod admin;
mod demo;
mod inspect;
mod pidfile;
mod resolve;
mod server;
mod settings;
mod upgrade;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{CommandFactory, Parser, Subcommand};
use wazuh_proxy::logging::{self, LogFormat};
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

/// Exit statuses, for scripts and service managers (docs/operations.md).
mod exit {
    /// Success.
    pub(crate) const OK: u8 = 0;
    /// A runtime failure: a listener that cannot bind, a proxy that cannot be reached, ...
    pub(crate) const RUNTIME: u8 = 1;
    /// Bad command-line usage (clap exits with the same status for its own errors).
    pub(crate) const USAGE: u8 = 2;
    /// The configuration is invalid (nothing was started).
    pub(crate) const CONFIG: u8 = 3;
}

#[derive(Debug, Parser)]
#[command(
    name = "wazuh-proxy",
    version,
    about = "A load balancer that understands the Wazuh agent protocol",
    after_help = "Exit status: 0 ok, 1 runtime failure, 2 usage error, 3 invalid configuration."
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
    /// disconnecting an agent (SIGUSR2, or POST /upgrade on the admin API).
    Upgrade(ControlArgs),
    /// Re-read a running proxy's configuration (SIGHUP, or POST /reload on the admin API).
    Reload(ControlArgs),
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell) to standard output.
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
    /// Print the manual page (roff) to standard output (`wazuh-proxy man > wazuh-proxy.1`), or
    /// write it and one page per subcommand (wazuh-proxy-run.1, ...) into a directory.
    Man {
        /// Write every page into this directory instead.
        #[arg(long, value_name = "DIR")]
        out_dir: Option<PathBuf>,
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

/// Which running proxy `reload` and `upgrade` address: exactly one of these.
#[derive(Debug, clap::Args)]
#[group(required = true, multiple = false, id = "target")]
struct ControlArgs {
    /// The running proxy's process ID (it is sent the signal).
    #[arg(long, group = "target")]
    pid: Option<u32>,
    /// A file holding the running proxy's process ID (`run --pid-file`).
    #[arg(long, value_name = "PATH", group = "target")]
    pid_file: Option<PathBuf>,
    /// The running proxy's admin API (host:port): asks it over HTTP instead of a signal.
    #[arg(long, value_name = "ADDR", group = "target")]
    admin: Option<String>,
    /// With --admin: file holding the bearer token.
    #[arg(long, value_name = "PATH", requires = "admin")]
    admin_token_file: Option<PathBuf>,
}

#[derive(Debug, clap::Args)]
struct RunArgs {
    /// Log format: text (default: the config's `log_format`, else text) or json (one object
    /// per line).
    #[arg(long, value_name = "FORMAT")]
    log_format: Option<LogFormat>,
    /// Write this process's ID to PATH once the listeners are bound (removed at exit).
    #[arg(long, value_name = "PATH")]
    pid_file: Option<PathBuf>,
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

fn runtime() -> Result<tokio::runtime::Runtime, std::io::Error> {
    tokio::runtime::Builder::new_multi_thread()
        .on_thread_park(wazuh_proxy_core::pace::before_park)
        // How long a worker sleeps tells pace whether it is saturated (batching only then).
        .on_thread_unpark(wazuh_proxy_core::pace::after_unpark)
        .enable_all()
        .build()
}

fn fail(message: impl std::fmt::Display) -> ExitCode {
    fail_with(exit::RUNTIME, message)
}

fn fail_with(code: u8, message: impl std::fmt::Display) -> ExitCode {
    eprintln!("wazuh-proxy: {message}");
    ExitCode::from(code)
}

/// A configuration error: exit status 3, except a file that cannot be read at all (1).
fn config_failed(e: config::ConfigError) -> ExitCode {
    match e {
        config::ConfigError::Read { .. } => fail(e),
        config::ConfigError::Invalid { .. } => fail_with(exit::CONFIG, e),
    }
}

/// `reload` and `upgrade`: a signal to the process (by ID or PID file), or a request to its
/// admin API. The signal is sent with kill(2) directly.
fn control(args: &ControlArgs, signal: nix::sys::signal::Signal, path: &str) -> ExitCode {
    if let Some(admin) = &args.admin {
        return admin::client::control(
            admin,
            args.admin_token_file.clone(),
            std::time::Duration::from_secs(5),
            path,
        );
    }
    let pid = match (&args.pid, &args.pid_file) {
        (Some(pid), _) => *pid,
        (None, Some(file)) => match pidfile::read(file) {
            Ok(pid) => pid,
            Err(e) => return fail(e),
        },
        (None, None) => return fail_with(exit::USAGE, "give --pid, --pid-file or --admin"),
    };
    let Ok(raw) = i32::try_from(pid) else {
        return fail_with(exit::USAGE, format!("{pid} is not a process ID"));
    };
    match nix::sys::signal::kill(nix::unistd::Pid::from_raw(raw), signal) {
        Ok(()) => ExitCode::from(exit::OK),
        Err(e) => fail(format!("cannot send {signal} to process {pid}: {e}")),
    }
}

fn main() -> ExitCode {
    admin::process::started();
    let cli = Cli::parse();
    match cli.command {
        Command::Run(args) => {
            // The file's log_format is read first, so the load itself logs in that format.
            let format = args
                .log_format
                .or_else(|| args.config.as_deref().and_then(config::log_format_in_file))
                .unwrap_or_default();
            logging::init(format);
            let admin_listen = match args.admin.as_deref().map(config::parse_admin).transpose() {
                Ok(a) => a,
                Err(e) => return fail_with(exit::USAGE, format!("--{e}")),
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
                    return fail_with(exit::USAGE, "run needs --config FILE, --nginx-config FILE, or --listen ADDR with --backend ADDR")
                }
            };
            let config = match config {
                Ok(c) => c,
                Err(e) => return config_failed(e),
            };
            let options = server::RunOptions {
                pid_file: args.pid_file.clone(),
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
        Command::CheckConfig { file, nginx } => {
            // The importer's notices (what it skipped or reads differently) go to stderr.
            logging::init(LogFormat::Text);
            match if nginx {
                nginx::load(&file)
            } else {
                Config::load(&file)
            } {
                Ok(c) => {
                    print!("{}", c.to_toml());
                    ExitCode::from(exit::OK)
                }
                Err(e) => config_failed(e),
            }
        }
        Command::Completions { shell } => {
            clap_complete::generate(
                shell,
                &mut Cli::command(),
                "wazuh-proxy",
                &mut std::io::stdout(),
            );
            ExitCode::from(exit::OK)
        }
        Command::Man { out_dir } => {
            let written = match &out_dir {
                Some(dir) => clap_mangen::generate_to(Cli::command(), dir),
                None => clap_mangen::Man::new(Cli::command()).render(&mut std::io::stdout()),
            };
            match written {
                Ok(()) => ExitCode::from(exit::OK),
                Err(e) => fail(format!("cannot write the manual pages: {e}")),
            }
        }
        Command::Demo { agents } => {
            if std::env::var_os("RUST_LOG").is_some() {
                logging::init(LogFormat::Text);
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
        Command::Upgrade(args) => control(&args, nix::sys::signal::Signal::SIGUSR2, "/upgrade"),
        Command::Reload(args) => control(&args, nix::sys::signal::Signal::SIGHUP, "/reload"),
        Command::Health(args) => admin::client::health(&args),
        Command::Sessions(args) => admin::client::sessions(&args),
        Command::Backends(args) => admin::client::backends(&args),
        Command::Rebalance(args) => admin::client::rebalance(&args),
        Command::Drain(args) => admin::client::drain(&args),
    }
}
