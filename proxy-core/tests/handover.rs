//! Binary upgrade: listeners and live agent sessions move to a new relay (as in a new
//! process) over a Unix socket; no connection is refused, no agent disconnects, no frame is
//! lost or duplicated.

use std::os::fd::AsFd;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use tokio::net::{TcpListener, UnixStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use wazuh_proxy_core::balance::{BackendConfig, Balancer, Policy};
use wazuh_proxy_core::proxy;
use wazuh_proxy_core::relay::{AgentRelay, AgentRelayConfig};
use wazuh_proxy_core::sim::{agent_payload, payload_seq, Manager, Reply};
use wazuh_proxy_test_support::*;

fn relay(managers: &[&Manager]) -> Arc<AgentRelay> {
    let backends = managers
        .iter()
        .map(|m| BackendConfig::new(m.addr()))
        .collect();
    Arc::new(AgentRelay::new(
        "agents",
        AgentRelayConfig::default(),
        Balancer::new(Policy::AgentId, backends).unwrap(),
    ))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upgrade_under_load_closes_no_agent_and_loses_no_frame() {
    let m1 = Manager::start("127.0.0.1:0".parse().unwrap(), "m1", Reply::AckFirst)
        .await
        .unwrap();
    let m2 = Manager::start("127.0.0.1:0".parse().unwrap(), "m2", Reply::AckFirst)
        .await
        .unwrap();
    let old = relay(&[&m1, &m2]);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let listener_fd = listener.as_fd().try_clone_to_owned().unwrap();
    let old_stop = CancellationToken::new();
    let old_tracker = TaskTracker::new();
    tokio::spawn(
        old.clone()
            .serve(listener, old_stop.clone(), old_tracker.clone()),
    );

    // 100 agents stream numbered frames throughout, each from its own task.
    const AGENTS: usize = 100;
    const FRAMES: u64 = 300;
    let mut streams = Vec::new();
    for n in 1..=AGENTS {
        streams.push(tokio::spawn(async move {
            let mut conn = connect(addr).await;
            send(&mut conn, agent_payload(Some(id(n)), 0, 100)).await;
            recv(&mut conn).await.expect("ACK");
            for seq in 1..=FRAMES {
                conn.send(Bytes::from(agent_payload(
                    Some(id(n)),
                    seq,
                    80 + (seq as usize % 7) * 50,
                )))
                .await
                .unwrap();
                if seq % 10 == 0 {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }
            conn
        }));
    }
    wait_for("agents connected", 20, || old.sessions().len() == AGENTS).await;
    // Hand over mid-stream.
    wait_for("streams under way", 20, || {
        m1.frame_count() + m2.frame_count() > AGENTS * 20
    })
    .await;
    assert!(
        m1.frame_count() + m2.frame_count() < AGENTS * FRAMES as usize / 2,
        "streams ended too soon"
    );

    // The new "process".
    let (old_side, new_side) = UnixStream::pair().unwrap();
    let new = relay(&[&m1, &m2]);
    let new_tracker = TaskTracker::new();
    let new_stop = CancellationToken::new();
    let importer = {
        let (new, new_tracker, new_stop) = (new.clone(), new_tracker.clone(), new_stop.clone());
        tokio::spawn(async move {
            let inherited = proxy::handover::receive_inheritance(&new_side)
                .await
                .unwrap()
                .listeners;
            assert_eq!(inherited.len(), 1);
            let std_listener =
                std::net::TcpListener::from(inherited.into_iter().next().unwrap().socket);
            std_listener.set_nonblocking(true).unwrap();
            let l = TcpListener::from_std(std_listener).unwrap();
            tokio::spawn(new.clone().serve(l, new_stop, new_tracker.clone()));
            proxy::handover::adopt_sessions(&new_side, std::slice::from_ref(&new), &new_tracker)
                .await
                .unwrap()
        })
    };
    proxy::handover::offer_listeners(
        &old_side,
        &[("agents".into(), addr, false, listener_fd.as_fd())],
    )
    .await
    .unwrap();
    // While both processes hold the listener, and after: new agents are always accepted.
    old_stop.cancel();
    let mut late = connect(addr).await;
    send(&mut late, agent_payload(Some(id(900)), 0, 100)).await;
    recv(&mut late)
        .await
        .expect("a new agent during the upgrade is served");
    let handed = proxy::handover::hand_over_sessions(
        &old_side,
        std::slice::from_ref(&old),
        Duration::from_secs(20),
    )
    .await
    .unwrap();
    let adopted = importer.await.unwrap();
    assert_eq!(handed, AGENTS);
    assert_eq!(adopted, AGENTS);

    let mut conns = Vec::new();
    for s in streams {
        conns.push(s.await.unwrap());
    }
    let total = |m: &Manager| {
        (1..=AGENTS)
            .map(|n| m.frames_from(&id(n).to_string()).len())
            .sum::<usize>()
    };
    // Each agent: 0..=FRAMES once, plus the startup frame replayed once to register it again.
    wait_for("every frame", 20, || {
        total(&m1) + total(&m2) == AGENTS * (FRAMES as usize + 2)
    })
    .await;
    for n in 1..=AGENTS {
        let key = id(n).to_string();
        let mut got: Vec<u64> = m1
            .frames_from(&key)
            .iter()
            .chain(m2.frames_from(&key).iter())
            .map(|f| payload_seq(f).unwrap())
            .collect();
        let replays = got.iter().filter(|s| **s == 0).count();
        assert_eq!(replays, 2, "agent {key}: startup frame and its one replay");
        got.retain(|s| *s != 0);
        assert_eq!(got, (1..=FRAMES).collect::<Vec<_>>(), "agent {key}");
    }
    // No agent saw its connection close.
    for (n, conn) in conns.iter_mut().enumerate() {
        match tokio::time::timeout(Duration::from_millis(20), conn.next()).await {
            Err(_) | Ok(Some(Ok(_))) => {}
            Ok(other) => panic!("agent {} lost its connection: {other:?}", n + 1),
        }
    }
    assert_eq!(new.sessions().len(), AGENTS + 1);
    assert!(old.sessions().is_empty());
}
