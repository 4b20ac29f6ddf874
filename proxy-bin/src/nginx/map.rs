//! The mapping of `stream`, `upstream` and `server` blocks to listeners and backends.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use wazuh_proxy_core::balance::{BackendConfig, Balancer, Policy};

use crate::config::{ConfigError, Listener, ListenerKind, ListenerSpec, ProxyProtocolKeys};
use wazuh_proxy_core::proxy_protocol::{Cidr, ProxyProtocol};

use super::lexer::*;
use super::loader::*;
use super::*;

impl Loader<'_> {
    pub(super) fn stream(
        &mut self,
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
                            && (o.kind() == ListenerKind::Udp) == (kind == ListenerKind::Udp)
                    }) {
                        return Err(self.err(l.pos, format!("duplicate listen {addr}")));
                    }
                    if kind == ListenerKind::Agent {
                        tracing::info!(
                            "nginx: {name} on {addr} carries Wazuh agents (frame-aware); balance stays {policy} as configured"
                        );
                    }
                    let trusted = lst.proxy_protocol.then(|| {
                        let from = if s.real_ip_from.is_empty() {
                            &real_ip_from
                        } else {
                            &s.real_ip_from
                        };
                        proxy_protocol_from(&name, addr, from)
                    });
                    // The defaults of this kind, as the TOML reader gives them, with what
                    // nginx sets.
                    let spec = spec_of(kind, &proxy, trusted)
                        .ok_or_else(|| self.err(l.pos, "no listener of this kind in nginx"))?;
                    let l = Listener::new(name, addr, policy, backends.clone(), spec);
                    listeners.push(l);
                }
            }
        }
        Ok(listeners)
    }

    /// Directives that do not change where traffic goes: skipped with a notice.
    pub(super) fn harmless(&self, d: &Directive) -> bool {
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

    pub(super) fn upstream(&mut self, d: Directive) -> Result<Upstream, ConfigError> {
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

    pub(super) fn upstream_server(&self, s: &Directive) -> Result<Vec<BackendConfig>, ConfigError> {
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

    pub(super) fn server(&mut self, d: Directive) -> Result<Server, ConfigError> {
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

    pub(super) fn listen(&self, d: &Directive) -> Result<Listen, ConfigError> {
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
    pub(super) fn real_ip_from(&self, d: &Directive) -> Result<Cidr, ConfigError> {
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
    pub(super) fn proxy_setting(&self, p: &mut Proxy, d: &Directive) -> Result<bool, ConfigError> {
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
}

pub(super) struct Upstream {
    pub(super) name: String,
    pub(super) pos: Pos,
    pub(super) policy: Policy,
    pub(super) backends: Vec<BackendConfig>,
}

/// The settings of a `kind` listener: its defaults, with nginx's `proxy_timeout` (the idle
/// timeout; 0 turns it off), `proxy_connect_timeout` and `listen ... proxy_protocol` where
/// the kind has them. `None` for enroll listeners, which nginx never gives.
pub(super) fn spec_of(
    kind: ListenerKind,
    proxy: &Proxy,
    trusted: Option<ProxyProtocol>,
) -> Option<ListenerSpec> {
    let idle = proxy.idle.map(|t| (!t.is_zero()).then_some(t));
    let mut spec = kind.default_spec()?;
    match &mut spec {
        ListenerSpec::Agent(a) => {
            a.idle_timeout = idle.unwrap_or(a.idle_timeout);
            a.connect_timeout = proxy.connect.unwrap_or(a.connect_timeout);
            a.proxy_protocol = ProxyProtocolKeys(trusted);
        }
        ListenerSpec::Udp(u) => u.idle_timeout = idle.unwrap_or(u.idle_timeout),
        ListenerSpec::Tcp(t) => {
            t.idle_timeout = idle.unwrap_or(t.idle_timeout);
            t.connect_timeout = proxy.connect.unwrap_or(t.connect_timeout);
            t.proxy_protocol = ProxyProtocolKeys(trusted);
        }
        ListenerSpec::Enroll(_) => return None,
    }
    Some(spec)
}

/// `listen ... proxy_protocol`: the header is read from the `set_real_ip_from` networks; with
/// none, from anyone, as nginx does (with a warning: any client can then claim any address).
pub(super) fn proxy_protocol_from(name: &str, addr: SocketAddr, from: &[Cidr]) -> ProxyProtocol {
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

pub(super) struct Listen {
    pub(super) addrs: Vec<SocketAddr>,
    pub(super) port: u16,
    pub(super) udp: bool,
    pub(super) proxy_protocol: bool,
    pub(super) pos: Pos,
}

pub(super) struct Server {
    pub(super) pos: Pos,
    pub(super) listens: Vec<Listen>,
    pub(super) proxy_pass: Option<Word>,
    pub(super) proxy: Proxy,
    /// `set_real_ip_from` of this server (replaces the stream's, as in nginx).
    pub(super) real_ip_from: Vec<Cidr>,
}

/// The `proxy_*` settings of one level (stream or server); unset ones inherit.
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct Proxy {
    pub(super) idle: Option<Duration>,
    pub(super) connect: Option<Duration>,
    pub(super) next_upstream: Option<bool>,
    pub(super) tries: Option<u32>,
    pub(super) next_timeout: Option<Duration>,
}

impl Proxy {
    pub(super) fn or(self, outer: &Proxy) -> Proxy {
        Proxy {
            idle: self.idle.or(outer.idle),
            connect: self.connect.or(outer.connect),
            next_upstream: self.next_upstream.or(outer.next_upstream),
            tries: self.tries.or(outer.tries),
            next_timeout: self.next_timeout.or(outer.next_timeout),
        }
    }
}

pub(super) fn parse_u32(s: &str) -> Option<u32> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

pub(super) fn parse_port(s: &str) -> Option<u16> {
    parse_u32(s)
        .and_then(|p| u16::try_from(p).ok())
        .filter(|&p| p != 0)
}

/// `host:port` or `[v6]:port`; `None` without a valid port.
pub(super) fn split_host_port(s: &str) -> Option<(&str, u16)> {
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
pub(super) fn parse_time(s: &str) -> Option<Duration> {
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
