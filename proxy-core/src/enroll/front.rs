//! The enrollment front in terminate mode: TLS towards the agents, one request per connection,
//! its own TLS connection to a backend, the reply relayed back.

use std::fmt;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_rustls::server::TlsStream;
use tokio_rustls::{TlsAcceptor, TlsConnector};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use zeroize::Zeroizing;

use super::cache::{follow, Flights, Join, ReplayCache, RequestKey, Secret, Upstream};
use super::reply::{error_reply, reply_progress, EnrollReply, ReplyProgress};
use super::request::{EnrollRequest, RequestError, MAX_REQUEST};
use super::tls::{backend_name, client_config, server_config, BackendTls, ServerCert, TlsError};
use crate::balance::{BalanceKey, Balancer};

/// Settings of the enrollment front. [`EnrollConfig::new`] fills in the documented defaults.
#[derive(Debug, Clone)]
pub struct EnrollConfig {
    /// The certificate agents see.
    pub server_cert: ServerCert,
    /// How backend certificates are checked.
    pub backend_tls: BackendTls,
    /// Time allowed for an agent's TLS handshake and request line together (default 10 s;
    /// agents send the request right after the handshake).
    pub request_timeout: Duration,
    /// Time allowed for the TCP connection to one backend (default 5 s).
    pub connect_timeout: Duration,
    /// Time allowed for a backend's TLS handshake, the request and the whole reply (default
    /// 30 s; agents give up after 60 s).
    pub backend_timeout: Duration,
    /// Largest reply accepted from a backend (default 64 KiB; real replies are under 2 KiB).
    pub max_reply: usize,
    /// How long to wait, after sending a key and closing the write side, for the agent to
    /// close its side (default 5 s). No close in time means delivery is unconfirmed.
    pub confirm_timeout: Duration,
    /// How long an unconfirmed key reply is kept for a retry (default 10 min).
    pub replay_ttl: Duration,
    /// How long a manager may stay quiet before a refusal it has not closed after is taken as
    /// whole (default 1 s). A key reply is whole at its closing quote and never waits; a
    /// manager that closes ends a refusal at once. 4.0-4.12 managers write a refusal in two
    /// parts back to back, which this joins.
    pub reply_quiet: Duration,
    /// How many unconfirmed replies are kept at most (default 1024; 0 disables replay).
    pub replay_capacity: usize,
    /// Agent connections handled at once; more are closed at accept (default 1000, authd's
    /// own pool size).
    pub max_connections: usize,
}

impl EnrollConfig {
    /// A configuration with the given certificates and the defaults above.
    pub fn new(server_cert: ServerCert, backend_tls: BackendTls) -> Self {
        EnrollConfig {
            server_cert,
            backend_tls,
            request_timeout: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(5),
            backend_timeout: Duration::from_secs(30),
            max_reply: 64 * 1024,
            confirm_timeout: Duration::from_secs(5),
            replay_ttl: Duration::from_secs(600),
            replay_capacity: 1024,
            reply_quiet: Duration::from_secs(1),
            max_connections: 1000,
        }
    }
}

/// Why the front could not be built.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EnrollError {
    /// Certificates, keys or the TLS configuration.
    #[error("enrollment TLS: {0}")]
    Tls(#[from] TlsError),
    /// A setting out of range.
    #[error("enrollment setting {0} must be greater than zero")]
    Zero(&'static str),
}

/// How one enrollment ended. Each variant is one metric label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Outcome {
    /// A backend issued a key for this connection's own request.
    Key,
    /// A backend refused this connection's own request; its text was relayed unchanged.
    Error,
    /// Answered with a kept key whose first delivery was unconfirmed.
    Replayed,
    /// Answered with the reply to an identical request already in flight.
    Coalesced,
    /// The request was malformed: answered by the proxy, never forwarded.
    Malformed,
    /// No backend answered: unreachable, TLS failure, timeout, or closed without a reply.
    BackendUnreachable,
    /// The agent did not complete the TLS handshake or a request line in time.
    Incomplete,
}

impl Outcome {
    /// Every outcome, in label order.
    pub const ALL: [Outcome; 7] = [
        Outcome::Key,
        Outcome::Error,
        Outcome::Replayed,
        Outcome::Coalesced,
        Outcome::Malformed,
        Outcome::BackendUnreachable,
        Outcome::Incomplete,
    ];

    /// The metric label.
    pub fn label(self) -> &'static str {
        match self {
            Outcome::Key => "key",
            Outcome::Error => "error",
            Outcome::Replayed => "replayed",
            Outcome::Coalesced => "coalesced",
            Outcome::Malformed => "malformed",
            Outcome::BackendUnreachable => "backend_unreachable",
            Outcome::Incomplete => "incomplete",
        }
    }

    fn index(self) -> usize {
        Outcome::ALL.iter().position(|o| *o == self).unwrap_or(0)
    }
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.label())
    }
}

/// Counters of the enrollment front.
#[derive(Debug, Default)]
pub struct EnrollStats {
    /// Agent connections accepted.
    pub accepted: AtomicU64,
    /// Agent connections closed at accept because `max_connections` were busy.
    pub refused: AtomicU64,
    /// Requests sent to a backend.
    pub upstream_requests: AtomicU64,
    /// Key replies kept for a retry because their delivery was unconfirmed.
    pub kept_for_replay: AtomicU64,
    outcomes: [AtomicU64; Outcome::ALL.len()],
}

impl EnrollStats {
    /// How many enrollments ended with `outcome`.
    pub fn count(&self, outcome: Outcome) -> u64 {
        self.outcomes[outcome.index()].load(Ordering::Relaxed)
    }

    fn record(&self, outcome: Outcome) {
        self.outcomes[outcome.index()].fetch_add(1, Ordering::Relaxed);
    }
}

/// The enrollment front (terminate mode). Share it as `Arc<EnrollFront>`.
pub struct EnrollFront {
    config: EnrollConfig,
    balancer: crate::balance::SharedBalancer,
    acceptor: TlsAcceptor,
    connector: TlsConnector,
    fingerprint: String,
    stats: Arc<EnrollStats>,
    flights: Flights,
    replay: ReplayCache,
    permits: Arc<Semaphore>,
}

impl fmt::Debug for EnrollFront {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EnrollFront")
            .field("config", &self.config)
            .field("fingerprint", &self.fingerprint)
            .finish_non_exhaustive()
    }
}

impl EnrollFront {
    /// Loads (or generates) the certificate, builds both TLS configurations, and logs the
    /// certificate's fingerprint and, with [`BackendTls::NoVerify`], a warning.
    ///
    /// # Errors
    /// [`EnrollError`]: unreadable or invalid certificate files, a self-signed pair half
    /// present, or a zero timeout or connection limit.
    pub fn new(config: EnrollConfig, balancer: Balancer) -> Result<EnrollFront, EnrollError> {
        for (value, name) in [
            (config.request_timeout, "request_timeout"),
            (config.connect_timeout, "connect_timeout"),
            (config.backend_timeout, "backend_timeout"),
            (config.reply_quiet, "reply_quiet"),
        ] {
            if value.is_zero() {
                return Err(EnrollError::Zero(name));
            }
        }
        if config.max_connections == 0 {
            return Err(EnrollError::Zero("max_connections"));
        }
        if config.max_reply == 0 {
            return Err(EnrollError::Zero("max_reply"));
        }
        let (server, fingerprint) = server_config(&config.server_cert)?;
        let client = client_config(&config.backend_tls)?;
        tracing::info!(sha256 = %fingerprint, "enrollment certificate");
        if config.backend_tls == BackendTls::NoVerify {
            tracing::warn!(
                "enrollment backends' certificates are not verified (verify = false): \
                 whoever can redirect the proxy's connections to the managers sees \
                 enrollment passwords and issued keys"
            );
        }
        Ok(EnrollFront {
            replay: ReplayCache::new(config.replay_ttl, config.replay_capacity),
            permits: Arc::new(Semaphore::new(config.max_connections)),
            config,
            balancer: crate::balance::SharedBalancer::new(balancer),
            acceptor: TlsAcceptor::from(server),
            connector: TlsConnector::from(client),
            fingerprint,
            stats: Arc::new(EnrollStats::default()),
            flights: Flights::default(),
        })
    }

    /// The SHA-256 fingerprint of the certificate agents see (`AB:CD:...`).
    pub fn fingerprint(&self) -> &str {
        &self.fingerprint
    }

    /// The counters.
    pub fn stats(&self) -> &Arc<EnrollStats> {
        &self.stats
    }

    /// The settings in force.
    pub fn config(&self) -> &EnrollConfig {
        &self.config
    }

    /// The backend set in force.
    pub fn balancer(&self) -> Arc<Balancer> {
        self.balancer.load_full()
    }

    /// Replaces the backend set; passive-health state of backends in both sets carries over.
    pub fn set_balancer(&self, balancer: Balancer) {
        self.balancer.replace(balancer);
    }

    /// Key replies kept for a retry right now.
    pub fn kept_replies(&self) -> usize {
        self.replay.len()
    }

    /// Requests in flight upstream right now.
    pub fn in_flight(&self) -> usize {
        self.flights.len()
    }

    /// Accepts agents until `stop` is cancelled; each connection runs as a task of `tracker`.
    /// Connections in progress finish on their own (every step has a timeout).
    pub async fn serve(
        self: Arc<Self>,
        listener: TcpListener,
        stop: CancellationToken,
        tracker: TaskTracker,
    ) {
        crate::net::accept_loop(&listener, "enrollment", &stop, |stream, peer| {
            let Ok(permit) = self.permits.clone().try_acquire_owned() else {
                self.stats.refused.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(client = %peer, "enrollment: too many connections; closing");
                return;
            };
            let front = self.clone();
            tracker.spawn(async move {
                front.handle(stream, peer).await;
                drop(permit);
            });
        })
        .await;
    }

    /// Runs one agent connection to its end.
    pub async fn handle(self: Arc<Self>, stream: TcpStream, peer: SocketAddr) {
        self.stats.accepted.fetch_add(1, Ordering::Relaxed);
        let _ = stream.set_nodelay(true);
        let source = peer.ip().to_canonical();
        let deadline = tokio::time::Instant::now() + self.config.request_timeout;

        // 1. TLS and the request line, within one deadline.
        let agent = match tokio::time::timeout_at(deadline, self.acceptor.accept(stream)).await {
            Ok(Ok(tls)) => tls,
            Ok(Err(e)) => return self.incomplete(peer, &format!("TLS handshake failed: {e}")),
            Err(_) => return self.incomplete(peer, "no TLS handshake in time"),
        };
        let mut agent = agent;
        let line = match tokio::time::timeout_at(deadline, read_line(&mut agent)).await {
            Ok(Ok(Line::Complete(line))) => Ok(line),
            Ok(Ok(Line::TooLong)) => Err(RequestError::TooLong),
            Ok(Ok(Line::Closed)) => return self.incomplete(peer, "closed before a whole request"),
            Ok(Err(e)) => return self.incomplete(peer, &format!("read failed: {e}")),
            Err(_) => return self.incomplete(peer, "no whole request in time"),
        };
        let request = match line.and_then(|l| EnrollRequest::parse(&l)) {
            Ok(r) => r,
            Err(e) => {
                self.stats.record(Outcome::Malformed);
                tracing::warn!(client = %peer, outcome = %Outcome::Malformed, error = %e,
                    "enrollment refused: malformed request (not forwarded)");
                let reply = error_reply(&e.manager_text());
                let _ = self.deliver(&mut agent, &reply, &[]).await;
                return;
            }
        };
        let key = RequestKey::new(source, Secret::new(request.to_line().to_vec()));

        // 2. A kept reply for this very request from this address.
        if let Some(kept) = self.replay.get(&key, Instant::now()) {
            let delivered = self.deliver(&mut agent, kept.as_bytes(), &[]).await;
            if delivered {
                self.replay.remove(&key);
            }
            self.stats.record(Outcome::Replayed);
            tracing::info!(name = request.name(), client = %peer, outcome = %Outcome::Replayed,
                delivered, "enrollment answered with the kept reply of an earlier attempt");
            return;
        }

        // 3. One upstream exchange per identical request in flight. The exchange is not
        // cancelled when this agent goes away: its reply is what a retry will need.
        let (result, coalesced, agent_gone) = match self.flights.join(&key) {
            Join::Lead(lead) => {
                let (result, gone) = watch_agent(&mut agent, self.upstream(&key, source)).await;
                let result = Arc::new(result);
                lead.finish(result.clone());
                (Some(result), false, gone)
            }
            Join::Follow(rx) => {
                let (result, gone) = watch_agent(&mut agent, follow(rx)).await;
                (result, true, gone)
            }
        };

        // 4. Relay.
        let Some(result) = result else {
            self.stats.record(Outcome::BackendUnreachable);
            tracing::warn!(name = request.name(), client = %peer, outcome = %Outcome::BackendUnreachable,
                "enrollment failed: the identical request in flight was abandoned");
            return;
        };
        match &*result {
            Upstream::Failed { reason, backend } => {
                self.stats.record(Outcome::BackendUnreachable);
                let backend = backend
                    .map(|b| b.to_string())
                    .unwrap_or_else(|| "-".to_owned());
                tracing::warn!(name = request.name(), client = %peer, backend, coalesced,
                    outcome = %Outcome::BackendUnreachable, reason, "enrollment failed: no reply from a backend");
                // The agent sees what a dead manager gives it: a close without a reply.
            }
            Upstream::Reply {
                bytes,
                writes,
                reply,
                backend,
            } => {
                let delivered =
                    !agent_gone && self.deliver(&mut agent, bytes.as_bytes(), writes).await;
                let outcome = match (coalesced, reply) {
                    (true, _) => Outcome::Coalesced,
                    (false, EnrollReply::Key(_)) => Outcome::Key,
                    (false, EnrollReply::Error(_)) => Outcome::Error,
                };
                self.stats.record(outcome);
                match reply {
                    EnrollReply::Key(issued) => {
                        let kept =
                            !delivered && self.replay.put(key, bytes.clone(), Instant::now());
                        if kept {
                            self.stats.kept_for_replay.fetch_add(1, Ordering::Relaxed);
                        }
                        tracing::info!(name = request.name(), client = %peer, backend = %backend,
                            outcome = %outcome, agent_id = issued.id(), delivered, kept_for_replay = kept,
                            "enrollment: key issued");
                    }
                    EnrollReply::Error(text) => {
                        tracing::info!(name = request.name(), client = %peer, backend = %backend,
                            outcome = %outcome, delivered, reply = %text, "enrollment refused by the manager");
                    }
                }
            }
        }
    }

    fn incomplete(&self, peer: SocketAddr, why: &str) {
        self.stats.record(Outcome::Incomplete);
        tracing::debug!(client = %peer, outcome = %Outcome::Incomplete, "enrollment connection dropped: {why}");
    }

    /// One exchange with a backend: connect, TLS, the request line, the reply until close.
    async fn upstream(&self, key: &RequestKey, source: IpAddr) -> Upstream {
        let balancer = self.balancer.load_full();
        let connected = match balancer
            .connect(&BalanceKey::Source(source), self.config.connect_timeout)
            .await
        {
            Ok(c) => c,
            Err(e) => {
                return Upstream::Failed {
                    reason: e.to_string(),
                    backend: None,
                }
            }
        };
        let backend = connected.addr;
        let fail = |reason: String| Upstream::Failed {
            reason,
            backend: Some(backend),
        };
        let name = match backend_name(&self.config.backend_tls, backend) {
            Ok(n) => n,
            Err(e) => return fail(e.to_string()),
        };
        self.stats.upstream_requests.fetch_add(1, Ordering::Relaxed);
        let exchange = async {
            let mut tls = match self.connector.connect(name, connected.stream).await {
                Ok(t) => t,
                Err(e) => {
                    // A backend that cannot do TLS with us is as good as down.
                    balancer.report_failure(connected.index, Instant::now());
                    return Err(format!("TLS handshake failed: {e}"));
                }
            };
            tls.write_all(key.line())
                .await
                .map_err(|e| format!("sending the request failed: {e}"))?;
            tls.flush()
                .await
                .map_err(|e| format!("sending the request failed: {e}"))?;
            let received = read_reply(&mut tls, self.config.max_reply, self.config.reply_quiet).await?;
            // Close our side properly (close_notify, FIN) without making the agent wait for
            // it: a manager that keeps the connection open (the QA simulators) does not need
            // to answer.
            tokio::spawn(async move {
                let _ = tokio::time::timeout(CLOSE_TIMEOUT, tls.shutdown()).await;
            });
            Ok(received)
        };
        let result = tokio::time::timeout(self.config.backend_timeout, exchange).await;
        drop(connected.guard);
        match result {
            Ok(Ok(got)) if got.bytes.is_empty() => fail("closed without a reply".to_owned()),
            Ok(Ok(got)) => Upstream::Reply {
                reply: EnrollReply::parse(&got.bytes),
                bytes: Arc::new(Secret::new(got.bytes.to_vec())),
                writes: got.writes,
                backend,
            },
            Ok(Err(reason)) => fail(reason),
            Err(_) => fail(format!(
                "no whole reply within {:?}",
                self.config.backend_timeout
            )),
        }
    }

    /// Writes a reply, closes the write side (TLS close_notify, then FIN) and waits for the
    /// agent to close its side. True when the agent closed cleanly (close_notify or a plain
    /// EOF) after the reply, i.e. it read it; false on any error, reset or timeout.
    async fn deliver(
        &self,
        agent: &mut TlsStream<TcpStream>,
        reply: &[u8],
        writes: &[usize],
    ) -> bool {
        let written = async {
            // One TLS record per backend write, as the agent would have read them directly.
            let mut at = 0;
            for &end in writes.iter().chain([&reply.len()]) {
                if end > at && end <= reply.len() {
                    agent.write_all(&reply[at..end]).await?;
                    at = end;
                }
            }
            agent.flush().await?;
            agent.shutdown().await
        };
        if tokio::time::timeout(self.config.confirm_timeout, written)
            .await
            .map_or(true, |r| r.is_err())
        {
            return false;
        }
        let mut scratch = [0u8; 512];
        let closed = async {
            loop {
                match agent.read(&mut scratch).await {
                    Ok(0) => return true,
                    Ok(_) => continue,
                    // A TCP close without close_notify: what real agents do once they have
                    // the key.
                    Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return true,
                    Err(_) => return false,
                }
            }
        };
        tokio::time::timeout(self.config.confirm_timeout, closed)
            .await
            .unwrap_or(false)
    }
}

/// Time allowed for closing a connection properly (close_notify) before it is dropped.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);

/// The request line as read.
enum Line {
    /// Everything up to the first LF (LF excluded).
    Complete(Zeroizing<Vec<u8>>),
    /// No LF within [`MAX_REQUEST`] bytes.
    TooLong,
    /// The agent closed first.
    Closed,
}

/// Reads up to the first LF, at most [`MAX_REQUEST`] bytes. Bytes after the LF are ignored
/// (authd ignores them too).
async fn read_line<S: AsyncRead + Unpin>(agent: &mut S) -> io::Result<Line> {
    let mut buf = Zeroizing::new(Vec::with_capacity(4096));
    let mut chunk = Zeroizing::new([0u8; 4096]);
    loop {
        let n = match agent.read(&mut chunk[..]).await {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => 0,
            Err(e) => return Err(e),
        };
        if n == 0 {
            return Ok(Line::Closed);
        }
        let start = buf.len();
        buf.extend_from_slice(&chunk[..n]);
        if let Some(lf) = buf[start..].iter().position(|&b| b == b'\n') {
            buf.truncate(start + lf);
            return Ok(if buf.len() < MAX_REQUEST {
                Line::Complete(buf)
            } else {
                Line::TooLong
            });
        }
        if buf.len() >= MAX_REQUEST {
            return Ok(Line::TooLong);
        }
    }
}

/// A backend's reply as received: the bytes, and where each of the backend's reads ended
/// (a 4.0-4.12 refusal comes in two writes; they are relayed as two).
pub(crate) struct Received {
    pub(crate) bytes: Zeroizing<Vec<u8>>,
    pub(crate) writes: Vec<usize>,
}

/// Reads a backend's reply until it is complete: a key at its closing quote (the manager's
/// close is not awaited: the QA simulators keep the connection open), anything else at the
/// manager's close or after `quiet` without a byte. A close without close_notify ends the
/// reply too (authd does not always send one).
async fn read_reply<S: AsyncRead + Unpin>(
    backend: &mut S,
    max: usize,
    quiet: Duration,
) -> Result<Received, String> {
    let mut got = Received {
        bytes: Zeroizing::new(Vec::with_capacity(4096)),
        writes: Vec::new(),
    };
    let mut chunk = Zeroizing::new([0u8; 4096]);
    loop {
        let progress = reply_progress(&got.bytes);
        if let ReplyProgress::Key(end) = progress {
            got.bytes.truncate(end);
            got.writes.retain(|&w| w < end);
            got.writes.push(end);
            return Ok(got);
        }
        let read = if progress == ReplyProgress::Other {
            match tokio::time::timeout(quiet, backend.read(&mut chunk[..])).await {
                Ok(r) => r,
                // Quiet: the refusal is whole.
                Err(_) => return Ok(got),
            }
        } else {
            backend.read(&mut chunk[..]).await
        };
        match read {
            Ok(0) => return Ok(got),
            Ok(n) => {
                if got.bytes.len() + n > max {
                    return Err(format!("reply longer than {max} bytes"));
                }
                got.bytes.extend_from_slice(&chunk[..n]);
                got.writes.push(got.bytes.len());
            }
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(got),
            // A reset after some bytes still leaves a whole reply (authd writes it in one go).
            Err(_) if !got.bytes.is_empty() => return Ok(got),
            Err(e) => return Err(format!("reading the reply failed: {e}")),
        }
    }
}

/// Runs `work` while watching the agent's side: any close, reset or error there means a
/// reply written later cannot reach it. Returns the work's result and whether the agent went.
async fn watch_agent<T>(
    agent: &mut TlsStream<TcpStream>,
    work: impl std::future::Future<Output = T>,
) -> (T, bool) {
    tokio::pin!(work);
    let mut gone = false;
    let mut scratch = [0u8; 512];
    loop {
        tokio::select! {
            result = &mut work => return (result, gone),
            read = agent.read(&mut scratch), if !gone => {
                // Bytes after the request line are ignored, as authd does.
                if !matches!(read, Ok(n) if n > 0) {
                    gone = true;
                }
            }
        }
    }
}
