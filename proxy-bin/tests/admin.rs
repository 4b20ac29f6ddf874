//! The admin HTTP API and the `health`, `sessions`, `backends` commands, against the real
//! binary with stand-in managers on loopback.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::Bytes;
use futures_util::SinkExt;
use serde_json::Value;
use tokio::net::TcpStream;
use tokio_util::codec::Framed;
use wazuh_proxy_core::envelope::AgentId;
use wazuh_proxy_core::frame::FrameCodec;
use wazuh_proxy_core::sim::{agent_payload, Manager, Reply};
use wazuh_proxy_test_support::*;

async fn wait_health(admin: SocketAddr, want: u16) -> Value {
    let mut last = (0, Value::Null);
    // Long enough for a fail_timeout to pass on a busy machine.
    for _ in 0..400 {
        last = get_json(admin, "/health").await;
        if last.0 == want {
            return last.1;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("/health never answered {want}; last: {last:?}");
}

fn write_config(
    dir: &Path,
    listen: SocketAddr,
    admin: SocketAddr,
    managers: &[SocketAddr],
) -> PathBuf {
    let backends: Vec<String> = managers
        .iter()
        .map(|m| format!("{{ address = \"{m}\", fail_timeout = \"3s\" }}"))
        .collect();
    let file = dir.join("proxy.toml");
    std::fs::write(
        &file,
        format!(
            "drain_timeout = \"1s\"\nadmin = \"{admin}\"\n\n[[listener]]\nname = \"agents\"\nlisten = \"{listen}\"\nconnect_timeout = \"1s\"\nbackends = [{}]\n",
            backends.join(", ")
        ),
    )
    .unwrap();
    file
}

/// Parses the exposition strictly: every line is a comment, `# EOF` (last), or a sample the
/// parser understood.
fn parse_metrics(text: &str) -> prometheus_parse::Scrape {
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.last(), Some(&"# EOF"), "no EOF marker:\n{text}");
    // The parser folds a histogram's _bucket lines into one sample (the histograms here have
    // no labels); _sum and _count are samples of their own.
    let histograms: Vec<&str> = lines
        .iter()
        .filter_map(|l| l.strip_prefix("# TYPE ")?.strip_suffix(" histogram"))
        .collect();
    let samples = lines
        .iter()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| {
            !histograms
                .iter()
                .any(|h| l.starts_with(&format!("{h}_bucket")))
        })
        .count()
        + histograms.len();
    let scrape = prometheus_parse::Scrape::parse(lines.iter().map(|l| Ok(l.to_string()))).unwrap();
    assert_eq!(
        scrape.samples.len(),
        samples,
        "unparsed sample lines:\n{text}"
    );
    for l in lines.iter().filter(|l| l.starts_with("# TYPE ")) {
        let name = l.split(' ').nth(2).unwrap();
        assert!(
            name.starts_with("wazuh_proxy_") || name.starts_with("process_"),
            "{l}"
        );
    }
    scrape
}

fn value(scrape: &prometheus_parse::Scrape, name: &str, labels: &[(&str, &str)]) -> f64 {
    let found: Vec<f64> = scrape
        .samples
        .iter()
        .filter(|s| s.metric == name && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
        .map(|s| match s.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => v,
            _ => panic!("{name}: not a plain value"),
        })
        .collect();
    assert_eq!(found.len(), 1, "{name} {labels:?}: {found:?}");
    found[0]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_metrics_sessions_and_backends_follow_the_managers() {
    let m1 = Manager::start("127.0.0.1:0".parse().unwrap(), "m1", Reply::AckFirst)
        .await
        .unwrap();
    let m2 = Manager::start("127.0.0.1:0".parse().unwrap(), "m2", Reply::AckFirst)
        .await
        .unwrap();
    let (m1_addr, m2_addr) = (m1.addr(), m2.addr());
    let listen = free_addr();
    let admin = free_addr();
    let dir = temp_dir("admin");
    let file = write_config(&dir, listen, admin, &[m1_addr, m2_addr]);
    // The config's admin address is used; the readiness probe talks to the admin port.
    let proxy = ProxyProcess::start(
        &[
            "run",
            "--config",
            file.to_str().unwrap(),
            "--admin",
            &admin.to_string(),
        ],
        admin,
    );
    let admin_s = admin.to_string();

    // Healthy from the start.
    let h = wait_health(admin, 200).await;
    assert_eq!(h["status"], "ok", "{h}");
    assert_eq!(h["listeners"][0]["name"], "agents");
    assert_eq!(h["listeners"][0]["backends_available"], 2);
    let (code, out, _) = cli(&["health", "--admin", &admin_s]);
    assert_eq!(code, 0, "{out}");
    assert!(out.starts_with("healthy: agents (agent) 2/2"), "{out}");

    // Traffic: two agents, a few frames each.
    let mut a1 = agent(listen, "731").await;
    let mut a2 = agent(listen, "842").await;
    for seq in 1..=3 {
        a1.send(Bytes::from(agent_payload(AgentId::parse(b"731"), seq, 100)))
            .await
            .unwrap();
    }
    a2.send(Bytes::from(agent_payload(AgentId::parse(b"842"), 1, 100)))
        .await
        .unwrap();
    for _ in 0..200 {
        if m1.frame_count() + m2.frame_count() == 6 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(m1.frame_count() + m2.frame_count(), 6);

    // /sessions lists both, with their manager and counters.
    let (status, sessions) = get_json(admin, "/sessions").await;
    assert_eq!(status, 200);
    let list = sessions.as_array().unwrap();
    assert_eq!(list.len(), 2, "{sessions}");
    let s731 = list.iter().find(|s| s["agent"] == "731").unwrap();
    assert_eq!(s731["listener"], "agents");
    assert_eq!(s731["frames_up"], 4);
    assert_eq!(s731["frames_down"], 1);
    assert!(s731["started"].as_str().unwrap().ends_with('Z'), "{s731}");
    assert!(s731["age_s"].as_f64().unwrap() >= 0.0);
    let b731 = s731["backend"].as_str().unwrap().to_owned();
    assert!(b731 == m1_addr.to_string() || b731 == m2_addr.to_string());
    let (_, only) = get_json(admin, "/sessions?agent=731").await;
    assert_eq!(only.as_array().unwrap().len(), 1);
    let (_, by_backend) = get_json(admin, &format!("/sessions?backend={b731}")).await;
    assert!(by_backend
        .as_array()
        .unwrap()
        .iter()
        .any(|s| s["agent"] == "731"));
    let (status, _) = get_json(admin, "/sessions?agnet=731").await;
    assert_eq!(status, 400);
    let (code, out, _) = cli(&["sessions", "--admin", &admin_s]);
    assert_eq!(code, 0);
    assert!(out.starts_with("LISTENER"), "{out}");
    assert!(
        out.contains("731") && out.contains("842") && out.contains(&b731),
        "{out}"
    );
    let (code, out, _) = cli(&["sessions", "--admin", &admin_s, "--agent", "842", "--json"]);
    assert_eq!(code, 0);
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v.as_array().unwrap().len(), 1);
    assert_eq!(v[0]["agent"], "842");

    // /backends: both available, with their counters.
    let (status, backends) = get_json(admin, "/backends").await;
    assert_eq!(status, 200);
    let list = backends[0]["backends"].as_array().unwrap();
    assert_eq!(backends[0]["listener"], "agents");
    assert_eq!(list.len(), 2);
    assert!(list
        .iter()
        .all(|b| b["state"] == "available" && b["available"] == true));
    let active: u64 = list.iter().map(|b| b["active"].as_u64().unwrap()).sum();
    assert_eq!(active, 2);
    let (code, out, _) = cli(&["backends", "--admin", &admin_s]);
    assert_eq!(code, 0);
    assert!(
        out.contains(&m1_addr.to_string()) && out.contains("available"),
        "{out}"
    );
    let (code, out, _) = cli(&["backends", "--admin", &admin_s, "--json"]);
    assert_eq!(code, 0);
    assert_eq!(serde_json::from_str::<Value>(&out).unwrap(), backends);

    // /metrics: parses, has the families and the values, and no agent ID.
    let (status, text) = get(admin, "/metrics", None).await;
    assert_eq!(status, 200);
    let scrape = parse_metrics(&text);
    let l = [("listener", "agents")];
    assert!(value(&scrape, "wazuh_proxy_connections_accepted_total", &l) >= 2.0);
    assert_eq!(value(&scrape, "wazuh_proxy_connections_active", &l), 2.0);
    assert_eq!(value(&scrape, "wazuh_proxy_sessions_total", &l), 2.0);
    assert_eq!(value(&scrape, "wazuh_proxy_sessions_live", &l), 2.0);
    let up = [("listener", "agents"), ("direction", "to_manager")];
    assert_eq!(value(&scrape, "wazuh_proxy_frames_total", &up), 6.0);
    // Headers included: two first frames of 64 bytes, four of 100.
    assert_eq!(
        value(&scrape, "wazuh_proxy_bytes_total", &up),
        2.0 * 68.0 + 4.0 * 104.0
    );
    let down = [("listener", "agents"), ("direction", "to_agent")];
    assert_eq!(value(&scrape, "wazuh_proxy_frames_total", &down), 2.0);
    assert_eq!(value(&scrape, "wazuh_proxy_listener_healthy", &l), 1.0);
    // A handful of frames never makes the proxy pause to batch.
    assert_eq!(value(&scrape, "wazuh_proxy_batch_pauses_total", &[]), 0.0);
    let reasons: BTreeSet<&str> = scrape
        .samples
        .iter()
        .filter(|s| s.metric == "wazuh_proxy_rejected_total")
        .filter_map(|s| s.labels.get("reason"))
        .collect();
    for r in wazuh_proxy_core::stats::Rejection::ALL {
        assert!(reasons.contains(r.label()), "no reason {}", r.label());
    }
    for m in [m1_addr, m2_addr] {
        let b = m.to_string();
        let lb = [("listener", "agents"), ("backend", b.as_str())];
        let st = |s| {
            [
                ("listener", "agents"),
                ("backend", b.as_str()),
                ("state", s),
            ]
        };
        assert_eq!(
            value(&scrape, "wazuh_proxy_backend_state", &st("available")),
            1.0
        );
        assert_eq!(
            value(&scrape, "wazuh_proxy_backend_state", &st("failed")),
            0.0
        );
        assert_eq!(value(&scrape, "wazuh_proxy_backend_backup", &lb), 0.0);
        value(&scrape, "wazuh_proxy_backend_connections_opened_total", &lb);
        value(&scrape, "wazuh_proxy_backend_failures_total", &lb);
    }
    let opened: f64 = [m1_addr, m2_addr]
        .iter()
        .map(|m| {
            let b = m.to_string();
            value(
                &scrape,
                "wazuh_proxy_backend_active_connections",
                &[("listener", "agents"), ("backend", b.as_str())],
            )
        })
        .sum();
    assert_eq!(opened, 2.0);
    for s in &scrape.samples {
        for (k, v) in s.labels.iter() {
            // Whole numbers only: a port such as 34731 is not agent 731.
            let ids = v.split(|c: char| !c.is_ascii_digit());
            assert!(
                !ids.into_iter().any(|t| t == "731" || t == "842"),
                "agent ID in label {k}={v} of {}",
                s.metric
            );
        }
    }
    assert!(
        !text.contains("\"731\"") && !text.contains("\"842\""),
        "{text}"
    );

    // Every manager dies. Passive health only learns it when an agent tries to connect; the
    // proxy then holds that agent and keeps retrying, which keeps the marks fresh.
    m1.stop().await;
    m2.stop().await;
    drop(m1);
    drop(m2);
    drop((a1, a2));
    let mut probe = Framed::new(
        TcpStream::connect(listen).await.unwrap(),
        FrameCodec::default(),
    );
    probe
        .send(Bytes::from(agent_payload(AgentId::parse(b"953"), 0, 64)))
        .await
        .unwrap();
    let h = wait_health(admin, 503).await;
    assert_eq!(h["status"], "unhealthy");
    let reason = h["reason"].as_str().unwrap();
    assert!(
        reason.contains("\"agents\"") && reason.contains("no backend available"),
        "{reason}"
    );
    assert!(reason.contains(&m1_addr.to_string()), "{reason}");
    let (code, out, _) = cli(&["health", "--admin", &admin_s]);
    assert_eq!(code, 1, "{out}");
    assert!(out.starts_with("unhealthy: listener \"agents\""), "{out}");
    assert_eq!(out.trim_end().lines().count(), 1, "{out}");
    let (_, text) = get(admin, "/metrics", None).await;
    let scrape = parse_metrics(&text);
    assert_eq!(value(&scrape, "wazuh_proxy_listener_healthy", &l), 0.0);
    assert!(value(&scrape, "wazuh_proxy_connect_failures_total", &l) >= 1.0);
    let m1b = m1_addr.to_string();
    let st = [
        ("listener", "agents"),
        ("backend", m1b.as_str()),
        ("state", "failed"),
    ];
    assert_eq!(value(&scrape, "wazuh_proxy_backend_state", &st), 1.0);
    let (code, out, _) = cli(&["backends", "--admin", &admin_s]);
    assert_eq!(code, 0);
    assert!(out.contains("failed"), "{out}");

    // A manager comes back on the same port. The held agent's next retry reaches it (with no
    // agent waiting, the short fail_timeout would expire instead), the node is healthy again,
    // and agents reach the manager that answers.
    drop(probe);
    let m1 = Manager::start(m1_addr, "m1", Reply::AckFirst)
        .await
        .unwrap();
    let h = wait_health(admin, 200).await;
    assert_eq!(h["status"], "ok");
    let (code, out, _) = cli(&["health", "--admin", &admin_s]);
    assert_eq!(code, 0, "{out}");
    let _a3 = agent(listen, "953").await;
    // (Sessions the proxy was still holding when the managers died may arrive there too.)
    assert!(m1.agents().contains(&"953".to_owned()), "{:?}", m1.agents());
    wait_health(admin, 200).await;

    drop(proxy);
    std::fs::remove_dir_all(dir).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_token_is_enforced_and_a_draining_node_is_unhealthy() {
    let m = Manager::start("127.0.0.1:0".parse().unwrap(), "m", Reply::AckFirst)
        .await
        .unwrap();
    let listen = free_addr();
    let admin = free_addr();
    let admin_s = admin.to_string();
    let dir = temp_dir("admin-token");
    let token_file = dir.join("admin.token");
    std::fs::write(&token_file, "s3cret-token\n").unwrap();
    let token_path = token_file.to_str().unwrap();
    let mut proxy = ProxyProcess::start(
        &[
            "run",
            "--listen",
            &listen.to_string(),
            "--backend",
            &m.addr().to_string(),
            "--admin",
            &admin_s,
            "--admin-token-file",
            token_path,
        ],
        admin,
    );
    for path in ["/health", "/metrics", "/sessions", "/backends", "/nowhere"] {
        assert_eq!(get(admin, path, None).await.0, 401, "{path}");
        assert_eq!(get(admin, path, Some("s3cret")).await.0, 401, "{path}");
    }
    assert_eq!(get(admin, "/health", Some("s3cret-token")).await.0, 200);
    assert_eq!(get(admin, "/metrics", Some("s3cret-token")).await.0, 200);
    assert_eq!(get(admin, "/nowhere", Some("s3cret-token")).await.0, 404);

    let (code, out, _) = cli(&["health", "--admin", &admin_s]);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.starts_with("unhealthy: ") && out.contains("token"),
        "{out}"
    );
    let (code, out, _) = cli(&[
        "health",
        "--admin",
        &admin_s,
        "--admin-token-file",
        token_path,
    ]);
    assert_eq!(code, 0, "{out}");
    let (code, _, _) = cli(&["sessions", "--admin", &admin_s]);
    assert_eq!(code, 1);
    let (code, out, _) = cli(&[
        "sessions",
        "--admin",
        &admin_s,
        "--admin-token-file",
        token_path,
    ]);
    assert_eq!(code, 0, "{out}");

    // Nothing listening: unhealthy, exit 1, within the timeout.
    let nowhere = free_addr().to_string();
    let (code, out, _) = cli(&["health", "--admin", &nowhere, "--timeout", "1s"]);
    assert_eq!(code, 1, "{out}");
    assert!(out.starts_with("unhealthy: cannot connect"), "{out}");

    // SIGTERM with a live session: the node drains and tells keepalived to move the VIP.
    let a = agent(listen, "001").await;
    proxy.signal("TERM");
    let mut draining = None;
    for _ in 0..200 {
        let (status, body) = get(admin, "/health", Some("s3cret-token")).await;
        if status == 503 {
            draining = Some(body);
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let body = draining.expect("/health stayed 200 while draining");
    assert!(body.contains("draining"), "{body}");
    // Liveness says only that the process serves: a draining node is not restarted.
    let (status, body) = get(admin, "/live", Some("s3cret-token")).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        serde_json::from_str::<Value>(&body).unwrap()["status"],
        "live"
    );
    drop(a);
    let status = proxy.wait_exit(10).expect("did not exit after the drain");
    assert!(status.success(), "{status:?}");
    assert!(
        proxy.logs().contains("admin API listening"),
        "{}",
        proxy.logs()
    );
    assert!(!proxy.logs().contains("s3cret"), "the token was logged");
    std::fs::remove_dir_all(dir).unwrap();
}

/// A UDP-only stand-in manager: answers `#ping` with a bare `#pong` datagram, as remoted does
/// on 1514/UDP, and has nothing on the TCP port of the same number.
async fn udp_only_manager() -> SocketAddr {
    let sock = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let addr = sock.local_addr().unwrap();
    tokio::spawn(async move {
        let mut buf = vec![0u8; 70_000];
        while let Ok((n, from)) = sock.recv_from(&mut buf).await {
            if &buf[..n] == b"#ping" {
                let _ = sock.send_to(b"#pong", from).await;
            }
        }
    });
    addr
}

/// Runs the proxy on `config`, whose admin API is at `admin`.
fn run_config(config: &Path, admin: SocketAddr) -> ProxyProcess {
    let mut cmd = bin();
    cmd.args(["run", "--config", config.to_str().unwrap()]);
    ProxyProcess::start_command(cmd, admin)
}

fn udp_config(dir: &Path, admin: SocketAddr, listeners: &[(&str, SocketAddr)]) -> PathBuf {
    let mut text = format!("drain_timeout = \"1s\"\nadmin = \"{admin}\"\n");
    for (i, (extra, manager)) in listeners.iter().enumerate() {
        text += &format!(
            "\n[[listener]]\nname = \"udp{i}\"\nlisten = \"{}\"\nkind = \"udp\"\n{extra}\nbackends = [{{ address = \"{manager}\" }}]\n",
            free_addr()
        );
    }
    let file = dir.join("proxy.toml");
    std::fs::write(&file, text).unwrap();
    file
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_udp_only_manager_keeps_health_200() {
    let manager = udp_only_manager().await;
    let quick =
        "health_check_interval = \"50ms\"\nhealth_check_timeout = \"200ms\"\nhealth_check_fall = 2";
    let dir = temp_dir("udp-health");
    let admin = free_addr();
    // The default (no probe) and the agent protocol's UDP #ping probe.
    let with_ping = format!("health_check = \"agent\"\n{quick}");
    let config = udp_config(&dir, admin, &[("", manager), (&with_ping, manager)]);
    let proxy = run_config(&config, admin);
    // Many probe rounds: it must stay 200 throughout.
    for _ in 0..40 {
        let (status, body) = get_json(admin, "/health").await;
        assert_eq!(status, 200, "{body}\n{}", proxy.logs());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    drop(proxy);

    // The same manager probed with a TCP connect (asked for explicitly) is down, and so is a
    // UDP manager that never answers #ping: the probes can fail.
    let silent = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let admin = free_addr();
    let with_tcp = format!("health_check = \"tcp\"\n{quick}");
    let config = udp_config(&dir, admin, &[(&with_tcp, manager)]);
    let proxy = run_config(&config, admin);
    wait_health(admin, 503).await;
    drop(proxy);
    let admin = free_addr();
    let config = udp_config(&dir, admin, &[(&with_ping, silent.local_addr().unwrap())]);
    let proxy = run_config(&config, admin);
    wait_health(admin, 503).await;
    drop(proxy);
    let _ = std::fs::remove_dir_all(&dir);
}
