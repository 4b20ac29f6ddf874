//! The `wazuh-proxy` binary as a child process: started, signalled, waited for, killed on drop.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// The `wazuh-proxy` executable: `$WAZUH_PROXY_BIN`, else the one Cargo built beside the
/// running test (`target/<profile>/wazuh-proxy`; Cargo builds a package's binaries before its
/// integration tests).
pub fn bin_path() -> PathBuf {
    if let Some(p) = std::env::var_os("WAZUH_PROXY_BIN") {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().unwrap();
    let dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("the test executable lives in target/<profile>/deps");
    let path = dir.join(format!("wazuh-proxy{}", std::env::consts::EXE_SUFFIX));
    assert!(
        path.exists(),
        "{} is not built: run the tests of the wazuh-proxy package, or set WAZUH_PROXY_BIN",
        path.display()
    );
    path
}

/// A command running the binary under test.
pub fn bin() -> Command {
    Command::new(bin_path())
}

/// Runs a CLI command to its end: (exit code, -1 when killed by a signal; stdout; stderr).
pub fn cli(args: &[&str]) -> (i32, String, String) {
    let out = bin().args(args).output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Runs a CLI command to its end: whether it succeeded, and its stdout and stderr together.
pub fn cli_ok(args: &[&str]) -> (bool, String) {
    let (code, out, err) = cli(args);
    (code == 0, format!("{out}{err}"))
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
    /// Starts `wazuh-proxy` with `args` and waits until `ready` accepts connections; `run`
    /// without `--admin` gets `--admin none`.
    pub fn start(args: &[&str], ready: SocketAddr) -> ProxyProcess {
        // Tests that do not talk to the admin API leave its default port alone, so several
        // proxies can run at once.
        let mut args: Vec<&str> = args.to_vec();
        if args.first() == Some(&"run") && !args.contains(&"--admin") {
            args.extend(["--admin", "none"]);
        }
        let mut cmd = bin();
        cmd.args(&args);
        let p = Self::start_command(cmd, ready);
        // The admin API binds after the listeners: a test that reads it right away must not
        // race it.
        let admin = args
            .iter()
            .position(|a| *a == "--admin")
            .and_then(|i| args.get(i + 1))
            .and_then(|a| a.parse::<SocketAddr>().ok());
        if let Some(admin) = admin {
            p.wait_accepting(admin);
        }
        p
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
        p.wait_accepting(ready);
        p
    }

    /// The process ID.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Descriptors the process has open now.
    pub fn open_descriptors(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.pid()))
            .map(|d| d.count())
            .unwrap_or(0)
    }

    /// Leaves the process no room for a new descriptor: its soft limit becomes its lowest
    /// free descriptor number (a new descriptor takes the lowest free number, and must be
    /// below the limit).
    pub fn allow_no_new_descriptor(&self) {
        let open: std::collections::HashSet<usize> =
            std::fs::read_dir(format!("/proc/{}/fd", self.pid()))
                .map(|d| {
                    d.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
                        .collect()
                })
                .unwrap_or_default();
        let lowest_free = (0..).find(|n| !open.contains(n)).unwrap_or(0);
        self.limit_descriptors(lowest_free);
    }

    /// Sets the process's soft limit of open descriptors (`RLIMIT_NOFILE`) while it runs, with
    /// `prlimit`; the hard limit stays.
    pub fn limit_descriptors(&self, soft: usize) {
        let hard = std::fs::read_to_string(format!("/proc/{}/limits", self.pid()))
            .ok()
            .and_then(|l| {
                l.lines()
                    .find(|l| l.starts_with("Max open files"))
                    .and_then(|l| l.split_whitespace().nth(4).map(str::to_owned))
            })
            .unwrap_or_else(|| "unlimited".to_owned());
        let ok = Command::new("prlimit")
            .args([
                "--pid",
                &self.pid().to_string(),
                &format!("--nofile={soft}:{hard}"),
            ])
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        assert!(ok, "prlimit --nofile={soft}:{hard} failed");
    }

    /// Waits up to 10 s until `addr` accepts connections; panics with the log otherwise.
    pub fn wait_accepting(&self, addr: SocketAddr) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(addr).is_err() {
            assert!(
                Instant::now() < deadline,
                "proxy did not start listening on {addr}; log:\n{}",
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
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
