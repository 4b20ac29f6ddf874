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

/// Payload of frame `seq` of agent `id` (seq 0 is the one that opens the connection).
pub type PayloadFn = Arc<dyn Fn(wazuh_proxy_core::envelope::AgentId, u64) -> Vec<u8> + Send + Sync>;

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
                let id = wazuh_proxy_core::envelope::AgentId::parse(format!("{n:03}").as_bytes())
                    .unwrap();
                let socket = tokio::net::TcpSocket::new_v4().unwrap();
                let local =
                    std::net::Ipv4Addr::new(127, 0, 1 + (n / 250) as u8, (n % 250) as u8 + 1);
                socket.bind(SocketAddr::from((local, 0))).unwrap();
                let mut conn =
                    Framed::new(socket.connect(addr).await.unwrap(), FrameCodec::default());
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
    pub async fn finish(self, managers: &[&wazuh_proxy_core::sim::Manager]) -> usize {
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

/// Resident memory of this process in bytes (VmRSS in /proc/self/status).
pub fn rss_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .expect("VmRSS in /proc/self/status");
    let kb: u64 = line
        .split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .expect("a number of kB");
    kb * 1024
}

/// The soft limit on open files of this process (from /proc/self/limits).
pub fn open_files_limit() -> Option<u64> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    let soft = line.split_whitespace().nth(3)?;
    if soft == "unlimited" {
        return Some(u64::MAX);
    }
    soft.parse().ok()
}

/// How many captured log lines contain `needle`.
pub fn log_lines_with(needle: &str) -> usize {
    logs().lines().filter(|l| l.contains(needle)).count()
}

/// A TLS client for the enrollment port that accepts any certificate, as agents do by default.
pub fn enroll_connector() -> tokio_rustls::TlsConnector {
    use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
    use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
    use rustls::{DigitallySignedStruct, SignatureScheme};

    fn provider() -> Arc<rustls::crypto::CryptoProvider> {
        wazuh_proxy_core::enroll::tls::provider()
    }

    #[derive(Debug)]
    struct AnyCert;

    impl ServerCertVerifier for AnyCert {
        fn verify_server_cert(
            &self,
            _: &CertificateDer<'_>,
            _: &[CertificateDer<'_>],
            _: &ServerName<'_>,
            _: &[u8],
            _: UnixTime,
        ) -> Result<ServerCertVerified, rustls::Error> {
            Ok(ServerCertVerified::assertion())
        }
        fn verify_tls12_signature(
            &self,
            m: &[u8],
            c: &CertificateDer<'_>,
            d: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls12_signature(
                m,
                c,
                d,
                &provider().signature_verification_algorithms,
            )
        }
        fn verify_tls13_signature(
            &self,
            m: &[u8],
            c: &CertificateDer<'_>,
            d: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls13_signature(
                m,
                c,
                d,
                &provider().signature_verification_algorithms,
            )
        }
        fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
            provider()
                .signature_verification_algorithms
                .supported_schemes()
        }
    }

    let config = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyCert))
        .with_no_client_auth();
    tokio_rustls::TlsConnector::from(Arc::new(config))
}

/// Sends `request` over TLS to an enrollment front and returns the reply (read to the close)
/// and the client's local address. Write errors are ignored: the front may stop reading.
pub async fn enroll_raw(addr: SocketAddr, request: &[u8]) -> (String, SocketAddr) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let tcp = TcpStream::connect(addr).await.unwrap();
    let local = tcp.local_addr().unwrap();
    let name = rustls::pki_types::ServerName::try_from("wazuh-proxy").unwrap();
    let mut tls = enroll_connector().connect(name, tcp).await.unwrap();
    let _ = tls.write_all(request).await;
    let _ = tls.flush().await;
    let mut reply = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), tls.read_to_end(&mut reply)).await;
    (String::from_utf8_lossy(&reply).into_owned(), local)
}
