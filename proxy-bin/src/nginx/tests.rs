//! Tests of the nginx reader.

use std::net::Ipv4Addr;
use std::time::Duration;

use wazuh_proxy_core::balance::{BackendConfig, Policy};
use wazuh_proxy_core::proxy_protocol::ProxyProtocol;

use super::map::parse_time;
use super::*;
use crate::config::{ListenerKind, DEFAULT_DRAIN};
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
        let dir =
            std::env::temp_dir().join(format!("wazuh-proxy-nginx-{}-{tag}", std::process::id()));
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
    assert_eq!((l.kind(), l.balance), (ListenerKind::Agent, Policy::Source));
    let addrs: Vec<_> = l.backends.iter().map(|b| b.addr).collect();
    assert_eq!(addrs, [sa("127.0.0.2:1514"), sa("127.0.0.3:1514")]);
    assert!(l.backends.iter().all(|b| *b == BackendConfig::new(b.addr)));
    let d = AgentRelayConfig::default();
    assert_eq!(l.spec.idle_timeout(), d.idle_timeout);
    assert_eq!(l.spec.connect_timeout(), Some(d.connect_timeout));
    // Same result as the equivalent TOML.
    let toml = Config::parse(&c.to_toml(), "effective").unwrap();
    assert_eq!(toml.to_toml(), c.to_toml());
}

/// Settings nginx has no word for take the defaults of each listener's kind, the same ones
/// the TOML reader gives: no health probe on udp (managers may have nothing on TCP) and
/// automatic rebalancing on agent listeners only.
#[test]
fn settings_nginx_lacks_take_the_defaults_of_the_kind() {
    let c = parse(
        "kinds.conf",
        &stream(
            "server { listen 1514; listen 127.0.0.1:1514 udp; proxy_pass 10.0.0.1:1514; }\n\
             server { listen 55000; proxy_pass 10.0.0.1:55000; }",
        ),
    )
    .unwrap();
    let toml = Config::parse(
        "[[listener]]\nlisten = \"127.0.0.1:1\"\nkind = \"agent\"\nbackends = [{ address = \"10.0.0.1:1514\" }]\n\
         [[listener]]\nlisten = \"127.0.0.1:2\"\nkind = \"udp\"\nbackends = [{ address = \"10.0.0.1:1514\" }]\n\
         [[listener]]\nlisten = \"127.0.0.1:3\"\nkind = \"tcp\"\nbackends = [{ address = \"10.0.0.1:55000\" }]\n",
        "kinds.toml",
    )
    .unwrap();
    let kinds: Vec<_> = c.listeners.iter().map(|l| l.kind()).collect();
    assert_eq!(
        kinds,
        [ListenerKind::Agent, ListenerKind::Udp, ListenerKind::Tcp]
    );
    for (n, t) in c.listeners.iter().zip(&toml.listeners) {
        assert_eq!(n.kind(), t.kind());
        assert_eq!(n.health, t.health, "{:?}", n.kind());
        // Every setting of the kind: timeouts (udp flows expire after 2 minutes, not the
        // agent relay's 10), rebalancing on agent listeners only.
        assert_eq!(n.spec, t.spec, "{:?}", n.kind());
    }
    assert_eq!(c.listeners[1].health, None);
    assert_eq!(
        c.listeners[1].spec.idle_timeout(),
        Some(Duration::from_secs(120))
    );
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
        .map(|l| (l.name.as_str(), l.listen, l.kind(), l.balance))
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
    assert_eq!(a.spec.idle_timeout(), None);
    assert_eq!(a.spec.connect_timeout(), Some(Duration::from_secs(2)));
    let lc = &c.listeners[2];
    assert_eq!(lc.spec.connect_timeout(), Some(Duration::from_millis(500)));
    assert_eq!(lc.spec.idle_timeout(), Some(Duration::from_secs(300)));
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
        c.listeners[3].spec.idle_timeout(),
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
        c.listeners[0].spec.idle_timeout(),
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
        assert_eq!(
            (l.kind(), l.listen),
            (ListenerKind::Tcp, sa("0.0.0.0:1515"))
        );
        assert_eq!(
            l.spec.proxy_protocol().cloned(),
            Some(ProxyProtocol {
                trusted: vec!["10.1.0.0/16".parse().unwrap()]
            }),
            "{flags}"
        );
        let toml = Config::parse(&c.to_toml(), "effective").unwrap();
        assert_eq!(
            toml.listeners[0].spec.proxy_protocol(),
            l.spec.proxy_protocol()
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
