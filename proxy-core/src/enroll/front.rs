//! The enrollment front in terminate mode: TLS towards the agents, one request per connection,
//! its own TLS connection to a backend, the reply relayed back.

use std::fmt;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_rustls::server::TlsStream;
use tokio_rustls::{TlsAcceptor, TlsConnector};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::cache::{ReplayCache, RequestKey, Secret, Upstream};
use super::reply::{error_reply, EnrollReply};
use super::request::{EnrollRequest, RequestError};
use super::tls::{
    backend_name, client_config, server_config, BackendTls, ClientCert, ServerCert, TlsError,
};
use crate::balance::{BalanceKey, Balancer};

use wire::{
    acknowledged, read_line, read_reply, watch_agent, Active, Line, RateLog, CLOSE_TIMEOUT,
};

#[cfg(test)]
mod tests;
mod wire;

/// Settings of the enrollment front. [`EnrollConfig::new`] fills in the documented defaults.
#[derive(Debug, Clone)]
pub struct EnrollConfig {
    /// The certificate agents see.
    pub server_cert: ServerCert,
    /// How backend certificates are checked.
    pub backend_tls: BackendTls,
    /// The certificate presented to backends that ask for one (`<ssl_agent_ca>`); none by
    /// default.
    pub backend_client_cert: Option<ClientCert>,
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
    /// How long to wait, after writing a reply, for the agent's TCP to acknowledge every byte
    /// of it (default 5 s). No acknowledgement in time means not delivered.
    pub confirm_timeout: Duration,
    /// How long an unacknowledged key reply is kept for a retry (default 10 min; 0 disables
    /// replay).
    pub replay_ttl: Duration,
    /// How long a manager may stay quiet before a refusal it has not closed after is taken as
    /// whole (default 1 s). A key reply is whole at its closing quote and never waits; a
    /// manager that closes ends a refusal at once. 4.0-4.12 managers write a refusal in two
    /// parts back to back, which this joins.
    pub reply_quiet: Duration,
    /// How many unacknowledged replies are kept at most (default 1024; 0 disables replay).
    pub replay_capacity: usize,
    /// Agent connections handled at once; more are closed at accept (default 1000, authd's
    /// own pool size).
    pub max_connections: usize,
    /// Per-source admission limits (open connections, new connections per second), checked
    /// before the TLS handshake; defaults as for the agent relay.
    pub source_limits: crate::limits::SourceLimits,
    /// PROXY protocol (v1 or v2) read before the TLS handshake, from trusted senders only;
    /// the address it carries is the client everywhere in the front. None by default.
    pub proxy_protocol: Option<crate::proxy_protocol::ProxyProtocol>,
}

impl EnrollConfig {
    /// A configuration with the given certificates and the defaults above.
    pub fn new(server_cert: ServerCert, backend_tls: BackendTls) -> Self {
        EnrollConfig {
            server_cert,
            backend_tls,
            backend_client_cert: None,
            request_timeout: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(5),
            backend_timeout: Duration::from_secs(30),
            max_reply: 64 * 1024,
            confirm_timeout: Duration::from_secs(5),
            replay_ttl: Duration::from_secs(600),
            replay_capacity: 1024,
            reply_quiet: Duration::from_secs(1),
            max_connections: 1000,
            source_limits: crate::limits::SourceLimits::default(),
            proxy_protocol: None,
        }
    }
}

/// A key reply kept for a retry, in transit to a successor process. The request (password
/// included) and the reply (the key) are zeroized when dropped and never shown by `Debug`.
#[derive(Clone)]
pub struct KeptReply {
    source: IpAddr,
    request: Secret,
    reply: Secret,
    left: Duration,
}

impl KeptReply {
    /// Builds one from its parts (as received from the previous process).
    pub fn new(source: IpAddr, request: Vec<u8>, reply: Vec<u8>, left: Duration) -> Self {
        KeptReply {
            source: source.to_canonical(),
            request: Secret::new(request),
            reply: Secret::new(reply),
            left,
        }
    }

    /// The agent's address.
    pub fn source(&self) -> IpAddr {
        self.source
    }

    /// The request line, as the agent sent it (holds the password: never log it).
    pub fn request(&self) -> &[u8] {
        self.request.as_bytes()
    }

    /// The reply (holds the key: never log it).
    pub fn reply(&self) -> &[u8] {
        self.reply.as_bytes()
    }

    /// How long it may still be kept.
    pub fn left(&self) -> Duration {
        self.left
    }
}

impl fmt::Debug for KeptReply {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeptReply")
            .field("source", &self.source)
            .field("request", &self.request)
            .field("reply", &self.reply)
            .field("left", &self.left)
            .finish()
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
    /// Answered with a kept key the agent had not acknowledged on an earlier connection.
    Replayed,
    /// The request was malformed: answered by the proxy, never forwarded.
    Malformed,
    /// No backend answered: unreachable, TLS failure, timeout, or closed without a reply.
    BackendUnreachable,
    /// The agent did not complete the TLS handshake or a request line in time.
    Incomplete,
}

impl Outcome {
    /// Every outcome, in label order.
    pub const ALL: [Outcome; 6] = [
        Outcome::Key,
        Outcome::Error,
        Outcome::Replayed,
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
    /// Agent connections closed at accept because their source address was over its limits.
    pub refused_source: AtomicU64,
    /// Agent connections closed before the TLS handshake because the PROXY protocol header
    /// was missing or invalid, or came from a sender outside `proxy_protocol_trusted`.
    pub refused_proxy_protocol: AtomicU64,
    /// Requests sent to a backend.
    pub upstream_requests: AtomicU64,
    /// Key replies kept for a retry because the agent did not acknowledge them.
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
    active: Arc<AtomicUsize>,
    replay: ReplayCache,
    permits: Arc<Semaphore>,
    admission: crate::limits::Admission,
    refusal_log: RateLog,
    malformed_log: RateLog,
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
        let client = client_config(&config.backend_tls, config.backend_client_cert.as_ref())?;
        tracing::info!(sha256 = %fingerprint, "enrollment certificate");
        if config.backend_tls == BackendTls::NoVerify {
            tracing::warn!(
                "enrollment backends' certificates are not verified (verify = false): \
                 whoever can redirect the proxy's connections to the managers sees \
                 enrollment passwords and issued keys"
            );
        }
        Ok(EnrollFront {
            // A zero TTL disables replay like a zero capacity.
            replay: ReplayCache::new(
                config.replay_ttl,
                if config.replay_ttl.is_zero() {
                    0
                } else {
                    config.replay_capacity
                },
            ),
            permits: Arc::new(Semaphore::new(config.max_connections)),
            admission: crate::limits::Admission::new(config.source_limits),
            config,
            balancer: crate::balance::SharedBalancer::new(balancer),
            acceptor: TlsAcceptor::from(server),
            connector: TlsConnector::from(client),
            fingerprint,
            stats: Arc::new(EnrollStats::default()),
            active: Arc::default(),
            // As the agent relay: one line a second for refusals at accept.
            refusal_log: RateLog::new(1),
            // Malformed requests are rarer and each says more: ten a second.
            malformed_log: RateLog::new(10),
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

    /// Takes every kept reply out, for a successor process (`wazuh-proxy upgrade`). They
    /// leave this front: a reply is given out by one process at most.
    pub fn take_kept(&self) -> Vec<KeptReply> {
        self.replay
            .drain(Instant::now())
            .into_iter()
            .map(|(key, reply, left)| KeptReply {
                source: key.source(),
                request: Secret::new(key.line().to_vec()),
                reply: Secret::new(reply.as_bytes().to_vec()),
                left,
            })
            .collect()
    }

    /// Keeps a reply handed over by the previous process, for the time it had left (at most
    /// this front's `replay_ttl`). Returns whether it was kept (not with replay disabled).
    pub fn keep(&self, kept: KeptReply) -> bool {
        let KeptReply {
            source,
            request,
            reply,
            left,
        } = kept;
        self.replay.put_for(
            RequestKey::new(source, request),
            Arc::new(reply),
            left,
            Instant::now(),
        )
    }

    /// Agent connections being handled right now.
    pub fn active(&self) -> usize {
        self.active.load(Ordering::Relaxed)
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
                let total = self.stats.refused.fetch_add(1, Ordering::Relaxed) + 1;
                if let Some(suppressed) = self.refusal_log.allow() {
                    tracing::warn!(client = %peer, refused_total = total, suppressed,
                        "enrollment: too many connections ({}); closing", self.config.max_connections);
                }
                return;
            };
            let front = self.clone();
            tracker.spawn(async move {
                match front.config.proxy_protocol.clone() {
                    None => front.handle(stream, peer).await,
                    Some(pp) => front.handle_proxied(&pp, stream, peer).await,
                }
                drop(permit);
            });
        })
        .await;
    }

    /// Reads the PROXY protocol header of an accepted connection (before the TLS handshake),
    /// then runs it as [`EnrollFront::handle`] with the carried address as the client. A
    /// connection from an untrusted sender, or without a valid header in time, is closed,
    /// counted (`refused_proxy_protocol`) and logged (rate-limited).
    pub async fn handle_proxied(
        self: Arc<Self>,
        pp: &crate::proxy_protocol::ProxyProtocol,
        mut stream: TcpStream,
        peer: SocketAddr,
    ) {
        match pp.accept(&mut stream, peer).await {
            Ok(client) => self.handle(stream, client).await,
            Err(e) => {
                self.stats.accepted.fetch_add(1, Ordering::Relaxed);
                let total = self
                    .stats
                    .refused_proxy_protocol
                    .fetch_add(1, Ordering::Relaxed)
                    + 1;
                if let Some(suppressed) = self.refusal_log.allow() {
                    tracing::warn!(client = %peer, refused_total = total, suppressed,
                        "enrollment: closing connection: {e}");
                }
            }
        }
    }

    /// Runs one agent connection to its end; `peer` is the client's address (the one a PROXY
    /// protocol header carried, when the listener reads one).
    pub async fn handle(self: Arc<Self>, stream: TcpStream, peer: SocketAddr) {
        self.stats.accepted.fetch_add(1, Ordering::Relaxed);
        let _admitted = match self
            .admission
            .admit(peer.ip().to_canonical(), Instant::now())
        {
            Ok(a) => a,
            Err(why) => {
                let total = self.stats.refused_source.fetch_add(1, Ordering::Relaxed) + 1;
                if let Some(suppressed) = self.refusal_log.allow() {
                    tracing::warn!(client = %peer, refused_total = total, suppressed,
                        "enrollment: refusing connection: {why}");
                }
                return;
            }
        };
        let _active = Active::enter(&self.active);
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
                if let Some(suppressed) = self.malformed_log.allow() {
                    tracing::warn!(client = %peer, outcome = %Outcome::Malformed, error = %e, suppressed,
                        "enrollment refused: malformed request (not forwarded)");
                }
                let reply = error_reply(&e.manager_text());
                let _ = self.answer(agent, &reply, &[]).await;
                return;
            }
        };
        let key = RequestKey::new(source, Secret::new(request.to_line().to_vec()));

        // 2. A kept reply for this very request from this address, given out once. It is in
        // the cache only once the connection it was issued for has ended without the agent's
        // TCP acknowledging it, so this connection is indistinguishable from that agent's
        // retry. A connection that arrives while the first is still open finds nothing here
        // and goes to the manager on its own.
        if let Some(kept) = self.replay.take(&key, Instant::now()) {
            let delivered = self.answer(agent, kept.as_bytes(), &[]).await;
            self.stats.record(Outcome::Replayed);
            tracing::info!(name = request.name(), client = %peer, outcome = %Outcome::Replayed,
                delivered, "enrollment answered with the kept reply of an earlier attempt (given out once)");
            return;
        }

        // 3. This connection's own upstream exchange, never shared with another connection.
        // The exchange is not cancelled when the agent goes away: a key it brings back is
        // what the agent's retry will need.
        let (result, agent_gone) = watch_agent(&mut agent, self.upstream(&key, source)).await;

        // 4. Relay.
        match result {
            Upstream::Failed { reason, backend } => {
                self.stats.record(Outcome::BackendUnreachable);
                let backend = backend
                    .map(|b| b.to_string())
                    .unwrap_or_else(|| "-".to_owned());
                tracing::warn!(name = request.name(), client = %peer, backend,
                    outcome = %Outcome::BackendUnreachable, reason, "enrollment failed: no reply from a backend");
                // The agent sees what a dead manager gives it: a close without a reply.
                let _ = tokio::time::timeout(CLOSE_TIMEOUT, agent.shutdown()).await;
            }
            Upstream::Reply {
                bytes,
                writes,
                reply,
                backend,
            } => {
                let delivered = self.answer(agent, bytes.as_bytes(), &writes).await;
                let outcome = match &reply {
                    EnrollReply::Key(_) => Outcome::Key,
                    EnrollReply::Error(_) => Outcome::Error,
                };
                self.stats.record(outcome);
                match &reply {
                    EnrollReply::Key(issued) => {
                        // Kept only now that this connection is over.
                        let kept = !delivered && self.replay.put(key, bytes, Instant::now());
                        if kept {
                            self.stats.kept_for_replay.fetch_add(1, Ordering::Relaxed);
                        }
                        tracing::info!(name = request.name(), client = %peer, backend = %backend,
                            outcome = %outcome, agent_id = issued.id(), delivered, agent_gone,
                            kept_for_replay = kept, "enrollment: key issued");
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

    /// One exchange with a backend: connect, TLS, the request line, the reply until whole
    /// (see [`read_reply`]).
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
            let received =
                read_reply(&mut tls, self.config.max_reply, self.config.reply_quiet).await?;
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

    /// Answers the agent and closes the connection. Returns whether the agent's TCP
    /// acknowledged every byte of the reply ([`crate::net::unacked_bytes`] at zero) before the
    /// close, whatever the agent did afterwards (close_notify, FIN, reset). A reset or error
    /// before that, or no acknowledgement within `confirm_timeout`, means not delivered.
    ///
    /// The reply's TLS bytes go out as two TCP segments: a receiver acknowledges at once when
    /// a second segment arrives before it acknowledged the first, instead of after its
    /// delayed-ACK timer (40 ms or more), so an agent that reads its key and closes at once
    /// (real agents close without close_notify, often with a reset) has acknowledged it by then.
    async fn answer(
        &self,
        mut agent: TlsStream<TcpStream>,
        reply: &[u8],
        writes: &[usize],
    ) -> bool {
        let delivered = async {
            let mut wire = Vec::with_capacity(reply.len() + 64);
            {
                let (_, conn) = agent.get_mut();
                // One TLS record per backend write, as the agent would have read them directly.
                let mut at = 0;
                for &end in writes.iter().chain([&reply.len()]) {
                    if end > at && end <= reply.len() {
                        io::Write::write_all(&mut conn.writer(), &reply[at..end])?;
                        at = end;
                    }
                }
                while conn.wants_write() {
                    conn.write_tls(&mut wire)?;
                }
            }
            let tcp = agent.get_mut().0;
            let half = wire.len() / 2;
            tcp.write_all(&wire[..half]).await?;
            tcp.write_all(&wire[half..]).await?;
            Ok::<_, io::Error>(acknowledged(agent.get_ref().0, self.config.confirm_timeout).await)
        };
        let delivered = tokio::time::timeout(self.config.confirm_timeout, delivered)
            .await
            .is_ok_and(|r| r.unwrap_or(false));
        // Close properly: close_notify, then FIN, as authd does.
        let _ = tokio::time::timeout(CLOSE_TIMEOUT, agent.shutdown()).await;
        delivered
    }
}
