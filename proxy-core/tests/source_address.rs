//! Connecting to managers from the agent's address (`IP_TRANSPARENT`), on loopback.
//!
//! Loopback addresses other than 127.0.0.1 stand in for agents: they are local, so no routing
//! is needed. Setting `IP_TRANSPARENT` needs `CAP_NET_ADMIN` (or `CAP_NET_RAW`); without it
//! the tests that need it are skipped with a message. The network-namespace test of the binary
//! (`proxy-bin/tests/transparent.rs`) covers the routed case.

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use wazuh_proxy_core::balance::{
    AttemptError, BackendConfig, BalanceKey, Balancer, ConnectError, Policy,
};
use wazuh_proxy_core::relay::AgentRelayConfig;

use wazuh_proxy_test_support::TestRelay;

fn ip(text: &str) -> IpAddr {
    text.parse().unwrap()
}

/// Whether a connect failed only because this process may not set `IP_TRANSPARENT`.
fn lacks_privilege(e: &ConnectError) -> bool {
    match e {
        ConnectError::AllFailed(attempts) => attempts.iter().all(|a| {
            matches!(&a.error, AttemptError::Source { error, .. }
                if error.kind() == std::io::ErrorKind::PermissionDenied)
        }),
        _ => false,
    }
}

fn skip(why: &str) {
    wazuh_proxy_test_support::skipped(&format!(
        "{why} (IP_TRANSPARENT needs CAP_NET_ADMIN or CAP_NET_RAW)"
    ));
}

#[tokio::test]
async fn a_family_mismatch_fails_the_attempt_but_not_the_backend() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let b = Balancer::new(Policy::RoundRobin, vec![BackendConfig::new(addr)]).unwrap();
    let err = b
        .connect_from(
            &BalanceKey::None,
            Duration::from_secs(2),
            Some(ip("2001:db8::7")),
        )
        .await
        .unwrap_err();
    let ConnectError::AllFailed(attempts) = &err else {
        panic!("{err}")
    };
    assert!(
        matches!(attempts[0].error, AttemptError::FamilyMismatch { from } if from == ip("2001:db8::7")),
        "{err}"
    );
    assert!(err.to_string().contains("IPv4 backend"), "{err}");
    // Not the manager's fault: it stays available and no failure is counted.
    assert!(b.is_available(0, Instant::now()));
    assert_eq!(b.backends()[0].failures_total(), 0);
    // Without a source the same balancer connects as usual.
    let c = b
        .connect(&BalanceKey::None, Duration::from_secs(2))
        .await
        .unwrap();
    let (_, peer) = listener.accept().await.unwrap();
    assert_eq!(peer, c.stream.local_addr().unwrap());
}

#[tokio::test]
async fn connects_from_the_given_address() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let b = Balancer::new(Policy::RoundRobin, vec![BackendConfig::new(addr)]).unwrap();
    // An IPv4-mapped address (an IPv4 agent on a dual-stack listener) is used as IPv4.
    for source in ["127.0.0.2", "::ffff:127.0.0.3"] {
        let c = match b
            .connect_from(&BalanceKey::None, Duration::from_secs(2), Some(ip(source)))
            .await
        {
            Ok(c) => c,
            Err(e) if lacks_privilege(&e) => return skip("connect_from with a source"),
            Err(e) => panic!("{source}: {e}"),
        };
        let (_, peer) = listener.accept().await.unwrap();
        assert_eq!(peer.ip(), ip(source).to_canonical());
        assert_eq!(c.stream.local_addr().unwrap(), peer);
    }
    assert_eq!(b.backends()[0].failures_total(), 0);
}

/// A manager that answers each connection's first frame and reports who connected.
async fn manager(listener: TcpListener, seen: tokio::sync::mpsc::UnboundedSender<SocketAddr>) {
    loop {
        let Ok((mut s, peer)) = listener.accept().await else {
            return;
        };
        let _ = seen.send(peer);
        tokio::spawn(async move {
            let mut header = [0u8; 4];
            if s.read_exact(&mut header).await.is_err() {
                return;
            }
            let mut payload = vec![0u8; u32::from_le_bytes(header) as usize];
            if s.read_exact(&mut payload).await.is_err() {
                return;
            }
            let reply = b"#AES:manager-reply";
            let mut frame = (reply.len() as u32).to_le_bytes().to_vec();
            frame.extend_from_slice(reply);
            let _ = s.write_all(&frame).await;
            let mut rest = Vec::new();
            let _ = s.read_to_end(&mut rest).await;
        });
    }
}

async fn agent_from(source: &str, relay: SocketAddr) -> TcpStream {
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind(SocketAddr::new(ip(source), 0)).unwrap();
    socket.connect(relay).await.unwrap()
}

async fn exchange(agent: &mut TcpStream) -> Vec<u8> {
    let hello = b"!001!#AES:0123456789abcdef";
    let mut frame = (hello.len() as u32).to_le_bytes().to_vec();
    frame.extend_from_slice(hello);
    agent.write_all(&frame).await.unwrap();
    let mut header = [0u8; 4];
    tokio::time::timeout(Duration::from_secs(10), agent.read_exact(&mut header))
        .await
        .expect("no reply within 10 s")
        .unwrap();
    let mut payload = vec![0u8; u32::from_le_bytes(header) as usize];
    agent.read_exact(&mut payload).await.unwrap();
    payload
}

/// Whether this process may set `IP_TRANSPARENT`.
fn may_be_transparent() -> bool {
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    socket.set_ip_transparent(true).is_ok()
}

#[tokio::test]
async fn the_relay_connects_from_the_agents_address_when_transparent() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, mut seen) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(manager(listener, tx));
    for (transparent, expected) in [(false, "127.0.0.1"), (true, "127.0.0.9")] {
        if transparent && !may_be_transparent() {
            return skip("the relay in transparent mode");
        }
        let cfg = AgentRelayConfig {
            transparent,
            ..AgentRelayConfig::default()
        };
        let relay = TestRelay::start(&[addr], Policy::AgentId, cfg).await;
        let mut agent = agent_from("127.0.0.9", relay.addr).await;
        // The relay connects once the agent's first frame has named it.
        assert_eq!(exchange(&mut agent).await, b"#AES:manager-reply");
        let peer = tokio::time::timeout(Duration::from_secs(10), seen.recv())
            .await
            .expect("the manager saw no connection within 10 s")
            .unwrap();
        assert_eq!(peer.ip(), ip(expected), "transparent = {transparent}");
        relay.stop.cancel();
        relay.relay.close_all();
    }
}
