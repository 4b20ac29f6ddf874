//! Day-to-day operations through the CLI: active health on an idle standby node, and draining
//! a manager for maintenance without disconnecting agents.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use tokio::net::TcpStream;
use tokio_util::codec::Framed;
use wazuh_proxy_core::envelope::AgentId;
use wazuh_proxy_core::frame::FrameCodec;
use wazuh_proxy_core::sim::{agent_payload, Manager, Reply};
use wazuh_proxy_test_support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_standby_whose_managers_are_dead_reports_unhealthy_and_recovers() {
    let dead: SocketAddr = free_addr();
    let listen = free_addr();
    let admin = free_addr().to_string();
    let file = write_config(
        "standby",
        &format!(
            "[[listener]]\nlisten = \"{listen}\"\nhealth_check_interval = \"100ms\"\nhealth_check_fall = 2\nhealth_check_rise = 1\nbackends = [{{ address = \"{dead}\" }}]\n"
        ),
    );
    let _proxy = ProxyProcess::start(
        &["run", "--config", file.to_str().unwrap(), "--admin", &admin],
        listen,
    );
    // No agent ever connects: only the active checks can tell.
    wait_for("unhealthy", 10, || {
        !cli_ok(&["health", "--admin", &admin]).0
    })
    .await;
    let (_, why) = cli_ok(&["health", "--admin", &admin]);
    assert!(why.contains(&dead.to_string()), "{why}");
    let _manager = Manager::start(dead, "back", Reply::AckFirst).await.unwrap();
    wait_for("healthy again", 10, || {
        cli_ok(&["health", "--admin", &admin]).0
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_and_rebalance_from_the_cli_disconnect_no_agent() {
    let m1 = Manager::start("127.0.0.1:0".parse().unwrap(), "m1", Reply::AckFirst)
        .await
        .unwrap();
    let m2 = Manager::start("127.0.0.1:0".parse().unwrap(), "m2", Reply::AckFirst)
        .await
        .unwrap();
    let listen = free_addr();
    let admin = free_addr().to_string();
    let file = write_config(
        "drain",
        &format!(
            "[[listener]]\nlisten = \"{listen}\"\nrebalance_interval = \"0s\"\nbackends = [{{ address = \"{}\" }}, {{ address = \"{}\" }}]\n",
            m1.addr(),
            m2.addr()
        ),
    );
    let _proxy = ProxyProcess::start(
        &["run", "--config", file.to_str().unwrap(), "--admin", &admin],
        listen,
    );
    let mut agents = Vec::new();
    for n in 1..=40 {
        let id = AgentId::parse(format!("{n:03}").as_bytes()).unwrap();
        let mut a = Framed::new(
            TcpStream::connect(listen).await.unwrap(),
            FrameCodec::default(),
        );
        a.send(Bytes::from(agent_payload(Some(id), 0, 64)))
            .await
            .unwrap();
        tokio::time::timeout(Duration::from_secs(5), a.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        agents.push(a);
    }
    wait_for("sessions on both managers", 10, || {
        m1.open_connections() > 0 && m2.open_connections() > 0
    })
    .await;
    let on_m1 = m1.open_connections();
    let (ok, out) = cli_ok(&["drain", &m1.addr().to_string(), "--admin", &admin]);
    assert!(ok, "{out}");
    wait_for("m1 emptied", 10, || m1.open_connections() == 0).await;
    // A moved agent's old manager connection closes before its new one opens.
    wait_for("m2 carries all 40", 10, || m2.open_connections() == 40).await;
    let (ok, out) = cli_ok(&["drain", &m1.addr().to_string(), "--undo", "--admin", &admin]);
    assert!(ok, "{out}");
    let (ok, out) = cli_ok(&["rebalance", "--admin", &admin]);
    assert!(ok, "{out}");
    wait_for("agents back on m1", 10, || m1.open_connections() == on_m1).await;
    // No agent lost its connection: each can still talk and gets its frame through.
    for (i, a) in agents.iter_mut().enumerate() {
        let id = AgentId::parse(format!("{:03}", i + 1).as_bytes()).unwrap();
        a.send(Bytes::from(agent_payload(Some(id), 1, 64)))
            .await
            .unwrap();
        if let Ok(Some(other)) = tokio::time::timeout(Duration::from_millis(5), a.next()).await {
            assert!(other.is_ok(), "agent {id} lost its connection");
        }
    }
    wait_for("last frames", 10, || {
        (1..=40).all(|n| {
            let key = format!("{n:03}");
            m1.frames_from(&key)
                .iter()
                .chain(m2.frames_from(&key).iter())
                .any(|f| wazuh_proxy_core::sim::payload_seq(f) == Some(1))
        })
    })
    .await;
}

#[tokio::test]
async fn started_as_root_it_runs_as_the_configured_user_once_bound() {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let uid_line = status
        .lines()
        .find(|l| l.starts_with("Uid:"))
        .unwrap_or_default()
        .to_owned();
    if uid_line.split_whitespace().nth(1) != Some("0") {
        eprintln!("!!!! SKIPPED: privilege drop needs the tests to run as root !!!!");
        return;
    }
    let m = Manager::start("127.0.0.1:0".parse().unwrap(), "m", Reply::AckFirst)
        .await
        .unwrap();
    let listen = free_addr();
    let file = write_config(
        "user",
        &format!("user = \"nobody\"\n[[listener]]\nlisten = \"{listen}\"\nbackends = [{{ address = \"{}\" }}]\n", m.addr()),
    );
    let proxy = ProxyProcess::start(&["run", "--config", file.to_str().unwrap()], listen);
    let pid = proxy.child.id();
    let mut uid = String::new();
    for _ in 0..100 {
        let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        uid = s
            .lines()
            .find(|l| l.starts_with("Uid:"))
            .unwrap_or_default()
            .to_owned();
        if uid.split_whitespace().nth(1) == Some("65534") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        uid.split_whitespace().nth(1),
        Some("65534"),
        "{uid}\n{}",
        proxy.logs()
    );
    // Still serving.
    let id = AgentId::parse(b"001").unwrap();
    let mut a = Framed::new(
        TcpStream::connect(listen).await.unwrap(),
        FrameCodec::default(),
    );
    a.send(Bytes::from(agent_payload(Some(id), 0, 64)))
        .await
        .unwrap();
    tokio::time::timeout(Duration::from_secs(5), a.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drained_manager_stays_drained_across_reload_and_upgrade() {
    let m1 = Manager::start("127.0.0.1:0".parse().unwrap(), "m1", Reply::AckFirst)
        .await
        .unwrap();
    let m2 = Manager::start("127.0.0.1:0".parse().unwrap(), "m2", Reply::AckFirst)
        .await
        .unwrap();
    let listen = free_addr();
    let admin = free_addr().to_string();
    let body = format!(
        "[[listener]]\nname = \"agents\"\nlisten = \"{listen}\"\nrebalance_interval = \"0s\"\nbackends = [{{ address = \"{}\" }}, {{ address = \"{}\" }}]\n",
        m1.addr(),
        m2.addr()
    );
    let file = write_config("drain-state", &body);
    let sock = file.with_file_name("upgrade.sock");
    let mut old = ProxyProcess::start(
        &[
            "run",
            "--config",
            file.to_str().unwrap(),
            "--admin",
            &admin,
            "--upgrade-socket",
            sock.to_str().unwrap(),
        ],
        listen,
    );
    async fn agents(
        listen: SocketAddr,
        ids: std::ops::RangeInclusive<usize>,
    ) -> Vec<Framed<TcpStream, FrameCodec>> {
        let mut out = Vec::new();
        for n in ids {
            let id = AgentId::parse(format!("{n:03}").as_bytes()).unwrap();
            let mut a = Framed::new(
                TcpStream::connect(listen).await.unwrap(),
                FrameCodec::default(),
            );
            a.send(Bytes::from(agent_payload(Some(id), 0, 64)))
                .await
                .unwrap();
            tokio::time::timeout(Duration::from_secs(5), a.next())
                .await
                .expect("ACK")
                .unwrap()
                .unwrap();
            out.push(a);
        }
        out
    }
    let _first = agents(listen, 1..=20).await;
    wait_for("agents on m1", 10, || m1.open_connections() > 0).await;
    let (ok, out) = cli_ok(&["drain", &m1.addr().to_string(), "--admin", &admin]);
    assert!(ok, "{out}");
    wait_for("m1 emptied", 10, || m1.open_connections() == 0).await;
    let at_m1 = m1.accepted();

    // A reload of the same file: the drain is operator state, not configuration.
    old.signal("HUP");
    wait_for("reload applied", 10, || {
        old.logs().contains("reload applied")
    })
    .await;
    let _second = agents(listen, 21..=60).await;
    assert_eq!(
        m1.accepted(),
        at_m1,
        "an agent reached the drained manager after a reload"
    );

    // An upgrade: the successor receives the drain with the listeners' state.
    old.signal("USR2");
    let status = old.wait_exit(30).expect("the old process did not exit");
    assert!(status.success(), "{}", old.logs());
    let logs = old.logs();
    let _kill = KillOnDrop(successor_pid(&logs).unwrap_or_else(|| panic!("{logs}")));
    let _third = agents(listen, 61..=100).await;
    assert_eq!(
        m1.accepted(),
        at_m1,
        "an agent reached the drained manager after an upgrade"
    );
    // Undrained (once the new process's admin API is up), it is back in rotation.
    let undo = ["drain", &m1.addr().to_string(), "--undo", "--admin", &admin];
    wait_for("undrained through the new process", 10, || cli_ok(&undo).0).await;
    let _fourth = agents(listen, 101..=140).await;
    assert!(m1.accepted() > at_m1, "the undrained manager got no agent");
}
