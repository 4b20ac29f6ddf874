//! `wazuh-proxy demo`: two stand-in managers, the proxy and a handful of agents on loopback,
//! showing where each agent goes, what the proxy knows about it, and what happens when a
//! manager dies.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use tokio::net::TcpStream;
use tokio_util::codec::Framed;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use wazuh_proxy_core::balance::{BackendConfig, Balancer, Policy};
use wazuh_proxy_core::envelope::AgentId;
use wazuh_proxy_core::frame::FrameCodec;
use wazuh_proxy_core::net;
use wazuh_proxy_core::relay::{AgentRelay, AgentRelayConfig};
use wazuh_proxy_core::sim::{agent_payload, Manager, Reply};

/// Why the demo failed.
#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    /// A socket operation failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The cause.
        source: std::io::Error,
    },
    /// Something the demo expects did not happen.
    #[error("{0}")]
    Unexpected(String),
}

fn io(what: &'static str) -> impl FnOnce(std::io::Error) -> DemoError {
    move |source| DemoError::Io { what, source }
}

type Agent = Framed<TcpStream, FrameCodec>;

/// Connects agent `id`, sends its first frame and returns the connection and the manager that
/// answered.
async fn connect_agent(
    proxy: std::net::SocketAddr,
    id: AgentId,
    seq: u64,
) -> Result<(Agent, String), DemoError> {
    let stream = TcpStream::connect(proxy)
        .await
        .map_err(io("connecting to the proxy"))?;
    let mut agent = Framed::new(stream, FrameCodec::default());
    agent
        .send(Bytes::from(agent_payload(Some(id), seq, 96)))
        .await
        .map_err(|e| DemoError::Unexpected(format!("agent {id}: sending startup: {e}")))?;
    let ack = tokio::time::timeout(Duration::from_secs(5), agent.next())
        .await
        .map_err(|_| DemoError::Unexpected(format!("agent {id}: no ACK within 5 s")))?
        .and_then(Result::ok)
        .ok_or_else(|| {
            DemoError::Unexpected(format!("agent {id}: connection closed before the ACK"))
        })?;
    let text = String::from_utf8_lossy(&ack);
    let manager = text.rsplit(' ').next().unwrap_or("?").to_owned();
    Ok((agent, manager))
}

/// Runs the demo with `agents` agents and prints what happens.
///
/// # Errors
/// When a loopback socket cannot be opened or the proxy misbehaves.
pub async fn run(agents: usize) -> Result<(), DemoError> {
    let any = std::net::SocketAddr::from(([127, 0, 0, 1], 0));
    let a = Manager::start(any, "manager-a", Reply::AckFirst)
        .await
        .map_err(io("starting manager-a"))?;
    let b = Manager::start(any, "manager-b", Reply::AckFirst)
        .await
        .map_err(io("starting manager-b"))?;
    let backends = vec![BackendConfig::new(a.addr()), BackendConfig::new(b.addr())];
    let balancer = Balancer::new(Policy::AgentId, backends)
        .map_err(|e| DemoError::Unexpected(e.to_string()))?;
    let relay = Arc::new(AgentRelay::new(
        "agents",
        AgentRelayConfig::default(),
        balancer,
    ));
    let listener = net::bind_tcp(any, net::DEFAULT_BACKLOG).map_err(io("binding the proxy"))?;
    let proxy = listener
        .local_addr()
        .map_err(io("reading the proxy address"))?;
    let stop = CancellationToken::new();
    let tracker = TaskTracker::new();
    tokio::spawn(relay.clone().serve(listener, stop.clone(), tracker.clone()));

    println!("wazuh-proxy demo");
    println!("  proxy      {proxy}  (balance = agent-id)");
    println!("  manager-a  {}", a.addr());
    println!("  manager-b  {}", b.addr());
    println!();
    println!(
        "1. {agents} agents connect through the proxy and send a startup message and 5 events:"
    );
    let mut conns = Vec::new();
    for n in 1..=agents {
        let id = AgentId::parse(format!("{n:03}").as_bytes())
            .ok_or_else(|| DemoError::Unexpected("agent ID".into()))?;
        let (mut conn, manager) = connect_agent(proxy, id, 0).await?;
        for seq in 1..=5 {
            conn.send(Bytes::from(agent_payload(Some(id), seq, 200)))
                .await
                .map_err(|e| DemoError::Unexpected(format!("agent {id}: {e}")))?;
        }
        println!("   agent {id} -> {manager}");
        conns.push((id, conn, manager));
    }
    let expected = agents * 6;
    wait(|| a.frame_count() + b.frame_count() >= expected).await;
    println!();
    println!("2. What the proxy knows (its live session table):");
    println!(
        "   {:<6} {:<22} {:<22} {:>9} {:>9}",
        "agent", "client", "manager", "frames↑", "frames↓"
    );
    let mut sessions = relay.sessions().snapshot();
    sessions.sort_by_key(|s| s.key.to_string());
    for s in &sessions {
        let backend = s.backend.map_or("-".into(), |b| b.to_string());
        println!(
            "   {:<6} {:<22} {:<22} {:>9} {:>9}",
            s.key.to_string(),
            s.client.to_string(),
            backend,
            s.frames_up,
            s.frames_down
        );
    }
    println!(
        "   manager-a received {} frames from {:?}",
        a.frame_count(),
        a.agents()
    );
    println!(
        "   manager-b received {} frames from {:?}",
        b.frame_count(),
        b.agents()
    );
    println!();
    println!(
        "3. The same agents reconnect: the agent-ID hash sends each one to the same manager again:"
    );
    let mut same = 0;
    for (id, conn, manager) in conns.iter_mut() {
        // Like a real agent, close the old connection and connect again. (A second connection
        // claiming an agent that is live on another is refused: it could be anyone.)
        let _ = SinkExt::<Bytes>::close(conn).await;
        let (again, now) = connect_agent(proxy, *id, 6).await?;
        *conn = again;
        same += usize::from(*manager == now);
    }
    println!("   {same} of {agents} agents landed on the manager they had before");
    println!();
    // The manager that holds agents dies (the ports are random, so now and then the hash
    // puts every agent on one manager: that one, then).
    let (dead, live, dead_name, live_name) = if conns.iter().any(|c| c.2 == "manager-a") {
        (&a, &b, "manager-a", "manager-b")
    } else {
        (&b, &a, "manager-b", "manager-a")
    };
    println!(
        "4. {dead_name} dies. Its agents stay connected: the proxy moves each one to {live_name}"
    );
    println!("   at a message boundary, and the agent's next message arrives there:");
    dead.stop().await;
    for (id, conn, manager) in conns.iter_mut() {
        if manager != dead_name {
            continue;
        }
        // The agent notices nothing but one extra ACK (the survivor answering the startup
        // message the proxy replayed to register the agent there).
        let ack = tokio::time::timeout(Duration::from_secs(5), conn.next())
            .await
            .map_err(|_| {
                DemoError::Unexpected(format!("agent {id}: no answer from the new manager"))
            })?
            .and_then(Result::ok)
            .ok_or_else(|| {
                DemoError::Unexpected(format!("agent {id}: its connection was closed"))
            })?;
        let now = String::from_utf8_lossy(&ack)
            .rsplit(' ')
            .next()
            .unwrap_or("?")
            .to_owned();
        let before = live.frames_from(id.as_str()).len();
        conn.send(Bytes::from(agent_payload(Some(*id), 8, 200)))
            .await
            .map_err(|e| DemoError::Unexpected(format!("agent {id}: {e}")))?;
        wait(|| live.frames_from(id.as_str()).len() > before).await;
        println!("   agent {id}: {dead_name} -> {now}, same TCP connection, next event delivered");
        *manager = now;
    }
    println!(
        "   agents moved without a disconnect: {}",
        relay
            .stats()
            .failovers
            .load(std::sync::atomic::Ordering::Relaxed)
    );
    println!();
    println!(
        "Done: {} frames relayed agent->manager, {} manager->agent, {} sessions live.",
        relay
            .stats()
            .frames_up
            .load(std::sync::atomic::Ordering::Relaxed),
        relay
            .stats()
            .frames_down
            .load(std::sync::atomic::Ordering::Relaxed),
        relay.sessions().len()
    );
    stop.cancel();
    drop(conns);
    relay.close_all();
    Ok(())
}

async fn wait(mut cond: impl FnMut() -> bool) {
    for _ in 0..500 {
        if cond() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
