//! `proxy_protocol = true` behind a load balancer: the address a PROXY header carries is the
//! client's address everywhere (the session table, balancing by source, the per-source
//! limits), and a connection from outside `proxy_protocol_trusted` is refused.
//!
//! Balancing by source is checked on a `tcp` listener: on `agent` listeners the relay routes by
//! the agent's ID whatever the policy (agents without an ID go by their address).

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use serde_json::Value;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpSocket, TcpStream};
use tokio_util::codec::Framed;
use wazuh_proxy_core::balance::{BackendConfig, BalanceKey, Balancer, Policy};
use wazuh_proxy_core::envelope::AgentId;
use wazuh_proxy_core::frame::FrameCodec;
use wazuh_proxy_core::sim::{agent_payload, Manager, Reply};
use wazuh_proxy_test_support::*;

/// A PROXY v2 header (PROXY command, TCP over IPv4) for `source` -> `dest`.
fn v2(source: SocketAddr, dest: SocketAddr) -> Vec<u8> {
    let (SocketAddr::V4(s), SocketAddr::V4(d)) = (source, dest) else {
        panic!("IPv4 only here")
    };
    let mut h = wazuh_proxy_core::proxy_protocol::V2_SIGNATURE.to_vec();
    h.extend_from_slice(&[0x21, 0x11, 0x00, 12]);
    h.extend_from_slice(&s.ip().octets());
    h.extend_from_slice(&d.ip().octets());
    h.extend_from_slice(&s.port().to_be_bytes());
    h.extend_from_slice(&d.port().to_be_bytes());
    h
}

/// Connects from `from` (a loopback address), sends `header` and one agent frame.
async fn agent_via(
    from: IpAddr,
    proxy: SocketAddr,
    header: &[u8],
    id: &str,
) -> Framed<TcpStream, FrameCodec> {
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind(SocketAddr::new(from, 0)).unwrap();
    let mut stream = socket.connect(proxy).await.unwrap();
    // A refused connection may be closed before these writes: what counts is what the
    // proxy does next (see `closed`), not whether the bytes went out.
    let _ = stream.write_all(header).await;
    let mut a = Framed::new(stream, FrameCodec::default());
    let _ = a
        .send(Bytes::from(agent_payload(
            AgentId::parse(id.as_bytes()),
            0,
            64,
        )))
        .await;
    a
}

/// Whether the proxy closes the connection (reads end) within a few seconds.
async fn closed(a: &mut Framed<TcpStream, FrameCodec>) -> bool {
    matches!(
        tokio::time::timeout(Duration::from_secs(5), a.next()).await,
        Ok(None | Some(Err(_)))
    )
}

async fn sessions(admin: SocketAddr) -> Vec<Value> {
    let (status, body) = tokio::task::spawn_blocking(move || http("GET", admin, "/sessions"))
        .await
        .unwrap();
    assert_eq!(status, 200, "{body}");
    serde_json::from_str::<Vec<Value>>(&body).unwrap()
}

async fn session_of(admin: SocketAddr, agent: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(s) = sessions(admin)
            .await
            .into_iter()
            .find(|s| s["agent"] == agent && !s["backend"].is_null())
        {
            return s;
        }
        assert!(Instant::now() < deadline, "no session of {agent}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn the_carried_address_is_the_client_and_untrusted_senders_are_refused() {
    let m1 = Manager::start("127.0.0.1:0".parse().unwrap(), "m1", Reply::AckFirst)
        .await
        .unwrap();
    let m2 = Manager::start("127.0.0.1:0".parse().unwrap(), "m2", Reply::AckFirst)
        .await
        .unwrap();
    let (listen, tcp_listen, admin) = (free_addr(), free_addr(), free_addr());
    let dir = std::env::temp_dir().join(format!("wazuh-proxy-pp-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("proxy.toml");
    std::fs::write(
        &config,
        format!(
            r#"admin = "{admin}"
[[listener]]
name = "agents"
listen = "{listen}"
proxy_protocol = true
proxy_protocol_trusted = ["127.0.0.1/32"]
max_connections_per_source = 1
backends = [{{ address = "{m1}" }}, {{ address = "{m2}" }}]

[[listener]]
name = "relay"
kind = "tcp"
listen = "{tcp_listen}"
balance = "source"
proxy_protocol = true
proxy_protocol_trusted = ["127.0.0.1/32"]
backends = [{{ address = "{m1}" }}, {{ address = "{m2}" }}]
"#,
            m1 = m1.addr(),
            m2 = m2.addr()
        ),
    )
    .unwrap();
    let _proxy = ProxyProcess::start(
        &[
            "run",
            "--config",
            config.to_str().unwrap(),
            "--admin",
            &admin.to_string(),
        ],
        listen,
    );

    // Two carried addresses that a source hash sends to different managers: the first choice
    // of the same consistent hash the proxy uses.
    let balancer = Balancer::new(
        Policy::Source,
        vec![BackendConfig::new(m1.addr()), BackendConfig::new(m2.addr())],
    )
    .unwrap();
    let preferred = |ip: IpAddr| {
        let order = balancer.candidates(&BalanceKey::Source(ip), Instant::now());
        balancer.backends()[order.as_slice()[0]].addr()
    };
    let a_ip: IpAddr = "198.18.0.7".parse().unwrap();
    let b_ip = (8..=255u8)
        .map(|n| IpAddr::from([198, 18, 0, n]))
        .find(|ip| preferred(*ip) != preferred(a_ip))
        .expect("an address hashed to the other manager");
    let lb: IpAddr = "127.0.0.1".parse().unwrap();

    // 1. The session table shows the carried address.
    let a_src = SocketAddr::new(a_ip, 40001);
    let mut a = agent_via(lb, listen, &v2(a_src, listen), "001").await;
    assert_eq!(session_of(admin, "001").await["client"], a_src.to_string());
    let b_src = SocketAddr::new(b_ip, 40002);
    let mut b = agent_via(lb, listen, &v2(b_src, listen), "002").await;
    assert_eq!(session_of(admin, "002").await["client"], b_src.to_string());

    // Balancing by source hashes the carried address: both connections come from the
    // balancer's 127.0.0.1, yet each lands on its own address's manager.
    assert_ne!(preferred(a_ip), preferred(b_ip));
    let manager_of = |addr: SocketAddr| if addr == m1.addr() { &m1 } else { &m2 };
    for (ip, id) in [(a_ip, "011"), (b_ip, "012")] {
        let t = agent_via(
            lb,
            tcp_listen,
            &v2(SocketAddr::new(ip, 41000), tcp_listen),
            id,
        )
        .await;
        let want = manager_of(preferred(ip));
        let other = manager_of(if preferred(ip) == m1.addr() {
            m2.addr()
        } else {
            m1.addr()
        });
        let deadline = Instant::now() + Duration::from_secs(10);
        while want.frames_from(id).is_empty() {
            assert!(
                Instant::now() < deadline,
                "{id} ({ip}) did not reach {}",
                preferred(ip)
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(
            other.frames_from(id).is_empty(),
            "{id} reached the other manager"
        );
        drop(t);
    }

    // 2. Per-source limits count the carried address: a second connection claiming a_ip is
    //    over max_connections_per_source = 1, while both came from the same balancer.
    let mut again = agent_via(lb, listen, &v2(SocketAddr::new(a_ip, 40003), listen), "003").await;
    assert!(
        closed(&mut again).await,
        "a second connection from {a_ip} was admitted"
    );
    assert_eq!(
        metric(
            admin,
            "wazuh_proxy_rejected_total{listener=\"agents\",reason=\"source_limit\"}"
        )
        .await,
        1.0
    );

    // 3. A sender outside proxy_protocol_trusted is refused, header or not. (The start-up
    //    probe of the test support, a connection without a header, was refused already.)
    let refused_before = metric(
        admin,
        "wazuh_proxy_rejected_total{listener=\"agents\",reason=\"proxy_protocol\"}",
    )
    .await;
    let mut untrusted = agent_via(
        "127.0.0.2".parse().unwrap(),
        listen,
        &v2(SocketAddr::new("198.18.0.99".parse().unwrap(), 1), listen),
        "004",
    )
    .await;
    assert!(
        closed(&mut untrusted).await,
        "an untrusted sender was served"
    );
    // A trusted sender without a header is refused too.
    let mut bare = agent_via(lb, listen, b"", "005").await;
    assert!(
        closed(&mut bare).await,
        "a connection without a header was served"
    );
    // A v1 header works as well.
    let c_src: SocketAddr = "198.18.1.1:40005".parse().unwrap();
    let line = format!(
        "PROXY TCP4 {} {} {} {}\r\n",
        c_src.ip(),
        listen.ip(),
        c_src.port(),
        listen.port()
    );
    let mut c = agent_via(lb, listen, line.as_bytes(), "006").await;
    assert_eq!(session_of(admin, "006").await["client"], c_src.to_string());

    assert_eq!(
        metric(
            admin,
            "wazuh_proxy_rejected_total{listener=\"agents\",reason=\"proxy_protocol\"}"
        )
        .await,
        refused_before + 2.0
    );
    let agents: Vec<String> = sessions(admin)
        .await
        .iter()
        .map(|s| s["agent"].as_str().unwrap_or_default().to_owned())
        .collect();
    assert!(
        !agents.contains(&"004".to_owned()) && !agents.contains(&"005".to_owned()),
        "{agents:?}"
    );
    // The admitted agents are still served.
    for x in [&mut a, &mut b, &mut c] {
        assert!(tokio::time::timeout(Duration::from_secs(5), x.next())
            .await
            .is_ok());
    }
    std::fs::remove_dir_all(dir).unwrap();
}

// An enroll listener reads the header before the TLS handshake: a sender outside the trusted
// networks, or a connection without a header, is closed and counted as
// `reason="proxy_protocol"`.
#[tokio::test]
async fn enroll_listeners_read_the_header_before_tls() {
    let (listen, admin) = (free_addr(), free_addr());
    let dir = std::env::temp_dir().join(format!("wazuh-proxy-pp-enroll-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("proxy.toml");
    std::fs::write(
        &config,
        format!(
            r#"admin = "{admin}"
[[listener]]
name = "enroll"
kind = "enroll"
listen = "{listen}"
tls_dir = "{tls}"
backend_verify = false
proxy_protocol = true
proxy_protocol_trusted = ["127.0.0.1/32"]
backends = [{{ address = "127.0.0.1:1" }}]
"#,
            tls = dir.display()
        ),
    )
    .unwrap();
    let _proxy = ProxyProcess::start(
        &[
            "run",
            "--config",
            config.to_str().unwrap(),
            "--admin",
            &admin.to_string(),
        ],
        listen,
    );
    let refused = |reason: &str| {
        format!("wazuh_proxy_enroll_refused_total{{listener=\"enroll\",reason=\"{reason}\"}}")
    };
    let connect = |from: &str, header: Vec<u8>| {
        let from: IpAddr = from.parse().unwrap();
        async move {
            let socket = TcpSocket::new_v4().unwrap();
            socket.bind(SocketAddr::new(from, 0)).unwrap();
            let mut s = socket.connect(listen).await.unwrap();
            let _ = s.write_all(&header).await;
            s
        }
    };
    let closed = |mut s: TcpStream| async move {
        let mut buf = [0u8; 64];
        matches!(
            tokio::time::timeout(
                Duration::from_secs(5),
                tokio::io::AsyncReadExt::read(&mut s, &mut buf)
            )
            .await,
            Ok(Ok(0) | Err(_))
        )
    };
    let carried = |ip: &str| v2(SocketAddr::new(ip.parse().unwrap(), 40000), listen);

    // A trusted sender's connection is read past its header and waits for its TLS
    // handshake (the carried address as its client is shown by the core front's tests).
    let held = connect("127.0.0.1", carried("192.0.2.9")).await;
    // The start-up readiness probe, a bare connect from 127.0.0.1 closed at once, is the
    // first refusal: wait for it to be counted, then count from there.
    let deadline = Instant::now() + Duration::from_secs(10);
    while metric(admin, &refused("proxy_protocol")).await < 1.0 {
        assert!(Instant::now() < deadline, "the probe's refusal is counted");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let before = metric(admin, &refused("proxy_protocol")).await;
    // The untrusted sender and the header-less connection are refused.
    assert!(closed(connect("127.0.0.2", carried("192.0.2.11")).await).await);
    assert!(
        closed(
            connect(
                "127.0.0.1",
                b"\x16\x03\x01\x00\x05hello-not-a-header".to_vec()
            )
            .await
        )
        .await
    );
    assert_eq!(
        metric(admin, &refused("proxy_protocol")).await,
        before + 2.0
    );
    drop(held);
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn configuration_rules() {
    let dir = std::env::temp_dir().join(format!("wazuh-proxy-pp-cfg-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let check = |extra: &str, kind: &str| {
        let f = dir.join("p.toml");
        std::fs::write(
            &f,
            format!("[[listener]]\nlisten = \"127.0.0.1:0\"\nkind = \"{kind}\"\nbalance = \"source\"\n{extra}\nbackends = [{{ address = \"127.0.0.1:1\" }}]\n"),
        )
        .unwrap();
        let out = bin()
            .args(["check-config", f.to_str().unwrap()])
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned()
                + &String::from_utf8_lossy(&out.stderr),
        )
    };
    let (code, out) = check("proxy_protocol = true", "agent");
    assert_eq!(code, Some(3), "{out}");
    assert!(out.contains("needs proxy_protocol_trusted"), "{out}");
    let (code, out) = check("proxy_protocol_trusted = [\"10.0.0.0/8\"]", "agent");
    assert_eq!(code, Some(3), "{out}");
    let (code, out) = check(
        "proxy_protocol = true\nproxy_protocol_trusted = [\"10.0.0.0/33\"]",
        "agent",
    );
    assert_eq!(code, Some(3), "{out}");
    assert!(out.contains("p.toml:6"), "{out}");
    let (code, out) = check(
        "proxy_protocol = true\nproxy_protocol_trusted = [\"10.0.0.0/8\"]",
        "udp",
    );
    assert_eq!(code, Some(3), "{out}");
    assert!(
        out.contains("kind = \"udp\"") && out.contains("TCP only"),
        "{out}"
    );
    let (code, out) = check(
        "proxy_protocol = true\nproxy_protocol_trusted = [\"10.0.0.0/8\"]\nbackend_verify = false",
        "enroll",
    );
    assert_eq!(code, Some(0), "{out}");
    assert!(
        out.contains("proxy_protocol_trusted = [\"10.0.0.0/8\"]"),
        "{out}"
    );
    let (code, out) = check(
        "proxy_protocol = true\nproxy_protocol_trusted = [\"10.0.0.0/8\", \"192.0.2.7\"]",
        "tcp",
    );
    assert_eq!(code, Some(0), "{out}");
    assert!(
        out.contains("proxy_protocol_trusted = [\"10.0.0.0/8\", \"192.0.2.7/32\"]"),
        "{out}"
    );
    std::fs::remove_dir_all(dir).unwrap();
}
