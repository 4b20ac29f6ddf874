//! The command line as scripts and packagers use it: exit statuses, `--pid-file`, `reload`
//! without `kill`, shell completions, the manual page, and `check-config --nginx` notices.

use std::path::Path;
use std::time::Duration;

use wazuh_proxy_test_support::{bin, cli, free_addr, temp_dir, wait_until, ProxyProcess};

#[test]
fn exit_statuses_say_what_failed() {
    let dir = temp_dir("exit");
    let good = dir.join("good.toml");
    std::fs::write(
        &good,
        "[[listener]]\nlisten = \"127.0.0.1:0\"\nbackends = [{ address = \"127.0.0.1:1\" }]\n",
    )
    .unwrap();
    let bad = dir.join("bad.toml");
    std::fs::write(
        &bad,
        "[[listener]]\nlisten = \"127.0.0.1:0\"\nbakends = []\n",
    )
    .unwrap();
    let good_s = good.to_str().unwrap();
    let bad_s = bad.to_str().unwrap();

    assert_eq!(cli(&["check-config", good_s]).0, 0);
    let (code, _, err) = cli(&["check-config", bad_s]);
    assert_eq!(code, 3, "invalid configuration: {err}");
    assert!(err.contains("bad.toml:3"), "{err}");
    let (code, _, err) = cli(&["run", "--admin", "none", "--config", bad_s]);
    assert_eq!(code, 3, "run with an invalid configuration: {err}");
    // A file that cannot be read is a runtime failure, not an invalid configuration.
    let missing = dir.join("missing.toml");
    assert_eq!(cli(&["check-config", missing.to_str().unwrap()]).0, 1);
    // Usage errors.
    assert_eq!(cli(&["check-config"]).0, 2);
    assert_eq!(cli(&["run", "--no-such-flag"]).0, 2);
    assert_eq!(cli(&["reload"]).0, 2, "reload needs a target");
    assert_eq!(cli(&["reload", "--pid", "1", "--admin", "x:1"]).0, 2);
    assert_eq!(cli(&["completions", "tcsh"]).0, 2);
    // Runtime: the listener's address is taken.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let (code, _, err) = cli(&[
        "run",
        "--admin",
        "none",
        "--listen",
        &addr,
        "--backend",
        "127.0.0.1:1",
    ]);
    assert_eq!(code, 1, "{err}");
    // Runtime: no such process, or a PID file that is not there.
    let (code, _, err) = cli(&["reload", "--pid-file", missing.to_str().unwrap()]);
    assert_eq!(code, 1, "{err}");
    // The statuses are in --help.
    let (_, out, _) = cli(&["--help"]);
    assert!(out.contains("3 invalid configuration"), "{out}");
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn pid_file_reload_by_pid_file_and_by_admin_api() {
    let dir = temp_dir("pid");
    let pid_file = dir.join("proxy.pid");
    let config = dir.join("proxy.toml");
    let listen = free_addr();
    let admin = free_addr();
    std::fs::write(
        &config,
        format!(
            "admin = \"{admin}\"\n[[listener]]\nlisten = \"{listen}\"\nbackends = [{{ address = \"127.0.0.1:1\" }}]\n"
        ),
    )
    .unwrap();
    let mut proxy = ProxyProcess::start(
        &[
            "run",
            "--config",
            config.to_str().unwrap(),
            "--pid-file",
            pid_file.to_str().unwrap(),
            "--admin",
            &admin.to_string(),
        ],
        listen,
    );
    assert!(
        wait_until(Duration::from_secs(10), || pid_file.exists()),
        "the pid file"
    );
    let written: u32 = std::fs::read_to_string(&pid_file)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert_eq!(written, proxy.child.id());

    let (code, _, err) = cli(&["reload", "--pid-file", pid_file.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    assert!(
        wait_until(Duration::from_secs(10), || {
            proxy.logs().matches("reload applied").count() == 1
        }),
        "the first reload"
    );
    let (code, out, err) = cli(&["reload", "--admin", &admin.to_string()]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("\"requested\": \"reload\""), "{out}");
    assert!(
        wait_until(Duration::from_secs(10), || {
            proxy.logs().matches("reload applied").count() == 2
        }),
        "the second reload"
    );

    proxy.signal("TERM");
    let status = proxy.wait_exit(40).expect("exits after SIGTERM");
    assert!(status.success(), "{status:?}");
    assert!(!pid_file.exists(), "the pid file is removed at exit");
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn completions_and_the_manual_page_come_from_the_command_definition() {
    for (shell, marker) in [
        ("bash", "complete -F"),
        ("zsh", "#compdef wazuh-proxy"),
        ("fish", "complete -c wazuh-proxy"),
    ] {
        let (code, out, err) = cli(&["completions", shell]);
        assert_eq!(code, 0, "{shell}: {err}");
        assert!(out.contains(marker), "{shell}: no {marker:?}");
        for sub in ["check-config", "upgrade", "completions", "--pid-file"] {
            assert!(out.contains(sub), "{shell} completion lacks {sub}");
        }
    }
    let (code, man, err) = cli(&["man"]);
    assert_eq!(code, 0, "{err}");
    assert!(man.contains(".TH wazuh-proxy 1"), "{man}");
    // roff escapes hyphens.
    let plain = man.replace("\\-", "-");
    for want in ["check-config", "reload", "completions", "Exit status: 0 ok"] {
        assert!(plain.contains(want), "man page lacks {want}");
    }
    // One page per subcommand, as the main page's SUBCOMMANDS section names them.
    let dir = temp_dir("man");
    let (code, _, err) = cli(&["man", "--out-dir", dir.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    for page in ["wazuh-proxy.1", "wazuh-proxy-run.1", "wazuh-proxy-reload.1"] {
        let text = std::fs::read_to_string(dir.join(page)).unwrap();
        assert!(text.contains(".TH"), "{page}");
    }
    let run = std::fs::read_to_string(dir.join("wazuh-proxy-run.1"))
        .unwrap()
        .replace("\\-", "-");
    assert!(
        run.contains("--pid-file") && run.contains("--log-format"),
        "{run}"
    );
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn check_config_nginx_prints_every_importer_notice() {
    let fixture =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/nginx/wazuh-docker.conf");
    let text = std::fs::read_to_string(fixture)
        .unwrap()
        .replace("wazuh.master", "127.0.0.2")
        .replace("wazuh.worker", "127.0.0.3")
        .replace("listen 1514;", "listen 1514 proxy_protocol;");
    let dir = temp_dir("nginx");
    let conf = dir.join("nginx.conf");
    std::fs::write(&conf, text).unwrap();
    let out = bin()
        .args(["check-config", "--nginx", conf.to_str().unwrap()])
        .env_remove("RUST_LOG")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    for want in [
        "ignoring the top-level directive user",
        "ignoring the top-level directive worker_processes",
        "ignoring the top-level directive error_log",
        "ignoring the top-level directive pid",
        "skipping the events {} block",
        "skipping the http {} block",
        "listen proxy_protocol without set_real_ip_from",
    ] {
        assert!(err.contains(want), "no notice {want:?} in:\n{err}");
    }
    // The listen flag maps to the listener's PROXY protocol: from anyone, as nginx does...
    let out_text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out_text.contains("proxy_protocol = true")
            && out_text.contains("proxy_protocol_trusted = [\"0.0.0.0/0\", \"::/0\"]"),
        "{out_text}"
    );
    // ...or from the set_real_ip_from networks.
    let text = std::fs::read_to_string(&conf).unwrap().replace(
        "stream {",
        "stream {\n    set_real_ip_from 10.0.0.0/8;\n    set_real_ip_from 192.0.2.7;",
    );
    std::fs::write(&conf, text).unwrap();
    let out = bin()
        .args(["check-config", "--nginx", conf.to_str().unwrap()])
        .output()
        .unwrap();
    let out_text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out_text.contains("proxy_protocol_trusted = [\"10.0.0.0/8\", \"192.0.2.7/32\"]"),
        "{out_text}"
    );
    std::fs::remove_dir_all(dir).unwrap();
}
