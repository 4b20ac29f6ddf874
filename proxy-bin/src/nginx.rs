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

use std::io::Read;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, ToSocketAddrs};
use std::path::{Component, Path, PathBuf};
use std::time::Duration;

use wazuh_proxy_core::balance::{BackendConfig, Balancer, Policy};

use crate::config::{Config, ConfigError, Listener, ListenerKind, DEFAULT_DRAIN};
use wazuh_proxy_core::proxy_protocol::{Cidr, ProxyProtocol};

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

/// A place in one of the files read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Pos {
    file: usize,
    line: usize,
    col: usize,
}

/// One word of a directive, unescaped.
#[derive(Debug, Clone)]
struct Word {
    text: String,
    pos: Pos,
}

/// `name args... ;` or `name args... { block }`.
#[derive(Debug, Clone)]
struct Directive {
    name: Word,
    args: Vec<Word>,
    block: Option<Vec<Directive>>,
}

impl Directive {
    fn name(&self) -> &str {
        &self.name.text
    }
}

#[derive(Debug)]
enum Tok {
    Word(Word),
    Semi(Pos),
    Open(Pos),
    Close(Pos),
}

type LexError = (Pos, String);

/// nginx's lexical rules (`ngx_conf_read_token`): words end at whitespace, `;` or `{`; `}` and
/// `#` end nothing inside a word; a `#` starting a word comments out the rest of the line;
/// quotes start only at the beginning of a word and must be followed by a separator; `\`
/// makes the next character literal, and `\"`, `\'`, `\\`, `\t`, `\r`, `\n` are unescaped;
/// `${` continues a word (variable syntax).
struct Lexer<'a> {
    text: &'a [u8],
    i: usize,
    line: usize,
    line_start: usize,
    file: usize,
}

fn is_space(c: u8) -> bool {
    matches!(c, b' ' | b'\t' | b'\r' | b'\n')
}

impl<'a> Lexer<'a> {
    fn new(text: &'a str, file: usize) -> Self {
        Lexer {
            text: text.as_bytes(),
            i: 0,
            line: 1,
            line_start: 0,
            file,
        }
    }

    fn pos(&self) -> Pos {
        Pos {
            file: self.file,
            line: self.line,
            col: self.i - self.line_start + 1,
        }
    }

    fn peek(&self) -> Option<u8> {
        self.text.get(self.i).copied()
    }

    fn bump(&mut self) -> Option<u8> {
        let c = self.peek()?;
        self.i += 1;
        if c == b'\n' {
            self.line += 1;
            self.line_start = self.i;
        }
        Some(c)
    }

    fn next(&mut self) -> Result<Option<Tok>, LexError> {
        loop {
            match self.peek() {
                None => return Ok(None),
                Some(c) if is_space(c) => {
                    self.bump();
                }
                Some(b'#') => {
                    while let Some(c) = self.bump() {
                        if c == b'\n' {
                            break;
                        }
                    }
                }
                Some(_) => break,
            }
        }
        let pos = self.pos();
        let Some(c) = self.peek() else {
            return Ok(None);
        };
        match c {
            b';' => {
                self.bump();
                Ok(Some(Tok::Semi(pos)))
            }
            b'{' => {
                self.bump();
                Ok(Some(Tok::Open(pos)))
            }
            b'}' => {
                self.bump();
                Ok(Some(Tok::Close(pos)))
            }
            b'"' | b'\'' => self.quoted(c, pos).map(Some),
            _ => Ok(Some(self.bare(pos))),
        }
    }

    fn quoted(&mut self, quote: u8, pos: Pos) -> Result<Tok, LexError> {
        self.bump();
        let start = self.i;
        loop {
            match self.bump() {
                None => {
                    return Err((
                        pos,
                        format!(
                            "unexpected end of file: the {} quote opened here is never closed",
                            if quote == b'"' { "double" } else { "single" }
                        ),
                    ))
                }
                Some(b'\\') => {
                    self.bump();
                }
                Some(c) if c == quote => break,
                Some(_) => {}
            }
        }
        let raw = &self.text[start..self.i - 1];
        match self.peek() {
            None => {}
            Some(c) if is_space(c) || matches!(c, b';' | b'{' | b')') => {}
            Some(c) => {
                return Err((
                    self.pos(),
                    format!(
                        "unexpected {:?} after a quoted string (expected a space, \";\" or \"{{\")",
                        char::from(c)
                    ),
                ))
            }
        }
        Ok(Tok::Word(Word {
            text: unescape(raw),
            pos,
        }))
    }

    fn bare(&mut self, pos: Pos) -> Tok {
        let start = self.i;
        while let Some(c) = self.peek() {
            if is_space(c) || c == b';' || c == b'{' {
                break;
            }
            self.bump();
            match c {
                b'\\' => {
                    self.bump();
                }
                b'$' if self.peek() == Some(b'{') => {
                    self.bump();
                }
                _ => {}
            }
        }
        Tok::Word(Word {
            text: unescape(&self.text[start..self.i]),
            pos,
        })
    }
}

/// The unescaping nginx applies to every word.
fn unescape(raw: &[u8]) -> String {
    let mut out = Vec::with_capacity(raw.len());
    let mut i = 0;
    while i < raw.len() {
        let c = raw[i];
        if c == b'\\' {
            let replaced = match raw.get(i + 1) {
                Some(&e @ (b'"' | b'\'' | b'\\')) => Some(e),
                Some(b't') => Some(b'\t'),
                Some(b'r') => Some(b'\r'),
                Some(b'n') => Some(b'\n'),
                _ => None,
            };
            if let Some(r) = replaced {
                out.push(r);
                i += 2;
                continue;
            }
        }
        out.push(c);
        i += 1;
    }
    // Words end at ASCII separators, so they are whole UTF-8 sequences; lossy never panics.
    String::from_utf8_lossy(&out).into_owned()
}

/// Parses the directives of one file, down to its closing braces.
fn parse_block(
    lx: &mut Lexer<'_>,
    depth: usize,
    open: Option<Pos>,
) -> Result<Vec<Directive>, LexError> {
    let mut out = Vec::new();
    let mut words: Vec<Word> = Vec::new();
    let missing_semi = |words: &[Word]| {
        words.first().map_or(String::new(), |w| {
            format!(
                " (\"{}\" at {}:{} is missing its \";\")",
                w.text, w.pos.line, w.pos.col
            )
        })
    };
    loop {
        match lx.next()? {
            None => {
                if !words.is_empty() {
                    return Err((
                        lx.pos(),
                        format!(
                            "unexpected end of file, expecting \";\" or \"}}\"{}",
                            missing_semi(&words)
                        ),
                    ));
                }
                if let Some(o) = open {
                    return Err((
                        lx.pos(),
                        format!(
                            "unexpected end of file, expecting \"}}\" (to close the block opened at {}:{})",
                            o.line, o.col
                        ),
                    ));
                }
                return Ok(out);
            }
            Some(Tok::Word(w)) => words.push(w),
            Some(Tok::Semi(p)) => {
                if words.is_empty() {
                    return Err((p, "unexpected \";\"".into()));
                }
                let name = words.remove(0);
                out.push(Directive {
                    name,
                    args: std::mem::take(&mut words),
                    block: None,
                });
            }
            Some(Tok::Open(p)) => {
                if words.is_empty() {
                    return Err((p, "unexpected \"{\"".into()));
                }
                if depth >= MAX_BLOCK_DEPTH {
                    return Err((p, format!("blocks nested more than {MAX_BLOCK_DEPTH} deep")));
                }
                let block = parse_block(lx, depth + 1, Some(p))?;
                let name = words.remove(0);
                out.push(Directive {
                    name,
                    args: std::mem::take(&mut words),
                    block: Some(block),
                });
            }
            Some(Tok::Close(p)) => {
                if !words.is_empty() {
                    return Err((p, format!("unexpected \"}}\"{}", missing_semi(&words))));
                }
                if open.is_none() {
                    return Err((p, "unexpected \"}\" (no block is open)".into()));
                }
                return Ok(out);
            }
        }
    }
}

/// The files read so far and how to resolve names.
struct Loader<'r> {
    files: Vec<PathBuf>,
    /// Include depth of each file in `files`.
    depth: Vec<usize>,
    /// Where relative includes start (the main file's directory).
    prefix: PathBuf,
    resolve: Resolver<'r>,
    /// Whether `include` may read files ([`parse_str`] reads none).
    read_files: bool,
}

fn invalid_in(origin: &Path, line: usize, col: usize, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        origin: origin.display().to_string(),
        line,
        column: col,
        message: message.into(),
    }
}

impl Loader<'_> {
    fn err(&self, pos: Pos, message: impl Into<String>) -> ConfigError {
        let origin = self
            .files
            .get(pos.file)
            .map_or(Path::new("?"), |p| p.as_path());
        invalid_in(origin, pos.line, pos.col, message)
    }

    /// Reads and parses one file (includes are expanded later, only where they are read).
    fn load_file(
        &mut self,
        path: &Path,
        depth: usize,
        from: Option<Pos>,
    ) -> Result<Vec<Directive>, ConfigError> {
        let read_err = |source: std::io::Error| ConfigError::Read {
            path: path.to_owned(),
            source,
        };
        if self.files.len() >= MAX_FILES {
            let msg = format!("more than {MAX_FILES} files included");
            return Err(match from {
                Some(p) => self.err(p, msg),
                None => read_err(std::io::Error::other(msg)),
            });
        }
        let file = std::fs::File::open(path).map_err(read_err)?;
        let mut bytes = Vec::new();
        // `take` rather than the size from metadata: devices and pipes report none.
        file.take(MAX_FILE_SIZE + 1)
            .read_to_end(&mut bytes)
            .map_err(read_err)?;
        if bytes.len() as u64 > MAX_FILE_SIZE {
            return Err(read_err(std::io::Error::other(format!(
                "larger than {MAX_FILE_SIZE} bytes"
            ))));
        }
        let text = String::from_utf8(bytes).map_err(|e| {
            read_err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("not UTF-8 text (at byte {})", e.utf8_error().valid_up_to()),
            ))
        })?;
        let index = self.files.len();
        self.files.push(path.to_owned());
        self.depth.push(depth);
        let mut lx = Lexer::new(&text, index);
        parse_block(&mut lx, 0, None).map_err(|(p, m)| self.err(p, m))
    }

    /// Replaces the `include`s of one level by the directives of the files they name.
    fn expand(&mut self, dirs: Vec<Directive>) -> Result<Vec<Directive>, ConfigError> {
        let mut out = Vec::new();
        for d in dirs {
            if d.name() != "include" {
                out.push(d);
                continue;
            }
            let pos = d.name.pos;
            let [arg] = d.args.as_slice() else {
                return Err(self.err(
                    pos,
                    "invalid number of arguments in \"include\" (one file name or glob)",
                ));
            };
            if d.block.is_some() {
                return Err(self.err(pos, "\"include\" takes no block"));
            }
            let depth = self.depth.get(pos.file).copied().unwrap_or(0) + 1;
            if depth > MAX_INCLUDE_DEPTH {
                return Err(self.err(
                    pos,
                    format!("includes nested more than {MAX_INCLUDE_DEPTH} deep (does a file include itself?)"),
                ));
            }
            if arg.text.is_empty() {
                return Err(self.err(arg.pos, "empty file name in \"include\""));
            }
            if !self.read_files {
                return Err(self.err(pos, "\"include\" is not available when parsing text"));
            }
            let path = self.prefix.join(&arg.text);
            let files = if arg.text.contains(['*', '?', '[']) {
                glob(&path)
            } else {
                vec![path]
            };
            for file in files {
                tracing::debug!(file = %file.display(), "include");
                let inner = self.load_file(&file, depth, Some(pos))?;
                out.extend(self.expand(inner)?);
            }
        }
        Ok(out)
    }

    fn build(&mut self, top: Vec<Directive>) -> Result<Config, ConfigError> {
        let top = self.expand(top)?;
        let mut drain = DEFAULT_DRAIN;
        let mut stream: Option<(Pos, Vec<Directive>)> = None;
        for Directive { name, args, block } in top {
            match (name.text.as_str(), block) {
                ("stream", Some(block)) => {
                    if stream.is_some() {
                        return Err(self.err(name.pos, "\"stream\" directive is duplicate"));
                    }
                    no_args(self, &name, &args)?;
                    stream = Some((name.pos, block));
                }
                ("worker_shutdown_timeout", None) => {
                    let [t] = args.as_slice() else {
                        return Err(arg_count(self, &name));
                    };
                    drain = self.time(t)?;
                    tracing::info!(
                        "nginx: worker_shutdown_timeout {} is the drain time after SIGTERM",
                        t.text
                    );
                }
                (name, Some(_)) => {
                    tracing::info!(
                        "nginx: skipping the {name} {{}} block (only stream {{}} is read)"
                    );
                }
                (name, None) => {
                    tracing::info!("nginx: ignoring the top-level directive {name}");
                }
            }
        }
        let Some((stream_pos, stream)) = stream else {
            return Err(invalid_in(
                self.files.first().map_or(Path::new("?"), |p| p.as_path()),
                1,
                1,
                "no stream {} block: nothing to listen on",
            ));
        };
        // Start from the quick form's configuration, every setting at its TOML default, and
        // overwrite what nginx sets: settings nginx has no word for keep the TOML defaults.
        let mut config = Config::quick(
            "127.0.0.1:1514",
            &["127.0.0.1:1".to_owned()],
            Policy::RoundRobin,
        )?;
        let Some(proto) = config.listeners.pop() else {
            return Err(self.err(stream_pos, "no default listener settings"));
        };
        config.listeners = self.stream(&proto, stream_pos, stream)?;
        config.drain_timeout = drain;
        Ok(config)
    }

    fn time(&self, w: &Word) -> Result<Duration, ConfigError> {
        parse_time(&w.text).ok_or_else(|| {
            self.err(
                w.pos,
                format!(
                    "invalid time {:?} (examples: 500ms, 10s, 1m, \"1h 30m\")",
                    w.text
                ),
            )
        })
    }

    fn stream(
        &mut self,
        proto: &Listener,
        stream_pos: Pos,
        block: Vec<Directive>,
    ) -> Result<Vec<Listener>, ConfigError> {
        let block = self.expand(block)?;
        let mut upstreams: Vec<Upstream> = Vec::new();
        let mut servers: Vec<Server> = Vec::new();
        let mut defaults = Proxy::default();
        let mut real_ip_from: Vec<Cidr> = Vec::new();
        for d in block {
            match d.name() {
                "set_real_ip_from" => real_ip_from.push(self.real_ip_from(&d)?),
                "upstream" => {
                    let up = self.upstream(d)?;
                    if let Some(o) = upstreams.iter().find(|u| u.name == up.name) {
                        return Err(self.err(
                            up.pos,
                            format!("duplicate upstream \"{}\" (first at line {})", up.name, o.pos.line),
                        ));
                    }
                    upstreams.push(up);
                }
                "server" => servers.push(self.server(d)?),
                _ if self.proxy_setting(&mut defaults, &d)? => {}
                _ if self.harmless(&d) => {}
                other => {
                    return Err(self.err(
                        d.name.pos,
                        format!(
                            "unsupported directive \"{other}\" in stream (supported: upstream, server, include, \
                             proxy_timeout, proxy_connect_timeout, proxy_next_upstream, \
                             proxy_next_upstream_tries, proxy_next_upstream_timeout)"
                        ),
                    ))
                }
            }
        }
        if servers.is_empty() {
            return Err(self.err(stream_pos, "no server {} in stream: nothing to listen on"));
        }
        let mut listeners: Vec<Listener> = Vec::new();
        for s in servers {
            let Some(pass) = &s.proxy_pass else {
                return Err(self.err(s.pos, "server {} has no proxy_pass"));
            };
            let (base, policy, backends) = match upstreams.iter().find(|u| u.name == pass.text) {
                Some(u) => (u.name.clone(), u.policy, u.backends.clone()),
                None => {
                    let (host, port) = split_host_port(&pass.text).ok_or_else(|| {
                        self.err(
                            pass.pos,
                            format!(
                                "no upstream named \"{}\" in stream, and it is not an ADDRESS:PORT",
                                pass.text
                            ),
                        )
                    })?;
                    let addrs = self.addrs(host, port, pass)?;
                    let backends: Vec<_> = addrs.into_iter().map(BackendConfig::new).collect();
                    if let Err(e) = Balancer::new(Policy::RoundRobin, backends.clone()) {
                        return Err(self.err(pass.pos, e.to_string()));
                    }
                    ("stream".to_owned(), Policy::RoundRobin, backends)
                }
            };
            let proxy = s.proxy.or(&defaults);
            let mut agent = proto.agent.clone();
            if let Some(t) = proxy.idle {
                agent.idle_timeout = (!t.is_zero()).then_some(t);
            }
            if let Some(t) = proxy.connect {
                agent.connect_timeout = t;
            }
            if proxy.next_upstream == Some(false) {
                tracing::warn!("nginx: proxy_next_upstream off is not supported; a failed connect is retried on the next manager");
            }
            if proxy.tries.is_some_and(|n| n != 0)
                || proxy.next_timeout.is_some_and(|t| !t.is_zero())
            {
                tracing::warn!("nginx: proxy_next_upstream_tries and proxy_next_upstream_timeout are not enforced; every manager is tried once");
            }
            for lst in &s.listens {
                let l = lst;
                let kind = if l.udp {
                    ListenerKind::Udp
                } else if l.port == AGENT_PORT {
                    ListenerKind::Agent
                } else {
                    ListenerKind::Tcp
                };
                for &addr in &l.addrs {
                    let mut name = format!("{base}-{}{}", l.port, if l.udp { "-udp" } else { "" });
                    let mut n = 1;
                    while listeners.iter().any(|o| o.name == name) {
                        n += 1;
                        name = format!("{base}-{}{}-{n}", l.port, if l.udp { "-udp" } else { "" });
                    }
                    if listeners.iter().any(|o| {
                        o.listen == addr
                            && (o.kind == ListenerKind::Udp) == (kind == ListenerKind::Udp)
                    }) {
                        return Err(self.err(l.pos, format!("duplicate listen {addr}")));
                    }
                    if kind == ListenerKind::Agent {
                        tracing::info!(
                            "nginx: {name} on {addr} carries Wazuh agents (frame-aware); balance stays {policy} as configured"
                        );
                    }
                    let mut l = proto.clone();
                    l.name = name;
                    l.listen = addr;
                    l.kind = kind;
                    l.balance = policy;
                    l.backends = backends.clone();
                    l.agent = agent.clone();
                    if lst.proxy_protocol {
                        let from = if s.real_ip_from.is_empty() {
                            &real_ip_from
                        } else {
                            &s.real_ip_from
                        };
                        l.agent.proxy_protocol = Some(proxy_protocol_from(&l.name, addr, from));
                    }
                    listeners.push(l);
                }
            }
        }
        Ok(listeners)
    }

    /// Directives that do not change where traffic goes: skipped with a notice.
    fn harmless(&self, d: &Directive) -> bool {
        let skip = d.block.is_none()
            && matches!(
                d.name(),
                "access_log" | "error_log" | "log_format" | "open_log_file_cache" | "tcp_nodelay"
            );
        if skip {
            tracing::info!(
                "nginx: ignoring {} (the proxy logs through its own log)",
                d.name()
            );
        }
        skip
    }

    fn upstream(&mut self, d: Directive) -> Result<Upstream, ConfigError> {
        let [name] = d.args.as_slice() else {
            return Err(arg_count(self, &d.name));
        };
        let Some(block) = d.block else {
            return Err(self.err(d.name.pos, "\"upstream\" needs a { } block"));
        };
        let block = self.expand(block)?;
        let mut policy = Policy::RoundRobin;
        let mut method: Option<Pos> = None;
        let mut backends = Vec::new();
        for s in block {
            no_block(self, &s)?;
            let mut set_method = |this: &Self, p: Policy| {
                if let Some(prev) = method {
                    tracing::warn!(
                        "nginx: {}:{}: load balancing method redefined (previous at line {})",
                        this.files
                            .get(s.name.pos.file)
                            .map_or(String::new(), |f| f.display().to_string()),
                        s.name.pos.line,
                        prev.line
                    );
                }
                method = Some(s.name.pos);
                policy = p;
            };
            match s.name() {
                "server" => backends.extend(self.upstream_server(&s)?),
                "hash" => {
                    let (key, consistent) = match s.args.as_slice() {
                        [k] => (k, false),
                        [k, c] if c.text == "consistent" => (k, true),
                        [_, c] => {
                            return Err(self.err(
                                c.pos,
                                format!("invalid parameter \"{}\" (expected consistent)", c.text),
                            ))
                        }
                        _ => return Err(arg_count(self, &s.name)),
                    };
                    if key.text != "$remote_addr" && key.text != "$binary_remote_addr" {
                        return Err(self.err(
                            key.pos,
                            format!("hash key \"{}\" is not supported (only $remote_addr: the client address)", key.text),
                        ));
                    }
                    if !consistent {
                        tracing::info!(
                            "nginx: hash {} is read as a consistent hash of the client address",
                            key.text
                        );
                    }
                    set_method(self, Policy::Source);
                }
                "least_conn" => {
                    no_args(self, &s.name, &s.args)?;
                    set_method(self, Policy::LeastConn);
                }
                "random" => {
                    match s.args.as_slice() {
                        [] => {}
                        [two, rest @ ..] if two.text == "two" => match rest {
                            [] => {}
                            [m] if m.text == "least_conn" => {}
                            [m, ..] => {
                                return Err(self.err(
                                    m.pos,
                                    format!(
                                        "invalid parameter \"{}\" (expected least_conn)",
                                        m.text
                                    ),
                                ))
                            }
                        },
                        [w, ..] => {
                            return Err(self.err(
                                w.pos,
                                format!("invalid parameter \"{}\" (expected two)", w.text),
                            ))
                        }
                    }
                    if !s.args.is_empty() {
                        tracing::info!("nginx: random two is read as weighted random");
                    }
                    set_method(self, Policy::Random);
                }
                "zone" => {
                    tracing::info!(
                        "nginx: ignoring zone (balancer state is shared within the process)"
                    );
                }
                other => {
                    return Err(self.err(
                        s.name.pos,
                        format!(
                        "unsupported directive \"{other}\" in upstream (supported: server, hash, \
                             least_conn, random, zone, include)"
                    ),
                    ))
                }
            }
        }
        if backends.is_empty() {
            return Err(self.err(
                name.pos,
                format!("no servers are inside upstream \"{}\"", name.text),
            ));
        }
        if let Err(e) = Balancer::new(policy, backends.clone()) {
            return Err(self.err(name.pos, format!("upstream \"{}\": {e}", name.text)));
        }
        Ok(Upstream {
            name: name.text.clone(),
            pos: name.pos,
            policy,
            backends,
        })
    }

    fn upstream_server(&self, s: &Directive) -> Result<Vec<BackendConfig>, ConfigError> {
        let Some((addr, params)) = s.args.split_first() else {
            return Err(arg_count(self, &s.name));
        };
        let (mut weight, mut max_fails, mut fail_timeout) = (None, None, None);
        let (mut backup, mut down) = (false, false);
        for p in params {
            let number = |v: &str| {
                parse_u32(v)
                    .ok_or_else(|| self.err(p.pos, format!("invalid number in \"{}\"", p.text)))
            };
            match p.text.split_once('=') {
                Some(("weight", v)) => {
                    let w = number(v)?;
                    if w == 0 {
                        return Err(self.err(p.pos, "weight must be at least 1"));
                    }
                    weight = Some(w);
                }
                Some(("max_fails", v)) => max_fails = Some(number(v)?),
                Some(("fail_timeout", v)) => {
                    let w = Word {
                        text: v.to_owned(),
                        pos: p.pos,
                    };
                    fail_timeout = Some(self.time(&w)?);
                }
                Some(("max_conns", v)) => {
                    if number(v)? != 0 {
                        return Err(self.err(p.pos, "max_conns is not supported (only 0, no limit)"));
                    }
                }
                None if p.text == "backup" => backup = true,
                None if p.text == "down" => down = true,
                _ => {
                    return Err(self.err(
                        p.pos,
                        format!(
                            "invalid parameter \"{}\" (supported: weight=, max_fails=, fail_timeout=, backup, down)",
                            p.text
                        ),
                    ))
                }
            }
        }
        let (host, port) = split_host_port(&addr.text).ok_or_else(|| {
            self.err(
                addr.pos,
                format!(
                    "no port in upstream server \"{}\" (expected ADDRESS:PORT)",
                    addr.text
                ),
            )
        })?;
        let mut out = Vec::new();
        for a in self.addrs(host, port, addr)? {
            let mut c = BackendConfig::new(a);
            if let Some(w) = weight {
                c = c.with_weight(w);
            }
            if let Some(m) = max_fails {
                c = c.with_max_fails(m);
            }
            if let Some(t) = fail_timeout {
                c = c.with_fail_timeout(t);
            }
            if backup {
                c = c.as_backup();
            }
            if down {
                c = c.as_down();
            }
            out.push(c);
        }
        Ok(out)
    }

    fn server(&mut self, d: Directive) -> Result<Server, ConfigError> {
        no_args(self, &d.name, &d.args)?;
        let Some(block) = d.block else {
            return Err(self.err(
                d.name.pos,
                "\"server\" in stream needs a { } block (servers of an upstream go inside upstream NAME { })",
            ));
        };
        let block = self.expand(block)?;
        let mut server = Server {
            pos: d.name.pos,
            listens: Vec::new(),
            proxy_pass: None,
            proxy: Proxy::default(),
            real_ip_from: Vec::new(),
        };
        for s in block {
            match s.name() {
                "listen" => {
                    no_block(self, &s)?;
                    server.listens.push(self.listen(&s)?);
                }
                "proxy_pass" => {
                    no_block(self, &s)?;
                    let [target] = s.args.as_slice() else {
                        return Err(arg_count(self, &s.name));
                    };
                    if server.proxy_pass.is_some() {
                        return Err(self.err(s.name.pos, "\"proxy_pass\" directive is duplicate"));
                    }
                    if target.text.contains('$') {
                        return Err(self.err(target.pos, "variables in proxy_pass are not supported"));
                    }
                    server.proxy_pass = Some(target.clone());
                }
                "set_real_ip_from" => server.real_ip_from.push(self.real_ip_from(&s)?),
                _ if self.proxy_setting(&mut server.proxy, &s)? => {}
                _ if self.harmless(&s) => {}
                other => {
                    return Err(self.err(
                        s.name.pos,
                        format!(
                            "unsupported directive \"{other}\" in server (supported: listen, proxy_pass, include, \
                             proxy_timeout, proxy_connect_timeout, proxy_next_upstream, \
                             proxy_next_upstream_tries, proxy_next_upstream_timeout)"
                        ),
                    ))
                }
            }
        }
        if server.listens.is_empty() {
            return Err(self.err(server.pos, "no \"listen\" is defined for server"));
        }
        Ok(server)
    }

    fn listen(&self, d: &Directive) -> Result<Listen, ConfigError> {
        let Some((addr, flags)) = d.args.split_first() else {
            return Err(arg_count(self, &d.name));
        };
        let mut udp = false;
        let mut proxy_protocol = false;
        for f in flags {
            match f.text.as_str() {
                "udp" => udp = true,
                "proxy_protocol" => proxy_protocol = true,
                "ssl" => tracing::warn!(
                    "nginx: listen {} {}: flag ignored; the proxy relays the bytes as they come",
                    addr.text,
                    f.text
                ),
                other => tracing::info!("nginx: listen {}: flag {other} ignored", addr.text),
            }
        }
        let text = addr.text.as_str();
        let (addrs, port) = if let Some(port) = parse_port(text) {
            (
                vec![SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), port)],
                port,
            )
        } else {
            let (host, port) = split_host_port(text).ok_or_else(|| {
                self.err(
                    addr.pos,
                    format!("invalid listen \"{text}\" (expected PORT or ADDRESS:PORT)"),
                )
            })?;
            if host == "*" {
                (
                    vec![SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), port)],
                    port,
                )
            } else {
                (self.addrs(host, port, addr)?, port)
            }
        };
        if udp && proxy_protocol {
            return Err(self.err(
                addr.pos,
                "proxy_protocol on a udp listen is not supported: load balancers in front of \
                 Wazuh send the PROXY header on TCP only",
            ));
        }
        Ok(Listen {
            addrs,
            port,
            udp,
            proxy_protocol,
            pos: addr.pos,
        })
    }

    /// `set_real_ip_from ADDRESS|CIDR;` (the realip module): who may send a PROXY header.
    fn real_ip_from(&self, d: &Directive) -> Result<Cidr, ConfigError> {
        no_block(self, d)?;
        let [w] = d.args.as_slice() else {
            return Err(arg_count(self, &d.name));
        };
        if w.text == "unix:" {
            return Err(self.err(w.pos, "set_real_ip_from unix: is not supported"));
        }
        w.text.parse().map_err(|e: String| self.err(w.pos, e))
    }

    /// Reads a `proxy_*` setting into `p`; false if `d` is not one.
    fn proxy_setting(&self, p: &mut Proxy, d: &Directive) -> Result<bool, ConfigError> {
        let name = d.name();
        if !matches!(
            name,
            "proxy_timeout"
                | "proxy_connect_timeout"
                | "proxy_next_upstream"
                | "proxy_next_upstream_tries"
                | "proxy_next_upstream_timeout"
        ) {
            return Ok(false);
        }
        no_block(self, d)?;
        let [v] = d.args.as_slice() else {
            return Err(arg_count(self, &d.name));
        };
        let dup = || self.err(d.name.pos, format!("\"{name}\" directive is duplicate"));
        match name {
            "proxy_timeout" => {
                if p.idle.replace(self.time(v)?).is_some() {
                    return Err(dup());
                }
            }
            "proxy_connect_timeout" => {
                let t = self.time(v)?;
                if t.is_zero() {
                    return Err(self.err(v.pos, "proxy_connect_timeout must be more than 0"));
                }
                if p.connect.replace(t).is_some() {
                    return Err(dup());
                }
            }
            "proxy_next_upstream" => {
                let on = match v.text.to_ascii_lowercase().as_str() {
                    "on" => true,
                    "off" => false,
                    _ => {
                        return Err(self.err(
                            v.pos,
                            format!(
                                "invalid value \"{}\" in \"{name}\", it must be \"on\" or \"off\"",
                                v.text
                            ),
                        ))
                    }
                };
                if p.next_upstream.replace(on).is_some() {
                    return Err(dup());
                }
            }
            "proxy_next_upstream_tries" => {
                let n = parse_u32(&v.text)
                    .ok_or_else(|| self.err(v.pos, format!("invalid number \"{}\"", v.text)))?;
                if p.tries.replace(n).is_some() {
                    return Err(dup());
                }
            }
            _ => {
                if p.next_timeout.replace(self.time(v)?).is_some() {
                    return Err(dup());
                }
            }
        }
        Ok(true)
    }

    /// Addresses of `host:port`: an IP address as is, a name through the resolver.
    fn addrs(&self, host: &str, port: u16, at: &Word) -> Result<Vec<SocketAddr>, ConfigError> {
        if let Ok(ip) = host.parse::<IpAddr>() {
            return Ok(vec![SocketAddr::new(ip, port)]);
        }
        if host.starts_with("unix:") {
            return Err(self.err(at.pos, "unix sockets are not supported"));
        }
        let mut all = (self.resolve)(host, port)
            .map_err(|e| self.err(at.pos, format!("host not found: \"{}\": {e}", at.text)))?;
        all.sort();
        all.dedup();
        if all.is_empty() {
            return Err(self.err(at.pos, format!("\"{}\" resolves to no address", at.text)));
        }
        Ok(all)
    }
}

fn arg_count(l: &Loader<'_>, name: &Word) -> ConfigError {
    l.err(
        name.pos,
        format!("invalid number of arguments in \"{}\" directive", name.text),
    )
}

fn no_args(l: &Loader<'_>, name: &Word, args: &[Word]) -> Result<(), ConfigError> {
    match args.first() {
        None => Ok(()),
        Some(a) => Err(l.err(a.pos, format!("\"{}\" takes no arguments", name.text))),
    }
}

fn no_block(l: &Loader<'_>, d: &Directive) -> Result<(), ConfigError> {
    match d.block {
        None => Ok(()),
        Some(_) => Err(l.err(
            d.name.pos,
            format!("\"{}\" takes no {{ }} block", d.name.text),
        )),
    }
}

struct Upstream {
    name: String,
    pos: Pos,
    policy: Policy,
    backends: Vec<BackendConfig>,
}

/// `listen ... proxy_protocol`: the header is read from the `set_real_ip_from` networks; with
/// none, from anyone, as nginx does (with a warning: any client can then claim any address).
fn proxy_protocol_from(name: &str, addr: SocketAddr, from: &[Cidr]) -> ProxyProtocol {
    if from.is_empty() {
        tracing::warn!(
            "nginx: {name} on {addr}: listen proxy_protocol without set_real_ip_from: the header is accepted from any address, as nginx does, so any client can claim any address; add set_real_ip_from (proxy_protocol_trusted in TOML) to restrict it"
        );
        return ProxyProtocol {
            trusted: Cidr::ANY.to_vec(),
        };
    }
    let list: Vec<String> = from.iter().map(ToString::to_string).collect();
    tracing::info!(
        "nginx: {name} on {addr}: PROXY protocol header read from set_real_ip_from ({}); connections from other addresses are refused",
        list.join(", ")
    );
    ProxyProtocol {
        trusted: from.to_vec(),
    }
}

struct Listen {
    addrs: Vec<SocketAddr>,
    port: u16,
    udp: bool,
    proxy_protocol: bool,
    pos: Pos,
}

struct Server {
    pos: Pos,
    listens: Vec<Listen>,
    proxy_pass: Option<Word>,
    proxy: Proxy,
    /// `set_real_ip_from` of this server (replaces the stream's, as in nginx).
    real_ip_from: Vec<Cidr>,
}

/// The `proxy_*` settings of one level (stream or server); unset ones inherit.
#[derive(Debug, Clone, Copy, Default)]
struct Proxy {
    idle: Option<Duration>,
    connect: Option<Duration>,
    next_upstream: Option<bool>,
    tries: Option<u32>,
    next_timeout: Option<Duration>,
}

impl Proxy {
    fn or(self, outer: &Proxy) -> Proxy {
        Proxy {
            idle: self.idle.or(outer.idle),
            connect: self.connect.or(outer.connect),
            next_upstream: self.next_upstream.or(outer.next_upstream),
            tries: self.tries.or(outer.tries),
            next_timeout: self.next_timeout.or(outer.next_timeout),
        }
    }
}

fn parse_u32(s: &str) -> Option<u32> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

fn parse_port(s: &str) -> Option<u16> {
    parse_u32(s)
        .and_then(|p| u16::try_from(p).ok())
        .filter(|&p| p != 0)
}

/// `host:port` or `[v6]:port`; `None` without a valid port.
fn split_host_port(s: &str) -> Option<(&str, u16)> {
    if let Some(rest) = s.strip_prefix('[') {
        let (host, after) = rest.split_once(']')?;
        return Some((host, parse_port(after.strip_prefix(':')?)?));
    }
    let (host, port) = s.rsplit_once(':')?;
    if host.is_empty() || host.contains(':') {
        return None;
    }
    Some((host, parse_port(port)?))
}

/// nginx's time syntax (`ngx_parse_time`): number-unit groups from the largest unit down,
/// optionally separated by spaces; units `y M w d h m s ms`; a bare number is seconds.
fn parse_time(s: &str) -> Option<Duration> {
    const UNITS: [(&str, u64); 8] = [
        ("y", 365 * 86_400_000),
        ("M", 30 * 86_400_000),
        ("w", 7 * 86_400_000),
        ("d", 86_400_000),
        ("h", 3_600_000),
        ("ms", 1),
        ("m", 60_000),
        ("s", 1000),
    ];
    // Rank of each unit, largest first ("ms" is listed before "m" only to be matched first).
    let rank = |u: &str| match u {
        "y" => 0,
        "M" => 1,
        "w" => 2,
        "d" => 3,
        "h" => 4,
        "m" => 5,
        "s" => 6,
        _ => 7,
    };
    let mut rest = s.trim_start_matches(' ');
    let mut total: u64 = 0;
    let mut last: Option<usize> = None;
    if rest.is_empty() {
        return None;
    }
    while !rest.is_empty() {
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 {
            return None;
        }
        let value: u64 = rest[..digits].parse().ok()?;
        rest = &rest[digits..];
        let (unit, scale) = match UNITS.iter().find(|(u, _)| rest.starts_with(u)) {
            Some(&(u, scale)) => (u, scale),
            None if rest.is_empty() || rest.starts_with(' ') => ("s", 1000),
            None => return None,
        };
        rest = rest.strip_prefix(unit).unwrap_or(rest);
        let r = rank(unit);
        if last.is_some_and(|l| l >= r) {
            return None;
        }
        last = Some(r);
        total = total.checked_add(value.checked_mul(scale)?)?;
        rest = rest.trim_start_matches(' ');
    }
    Some(Duration::from_millis(total))
}

/// The paths matching a glob, sorted; unreadable directories match nothing (as glob(3)).
fn glob(pattern: &Path) -> Vec<PathBuf> {
    let mut found = vec![PathBuf::new()];
    for comp in pattern.components() {
        let Component::Normal(name) = comp else {
            for f in &mut found {
                f.push(comp);
            }
            continue;
        };
        let name = name.to_string_lossy();
        if !name.contains(['*', '?', '[']) {
            for f in &mut found {
                f.push(name.as_ref());
            }
            continue;
        }
        let mut next = Vec::new();
        for dir in &found {
            let read = if dir.as_os_str().is_empty() {
                Path::new(".")
            } else {
                dir.as_path()
            };
            let Ok(entries) = std::fs::read_dir(read) else {
                continue;
            };
            for e in entries.flatten() {
                let entry = e.file_name();
                if glob_match(name.as_bytes(), entry.to_string_lossy().as_bytes()) {
                    next.push(dir.join(&entry));
                }
            }
        }
        found = next;
    }
    found.retain(|p| p.exists());
    found.sort();
    found
}

/// A `[...]` class starting after the `[` at `i`: whether `c` is in it, and the index after
/// its `]`; `None` when the class is not closed.
fn glob_class(pat: &[u8], mut i: usize, c: u8) -> Option<(bool, usize)> {
    let negate = matches!(pat.get(i), Some(b'!' | b'^'));
    if negate {
        i += 1;
    }
    let mut matched = false;
    let mut first = true;
    loop {
        let &lo = pat.get(i)?;
        if lo == b']' && !first {
            return Some((matched != negate, i + 1));
        }
        first = false;
        match (pat.get(i + 1), pat.get(i + 2)) {
            (Some(b'-'), Some(&hi)) if hi != b']' => {
                matched |= lo <= c && c <= hi;
                i += 3;
            }
            _ => {
                matched |= lo == c;
                i += 1;
            }
        }
    }
}

/// Shell wildcard match of one path component: `*`, `?`, `[abc]`, `[a-z]`, `[!x]`, `\x`; a
/// leading dot must be matched explicitly, as glob(3) does.
fn glob_match(pat: &[u8], name: &[u8]) -> bool {
    if name.first() == Some(&b'.') && pat.first() != Some(&b'.') {
        return false;
    }
    let (mut p, mut n) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while n < name.len() {
        if pat.get(p) == Some(&b'*') {
            star = Some((p, n));
            p += 1;
            continue;
        }
        if let Some(next) = glob_one(pat, p, name[n]) {
            p = next;
            n += 1;
            continue;
        }
        // Backtrack: let the last `*` swallow one more character.
        match star {
            Some((sp, sn)) => {
                p = sp + 1;
                n = sn + 1;
                star = Some((sp, sn + 1));
            }
            None => return false,
        }
    }
    pat[p.min(pat.len())..].iter().all(|&c| c == b'*')
}

/// Whether the pattern element at `p` (not `*`) matches `c`; the index after it if so.
fn glob_one(pat: &[u8], p: usize, c: u8) -> Option<usize> {
    let &first = pat.get(p)?;
    match first {
        b'?' => Some(p + 1),
        b'\\' if p + 1 < pat.len() => (pat[p + 1] == c).then_some(p + 2),
        b'[' => match glob_class(pat, p + 1, c) {
            Some((true, next)) => Some(next),
            Some((false, _)) => None,
            // An unterminated class is a literal `[`.
            None => (c == b'[').then_some(p + 1),
        },
        other => (other == c).then_some(p + 1),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use wazuh_proxy_core::relay::AgentRelayConfig;

    const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/nginx");

    /// wazuh-docker names its managers `wazuh.master` and `wazuh.worker`, which resolve only
    /// inside its compose network; tests map them to loopback addresses instead.
    fn test_resolve(host: &str, port: u16) -> std::io::Result<Vec<SocketAddr>> {
        let ip = match host {
            "wazuh.master" => Ipv4Addr::new(127, 0, 0, 2),
            "wazuh.worker" => Ipv4Addr::new(127, 0, 0, 3),
            "two.example" => {
                return Ok(vec![
                    SocketAddr::from((Ipv4Addr::new(127, 0, 1, 2), port)),
                    SocketAddr::from((Ipv4Addr::new(127, 0, 1, 1), port)),
                ])
            }
            _ => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    "unknown test host",
                ))
            }
        };
        Ok(vec![SocketAddr::from((ip, port))])
    }

    /// A scratch directory with the given files.
    struct Scratch(PathBuf);

    impl Scratch {
        fn new(tag: &str, files: &[(&str, &str)]) -> Scratch {
            let dir = std::env::temp_dir()
                .join(format!("wazuh-proxy-nginx-{}-{tag}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            for (name, text) in files {
                let path = dir.join(name);
                std::fs::create_dir_all(path.parent().unwrap()).unwrap();
                std::fs::write(path, text).unwrap();
            }
            Scratch(dir)
        }
        fn main(&self) -> PathBuf {
            self.0.join("nginx.conf")
        }
    }

    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn parse(tag: &str, text: &str) -> Result<Config, ConfigError> {
        let s = Scratch::new(tag, &[("nginx.conf", text)]);
        load_with(&s.main(), &test_resolve)
    }

    fn err(tag: &str, text: &str) -> String {
        match parse(tag, text) {
            Ok(c) => panic!("expected an error, got {c:?}"),
            Err(e) => e.to_string(),
        }
    }

    fn stream(body: &str) -> String {
        format!("stream {{\n{body}\n}}\n")
    }

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn the_wazuh_docker_stream_block_runs_unchanged() {
        let path = Path::new(FIXTURES).join("wazuh-docker.conf");
        let c = load_with(&path, &test_resolve).unwrap();
        assert_eq!(c.drain_timeout, DEFAULT_DRAIN);
        assert_eq!(c.listeners.len(), 1);
        let l = &c.listeners[0];
        assert_eq!(l.name, "mycluster-1514");
        assert_eq!(l.listen, sa("0.0.0.0:1514"));
        assert_eq!((l.kind, l.balance), (ListenerKind::Agent, Policy::Source));
        let addrs: Vec<_> = l.backends.iter().map(|b| b.addr).collect();
        assert_eq!(addrs, [sa("127.0.0.2:1514"), sa("127.0.0.3:1514")]);
        assert!(l.backends.iter().all(|b| *b == BackendConfig::new(b.addr)));
        let d = AgentRelayConfig::default();
        assert_eq!(l.agent.idle_timeout, d.idle_timeout);
        assert_eq!(l.agent.connect_timeout, d.connect_timeout);
        // Same result as the equivalent TOML.
        let toml = Config::parse(&c.to_toml(), "effective").unwrap();
        assert_eq!(toml.to_toml(), c.to_toml());
    }

    #[test]
    fn every_directive_maps() {
        let c = parse(
            "all",
            "user nginx; worker_processes auto; pid /run/nginx.pid; load_module x.so;\n\
             error_log /dev/null; worker_shutdown_timeout 45s;\n\
             events { worker_connections 1024; }\n\
             http { include /nonexistent/mime.types; server { listen 80; } }\n\
             mail { server { listen 25; } }\n\
             stream {\n\
               proxy_timeout 5m; proxy_connect_timeout 2s;\n\
               upstream agents {\n\
                 hash $remote_addr consistent;\n\
                 server 10.0.0.1:1514 weight=3 max_fails=2 fail_timeout=30s;\n\
                 server 10.0.0.2:1514 backup;\n\
                 server 10.0.0.3:1514 down;\n\
                 zone agents 64k;\n\
               }\n\
               upstream lc { least_conn; server 10.0.0.1:1515; server two.example:1515; }\n\
               upstream rnd { random two least_conn; server [::1]:55000; server 10.0.0.9:55000; }\n\
               upstream rr { server 10.0.0.1:1514; }\n\
               upstream plain { hash $remote_addr; server 10.0.0.1:1516; }\n\
               server { listen 1514; listen 127.0.0.1:1514 udp; proxy_pass agents; proxy_timeout 0; }\n\
               server { listen 1515 reuseport backlog=100; proxy_pass lc; proxy_connect_timeout 500ms;\n\
                        proxy_next_upstream on; proxy_next_upstream_tries 0; proxy_next_upstream_timeout 0; }\n\
               server { listen [::]:55000; proxy_pass rnd; proxy_timeout '1h 30m'; }\n\
               server { listen *:1516; proxy_pass rr; }\n\
               server { listen 1517; proxy_pass 10.0.0.7:7; }\n\
               server { listen 1518; proxy_pass plain; }\n\
               access_log off; tcp_nodelay on;\n\
             }\n",
        )
        .unwrap();
        assert_eq!(c.drain_timeout, Duration::from_secs(45));
        let got: Vec<_> = c
            .listeners
            .iter()
            .map(|l| (l.name.as_str(), l.listen, l.kind, l.balance))
            .collect();
        assert_eq!(
            got,
            [
                (
                    "agents-1514",
                    sa("0.0.0.0:1514"),
                    ListenerKind::Agent,
                    Policy::Source
                ),
                (
                    "agents-1514-udp",
                    sa("127.0.0.1:1514"),
                    ListenerKind::Udp,
                    Policy::Source
                ),
                (
                    "lc-1515",
                    sa("0.0.0.0:1515"),
                    ListenerKind::Tcp,
                    Policy::LeastConn
                ),
                (
                    "rnd-55000",
                    sa("[::]:55000"),
                    ListenerKind::Tcp,
                    Policy::Random
                ),
                (
                    "rr-1516",
                    sa("0.0.0.0:1516"),
                    ListenerKind::Tcp,
                    Policy::RoundRobin
                ),
                (
                    "stream-1517",
                    sa("0.0.0.0:1517"),
                    ListenerKind::Tcp,
                    Policy::RoundRobin
                ),
                (
                    "plain-1518",
                    sa("0.0.0.0:1518"),
                    ListenerKind::Tcp,
                    Policy::Source
                ),
            ]
        );
        let a = &c.listeners[0];
        let b = &a.backends;
        assert_eq!(
            (b[0].weight, b[0].max_fails, b[0].fail_timeout),
            (3, 2, Duration::from_secs(30))
        );
        assert!(b[1].backup && !b[1].down && b[2].down && !b[2].backup);
        // proxy_timeout 0 disables the idle timeout; the stream's connect timeout is inherited.
        assert_eq!(a.agent.idle_timeout, None);
        assert_eq!(a.agent.connect_timeout, Duration::from_secs(2));
        let lc = &c.listeners[2];
        assert_eq!(lc.agent.connect_timeout, Duration::from_millis(500));
        assert_eq!(lc.agent.idle_timeout, Some(Duration::from_secs(300)));
        // A name resolving to two addresses gives two backends.
        let addrs: Vec<_> = lc.backends.iter().map(|b| b.addr).collect();
        assert_eq!(
            addrs,
            [
                sa("10.0.0.1:1515"),
                sa("127.0.1.1:1515"),
                sa("127.0.1.2:1515")
            ]
        );
        assert_eq!(
            c.listeners[3].agent.idle_timeout,
            Some(Duration::from_secs(5400))
        );
        assert_eq!(c.listeners[3].backends[0].addr, sa("[::1]:55000"));
        assert_eq!(c.listeners[5].backends[0].addr, sa("10.0.0.7:7"));
    }

    #[test]
    fn includes_and_globs() {
        let path = Path::new(FIXTURES).join("includes/nginx.conf");
        let c = load_with(&path, &test_resolve).unwrap();
        let got: Vec<_> = c
            .listeners
            .iter()
            .map(|l| (l.name.as_str(), l.listen.port()))
            .collect();
        // stream.d/*.conf in sorted order; the dot file is not matched.
        assert_eq!(got, [("agents-1514", 1514), ("enrollment-1515", 1515)]);
        assert_eq!(c.listeners[0].balance, Policy::LeastConn);
        assert_eq!(
            c.listeners[0].agent.idle_timeout,
            Some(Duration::from_secs(120))
        );
        // upstreams/enrollment.conf, included from stream.d/ with a path relative to the main file.
        assert_eq!(c.listeners[1].backends[0].addr, sa("127.0.0.2:1515"));
    }

    #[test]
    fn include_errors_name_the_include() {
        let s = Scratch::new("loop", &[("nginx.conf", "include nginx.conf;\n")]);
        let e = load_with(&s.main(), &test_resolve).unwrap_err().to_string();
        assert!(
            e.contains("nginx.conf:1:1: includes nested more than 16"),
            "{e}"
        );

        let e = err("missing", "stream { include missing.conf; }");
        assert!(
            e.contains("cannot read") && e.contains("missing.conf"),
            "{e}"
        );
        // A glob matching nothing is fine (nginx does the same); the stream is then empty.
        let e = err("noglob", "stream { include none.d/*.conf; }");
        assert!(e.contains(":1:1: no server {} in stream"), "{e}");

        let s = Scratch::new(
            "inc-bad",
            &[
                ("nginx.conf", "stream {\n  include s/*.conf;\n}\n"),
                ("s/a.conf", "server {\n  listen 1514;\n  proxy_pass 10.0.0.1:1514;\n  proxy_buffer_size 16k;\n}\n"),
            ],
        );
        let e = load_with(&s.main(), &test_resolve).unwrap_err().to_string();
        assert!(
            e.contains("a.conf:4:3: unsupported directive \"proxy_buffer_size\" in server"),
            "{e}"
        );

        let big = "#".repeat(MAX_FILE_SIZE as usize + 1);
        let e = err("big", &big);
        assert!(e.contains("larger than"), "{e}");

        // Fan-out: every file includes every file; the file count limit stops it.
        let files: Vec<(String, String)> = (0..4)
            .map(|i| (format!("f{i}.conf"), "include f*.conf;\n".into()))
            .collect();
        let mut refs: Vec<(&str, &str)> = files
            .iter()
            .map(|(a, b)| (a.as_str(), b.as_str()))
            .collect();
        refs.push(("nginx.conf", "include f*.conf;\n"));
        let s = Scratch::new("fanout", &refs);
        let e = load_with(&s.main(), &test_resolve).unwrap_err().to_string();
        assert!(
            e.contains("more than 256 files") || e.contains("nested more than"),
            "{e}"
        );
    }

    #[test]
    fn unsupported_directives_name_file_line_column() {
        let e = err(
            "unsup",
            &stream("  upstream u { server 10.0.0.1:1; }\n  resolver 8.8.8.8;"),
        );
        assert!(e.ends_with("nginx.conf:3:3: unsupported directive \"resolver\" in stream (supported: upstream, server, include, proxy_timeout, proxy_connect_timeout, proxy_next_upstream, proxy_next_upstream_tries, proxy_next_upstream_timeout)"), "{e}");
        let e = err(
            "unsup-up",
            &stream("upstream u {\n server 10.0.0.1:1;\n keepalive 4;\n}"),
        );
        assert!(
            e.contains("nginx.conf:4:2: unsupported directive \"keepalive\" in upstream"),
            "{e}"
        );
        let e = err(
            "param",
            &stream("upstream u { server 10.0.0.1:1 slow_start=5s; }"),
        );
        assert!(
            e.contains(":2:32: invalid parameter \"slow_start=5s\""),
            "{e}"
        );
        let e = err(
            "hashkey",
            &stream("upstream u { hash $request_id; server 10.0.0.1:1; }"),
        );
        assert!(e.contains(":2:19: hash key \"$request_id\""), "{e}");
        let e = err("var", &stream("server { listen 1; proxy_pass $up; }"));
        assert!(e.contains(":2:31: variables in proxy_pass"), "{e}");
        let e = err("noup", &stream("server { listen 1; proxy_pass nowhere; }"));
        assert!(e.contains(":2:31: no upstream named \"nowhere\""), "{e}");
        let e = err("nopass", &stream("server { listen 1; }"));
        assert!(e.contains(":2:1: server {} has no proxy_pass"), "{e}");
        let e = err("nolisten", &stream("server { proxy_pass 10.0.0.1:1; }"));
        assert!(e.contains("no \"listen\""), "{e}");
        let e = err("port", &stream("upstream u { server 10.0.0.1; }"));
        assert!(e.contains(":2:21: no port in upstream server"), "{e}");
        let e = err("time", &stream("proxy_timeout 10parsecs;"));
        assert!(e.contains(":2:15: invalid time \"10parsecs\""), "{e}");
        let e = err("dup", &stream("proxy_timeout 1s;\nproxy_timeout 2s;"));
        assert!(
            e.contains(":3:1: \"proxy_timeout\" directive is duplicate"),
            "{e}"
        );
        let e = err(
            "dupup",
            &stream("upstream u { server 10.0.0.1:1; }\nupstream u { server 10.0.0.2:1; }"),
        );
        assert!(e.contains(":3:10: duplicate upstream \"u\""), "{e}");
        let e = err(
            "duplisten",
            &stream("server { listen 7; listen 0.0.0.0:7; proxy_pass 10.0.0.1:1; }"),
        );
        assert!(e.contains("duplicate listen 0.0.0.0:7"), "{e}");
        let e = err("empty", &stream("upstream u { least_conn; }"));
        assert!(e.contains("no servers are inside upstream"), "{e}");
        let e = err(
            "dupaddr",
            &stream("upstream u { server 10.0.0.1:1; server 10.0.0.1:1; }"),
        );
        assert!(e.contains("listed more than once"), "{e}");
        let e = err("host", &stream("upstream u { server nowhere.invalid:1; }"));
        assert!(e.contains("host not found: \"nowhere.invalid:1\""), "{e}");
        assert!(err("nostream", "events {}\n").contains("no stream {} block"));
        assert!(err("twostreams", "stream {}\nstream {}\n")
            .contains(":2:1: \"stream\" directive is duplicate"));
        let e = err(
            "nested",
            &stream("server { listen 1; proxy_pass 10.0.0.1:1; stream {} }"),
        );
        assert!(
            e.contains("unsupported directive \"stream\" in server"),
            "{e}"
        );
    }

    #[test]
    fn tokenizer_follows_nginx() {
        // Quotes, escapes, comments, `}` and `#` inside words, `${` variables.
        let c = parse(
            "lex",
            "# comment ; { }\nstream{upstream \"u\\\"q\"{server '10.0.0.1:1';}\n\
             server { listen 9;# trailing\n proxy_pass u\\\"q; }\n\
             upstream a#b}c { server 10.0.0.2:2; }\n\
             upstream x${y}z { server 10.0.0.3:3; }\n\
             server { listen 10; proxy_pass a#b}c; }\n\
             server { listen 11; proxy_pass \"x${y}z\"; }}",
        );
        // `${` makes proxy_pass a variable, which is refused: the tokenizer kept it one word.
        let e = c.unwrap_err().to_string();
        assert!(
            e.contains("nginx.conf:8:32: variables in proxy_pass"),
            "{e}"
        );

        let c = parse(
            "lex2",
            "stream{upstream \"u\\\"q\"{server '10.0.0.1:1';}\n\
             server { listen 9;# trailing\n proxy_pass u\\\"q; }\n\
             upstream a#b}c { server 10.0.0.2:2; }\n\
             server { listen 10; proxy_pass a#b}c; }\n\
             server { listen \"1\\1\"; proxy_pass 10.0.0.1:1; }}",
        );
        let e = c.unwrap_err().to_string();
        // `"1\1"` keeps its backslash (only \" \' \\ \t \r \n are escapes): not a port.
        assert!(
            e.contains("nginx.conf:6:17: invalid listen \"1\\1\""),
            "{e}"
        );

        let c = parse(
            "lex3",
            "stream{upstream \"u\\\"q\"{server '10.0.0.1:1';}\n\
             server { listen 9;# trailing\n proxy_pass u\\\"q; }\n\
             upstream a#b}c { server 10.0.0.2:2; }\n\
             server { listen 10; proxy_pass a#b}c; }}",
        )
        .unwrap();
        let names: Vec<_> = c.listeners.iter().map(|l| l.name.as_str()).collect();
        assert_eq!(names, ["u\"q-9", "a#b}c-10"]);

        assert_eq!(
            unescape(br#"a\"b\'c\\d\te\rf\ng\;h\"#),
            "a\"b'c\\d\te\rf\ng\\;h\\"
        );
    }

    #[test]
    fn tokenizer_errors_have_positions() {
        let cases: &[(&str, &str)] = &[
            (
                "stream { server { listen 1 }\n",
                "1:28: unexpected \"}\" (\"listen\" at 1:19 is missing its \";\")",
            ),
            (
                "stream {\n  proxy_timeout 1s",
                "2:19: unexpected end of file, expecting \";\" or \"}\"",
            ),
            (
                "stream {\n",
                "2:1: unexpected end of file, expecting \"}\" (to close the block opened at 1:8)",
            ),
            ("}\n", "1:1: unexpected \"}\" (no block is open)"),
            (";", "1:1: unexpected \";\""),
            ("  {", "1:3: unexpected \"{\""),
            (
                "user \"nginx;\n",
                "1:6: unexpected end of file: the double quote opened here",
            ),
            (
                "user 'ngi\\'nx;",
                "1:6: unexpected end of file: the single quote opened here",
            ),
            ("user \"a\"b;", "1:9: unexpected 'b' after a quoted string"),
            ("user \"a\"};", "1:9: unexpected '}' after a quoted string"),
            (
                "stream { upstream u { server 10.0.0.1:1; }",
                "1:43: unexpected end of file, expecting \"}\"",
            ),
        ];
        for (i, (text, want)) in cases.iter().enumerate() {
            let e = err(&format!("lexerr{i}"), text);
            assert!(e.contains(&format!("nginx.conf:{want}")), "{text:?}: {e}");
        }
        let deep = "a{".repeat(100);
        assert!(err("deep", &deep).contains("nested more than"));
    }

    #[test]
    fn no_panic_on_any_input() {
        // Every prefix and a set of byte mutations of a real config: errors, never panics.
        let base = std::fs::read_to_string(Path::new(FIXTURES).join("wazuh-docker.conf")).unwrap();
        let specials = [
            "\"", "'", "\\", "{", "}", ";", "#", "$", "${", "\n", "é", "\0", " ",
        ];
        let s = Scratch::new("fuzz", &[]);
        std::fs::create_dir_all(&s.0).unwrap();
        let path = s.main();
        let run = |text: &str| {
            std::fs::write(&path, text).unwrap();
            let _ = load_with(&path, &test_resolve);
        };
        for cut in (0..=base.len()).filter(|&i| base.is_char_boundary(i)) {
            run(&base[..cut]);
        }
        for at in (0..base.len())
            .step_by(7)
            .filter(|&i| base.is_char_boundary(i))
        {
            for sp in specials {
                run(&format!("{}{sp}{}", &base[..at], &base[at..]));
            }
        }
        let e = {
            std::fs::write(&path, [0xff, 0xfe, b';']).unwrap();
            load_with(&path, &test_resolve).unwrap_err().to_string()
        };
        assert!(e.contains("not UTF-8"), "{e}");
    }

    #[test]
    fn load_uses_the_system_resolver() {
        // IP addresses never reach the resolver; "localhost" does.
        let e = load(&Path::new(FIXTURES).join("unsupported.conf"))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("unsupported.conf:8:9: unsupported directive"),
            "{e}"
        );
        assert!(system_resolve("localhost", 1514)
            .unwrap()
            .iter()
            .all(|a| a.ip().is_loopback() && a.port() == 1514));
    }

    #[test]
    fn times_follow_nginx_units() {
        let ms = |s: &str| parse_time(s).map(|d| d.as_millis());
        assert_eq!(ms("10"), Some(10_000));
        assert_eq!(ms("10s"), Some(10_000));
        assert_eq!(ms("500ms"), Some(500));
        assert_eq!(ms("1m"), Some(60_000));
        assert_eq!(ms("1h 30m"), Some(5_400_000));
        assert_eq!(ms("1h30m5s"), Some(5_405_000));
        assert_eq!(ms("1d"), Some(86_400_000));
        assert_eq!(ms("1w"), Some(604_800_000));
        assert_eq!(ms("1M"), Some(2_592_000_000));
        assert_eq!(ms("1y"), Some(31_536_000_000));
        assert_eq!(ms("0"), Some(0));
        for bad in [
            "",
            " ",
            "s",
            "1x",
            "1s 1m",
            "1m1m",
            "-1s",
            "1.5s",
            "99999999999999999999s",
            "1y1y",
        ] {
            assert_eq!(ms(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn listen_proxy_protocol_on_the_1515_server_goes_to_its_listener() {
        // 1515 is imported as kind = "tcp" (TLS passes through to the managers' authd), so the
        // header is read by that listener, with or without nginx's `ssl` flag.
        for flags in ["ssl proxy_protocol", "proxy_protocol"] {
            let text = format!(
                "stream {{ upstream e {{ server 10.0.0.1:1515; }}\n\
                 server {{ listen 1515 {flags}; set_real_ip_from 10.1.0.0/16; proxy_pass e; }} }}\n"
            );
            let c = parse_str(&text, "test.conf", &test_resolve).unwrap();
            let l = &c.listeners[0];
            assert_eq!((l.kind, l.listen), (ListenerKind::Tcp, sa("0.0.0.0:1515")));
            assert_eq!(
                l.agent.proxy_protocol,
                Some(ProxyProtocol {
                    trusted: vec!["10.1.0.0/16".parse().unwrap()]
                }),
                "{flags}"
            );
            let toml = Config::parse(&c.to_toml(), "effective").unwrap();
            assert_eq!(
                toml.listeners[0].agent.proxy_protocol,
                l.agent.proxy_protocol
            );
        }
    }

    #[test]
    fn globs_match_like_glob3() {
        let m = |p: &str, n: &str| glob_match(p.as_bytes(), n.as_bytes());
        assert!(m("*.conf", "a.conf") && !m("*.conf", ".a.conf") && m(".*", ".a"));
        assert!(m("a?c", "abc") && !m("a?c", "ac"));
        assert!(m("[a-c]x", "bx") && !m("[!a-c]x", "bx") && m("[^a-c]x", "dx"));
        assert!(m("[]]", "]") && m("*a*b*", "xxaybzb") && !m("*a*b", "xxaybzbc"));
        assert!(m("\\*", "*") && !m("\\*", "a"));
        assert!(!m("[abc", "a") && m("[abc", "[abc"));
        assert!(m("**", "") && m("*", "anything"));
    }
}
