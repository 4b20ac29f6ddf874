//! The plain TCP relay over real loopback sockets.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use wazuh_proxy_core::balance::{BackendConfig, BalanceKey, Balancer, Policy};
use wazuh_proxy_core::stats::Rejection;
use wazuh_proxy_core::tcp::{TcpRelay, TcpRelayConfig};
use wazuh_proxy_test_support::*;

/// A TCP relay listening on loopback.
struct Relay {
    relay: Arc<TcpRelay>,
    addr: SocketAddr,
    stop: CancellationToken,
    tracker: TaskTracker,
}

async fn start(backends: &[SocketAddr], config: TcpRelayConfig) -> Relay {
    let backends = backends.iter().map(|a| BackendConfig::new(*a)).collect();
    let balancer = Balancer::new(Policy::Source, backends).unwrap();
    let relay = Arc::new(TcpRelay::new("test-tcp", config, balancer));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let stop = CancellationToken::new();
    let tracker = TaskTracker::new();
    tokio::spawn(relay.clone().serve(listener, stop.clone(), tracker.clone()));
    Relay {
        relay,
        addr,
        stop,
        tracker,
    }
}

/// Deterministic, position-dependent bytes, so a reordered or shifted chunk is caught.
fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u32).wrapping_mul(2_654_435_761).to_le_bytes()[1] ^ seed)
        .collect()
}

const MB: usize = 1 << 20;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_megabyte_each_way_arrives_intact() {
    let backend = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let backend_addr = backend.local_addr().unwrap();
    let server = tokio::spawn(async move {
        let (sock, _) = backend.accept().await.unwrap();
        let (mut rd, mut wr) = sock.into_split();
        let writer = tokio::spawn(async move {
            wr.write_all(&pattern(MB, 0xb5)).await.unwrap();
            wr.shutdown().await.unwrap();
        });
        let mut got = Vec::new();
        rd.read_to_end(&mut got).await.unwrap();
        writer.await.unwrap();
        got
    });
    let relay = start(&[backend_addr], TcpRelayConfig::default()).await;
    let (mut rd, mut wr) = TcpStream::connect(relay.addr).await.unwrap().into_split();
    let writer = tokio::spawn(async move {
        wr.write_all(&pattern(MB, 0x3c)).await.unwrap();
        wr.shutdown().await.unwrap();
        wr
    });
    let mut got = Vec::new();
    tokio::time::timeout(Duration::from_secs(20), rd.read_to_end(&mut got))
        .await
        .unwrap()
        .unwrap();
    let _wr = writer.await.unwrap();
    assert!(got == pattern(MB, 0xb5), "backend -> client bytes differ");
    let at_backend = server.await.unwrap();
    assert!(
        at_backend == pattern(MB, 0x3c),
        "client -> backend bytes differ"
    );

    let stats = relay.relay.stats();
    wait_for("the connection to end", 5, || {
        stats.active.load(Ordering::Relaxed) == 0
    })
    .await;
    assert_eq!(stats.accepted.load(Ordering::Relaxed), 1);
    assert_eq!(stats.sessions.load(Ordering::Relaxed), 1);
    assert_eq!(stats.bytes_up.load(Ordering::Relaxed), MB as u64);
    assert_eq!(stats.bytes_down.load(Ordering::Relaxed), MB as u64);
    assert_eq!(stats.connect_failures.load(Ordering::Relaxed), 0);
    assert_eq!(relay.relay.balancer().backends()[0].active(), 0);
}

#[tokio::test]
async fn half_close_reaches_the_backend_and_the_answer_still_comes_back() {
    capture_logs();
    let backend = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let backend_addr = backend.local_addr().unwrap();
    let server = tokio::spawn(async move {
        let (mut sock, _) = backend.accept().await.unwrap();
        // Read to EOF first: the answer is only written once the client's half-close arrives.
        let mut request = Vec::new();
        sock.read_to_end(&mut request).await.unwrap();
        sock.write_all(b"answer to ").await.unwrap();
        sock.write_all(&request).await.unwrap();
        // Still open both ways at our end until the answer is flushed.
        sock.shutdown().await.unwrap();
        request
    });
    let relay = start(&[backend_addr], TcpRelayConfig::default()).await;
    let mut client = TcpStream::connect(relay.addr).await.unwrap();
    client.write_all(b"OSSEC A:'web-01'\n").await.unwrap();
    client.shutdown().await.unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), client.read_to_end(&mut answer))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(answer, b"answer to OSSEC A:'web-01'\n");
    assert_eq!(server.await.unwrap(), b"OSSEC A:'web-01'\n");
    let stats = relay.relay.stats().clone();
    wait_for("the connection to end", 5, || {
        stats.active.load(Ordering::Relaxed) == 0
    })
    .await;
    let port = client.local_addr().unwrap().port();
    wait_for("the close log line", 5, || {
        logs().lines().any(|l| {
            l.contains("connection closed")
                && l.contains(&format!("127.0.0.1:{port}"))
                && l.contains("bytes_up=17")
                && l.contains("bytes_down=27")
                && l.contains("client closed first")
        })
    })
    .await;
}

#[tokio::test]
async fn a_refused_backend_fails_over_to_a_live_one() {
    // Two listeners; the one the client's address ranks first is closed, so its port refuses.
    let a = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let b = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addrs = [a.local_addr().unwrap(), b.local_addr().unwrap()];
    let probe = Balancer::new(
        Policy::Source,
        addrs.iter().map(|x| BackendConfig::new(*x)).collect(),
    )
    .unwrap();
    let key = BalanceKey::Source(IpAddr::V4(Ipv4Addr::LOCALHOST));
    let first = probe.candidates(&key, Instant::now())[0];
    let (dead, live) = if first == 0 { (a, b) } else { (b, a) };
    drop(dead);
    let server = tokio::spawn(async move {
        let (mut sock, _) = live.accept().await.unwrap();
        let mut buf = [0u8; 5];
        sock.read_exact(&mut buf).await.unwrap();
        sock.write_all(b"pong!").await.unwrap();
        buf
    });
    let relay = start(&addrs, TcpRelayConfig::default()).await;
    let mut client = TcpStream::connect(relay.addr).await.unwrap();
    client.write_all(b"ping!").await.unwrap();
    let mut buf = [0u8; 5];
    tokio::time::timeout(Duration::from_secs(10), client.read_exact(&mut buf))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&buf, b"pong!");
    assert_eq!(&server.await.unwrap(), b"ping!");
    let stats = relay.relay.stats();
    assert_eq!(stats.connect_failures.load(Ordering::Relaxed), 1);
    assert_eq!(stats.rejected(Rejection::NoBackend), 0);
    let balancer = relay.relay.balancer();
    assert_eq!(balancer.backends()[first].failures_total(), 1);
    assert!(!balancer.is_available(first, Instant::now()));
}

#[tokio::test]
async fn no_reachable_backend_closes_the_client_and_counts_it() {
    let dead = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let dead_addr = dead.local_addr().unwrap();
    drop(dead);
    let relay = start(&[dead_addr], TcpRelayConfig::default()).await;
    let mut client = TcpStream::connect(relay.addr).await.unwrap();
    assert!(closed_within(&mut client, 5).await);
    let stats = relay.relay.stats().clone();
    wait_for("the refusal to be counted", 5, || {
        stats.rejected(Rejection::NoBackend) == 1
    })
    .await;
    assert_eq!(stats.connect_failures.load(Ordering::Relaxed), 1);
    assert_eq!(stats.sessions.load(Ordering::Relaxed), 0);
}

#[tokio::test]
async fn an_idle_connection_is_closed_on_both_sides() {
    let backend = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let backend_addr = backend.local_addr().unwrap();
    let server = tokio::spawn(async move {
        let (mut sock, _) = backend.accept().await.unwrap();
        let mut buf = [0u8; 1];
        sock.read_exact(&mut buf).await.unwrap();
        sock.write_all(&buf).await.unwrap();
        // Then silence until the proxy closes us.
        closed_within(&mut sock, 5).await
    });
    let config = TcpRelayConfig {
        idle_timeout: Some(Duration::from_millis(300)),
        ..TcpRelayConfig::default()
    };
    let relay = start(&[backend_addr], config).await;
    let mut client = TcpStream::connect(relay.addr).await.unwrap();
    let started = Instant::now();
    client.write_all(b"x").await.unwrap();
    let mut buf = [0u8; 1];
    client.read_exact(&mut buf).await.unwrap();
    assert!(closed_within(&mut client, 5).await, "client not closed");
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(300),
        "closed too early: {waited:?}"
    );
    assert!(server.await.unwrap(), "backend not closed");
    let stats = relay.relay.stats();
    wait_for("the idle close to be counted", 5, || {
        stats.rejected(Rejection::Idle) == 1
    })
    .await;
}

#[tokio::test]
async fn traffic_keeps_a_connection_open_past_the_idle_timeout() {
    let backend = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let backend_addr = backend.local_addr().unwrap();
    tokio::spawn(async move {
        let (mut sock, _) = backend.accept().await.unwrap();
        let mut buf = [0u8; 64];
        loop {
            match sock.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => sock.write_all(&buf[..n]).await.unwrap(),
            }
        }
    });
    let config = TcpRelayConfig {
        idle_timeout: Some(Duration::from_millis(400)),
        ..TcpRelayConfig::default()
    };
    let relay = start(&[backend_addr], config).await;
    let mut client = TcpStream::connect(relay.addr).await.unwrap();
    // 10 round trips 100 ms apart: a second in all, well past the 400 ms timeout.
    for i in 0..10u8 {
        client.write_all(&[i]).await.unwrap();
        let mut buf = [0u8; 1];
        tokio::time::timeout(Duration::from_secs(5), client.read_exact(&mut buf))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(buf[0], i);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(relay.relay.stats().rejected(Rejection::Idle), 0);
}

#[tokio::test]
async fn close_all_ends_connections_and_the_tracker_drains() {
    let backend = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let backend_addr = backend.local_addr().unwrap();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((sock, _)) = backend.accept().await {
            held.push(sock);
        }
    });
    let relay = start(&[backend_addr], TcpRelayConfig::default()).await;
    let mut clients = Vec::new();
    for _ in 0..3 {
        clients.push(TcpStream::connect(relay.addr).await.unwrap());
    }
    let stats = relay.relay.stats().clone();
    wait_for("three connections", 5, || {
        stats.sessions.load(Ordering::Relaxed) == 3
    })
    .await;
    relay.stop.cancel();
    relay.relay.close_all();
    relay.tracker.close();
    tokio::time::timeout(Duration::from_secs(5), relay.tracker.wait())
        .await
        .unwrap();
    for c in &mut clients {
        assert!(closed_within(c, 5).await);
    }
    assert_eq!(stats.active.load(Ordering::Relaxed), 0);
}

/// A backend that echoes every connection and counts the connections it accepted.
async fn counting_echo() -> (SocketAddr, Arc<std::sync::atomic::AtomicUsize>) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let count = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let c = count.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            c.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let mut buf = [0u8; 1024];
                while let Ok(n) = s.read(&mut buf).await {
                    if n == 0 || s.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
            });
        }
    });
    (addr, count)
}

/// Connects from `ip` and checks a round trip through the relay: `true` when it echoed.
async fn round_trip_from(ip: &str, relay: SocketAddr) -> (bool, TcpStream) {
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.bind(SocketAddr::new(ip.parse().unwrap(), 0)).unwrap();
    let mut s = sock.connect(relay).await.unwrap();
    let ok = s.write_all(b"ping").await.is_ok() && {
        let mut buf = [0u8; 4];
        matches!(
            tokio::time::timeout(Duration::from_secs(2), s.read_exact(&mut buf)).await,
            Ok(Ok(_))
        ) && &buf == b"ping"
    };
    (ok, s)
}

#[tokio::test]
async fn per_source_connection_limits_hold_on_tcp_listeners() {
    let (backend, accepted) = counting_echo().await;
    let config = TcpRelayConfig {
        source_limits: wazuh_proxy_core::limits::SourceLimits {
            max_open: 2,
            rate: 0.0,
            burst: 0.0,
        },
        ..TcpRelayConfig::default()
    };
    let r = start(&[backend], config).await;
    let (ok1, c1) = round_trip_from("127.0.0.1", r.addr).await;
    let (ok2, _c2) = round_trip_from("127.0.0.1", r.addr).await;
    assert!(ok1 && ok2);
    let (ok3, _c3) = round_trip_from("127.0.0.1", r.addr).await;
    assert!(!ok3, "a third connection from one address is refused");
    assert_eq!(r.relay.stats().rejected(Rejection::SourceLimit), 1);
    assert_eq!(
        accepted.load(Ordering::SeqCst),
        2,
        "the refused one never reached a backend"
    );
    // Another address is not affected; a closed connection frees its place.
    let (ok4, _c4) = round_trip_from("127.0.0.2", r.addr).await;
    assert!(ok4);
    drop(c1);
    let mut freed = false;
    for _ in 0..100 {
        if round_trip_from("127.0.0.1", r.addr).await.0 {
            freed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(freed);
    r.stop.cancel();
    r.relay.close_all();
}

#[tokio::test]
async fn per_source_connection_rate_holds_on_tcp_listeners() {
    let (backend, _) = counting_echo().await;
    let config = TcpRelayConfig {
        source_limits: wazuh_proxy_core::limits::SourceLimits {
            max_open: 0,
            rate: 0.001,
            burst: 2.0,
        },
        ..TcpRelayConfig::default()
    };
    let r = start(&[backend], config).await;
    let mut held = Vec::new();
    let mut ok = 0;
    for _ in 0..4 {
        let (o, s) = round_trip_from("127.0.0.1", r.addr).await;
        ok += usize::from(o);
        held.push(s);
    }
    assert_eq!(ok, 2);
    assert_eq!(r.relay.stats().rejected(Rejection::SourceLimit), 2);
    assert!(round_trip_from("127.0.0.4", r.addr).await.0);
    r.stop.cancel();
    r.relay.close_all();
}

#[tokio::test]
async fn a_client_silent_past_the_first_byte_deadline_is_closed_before_any_backend() {
    let (backend, accepted) = counting_echo().await;
    let config = TcpRelayConfig {
        first_byte_timeout: Some(Duration::from_millis(200)),
        ..TcpRelayConfig::default()
    };
    let r = start(&[backend], config).await;
    let mut silent = TcpStream::connect(r.addr).await.unwrap();
    let mut buf = [0u8; 1];
    let closed = tokio::time::timeout(Duration::from_secs(5), silent.read(&mut buf)).await;
    assert!(matches!(closed, Ok(Ok(0)) | Ok(Err(_))), "{closed:?}");
    assert_eq!(r.relay.stats().rejected(Rejection::FirstFrameTimeout), 1);
    assert_eq!(accepted.load(Ordering::SeqCst), 0);
    // A client that speaks is relayed.
    assert!(round_trip_from("127.0.0.1", r.addr).await.0);
    assert_eq!(accepted.load(Ordering::SeqCst), 1);
    r.stop.cancel();
    r.relay.close_all();
}
