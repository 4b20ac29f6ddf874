//! What keeping agents connected costs them: times for a manager failover, a drain, a refused
//! handshake retried, and a process hand-over, on loopback with stand-in managers.
//!
//! Run: `cargo run --release -p wazuh-proxy-core --example costs -- [AGENTS]`

use std::os::fd::AsFd;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use tokio::net::{TcpListener, TcpStream, UnixStream};
use tokio_util::codec::Framed;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use wazuh_proxy_core::balance::{BackendConfig, Balancer, Policy};
use wazuh_proxy_core::envelope::AgentId;
use wazuh_proxy_core::frame::FrameCodec;
use wazuh_proxy_core::proxy;
use wazuh_proxy_core::relay::{AgentRelay, AgentRelayConfig};
use wazuh_proxy_core::sim::{agent_payload, Manager, Reply};

type Agent = Framed<TcpStream, FrameCodec>;

fn id(n: usize) -> AgentId {
    AgentId::parse(format!("{n:05}").as_bytes()).unwrap_or_else(|| AgentId::parse(b"1").unwrap())
}

async fn start(
    managers: &[std::net::SocketAddr],
) -> (Arc<AgentRelay>, std::net::SocketAddr, std::os::fd::OwnedFd) {
    let backends = managers.iter().map(|m| BackendConfig::new(*m)).collect();
    let relay = Arc::new(AgentRelay::new(
        "agents",
        AgentRelayConfig::default(),
        Balancer::new(Policy::AgentId, backends).unwrap(),
    ));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let fd = listener.as_fd().try_clone_to_owned().unwrap();
    tokio::spawn(
        relay
            .clone()
            .serve(listener, CancellationToken::new(), TaskTracker::new()),
    );
    (relay, addr, fd)
}

async fn connect(addr: std::net::SocketAddr, n: usize) -> Agent {
    let mut a = Framed::new(
        TcpStream::connect(addr).await.unwrap(),
        FrameCodec::default(),
    );
    a.send(Bytes::from(agent_payload(Some(id(n)), 0, 100)))
        .await
        .unwrap();
    a.next().await.unwrap().unwrap();
    a
}

async fn until(mut cond: impl FnMut() -> bool) {
    while !cond() {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1000.0)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let n: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(1000);
    let any = "127.0.0.1:0".parse().unwrap();
    println!("agents: {n}");

    // 1. A manager dies: every agent it carried moves to the survivor.
    let m1 = Manager::start(any, "m1", Reply::AckFirst).await.unwrap();
    let m2 = Manager::start(any, "m2", Reply::AckFirst).await.unwrap();
    let (relay, addr, _) = start(&[m1.addr(), m2.addr()]).await;
    let mut agents = Vec::new();
    for i in 1..=n {
        agents.push(connect(addr, i).await);
    }
    let on_m1 = m1.open_connections() as u64;
    let t = Instant::now();
    m1.stop().await;
    until(|| relay.stats().failovers.load(Ordering::Relaxed) == on_m1).await;
    let failover = t.elapsed();
    until(|| {
        relay
            .sessions()
            .sessions()
            .iter()
            .all(|s| s.backend() == Some(m2.addr()))
    })
    .await;
    let connected = t.elapsed();
    until(|| m2.open_connections() == n).await;
    eprintln!(
        "(connect failures during the failover: {}; all connected to the survivor after {})",
        relay.stats().connect_failures.load(Ordering::Relaxed),
        ms(connected)
    );
    println!("manager failover: {on_m1} agents moved without a disconnect in {} (all re-registered with the survivor in {})", ms(failover), ms(t.elapsed()));

    // 2. Drain: every agent of a manager moves at a frame boundary.
    let m3 = Manager::start(any, "m3", Reply::AckFirst).await.unwrap();
    let (relay, addr, _) = start(&[m2.addr(), m3.addr()]).await;
    drop(agents);
    let mut agents = Vec::new();
    for i in 1..=n {
        agents.push(connect(addr, i).await);
    }
    until(|| m3.open_connections() > 0).await;
    let t = Instant::now();
    let moving = relay.drain_backend(m3.addr()).unwrap();
    until(|| m3.open_connections() == 0).await;
    println!(
        "drain: {moving} agents moved off a manager in {}",
        ms(t.elapsed())
    );

    // 3. A refused handshake ("Agent key already in use"), retried while the agent waits.
    let refuser = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let refuser_addr = refuser.local_addr().unwrap();
    tokio::spawn(async move {
        let mut first = true;
        loop {
            let Ok((s, _)) = refuser.accept().await else {
                return;
            };
            let refuse = std::mem::replace(&mut first, false);
            tokio::spawn(async move {
                let mut f = Framed::new(s, FrameCodec::default());
                let _ = f.next().await;
                if !refuse {
                    let _ = f.send(Bytes::from_static(b"#AES:ack")).await;
                    while let Some(Ok(_)) = f.next().await {}
                }
            });
        }
    });
    let (_, addr, _) = start(&[refuser_addr]).await;
    let t = Instant::now();
    let _a = connect(addr, 1).await;
    let refused = t.elapsed();
    let t = Instant::now();
    let _b = connect(addr, 2).await;
    println!(
        "refused handshake retried: ACK after {} (an unrefused handshake: {})",
        ms(refused),
        ms(t.elapsed())
    );

    // 4. Process hand-over (binary upgrade) of every session.
    let (old, addr, fd) = start(&[m2.addr()]).await;
    drop(agents);
    let mut agents = Vec::new();
    for i in 1..=n {
        agents.push(connect(addr, i).await);
    }
    let (a, b) = UnixStream::pair().unwrap();
    let new = Arc::new(AgentRelay::new(
        "agents",
        AgentRelayConfig::default(),
        Balancer::new(Policy::AgentId, vec![BackendConfig::new(m2.addr())]).unwrap(),
    ));
    let t = Instant::now();
    let importer = {
        let new = new.clone();
        tokio::spawn(async move {
            let _listeners = proxy::handover::receive_inheritance(&b)
                .await
                .unwrap()
                .listeners;
            proxy::handover::adopt_sessions(&b, &[new], &TaskTracker::new())
                .await
                .unwrap()
        })
    };
    proxy::handover::offer_listeners(&a, &[("agents".into(), addr, false, fd.as_fd())])
        .await
        .unwrap();
    let handed = proxy::handover::hand_over_sessions(
        &a,
        std::slice::from_ref(&old),
        Duration::from_secs(60),
    )
    .await
    .unwrap();
    importer.await.unwrap();
    let moved = t.elapsed();
    until(|| new.sessions().len() == n).await;
    println!("upgrade hand-over: {handed} sessions handed over in {}, all relaying in the new process after {}", ms(moved), ms(t.elapsed()));
    drop(agents);
}
