//! A plain TCP relay for ports whose bytes the proxy does not frame: enrollment on 1515 (TLS
//! passed through untouched) and the manager API on 55000.
//!
//! Each accepted client gets a backend chosen by its source address
//! ([`BalanceKey::Source`]), with connect failover through [`Balancer::connect`]. Bytes are then
//! copied both ways until both sides have closed, either side fails, the idle timeout passes or
//! the listener is closed.
//!
//! The copy is a small loop per direction rather than `tokio::io::copy_bidirectional`, for two
//! reasons: a direction holds a buffer only while bytes are in flight (an idle connection holds
//! none, where `copy_bidirectional` keeps two for the connection's whole life), and every read
//! and write marks the connection active, which the idle timeout needs. A half-close is
//! forwarded: when one side stops sending, the other side's write half is shut down and the
//! opposite direction keeps flowing (an enrollment client may shut down its write side and then
//! wait for the answer).
//!
//! ```no_run
//! use std::sync::Arc;
//! use wazuh_proxy_core::balance::{BackendConfig, Balancer, Policy};
//! use wazuh_proxy_core::tcp::{TcpRelay, TcpRelayConfig};
//! use tokio_util::sync::CancellationToken;
//! use tokio_util::task::TaskTracker;
//!
//! # async fn run() -> std::io::Result<()> {
//! let managers = vec![
//!     BackendConfig::new("10.0.0.11:1515".parse().unwrap()),
//!     BackendConfig::new("10.0.0.12:1515".parse().unwrap()),
//! ];
//! let balancer = Balancer::new(Policy::Source, managers).expect("valid backend set");
//! let relay = Arc::new(TcpRelay::new("enrollment", TcpRelayConfig::default(), balancer));
//! let listener = tokio::net::TcpListener::bind("0.0.0.0:1515").await?;
//! let stop = CancellationToken::new();
//! let tracker = TaskTracker::new();
//! relay.serve(listener, stop, tracker).await;
//! # Ok(()) }
//! ```

use std::fmt;
use std::io;
use std::net::{Shutdown, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, BytesMut};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::balance::{BalanceKey, Balancer, ConnectError};
use crate::net::tune;
use crate::stats::{Rejection, RelayStats};

/// Settings of a plain TCP listener.
#[derive(Debug, Clone)]
pub struct TcpRelayConfig {
    /// Time allowed to connect to one backend before trying the next (default 5 s).
    pub connect_timeout: Duration,
    /// Close a connection with no byte either way for this long (default 10 min, as nginx's
    /// `proxy_timeout`). `None` disables it.
    pub idle_timeout: Option<Duration>,
    /// TCP keepalive idle time on both sockets, so dead peers are noticed (default 60 s).
    pub tcp_keepalive: Option<Duration>,
    /// Bytes asked of the kernel per read, per direction (default 16 KiB). The buffer exists
    /// only while bytes are in flight.
    pub buffer_size: usize,
    /// Read a PROXY protocol header first, from trusted senders only (default off).
    pub proxy_protocol: Option<crate::proxy_protocol::ProxyProtocol>,
    /// Per-source admission limits (open connections, new connections per second), checked
    /// before a backend is chosen; defaults as for the agent relay.
    pub source_limits: crate::limits::SourceLimits,
    /// Time allowed for the client's first byte, before any backend is connected (default
    /// `None`: no deadline, since a relayed service may be one where the server speaks
    /// first). Enrollment (agents send a TLS ClientHello at once) and the API suit it.
    pub first_byte_timeout: Option<Duration>,
}

impl Default for TcpRelayConfig {
    fn default() -> Self {
        TcpRelayConfig {
            connect_timeout: Duration::from_secs(5),
            idle_timeout: Some(Duration::from_secs(600)),
            tcp_keepalive: Some(Duration::from_secs(60)),
            buffer_size: 16 * 1024,
            proxy_protocol: None,
            source_limits: crate::limits::SourceLimits::default(),
            first_byte_timeout: None,
        }
    }
}

/// Which end of a relayed connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Side {
    Client,
    Backend,
}

impl fmt::Display for Side {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Side::Client => "client",
            Side::Backend => "backend",
        })
    }
}

/// Why a relayed connection ended.
#[derive(Debug)]
enum End {
    /// Both sides closed; `first` closed first.
    Closed { first: Side },
    /// Reading from or writing to one side failed.
    Io(Side, io::Error),
    /// No byte either way for longer than the idle timeout.
    Idle,
    /// The proxy closed it ([`TcpRelay::close_all`]).
    Shutdown,
}

impl fmt::Display for End {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            End::Closed { first } => write!(f, "{first} closed first, then the other side"),
            End::Io(side, e) => write!(f, "{side} connection failed: {e}"),
            End::Idle => f.write_str("idle timeout"),
            End::Shutdown => f.write_str("closed by the proxy"),
        }
    }
}

/// When a connection last moved a byte, as milliseconds since it started (lock-free, shared
/// by both directions).
#[derive(Debug)]
struct Activity {
    start: Instant,
    last_ms: AtomicU64,
}

impl Activity {
    fn new() -> Self {
        Activity {
            start: Instant::now(),
            last_ms: AtomicU64::new(0),
        }
    }

    fn touch(&self) {
        let ms = u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_ms.fetch_max(ms, Ordering::Relaxed);
    }

    fn last(&self) -> Instant {
        self.start + Duration::from_millis(self.last_ms.load(Ordering::Relaxed))
    }
}

/// Relays plain TCP connections on one listener.
pub struct TcpRelay {
    name: String,
    config: TcpRelayConfig,
    balancer: crate::balance::SharedBalancer,
    stats: Arc<RelayStats>,
    hard_stop: CancellationToken,
    admission: crate::limits::Admission,
    /// One log line per second about refused clients: a flood must not become a log flood.
    refusal_log: crate::limits::LogLimit,
}

impl fmt::Debug for TcpRelay {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TcpRelay")
            .field("name", &self.name)
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl TcpRelay {
    /// A relay named `name` (used in logs) sending clients to `balancer`'s backends.
    pub fn new(name: impl Into<String>, config: TcpRelayConfig, balancer: Balancer) -> Self {
        TcpRelay {
            name: name.into(),
            admission: crate::limits::Admission::new(config.source_limits),
            config,
            balancer: crate::balance::SharedBalancer::new(balancer),
            stats: Arc::new(RelayStats::default()),
            hard_stop: CancellationToken::new(),
            refusal_log: crate::limits::LogLimit::new(),
        }
    }

    /// The listener's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The settings in force.
    pub fn config(&self) -> &TcpRelayConfig {
        &self.config
    }

    /// This listener's counters: `accepted`, `active`, `sessions` (connections that reached a
    /// backend), `bytes_up`/`bytes_down` (frame counters stay 0: the stream is not framed),
    /// `connect_failures`, and [`Rejection::NoBackend`] / [`Rejection::Idle`] /
    /// [`Rejection::SourceLimit`] / [`Rejection::FirstFrameTimeout`] (no first byte in time).
    pub fn stats(&self) -> &Arc<RelayStats> {
        &self.stats
    }

    /// The backend set in force.
    pub fn balancer(&self) -> Arc<Balancer> {
        self.balancer.load_full()
    }

    /// Replaces the backend set; new connections use it, established ones keep theirs.
    /// Passive-health marks and connection counts of backends present in both sets carry over.
    pub fn set_balancer(&self, balancer: Balancer) {
        self.balancer.replace(balancer);
    }

    /// Closes every connection now (the end of a drain).
    pub fn close_all(&self) {
        self.hard_stop.cancel();
    }

    /// Accepts clients until `stop` is cancelled; each connection runs as a task of `tracker`
    /// (wait on the tracker to drain).
    pub async fn serve(
        self: Arc<Self>,
        listener: TcpListener,
        stop: CancellationToken,
        tracker: TaskTracker,
    ) {
        crate::net::accept_loop(&listener, &self.name, &stop, |stream, peer| {
            let relay = self.clone();
            match self.config.proxy_protocol.clone() {
                None => drop(tracker.spawn(relay.handle(stream, peer))),
                Some(pp) => drop(tracker.spawn(pp.then(
                    stream,
                    peer,
                    self.stats.clone(),
                    self.name.clone(),
                    move |s, p| relay.handle(s, p),
                ))),
            }
        })
        .await;
    }

    /// Runs one client connection to its end. A client over its source's limits is closed at
    /// once, before any backend is chosen.
    pub async fn handle(self: Arc<Self>, client: TcpStream, peer: SocketAddr) {
        self.stats.accepted.fetch_add(1, Ordering::Relaxed);
        let admitted = match self
            .admission
            .admit(peer.ip().to_canonical(), std::time::Instant::now())
        {
            Ok(a) => a,
            Err(why) => {
                self.stats.reject(Rejection::SourceLimit);
                if let Some(held) = self.refusal_log.allow_now() {
                    tracing::warn!(listener = %self.name, client = %peer, held_back = held,
                        refused_total = self.stats.rejected(Rejection::SourceLimit),
                        "refusing connection: {why}");
                }
                return;
            }
        };
        self.stats.active.fetch_add(1, Ordering::Relaxed);
        self.run(client, peer).await;
        self.stats.active.fetch_sub(1, Ordering::Relaxed);
        drop(admitted);
    }

    /// Waits for the client's first byte (or its close) up to `limit`. `false` when the
    /// connection is to be closed: no byte in time, closed, or failed.
    async fn first_byte(&self, client: &TcpStream, peer: SocketAddr, limit: Duration) -> bool {
        let mut one = [0u8; 1];
        let waited = tokio::select! {
            r = tokio::time::timeout(limit, client.peek(&mut one)) => r,
            _ = self.hard_stop.cancelled() => return false,
        };
        match waited {
            Ok(Ok(n)) if n > 0 => true,
            Ok(Ok(_)) => {
                tracing::debug!(listener = %self.name, client = %peer, "client closed before sending anything");
                false
            }
            Ok(Err(e)) => {
                tracing::debug!(listener = %self.name, client = %peer, "client connection failed: {e}");
                false
            }
            Err(_) => {
                self.stats.reject(Rejection::FirstFrameTimeout);
                if let Some(held) = self.refusal_log.allow_now() {
                    tracing::warn!(listener = %self.name, client = %peer, held_back = held,
                        "closing client connection: nothing sent within {limit:?}");
                }
                false
            }
        }
    }

    async fn run(&self, client: TcpStream, peer: SocketAddr) {
        let cfg = &self.config;
        tune(&client, cfg.tcp_keepalive);
        if let Some(limit) = cfg.first_byte_timeout {
            if !self.first_byte(&client, peer, limit).await {
                return;
            }
        }
        let balancer = self.balancer.load_full();
        let key = BalanceKey::Source(peer.ip());
        let connected = tokio::select! {
            r = balancer.connect(&key, cfg.connect_timeout) => r,
            _ = self.hard_stop.cancelled() => return,
        };
        let connected = match connected {
            Ok(c) => c,
            Err(e) => {
                let failures = match &e {
                    ConnectError::AllFailed(attempts) => attempts.len() as u64,
                    _ => 0,
                };
                self.stats
                    .connect_failures
                    .fetch_add(failures, Ordering::Relaxed);
                self.stats.reject(Rejection::NoBackend);
                tracing::warn!(listener = %self.name, client = %peer,
                    "closing client connection: no backend reachable: {e}");
                return;
            }
        };
        if connected.attempts > 1 {
            self.stats
                .connect_failures
                .fetch_add(u64::from(connected.attempts - 1), Ordering::Relaxed);
        }
        let backend = connected.stream;
        let backend_addr = connected.addr;
        tune(&backend, cfg.tcp_keepalive);
        self.stats.sessions.fetch_add(1, Ordering::Relaxed);
        tracing::info!(listener = %self.name, client = %peer, backend = %backend_addr, "connection opened");

        let started = Instant::now();
        let (up, down) = (AtomicU64::new(0), AtomicU64::new(0));
        let end = self.relay(&client, &backend, &up, &down).await;
        if matches!(end, End::Idle) {
            self.stats.reject(Rejection::Idle);
        }
        let (bytes_up, bytes_down) = (up.into_inner(), down.into_inner());
        let duration_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
        if matches!(end, End::Io(..)) {
            tracing::warn!(listener = %self.name, client = %peer, backend = %backend_addr,
                bytes_up, bytes_down, duration_ms, reason = %end, "connection closed");
        } else {
            tracing::info!(listener = %self.name, client = %peer, backend = %backend_addr,
                bytes_up, bytes_down, duration_ms, reason = %end, "connection closed");
        }
        drop(connected.guard);
    }

    /// Copies both ways until both sides closed, one failed, the idle timeout or a hard stop.
    async fn relay(
        &self,
        client: &TcpStream,
        backend: &TcpStream,
        up: &AtomicU64,
        down: &AtomicU64,
    ) -> End {
        let cfg = &self.config;
        let activity = Activity::new();
        let stats = &*self.stats;
        let up_f = pump(
            client,
            backend,
            Side::Client,
            cfg.buffer_size,
            up,
            &activity,
            stats,
        );
        let down_f = pump(
            backend,
            client,
            Side::Backend,
            cfg.buffer_size,
            down,
            &activity,
            stats,
        );
        tokio::pin!(up_f, down_f);
        let idle = cfg.idle_timeout;
        // Far enough to never fire when there is no idle timeout (the branch is disabled then).
        let sleep = tokio::time::sleep(idle.unwrap_or(Duration::from_secs(86_400)));
        tokio::pin!(sleep);
        let mut first: Option<Side> = None;
        let (mut up_done, mut down_done) = (false, false);
        loop {
            tokio::select! {
                r = &mut up_f, if !up_done => match r {
                    Ok(()) => {
                        up_done = true;
                        first.get_or_insert(Side::Client);
                    }
                    Err(end) => return end,
                },
                r = &mut down_f, if !down_done => match r {
                    Ok(()) => {
                        down_done = true;
                        first.get_or_insert(Side::Backend);
                    }
                    Err(end) => return end,
                },
                _ = self.hard_stop.cancelled() => return End::Shutdown,
                _ = &mut sleep, if idle.is_some() => {
                    let deadline = activity.last() + idle.unwrap_or_default();
                    if Instant::now() >= deadline {
                        return End::Idle;
                    }
                    sleep.as_mut().reset(deadline);
                }
            }
            if up_done && down_done {
                return End::Closed {
                    first: first.unwrap_or(Side::Client),
                };
            }
        }
    }
}

/// Copies `src` to `dst` until `src` stops sending, then shuts down `dst`'s write half so the
/// peer sees the same half-close. `from` names `src`.
///
/// Holds a buffer only while bytes are in flight: whenever `src` has nothing to read and
/// everything read was written, the buffer is given back before waiting.
async fn pump(
    src: &TcpStream,
    dst: &TcpStream,
    from: Side,
    chunk: usize,
    moved: &AtomicU64,
    activity: &Activity,
    stats: &RelayStats,
) -> Result<(), End> {
    let to = match from {
        Side::Client => Side::Backend,
        Side::Backend => Side::Client,
    };
    let up = from == Side::Client;
    let mut buf = BytesMut::new();
    loop {
        if !buf.is_empty() {
            match dst.try_write(&buf) {
                Ok(n) => {
                    buf.advance(n);
                    activity.touch();
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    dst.writable().await.map_err(|e| End::Io(to, e))?;
                }
                Err(e) => return Err(End::Io(to, e)),
            }
            continue;
        }
        buf.reserve(chunk.max(1));
        match src.try_read_buf(&mut buf) {
            Ok(0) => {
                // The peer may already be gone (ENOTCONN); the other direction reports that.
                if let Err(e) = socket2::SockRef::from(dst).shutdown(Shutdown::Write) {
                    tracing::debug!(side = %to, error = %e, "could not shut down the write half");
                }
                return Ok(());
            }
            Ok(n) => {
                moved.fetch_add(n as u64, Ordering::Relaxed);
                stats.record(up, 0, n as u64);
                activity.touch();
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                // Nothing in flight: an idle direction holds no buffer memory.
                buf = BytesMut::new();
                src.readable().await.map_err(|e| End::Io(from, e))?;
            }
            Err(e) => return Err(End::Io(from, e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_documented_values() {
        let c = TcpRelayConfig::default();
        assert_eq!(c.connect_timeout, Duration::from_secs(5));
        assert_eq!(c.idle_timeout, Some(Duration::from_secs(600)));
        assert_eq!(c.tcp_keepalive, Some(Duration::from_secs(60)));
        assert_eq!(c.buffer_size, 16 * 1024);
    }

    #[test]
    fn end_reasons_read_well() {
        let closed = End::Closed {
            first: Side::Backend,
        };
        assert_eq!(
            closed.to_string(),
            "backend closed first, then the other side"
        );
        assert_eq!(End::Idle.to_string(), "idle timeout");
        let io = End::Io(
            Side::Client,
            io::Error::from(io::ErrorKind::ConnectionReset),
        );
        assert!(
            io.to_string().starts_with("client connection failed"),
            "{io}"
        );
    }
}
