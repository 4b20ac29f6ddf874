//! Agents stay connected when a manager dies, refuses them, or is drained.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use tokio::net::TcpListener;
use tokio_util::codec::Framed;
use wazuh_proxy_core::balance::Policy;
use wazuh_proxy_core::frame::FrameCodec;
use wazuh_proxy_core::relay::AgentRelayConfig;
use wazuh_proxy_core::sim::{ack_payload, agent_payload, payload_seq, Manager, Reply};
use wazuh_proxy_test_support::*;

fn seqs(m: &Manager, agent: usize) -> Vec<u64> {
    m.frames_from(&id(agent).to_string())
        .iter()
        .map(|f| payload_seq(f).unwrap())
        .collect()
}

/// Agents 1..=n connected and acknowledged, each with the manager name that answered.
async fn fleet(relay: SocketAddr, n: usize) -> Vec<(AgentConn, String)> {
    let mut out = Vec::new();
    for a in 1..=n {
        let mut conn = connect(relay).await;
        send(&mut conn, agent_payload(Some(id(a)), 0, 100)).await;
        let ack = recv(&mut conn).await.expect("ACK");
        out.push((
            conn,
            String::from_utf8_lossy(&ack)
                .rsplit(' ')
                .next()
                .unwrap()
                .to_owned(),
        ));
    }
    out
}

async fn stream(agents: &mut [(AgentConn, String)], seqs: std::ops::RangeInclusive<u64>) {
    for (n, (conn, _)) in agents.iter_mut().enumerate() {
        for seq in seqs.clone() {
            conn.send(Bytes::from(agent_payload(
                Some(id(n + 1)),
                seq,
                60 + (seq as usize * 31) % 900,
            )))
            .await
            .unwrap();
        }
    }
}

/// Every agent connection is still open (nothing but ACK frames to read, no close).
async fn all_open(agents: &mut [(AgentConn, String)]) {
    for (n, (conn, _)) in agents.iter_mut().enumerate() {
        loop {
            match tokio::time::timeout(Duration::from_millis(5), conn.next()).await {
                Err(_) => break,
                Ok(Some(Ok(_))) => continue,
                Ok(other) => panic!("agent {} lost its connection: {other:?}", n + 1),
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_a_manager_keeps_all_200_agents_connected_and_loses_nothing_sent_after() {
    let m1 = Manager::start("127.0.0.1:0".parse().unwrap(), "m1", Reply::AckFirst)
        .await
        .unwrap();
    let m2 = Manager::start("127.0.0.1:0".parse().unwrap(), "m2", Reply::AckFirst)
        .await
        .unwrap();
    let relay = TestRelay::start(
        &[m1.addr(), m2.addr()],
        Policy::AgentId,
        AgentRelayConfig::default(),
    )
    .await;
    const N: usize = 200;
    let mut agents = fleet(relay.addr, N).await;
    let on_m1: Vec<usize> = (1..=N).filter(|a| agents[a - 1].1 == "m1").collect();
    assert!(!on_m1.is_empty() && on_m1.len() < N);
    stream(&mut agents, 1..=20).await;
    wait_for("first 20 frames", 20, || {
        m1.frame_count() + m2.frame_count() == N * 21
    })
    .await;

    m1.stop().await;
    let stats = relay.relay.stats().clone();
    // At least once each: an agent that reconnects to m1 while it is still closing (its
    // listener can take one more connection) fails over a second time.
    wait_for("every agent of m1 moved", 20, || {
        stats.failovers.load(Ordering::Relaxed) >= on_m1.len() as u64
    })
    .await;
    assert_eq!(relay.relay.sessions().len(), N, "a session ended");
    stream(&mut agents, 21..=40).await;
    // Moved agents: the survivor first sees the replayed startup frame, then 21..=40.
    let expected = (N - on_m1.len()) * 41 + on_m1.len() * 21;
    wait_for("frames after the kill", 20, || m2.frame_count() == expected).await;
    for a in 1..=N {
        let got = seqs(&m2, a);
        let want: Vec<u64> = if on_m1.contains(&a) {
            std::iter::once(0).chain(21..=40).collect()
        } else {
            (0..=40).collect()
        };
        assert_eq!(got, want, "agent {a}");
    }
    all_open(&mut agents).await;
    assert_eq!(m2.open_connections(), N);
    // At risk: what each moved agent wrote to m1 (counted once, not again at a second
    // failover), plus the replayed startup of such a second attempt.
    let extra = stats.failovers.load(Ordering::Relaxed) - on_m1.len() as u64;
    assert!(stats.frames_at_risk.load(Ordering::Relaxed) <= (on_m1.len() * 21) as u64 + extra);
}

#[tokio::test]
async fn drain_empties_a_manager_without_disconnecting_anyone() {
    let m1 = Manager::start("127.0.0.1:0".parse().unwrap(), "m1", Reply::AckFirst)
        .await
        .unwrap();
    let m2 = Manager::start("127.0.0.1:0".parse().unwrap(), "m2", Reply::AckFirst)
        .await
        .unwrap();
    let relay = TestRelay::start(
        &[m1.addr(), m2.addr()],
        Policy::AgentId,
        AgentRelayConfig::default(),
    )
    .await;
    const N: usize = 40;
    let mut agents = fleet(relay.addr, N).await;
    let on_m1 = agents.iter().filter(|a| a.1 == "m1").count();
    stream(&mut agents, 1..=5).await;
    wait_for("frames", 10, || {
        m1.frame_count() + m2.frame_count() == N * 6
    })
    .await;
    let asked = relay.relay.drain_backend(m1.addr()).unwrap();
    assert_eq!(asked, on_m1);
    wait_for("m1 emptied", 10, || m1.open_connections() == 0).await;
    stream(&mut agents, 6..=10).await;
    // Moved agents: the replayed startup frame, then 6..=10 at m2.
    let expected = (N - on_m1) * 11 + on_m1 * 6;
    wait_for("frames after the drain", 10, || {
        m2.frame_count() == expected
    })
    .await;
    for (n, (_, first)) in agents.iter().enumerate() {
        let a = n + 1;
        if first == "m1" {
            assert_eq!(seqs(&m1, a), (0..=5).collect::<Vec<_>>(), "agent {a} at m1");
            assert_eq!(
                seqs(&m2, a),
                std::iter::once(0).chain(6..=10).collect::<Vec<_>>(),
                "agent {a} at m2"
            );
        } else {
            assert_eq!(seqs(&m2, a), (0..=10).collect::<Vec<_>>(), "agent {a}");
        }
    }
    all_open(&mut agents).await;
    assert_eq!(
        relay.relay.stats().moves.load(Ordering::Relaxed),
        on_m1 as u64
    );
    // Back into rotation: rebalance returns exactly those agents, again without disconnects.
    relay.relay.undrain_backend(m1.addr()).unwrap();
    assert_eq!(relay.relay.rebalance(usize::MAX), on_m1);
    wait_for("agents back on m1", 10, || m1.open_connections() == on_m1).await;
    assert_eq!(relay.relay.rebalance(usize::MAX), 0);
    all_open(&mut agents).await;
}

/// A manager that refuses the first `refusals` connections the way remoted does for "Agent key
/// already in use" (reads the frame, closes), then acknowledges like a stand-in.
async fn refusing_manager(refusals: usize) -> (SocketAddr, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = Arc::new(AtomicUsize::new(0));
    let count = seen.clone();
    tokio::spawn(async move {
        loop {
            let Ok((s, _)) = listener.accept().await else {
                break;
            };
            let n = count.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let mut framed = Framed::new(s, FrameCodec::default());
                let Some(Ok(_first)) = framed.next().await else {
                    return;
                };
                if n < refusals {
                    return; // refused: closed without an answer
                }
                let _ = framed.send(Bytes::from(ack_payload("patient"))).await;
                while let Some(Ok(_)) = framed.next().await {}
            });
        }
    });
    (addr, seen)
}

#[tokio::test]
async fn a_refusal_is_retried_while_the_agent_waits() {
    let (addr, seen) = refusing_manager(2).await;
    let relay = TestRelay::start(&[addr], Policy::AgentId, AgentRelayConfig::default()).await;
    let mut agent = connect(relay.addr).await;
    send(&mut agent, agent_payload(Some(id(5)), 0, 80)).await;
    // The agent sees only a slower acknowledgement.
    assert_eq!(recv(&mut agent).await.unwrap(), ack_payload("patient"));
    assert_eq!(seen.load(Ordering::SeqCst), 3);
    // Refusals of one agent: the manager was never marked failed.
    assert_eq!(
        relay.relay.stats().manager_refusals.load(Ordering::Relaxed),
        2
    );
    assert_eq!(relay.relay.stats().failovers.load(Ordering::Relaxed), 0);
    assert!(relay
        .relay
        .balancer()
        .any_available(std::time::Instant::now()));
}

#[tokio::test]
async fn a_refusal_moves_the_agent_to_another_manager() {
    let (refuser, _) = refusing_manager(usize::MAX).await;
    let good = Manager::start("127.0.0.1:0".parse().unwrap(), "good", Reply::AckFirst)
        .await
        .unwrap();
    let relay = TestRelay::start(
        &[refuser, good.addr()],
        Policy::AgentId,
        AgentRelayConfig::default(),
    )
    .await;
    for a in 1..=10 {
        let mut agent = connect(relay.addr).await;
        send(&mut agent, agent_payload(Some(id(a)), 0, 80)).await;
        assert_eq!(
            recv(&mut agent).await.unwrap(),
            ack_payload("good"),
            "agent {a}"
        );
    }
}

#[tokio::test]
async fn a_manager_that_never_answers_the_handshake_is_left_for_another() {
    let silent = Manager::start("127.0.0.1:0".parse().unwrap(), "silent", Reply::Silent)
        .await
        .unwrap();
    let good = Manager::start("127.0.0.1:0".parse().unwrap(), "good", Reply::AckFirst)
        .await
        .unwrap();
    let cfg = AgentRelayConfig {
        reply_timeout: Some(Duration::from_millis(300)),
        ..Default::default()
    };
    let relay = TestRelay::start(&[silent.addr(), good.addr()], Policy::AgentId, cfg).await;
    for a in 1..=6 {
        let mut agent = connect(relay.addr).await;
        send(&mut agent, agent_payload(Some(id(a)), 0, 80)).await;
        assert_eq!(
            recv(&mut agent).await.unwrap(),
            ack_payload("good"),
            "agent {a}"
        );
    }
}

/// An agent refused by a manager that never answered it continues on another; with the copy of
/// unacknowledged frames its frames go again, without it (`resend_unacknowledged = false`)
/// only the replayed startup does, and the agent stays connected either way.
#[tokio::test]
async fn the_copy_of_unacknowledged_frames_can_be_turned_off() {
    for keep in [true, false] {
        let m1 = Manager::start("127.0.0.1:0".parse().unwrap(), "m1", Reply::Silent)
            .await
            .unwrap();
        let m2 = Manager::start("127.0.0.1:0".parse().unwrap(), "m2", Reply::AckFirst)
            .await
            .unwrap();
        let config = AgentRelayConfig {
            resend_unacknowledged: keep,
            ..AgentRelayConfig::default()
        };
        let relay = TestRelay::start(&[m1.addr(), m2.addr()], Policy::AgentId, config).await;
        // An agent whose manager by ID is the silent m1.
        let mut found = None;
        for a in 1..=64 {
            let mut conn = connect(relay.addr).await;
            send(&mut conn, agent_payload(Some(id(a)), 0, 100)).await;
            wait_for("the startup", 5, || {
                m1.frames_from(&id(a).to_string()).len() + m2.frames_from(&id(a).to_string()).len()
                    == 1
            })
            .await;
            if m1.frames_from(&id(a).to_string()).len() == 1 {
                found = Some((a, conn));
                break;
            }
        }
        let (a, mut conn) = found.expect("an agent on m1");
        for seq in 1..=5 {
            send(&mut conn, agent_payload(Some(id(a)), seq, 100)).await;
        }
        wait_for("six frames on m1", 5, || seqs(&m1, a).len() == 6).await;
        m1.refuse(&id(a).to_string());
        send(&mut conn, agent_payload(Some(id(a)), 6, 100)).await;
        wait_for("the agent on m2", 10, || !seqs(&m2, a).is_empty()).await;
        send(&mut conn, agent_payload(Some(id(a)), 7, 100)).await;
        wait_for("frame 7 on m2", 10, || seqs(&m2, a).contains(&7)).await;
        let resent = relay.relay.stats().frames_resent.load(Ordering::Relaxed);
        let got = seqs(&m2, a);
        if keep {
            // m1 processed nothing: every frame goes again, in order.
            assert_eq!(got, (0..=7).collect::<Vec<u64>>(), "with the copy");
            assert!(resent >= 6, "{resent} frames re-sent");
        } else {
            assert_eq!(resent, 0);
            assert_eq!(got.first(), Some(&0), "the startup replayed first: {got:?}");
            assert!(!got.contains(&3), "frames re-sent without a copy: {got:?}");
        }
        // Connected throughout.
        all_open(&mut [(conn, String::new())]).await;
    }
}
