//! Reload (SIGHUP) and binary upgrade (SIGUSR2) under streaming agents: nothing dropped.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::SinkExt;
use wazuh_proxy_core::sim::{agent_payload, payload_seq, Manager, Reply};
use wazuh_proxy_test_support::*;

fn config(listen: SocketAddr, admin: &str, managers: &[SocketAddr]) -> String {
    let backends: Vec<String> = managers
        .iter()
        .map(|m| format!("{{ address = \"{m}\" }}"))
        .collect();
    format!(
        "drain_timeout = \"5s\"\nadmin = \"{admin}\"\n[[listener]]\nname = \"agents\"\nlisten = \"{listen}\"\nbackends = [{}]\n",
        backends.join(", ")
    )
}

/// Sequence numbers received per agent across managers, without the startup frame (and its
/// replays, which register the agent with a new manager or process).
fn received(managers: &[&Manager], n: usize) -> Vec<u64> {
    let mut all: Vec<u64> = managers
        .iter()
        .flat_map(|m| m.frames_from(&id(n).to_string()))
        .map(|f| payload_seq(&f).unwrap())
        .filter(|s| *s != 0)
        .collect();
    all.sort_unstable();
    all
}

/// Streams `frames` numbered frames from each agent, pausing between rounds.
async fn stream(agents: &mut [AgentConn], first: usize, frames: u64) {
    for seq in 1..=frames {
        for (i, a) in agents.iter_mut().enumerate() {
            a.send(Bytes::from(agent_payload(Some(id(first + i)), seq, 100)))
                .await
                .unwrap();
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_changes_the_backend_set_under_200_streaming_agents_without_a_disconnect() {
    let m1 = Manager::start("127.0.0.1:0".parse().unwrap(), "m1", Reply::AckFirst)
        .await
        .unwrap();
    let m2 = Manager::start("127.0.0.1:0".parse().unwrap(), "m2", Reply::AckFirst)
        .await
        .unwrap();
    let listen = free_addr();
    let dir = temp_dir("reload");
    let file = dir.join("proxy.toml");
    std::fs::write(&file, config(listen, "none", &[m1.addr()])).unwrap();
    let mut proxy = ProxyProcess::start(&["run", "--config", file.to_str().unwrap()], listen);
    let mut agents = Vec::new();
    for n in 1..=200 {
        agents.push(agent(listen, id(n).as_str()).await);
    }
    let streaming = {
        let mut agents = std::mem::take(&mut agents);
        tokio::spawn(async move {
            stream(&mut agents, 1, 50).await;
            agents
        })
    };
    tokio::time::sleep(Duration::from_millis(150)).await;
    std::fs::write(&file, config(listen, "none", &[m1.addr(), m2.addr()])).unwrap();
    proxy.signal("HUP");
    wait_for("reload applied", 10, || {
        proxy.logs().contains("reload applied")
    })
    .await;
    let mut agents = streaming.await.unwrap();
    // New agents use the new set.
    let mut newcomers = Vec::new();
    for n in 201..=260 {
        newcomers.push(agent(listen, id(n).as_str()).await);
    }
    assert!(
        (201..=260).any(|n| !m2.frames_from(&id(n).to_string()).is_empty()),
        "no new agent reached the added manager"
    );
    // A broken configuration is refused and the running one stays.
    std::fs::write(&file, "[[listener]]\nlisten = \"nonsense\"\n").unwrap();
    proxy.signal("HUP");
    wait_for("reload refused", 10, || {
        proxy.logs().contains("reload refused")
    })
    .await;
    agent(listen, id(300).as_str()).await;
    // Every frame of the first 200 agents arrived once, in order, and none disconnected.
    wait_for("all frames", 20, || {
        (1..=200).all(|n| received(&[&m1, &m2], n).len() == 50)
    })
    .await;
    for n in 1..=200 {
        let got: Vec<u64> = m1
            .frames_from(&id(n).to_string())
            .iter()
            .map(|f| payload_seq(f).unwrap())
            .collect();
        assert_eq!(got, (0..=50).collect::<Vec<_>>(), "agent {n}");
    }
    still_open(&mut agents).await;
    assert!(proxy.wait_exit(0).is_none());
    std::fs::remove_dir_all(dir).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigusr2_upgrades_under_load_refusing_no_connection_and_closing_no_agent() {
    let m1 = Manager::start("127.0.0.1:0".parse().unwrap(), "m1", Reply::AckFirst)
        .await
        .unwrap();
    let m2 = Manager::start("127.0.0.1:0".parse().unwrap(), "m2", Reply::AckFirst)
        .await
        .unwrap();
    let listen = free_addr();
    let admin = free_addr();
    let dir = temp_dir("upgrade");
    let file = dir.join("proxy.toml");
    let sock = dir.join("upgrade.sock");
    std::fs::write(&file, config(listen, "none", &[m1.addr(), m2.addr()])).unwrap();
    let admin_arg = admin.to_string();
    let mut old = ProxyProcess::start(
        &[
            "run",
            "--config",
            file.to_str().unwrap(),
            "--upgrade-socket",
            sock.to_str().unwrap(),
            "--admin",
            &admin_arg,
        ],
        listen,
    );
    const N: usize = 200;
    let mut agents = Vec::new();
    for n in 1..=N {
        agents.push(agent(listen, id(n).as_str()).await);
    }
    // Probe: a new connection every few ms during the whole upgrade, each must be served.
    let stop = Arc::new(AtomicBool::new(false));
    let probes = Arc::new(AtomicUsize::new(0));
    let prober = {
        let (stop, probes) = (stop.clone(), probes.clone());
        tokio::spawn(async move {
            let mut n = 1000;
            while !stop.load(Ordering::Relaxed) {
                drop(agent(listen, id(n).as_str()).await);
                probes.fetch_add(1, Ordering::Relaxed);
                n += 1;
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
    };
    let streaming = tokio::spawn(async move {
        stream(&mut agents, 1, 100).await;
        agents
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    old.signal("USR2");
    let status = old
        .wait_exit(30)
        .expect("the old process did not exit after the upgrade");
    assert!(status.success(), "{status:?}\n{}", old.logs());
    let logs = old.logs();
    let new_pid = successor_pid(&logs).unwrap_or_else(|| panic!("no pid in the log:\n{logs}"));
    let kill_new = KillOnDrop(new_pid);
    let mut agents = streaming.await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    stop.store(true, Ordering::Relaxed);
    prober
        .await
        .expect("a connection was refused or not served during the upgrade");
    assert!(probes.load(Ordering::Relaxed) > 10);
    assert!(
        logs.contains(&format!("agent sessions handed over sessions={N}"))
            || logs.contains("sessions handed over"),
        "{logs}"
    );
    // Every frame arrived once; every agent still has its connection, now served by the new process.
    wait_for("all frames", 20, || {
        (1..=N).all(|n| received(&[&m1, &m2], n).len() == 100)
    })
    .await;
    for n in 1..=N {
        assert_eq!(
            received(&[&m1, &m2], n),
            (1..=100).collect::<Vec<_>>(),
            "agent {n}"
        );
    }
    still_open(&mut agents).await;
    // The new process answers the admin API.
    let health = bin()
        .args(["health", "--admin", &admin.to_string()])
        .output()
        .unwrap();
    assert!(
        health.status.success(),
        "{}",
        String::from_utf8_lossy(&health.stdout)
    );
    drop(kill_new);
    std::fs::remove_dir_all(dir).unwrap();
}

/// The successor dies right after it said it was ready (a test-only switch makes it exit
/// then): the old process takes back every session it still holds, accepts again, and its
/// agents' streams go on without a lost or repeated frame.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_successor_that_dies_after_ready_leaves_the_old_process_serving() {
    let m1 = Manager::start("127.0.0.1:0".parse().unwrap(), "m1", Reply::AckFirst)
        .await
        .unwrap();
    let m2 = Manager::start("127.0.0.1:0".parse().unwrap(), "m2", Reply::AckFirst)
        .await
        .unwrap();
    let listen = free_addr();
    let dir = temp_dir("failed-upgrade");
    let file = dir.join("proxy.toml");
    let sock = dir.join("upgrade.sock");
    std::fs::write(&file, config(listen, "none", &[m1.addr(), m2.addr()])).unwrap();
    let mut cmd = bin();
    cmd.args([
        "run",
        "--config",
        file.to_str().unwrap(),
        "--upgrade-socket",
        sock.to_str().unwrap(),
    ])
    .env("WAZUH_PROXY_TEST_EXIT_AFTER_READY", "1");
    let mut old = ProxyProcess::start_command(cmd, listen);
    const N: usize = 50;
    const FRAMES: u64 = 60;
    let mut agents = Vec::new();
    for n in 1..=N {
        agents.push(agent(listen, id(n).as_str()).await);
    }
    let streaming = tokio::spawn(async move {
        stream(&mut agents, 1, FRAMES).await;
        agents
    });
    tokio::time::sleep(Duration::from_millis(150)).await;
    old.signal("USR2");
    wait_for("the old process to accept again", 30, || {
        old.logs().contains("accepting again")
    })
    .await;
    let logs = old.logs();
    assert!(
        logs.contains("exiting right after Ready"),
        "the successor did not take the test switch:\n{logs}"
    );
    assert!(
        logs.contains("upgrade failed, this process keeps serving"),
        "{logs}"
    );
    // The sessions had been detached for the hand-over: they were taken back.
    assert!(logs.contains("taking back the agent sessions"), "{logs}");
    // Still running, and serving new agents.
    assert!(old.child.try_wait().unwrap().is_none(), "{logs}");
    for n in 1000..1010 {
        drop(agent(listen, id(n).as_str()).await);
    }
    // The agents it held kept their connections and every frame arrived once.
    let mut agents = streaming.await.unwrap();
    wait_for("all frames", 20, || {
        (1..=N).all(|n| received(&[&m1, &m2], n).len() as u64 >= FRAMES)
    })
    .await;
    for n in 1..=N {
        assert_eq!(
            received(&[&m1, &m2], n),
            (1..=FRAMES).collect::<Vec<_>>(),
            "agent {n}\n{}",
            old.logs()
        );
    }
    still_open(&mut agents).await;
    // And they keep flowing after it.
    for (i, a) in agents.iter_mut().enumerate() {
        a.send(Bytes::from(agent_payload(Some(id(i + 1)), FRAMES + 1, 100)))
            .await
            .unwrap();
    }
    wait_for("one more frame each", 20, || {
        (1..=N).all(|n| received(&[&m1, &m2], n).len() as u64 == FRAMES + 1)
    })
    .await;
    still_open(&mut agents).await;
    old.signal("TERM");
    assert!(old.wait_exit(20).is_some());
    std::fs::remove_dir_all(dir).unwrap();
}
