//! `resolve_interval`: a backend name that does not resolve at start leaves the proxy starting
//! (with `/health` naming it), becomes a backend when it resolves, and when a name's address
//! changes the agents on the old address move to the new set without being disconnected.
//!
//! Names come from a hosts file bind-mounted over /etc/hosts in a mount namespace of the proxy
//! alone (`unshare -m`; needs root), so the test changes what the proxy resolves without
//! touching the machine's resolver. Managers listen on 127.0.0.1 and 127.0.0.3.

use std::net::SocketAddr;
use std::process::Command;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use serde_json::Value;
use tokio::net::TcpStream;
use tokio_util::codec::Framed;
use wazuh_proxy_core::envelope::AgentId;
use wazuh_proxy_core::frame::FrameCodec;
use wazuh_proxy_core::sim::{agent_payload, Manager, Reply};
use wazuh_proxy_test_support::*;

fn backend_addrs(backends: &Value) -> Vec<String> {
    let mut v: Vec<String> = backends
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|l| l["backends"].as_array().cloned().unwrap_or_default())
        .filter_map(|b| b["address"].as_str().map(str::to_owned))
        .collect();
    v.sort();
    v
}

fn can_unshare() -> bool {
    Command::new("unshare")
        .args(["-m", "true"])
        .status()
        .is_ok_and(|s| s.success())
}

#[tokio::test]
async fn names_are_followed_as_they_resolve_and_move() {
    if !can_unshare() {
        skip_or_fail_in_ci("cannot create a mount namespace (unshare -m needs root)");
        return;
    }
    let m1 = Manager::start("127.0.0.1:0".parse().unwrap(), "m1", Reply::AckFirst)
        .await
        .unwrap();
    let m2 = Manager::start("127.0.0.1:0".parse().unwrap(), "m2", Reply::AckFirst)
        .await
        .unwrap();
    // The same port as m1 on another address: where mgr-a moves to.
    let m3_addr = SocketAddr::new("127.0.0.3".parse().unwrap(), m1.addr().port());
    let m3 = Manager::start(m3_addr, "m3", Reply::AckFirst)
        .await
        .unwrap();
    let (p1, p2) = (m1.addr().port(), m2.addr().port());

    let dir = std::env::temp_dir().join(format!("wazuh-proxy-resolve-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let hosts = dir.join("hosts");
    std::fs::write(&hosts, "127.0.0.1 localhost\n127.0.0.1 mgr-a.test\n").unwrap();
    let (listen, admin) = (free_addr(), free_addr());
    let config = dir.join("proxy.toml");
    std::fs::write(
        &config,
        format!(
            r#"admin = "{admin}"
[[listener]]
name = "agents"
listen = "{listen}"
resolve_interval = "200ms"
health_check_interval = "200ms"
backends = [{{ address = "mgr-a.test:{p1}" }}, {{ address = "mgr-b.test:{p2}" }}]
"#
        ),
    )
    .unwrap();
    let script = format!(
        "mount --bind {} /etc/hosts && exec {} run --config {}",
        hosts.display(),
        env!("CARGO_BIN_EXE_wazuh-proxy"),
        config.display()
    );
    let mut cmd = Command::new("unshare");
    cmd.args(["-m", "sh", "-c", &script]);
    let mut proxy = ProxyProcess::start_command(cmd, listen);

    // 1. Started with mgr-b unresolvable: healthy on mgr-a, and /health names mgr-b.
    let (status, health) = get_json(admin, "/health").await;
    assert_eq!(status, 200, "{health}");
    let unresolved = &health["listeners"][0]["unresolved"];
    assert_eq!(
        unresolved[0]["backend"],
        format!("mgr-b.test:{p2}"),
        "{health}"
    );
    let why = unresolved[0]["error"].as_str().unwrap_or_default();
    assert!(why.contains("cannot resolve"), "/health says why: {health}");
    let (_, backends) = get_json(admin, "/backends").await;
    assert_eq!(backend_addrs(&backends), vec![m1.addr().to_string()]);

    let mut agent = Framed::new(
        TcpStream::connect(listen).await.unwrap(),
        FrameCodec::default(),
    );
    agent
        .send(Bytes::from(agent_payload(AgentId::parse(b"001"), 0, 64)))
        .await
        .unwrap();
    let ack = tokio::time::timeout(Duration::from_secs(5), agent.next()).await;
    assert!(matches!(ack, Ok(Some(Ok(_)))), "{ack:?}");
    assert_eq!(m1.frames_from("001").len(), 1);

    // 2. mgr-b resolves: it becomes a backend, and /health stops naming it.
    std::fs::write(
        &hosts,
        "127.0.0.1 localhost\n127.0.0.1 mgr-a.test\n127.0.0.1 mgr-b.test\n",
    )
    .unwrap();
    wait_for_async("mgr-b to be added", 15, || async {
        let (_, b) = get_json(admin, "/backends").await;
        backend_addrs(&b).len() == 2
    })
    .await;
    let (status, health) = get_json(admin, "/health").await;
    assert_eq!(status, 200);
    assert!(health["listeners"][0]["unresolved"].is_null(), "{health}");

    // 3. mgr-a moves to 127.0.0.3: the agent on the old address moves without a disconnect.
    std::fs::write(
        &hosts,
        "127.0.0.1 localhost\n127.0.0.3 mgr-a.test\n127.0.0.1 mgr-b.test\n",
    )
    .unwrap();
    wait_for_async("mgr-a's new address", 15, || async {
        let (_, b) = get_json(admin, "/backends").await;
        backend_addrs(&b).contains(&m3_addr.to_string())
            && !backend_addrs(&b).contains(&m1.addr().to_string())
    })
    .await;
    let old = m1.addr().to_string();
    let deadline = Instant::now() + Duration::from_secs(15);
    let now_on = loop {
        let (_, s) = get_json(admin, "/sessions").await;
        let b = s[0]["backend"].as_str().unwrap_or_default().to_owned();
        if !b.is_empty() && b != old {
            break b;
        }
        assert!(Instant::now() < deadline, "the agent stayed on {old}: {s}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let (_, s) = get_json(admin, "/sessions").await;
    assert_eq!(
        s.as_array().unwrap().len(),
        1,
        "one session, never closed: {s}"
    );
    assert_eq!(s[0]["agent"], "001");
    // The same connection carries on to the new manager.
    agent
        .send(Bytes::from(agent_payload(AgentId::parse(b"001"), 1, 64)))
        .await
        .unwrap();
    let new_manager = if now_on == m3_addr.to_string() {
        &m3
    } else {
        &m2
    };
    wait_for_async("the next frame at the new manager", 15, || async {
        new_manager
            .frames_from("001")
            .iter()
            .any(|f| f.windows(6).any(|w| w == b"seq=1;"))
    })
    .await;
    let logs = proxy.logs();
    assert!(!logs.contains("agent disconnected"), "{logs}");
    assert!(logs.contains("applied like a reload"), "{logs}");

    proxy.signal("TERM");
    drop(agent);
    assert!(proxy.wait_exit(40).is_some_and(|s| s.success()));
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn without_resolve_interval_an_unresolvable_name_stops_the_start() {
    let dir = std::env::temp_dir().join(format!("wazuh-proxy-resolve-cfg-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let f = dir.join("p.toml");
    let body = "[[listener]]\nlisten = \"127.0.0.1:0\"\nbackends = [{ address = \"127.0.0.1:1\" }, { address = \"no-such-host.invalid:1514\" }]\n";
    std::fs::write(&f, body).unwrap();
    let out = bin()
        .args(["check-config", f.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(3));
    // With it, the start is allowed and the name stays a name in the effective configuration.
    std::fs::write(
        &f,
        body.replace(
            "[[listener]]\n",
            "[[listener]]\nresolve_interval = \"30s\"\n",
        ),
    )
    .unwrap();
    let out = bin()
        .args(["check-config", f.to_str().unwrap()])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("resolve_interval = \"30s\""), "{text}");
    assert!(
        text.contains("address = \"no-such-host.invalid:1514\""),
        "{text}"
    );
    // Every name unresolvable: refused (a listener needs one backend to start).
    std::fs::write(
        &f,
        "[[listener]]\nlisten = \"127.0.0.1:0\"\nresolve_interval = \"30s\"\nbackends = [{ address = \"no-such-host.invalid:1514\" }]\n",
    )
    .unwrap();
    let out = bin()
        .args(["check-config", f.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(3));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no backend of this listener resolves yet")
    );
    std::fs::remove_dir_all(dir).unwrap();
}

/// A tiny authoritative DNS server on loopback (UDP): answers SRV and A questions from a table
/// the test changes, NXDOMAIN for the rest, TTL 0.
mod dns {
    use std::collections::HashMap;
    use std::net::{Ipv4Addr, SocketAddr};
    use std::sync::{Arc, Mutex};

    use hickory_proto::op::{Message, MessageType, ResponseCode};
    use hickory_proto::rr::rdata::{A, SRV};
    use hickory_proto::rr::{Name, RData, Record, RecordType};

    /// Records by (lower-case name without the final dot, type).
    type Records = HashMap<(String, RecordType), Vec<RData>>;

    #[derive(Clone, Default)]
    pub struct Zone(Arc<Mutex<Records>>);

    impl Zone {
        pub fn srv(&self, name: &str, targets: &[(u16, u16, &str)]) {
            let data = targets
                .iter()
                .map(|&(priority, port, target)| {
                    RData::SRV(SRV::new(
                        priority,
                        1,
                        port,
                        Name::from_ascii(target).unwrap(),
                    ))
                })
                .collect();
            self.set(name, RecordType::SRV, data);
        }

        pub fn a(&self, name: &str, ip: Ipv4Addr) {
            self.set(name, RecordType::A, vec![RData::A(A(ip))]);
        }

        fn set(&self, name: &str, kind: RecordType, data: Vec<RData>) {
            let key = (name.trim_end_matches('.').to_ascii_lowercase(), kind);
            self.0.lock().unwrap().insert(key, data);
        }
    }

    /// Serves `zone` until the test ends; its address.
    pub async fn serve(zone: Zone) -> SocketAddr {
        let socket = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let addr = socket.local_addr().unwrap();
        tokio::spawn(async move {
            let mut buf = vec![0u8; 4096];
            loop {
                let Ok((n, from)) = socket.recv_from(&mut buf).await else {
                    return;
                };
                let Ok(query) = Message::from_vec(&buf[..n]) else {
                    continue;
                };
                let mut reply = Message::new();
                reply
                    .set_id(query.id())
                    .set_message_type(MessageType::Response)
                    .set_op_code(query.op_code())
                    .set_authoritative(true)
                    .set_recursion_desired(query.recursion_desired());
                reply.add_queries(query.queries().to_vec());
                let mut found_name = false;
                for q in query.queries() {
                    let name = q.name().to_ascii();
                    let key = name.trim_end_matches('.').to_ascii_lowercase();
                    let table = zone.0.lock().unwrap();
                    found_name |= table.keys().any(|(n, _)| *n == key);
                    for data in table.get(&(key, q.query_type())).into_iter().flatten() {
                        reply.add_answer(Record::from_rdata(q.name().clone(), 0, data.clone()));
                    }
                }
                if !found_name {
                    reply.set_response_code(ResponseCode::NXDomain);
                }
                if let Ok(bytes) = reply.to_vec() {
                    let _ = socket.send_to(&bytes, from).await;
                }
            }
        });
        addr
    }
}

// Two workers: the DNS server answers while the test thread waits for the proxy to start.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn srv_records_are_followed_as_they_resolve_and_move() {
    let m1 = Manager::start("127.0.0.1:0".parse().unwrap(), "m1", Reply::AckFirst)
        .await
        .unwrap();
    let m2 = Manager::start("127.0.0.1:0".parse().unwrap(), "m2", Reply::AckFirst)
        .await
        .unwrap();
    let m3 = Manager::start("127.0.0.1:0".parse().unwrap(), "m3", Reply::AckFirst)
        .await
        .unwrap();
    let zone = dns::Zone::default();
    zone.a("m1.test", "127.0.0.1".parse().unwrap());
    zone.srv("_wazuh._tcp.a.test", &[(10, m1.addr().port(), "m1.test.")]);
    let server = dns::serve(zone.clone()).await;

    let dir = std::env::temp_dir().join(format!("wazuh-proxy-srv-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (listen, admin) = (free_addr(), free_addr());
    let config = dir.join("proxy.toml");
    std::fs::write(
        &config,
        format!(
            r#"admin = "{admin}"
resolvers = ["{server}"]
[[listener]]
name = "agents"
listen = "{listen}"
resolve_interval = "200ms"
health_check_interval = "200ms"
backends = [{{ srv = "_wazuh._tcp.a.test" }}, {{ srv = "_wazuh._tcp.b.test" }}]
"#
        ),
    )
    .unwrap();
    let cfg = config.to_str().unwrap().to_owned();
    // The effective configuration keeps the record and the name servers, and loads again.
    let out = bin().args(["check-config", &cfg]).output().unwrap();
    let printed = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        printed.contains(&format!("resolvers = [\"{server}\"]")),
        "{printed}"
    );
    assert!(
        printed.contains("{ srv = \"_wazuh._tcp.b.test\""),
        "{printed}"
    );
    let effective = dir.join("effective.toml");
    std::fs::write(&effective, &printed).unwrap();
    let again = bin()
        .args(["check-config", effective.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&again.stdout), printed);

    let mut cmd = bin();
    cmd.args(["run", "--config", &cfg]);
    let mut proxy = ProxyProcess::start_command(cmd, listen);

    let deadline = Instant::now() + Duration::from_secs(10);
    while http_get(admin, "/health").is_err() {
        assert!(
            Instant::now() < deadline,
            "the admin API never answered: {}",
            proxy.logs()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // 1. Started with b.test's record missing: serving through a.test's target, /health
    //    names the missing record.
    let (status, health) = get_json(admin, "/health").await;
    assert_eq!(status, 200, "{health}");
    assert_eq!(
        health["listeners"][0]["unresolved"][0]["backend"], "_wazuh._tcp.b.test",
        "{health}"
    );
    let why = health["listeners"][0]["unresolved"][0]["error"]
        .as_str()
        .unwrap_or_default();
    assert!(why.contains("no record"), "/health says why: {health}");
    let (_, backends) = get_json(admin, "/backends").await;
    assert_eq!(backend_addrs(&backends), vec![m1.addr().to_string()]);
    let mut agent = Framed::new(
        TcpStream::connect(listen).await.unwrap(),
        FrameCodec::default(),
    );
    agent
        .send(Bytes::from(agent_payload(AgentId::parse(b"001"), 0, 64)))
        .await
        .unwrap();
    let ack = tokio::time::timeout(Duration::from_secs(5), agent.next()).await;
    assert!(matches!(ack, Ok(Some(Ok(_)))), "{ack:?}");
    assert_eq!(m1.frames_from("001").len(), 1);

    // 2. b.test's record appears (its target on another port): a backend, and /health stops
    //    naming it. A second target of a higher priority number is a backup.
    zone.srv(
        "_wazuh._tcp.b.test",
        &[
            (10, m2.addr().port(), "m1.test."),
            (20, m3.addr().port(), "m1.test."),
        ],
    );
    wait_for_async("b.test's targets to be added", 15, || async {
        let (_, b) = get_json(admin, "/backends").await;
        backend_addrs(&b).len() == 3
    })
    .await;
    let (_, health) = get_json(admin, "/health").await;
    assert!(health["listeners"][0]["unresolved"].is_null(), "{health}");
    let (_, backends) = get_json(admin, "/backends").await;
    let backup_of = |addr: String| {
        backends[0]["backends"]
            .as_array()
            .unwrap()
            .iter()
            .find(|b| b["address"] == addr.as_str())
            .map(|b| b["backup"].clone())
    };
    assert_eq!(
        backup_of(m3.addr().to_string()),
        Some(Value::Bool(true)),
        "{backends}"
    );
    assert_eq!(
        backup_of(m2.addr().to_string()),
        Some(Value::Bool(false)),
        "{backends}"
    );

    // 3. a.test's record moves to another port: the agent on the old address moves without a
    //    disconnect, on the same connection.
    zone.srv("_wazuh._tcp.a.test", &[(10, m2.addr().port(), "m1.test.")]);
    wait_for_async("a.test's old target to go", 15, || async {
        let (_, b) = get_json(admin, "/backends").await;
        !backend_addrs(&b).contains(&m1.addr().to_string())
    })
    .await;
    let old = m1.addr().to_string();
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let (_, s) = get_json(admin, "/sessions").await;
        let b = s[0]["backend"].as_str().unwrap_or_default().to_owned();
        if !b.is_empty() && b != old {
            assert_eq!(b, m2.addr().to_string(), "{s}");
            break;
        }
        assert!(Instant::now() < deadline, "the agent stayed on {old}: {s}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (_, s) = get_json(admin, "/sessions").await;
    assert_eq!(
        s.as_array().unwrap().len(),
        1,
        "one session, never closed: {s}"
    );
    agent
        .send(Bytes::from(agent_payload(AgentId::parse(b"001"), 1, 64)))
        .await
        .unwrap();
    wait_for_async("the next frame at the new manager", 15, || async {
        m2.frames_from("001")
            .iter()
            .any(|f| f.windows(6).any(|w| w == b"seq=1;"))
    })
    .await;
    let logs = proxy.logs();
    assert!(!logs.contains("agent disconnected"), "{logs}");
    assert!(logs.contains("applied like a reload"), "{logs}");

    proxy.signal("TERM");
    drop(agent);
    assert!(proxy.wait_exit(40).is_some_and(|s| s.success()));
    std::fs::remove_dir_all(dir).unwrap();
}
