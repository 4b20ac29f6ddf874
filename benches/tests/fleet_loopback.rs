//! The load tools against each other on loopback: agents through the real protocol to the
//! stand-in manager, which must see every event once, in order, with ACKs and echoes flowing.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use wazuh_proxy_benches::agent::Load;
use wazuh_proxy_benches::fleet::{self, FleetOptions};
use wazuh_proxy_benches::fleetkeys;
use wazuh_proxy_benches::manager::{self, ManagerConfig, ManagerState};
use wazuh_proxy_core::envelope::Cipher;

fn field(line: &str, key: &str) -> u64 {
    line.split_whitespace()
        .find_map(|kv| kv.strip_prefix(&format!("{key}=")))
        .and_then(|v| v.parse::<f64>().ok())
        .map(|v| v as u64)
        .unwrap_or_else(|| panic!("no {key} in {line}"))
}

async fn start_manager(
    keys: &std::path::Path,
    echo: bool,
) -> (std::net::SocketAddr, Arc<ManagerState>) {
    start_refusing_manager(keys, echo, &[]).await
}

async fn start_refusing_manager(
    keys: &std::path::Path,
    echo: bool,
    refuse: &[&str],
) -> (std::net::SocketAddr, Arc<ManagerState>) {
    let set = Arc::new(fleetkeys::read(keys).unwrap());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let state = ManagerState::new(ManagerConfig {
        keys: set,
        echo,
        sample: 1,
        refuse: refuse.iter().map(|s| (*s).to_owned()).collect(),
    });
    tokio::spawn(manager::serve(listener, Arc::clone(&state)));
    (addr, state)
}

fn options(
    target: std::net::SocketAddr,
    keys: &std::path::Path,
    cipher: Cipher,
    load: Load,
) -> FleetOptions {
    FleetOptions {
        target,
        agents: 4,
        cipher,
        event_size: 300,
        load,
        duration: Duration::from_millis(800),
        keys: keys.to_path_buf(),
        notify_time: Duration::from_millis(300),
        retry_interval: Duration::from_millis(100),
        max_retries: 3,
        recv_timeout: Duration::from_secs(5),
        echo: false,
        sources: Vec::new(),
        ramp: 0,
        drain: Duration::from_secs(5),
        log_lines: 10,
        warmup: Duration::ZERO,
        slow_log_us: None,
    }
}

fn keys_file(name: &str) -> std::path::PathBuf {
    let path = std::env::temp_dir().join(format!("fleet-test-{}-{name}.keys", std::process::id()));
    fleetkeys::write(&path, 4).unwrap();
    path
}

#[tokio::test]
async fn rate_events_arrive_once_in_order_with_keepalive_acks() {
    for cipher in [Cipher::Aes, Cipher::Blowfish] {
        let keys = keys_file(cipher.name());
        let (addr, state) = start_manager(&keys, false).await;
        let out = fleet::run_agents(
            &options(addr, &keys, cipher, Load::Rate(50.0)),
            "agents",
            None,
            false,
        )
        .await
        .unwrap();
        assert!(out.ok, "{}", out.report);
        let sent = field(&out.report, "sent");
        assert!(sent > 40, "{}", out.report);
        assert!(
            field(&out.report, "acks") >= 4,
            "keepalives were acknowledged: {}",
            out.report
        );
        // The manager has read everything once the agents saw it close.
        tokio::time::sleep(Duration::from_millis(200)).await;
        let (report, ok) = state.report("m", false);
        assert!(ok, "{report}");
        let summary = report.lines().last().unwrap();
        assert_eq!(field(summary, "events"), sent, "{summary}");
        assert_eq!(field(summary, "lost"), 0);
        assert_eq!(field(summary, "startups"), 4);
        assert_eq!(field(summary, "shutdowns"), 4);
        assert_eq!(state.rejected.load(Relaxed), 0);
        let _ = std::fs::remove_file(keys);
    }
}

#[tokio::test]
async fn flat_out_pool_counts_match_and_echo_gives_round_trips() {
    let keys = keys_file("flat");
    let (addr, state) = start_manager(&keys, false).await;
    let out = fleet::run_agents(
        &options(addr, &keys, Cipher::Aes, Load::FlatOut { pool: 8 }),
        "agents",
        None,
        false,
    )
    .await
    .unwrap();
    assert!(out.ok, "{}", out.report);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (report, ok) = state.report("m", false);
    assert!(ok, "cycled sequence numbers are not loss: {report}");
    let summary = report.lines().last().unwrap();
    assert_eq!(field(summary, "frames"), field(&out.report, "frames"));

    let (addr, _state) = start_manager(&keys, true).await;
    let mut o = options(addr, &keys, Cipher::Aes, Load::Rate(20.0));
    o.echo = true;
    let out = fleet::run_agents(&o, "latency", None, false).await.unwrap();
    assert!(out.ok, "{}", out.report);
    assert!(field(&out.report, "rtt_samples") > 10, "{}", out.report);

    let storm = fleet::connect_storm(&options(addr, &keys, Cipher::Aes, Load::Idle))
        .await
        .unwrap();
    assert!(storm.ok, "{}", storm.report);
    assert_eq!(field(&storm.report, "acked"), 4);
    let _ = std::fs::remove_file(keys);
}

#[tokio::test]
async fn nothing_listening_is_a_failure_not_a_hang() {
    let keys = keys_file("refused");
    let free = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let started = std::time::Instant::now();
    let out = fleet::run_agents(
        &options(free, &keys, Cipher::Aes, Load::Rate(10.0)),
        "agents",
        None,
        false,
    )
    .await
    .unwrap();
    assert!(!out.ok, "{}", out.report);
    assert_eq!(field(&out.report, "errors"), 4);
    assert!(started.elapsed() < Duration::from_secs(5));
    let _ = std::fs::remove_file(keys);
}

#[tokio::test]
async fn a_refused_agent_is_closed_unanswered_and_the_others_are_served() {
    let keys = keys_file("refuse");
    let (addr, state) = start_refusing_manager(&keys, false, &["002"]).await;
    let out = fleet::run_agents(
        &options(addr, &keys, Cipher::Aes, Load::Rate(50.0)),
        "agents",
        None,
        true,
    )
    .await
    .unwrap();
    // Agent 002 never got its ACK: every attempt failed and it ended without a connection.
    assert!(!out.ok, "{}", out.report);
    assert_eq!(field(&out.report, "connects"), 3, "{}", out.report);
    assert_eq!(field(&out.report, "errors"), 1, "{}", out.report);
    let attempts = field(&out.report, "failed_attempts");
    assert!(attempts >= 2, "it kept trying: {}", out.report);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(state.refusals.load(Relaxed), attempts);
    let (report, ok) = state.report("m", false);
    assert!(ok, "{report}");
    let summary = report.lines().last().unwrap();
    assert_eq!(field(summary, "refusals"), attempts, "{summary}");
    assert_eq!(field(summary, "events"), field(&out.report, "sent"));
    assert_eq!(field(summary, "startups"), 3, "{summary}");
    assert!(
        state.records().iter().all(|(id, _)| id.as_str() != "002"),
        "nothing of the refused agent was accepted: {report}"
    );
    let _ = std::fs::remove_file(keys);
}

#[tokio::test]
async fn churn_reconnects_each_agent_with_one_startup_per_connection() {
    let keys = keys_file("churn");
    let (addr, state) = start_manager(&keys, false).await;
    let out = fleet::churn(&options(addr, &keys, Cipher::Aes, Load::Idle), 2)
        .await
        .unwrap();
    assert!(out.ok, "{}", out.report);
    let conns = field(&out.report, "conns");
    assert!(conns >= 4, "{}", out.report);
    assert_eq!(field(&out.report, "workers"), 2, "{}", out.report);
    // Every connection was one startup, acknowledged, then closed.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while state.open.load(Relaxed) > 0 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (report, _) = state.report("m", true);
    let summary = report.lines().last().unwrap();
    assert!(field(summary, "frames") >= conns, "{report}");

    // The idle probe on the fleet's own process: a reading at 2 s and one at 2.5 s (the run
    // lasts 5 s, so the second is taken unless connecting 4 agents takes 2 s).
    let mut o = options(addr, &keys, Cipher::Aes, Load::Idle);
    o.duration = Duration::from_secs(5);
    let probe = fleet::RssProbe {
        pid: std::process::id(),
        late: Some(Duration::from_millis(2500)),
    };
    let out = fleet::run_agents(&o, "idle", Some(probe), false)
        .await
        .unwrap();
    assert!(out.ok, "{}", out.report);
    field(&out.report, "rss_per_agent_bytes");
    field(&out.report, "rss_late_kb");
    let _ = std::fs::remove_file(keys);
}
