//! nginx configuration as input: the `stream {}` block of an nginx load balancer already in
//! front of a Wazuh cluster (the one wazuh-docker's multi-node deployment ships, for one) read
//! into the same [`Config`] a TOML file gives, so the proxy can replace nginx without a rewrite.
//!
//! What is read, inside `stream`:
//!
//! ```nginx
//! upstream NAME {
//!     server ADDR:PORT [weight=N] [max_fails=N] [fail_timeout=T] [backup] [down];
//!     hash $remote_addr [consistent];   # or: least_conn; or: random [two [least_conn]];
//! }
//! server {
//!     listen [ADDR:]PORT [udp] [proxy_protocol];   # other flags are ignored with a notice
//!     set_real_ip_from ADDR|CIDR;       # who may send the PROXY header (also in stream)
//!     proxy_pass NAME | ADDR:PORT;
//!     proxy_timeout T;                  # idle_timeout
//!     proxy_connect_timeout T;          # connect_timeout
//!     proxy_next_upstream on|off;  proxy_next_upstream_tries N;  proxy_next_upstream_timeout T;
//! }
//! ```
//!
//! The `proxy_*` settings may also stand directly in `stream`, where they are the default of
//! every server, as in nginx. Mapping:
//!
//! * Balancing: `hash $remote_addr [consistent]` is `source`, `least_conn` is `least-conn`,
//!   `random` is `random`, and no method is `round-robin` (nginx's default).
//! * Kind: a TCP `listen` on port 1514 is an `agent` listener (frame-aware: every message is
//!   checked and its agent ID read), `udp` is `udp`, any other port is plain `tcp` relay.
//!   The balance policy of a 1514 listener stays what nginx said: wazuh-docker's
//!   `hash $remote_addr consistent` keeps routing by source address. Routing by agent ID
//!   (`balance = "agent-id"`), which keeps working behind NAT where many agents share one
//!   address, is a TOML-only setting: print this configuration with `check-config`, change
//!   `balance`, and run from the TOML file.
//! * Times use nginx's units (`500ms`, `10s`, `1m`, `1h 30m`, up to `y`); a bare number is
//!   seconds. `proxy_timeout 0` disables the idle timeout.
//! * The relay always tries the next manager when a connect fails, each at most once, with no
//!   overall limit: that is `proxy_next_upstream on` with `tries 0` and `timeout 0`. Other
//!   values are accepted with a warning.
//! * `worker_shutdown_timeout` (top level) is the drain time after SIGTERM.
//! * `listen ... proxy_protocol` is the listener's `proxy_protocol = true`, trusting the
//!   `set_real_ip_from` networks of the server (else of the stream). Without any, the header
//!   is accepted from every address, as nginx does, with a warning that any client can then
//!   claim any address. Unlike nginx, a sender outside the trusted networks is refused rather
//!   than served under its own address.
//!
//! Everything else at the top level (`user`, `worker_processes`, `pid`, `load_module`,
//! `error_log`, and the `http`, `events` and `mail` blocks) is skipped with a notice, and
//! `include`s inside skipped blocks are not followed. Logging directives (`access_log`,
//! `error_log`, `log_format`, `open_log_file_cache`), `tcp_nodelay` (always on here) and an
//! upstream's `zone` do not change where traffic goes and are skipped with a notice too. Any
//! other directive inside `stream` is an error naming its file:line:column, because silently
//! dropping it could change what the proxy does.
//!
//! `include` works anywhere that is read, with `*`, `?` and `[...]` globs (matches read in
//! sorted order, a glob matching nothing is fine); a relative path is relative to the
//! directory of the main file, which is nginx's configuration prefix when it runs with `-c`.
//! Files are limited to [`MAX_FILE_SIZE`] bytes, include nesting to [`MAX_INCLUDE_DEPTH`]
//! and the number of files to [`MAX_FILES`].

mod lexer;
mod loader;
mod map;
#[cfg(test)]
mod tests;

use std::net::{SocketAddr, ToSocketAddrs};
use std::path::{Path, PathBuf};

use crate::config::{Config, ConfigError};

use lexer::*;
use loader::*;

/// The largest file read (main file or include).
pub const MAX_FILE_SIZE: u64 = 1024 * 1024;
/// How deep `include`s may nest (a file including itself stops here).
pub const MAX_INCLUDE_DEPTH: usize = 16;
/// How many files one configuration may read in all (globs can fan out at every level).
pub const MAX_FILES: usize = 256;
/// How deep `{}` blocks may nest in one file.
const MAX_BLOCK_DEPTH: usize = 32;
/// The port Wazuh agents send events to.
const AGENT_PORT: u16 = 1514;

/// Turns a host name and port into addresses. [`system_resolve`] asks the system resolver;
/// tests pass their own to map names such as `wazuh.master` to loopback addresses.
pub type Resolver<'a> = &'a dyn Fn(&str, u16) -> std::io::Result<Vec<SocketAddr>>;

/// The system resolver (`getaddrinfo`).
pub fn system_resolve(host: &str, port: u16) -> std::io::Result<Vec<SocketAddr>> {
    Ok((host, port).to_socket_addrs()?.collect())
}

/// Reads an nginx configuration and its includes, resolving names with the system resolver.
///
/// # Errors
/// [`ConfigError::Read`] when a file cannot be read; [`ConfigError::Invalid`] with
/// file:line:column for anything wrong or unsupported.
pub fn load(path: &Path) -> Result<Config, ConfigError> {
    load_with(path, &system_resolve)
}

/// [`load`] with a chosen resolver for host names (IP addresses are never passed to it).
///
/// # Errors
/// As [`load`].
pub fn load_with(path: &Path, resolve: Resolver<'_>) -> Result<Config, ConfigError> {
    let prefix = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_owned(),
        _ => PathBuf::from("."),
    };
    let mut loader = Loader {
        files: Vec::new(),
        depth: Vec::new(),
        prefix,
        resolve,
        read_files: true,
    };
    let top = loader.load_file(path, 0, None)?;
    loader.build(top)
}

/// Parses nginx configuration text without touching the filesystem: `origin` names it in
/// errors, and an `include` is an error (there is nothing to read it from). Host names go to
/// `resolve`, as in [`load_with`].
///
/// ```
/// use wazuh_proxy::nginx::parse_str;
/// let text = "stream { server { listen 1514; proxy_pass 10.0.0.11:1514; } }";
/// let config = parse_str(text, "inline.conf", &|_, _| Ok(Vec::new())).unwrap();
/// assert_eq!(config.listeners.len(), 1);
/// let e = parse_str("include x.conf;", "inline.conf", &|_, _| Ok(Vec::new())).unwrap_err();
/// assert!(e.to_string().starts_with("inline.conf:1:1:"), "{e}");
/// ```
///
/// # Errors
/// [`ConfigError::Invalid`] with origin:line:column for anything wrong or unsupported.
pub fn parse_str(text: &str, origin: &str, resolve: Resolver<'_>) -> Result<Config, ConfigError> {
    let mut loader = Loader {
        files: vec![PathBuf::from(origin)],
        depth: vec![0],
        prefix: PathBuf::from("."),
        resolve,
        read_files: false,
    };
    let mut lx = Lexer::new(text, 0);
    let top = parse_block(&mut lx, 0, None).map_err(|(p, m)| loader.err(p, m))?;
    loader.build(top)
}
