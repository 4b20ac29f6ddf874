//! `wazuh-proxy` reading an nginx configuration: `check-config --nginx FILE` prints the
//! effective configuration (or the error with its file:line), `run --nginx-config FILE` runs it.

use std::path::{Path, PathBuf};

use wazuh_proxy_test_support::{bin, free_addr, ProxyProcess};

const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/nginx");

/// Whether `wazuh-proxy SUBCOMMAND --help` lists `flag`. The nginx input is a flag of `run`
/// and `check-config`; a binary built without it skips these tests loudly.
fn has_flag(subcommand: &str, flag: &str) -> bool {
    let out = bin().args([subcommand, "--help"]).output().unwrap();
    let has = String::from_utf8_lossy(&out.stdout).contains(flag);
    if !has {
        eprintln!("SKIPPED: `wazuh-proxy {subcommand}` has no {flag} flag in this build");
    }
    has
}

/// A copy of a fixture in a scratch directory, with `edit` applied to its text.
struct Copy {
    dir: PathBuf,
    file: PathBuf,
}

impl Copy {
    fn new(tag: &str, fixture: &str, edit: impl Fn(String) -> String) -> Copy {
        let dir =
            std::env::temp_dir().join(format!("wazuh-proxy-nginx-it-{}-{tag}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let text = std::fs::read_to_string(Path::new(FIXTURES).join(fixture)).unwrap();
        let file = dir.join("nginx.conf");
        std::fs::write(&file, edit(text)).unwrap();
        Copy { dir, file }
    }

    fn path(&self) -> &str {
        self.file.to_str().unwrap()
    }
}

impl Drop for Copy {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// wazuh-docker's manager names resolve only inside its compose network: the copy names
/// loopback addresses instead, so the test does not depend on DNS.
fn on_loopback(text: String) -> String {
    text.replace("wazuh.master", "127.0.0.2")
        .replace("wazuh.worker", "127.0.0.3")
}

#[test]
fn check_config_reads_the_wazuh_docker_stream_block() {
    if !has_flag("check-config", "--nginx") {
        return;
    }
    let conf = Copy::new("check", "wazuh-docker.conf", on_loopback);
    let out = bin()
        .args(["check-config", "--nginx", conf.path()])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let text = String::from_utf8(out.stdout).unwrap();
    for want in [
        "name = \"mycluster-1514\"",
        "listen = \"0.0.0.0:1514\"",
        "kind = \"agent\"",
        "balance = \"source\"",
        "address = \"127.0.0.2:1514\"",
        "address = \"127.0.0.3:1514\"",
    ] {
        assert!(text.contains(want), "no {want:?} in:\n{text}");
    }
    assert_eq!(text.matches("[[listener]]").count(), 1, "{text}");
}

#[test]
fn errors_name_file_and_line() {
    if !has_flag("check-config", "--nginx") || !has_flag("run", "--nginx-config") {
        return;
    }
    let fixture = Path::new(FIXTURES).join("unsupported.conf");
    for args in [
        vec!["check-config", "--nginx"],
        vec!["run", "--nginx-config"],
    ] {
        let out = bin().args(&args).arg(&fixture).output().unwrap();
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("unsupported.conf:8:9: unsupported directive \"proxy_buffer_size\""),
            "{args:?}: {err}"
        );
    }
}

#[test]
fn run_listens_where_the_nginx_config_says() {
    if !has_flag("run", "--nginx-config") {
        return;
    }
    let listen = free_addr();
    let conf = Copy::new("run", "wazuh-docker.conf", |t| {
        on_loopback(t).replace("listen 1514;", &format!("listen {listen};"))
    });
    let mut args = vec!["run", "--nginx-config", conf.path()];
    // Builds with an admin API listen on a fixed port by default: keep tests off it.
    if has_flag("run", "--admin") {
        args.extend(["--admin", "none"]);
    }
    let mut proxy = ProxyProcess::start(&args, listen);
    proxy.signal("TERM");
    let status = proxy.wait_exit(10).expect("the proxy exits on SIGTERM");
    assert!(status.success(), "{}", proxy.logs());
    let logs = proxy.logs();
    assert!(logs.contains("skipping the http {} block"), "{logs}");
}
