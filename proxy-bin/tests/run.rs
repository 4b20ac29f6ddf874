//! `wazuh-proxy run`, `check-config` and `demo` as an administrator uses them.

use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use tokio::net::TcpStream;
use wazuh_proxy_core::envelope::AgentId;
use wazuh_proxy_core::sim::{agent_payload, Manager, Reply};
use wazuh_proxy_test_support::*;

#[tokio::test]
async fn sigterm_stops_accepting_and_lets_sessions_finish() {
    let m = Manager::start("127.0.0.1:0".parse().unwrap(), "m", Reply::AckFirst)
        .await
        .unwrap();
    let listen = free_addr();
    let mut proxy = ProxyProcess::start(
        &[
            "run",
            "--listen",
            &listen.to_string(),
            "--backend",
            &m.addr().to_string(),
        ],
        listen,
    );
    let mut a = agent(listen, "001").await;
    wait_for("the agent's first frame", 5, || {
        m.frames_from("001").len() == 1
    })
    .await;
    proxy.signal("TERM");
    // No new agent is accepted...
    let mut refused = false;
    for _ in 0..250 {
        if TcpStream::connect(listen).await.is_err() {
            refused = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(refused, "still accepting after SIGTERM");
    // ...while the live session keeps flowing.
    a.send(Bytes::from(agent_payload(AgentId::parse(b"001"), 1, 64)))
        .await
        .unwrap();
    wait_for("the frame sent during the drain", 5, || {
        m.frames_from("001").len() == 2
    })
    .await;
    assert!(
        proxy.wait_exit(0).is_none(),
        "exited before its session ended"
    );
    drop(a);
    let status = proxy
        .wait_exit(10)
        .expect("did not exit after its last session ended");
    assert!(status.success(), "{status:?}");
    let logs = proxy.logs();
    assert!(
        logs.contains("SIGTERM received") && logs.contains("drained"),
        "{logs}"
    );
    assert!(
        logs.contains("agent connected") && logs.contains("agent disconnected"),
        "{logs}"
    );
}

#[tokio::test]
async fn the_drain_timeout_closes_what_is_left() {
    let m = Manager::start("127.0.0.1:0".parse().unwrap(), "m", Reply::AckFirst)
        .await
        .unwrap();
    let listen = free_addr();
    let dir = std::env::temp_dir().join(format!("wazuh-proxy-drain-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("proxy.toml");
    std::fs::write(
        &file,
        format!(
            "drain_timeout = \"500ms\"\n[[listener]]\nname = \"agents\"\nlisten = \"{listen}\"\nbackends = [{{ address = \"{}\" }}]\n",
            m.addr()
        ),
    )
    .unwrap();
    let mut proxy = ProxyProcess::start(&["run", "--config", file.to_str().unwrap()], listen);
    let mut a = agent(listen, "002").await;
    proxy.signal("TERM");
    let status = proxy
        .wait_exit(10)
        .expect("did not exit after the drain timeout");
    assert!(status.success(), "{status:?}");
    // The agent saw its connection closed.
    let end = tokio::time::timeout(Duration::from_secs(5), a.next())
        .await
        .unwrap();
    assert!(matches!(end, None | Some(Err(_))));
    assert!(
        proxy.logs().contains("drain timeout reached"),
        "{}",
        proxy.logs()
    );
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn check_config_prints_the_effective_config_or_the_error_with_its_line() {
    let dir = std::env::temp_dir().join(format!("wazuh-proxy-check-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let good = dir.join("good.toml");
    std::fs::write(&good, "[[listener]]\nlisten = \"127.0.0.1:1514\"\nbackends = [{ address = \"127.0.0.1:11514\" }]\n").unwrap();
    let out = bin()
        .args(["check-config", good.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(
        text.contains("balance = \"agent-id\"") && text.contains("duplicate = \"replace\""),
        "{text}"
    );

    let bad = dir.join("bad.toml");
    std::fs::write(
        &bad,
        "[[listener]]\nlisten = \"127.0.0.1:1514\"\nbackend = []\n",
    )
    .unwrap();
    let out = bin()
        .args(["check-config", bad.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(
        err.contains("bad.toml:3:") && err.contains("backend"),
        "{err}"
    );
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn the_demo_runs_and_shows_where_agents_went() {
    let out = bin().args(["demo", "--agents", "6"]).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(
        text.contains("6 of 6 agents landed on the manager they had before"),
        "{text}"
    );
    assert!(text.contains("agent 001 -> manager-"), "{text}");
    assert!(
        text.contains("same TCP connection, next event delivered"),
        "{text}"
    );
}
