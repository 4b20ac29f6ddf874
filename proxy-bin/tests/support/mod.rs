//! Shared helpers for the binary's tests: start `wazuh-proxy`, signal it, wait for it.
#![allow(dead_code)]

pub mod wazuh;

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// The binary under test.
pub fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_wazuh-proxy"))
}

/// A loopback address with a port that was free a moment ago.
pub fn free_addr() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap()
}

/// A running `wazuh-proxy`, killed on drop; its log goes to a temp file.
pub struct ProxyProcess {
    pub child: Child,
    pub log: PathBuf,
}

impl ProxyProcess {
    /// Starts `wazuh-proxy` with `args` and waits until `ready` accepts connections.
    pub fn start(args: &[&str], ready: SocketAddr) -> ProxyProcess {
        // Tests that do not talk to the admin API leave its default port alone, so several
        // proxies can run at once.
        let mut args: Vec<&str> = args.to_vec();
        if args.first() == Some(&"run") && !args.contains(&"--admin") {
            args.extend(["--admin", "none"]);
        }
        let mut cmd = bin();
        cmd.args(&args);
        Self::start_command(cmd, ready)
    }

    /// Starts `cmd` (a `wazuh-proxy run`, however launched) and waits until `ready` accepts.
    pub fn start_command(mut cmd: Command, ready: SocketAddr) -> ProxyProcess {
        let log = std::env::temp_dir().join(format!(
            "wazuh-proxy-test-{}-{}.log",
            std::process::id(),
            ready.port()
        ));
        let file = std::fs::File::create(&log).unwrap();
        let child = cmd
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(file)
            .spawn()
            .unwrap();
        let p = ProxyProcess { child, log };
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(ready).is_err() {
            assert!(
                Instant::now() < deadline,
                "proxy did not start listening; log:\n{}",
                p.logs()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        p
    }

    pub fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(self.child.id().to_string())
            .status()
            .unwrap();
        assert!(ok.success());
    }

    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits up to `secs` for the process to exit.
    pub fn wait_exit(&mut self, secs: u64) -> Option<ExitStatus> {
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return Some(status);
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for ProxyProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.log);
    }
}

/// Kills a process by pid when dropped, however the test ends (the successor of an upgrade,
/// which the test did not spawn itself).
pub struct KillOnDrop(pub u32);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .arg("-KILL")
            .arg(self.0.to_string())
            .status();
    }
}

/// The pid of the successor an upgrade started, from the old process's log.
pub fn successor_pid(old_logs: &str) -> Option<u32> {
    old_logs
        .lines()
        .find(|l| l.contains("new process started"))
        .and_then(|l| l.split("pid=").nth(1))
        .and_then(|p| p.split_whitespace().next())
        .and_then(|p| p.parse().ok())
}

/// A plain HTTP/1.0 GET (or POST) to the admin API: (status, body).
pub fn http(method: &str, addr: SocketAddr, path: &str) -> (u16, String) {
    http_request(method, addr, path).unwrap()
}

/// Loud notice for a test that cannot run here; a failure when CI=true (CI provides it).
pub fn skip_or_fail_in_ci(why: &str) {
    let ci = std::env::var("CI").is_ok_and(|v| v == "true");
    eprintln!("\n!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!");
    eprintln!("!!! SKIPPED: {why}");
    eprintln!("!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!\n");
    assert!(
        !ci,
        "CI=true and this test's prerequisite is missing: {why}"
    );
}

/// A plain HTTP/1.1 GET (the admin API); the status code and the body, or the error.
pub fn http_get(addr: SocketAddr, path: &str) -> Result<(u16, String), String> {
    http_request("GET", addr, path)
}

/// One HTTP/1.1 request with an empty body to the admin API: the status code and the body.
pub fn http_request(method: &str, addr: SocketAddr, path: &str) -> Result<(u16, String), String> {
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5))
        .map_err(|e| format!("connect {addr}: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .map_err(|e| e.to_string())?;
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    );
    s.write_all(req.as_bytes()).map_err(|e| e.to_string())?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).map_err(|e| e.to_string())?;
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| format!("no HTTP header in {text:?}"))?;
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| format!("no status in {head:?}"))?;
    Ok((status, body.to_owned()))
}
