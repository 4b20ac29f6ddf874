//! Reading the files (`include` with globs, size and depth limits) and building the
//! configuration from the top-level directives.

use std::io::Read;
use std::net::{IpAddr, SocketAddr};
use std::path::{Component, Path, PathBuf};
use std::time::Duration;

use wazuh_proxy_core::balance::Policy;

use crate::config::{Config, ConfigError, DEFAULT_DRAIN};

use super::lexer::*;
use super::map::*;
use super::*;

/// The files read so far and how to resolve names.
pub(super) struct Loader<'r> {
    pub(super) files: Vec<PathBuf>,
    /// Include depth of each file in `files`.
    pub(super) depth: Vec<usize>,
    /// Where relative includes start (the main file's directory).
    pub(super) prefix: PathBuf,
    pub(super) resolve: Resolver<'r>,
    /// Whether `include` may read files ([`parse_str`] reads none).
    pub(super) read_files: bool,
}

pub(super) fn invalid_in(
    origin: &Path,
    line: usize,
    col: usize,
    message: impl Into<String>,
) -> ConfigError {
    ConfigError::Invalid {
        origin: origin.display().to_string(),
        line,
        column: col,
        message: message.into(),
    }
}

impl Loader<'_> {
    pub(super) fn err(&self, pos: Pos, message: impl Into<String>) -> ConfigError {
        let origin = self
            .files
            .get(pos.file)
            .map_or(Path::new("?"), |p| p.as_path());
        invalid_in(origin, pos.line, pos.col, message)
    }

    /// Reads and parses one file (includes are expanded later, only where they are read).
    pub(super) fn load_file(
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
    pub(super) fn expand(&mut self, dirs: Vec<Directive>) -> Result<Vec<Directive>, ConfigError> {
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

    pub(super) fn build(&mut self, top: Vec<Directive>) -> Result<Config, ConfigError> {
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
        // The quick form's proxy-wide settings, at their TOML defaults; each listener starts
        // from the defaults of its kind (`map::spec_of`): settings nginx has no word for keep
        // the TOML defaults.
        let mut config = Config::quick(
            "127.0.0.1:1514",
            &["127.0.0.1:1".to_owned()],
            Policy::RoundRobin,
        )?;
        config.listeners = self.stream(stream_pos, stream)?;
        config.drain_timeout = drain;
        Ok(config)
    }

    pub(super) fn time(&self, w: &Word) -> Result<Duration, ConfigError> {
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

    /// Addresses of `host:port`: an IP address as is, a name through the resolver.
    pub(super) fn addrs(
        &self,
        host: &str,
        port: u16,
        at: &Word,
    ) -> Result<Vec<SocketAddr>, ConfigError> {
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

pub(super) fn arg_count(l: &Loader<'_>, name: &Word) -> ConfigError {
    l.err(
        name.pos,
        format!("invalid number of arguments in \"{}\" directive", name.text),
    )
}

pub(super) fn no_args(l: &Loader<'_>, name: &Word, args: &[Word]) -> Result<(), ConfigError> {
    match args.first() {
        None => Ok(()),
        Some(a) => Err(l.err(a.pos, format!("\"{}\" takes no arguments", name.text))),
    }
}

pub(super) fn no_block(l: &Loader<'_>, d: &Directive) -> Result<(), ConfigError> {
    match d.block {
        None => Ok(()),
        Some(_) => Err(l.err(
            d.name.pos,
            format!("\"{}\" takes no {{ }} block", d.name.text),
        )),
    }
}

/// The paths matching a glob, sorted; unreadable directories match nothing (as glob(3)).
pub(super) fn glob(pattern: &Path) -> Vec<PathBuf> {
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
pub(super) fn glob_class(pat: &[u8], mut i: usize, c: u8) -> Option<(bool, usize)> {
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
pub(super) fn glob_match(pat: &[u8], name: &[u8]) -> bool {
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
pub(super) fn glob_one(pat: &[u8], p: usize, c: u8) -> Option<usize> {
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
