//! Batching under load (`pace`): a relay on a runtime that calls `pace::before_park` and
//! `pace::after_unpark` pauses when it is saturated, never when it is quiet, and loses, duplicates or reorders nothing either
//! way. One test in this file: the pause counter and window are process-wide.

use std::time::Duration;

use bytes::Bytes;
use futures_util::SinkExt;
use wazuh_proxy_core::balance::Policy;
use wazuh_proxy_core::pace;
use wazuh_proxy_core::relay::AgentRelayConfig;
use wazuh_proxy_core::sim::{agent_payload, payload_seq, Manager, Reply};
use wazuh_proxy_test_support::*;

const AGENTS: usize = 20;

#[test]
fn a_busy_relay_pauses_a_quiet_one_does_not_and_every_frame_arrives_in_order() {
    pace::set_window(Duration::from_millis(1));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .on_thread_park(pace::before_park)
        .on_thread_unpark(pace::after_unpark)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let m = Manager::start("127.0.0.1:0".parse().unwrap(), "m1", Reply::AckFirst)
            .await
            .unwrap();
        let relay =
            TestRelay::start(&[m.addr()], Policy::AgentId, AgentRelayConfig::default()).await;
        let mut agents = Vec::new();
        for a in 1..=AGENTS {
            let mut conn = connect(relay.addr).await;
            send(&mut conn, agent_payload(Some(id(a)), 0, 100)).await;
            recv(&mut conn).await.expect("ACK");
            agents.push(conn);
        }

        // Busy: bursts of 2 KB frames from every agent at once (up to 10 bursts of 8 MB
        // each, until the relay has paused at least once).
        let before = pace::pauses();
        let mut seq = 0u64;
        for _ in 0..10 {
            let mut sends = Vec::new();
            for (n, mut conn) in agents.drain(..).enumerate() {
                let first = seq + 1;
                sends.push(tokio::spawn(async move {
                    for s in first..first + 200 {
                        conn.feed(Bytes::from(agent_payload(Some(id(n + 1)), s, 2048)))
                            .await
                            .unwrap();
                    }
                    SinkExt::<Bytes>::flush(&mut conn).await.unwrap();
                    conn
                }));
            }
            for s in sends {
                agents.push(s.await.unwrap());
            }
            seq += 200;
            let want = AGENTS * (seq as usize + 1);
            wait_for("the burst", 30, || m.frame_count() == want).await;
            if pace::pauses() > before {
                break;
            }
        }
        assert!(
            pace::pauses() > before,
            "no pause after {seq} frames of 2 KB from each of {AGENTS} agents"
        );

        // Quiet: a frame every 20 ms moves far less than 64 KiB per round. (First let every
        // worker finish the busy round it may still be in: its pause would count here.)
        tokio::time::sleep(Duration::from_millis(100)).await;
        let before = pace::pauses();
        for s in seq + 1..=seq + 10 {
            send(&mut agents[0], agent_payload(Some(id(1)), s, 200)).await;
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        seq += 10;
        wait_for("the quiet frames", 10, || {
            m.frame_count() == AGENTS * (seq as usize - 9) + 10
        })
        .await;
        assert_eq!(pace::pauses(), before, "a quiet relay paused");

        for a in 1..=AGENTS {
            let got: Vec<u64> = m
                .frames_from(&id(a).to_string())
                .iter()
                .map(|f| payload_seq(f).unwrap())
                .collect();
            let last = if a == 1 { seq } else { seq - 10 };
            assert_eq!(got, (0..=last).collect::<Vec<_>>(), "agent {a}");
        }
    });
    pace::set_window(Duration::ZERO);
}
