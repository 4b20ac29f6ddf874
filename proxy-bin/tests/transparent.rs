//! `source = "transparent"` across real routing: an agent, the proxy and a manager in three
//! network namespaces.
//!
//! ```text
//!  agent ns            proxy ns                          manager ns
//!  198.18.10.2 ---- 198.18.10.1 | 198.18.20.1 ---------- 198.18.20.2:1514
//!  (default via        wazuh-proxy: :1514 transparent,   (default via 198.18.20.1)
//!   198.18.10.1)                    :1516 proxy (default)
//! ```
//!
//! The manager answers the agents' address (198.18.10.2) through the proxy namespace, which
//! delivers those replies locally (policy routing, no iptables, no forwarding) so that they
//! reach the proxy's transparent socket. The manager and the agents are small python3
//! programs run with `ip netns exec`. Needs root (or CAP_SYS_ADMIN and CAP_NET_ADMIN), the
//! `ip` tool and python3; skipped with a message otherwise.

use std::io::{BufRead, BufReader, Read};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

const AGENT_IP: &str = "198.18.10.2";
const PROXY_AGENT_SIDE: &str = "198.18.10.1";
const PROXY_MANAGER_SIDE: &str = "198.18.20.1";
const MANAGER_IP: &str = "198.18.20.2";
const TRANSPARENT_PORT: u16 = 1514;
const DEFAULT_PORT: u16 = 1516;

/// The stand-in manager: prints `ready`, then for each connection reads one frame, prints
/// `peer ADDRESS agent ID`, and answers one frame naming the agent.
const MANAGER: &str = r##"
import socket, struct, sys, threading
def read(c, n):
    b = b""
    while len(b) < n:
        d = c.recv(n - len(b))
        if not d:
            raise EOFError("closed")
        b += d
    return b
def serve(c, peer):
    c.settimeout(20)
    try:
        body = read(c, struct.unpack("<I", read(c, 4))[0])
        ident = body.split(b"!")[1].decode() if body.startswith(b"!") else "-"
        print("peer %s agent %s" % (peer[0], ident), flush=True)
        reply = b"#AES:reply-to-" + ident.encode()
        c.sendall(struct.pack("<I", len(reply)) + reply)
        while c.recv(4096):
            pass
    except Exception as e:
        print("error %s %s" % (peer[0], e), flush=True)
    finally:
        c.close()
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], int(sys.argv[2])))
s.listen(16)
print("ready", flush=True)
while True:
    c, peer = s.accept()
    threading.Thread(target=serve, args=(c, peer), daemon=True).start()
"##;

/// An agent: connects (retrying while the proxy starts), sends one frame with an `!ID!`
/// prefix, prints `reply PAYLOAD`.
const AGENT: &str = r##"
import socket, struct, sys, time
host, port, ident = sys.argv[1], int(sys.argv[2]), sys.argv[3]
deadline = time.monotonic() + 10
while True:
    try:
        s = socket.create_connection((host, port), timeout=2)
        break
    except OSError as e:
        if time.monotonic() > deadline:
            print("connect failed: %s" % e, flush=True)
            sys.exit(2)
        time.sleep(0.05)
s.settimeout(10)
hello = b"!" + ident.encode() + b"!#AES:0123456789abcdef"
s.sendall(struct.pack("<I", len(hello)) + hello)
def read(n):
    b = b""
    while len(b) < n:
        d = s.recv(n - len(b))
        if not d:
            print("closed after %r" % b, flush=True)
            sys.exit(3)
        b += d
    return b
body = read(struct.unpack("<I", read(4))[0])
print("reply " + body.decode(errors="replace"), flush=True)
"##;

/// Runs `ip ARGS`, returning its complaint on failure.
fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run ip: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// The three namespaces, deleted on drop (also when the test fails).
struct Namespaces {
    agent: String,
    proxy: String,
    manager: String,
}

impl Namespaces {
    /// Unique per run, so that concurrent runs do not collide.
    fn names() -> Namespaces {
        let id = std::process::id();
        Namespaces {
            agent: format!("wptr-agent-{id}"),
            proxy: format!("wptr-proxy-{id}"),
            manager: format!("wptr-mgr-{id}"),
        }
    }

    fn all(&self) -> [&str; 3] {
        [&self.agent, &self.proxy, &self.manager]
    }

    /// Creates and wires the namespaces. Any failure is reported as a reason to skip.
    fn create(&self) -> Result<(), String> {
        for ns in self.all() {
            // A leftover of a killed run with the same pid.
            let _ = ip(&["netns", "del", ns]);
            ip(&["netns", "add", ns])?;
        }
        let (a, p, m) = (
            self.agent.as_str(),
            self.proxy.as_str(),
            self.manager.as_str(),
        );
        // Each veth pair is created directly in its namespaces: no names in the host's.
        ip(&[
            "-n", a, "link", "add", "eth0", "type", "veth", "peer", "name", "to-agent", "netns", p,
        ])?;
        ip(&[
            "-n", m, "link", "add", "eth0", "type", "veth", "peer", "name", "to-mgr", "netns", p,
        ])?;
        let agent_addr = format!("{AGENT_IP}/24");
        let proxy_a = format!("{PROXY_AGENT_SIDE}/24");
        let proxy_m = format!("{PROXY_MANAGER_SIDE}/24");
        let manager_addr = format!("{MANAGER_IP}/24");
        ip(&["-n", a, "addr", "add", &agent_addr, "dev", "eth0"])?;
        ip(&["-n", p, "addr", "add", &proxy_a, "dev", "to-agent"])?;
        ip(&["-n", p, "addr", "add", &proxy_m, "dev", "to-mgr"])?;
        ip(&["-n", m, "addr", "add", &manager_addr, "dev", "eth0"])?;
        for (ns, dev) in [(a, "eth0"), (p, "to-agent"), (p, "to-mgr"), (m, "eth0")] {
            ip(&["-n", ns, "link", "set", dev, "up"])?;
        }
        for ns in self.all() {
            ip(&["-n", ns, "link", "set", "lo", "up"])?;
        }
        ip(&["-n", a, "route", "add", "default", "via", PROXY_AGENT_SIDE])?;
        // The manager routes the agents' subnet back through the proxy.
        ip(&[
            "-n",
            m,
            "route",
            "add",
            "default",
            "via",
            PROXY_MANAGER_SIDE,
        ])?;
        // Replies to agents' addresses coming from the managers' side are delivered on this
        // host, where the transparent socket takes them. Forwarding stays off (the default
        // in a new namespace): the proxy terminates both connections.
        ip(&["-n", p, "rule", "add", "iif", "to-mgr", "lookup", "100"])?;
        ip(&[
            "-n",
            p,
            "route",
            "add",
            "local",
            "198.18.10.0/24",
            "dev",
            "lo",
            "table",
            "100",
        ])?;
        Ok(())
    }
}

impl Drop for Namespaces {
    fn drop(&mut self) {
        for ns in self.all() {
            let _ = ip(&["netns", "del", ns]);
        }
    }
}

/// A child process, killed and reaped on drop.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts `cmd` in namespace `ns` with its stdout piped.
fn spawn_in(ns: &str, cmd: &[&str]) -> Proc {
    let child = Command::new("ip")
        .args(["netns", "exec", ns])
        .args(cmd)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    Proc(child)
}

/// Lines of a child's stdout, read by a thread.
fn lines_of(p: &mut Proc) -> mpsc::Receiver<String> {
    let out = p.0.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

/// Why the test cannot run here, if it cannot.
fn missing_prerequisite() -> Option<String> {
    let root = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .map(|u| u.split_whitespace().nth(1) == Some("0"))
        })
        .unwrap_or(false);
    if !root {
        return Some("not running as root".into());
    }
    if Command::new("ip").arg("-V").output().is_err() {
        return Some("no `ip` binary (iproute2)".into());
    }
    match Command::new("python3").args(["-c", "pass"]).output() {
        Ok(o) if o.status.success() => None,
        _ => Some("no python3".into()),
    }
}

fn skip(why: &str) {
    wazuh_proxy_test_support::skipped(&format!(
        "transparent source test: {why}; it needs network namespaces (root, iproute2, python3)"
    ));
}

/// Runs an agent to completion (at most 20 s) and returns its output.
fn run_agent(ns: &str, port: u16, id: &str) -> String {
    let port = port.to_string();
    let mut agent = spawn_in(
        ns,
        &["python3", "-u", "-c", AGENT, PROXY_AGENT_SIDE, &port, id],
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    while agent.0.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            return format!("agent {id} did not finish within 20 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut out = String::new();
    agent
        .0
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut out)
        .unwrap();
    out
}

/// A temp file removed on drop.
struct TempFile(PathBuf);

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

#[test]
fn managers_see_the_agents_address_only_in_transparent_mode() {
    if let Some(why) = missing_prerequisite() {
        return skip(&why);
    }
    let net = Namespaces::names();
    if let Err(why) = net.create() {
        return skip(&why);
    }

    let mut manager = spawn_in(
        &net.manager,
        &["python3", "-u", "-c", MANAGER, MANAGER_IP, "1514"],
    );
    let seen = lines_of(&mut manager);
    assert_eq!(
        seen.recv_timeout(Duration::from_secs(10)).as_deref(),
        Ok("ready"),
        "the stand-in manager did not start"
    );

    let id = std::process::id();
    let config = TempFile(std::env::temp_dir().join(format!("wptr-{id}.toml")));
    let log = TempFile(std::env::temp_dir().join(format!("wptr-{id}.log")));
    std::fs::write(
        &config.0,
        format!(
            r#"admin = "none"

[[listener]]
name = "transparent"
listen = "{PROXY_AGENT_SIDE}:{TRANSPARENT_PORT}"
source = "transparent"
health_check_interval = "0s"
backends = [{{ address = "{MANAGER_IP}:1514" }}]

[[listener]]
name = "default"
listen = "{PROXY_AGENT_SIDE}:{DEFAULT_PORT}"
health_check_interval = "0s"
backends = [{{ address = "{MANAGER_IP}:1514" }}]
"#
        ),
    )
    .unwrap();
    let proxy = Proc(
        Command::new("ip")
            .args(["netns", "exec", &net.proxy])
            .arg(env!("CARGO_BIN_EXE_wazuh-proxy"))
            .args(["run", "--config"])
            .arg(&config.0)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log.0).unwrap())
            .spawn()
            .unwrap(),
    );
    let proxy_log = || std::fs::read_to_string(&log.0).unwrap_or_default();

    // The agents retry until the proxy listens.
    let transparent = run_agent(&net.agent, TRANSPARENT_PORT, "001");
    let default = run_agent(&net.agent, DEFAULT_PORT, "002");

    let mut peers = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while peers.len() < 2 {
        let left = deadline.saturating_duration_since(Instant::now());
        match seen.recv_timeout(left) {
            Ok(line) => peers.push(line),
            Err(_) => break,
        }
    }
    let report = format!(
        "manager saw: {peers:?}\nagent 001: {transparent}\nagent 002: {default}\nproxy log:\n{}",
        proxy_log()
    );
    assert!(
        peers.contains(&format!("peer {AGENT_IP} agent 001")),
        "transparent: the manager must see the agent's address\n{report}"
    );
    assert!(
        peers.contains(&format!("peer {PROXY_MANAGER_SIDE} agent 002")),
        "default: the manager must see the proxy's address\n{report}"
    );
    assert_eq!(
        transparent.trim(),
        "reply #AES:reply-to-001",
        "transparent: the manager's answer must reach the agent\n{report}"
    );
    assert_eq!(
        default.trim(),
        "reply #AES:reply-to-002",
        "default: the manager's answer must reach the agent\n{report}"
    );
    assert!(
        !proxy_log().contains("CAP_NET_ADMIN"),
        "running as root, no capability warning\n{report}"
    );
    drop(proxy);
    drop(manager);
}
