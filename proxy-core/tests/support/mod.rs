//! Shared helpers for the integration tests: a relay on loopback, agents, log capture.
#![allow(dead_code)]

use std::io::Write;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::codec::Framed;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use wazuh_proxy_core::balance::{BackendConfig, Balancer, Policy};
use wazuh_proxy_core::frame::FrameCodec;
use wazuh_proxy_core::relay::{AgentRelay, AgentRelayConfig};

/// Where the shared vectors live, or `None` (with a loud message) when they are absent.
pub fn vectors_dir() -> Option<std::path::PathBuf> {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/vectors");
    if dir.is_dir() {
        Some(dir)
    } else {
        eprintln!(
            "!!!! SKIPPED: test vectors not found at {} !!!!",
            dir.display()
        );
        None
    }
}

static LOGS: OnceLock<Arc<Mutex<Vec<u8>>>> = OnceLock::new();

#[derive(Clone)]
struct Capture(Arc<Mutex<Vec<u8>>>);

impl Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Installs (once per test binary) a subscriber that keeps every log line for [`logs`].
pub fn capture_logs() {
    LOGS.get_or_init(|| {
        let buf = Arc::new(Mutex::new(Vec::new()));
        let writer = Capture(buf.clone());
        let _ = tracing_subscriber::fmt()
            .with_env_filter("info")
            .with_ansi(false)
            .with_writer(move || writer.clone())
            .try_init();
        buf
    });
}

/// Every log line captured so far.
pub fn logs() -> String {
    LOGS.get()
        .map(|b| String::from_utf8_lossy(&b.lock().unwrap()).into_owned())
        .unwrap_or_default()
}

/// Waits until `cond` holds (checking every 10 ms), or panics after `secs` seconds.
pub async fn wait_for(what: &str, secs: u64, mut cond: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    while !cond() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A relay listening on loopback.
pub struct TestRelay {
    pub relay: Arc<AgentRelay>,
    pub addr: SocketAddr,
    pub stop: CancellationToken,
    pub tracker: TaskTracker,
}

impl TestRelay {
    pub async fn start(
        backends: &[SocketAddr],
        policy: Policy,
        config: AgentRelayConfig,
    ) -> TestRelay {
        let backends = backends.iter().map(|a| BackendConfig::new(*a)).collect();
        let balancer = Balancer::new(policy, backends).unwrap();
        TestRelay::serve(AgentRelay::new("test", config, balancer)).await
    }

    /// Serves an already built relay (for example one with keys).
    pub async fn serve(relay: AgentRelay) -> TestRelay {
        let relay = Arc::new(relay);
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let stop = CancellationToken::new();
        let tracker = TaskTracker::new();
        tokio::spawn(relay.clone().serve(listener, stop.clone(), tracker.clone()));
        TestRelay {
            relay,
            addr,
            stop,
            tracker,
        }
    }
}

/// An agent connection speaking frames.
pub type AgentConn = Framed<TcpStream, FrameCodec>;

pub async fn connect(addr: SocketAddr) -> AgentConn {
    Framed::new(
        TcpStream::connect(addr).await.unwrap(),
        FrameCodec::default(),
    )
}

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
