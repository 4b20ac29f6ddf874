//! A fault stays with what it belongs to: one agent refused by the managers, one session's bad
//! manager frame, one connection claiming someone else's ID never touch a manager's standing
//! or another agent's session.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use wazuh_proxy_core::balance::Policy;
use wazuh_proxy_core::frame::{encode_frame, MAX_PAYLOAD};
use wazuh_proxy_core::relay::{AgentRelayConfig, MIN_MAX_PAYLOAD};
use wazuh_proxy_core::sim::{ack_payload, agent_payload, payload_seq, Manager, Reply};
use wazuh_proxy_core::stats::Rejection;
use wazuh_proxy_test_support::*;

/// Connects agents `ids`, each acknowledged; returns their connections.
async fn fleet(relay: SocketAddr, ids: impl Iterator<Item = usize>) -> Vec<(usize, AgentConn)> {
    let mut out = Vec::new();
    for a in ids {
        let mut conn = connect(relay).await;
        send(&mut conn, agent_payload(Some(id(a)), 0, 100)).await;
        recv(&mut conn).await.expect("ACK");
        out.push((a, conn));
    }
    out
}

async fn stream(agents: &mut [(usize, AgentConn)], seqs: std::ops::RangeInclusive<u64>) {
    for (a, conn) in agents.iter_mut() {
        for seq in seqs.clone() {
            conn.send(Bytes::from(agent_payload(Some(id(*a)), seq, 200)))
                .await
                .unwrap();
        }
    }
}

/// Every frame of agent `a` across both managers, in arrival order per manager, as sequence
/// numbers (the startup replayed on a move shows as a second 0).
fn seqs(ms: &[&Manager], a: usize) -> Vec<u64> {
    let mut all: Vec<u64> = ms
        .iter()
        .flat_map(|m| m.frames_from(id(a).as_str()))
        .map(|f| payload_seq(&f).unwrap())
        .collect();
    all.sort_unstable();
    all
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_refused_by_every_manager_leaves_them_available_while_200_others_stream() {
    let m1 = manager("m1").await;
    let m2 = manager("m2").await;
    // Agent 666 was removed on the managers but keeps running: remoted closes it unanswered.
    m1.refuse("666");
    m2.refuse("666");
    let relay = TestRelay::start(
        &[m1.addr(), m2.addr()],
        Policy::AgentId,
        AgentRelayConfig::default(),
    )
    .await;
    let mut agents = fleet(relay.addr, 1..=200).await;
    stream(&mut agents, 1..=5).await;

    let mut removed = connect(relay.addr).await;
    let started = Instant::now();
    send(&mut removed, agent_payload(Some(id(666)), 0, 100)).await;
    // The bystanders keep streaming while the proxy tries the refused agent.
    stream(&mut agents, 6..=10).await;
    assert!(
        recv(&mut removed).await.is_none(),
        "the refused agent got an answer"
    );
    let took = started.elapsed();
    assert!(took < Duration::from_secs(15), "{took:?}");
    // Bounded: each manager tried a few times, not a hot loop for the hold timeout.
    let refusals = m1.refusals() + m2.refusals();
    assert!((2..=6).contains(&refusals), "{refusals} refusals");
    let balancer = relay.relay.balancer();
    let now = Instant::now();
    assert!(
        balancer.backends().iter().all(|b| b.is_available(now)),
        "an agent-scoped refusal marked a manager failed"
    );
    let stats = relay.relay.stats();
    assert_eq!(stats.failovers.load(Ordering::Relaxed), 0);
    assert_eq!(stats.rejected(Rejection::AgentRefused), 1);
    assert!(stats.manager_refusals.load(Ordering::Relaxed) >= 2);

    // Its reconnection is answered by the proxy: no manager sees it.
    let mut again = connect(relay.addr).await;
    send(&mut again, agent_payload(Some(id(666)), 0, 100)).await;
    assert!(recv(&mut again).await.is_none());
    assert_eq!(m1.refusals() + m2.refusals(), refusals);
    assert_eq!(stats.rejected(Rejection::AgentBackoff), 1);

    // Every other agent: still connected, every frame delivered once, in order, no move.
    stream(&mut agents, 11..=12).await;
    wait_for("every bystander frame", 10, || {
        m1.frame_count() + m2.frame_count() == 200 * 13
    })
    .await;
    for (a, _) in &agents {
        assert_eq!(
            seqs(&[&m1, &m2], *a),
            (0..=12).collect::<Vec<_>>(),
            "agent {a}"
        );
    }
    assert_eq!(relay.relay.sessions().len(), 200);
    assert_eq!(stats.moves.load(Ordering::Relaxed), 0);
}

#[tokio::test]
async fn an_agent_removed_on_one_manager_continues_on_the_other_and_nobody_is_failed() {
    let m1 = manager("m1").await;
    let m2 = manager("m2").await;
    let relay = TestRelay::start(
        &[m1.addr(), m2.addr()],
        Policy::AgentId,
        AgentRelayConfig::default(),
    )
    .await;
    // An agent whose first choice is m1.
    let mut found = None;
    for a in 1..=50 {
        let mut c = connect(relay.addr).await;
        send(&mut c, agent_payload(Some(id(a)), 0, 64)).await;
        if recv(&mut c).await.unwrap() == ack_payload("m1") {
            found = Some((a, c));
            break;
        }
    }
    let (a, mut c) = found.expect("an agent hashed to m1");
    // m1 drops the agent (its key went away there, not yet on m2): remoted closes it.
    m1.refuse(id(a).as_str());
    send(&mut c, agent_payload(Some(id(a)), 1, 64)).await;
    // The agent stays connected: m2 answers the startup the proxy replays there.
    assert_eq!(recv(&mut c).await.unwrap(), ack_payload("m2"));
    send(&mut c, agent_payload(Some(id(a)), 2, 64)).await;
    wait_for("the next frame at m2", 5, || {
        m2.frames_from(id(a).as_str())
            .iter()
            .any(|f| payload_seq(f) == Some(2))
    })
    .await;
    let now = Instant::now();
    let balancer = relay.relay.balancer();
    assert!(balancer.backends().iter().all(|b| b.is_available(now)));
    let stats = relay.relay.stats();
    assert_eq!(stats.rejected(Rejection::AgentRefused), 0);
    assert!(stats.manager_refusals.load(Ordering::Relaxed) >= 1);
    let live = relay
        .relay
        .sessions()
        .by_key(&wazuh_proxy_core::session::SessionKey::Agent(id(a)))
        .unwrap();
    assert_eq!(live.backend(), Some(m2.addr()));
}

#[tokio::test]
async fn a_ping_first_session_cannot_carry_another_agents_frames() {
    let m = manager("m").await;
    let relay = TestRelay::start(&[m.addr()], Policy::AgentId, AgentRelayConfig::default()).await;
    let mut c = connect(relay.addr).await;
    send(&mut c, b"#ping".to_vec()).await;
    send(&mut c, agent_payload(Some(id(1)), 0, 64)).await;
    // Closed: a session identified by its source address carries no agent ID later.
    loop {
        match tokio::time::timeout(Duration::from_secs(5), c.next()).await {
            Ok(Some(Ok(_))) => continue,
            Ok(_) => break,
            Err(_) => panic!("not closed"),
        }
    }
    assert!(m.frames_from("001").is_empty(), "agent 001's frame passed");
    assert_eq!(relay.relay.stats().rejected(Rejection::AgentIdChanged), 1);
}

/// `max_payload` at both ends of its range relays whole frames (the largest allowed) both
/// ways, and refuses one byte more.
#[tokio::test]
async fn max_payload_at_its_minimum_and_maximum_relays_correctly() {
    for max in [MIN_MAX_PAYLOAD, MAX_PAYLOAD] {
        let m = Manager::start("127.0.0.1:0".parse().unwrap(), "m", Reply::Echo)
            .await
            .unwrap();
        let cfg = AgentRelayConfig {
            max_payload: max,
            ..Default::default()
        };
        cfg.validate().unwrap();
        let relay = TestRelay::start(&[m.addr()], Policy::AgentId, cfg).await;
        let mut c = connect(relay.addr).await;
        for (seq, size) in [(0, 64usize), (1, max as usize), (2, max as usize - 1)] {
            let p = agent_payload(Some(id(1)), seq, size);
            send(&mut c, p.clone()).await;
            let echo = recv(&mut c).await.expect("echo");
            // The stand-in echoes the ciphertext after #AES: (the !001! prefix is dropped).
            assert_eq!(&echo[5..], &p[10..], "max {max}, size {size}");
        }
        // One byte over the limit closes this connection only.
        let mut raw = tokio::net::TcpStream::connect(relay.addr).await.unwrap();
        use tokio::io::AsyncWriteExt;
        raw.write_all(&(max + 1).to_le_bytes()).await.unwrap();
        assert!(closed_within(&mut raw, 5).await);
        send(&mut c, agent_payload(Some(id(1)), 3, 100)).await;
        assert!(
            recv(&mut c).await.is_some(),
            "max {max}: the good session was hurt"
        );
        let _ = encode_frame(b"x", max);
    }
}

#[test]
fn impossible_settings_are_refused_before_they_can_run() {
    let ok = AgentRelayConfig::default();
    ok.validate().unwrap();
    let bad = [
        AgentRelayConfig {
            max_payload: MIN_MAX_PAYLOAD - 1,
            ..Default::default()
        },
        AgentRelayConfig {
            max_payload: MAX_PAYLOAD + 1,
            ..Default::default()
        },
        AgentRelayConfig {
            idle_timeout: Some(Duration::from_secs(10)),
            reply_timeout: Some(Duration::from_secs(20)),
            ..Default::default()
        },
        AgentRelayConfig {
            idle_timeout: Some(Duration::from_secs(30)),
            ..Default::default()
        },
        AgentRelayConfig {
            first_frame_timeout: Duration::ZERO,
            ..Default::default()
        },
        AgentRelayConfig {
            refused_backoff: Duration::from_secs(10),
            refused_backoff_max: Duration::from_secs(5),
            ..Default::default()
        },
        AgentRelayConfig {
            manager_user_timeout: Some(Duration::from_millis(10)),
            ..Default::default()
        },
    ];
    for (i, cfg) in bad.iter().enumerate() {
        assert!(cfg.validate().is_err(), "case {i} accepted: {cfg:?}");
    }
}
