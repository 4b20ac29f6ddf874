//! Agent connections on loopback speaking the agent protocol's framing.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio_util::codec::Framed;
use tokio_util::sync::CancellationToken;
use wazuh_proxy_core::envelope::AgentId;
use wazuh_proxy_core::frame::FrameCodec;
use wazuh_proxy_core::sim::{agent_payload, Manager, Reply};

use crate::wait::wait_for;

/// An agent connection speaking frames.
pub type AgentConn = Framed<TcpStream, FrameCodec>;

/// Agent `n`'s ID, three digits at least as Wazuh writes them (`001`).
pub fn id(n: usize) -> AgentId {
    AgentId::parse(format!("{n:03}").as_bytes()).unwrap()
}

/// A stand-in manager on a free loopback port that acknowledges each connection's first frame
/// with `#AES:ack from NAME`.
pub async fn manager(name: &str) -> Manager {
    Manager::start("127.0.0.1:0".parse().unwrap(), name, Reply::AckFirst)
        .await
        .unwrap()
}

/// A new agent connection to `addr`.
pub async fn connect(addr: SocketAddr) -> AgentConn {
    Framed::new(
        TcpStream::connect(addr).await.unwrap(),
        FrameCodec::default(),
    )
}

/// A new agent connection to `addr` from the loopback address `source`.
pub async fn connect_from(source: Ipv4Addr, addr: SocketAddr) -> AgentConn {
    Framed::new(tcp_from(source, addr).await, FrameCodec::default())
}

/// A TCP connection to `addr` from the loopback address `source`.
pub async fn tcp_from(source: Ipv4Addr, addr: SocketAddr) -> TcpStream {
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind(SocketAddr::from((source, 0))).unwrap();
    socket.connect(addr).await.unwrap()
}

/// Sends one frame.
pub async fn send(conn: &mut AgentConn, payload: Vec<u8>) {
    conn.send(Bytes::from(payload)).await.unwrap();
}

/// The next frame, or `None` on a clean close; panics after 10 s.
pub async fn recv(conn: &mut AgentConn) -> Option<Bytes> {
    match tokio::time::timeout(Duration::from_secs(10), conn.next()).await {
        Ok(Some(Ok(f))) => Some(f),
        Ok(Some(Err(_))) | Ok(None) => None,
        Err(_) => panic!("no frame within 10 s"),
    }
}

/// Agent `id` (a textual ID, which may be invalid: then the frame carries none) connected to
/// `addr`, its startup sent and answered; returns the connection and the answer.
pub async fn agent_answered(addr: SocketAddr, id: &str) -> (AgentConn, Bytes) {
    let mut conn = connect(addr).await;
    send(
        &mut conn,
        agent_payload(AgentId::parse(id.as_bytes()), 0, 64),
    )
    .await;
    let answer = recv(&mut conn)
        .await
        .unwrap_or_else(|| panic!("agent {id}: closed before the manager answered"));
    (conn, answer)
}

/// Agent `id` connected to `addr` whose startup a stand-in [`manager`] acknowledged.
pub async fn agent(addr: SocketAddr, id: &str) -> AgentConn {
    let (conn, ack) = agent_answered(addr, id).await;
    assert!(ack.starts_with(b"#AES:ack from "), "agent {id}: {ack:?}");
    conn
}

/// Whether the peer closes the connection within 5 s; frames before the close are skipped.
pub async fn closed(conn: &mut AgentConn) -> bool {
    loop {
        match tokio::time::timeout(Duration::from_secs(5), conn.next()).await {
            Ok(Some(Ok(_))) => continue,
            Ok(_) => return true,
            Err(_) => return false,
        }
    }
}

/// Whether the peer closed the connection within `secs` seconds (reads and discards data).
pub async fn closed_within(stream: &mut TcpStream, secs: u64) -> bool {
    use tokio::io::AsyncReadExt;
    let mut buf = [0u8; 1024];
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    loop {
        match tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(_)) => continue,
            Err(_) => return false,
        }
    }
}

/// Every connection is still open: nothing but frames to read for 5 ms each, no close.
pub async fn still_open(conns: &mut [AgentConn]) {
    for (i, c) in conns.iter_mut().enumerate() {
        loop {
            match tokio::time::timeout(Duration::from_millis(5), c.next()).await {
                Err(_) => break,
                Ok(Some(Ok(_))) => continue,
                Ok(other) => panic!("connection {i} was closed: {other:?}"),
            }
        }
    }
}

/// Payload of frame `seq` of agent `id` (seq 0 is the one that opens the connection).
pub type PayloadFn = Arc<dyn Fn(AgentId, u64) -> Vec<u8> + Send + Sync>;

/// What one bystander sent: its ID, its payloads in order, and its still open connection.
type Streamed = (String, Vec<Vec<u8>>, AgentConn);

/// Well-behaved agents streaming frames while a test attacks the proxy: each connects, sends
/// its first frame, waits for the manager's answer, then sends a frame every `every` until
/// [`Bystanders::finish`], which checks that every frame reached a manager, in order.
pub struct Bystanders {
    stop: CancellationToken,
    tasks: Vec<tokio::task::JoinHandle<Streamed>>,
}

impl Bystanders {
    /// Starts `count` agents with IDs `first_id..first_id + count`, each connecting from its
    /// own loopback address (127.0.1.x) so that per-source limits see one agent per address.
    pub async fn start(
        addr: SocketAddr,
        first_id: usize,
        count: usize,
        every: Duration,
        payload: PayloadFn,
    ) -> Bystanders {
        let stop = CancellationToken::new();
        let mut tasks = Vec::new();
        let (ready_tx, mut ready_rx) = tokio::sync::mpsc::channel::<()>(count.max(1));
        for n in first_id..first_id + count {
            let (stop, payload, ready) = (stop.clone(), payload.clone(), ready_tx.clone());
            tasks.push(tokio::spawn(async move {
                let id = AgentId::parse(format!("{n:03}").as_bytes()).unwrap();
                let local = Ipv4Addr::new(127, 0, 1 + (n / 250) as u8, (n % 250) as u8 + 1);
                let mut conn = connect_from(local, addr).await;
                let mut sent = vec![payload(id, 0)];
                send(&mut conn, sent[0].clone()).await;
                recv(&mut conn).await.expect("a bystander's first answer");
                let _ = ready.send(()).await;
                let mut seq = 1;
                while !stop.is_cancelled() {
                    let p = payload(id, seq);
                    send(&mut conn, p.clone()).await;
                    sent.push(p);
                    seq += 1;
                    tokio::select! {
                        _ = stop.cancelled() => {}
                        _ = tokio::time::sleep(every) => {}
                    }
                }
                (id.to_string(), sent, conn)
            }));
        }
        drop(ready_tx);
        for _ in 0..count {
            tokio::time::timeout(Duration::from_secs(30), ready_rx.recv())
                .await
                .expect("bystanders connected within 30 s");
        }
        Bystanders { stop, tasks }
    }

    /// Stops sending and asserts that every frame of every bystander reached `managers`, in
    /// order, each agent's frames on one manager; returns the number of frames checked.
    pub async fn finish(self, managers: &[&Manager]) -> usize {
        self.stop.cancel();
        let mut all = Vec::new();
        for t in self.tasks {
            all.push(t.await.expect("a bystander task"));
        }
        let expected: usize = all.iter().map(|(_, sent, _)| sent.len()).sum();
        let got = || {
            all.iter()
                .map(|(id, _, _)| {
                    managers
                        .iter()
                        .map(|m| m.frames_from(id).len())
                        .sum::<usize>()
                })
                .sum::<usize>()
        };
        wait_for("every bystander frame at a manager", 30, || {
            got() >= expected
        })
        .await;
        for (id, sent, _) in &all {
            let per: Vec<_> = managers
                .iter()
                .map(|m| m.frames_from(id))
                .filter(|f| !f.is_empty())
                .collect();
            assert_eq!(
                per.len(),
                1,
                "bystander {id} reached {} managers",
                per.len()
            );
            let got: Vec<&[u8]> = per[0].iter().map(|b| &b[..]).collect();
            let want: Vec<&[u8]> = sent.iter().map(|p| &p[..]).collect();
            assert!(
                got == want,
                "bystander {id}: {} frames sent, {} arrived, or out of order",
                want.len(),
                got.len()
            );
        }
        expected
    }
}
