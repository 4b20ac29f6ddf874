//! Active health checks: a probe of every backend at an interval, beside the passive checks
//! the relays make on real traffic.
//!
//! The probe matches what the listener carries ([`Probe`]): a TCP connect, or the agent
//! protocol's own health probe, `#ping`, which `wazuh-remoted` answers with `#pong` before any
//! key lookup (framed on TCP, a bare datagram on UDP). A UDP-only manager has nothing on its
//! TCP port, so a UDP listener is never probed with a TCP connect unless asked to.
//!
//! Passive checks only learn that a manager is dead when an agent tries it; a standby proxy
//! node with no traffic would otherwise report itself healthy while it cannot reach any
//! manager. Active checks take a backend out of rotation after `fall` failed probes and put
//! it back after `rise` good ones (HAProxy's terms).

use std::sync::Arc;
use std::time::Duration;

use std::net::SocketAddr;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};
use tokio_util::sync::CancellationToken;

use crate::balance::Balancer;

/// How a backend is probed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Probe {
    /// A TCP connect that completes (the default on TCP listeners).
    #[default]
    Connect,
    /// TCP connect, send the frame `#ping`, expect the frame `#pong` back (agent listeners:
    /// a manager that accepts but does not serve the agent protocol fails it).
    AgentTcp,
    /// Send the datagram `#ping`, expect the datagram `#pong` back (UDP listeners).
    AgentUdp,
}

/// `#ping` as a TCP frame: length 5, little-endian, then the payload.
const PING_FRAME: &[u8] = b"\x05\x00\x00\x00#ping";

/// What one probe found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProbeOutcome {
    /// The backend answered as the probe expects.
    Passed,
    /// The backend refused, did not answer in time, or answered something else.
    Failed,
    /// This host could not open a socket (out of descriptors, local ports or kernel memory):
    /// the backend was not asked, so the probe counts neither way.
    NotRun,
}

impl ProbeOutcome {
    /// Whether the backend passed.
    pub fn passed(self) -> bool {
        self == ProbeOutcome::Passed
    }
}

/// A failed socket call as a probe outcome: this host's shortage is not the backend's failure.
fn local_or_failed(e: &std::io::Error) -> ProbeOutcome {
    if crate::balance::out_of_sockets(e) {
        ProbeOutcome::NotRun
    } else {
        ProbeOutcome::Failed
    }
}

async fn tcp_connect(addr: SocketAddr) -> Result<TcpStream, ProbeOutcome> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()
    } else {
        tokio::net::TcpSocket::new_v6()
    }
    .map_err(|e| local_or_failed(&e))?;
    socket.connect(addr).await.map_err(|e| local_or_failed(&e))
}

/// Probes `addr` once with `probe`, within `timeout`.
pub async fn probe_once(probe: Probe, addr: SocketAddr, timeout: Duration) -> ProbeOutcome {
    use ProbeOutcome::{Failed, Passed};
    let attempt = async {
        match probe {
            Probe::Connect => match tcp_connect(addr).await {
                Ok(_) => Passed,
                Err(outcome) => outcome,
            },
            Probe::AgentTcp => {
                let mut s = match tcp_connect(addr).await {
                    Ok(s) => s,
                    Err(outcome) => return outcome,
                };
                if s.write_all(PING_FRAME).await.is_err() {
                    return Failed;
                }
                let mut reply = [0u8; 9];
                if s.read_exact(&mut reply).await.is_ok() && &reply == b"\x05\x00\x00\x00#pong" {
                    Passed
                } else {
                    Failed
                }
            }
            Probe::AgentUdp => {
                let local: SocketAddr = if addr.is_ipv4() {
                    (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
                } else {
                    (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
                };
                let sock = match UdpSocket::bind(local).await {
                    Ok(sock) => sock,
                    Err(e) => return local_or_failed(&e),
                };
                // Connected: only the manager's datagrams arrive, and an ICMP port unreachable
                // fails the probe at once.
                if sock.connect(addr).await.is_err() || sock.send(b"#ping").await.is_err() {
                    return Failed;
                }
                let mut buf = [0u8; 64];
                loop {
                    match sock.recv(&mut buf).await {
                        Ok(n) if &buf[..n] == b"#pong" => return Passed,
                        // Anything else (a late answer to nothing we sent): keep waiting.
                        Ok(_) => continue,
                        Err(_) => return Failed,
                    }
                }
            }
        }
    };
    tokio::time::timeout(timeout, attempt)
        .await
        .unwrap_or(Failed)
}

/// One line a second about probes this host could not make.
static NOT_RUN_LOG: crate::limits::LogLimit = crate::limits::LogLimit::new();

/// Settings of active health checks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HealthCheck {
    /// What a probe is (default a TCP connect).
    pub probe: Probe,
    /// Time between two rounds of probes (default 2 s).
    pub interval: Duration,
    /// Time allowed to one connect (default 1 s).
    pub timeout: Duration,
    /// Good probes in a row that bring a backend back (default 2).
    pub rise: u32,
    /// Failed probes in a row that take a backend out (default 3).
    pub fall: u32,
}

impl Default for HealthCheck {
    fn default() -> Self {
        HealthCheck {
            probe: Probe::Connect,
            interval: Duration::from_secs(2),
            timeout: Duration::from_secs(1),
            rise: 2,
            fall: 3,
        }
    }
}

/// Probes the backends of `balancer()` (read again every round, so a reload is followed)
/// until `stop` is cancelled. `on_change` is called when a backend goes up (`true`) or down.
pub async fn run(
    balancer: impl Fn() -> Arc<Balancer>,
    check: HealthCheck,
    stop: CancellationToken,
    on_change: impl Fn(std::net::SocketAddr, bool),
) {
    let mut tick = tokio::time::interval(check.interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let b = balancer();
        let probes = b
            .backends()
            .iter()
            .enumerate()
            .filter(|(_, be)| !be.config().down)
            .map(|(i, be)| {
                let addr = be.addr();
                async move { (i, addr, probe_once(check.probe, addr, check.timeout).await) }
            });
        let results = futures_util::future::join_all(probes).await;
        for (i, addr, outcome) in results {
            if outcome == ProbeOutcome::NotRun {
                if let Some(held) = NOT_RUN_LOG.allow_now() {
                    tracing::warn!(backend = %addr, held_back = held,
                        "health probe not run: this host could not open a socket (out of descriptors or local ports); the backend keeps its state");
                }
                continue;
            }
            if let Some(up) = b.probe_result(i, outcome.passed(), check.rise, check.fall) {
                on_change(addr, up);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::balance::{BackendConfig, Policy};

    #[tokio::test]
    async fn a_dead_backend_goes_out_and_comes_back() {
        let live = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let dead_addr = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap()
        };
        let balancer = Arc::new(
            Balancer::new(
                Policy::AgentId,
                vec![
                    BackendConfig::new(live.local_addr().unwrap()),
                    BackendConfig::new(dead_addr),
                ],
            )
            .unwrap(),
        );
        let check = HealthCheck {
            probe: Probe::Connect,
            interval: Duration::from_millis(20),
            timeout: Duration::from_millis(200),
            rise: 2,
            fall: 2,
        };
        let stop = CancellationToken::new();
        let changes = Arc::new(std::sync::Mutex::new(Vec::new()));
        let task = tokio::spawn({
            let (b, stop, changes) = (balancer.clone(), stop.clone(), changes.clone());
            async move {
                run(
                    move || b.clone(),
                    check,
                    stop,
                    move |a, up| changes.lock().unwrap().push((a, up)),
                )
                .await
            }
        });
        let now = std::time::Instant::now;
        let dead = balancer.index_of(dead_addr).unwrap();
        for _ in 0..200 {
            if balancer.backends()[dead].probe_failed() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(balancer.backends()[dead].probe_failed());
        assert!(!balancer.is_available(dead, now()));
        assert!(balancer.any_available(now()));
        // It comes back.
        let _revived = std::net::TcpListener::bind(dead_addr).unwrap();
        for _ in 0..200 {
            if !balancer.backends()[dead].probe_failed() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(balancer.is_available(dead, now()));
        stop.cancel();
        task.await.unwrap();
        assert_eq!(
            *changes.lock().unwrap(),
            vec![(dead_addr, false), (dead_addr, true)]
        );
    }

    /// A stand-in for remoted's answer to `#ping` on 1514/TCP: reads one frame and answers
    /// `#pong` if it was `#ping` (remoted answers before any key lookup, unencrypted).
    async fn pong_server() -> SocketAddr {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                tokio::spawn(async move {
                    let mut frame = [0u8; 9];
                    if s.read_exact(&mut frame).await.is_ok() && frame == PING_FRAME {
                        let _ = s.write_all(b"\x05\x00\x00\x00#pong").await;
                    }
                    let _ = s.read(&mut [0u8; 1]).await;
                });
            }
        });
        addr
    }

    /// Accepts and holds every connection without a byte back.
    async fn mute_server() -> SocketAddr {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((s, _)) = l.accept().await {
                held.push(s);
            }
        });
        addr
    }

    #[tokio::test]
    async fn the_agent_probe_needs_a_pong() {
        let t = Duration::from_millis(300);
        let pong = pong_server().await;
        let mute = mute_server().await;
        assert!(probe_once(Probe::AgentTcp, pong, t).await.passed());
        assert!(!probe_once(Probe::AgentTcp, mute, t).await.passed());
        // A plain connect cannot tell them apart.
        assert!(probe_once(Probe::Connect, mute, t).await.passed());
    }

    #[tokio::test]
    async fn an_agent_probe_marks_a_mute_tcp_backend_down() {
        let (pong, mute) = (pong_server().await, mute_server().await);
        let balancer = Arc::new(
            Balancer::new(
                Policy::AgentId,
                vec![BackendConfig::new(pong), BackendConfig::new(mute)],
            )
            .unwrap(),
        );
        let check = HealthCheck {
            probe: Probe::AgentTcp,
            interval: Duration::from_millis(20),
            timeout: Duration::from_millis(100),
            rise: 1,
            fall: 2,
        };
        let stop = CancellationToken::new();
        let task = tokio::spawn({
            let (b, stop) = (balancer.clone(), stop.clone());
            async move { run(move || b.clone(), check, stop, |_, _| {}).await }
        });
        let mute_i = balancer.index_of(mute).unwrap();
        let pong_i = balancer.index_of(pong).unwrap();
        for _ in 0..300 {
            if balancer.backends()[mute_i].probe_failed() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(balancer.backends()[mute_i].probe_failed());
        assert!(!balancer.backends()[pong_i].probe_failed());
        stop.cancel();
        task.await.unwrap();
    }

    #[tokio::test]
    async fn the_udp_probe_needs_a_pong_datagram() {
        let t = Duration::from_millis(300);
        let manager = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let addr = manager.local_addr().unwrap();
        tokio::spawn(async move {
            let mut buf = [0u8; 64];
            while let Ok((n, from)) = manager.recv_from(&mut buf).await {
                if &buf[..n] == b"#ping" {
                    let _ = manager.send_to(b"#pong", from).await;
                }
            }
        });
        assert!(probe_once(Probe::AgentUdp, addr, t).await.passed());
        // Nothing on the TCP port of a UDP-only manager.
        assert!(!probe_once(Probe::Connect, addr, t).await.passed());
        // A UDP socket that never answers, and a port nobody listens on.
        let silent = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        assert!(
            !probe_once(Probe::AgentUdp, silent.local_addr().unwrap(), t)
                .await
                .passed()
        );
        let closed = UdpSocket::bind("127.0.0.1:0")
            .await
            .unwrap()
            .local_addr()
            .unwrap();
        assert!(!probe_once(Probe::AgentUdp, closed, t).await.passed());
    }
}
