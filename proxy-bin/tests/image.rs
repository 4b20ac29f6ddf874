//! The container image's binary, run the way the image runs it: inside the image's file system
//! (chroot) as the image's user, with nothing else there. Containers cannot be started on the
//! machines that run these tests, so this is the closest check of the image that can run:
//! `deploy/image/build.sh` builds the static binary and the image (with podman) and lays out
//! its root file system; `WAZUH_PROXY_ROOTFS` names it. Needs root (chroot).

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use wazuh_proxy_test_support::{free_addr, http, skip_or_fail_in_ci, ProxyProcess};

fn rootfs() -> Option<(PathBuf, String)> {
    let Some(root) = std::env::var_os("WAZUH_PROXY_ROOTFS").map(PathBuf::from) else {
        skip_or_fail_in_ci(
            "WAZUH_PROXY_ROOTFS is not set: run deploy/image/build.sh and point it at its output",
        );
        return None;
    };
    if !nix_is_root() {
        skip_or_fail_in_ci("the image test needs root (chroot)");
        return None;
    }
    let mut user_file = root.clone().into_os_string();
    user_file.push(".user");
    let user = std::fs::read_to_string(user_file)
        .expect("build.sh writes the image's user next to the root file system")
        .trim()
        .to_owned();
    assert!(
        !user.is_empty() && !user.starts_with('0'),
        "image user {user:?}"
    );
    Some((root, user))
}

fn nix_is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(1) == Some("0"))
}

fn in_image(root: &PathBuf, user: &str, args: &[&str]) -> Command {
    let mut c = Command::new("chroot");
    c.arg(format!("--userspec={user}"))
        .arg(root)
        .arg("/usr/local/bin/wazuh-proxy")
        .args(args);
    c
}

fn status_field(pid: u32, field: &str) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix(field).map(|v| v.trim().to_owned()))
        .unwrap()
}

#[test]
fn the_image_binary_serves_as_the_image_user_with_no_capability() {
    let Some((root, user)) = rootfs() else { return };
    let out = in_image(&root, &user, &["--version"]).output().unwrap();
    assert!(out.status.success(), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("wazuh-proxy "));

    // A manager stand-in that accepts (the active health check only connects).
    let manager = TcpListener::bind("127.0.0.1:0").unwrap();
    let manager_addr = manager.local_addr().unwrap();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for s in manager.incoming().take(64).flatten() {
            held.push(s);
        }
    });
    let (listen, admin) = (free_addr(), free_addr());
    let config = format!(
        "log_format = \"json\"\nadmin = \"{admin}\"\n[[listener]]\nname = \"agents\"\nlisten = \"{listen}\"\nhealth_check_interval = \"1s\"\nbackends = [{{ address = \"{manager_addr}\" }}]\n"
    );
    std::fs::create_dir_all(root.join("etc/wazuh-proxy")).unwrap();
    std::fs::write(root.join("etc/wazuh-proxy/proxy.toml"), config).unwrap();
    let check = in_image(
        &root,
        &user,
        &["check-config", "/etc/wazuh-proxy/proxy.toml"],
    )
    .output()
    .unwrap();
    assert!(check.status.success(), "{check:?}");

    // The image's default command.
    let cmd = in_image(
        &root,
        &user,
        &["run", "--config", "/etc/wazuh-proxy/proxy.toml"],
    );
    let mut proxy = ProxyProcess::start_command(cmd, listen);
    // chroot execs the proxy: the child's PID is the proxy's.
    let pid = proxy.child.id();
    let uid = status_field(pid, "Uid:");
    let want = user.split(':').next().unwrap();
    assert!(
        uid.split_whitespace().all(|u| u == want),
        "uids {uid}, want {want}"
    );
    assert_eq!(status_field(pid, "CapEff:"), "0000000000000000");
    assert_eq!(status_field(pid, "CapPrm:"), "0000000000000000");

    assert_eq!(http("GET", admin, "/live").0, 200);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (status, body) = http("GET", admin, "/health");
        if status == 200 {
            break;
        }
        assert!(Instant::now() < deadline, "{status} {body}");
        std::thread::sleep(Duration::from_millis(100));
    }
    proxy.signal("TERM");
    let status = proxy.wait_exit(40).expect("exits after SIGTERM");
    assert!(status.success(), "{status:?}\n{}", proxy.logs());
    // The log is JSON, line by line, as configured.
    for line in proxy.logs().lines() {
        let v: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"));
        assert!(
            v["level"].is_string() && v["timestamp"].is_string(),
            "{line}"
        );
    }
}
