//! A manager that goes silent (its packets dropped both ways: no FIN, no RST) under streaming
//! agents: the proxy notices within its bound, every frame reaches a manager, in order, and
//! none twice except the few whose acknowledgement was in flight when the link went down.
//!
//! Needs root and `iptables` (rules on loopback, for one port, removed on drop). Without them
//! the test says so loudly and passes, except under CI (`CI=true`), where it fails.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::SinkExt;
use wazuh_proxy_core::balance::Policy;
use wazuh_proxy_core::relay::AgentRelayConfig;
use wazuh_proxy_core::sim::{agent_payload, payload_seq, Manager, Reply};
use wazuh_proxy_test_support::wazuh::Blackhole;
use wazuh_proxy_test_support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blackholed_manager_loses_no_frame() {
    if let Err(why) = Blackhole::available() {
        skip_or_fail_in_ci(&format!(
            "a_blackholed_manager_loses_no_frame needs root and a working iptables: {why}"
        ));
        return;
    }
    let m1 = Manager::start("127.0.0.1:0".parse().unwrap(), "m1", Reply::AckFirst)
        .await
        .unwrap();
    let m2 = Manager::start("127.0.0.1:0".parse().unwrap(), "m2", Reply::AckFirst)
        .await
        .unwrap();
    let user_timeout = Duration::from_secs(2);
    let cfg = AgentRelayConfig {
        manager_user_timeout: Some(user_timeout),
        connect_timeout: Duration::from_millis(500),
        ..Default::default()
    };
    let relay = TestRelay::start(&[m1.addr(), m2.addr()], Policy::AgentId, cfg).await;

    const AGENTS: usize = 100;
    const FRAMES: u64 = 300;
    let mut conns = Vec::new();
    for a in 1..=AGENTS {
        let mut c = connect(relay.addr).await;
        send(&mut c, agent_payload(Some(id(a)), 0, 120)).await;
        recv(&mut c).await.expect("ACK");
        conns.push(c);
    }
    let on_m1 = m1.agents().len();
    assert!(on_m1 > 0 && on_m1 < AGENTS);

    // Every agent streams FRAMES frames, 10 ms apart per round; the link to m1 goes down a
    // third of the way through.
    let mut hole = None;
    let mut cut_at = None;
    for seq in 1..=FRAMES {
        for (n, c) in conns.iter_mut().enumerate() {
            c.send(Bytes::from(agent_payload(
                Some(id(n + 1)),
                seq,
                100 + (seq as usize * 7) % 300,
            )))
            .await
            .unwrap();
        }
        if seq == FRAMES / 3 {
            hole = Some(Blackhole::port(m1.addr().port()));
            cut_at = Some(Instant::now());
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let cut_at = cut_at.unwrap();
    // Each agent of m1: every frame at m1 or m2, exactly once (the control frame replayed to
    // m2, seq 0, aside).
    let expected = AGENTS * (FRAMES as usize + 1);
    let all_there = |m1: &Manager, m2: &Manager| {
        let mut total = 0;
        for a in 1..=AGENTS {
            let mut seen: Vec<u64> = [m1, m2]
                .iter()
                .flat_map(|m| m.frames_from(id(a).as_str()))
                .filter_map(|f| payload_seq(&f))
                .filter(|s| *s > 0)
                .collect();
            seen.sort_unstable();
            seen.dedup();
            total += seen.len() + 1;
        }
        total
    };
    wait_for("every frame at a manager", 60, || {
        all_there(&m1, &m2) == expected
    })
    .await;
    let resumed = cut_at.elapsed();
    let mut lost = 0;
    let mut duplicated = 0;
    let mut out_of_order = 0;
    for a in 1..=AGENTS {
        let at1: Vec<u64> = m1
            .frames_from(id(a).as_str())
            .iter()
            .filter_map(|f| payload_seq(f))
            .collect();
        let at2: Vec<u64> = m2
            .frames_from(id(a).as_str())
            .iter()
            .filter_map(|f| payload_seq(f))
            .collect();
        let mut all: Vec<u64> = at1
            .iter()
            .chain(at2.iter())
            .copied()
            .filter(|s| *s > 0)
            .collect();
        let n = all.len();
        all.sort_unstable();
        all.dedup();
        duplicated += n - all.len();
        lost += FRAMES as usize - all.len();
        // Each manager received the agent's frames in order.
        for seqs in [&at1, &at2] {
            let mut s: Vec<u64> = seqs.iter().copied().filter(|s| *s > 0).collect();
            let sorted = {
                let mut c = s.clone();
                c.sort_unstable();
                c
            };
            if s != sorted {
                out_of_order += 1;
            }
            s.clear();
        }
    }
    let stats = relay.relay.stats();
    eprintln!(
        "blackhole: {on_m1} of {AGENTS} agents on m1; all frames delivered {resumed:?} after the cut; \
         lost {lost}, duplicated {duplicated}, out of order {out_of_order}; failovers {}, resent {}, at risk {}",
        stats.failovers.load(Ordering::Relaxed),
        stats.frames_resent.load(Ordering::Relaxed),
        stats.frames_at_risk.load(Ordering::Relaxed),
    );
    assert_eq!(lost, 0, "frames lost");
    // The floor: a frame that reached m1 just before the cut but whose acknowledgement was
    // lost with the link looks unacknowledged, and is re-sent. Only frames of the manager's
    // last delayed-ACK window (up to 40 ms; at this rate a few per connection) can be.
    assert!(
        duplicated <= on_m1 * 5,
        "{duplicated} frames duplicated: more than the acknowledgements in flight at the cut"
    );
    assert_eq!(out_of_order, 0, "frames reordered");
    assert_eq!(
        stats.failovers.load(Ordering::Relaxed) as usize,
        on_m1,
        "every agent of m1 moved"
    );
    assert_eq!(
        relay.relay.sessions().len(),
        AGENTS,
        "an agent was disconnected"
    );
    drop(hole);
    let _: SocketAddr = m1.addr();
}
