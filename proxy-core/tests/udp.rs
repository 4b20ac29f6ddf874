//! The UDP agent relay over real loopback sockets.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::net::UdpSocket;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use wazuh_proxy_core::balance::{BackendConfig, BalanceKey, Balancer, Policy};
use wazuh_proxy_core::envelope::AgentId;
use wazuh_proxy_core::stats::Rejection;
use wazuh_proxy_core::udp::{UdpRelay, UdpRelayConfig};
use wazuh_proxy_test_support::*;

/// A datagram and its source address.
type Datagram = (SocketAddr, Vec<u8>);

/// A stand-in manager on 1514/UDP: records every datagram with its source address and answers
/// `#AES:<name>|<datagram>` to that source, as remoted answers with `sendto()`. A datagram
/// containing `bad-reply` is answered with an ID-prefixed payload, which no manager sends.
struct UdpManager {
    addr: SocketAddr,
    seen: Arc<Mutex<Vec<Datagram>>>,
}

impl UdpManager {
    async fn start(name: &'static str) -> UdpManager {
        let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let addr = sock.local_addr().unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let log = seen.clone();
        tokio::spawn(async move {
            let mut buf = vec![0u8; 70_000];
            loop {
                let Ok((n, from)) = sock.recv_from(&mut buf).await else {
                    continue;
                };
                let datagram = buf[..n].to_vec();
                log.lock().unwrap().push((from, datagram.clone()));
                let reply = if contains(&datagram, b"bad-reply") {
                    b"!001!#AES:bad".to_vec()
                } else {
                    reply_for(name, &datagram)
                };
                let _ = sock.send_to(&reply, from).await;
            }
        });
        UdpManager { addr, seen }
    }

    fn seen(&self) -> Vec<Datagram> {
        self.seen.lock().unwrap().clone()
    }

    /// The datagrams whose `!ID!` prefix is `id`, with their source addresses.
    fn sent_by(&self, id: &str) -> Vec<Datagram> {
        let prefix = format!("!{id}!");
        self.seen()
            .into_iter()
            .filter(|(_, d)| d.starts_with(prefix.as_bytes()))
            .collect()
    }
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

fn reply_for(manager: &str, datagram: &[u8]) -> Vec<u8> {
    let mut r = format!("#AES:{manager}|").into_bytes();
    r.extend_from_slice(datagram);
    r
}

struct Relay {
    relay: Arc<UdpRelay>,
    addr: SocketAddr,
    stop: CancellationToken,
    tracker: TaskTracker,
}

async fn start(name: &str, managers: &[SocketAddr], config: UdpRelayConfig) -> Relay {
    let backends = managers.iter().map(|a| BackendConfig::new(*a)).collect();
    let balancer = Balancer::new(Policy::AgentId, backends).unwrap();
    let relay = Arc::new(UdpRelay::new(name, config, balancer));
    let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let addr = socket.local_addr().unwrap();
    let stop = CancellationToken::new();
    let tracker = TaskTracker::new();
    tokio::spawn(relay.clone().serve(socket, stop.clone(), tracker.clone()));
    Relay {
        relay,
        addr,
        stop,
        tracker,
    }
}

/// An agent socket connected to the relay: it only accepts datagrams from the relay's address.
async fn agent(relay: SocketAddr) -> UdpSocket {
    let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    sock.connect(relay).await.unwrap();
    sock
}

/// The next datagram within `ms` milliseconds.
async fn recv_within(sock: &UdpSocket, ms: u64) -> Option<Vec<u8>> {
    let mut buf = vec![0u8; 70_000];
    match tokio::time::timeout(Duration::from_millis(ms), sock.recv(&mut buf)).await {
        Ok(Ok(n)) => Some(buf[..n].to_vec()),
        _ => None,
    }
}

fn id(n: usize) -> String {
    format!("{n:03}")
}

fn message(id: &str, body: &str) -> Vec<u8> {
    format!("!{id}!#AES:{body}").into_bytes()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_agents_get_their_own_upstream_port_and_their_own_replies() {
    let m1 = UdpManager::start("m1").await;
    let m2 = UdpManager::start("m2").await;
    let relay = start("udp-fifty", &[m1.addr, m2.addr], UdpRelayConfig::default()).await;
    const AGENTS: usize = 50;
    const DATAGRAMS: usize = 20;
    let mut tasks = Vec::new();
    for n in 1..=AGENTS {
        let addr = relay.addr;
        tasks.push(tokio::spawn(async move {
            let sock = agent(addr).await;
            let mut managers = HashSet::new();
            // Lockstep (send, then wait for the answer): nothing is lost to a full buffer.
            for seq in 0..DATAGRAMS {
                let msg = message(&id(n), &format!("{}-{seq}", id(n)));
                sock.send(&msg).await.unwrap();
                let reply = recv_within(&sock, 5000)
                    .await
                    .unwrap_or_else(|| panic!("agent {n}: no reply to {seq}"));
                let (m, echoed) = if reply.starts_with(b"#AES:m1|") {
                    ("m1", &reply[8..])
                } else if reply.starts_with(b"#AES:m2|") {
                    ("m2", &reply[8..])
                } else {
                    panic!("agent {n}: unexpected reply {reply:?}");
                };
                assert_eq!(echoed, &msg[..], "agent {n} got another agent's reply");
                managers.insert(m);
            }
            (n, managers, sock)
        }));
    }
    let mut on = HashMap::new();
    let mut socks = Vec::new();
    for t in tasks {
        let (n, managers, sock) = t.await.unwrap();
        assert_eq!(managers.len(), 1, "agent {n} answered by {managers:?}");
        on.insert(n, *managers.iter().next().unwrap());
        socks.push(sock);
    }
    assert_eq!(relay.relay.flows(), AGENTS);

    // At the managers: every datagram of an agent from one upstream port, ports all distinct.
    let balancer = relay.relay.balancer();
    let mut ports = HashSet::new();
    for n in 1..=AGENTS {
        let (here, there) = if on[&n] == "m1" {
            (&m1, &m2)
        } else {
            (&m2, &m1)
        };
        let got = here.sent_by(&id(n));
        assert!(there.sent_by(&id(n)).is_empty(), "agent {n} split");
        assert_eq!(got.len(), DATAGRAMS, "agent {n}");
        let sources: HashSet<SocketAddr> = got.iter().map(|(a, _)| *a).collect();
        assert_eq!(sources.len(), 1, "agent {n} used several upstream ports");
        let port = sources.into_iter().next().unwrap().port();
        assert_ne!(port, relay.addr.port());
        assert!(ports.insert(port), "agent {n} shares upstream port {port}");
        for (seq, (_, d)) in got.iter().enumerate() {
            assert_eq!(d, &message(&id(n), &format!("{}-{seq}", id(n))));
        }
        // The manager is the consistent-hash choice for the agent ID.
        let key = BalanceKey::Agent(AgentId::parse(id(n).as_bytes()).unwrap());
        let first = balancer.candidates(&key, Instant::now())[0];
        assert_eq!(balancer.backends()[first].addr(), here.addr, "agent {n}");
    }
    let on_m1 = on.values().filter(|m| **m == "m1").count();
    assert!(on_m1 > 0 && on_m1 < AGENTS, "all agents on one manager");

    // The same agent ID from a new address (an agent restart) reaches the same manager.
    for n in [1, 2, 3, 17, 50] {
        let sock = agent(relay.addr).await;
        sock.send(&message(&id(n), "again")).await.unwrap();
        let reply = recv_within(&sock, 5000).await.expect("reply");
        assert!(reply.starts_with(format!("#AES:{}|", on[&n]).as_bytes()));
    }

    let stats = relay.relay.stats();
    let total = (AGENTS * DATAGRAMS + 5) as u64;
    assert_eq!(stats.frames_up.load(Ordering::Relaxed), total);
    assert_eq!(stats.frames_down.load(Ordering::Relaxed), total);
    assert_eq!(stats.sessions.load(Ordering::Relaxed), AGENTS as u64 + 5);
    assert_eq!(relay.relay.flows(), AGENTS + 5);
    assert_eq!(
        balancer.backends().iter().map(|b| b.active()).sum::<u64>(),
        AGENTS as u64 + 5
    );

    // Stopping the listener ends every flow.
    relay.stop.cancel();
    relay.tracker.close();
    tokio::time::timeout(Duration::from_secs(5), relay.tracker.wait())
        .await
        .unwrap();
    assert_eq!(relay.relay.flows(), 0);
    assert_eq!(
        balancer.backends().iter().map(|b| b.active()).sum::<u64>(),
        0
    );
}

#[tokio::test]
async fn flows_expire_after_the_idle_timeout() {
    let m = UdpManager::start("m").await;
    let config = UdpRelayConfig {
        idle_timeout: Duration::from_millis(300),
        ..UdpRelayConfig::default()
    };
    let relay = start("udp-idle", &[m.addr], config).await;
    let sock = agent(relay.addr).await;
    let started = Instant::now();
    sock.send(&message("001", "one")).await.unwrap();
    assert!(recv_within(&sock, 5000).await.is_some());
    assert_eq!(relay.relay.flows(), 1);
    let r = relay.relay.clone();
    wait_for("the flow to expire", 5, || r.flows() == 0).await;
    assert!(started.elapsed() >= Duration::from_millis(300));
    assert_eq!(
        relay
            .relay
            .flow_stats()
            .flows_expired
            .load(Ordering::Relaxed),
        1
    );
    // The agent's next datagram opens a new flow.
    sock.send(&message("001", "two")).await.unwrap();
    assert!(recv_within(&sock, 5000).await.is_some());
    assert_eq!(relay.relay.stats().sessions.load(Ordering::Relaxed), 2);
    assert_eq!(relay.relay.flows(), 1);
    assert_eq!(m.seen().len(), 2);
}

#[tokio::test]
async fn a_live_agent_keeps_its_flow() {
    let m = UdpManager::start("m").await;
    let config = UdpRelayConfig {
        idle_timeout: Duration::from_millis(400),
        ..UdpRelayConfig::default()
    };
    let relay = start("udp-live", &[m.addr], config).await;
    let sock = agent(relay.addr).await;
    for i in 0..10 {
        sock.send(&message("001", &format!("keepalive {i}")))
            .await
            .unwrap();
        assert!(recv_within(&sock, 5000).await.is_some());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(relay.relay.stats().sessions.load(Ordering::Relaxed), 1);
    let sources: HashSet<SocketAddr> = m.seen().iter().map(|(a, _)| *a).collect();
    assert_eq!(sources.len(), 1);
}

#[tokio::test]
async fn garbage_is_dropped_and_counted_while_agents_flow() {
    capture_logs();
    let m = UdpManager::start("m").await;
    let config = UdpRelayConfig {
        max_datagram: 200,
        ..UdpRelayConfig::default()
    };
    let relay = start("udp-garbage", &[m.addr], config).await;
    let noisy = agent(relay.addr).await;
    let good = agent(relay.addr).await;
    const GARBAGE: u64 = 100;
    for i in 0..GARBAGE {
        let junk: &[u8] = match i % 4 {
            0 => b"GET / HTTP/1.1\r\n\r\n",
            1 => b"",
            2 => b"!12345678901!#AES:x",
            _ => b"#BLOWFISH:x",
        };
        noisy.send(junk).await.unwrap();
        if i % 10 == 0 {
            good.send(&message("002", &format!("good {i}")))
                .await
                .unwrap();
            let reply = recv_within(&good, 5000)
                .await
                .expect("reply to a good agent");
            assert!(reply.starts_with(b"#AES:m|"));
        }
    }
    // The noisy address still gets through once it speaks the protocol.
    noisy.send(&message("001", "finally")).await.unwrap();
    assert!(recv_within(&noisy, 5000).await.is_some());
    // Too long for max_datagram.
    noisy.send(&message("001", &"x".repeat(300))).await.unwrap();
    // An ID-prefixed answer from the manager never reaches the agent.
    good.send(&message("002", "bad-reply")).await.unwrap();
    assert!(recv_within(&good, 300).await.is_none());

    let stats = relay.relay.stats().clone();
    wait_for("the drops to be counted", 5, || {
        stats.rejected(Rejection::TooLong) == 1 && stats.rejected(Rejection::ManagerProtocol) == 1
    })
    .await;
    assert_eq!(stats.rejected(Rejection::BadEnvelope), GARBAGE);
    let seen = m.seen();
    assert_eq!(seen.len(), 10 + 1 + 1, "garbage reached the manager");
    assert!(seen.iter().all(|(_, d)| d.starts_with(b"!00")));
    let lines = logs()
        .lines()
        .filter(|l| l.contains("udp-garbage") && l.contains("not a Wazuh message"))
        .count();
    assert!(
        (1..=3).contains(&lines),
        "{lines} log lines for {GARBAGE} bad datagrams"
    );
}

#[tokio::test]
async fn flows_beyond_the_limit_are_refused() {
    let m = UdpManager::start("m").await;
    let config = UdpRelayConfig {
        max_flows: 3,
        ..UdpRelayConfig::default()
    };
    let relay = start("udp-limit", &[m.addr], config).await;
    let mut answered = 0;
    for n in 1..=5 {
        let sock = agent(relay.addr).await;
        sock.send(&message(&id(n), "hello")).await.unwrap();
        if recv_within(&sock, 500).await.is_some() {
            answered += 1;
        }
    }
    assert_eq!(answered, 3);
    assert_eq!(relay.relay.flows(), 3);
    assert_eq!(
        relay
            .relay
            .flow_stats()
            .flows_refused
            .load(Ordering::Relaxed),
        2
    );
    assert_eq!(m.seen().len(), 3);
}

#[tokio::test]
async fn an_unreachable_manager_is_marked_and_the_agent_moves() {
    let m = UdpManager::start("live").await;
    let dead = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let dead_addr = dead.local_addr().unwrap();
    drop(dead);
    let managers = [dead_addr, m.addr];
    // An agent ID whose first choice is the dead manager.
    let probe = Balancer::new(
        Policy::AgentId,
        managers.iter().map(|a| BackendConfig::new(*a)).collect(),
    )
    .unwrap();
    let agent_id = (1..1000)
        .map(id)
        .find(|i| {
            let key = BalanceKey::Agent(AgentId::parse(i.as_bytes()).unwrap());
            probe.candidates(&key, Instant::now())[0] == 0
        })
        .unwrap();
    let relay = start("udp-failover", &managers, UdpRelayConfig::default()).await;
    let sock = agent(relay.addr).await;
    let mut reply = None;
    for attempt in 0..20 {
        sock.send(&message(&agent_id, &format!("try {attempt}")))
            .await
            .unwrap();
        reply = recv_within(&sock, 200).await;
        if reply.is_some() {
            break;
        }
    }
    let reply = reply.expect("the agent never reached the live manager");
    assert!(reply.starts_with(b"#AES:live|"));
    let balancer = relay.relay.balancer();
    assert!(balancer.backends()[0].failures_total() >= 1);
    assert!(!balancer.is_available(0, Instant::now()));
    assert!(relay.relay.stats().connect_failures.load(Ordering::Relaxed) >= 1);
}

/// An agent socket on another loopback address (another source address to the relay).
async fn agent_from(ip: &str, relay: SocketAddr) -> UdpSocket {
    let sock = UdpSocket::bind((ip, 0)).await.unwrap();
    sock.connect(relay).await.unwrap();
    sock
}

#[tokio::test]
async fn one_address_cannot_hold_more_flows_than_its_limit() {
    let m = UdpManager::start("m").await;
    let config = UdpRelayConfig {
        source_limits: wazuh_proxy_core::limits::SourceLimits {
            max_open: 2,
            rate: 0.0,
            burst: 0.0,
        },
        ..UdpRelayConfig::default()
    };
    let relay = start("udp-per-source", &[m.addr], config).await;
    let mut held = Vec::new();
    let mut answered = 0;
    for n in 1..=4 {
        let sock = agent(relay.addr).await;
        sock.send(&message(&id(n), "hello")).await.unwrap();
        if recv_within(&sock, 500).await.is_some() {
            answered += 1;
        }
        held.push(sock);
    }
    assert_eq!(answered, 2, "127.0.0.1 holds at most 2 flows");
    assert_eq!(relay.relay.stats().rejected(Rejection::SourceLimit), 2);
    // The admitted agents keep flowing.
    held[0].send(&message(&id(1), "again")).await.unwrap();
    assert!(recv_within(&held[0], 500).await.is_some());
    // Another address is not affected.
    let other = agent_from("127.0.0.2", relay.addr).await;
    other.send(&message(&id(9), "hello")).await.unwrap();
    assert!(recv_within(&other, 500).await.is_some());
    assert_eq!(relay.relay.flows(), 3);
    assert_eq!(m.seen().len(), 4);
    relay.stop.cancel();
    relay.tracker.close();
}

#[tokio::test]
async fn one_address_cannot_open_flows_faster_than_its_rate() {
    let m = UdpManager::start("m").await;
    let config = UdpRelayConfig {
        source_limits: wazuh_proxy_core::limits::SourceLimits {
            max_open: 0,
            // One new flow per 1000 s after a burst of 3: the test never sees a refill.
            rate: 0.001,
            burst: 3.0,
        },
        ..UdpRelayConfig::default()
    };
    let relay = start("udp-rate", &[m.addr], config).await;
    let mut answered = 0;
    for n in 1..=5 {
        let sock = agent(relay.addr).await;
        sock.send(&message(&id(n), "hello")).await.unwrap();
        if recv_within(&sock, 500).await.is_some() {
            answered += 1;
        }
    }
    assert_eq!(answered, 3);
    assert_eq!(relay.relay.stats().rejected(Rejection::SourceLimit), 2);
    let other = agent_from("127.0.0.3", relay.addr).await;
    other.send(&message(&id(9), "hello")).await.unwrap();
    assert!(recv_within(&other, 500).await.is_some());
    relay.stop.cancel();
    relay.tracker.close();
}
