//! The agent relay over real loopback sockets.

use std::time::Duration;

use futures_util::StreamExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use wazuh_proxy_core::balance::Policy;
use wazuh_proxy_core::frame::{encode_frame, FrameCodec, MAX_PAYLOAD};
use wazuh_proxy_core::relay::AgentRelayConfig;
use wazuh_proxy_core::session::SessionKey;
use wazuh_proxy_core::sim::{ack_payload, agent_payload, payload_seq, Manager, Reply};
use wazuh_proxy_core::stats::Rejection;
use wazuh_proxy_test_support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frames_of_200_concurrent_agents_arrive_intact_and_in_order() {
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
    const AGENTS: usize = 200;
    const FRAMES: u64 = 50;
    let mut tasks = Vec::new();
    for n in 1..=AGENTS {
        let addr = relay.addr;
        tasks.push(tokio::spawn(async move {
            let mut conn = connect(addr).await;
            send(&mut conn, agent_payload(Some(id(n)), 0, 120)).await;
            let ack = recv(&mut conn).await.expect("startup ACK");
            for seq in 1..=FRAMES {
                // Sizes vary so frames straddle read boundaries.
                send(
                    &mut conn,
                    agent_payload(Some(id(n)), seq, 40 + (seq as usize * 97 + n) % 4000),
                )
                .await;
            }
            (n, ack, conn)
        }));
    }
    let mut conns = Vec::new();
    let mut on_m1 = 0;
    for t in tasks {
        let (n, ack, conn) = t.await.unwrap();
        assert!(
            ack == ack_payload("m1") || ack == ack_payload("m2"),
            "agent {n} got {ack:?}"
        );
        on_m1 += usize::from(ack == ack_payload("m1"));
        conns.push(conn);
    }
    let total = AGENTS * (FRAMES as usize + 1);
    wait_for("every frame at a manager", 20, || {
        m1.frame_count() + m2.frame_count() == total
    })
    .await;
    for n in 1..=AGENTS {
        let key = id(n).to_string();
        let (a, b) = (m1.frames_from(&key), m2.frames_from(&key));
        assert!(
            a.is_empty() != b.is_empty(),
            "agent {key} split across managers"
        );
        let got = if a.is_empty() { b } else { a };
        let seqs: Vec<u64> = got.iter().map(|f| payload_seq(f).unwrap()).collect();
        assert_eq!(seqs, (0..=FRAMES).collect::<Vec<_>>(), "agent {key}");
        for (seq, f) in got.iter().enumerate() {
            let size = if seq == 0 {
                120
            } else {
                40 + (seq * 97 + n) % 4000
            };
            assert_eq!(
                &f[..],
                &agent_payload(Some(id(n)), seq as u64, size)[..],
                "agent {key} frame {seq}"
            );
        }
    }
    // Both managers carry a share (consistent hashing spreads 200 agents).
    assert!(on_m1 > 40 && on_m1 < 160, "m1 got {on_m1} of {AGENTS}");
    assert_eq!(relay.relay.sessions().len(), AGENTS);
    let s = relay.relay.stats();
    assert_eq!(
        s.frames_up.load(std::sync::atomic::Ordering::Relaxed),
        total as u64
    );
    assert_eq!(
        s.frames_down.load(std::sync::atomic::Ordering::Relaxed),
        AGENTS as u64
    );
    drop(conns);
    wait_for("sessions to end", 10, || relay.relay.sessions().is_empty()).await;
}

#[tokio::test]
async fn one_agent_always_lands_on_the_same_manager() {
    let managers = [
        Manager::start("127.0.0.1:0".parse().unwrap(), "a", Reply::AckFirst)
            .await
            .unwrap(),
        Manager::start("127.0.0.1:0".parse().unwrap(), "b", Reply::AckFirst)
            .await
            .unwrap(),
        Manager::start("127.0.0.1:0".parse().unwrap(), "c", Reply::AckFirst)
            .await
            .unwrap(),
    ];
    let addrs: Vec<_> = managers.iter().map(|m| m.addr()).collect();
    let relay = TestRelay::start(&addrs, Policy::AgentId, AgentRelayConfig::default()).await;
    for agent in [7usize, 42, 999] {
        let mut first_ack = None;
        for round in 0..5 {
            let mut conn = connect(relay.addr).await;
            send(&mut conn, agent_payload(Some(id(agent)), round, 80)).await;
            let ack = recv(&mut conn).await.unwrap();
            assert_eq!(
                first_ack.get_or_insert(ack.clone()),
                &ack,
                "agent {agent} moved in round {round}"
            );
        }
    }
    // A second proxy with the backends listed in another order routes every agent the same way.
    let mut reversed = addrs.clone();
    reversed.reverse();
    let other = TestRelay::start(&reversed, Policy::AgentId, AgentRelayConfig::default()).await;
    for agent in [7usize, 42, 999] {
        let mut a = connect(relay.addr).await;
        send(&mut a, agent_payload(Some(id(agent)), 0, 80)).await;
        let mut b = connect(other.addr).await;
        let ack_a = recv(&mut a).await.unwrap();
        drop(a);
        send(&mut b, agent_payload(Some(id(agent)), 0, 80)).await;
        assert_eq!(
            recv(&mut b).await.unwrap(),
            ack_a,
            "proxies disagree on agent {agent}"
        );
    }
}

#[tokio::test]
async fn a_refused_manager_fails_over_to_the_other() {
    let dead = {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        l.local_addr().unwrap()
    };
    let live = Manager::start("127.0.0.1:0".parse().unwrap(), "live", Reply::AckFirst)
        .await
        .unwrap();
    let relay = TestRelay::start(
        &[dead, live.addr()],
        Policy::AgentId,
        AgentRelayConfig::default(),
    )
    .await;
    for n in 1..=20 {
        let mut conn = connect(relay.addr).await;
        send(&mut conn, agent_payload(Some(id(n)), 0, 64)).await;
        assert_eq!(
            recv(&mut conn).await.unwrap(),
            ack_payload("live"),
            "agent {n}"
        );
    }
    let balancer = relay.relay.balancer();
    let dead_idx = balancer
        .backends()
        .iter()
        .position(|b| b.addr() == dead)
        .unwrap();
    assert!(
        !balancer.is_available(dead_idx, std::time::Instant::now()),
        "refused manager not marked failed"
    );
}

/// A well-behaved agent that keeps streaming while bad ones are thrown out.
async fn bystander(relay: std::net::SocketAddr, n: usize) -> AgentConn {
    let mut conn = connect(relay).await;
    send(&mut conn, agent_payload(Some(id(n)), 0, 64)).await;
    recv(&mut conn).await.expect("bystander ACK");
    conn
}

#[tokio::test]
async fn bad_input_closes_only_the_offending_connection() {
    capture_logs();
    let m = Manager::start("127.0.0.1:0".parse().unwrap(), "m", Reply::AckFirst)
        .await
        .unwrap();
    let relay = TestRelay::start(&[m.addr()], Policy::AgentId, AgentRelayConfig::default()).await;
    let mut good = bystander(relay.addr, 500).await;
    let cases: [(&str, Vec<u8>, Rejection); 4] = [
        ("zero length", vec![0, 0, 0, 0], Rejection::ZeroLength),
        (
            "over the limit",
            (MAX_PAYLOAD + 1).to_le_bytes().to_vec(),
            Rejection::TooLong,
        ),
        (
            "HTTP request",
            b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(),
            Rejection::TooLong,
        ),
        (
            "bad envelope",
            encode_frame(b"hello manager", MAX_PAYLOAD).unwrap(),
            Rejection::BadEnvelope,
        ),
    ];
    for (seq, (what, bytes, why)) in cases.into_iter().enumerate() {
        let before = relay.relay.stats().rejected(why);
        let mut bad = TcpStream::connect(relay.addr).await.unwrap();
        let port = bad.local_addr().unwrap().port();
        bad.write_all(&bytes).await.unwrap();
        assert!(
            closed_within(&mut bad, 5).await,
            "{what}: connection left open"
        );
        assert_eq!(
            relay.relay.stats().rejected(why),
            before + 1,
            "{what}: metric"
        );
        wait_for("log line", 5, || {
            logs()
                .lines()
                .any(|l| l.contains(&format!(":{port}")) && l.contains("closing agent connection"))
        })
        .await;
        // The bystander is untouched.
        send(&mut good, agent_payload(Some(id(500)), seq as u64 + 1, 64)).await;
    }
    // A bad frame after good ones: the good ones are delivered, then the connection closes.
    let mut mixed = TcpStream::connect(relay.addr).await.unwrap();
    let mut wire = encode_frame(&agent_payload(Some(id(600)), 0, 64), MAX_PAYLOAD).unwrap();
    wire.extend(encode_frame(&agent_payload(Some(id(600)), 1, 64), MAX_PAYLOAD).unwrap());
    wire.extend([0, 0, 0, 0]);
    mixed.write_all(&wire).await.unwrap();
    assert!(closed_within(&mut mixed, 5).await);
    wait_for("good frames before the bad one", 5, || {
        m.frames_from("600").len() == 2
    })
    .await;
    // An agent that switches IDs mid-connection.
    let mut switcher = connect(relay.addr).await;
    send(&mut switcher, agent_payload(Some(id(700)), 0, 64)).await;
    recv(&mut switcher).await.unwrap();
    send(&mut switcher, agent_payload(Some(id(701)), 1, 64)).await;
    assert!(recv(&mut switcher).await.is_none(), "ID switch not refused");
    assert_eq!(relay.relay.stats().rejected(Rejection::AgentIdChanged), 1);
    wait_for("bystander frames", 5, || m.frames_from("500").len() == 5).await;
    assert!(m.frames_from("701").is_empty());
}

#[tokio::test]
async fn a_client_that_never_sends_its_first_frame_is_closed_after_the_deadline() {
    capture_logs();
    let m = Manager::start("127.0.0.1:0".parse().unwrap(), "m", Reply::AckFirst)
        .await
        .unwrap();
    let cfg = AgentRelayConfig {
        first_frame_timeout: Duration::from_millis(300),
        ..Default::default()
    };
    let relay = TestRelay::start(&[m.addr()], Policy::AgentId, cfg).await;
    let mut silent = TcpStream::connect(relay.addr).await.unwrap();
    // Half a frame, then silence.
    let mut half = TcpStream::connect(relay.addr).await.unwrap();
    half.write_all(&[100, 0, 0, 0, b'!', b'0']).await.unwrap();
    let started = std::time::Instant::now();
    assert!(closed_within(&mut silent, 5).await);
    assert!(closed_within(&mut half, 5).await);
    assert!(started.elapsed() >= Duration::from_millis(250));
    assert_eq!(
        relay.relay.stats().rejected(Rejection::FirstFrameTimeout),
        2
    );
    assert_eq!(
        m.accepted(),
        0,
        "a manager connection was opened for a silent client"
    );
    wait_for("log line", 5, || logs().contains("no complete first frame")).await;
}

#[tokio::test]
async fn a_manager_frame_split_across_many_segments_reaches_the_agent_whole() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let manager_addr = listener.local_addr().unwrap();
    let (halfway_tx, halfway_rx) = tokio::sync::oneshot::channel();
    let (go_tx, go_rx) = tokio::sync::oneshot::channel::<()>();
    let mut big = b"#AES:".to_vec();
    big.extend((0..6000u32).map(|i| (i % 251) as u8));
    let frame = encode_frame(&big, MAX_PAYLOAD).unwrap();
    let to_send = frame.clone();
    tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.unwrap();
        s.set_nodelay(true).unwrap();
        let mut first = [0u8; 4];
        s.read_exact(&mut first).await.unwrap();
        let half = to_send.len() / 2;
        for chunk in to_send[..half].chunks(7) {
            s.write_all(chunk).await.unwrap();
            s.flush().await.unwrap();
            tokio::time::sleep(Duration::from_micros(200)).await;
        }
        halfway_tx.send(()).unwrap();
        go_rx.await.unwrap();
        for chunk in to_send[half..].chunks(13) {
            s.write_all(chunk).await.unwrap();
            tokio::time::sleep(Duration::from_micros(100)).await;
        }
        tokio::time::sleep(Duration::from_secs(5)).await;
    });
    let relay = TestRelay::start(
        &[manager_addr],
        Policy::AgentId,
        AgentRelayConfig::default(),
    )
    .await;
    let mut agent = TcpStream::connect(relay.addr).await.unwrap();
    agent
        .write_all(&encode_frame(&agent_payload(Some(id(1)), 0, 64), MAX_PAYLOAD).unwrap())
        .await
        .unwrap();
    halfway_rx.await.unwrap();
    // Half the frame has reached the proxy: none of it may reach the agent yet.
    let mut probe = [0u8; 16];
    let early = tokio::time::timeout(Duration::from_millis(300), agent.read(&mut probe)).await;
    assert!(early.is_err(), "the proxy forwarded part of a frame");
    go_tx.send(()).unwrap();
    let mut framed = tokio_util::codec::Framed::new(agent, FrameCodec::default());
    let got = tokio::time::timeout(Duration::from_secs(5), framed.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(&got[..], &big[..]);
}

#[tokio::test]
async fn a_second_connection_claiming_a_live_agent_is_refused_and_the_agent_kept() {
    let m = Manager::start("127.0.0.1:0".parse().unwrap(), "m", Reply::AckFirst)
        .await
        .unwrap();
    let relay = TestRelay::start(&[m.addr()], Policy::AgentId, AgentRelayConfig::default()).await;
    let mut live = connect(relay.addr).await;
    send(&mut live, agent_payload(Some(id(1)), 0, 64)).await;
    recv(&mut live).await.unwrap();
    // Anyone who can reach 1514 sends one frame claiming agent 001.
    let mut intruder = connect(relay.addr).await;
    send(&mut intruder, agent_payload(Some(id(1)), 0, 64)).await;
    assert!(recv(&mut intruder).await.is_none(), "intruder not refused");
    // The live agent keeps its connection and keeps streaming.
    for seq in 1..=5 {
        send(&mut live, agent_payload(Some(id(1)), seq, 64)).await;
    }
    wait_for("the live agent's frames", 5, || {
        m.frames_from("001").len() == 6
    })
    .await;
    assert_eq!(m.accepted(), 1, "the intruder reached the manager");
    let key = SessionKey::Agent(id(1));
    let session = relay.relay.sessions().by_key(&key).unwrap();
    assert_eq!(session.client(), live.get_ref().local_addr().unwrap());
    assert_eq!(
        relay
            .relay
            .stats()
            .rejected(wazuh_proxy_core::stats::Rejection::Overtake),
        1
    );
}

#[tokio::test]
async fn a_reconnecting_agent_replaces_its_silent_old_connection_first() {
    let m = Manager::start("127.0.0.1:0".parse().unwrap(), "m", Reply::AckFirst)
        .await
        .unwrap();
    let overtake = Duration::from_millis(400);
    let cfg = AgentRelayConfig {
        overtake_time: overtake,
        ..Default::default()
    };
    let relay = TestRelay::start(&[m.addr()], Policy::AgentId, cfg).await;
    let mut old = connect(relay.addr).await;
    send(&mut old, agent_payload(Some(id(1)), 0, 64)).await;
    recv(&mut old).await.unwrap();
    assert_eq!(m.open_connections(), 1);
    // The old connection goes quiet (a half-dead NAT entry) past the overtake time.
    tokio::time::sleep(overtake + Duration::from_millis(100)).await;
    let mut new = connect(relay.addr).await;
    send(&mut new, agent_payload(Some(id(1)), 1, 64)).await;
    assert_eq!(recv(&mut new).await.unwrap(), ack_payload("m"));
    assert!(recv(&mut old).await.is_none(), "old connection still open");
    assert_eq!(m.accepted(), 2);
    wait_for("one connection at the manager", 5, || {
        m.open_connections() == 1
    })
    .await;
    let key = SessionKey::Agent(id(1));
    let live = relay.relay.sessions().by_key(&key).unwrap();
    assert_eq!(live.client(), new.get_ref().local_addr().unwrap());
}

#[tokio::test]
async fn id_less_agents_are_known_by_source_address() {
    let m = Manager::start("127.0.0.1:0".parse().unwrap(), "m", Reply::AckFirst)
        .await
        .unwrap();
    let relay = TestRelay::start(&[m.addr()], Policy::AgentId, AgentRelayConfig::default()).await;
    let mut conn = connect(relay.addr).await;
    send(&mut conn, agent_payload(None, 0, 64)).await;
    recv(&mut conn).await.unwrap();
    let key = SessionKey::Source("127.0.0.1".parse().unwrap());
    assert!(relay.relay.sessions().by_key(&key).is_some());
    assert_eq!(m.frames_from("ip:127.0.0.1").len(), 1);
}

#[tokio::test]
async fn a_flood_from_one_source_is_capped_without_touching_others() {
    use wazuh_proxy_core::limits::SourceLimits;
    let m = Manager::start("127.0.0.1:0".parse().unwrap(), "m", Reply::AckFirst)
        .await
        .unwrap();
    let cfg = AgentRelayConfig {
        source_limits: SourceLimits {
            max_open: 50,
            rate: 0.0,
            burst: 0.0,
        },
        ..Default::default()
    };
    let relay = TestRelay::start(&[m.addr()], Policy::AgentId, cfg).await;
    // A bystander from another loopback address.
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.bind("127.0.0.2:0".parse().unwrap()).unwrap();
    let mut good = tokio_util::codec::Framed::new(
        sock.connect(relay.addr).await.unwrap(),
        FrameCodec::default(),
    );
    send(&mut good, agent_payload(Some(id(1)), 0, 64)).await;
    recv(&mut good).await.expect("bystander ACK");
    let mut flood = Vec::new();
    for _ in 0..120 {
        flood.push(TcpStream::connect(relay.addr).await.unwrap());
    }
    wait_for("70 refusals", 5, || {
        relay.relay.stats().rejected(Rejection::SourceLimit) == 70
    })
    .await;
    let mut closed = 0;
    for s in flood.iter_mut() {
        if closed_within(s, 0).await {
            closed += 1;
        }
    }
    assert!(
        closed >= 70,
        "only {closed} of the excess connections closed"
    );
    send(&mut good, agent_payload(Some(id(1)), 1, 64)).await;
    wait_for("bystander frame", 5, || m.frames_from("001").len() == 2).await;
}

#[tokio::test]
async fn balance_source_routes_agents_by_their_client_address() {
    use std::net::{IpAddr, SocketAddr};
    use wazuh_proxy_core::balance::{BackendConfig, BalanceKey, Balancer};
    let m1 = Manager::start("127.0.0.1:0".parse().unwrap(), "m1", Reply::AckFirst)
        .await
        .unwrap();
    let m2 = Manager::start("127.0.0.1:0".parse().unwrap(), "m2", Reply::AckFirst)
        .await
        .unwrap();
    let relay = TestRelay::start(
        &[m1.addr(), m2.addr()],
        Policy::Source,
        AgentRelayConfig::default(),
    )
    .await;
    let reference = Balancer::new(
        Policy::Source,
        vec![BackendConfig::new(m1.addr()), BackendConfig::new(m2.addr())],
    )
    .unwrap();
    let preferred = |ip: IpAddr| {
        let c = reference.candidates(&BalanceKey::Source(ip), std::time::Instant::now());
        reference.backends()[c.as_slice()[0]].addr()
    };
    let mut seen_both = std::collections::HashSet::new();
    for host in 2..=12u8 {
        let ip = IpAddr::from([127, 0, 0, host]);
        // Several agents (IDs) behind one address all go to that address's manager.
        for n in 0..3 {
            let a = usize::from(host) * 10 + n;
            let socket = tokio::net::TcpSocket::new_v4().unwrap();
            socket.bind(SocketAddr::new(ip, 0)).unwrap();
            let stream = socket.connect(relay.addr).await.unwrap();
            let mut conn = tokio_util::codec::Framed::new(stream, FrameCodec::default());
            send(&mut conn, agent_payload(Some(id(a)), 0, 64)).await;
            let ack = recv(&mut conn).await.unwrap();
            let want = if preferred(ip) == m1.addr() {
                "m1"
            } else {
                "m2"
            };
            assert_eq!(ack, ack_payload(want), "agent {a} from {ip}");
            seen_both.insert(want);
        }
    }
    assert_eq!(
        seen_both.len(),
        2,
        "the addresses all hashed to one manager"
    );
}
