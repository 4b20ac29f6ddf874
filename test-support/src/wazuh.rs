//! The real Wazuh daemons (`wazuh-remoted`, `wazuh-authd`, `wazuh-db`, `wazuh-agentd`,
//! `agent-auth`), built by `../shared/peers/build-wazuh.sh` under `$WAZUH_BUILD` (default
//! `/tmp/wazuh-build`), laid out per test.
//!
//! Each test gets its own lab directory holding copies of the built manager and agent installs,
//! each with its own ports, agent name and `client.keys`, so tests run in parallel. The daemons
//! find their home from `/proc/self/exe` and only use paths under it (remoted and wazuh-db chroot
//! into it), so a copy is a full, independent instance. Every process started here is in its
//! own process group and is stopped when its owner is dropped, panics included.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::hash::{BuildHasher, Hasher};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use crate::skip::skipped;
use crate::wait::wait_until;

/// Where the built daemons are.
#[derive(Debug, Clone)]
pub struct Build {
    root: PathBuf,
}

impl Build {
    /// The built tree, or `None` after a loud SKIPPED line when it is absent. Fails instead when
    /// `CI=true`: CI builds the daemons before the tests run.
    pub fn find(test: &str) -> Option<Build> {
        let root = std::env::var_os("WAZUH_BUILD")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("/tmp/wazuh-build"));
        let needed = [
            "manager/bin/wazuh-remoted",
            "manager/bin/wazuh-authd",
            "manager/bin/wazuh-db",
            "manager/bin/manage_agents",
            "agent/bin/wazuh-agentd",
            "agent/bin/agent-auth",
            "bin/mq-sink.py",
            "bin/agent-inject.py",
            "bin/wdb-query.py",
        ];
        let missing: Vec<&str> = needed
            .iter()
            .copied()
            .filter(|p| !root.join(p).exists())
            .collect();
        if missing.is_empty() {
            return Some(Build { root });
        }
        let why = format!(
            "the real Wazuh daemons are not built under {} (missing {}); build them with \
             `bash ../shared/peers/build-wazuh.sh` (or set WAZUH_BUILD)",
            root.display(),
            missing.join(", ")
        );
        if std::env::var("CI").is_ok_and(|v| v == "true") {
            panic!("{test}: {why}; CI=true, so this is a failure, not a skip");
        }
        skipped(&format!("{test}: {why}"));
        None
    }

    fn helper(&self, name: &str) -> PathBuf {
        self.root.join("bin").join(name)
    }
}

static LABS: AtomicUsize = AtomicUsize::new(0);

/// A per-test directory under the temp dir; removed on drop unless the test failed (then its
/// path is printed, with every daemon's log in it).
pub struct Lab {
    pub dir: PathBuf,
    build: Build,
}

impl Lab {
    pub fn new(build: &Build) -> Lab {
        // Short: Unix socket paths under it must stay below 108 bytes.
        let dir = std::env::temp_dir().join(format!(
            "wpp-{}-{}",
            std::process::id(),
            LABS.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Lab {
            dir,
            build: build.clone(),
        }
    }

    pub fn build(&self) -> &Build {
        &self.build
    }

    /// Copies an install (`manager` or `agent`) to `<lab>/<name>`.
    fn copy(&self, what: &str, name: &str) -> PathBuf {
        let home = self.dir.join(name);
        let ok = Command::new("cp")
            .arg("-a")
            .arg(self.build.root.join(what))
            .arg(&home)
            .status()
            .unwrap();
        assert!(ok.success(), "cp -a {what} {}", home.display());
        // Nothing of a previous run: sockets, counters, databases.
        for sub in ["queue/sockets", "queue/rids", "queue/db", "var/run"] {
            let d = home.join(sub);
            if let Ok(entries) = std::fs::read_dir(&d) {
                for e in entries.flatten() {
                    let _ = std::fs::remove_file(e.path());
                }
            }
        }
        home
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("lab kept for inspection: {}", self.dir.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// One `client.keys` entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Key {
    pub id: String,
    pub name: String,
    pub key: String,
}

impl Key {
    /// Agent `id` (e.g. "001") named `name`, any source address, a fresh random key.
    pub fn new(id: &str, name: &str) -> Key {
        // 32 random bytes in hex, as manage_agents writes them (not for anything but tests).
        let mut key = String::new();
        for i in 0..4u64 {
            let mut h = std::collections::hash_map::RandomState::new().build_hasher();
            h.write_u64(i);
            let _ = write!(key, "{:016x}", h.finish());
        }
        Key {
            id: id.to_owned(),
            name: name.to_owned(),
            key,
        }
    }

    pub fn line(&self) -> String {
        format!("{} {} any {}", self.id, self.name, self.key)
    }
}

/// The `client.keys` lines of a file, without removed (`!`/`#`) entries.
pub fn key_lines(file: &Path) -> Vec<String> {
    read_lossy(file)
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .filter(|l| {
            let mut f = l.split_whitespace();
            let _id = f.next();
            !f.next()
                .is_some_and(|n| n.starts_with('!') || n.starts_with('#'))
        })
        .map(str::to_owned)
        .collect()
}

/// A daemon in its own process group: TERM then KILL to the group on drop. The group, not the
/// first process, is the daemon: wazuh-remoted forks its listener and the parent returns.
pub struct Daemon {
    pub name: String,
    child: Child,
}

/// Live (not zombie) processes of process group `pgid`, from /proc.
pub fn group_members(pgid: u32) -> Vec<u32> {
    let mut pids = Vec::new();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let stat = read_lossy(e.path().join("stat"));
        // "pid (comm) state ppid pgrp ...": comm may hold anything, so read after its ')'.
        let Some((_, rest)) = stat.rsplit_once(')') else {
            continue;
        };
        let f: Vec<&str> = rest.split_whitespace().collect();
        if f.len() > 2 && f[0] != "Z" && f[2] == pgid.to_string() {
            pids.push(pid);
        }
    }
    pids
}

impl Daemon {
    fn spawn(name: &str, cmd: &mut Command, log: &Path) -> Daemon {
        let out = std::fs::File::create(log).unwrap();
        let err = out.try_clone().unwrap();
        let child = cmd
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .process_group(0)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name}: {e}"));
        Daemon {
            name: name.to_owned(),
            child,
        }
    }

    pub fn pgid(&self) -> u32 {
        self.child.id()
    }

    /// Whether any process of its group still runs (the first one reaped if it exited).
    pub fn alive(&mut self) -> bool {
        let _ = self.child.try_wait();
        !group_members(self.pgid()).is_empty()
    }

    /// Sends `sig` to its process group.
    pub fn signal(&self, sig: &str) {
        let _ = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg("--")
            .arg(format!("-{}", self.pgid()))
            .stderr(Stdio::null())
            .status();
    }

    /// TERM, up to 3 s to exit, then KILL; reaped either way.
    pub fn stop(mut self) {
        self.stop_now();
    }

    fn stop_now(&mut self) {
        // The group is not reused while any process is in it: signalling it is safe while the
        // first process is not reaped, or while it is seen alive.
        if !matches!(self.child.try_wait(), Ok(Some(_))) || self.alive() {
            self.signal("TERM");
            if !wait_until(Duration::from_secs(3), || !self.alive()) {
                self.signal("KILL");
                wait_until(Duration::from_secs(3), || !self.alive());
            }
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.stop_now();
    }
}

/// Whether some socket listens on TCP `port` (any address), read from /proc so that checking
/// opens no connection to the daemon.
pub fn tcp_listening(port: u16) -> bool {
    let want = format!(":{port:04X}");
    ["/proc/net/tcp", "/proc/net/tcp6"].iter().any(|f| {
        read_lossy(f).lines().any(|l| {
            let mut cols = l.split_whitespace();
            let local = cols.nth(1).unwrap_or("");
            let state = cols.nth(1).unwrap_or("");
            local.ends_with(&want) && state == "0A"
        })
    })
}

/// A file's text, empty when absent; datagrams in mq.out end with a NUL, logs may hold
/// anything an agent sent.
pub fn read_lossy(path: impl AsRef<Path>) -> String {
    std::fs::read(path)
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default()
}

static PORTS: AtomicUsize = AtomicUsize::new(0);

/// A TCP port free on every address, chosen below the kernel's ephemeral range when there is
/// room: authd binds 0.0.0.0, which fails while any loopback connection (the proxy's, the
/// agents') uses the port as its local port, and those are taken from the ephemeral range.
pub fn free_port() -> u16 {
    let low = read_lossy("/proc/sys/net/ipv4/ip_local_port_range")
        .split_whitespace()
        .next()
        .and_then(|p| p.parse::<usize>().ok())
        .unwrap_or(32768);
    if low > 12_000 {
        let span = low - 10_000;
        // Spread by process so that parallel test binaries rarely try the same ports.
        let base = std::process::id() as usize * 97;
        for _ in 0..span {
            let n = PORTS.fetch_add(1, Ordering::Relaxed);
            let port = (10_000 + (base + n * 7) % span) as u16;
            if std::net::TcpListener::bind(("0.0.0.0", port)).is_ok() {
                return port;
            }
        }
    }
    crate::process::free_addr().port()
}

/// A loopback address with a port from [`free_port`].
pub fn free_loopback() -> std::net::SocketAddr {
    std::net::SocketAddr::from(([127, 0, 0, 1], free_port()))
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// A real manager: the analysisd queue stand-in (`mq-sink.py`, writing `mq.out`), `wazuh-db`,
/// `wazuh-remoted` and, when enabled, `wazuh-authd`, from a copy of the built manager.
pub struct Manager {
    pub name: String,
    pub home: PathBuf,
    pub remoted_port: u16,
    pub authd_port: u16,
    pub with_authd: bool,
    /// remoted's `<protocol>`: `tcp` (default), `udp` or `tcp,udp` (one port for both).
    protocol: String,
    lab: PathBuf,
    build: Build,
    daemons: Vec<Daemon>,
}

impl Manager {
    /// Lays out `<lab>/<name>` with its own ports and these keys; nothing is started.
    pub fn new(lab: &Lab, name: &str, keys: &[Key]) -> Manager {
        let home = lab.copy("manager", name);
        let m = Manager {
            name: name.to_owned(),
            home,
            remoted_port: free_port(),
            authd_port: free_port(),
            with_authd: false,
            protocol: "tcp".to_owned(),
            lab: lab.dir.clone(),
            build: lab.build.clone(),
            daemons: Vec::new(),
        };
        m.write_conf();
        let lines: String = keys.iter().map(|k| k.line() + "\n").collect();
        std::fs::write(m.home.join("etc/client.keys"), lines).unwrap();
        m
    }

    /// Also run `wazuh-authd` (enrollment) when started.
    pub fn with_authd(mut self) -> Manager {
        self.with_authd = true;
        self
    }

    /// remoted listens with `protocol` (`udp` or `tcp,udp`) on its port.
    pub fn with_protocol(mut self, protocol: &str) -> Manager {
        self.protocol = protocol.to_owned();
        self.write_conf();
        self
    }

    pub fn remoted_addr(&self) -> String {
        format!("127.0.0.1:{}", self.remoted_port)
    }

    pub fn authd_addr(&self) -> String {
        format!("127.0.0.1:{}", self.authd_port)
    }

    /// The settings of build-wazuh.sh's manager, with this instance's ports.
    fn write_conf(&self) {
        let conf = format!(
            r#"<ossec_config>
  <global>
    <jsonout_output>yes</jsonout_output>
    <alerts_log>yes</alerts_log>
    <logall>no</logall>
    <logall_json>no</logall_json>
  </global>
  <remote>
    <connection>secure</connection>
    <port>{remoted}</port>
    <protocol>{protocol}</protocol>
    <local_ip>127.0.0.1</local_ip>
    <queue_size>131072</queue_size>
  </remote>
  <auth>
    <disabled>no</disabled>
    <port>{authd}</port>
    <use_source_ip>no</use_source_ip>
    <purge>yes</purge>
    <use_password>no</use_password>
    <ciphers>HIGH:!ADH:!EXP:!MD5:!RC4:!3DES:!CAMELLIA:@STRENGTH</ciphers>
    <ssl_verify_host>no</ssl_verify_host>
    <ssl_manager_cert>etc/sslmanager.cert</ssl_manager_cert>
    <ssl_manager_key>etc/sslmanager.key</ssl_manager_key>
    <ssl_auto_negotiate>no</ssl_auto_negotiate>
  </auth>
  <cluster>
    <name>wazuh</name>
    <node_name>{name}</node_name>
    <node_type>master</node_type>
    <key></key>
    <port>1516</port>
    <bind_addr>127.0.0.1</bind_addr>
    <nodes>
        <node>127.0.0.1</node>
    </nodes>
    <hidden>no</hidden>
    <disabled>yes</disabled>
  </cluster>
  <logging>
    <log_format>plain</log_format>
  </logging>
</ossec_config>
"#,
            remoted = self.remoted_port,
            authd = self.authd_port,
            name = self.name,
            protocol = self.protocol,
        );
        std::fs::write(self.home.join("etc/ossec.conf"), conf).unwrap();
    }

    fn out(&self, daemon: &str) -> PathBuf {
        self.lab.join(format!("{}.{daemon}.out", self.name))
    }

    /// What the manager handed to analysisd: one line per event.
    pub fn mq_out(&self) -> PathBuf {
        self.lab.join(format!("{}.mq.out", self.name))
    }

    pub fn events(&self) -> String {
        read_lossy(self.mq_out())
    }

    pub fn remoted_log(&self) -> String {
        read_lossy(self.out("wazuh-remoted"))
    }

    pub fn authd_log(&self) -> String {
        read_lossy(self.out("wazuh-authd"))
    }

    pub fn client_keys(&self) -> Vec<String> {
        key_lines(&self.home.join("etc/client.keys"))
    }

    /// Starts the daemons in the order they need each other; retries twice when remoted (or
    /// authd) does not come up, which happens now and then right after another remoted on a
    /// recently used port ("Unable to Bind port").
    pub fn start(&mut self) {
        let mut why = String::new();
        for attempt in 1..=3 {
            match self.try_start() {
                Ok(()) => return,
                Err(e) => {
                    eprintln!("{}: start attempt {attempt} failed: {e}", self.name);
                    why = e;
                    self.stop();
                    // A port that would not bind is given a new one.
                    self.remoted_port = free_port();
                    self.authd_port = free_port();
                    self.write_conf();
                    std::thread::sleep(Duration::from_millis(500));
                }
            }
        }
        panic!("{}: the real manager did not start: {why}", self.name);
    }

    fn try_start(&mut self) -> Result<(), String> {
        let sock = self.home.join("queue/sockets/queue");
        let _ = std::fs::remove_file(&sock);
        let _ = std::fs::remove_file(self.home.join("queue/db/wdb"));
        let mut sink = Command::new("python3");
        sink.arg(self.build.helper("mq-sink.py"))
            .arg(&self.home)
            .arg(self.mq_out());
        self.daemons
            .push(Daemon::spawn("mq-sink", &mut sink, &self.out("mq-sink")));
        if !wait_until(Duration::from_secs(10), || sock.exists()) {
            return Err("the analysisd queue stand-in did not bind".into());
        }
        let mut wdb = Command::new(self.home.join("bin/wazuh-db"));
        wdb.args(["-f", "-d"]).current_dir(&self.home);
        self.daemons
            .push(Daemon::spawn("wazuh-db", &mut wdb, &self.out("wazuh-db")));
        let wdb_sock = self.home.join("queue/db/wdb");
        if !wait_until(Duration::from_secs(10), || wdb_sock.exists()) {
            return Err(format!(
                "wazuh-db did not start:\n{}",
                tail(&read_lossy(self.out("wazuh-db")), 5)
            ));
        }
        // wazuh-modulesd (not built) normally creates the groups found in etc/shared; retried
        // while wazuh-db is still opening its database.
        let group_ok = wait_until(Duration::from_secs(10), || {
            Command::new("python3")
                .arg(self.build.helper("wdb-query.py"))
                .arg(&self.home)
                .arg("global insert-agent-group default")
                .output()
                .is_ok_and(|o| o.status.success())
        });
        if !group_ok {
            return Err("wazuh-db did not answer".into());
        }
        let mut remoted = Command::new(self.home.join("bin/wazuh-remoted"));
        remoted.args(["-f", "-d"]).current_dir(&self.home);
        self.daemons.push(Daemon::spawn(
            "wazuh-remoted",
            &mut remoted,
            &self.out("wazuh-remoted"),
        ));
        self.wait_listening("wazuh-remoted", self.remoted_port)?;
        if self.with_authd {
            let mut authd = Command::new(self.home.join("bin/wazuh-authd"));
            authd.args(["-f", "-d"]).current_dir(&self.home);
            self.daemons.push(Daemon::spawn(
                "wazuh-authd",
                &mut authd,
                &self.out("wazuh-authd"),
            ));
            self.wait_listening("wazuh-authd", self.authd_port)?;
        }
        Ok(())
    }

    /// Waits for `daemon` to listen on `port`: at most 15 s, less when it says it cannot bind.
    /// Its processes are not watched here: remoted's parent exits as soon as it has forked.
    fn wait_listening(&mut self, daemon: &str, port: u16) -> Result<(), String> {
        let deadline = Instant::now() + Duration::from_secs(15);
        let why = loop {
            if tcp_listening(port) {
                return Ok(());
            }
            if read_lossy(self.out(daemon)).contains("Unable to Bind port") {
                break "it could not bind";
            }
            if Instant::now() >= deadline {
                break "timed out after 15 s";
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        Err(format!(
            "{daemon} is not listening on {port} ({why}):\n{}",
            tail(&read_lossy(self.out(daemon)), 5)
        ))
    }

    /// TERM then KILL, every daemon, last started first.
    pub fn stop(&mut self) {
        while let Some(d) = self.daemons.pop() {
            d.stop();
        }
    }

    /// SIGKILL to every daemon at once, remoted first: the manager host's processes die (the
    /// kernel still closes their sockets).
    pub fn kill(&mut self) {
        for name in ["wazuh-remoted", "wazuh-authd", "wazuh-db", "mq-sink"] {
            for d in self.daemons.iter().filter(|d| d.name == name) {
                d.signal("KILL");
            }
        }
        self.stop();
    }

    /// `manage_agents -r ID` on this manager.
    pub fn remove_agent(&self, id: &str) {
        let out = Command::new(self.home.join("bin/manage_agents"))
            .args(["-r", id])
            .current_dir(&self.home)
            .stdin(Stdio::null())
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && text.contains(&format!("Agent '{id}' removed")),
            "manage_agents -r {id} on {}: {text}",
            self.name
        );
    }

    /// How many times remoted has (re)loaded client.keys.
    pub fn key_reloads(&self) -> usize {
        self.remoted_log()
            .matches("Key reloading completed")
            .count()
    }
}

impl Drop for Manager {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A real agent: `wazuh-agentd` from a copy of the built agent, connecting to `server_port`.
pub struct Agent {
    pub name: String,
    pub home: PathBuf,
    lab: PathBuf,
    build: Build,
    daemon: Option<Daemon>,
}

impl Agent {
    /// Lays out `<lab>/<name>` with the agent name `name`, connecting to 127.0.0.1:`server_port`
    /// and enrolling (when `key` is `None` and `enroll_port` is set) at 127.0.0.1:`enroll_port`.
    pub fn new(
        lab: &Lab,
        name: &str,
        key: Option<&Key>,
        server_port: u16,
        enroll_port: Option<u16>,
    ) -> Agent {
        let home = lab.copy("agent", name);
        let conf = format!(
            r#"<ossec_config>
  <client>
    <server>
      <address>127.0.0.1</address>
      <port>{server_port}</port>
      <protocol>tcp</protocol>
    </server>
    <crypto_method>aes</crypto_method>
    <notify_time>10</notify_time>
    <time-reconnect>60</time-reconnect>
    <auto_restart>no</auto_restart>
    <enrollment>
      <enabled>{enabled}</enabled>
      <manager_address>127.0.0.1</manager_address>
      <port>{enroll}</port>
      <agent_name>{name}</agent_name>
    </enrollment>
  </client>
  <client_buffer>
    <disabled>no</disabled>
    <queue_size>5000</queue_size>
    <events_per_second>500</events_per_second>
  </client_buffer>
  <logging>
    <log_format>plain</log_format>
  </logging>
</ossec_config>
"#,
            enabled = if enroll_port.is_some() { "yes" } else { "no" },
            enroll = enroll_port.unwrap_or(1515),
        );
        std::fs::write(home.join("etc/ossec.conf"), conf).unwrap();
        let keys = key.map(|k| k.line() + "\n").unwrap_or_default();
        std::fs::write(home.join("etc/client.keys"), keys).unwrap();
        let _ = std::fs::write(home.join("logs/ossec.log"), "");
        Agent {
            name: name.to_owned(),
            home,
            lab: lab.dir.clone(),
            build: lab.build.clone(),
            daemon: None,
        }
    }

    pub fn start(&mut self) {
        assert!(self.daemon.is_none(), "{} already started", self.name);
        let mut cmd = Command::new(self.home.join("bin/wazuh-agentd"));
        cmd.args(["-f", "-d"]).current_dir(&self.home);
        let log = self.lab.join(format!("{}.agentd.out", self.name));
        self.daemon = Some(Daemon::spawn("wazuh-agentd", &mut cmd, &log));
    }

    pub fn stop(&mut self) {
        if let Some(d) = self.daemon.take() {
            d.stop();
        }
    }

    /// Its ossec.log.
    pub fn log(&self) -> String {
        read_lossy(self.home.join("logs/ossec.log"))
    }

    /// How many connections to the server it has completed (each one logs (4102)).
    pub fn connections(&self) -> usize {
        self.log()
            .matches("(4102): Connected to the server")
            .count()
    }

    /// How many times it noticed it had lost its server.
    pub fn disconnections(&self) -> usize {
        let log = self.log();
        log.matches("(1137): Lost connection with manager").count()
            + log.matches("Closing connection to server").count()
    }

    /// Waits until it has completed `n` connections; panics with its log after `timeout`.
    pub fn wait_connected(&self, n: usize, timeout: Duration) {
        if !wait_until(timeout, || self.connections() >= n) {
            panic!(
                "{} did not connect within {timeout:?}; ossec.log:\n{}",
                self.name,
                tail(&self.log(), 30)
            );
        }
    }

    pub fn client_keys(&self) -> Vec<String> {
        key_lines(&self.home.join("etc/client.keys"))
    }

    /// Starts feeding `count` events at `eps` per second into its queue, as logcollector would;
    /// each reads "`tag` Message number: N". Wait for it with [`Injection::wait`].
    pub fn inject(&self, count: usize, eps: u32, tag: &str) -> Injection {
        let child = Command::new("python3")
            .arg(self.build.helper("agent-inject.py"))
            .arg(&self.home)
            .arg(count.to_string())
            .arg(eps.to_string())
            .arg(tag)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .spawn()
            .unwrap();
        Injection {
            agent: self.name.clone(),
            count,
            child: Some(child),
        }
    }

    /// `agent-auth` from this agent's home against 127.0.0.1:`port`, enrolling this agent's
    /// name; returns (success, output).
    pub fn agent_auth(&self, port: u16) -> (bool, String) {
        let mut cmd = Command::new(self.home.join("bin/agent-auth"));
        cmd.args(["-m", "127.0.0.1", "-p", &port.to_string(), "-A", &self.name])
            .current_dir(&self.home)
            .stdin(Stdio::null())
            .process_group(0);
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        // agent-auth gives up by itself; bounded here too.
        let ended = wait_until(Duration::from_secs(60), || {
            !matches!(child.try_wait(), Ok(None))
        });
        if !ended {
            let _ = child.kill();
        }
        let out = child.wait_with_output().unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (ended && out.status.success(), text)
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A running `agent-inject.py`.
pub struct Injection {
    agent: String,
    pub count: usize,
    child: Option<Child>,
}

impl Injection {
    /// Waits (bounded) until every event was handed to the agent.
    pub fn wait(mut self, timeout: Duration) {
        let mut child = self.child.take().unwrap();
        let done = wait_until(timeout, || !matches!(child.try_wait(), Ok(None)));
        if !done {
            let _ = child.kill();
        }
        let out = child.wait_with_output().unwrap();
        assert!(
            done && out.status.success(),
            "injecting {} events into {} failed or took longer than {timeout:?}: {}{}",
            self.count,
            self.agent,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

impl Drop for Injection {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// The event numbers of agent `id` tagged `tag` in an `mq.out` text, with how often each came.
pub fn event_numbers(mq: &str, id: &str, tag: &str) -> BTreeMap<u64, usize> {
    let agent = format!(":[{id}] (");
    let marker = format!(":{tag} Message number: ");
    let mut seen = BTreeMap::new();
    for line in mq.lines().filter(|l| l.contains(&agent)) {
        if let Some((_, n)) = line.split_once(&marker) {
            if let Ok(n) = n
                .trim_matches(|c: char| c == '\0' || c.is_whitespace())
                .parse::<u64>()
            {
                *seen.entry(n).or_insert(0) += 1;
            }
        }
    }
    seen
}

/// Injected versus delivered, for one agent and tag, over one or more managers' mq.out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Delivery {
    pub injected: usize,
    pub delivered: usize,
    pub lost: usize,
    pub duplicated: usize,
}

impl Delivery {
    pub fn count(mqs: &[String], id: &str, tag: &str, injected: usize) -> Delivery {
        let mut all: BTreeMap<u64, usize> = BTreeMap::new();
        for mq in mqs {
            for (n, c) in event_numbers(mq, id, tag) {
                *all.entry(n).or_insert(0) += c;
            }
        }
        let distinct = (1..=injected as u64)
            .filter(|n| all.contains_key(n))
            .count();
        Delivery {
            injected,
            delivered: all.values().sum(),
            lost: injected - distinct,
            duplicated: all.values().map(|c| c - 1).sum(),
        }
    }
}

impl std::fmt::Display for Delivery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "injected {}, delivered {}, lost {}, duplicated {}",
            self.injected, self.delivered, self.lost, self.duplicated
        )
    }
}

/// Packets to and from a TCP port on loopback dropped by iptables (no FIN, no RST: the peer
/// looks alive and silent); the rules are removed on drop.
pub struct Blackhole {
    rules: Vec<Vec<String>>,
}

impl Blackhole {
    /// Whether iptables can be used here; the reason when not.
    pub fn available() -> Result<(), String> {
        match Command::new("iptables")
            .args(["-w", "-S", "INPUT"])
            .output()
        {
            Ok(o) if o.status.success() => Ok(()),
            Ok(o) => Err(format!(
                "iptables -S INPUT failed: {}",
                String::from_utf8_lossy(&o.stderr).trim()
            )),
            Err(e) => Err(format!(
                "iptables not found ({e}); apt-get install iptables"
            )),
        }
    }

    pub fn port(port: u16) -> Blackhole {
        let p = port.to_string();
        let comment = format!("wazuh-proxy-test-{}", std::process::id());
        let mut rules = Vec::new();
        for dir in ["--dport", "--sport"] {
            let rule: Vec<String> = [
                "INPUT",
                "-i",
                "lo",
                "-p",
                "tcp",
                dir,
                &p,
                "-m",
                "comment",
                "--comment",
                &comment,
                "-j",
                "DROP",
            ]
            .iter()
            .map(|s| s.to_string())
            .collect();
            let out = Command::new("iptables")
                .args(["-w", "-I"])
                .args(&rule)
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "iptables -I {}: {}",
                rule.join(" "),
                String::from_utf8_lossy(&out.stderr)
            );
            rules.push(rule);
        }
        Blackhole { rules }
    }
}

impl Drop for Blackhole {
    fn drop(&mut self) {
        for rule in self.rules.drain(..) {
            let _ = Command::new("iptables")
                .args(["-w", "-D"])
                .args(&rule)
                .status();
        }
    }
}
