//! The files under deploy/ work with this binary: the example configuration and the Kubernetes
//! ConfigMap's proxy.toml load, and the command lines of the compose file, the systemd unit
//! and keepalived's check use flags that exist.

use std::path::PathBuf;

use wazuh_proxy::config::Config;
use wazuh_proxy_test_support::bin;

fn repo(path: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join(path)
}

fn read(path: &str) -> String {
    std::fs::read_to_string(repo(path)).unwrap()
}

#[test]
fn the_example_configuration_loads() {
    let c = Config::load(&repo("deploy/proxy.toml")).unwrap();
    assert_eq!(c.listeners.len(), 2);
}

#[test]
fn the_configmap_proxy_toml_loads() {
    let yaml = read("deploy/kubernetes/configmap.yaml");
    // The `proxy.toml: |` block: every following line indented by 4 spaces (or empty).
    let start =
        yaml.find("  proxy.toml: |\n").expect("a proxy.toml key") + "  proxy.toml: |\n".len();
    let mut toml = String::new();
    for line in yaml[start..].lines() {
        if line.is_empty() {
            toml.push('\n');
        } else if let Some(l) = line.strip_prefix("    ") {
            toml.push_str(l);
            toml.push('\n');
        } else {
            break;
        }
    }
    // The managers' cluster names resolve only inside the cluster: loopback addresses stand in.
    let mut names: Vec<String> = toml
        .split('"')
        .filter(|s| s.contains(".svc.cluster.local:"))
        .map(|s| s.rsplit_once(':').unwrap().0.to_owned())
        .collect();
    names.sort();
    names.dedup();
    assert!(names.len() >= 3, "{names:?}");
    for (i, n) in names.iter().enumerate() {
        toml = toml.replace(n, &format!("127.0.0.{}", i + 2));
    }
    let c = Config::parse(&toml, "configmap.yaml").unwrap_or_else(|e| panic!("{e}\n{toml}"));
    let names: Vec<&str> = c.listeners.iter().map(|l| l.name.as_str()).collect();
    assert_eq!(names, ["agents", "agents-udp", "enrollment"]);
    assert!(c.admin.listen.is_some_and(|a| a.port() == 9514));
}

/// Runs the binary with `args` and returns its exit status: 2 means the flags were refused.
fn status(args: &[String]) -> i32 {
    bin()
        .args(args)
        .output()
        .unwrap()
        .status
        .code()
        .unwrap_or(-1)
}

#[test]
fn deployed_command_lines_use_existing_flags() {
    // docker-compose: the JSON array after `command:` of the proxy service.
    let compose = read("deploy/docker-compose.yml");
    let line = compose
        .lines()
        .find(|l| l.trim_start().starts_with("command: [\"run\""))
        .expect("the proxy's command");
    let json = line.trim_start().trim_start_matches("command:").trim();
    let mut args: Vec<String> = serde_json::from_str(json).unwrap();
    // The file it names is not here: a read failure (1), not a usage error (2).
    args.extend(["--admin".into(), "none".into()]);
    assert_eq!(status(&args), 1, "{args:?}");

    // The systemd unit's ExecStart, ExecStartPre.
    let unit = read("deploy/wazuh-proxy.service");
    for key in ["ExecStart=", "ExecStartPre="] {
        let line = unit.lines().find(|l| l.starts_with(key)).unwrap();
        let args: Vec<String> = line[key.len()..]
            .split_whitespace()
            .skip(1)
            .map(str::to_owned)
            .collect();
        let code = status(&args);
        assert!(code == 1 || code == 3, "{key}: {args:?} exited {code}");
    }

    // keepalived's check (nothing listens on the admin port here: unhealthy, 1).
    let conf = read("deploy/keepalived.conf");
    let script = conf
        .lines()
        .find_map(|l| l.trim().strip_prefix("script \""))
        .unwrap()
        .trim_end_matches('"');
    let mut args: Vec<String> = script
        .split_whitespace()
        .skip(1)
        .map(str::to_owned)
        .collect();
    args.extend(["--admin".into(), "127.0.0.1:1".into()]);
    assert_eq!(status(&args), 1, "{args:?}");
}
