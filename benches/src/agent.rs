//! One simulated agent: the handshake, events, keepalives and reconnection of wazuh-agentd.
//!
//! A connection starts with `#!-agent startup {"version":"v4.14.7"}` and succeeds only when the
//! first frame back is `#!-agent ack `. Then events and keepalives (every `notify_time`) flow
//! until the deadline, when the agent sends `#!-agent shutdown `, half-closes and waits for the
//! other side to close (so a run's time includes delivering what was sent). A lost connection
//! is logged and followed by new handshake attempts, `max_retries` per round with
//! `retry_interval` between them, as the agent's server loop does; every wait is bounded by the
//! run's deadline.

use std::collections::VecDeque;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::net::tcp::OwnedReadHalf;
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::{Notify, Semaphore};
use tokio::time::{sleep_until, timeout_at, Instant};
use wazuh_proxy_core::cipher;
use wazuh_proxy_core::control::{self, Control, KeepaliveSpec, Message};
use wazuh_proxy_core::envelope::{AgentId, Cipher, Envelope};
use wazuh_proxy_core::keys::AgentKey;

use crate::stats::FleetStats;
use crate::wire::{echo_seq, read_frame, EventText, Sealer};
use crate::FleetError;

/// The version every simulated agent announces.
pub const AGENT_VERSION: &str = "v4.14.7";

/// Largest write of pre-built frames in flat-out mode.
const CHUNK: usize = 16 * 1024;

/// How an agent sends events.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Load {
    /// No events: handshake, keepalives, shutdown.
    Idle,
    /// This many events per second, each sealed when sent.
    Rate(f64),
    /// As fast as the socket takes them, replaying `pool` pre-sealed events (0: seal each).
    FlatOut {
        /// Pre-sealed events per agent.
        pool: usize,
    },
}

/// Settings shared by every agent of a run.
#[derive(Debug)]
pub struct AgentConfig {
    /// The proxy or manager address.
    pub target: SocketAddr,
    /// Cipher of every agent.
    pub cipher: Cipher,
    /// Length of an event's text in bytes.
    pub event_size: usize,
    /// How events are sent.
    pub load: Load,
    /// When sending stops.
    pub deadline: Instant,
    /// How long to wait, after the shutdown message, for the other side to close.
    pub drain: Duration,
    /// Keepalive period.
    pub notify_time: Duration,
    /// Sleep between handshake attempts.
    pub retry_interval: Duration,
    /// Attempts per round of the server loop.
    pub max_retries: u32,
    /// How long to wait for the startup ACK.
    pub recv_timeout: Duration,
    /// TCP connect timeout.
    pub connect_timeout: Duration,
    /// Expect `#!-echo <seq>` answers and record round trips.
    pub echo: bool,
    /// Loopback source addresses to spread agents over (empty: the system's choice).
    pub sources: Vec<IpAddr>,
    /// Lines of connection logs still allowed (keeps 10,000 agents from flooding stderr).
    pub log_budget: AtomicU64,
}

impl AgentConfig {
    fn log(&self, line: std::fmt::Arguments<'_>) {
        let left = self.log_budget.fetch_sub(1, Relaxed);
        if left > 1 {
            eprintln!("{line}");
        } else if left == 1 {
            eprintln!("(further connection logs suppressed)");
        } else {
            self.log_budget.store(0, Relaxed);
        }
    }
}

/// Pre-sealed events for flat-out mode, cut into whole-frame chunks.
#[derive(Debug, Default)]
struct Pool {
    bytes: Vec<u8>,
    /// (start, end, frames) of each chunk.
    chunks: Vec<(usize, usize, u64)>,
    next: usize,
}

/// Events waiting for their echo: (sequence number, time sent), oldest first.
type Pending = Arc<Mutex<VecDeque<(u64, Instant)>>>;

/// Why a connection ended.
#[derive(Debug)]
enum Ended {
    Deadline,
    Lost(String),
}

/// One simulated agent.
pub struct Agent {
    index: usize,
    sealer: Sealer,
    text: EventText,
    seq: u64,
    pool: Option<Pool>,
    startup: Option<Vec<u8>>,
    startup_len: u64,
    source: Option<IpAddr>,
}

impl std::fmt::Debug for Agent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Agent")
            .field("index", &self.index)
            .field("seq", &self.seq)
            .finish()
    }
}

impl Agent {
    /// Agent number `index` (0-based) with its key; in flat-out mode with a pool, the pool is
    /// sealed here, before any clock starts.
    ///
    /// # Errors
    /// [`FleetError::Protocol`] when an event cannot be sealed (too large).
    pub fn new(
        index: usize,
        key: Arc<AgentKey>,
        cipher: Cipher,
        load: Load,
        event_size: usize,
        sources: &[IpAddr],
    ) -> Result<Agent, FleetError> {
        let mut agent = Agent {
            index,
            sealer: Sealer::new(key, cipher, true, (index as u32).wrapping_mul(7919)),
            text: EventText::new(index as u64 + 1),
            seq: 0,
            pool: None,
            startup: None,
            startup_len: 0,
            source: (!sources.is_empty()).then(|| sources[index % sources.len()]),
        };
        if let Load::FlatOut { pool } = load {
            if pool > 0 {
                agent.pool = Some(agent.build_pool(pool, event_size)?);
            }
        }
        Ok(agent)
    }

    fn build_pool(&mut self, n: usize, size: usize) -> Result<Pool, FleetError> {
        let mut pool = Pool::default();
        let mut msg = Vec::with_capacity(size);
        let (mut start, mut frames) = (0, 0);
        for seq in 1..=n as u64 {
            self.text.write(&mut msg, seq, n as u64, size);
            let before = pool.bytes.len();
            self.sealer.frame_into(&msg, &mut pool.bytes)?;
            if before > start && pool.bytes.len() - start > CHUNK {
                pool.chunks.push((start, before, frames));
                start = before;
                frames = 0;
            }
            frames += 1;
        }
        pool.chunks.push((start, pool.bytes.len(), frames));
        Ok(pool)
    }

    /// Seals the startup message now so that a connect storm measures only the network.
    ///
    /// # Errors
    /// [`FleetError::Protocol`] (cannot happen for the fixed startup text).
    pub fn prepare_startup(&mut self) -> Result<(), FleetError> {
        let text = control::startup_text(Some(AGENT_VERSION));
        self.startup = Some(self.sealer.frame(text.as_bytes())?);
        Ok(())
    }

    /// The agent's ID.
    pub fn id(&self) -> AgentId {
        self.sealer.key().id()
    }

    /// Connects, sends the startup message and waits for the ACK: one handshake attempt.
    ///
    /// # Errors
    /// Any connect, write or read failure, a timeout, or a first answer other than the ACK.
    pub async fn handshake(&mut self, cfg: &AgentConfig) -> Result<TcpStream, FleetError> {
        let sock = match cfg.target {
            SocketAddr::V4(_) => TcpSocket::new_v4(),
            SocketAddr::V6(_) => TcpSocket::new_v6(),
        }
        .map_err(|e| FleetError::io("creating a socket", e))?;
        if let Some(ip) = self.source {
            sock.bind(SocketAddr::new(ip, 0))
                .map_err(|e| FleetError::io(format!("binding to {ip}"), e))?;
        }
        let mut stream = tokio::time::timeout(cfg.connect_timeout, sock.connect(cfg.target))
            .await
            .map_err(|_| FleetError::Timeout(format!("connecting to {}", cfg.target)))?
            .map_err(|e| FleetError::io(format!("connecting to {}", cfg.target), e))?;
        // Whole frames are written at once; Nagle would only add delay to the echo timings.
        let _ = stream.set_nodelay(true);
        // A prepared startup is kept: churn sends it again on every connection.
        let startup = match &self.startup {
            Some(f) => f.clone(),
            None => self
                .sealer
                .frame(control::startup_text(Some(AGENT_VERSION)).as_bytes())?,
        };
        self.startup_len = startup.len() as u64;
        stream
            .write_all(&startup)
            .await
            .map_err(|e| FleetError::io("sending the startup message", e))?;
        let mut buf = Vec::new();
        let got = tokio::time::timeout(cfg.recv_timeout, read_frame(&mut stream, &mut buf))
            .await
            .map_err(|_| FleetError::Timeout("waiting for the startup ACK".into()))??;
        if !got {
            return Err(FleetError::Protocol(
                "connection closed before the startup ACK".into(),
            ));
        }
        match open(self.sealer.key(), self.sealer.cipher(), &buf)? {
            Some(Reply::Ack) => Ok(stream),
            _ => Err(FleetError::Protocol(
                "first answer was not '#!-agent ack '".into(),
            )),
        }
    }

    /// Runs the agent until the deadline: handshakes, sends, reconnects. Returns the number
    /// of events it sent.
    ///
    /// `gate` bounds how many handshakes run at once (a ramp); it is released once connected.
    pub async fn run(
        mut self,
        cfg: Arc<AgentConfig>,
        stats: Arc<FleetStats>,
        gate: Option<Arc<Semaphore>>,
    ) -> u64 {
        let mut connected_before = false;
        loop {
            let Some(stream) = self.connect(&cfg, &stats, gate.as_deref()).await else {
                if Instant::now() < cfg.deadline || !connected_before {
                    stats.errors.fetch_add(1, Relaxed);
                    cfg.log(format_args!(
                        "agent {}: no connection to {} before the end of the run",
                        self.id().as_str(),
                        cfg.target
                    ));
                }
                return self.seq;
            };
            stats.connects.fetch_add(1, Relaxed);
            stats.sent(1, 0, self.startup_len);
            if connected_before {
                stats.reconnects.fetch_add(1, Relaxed);
                cfg.log(format_args!(
                    "agent {}: (4102) Connected to the server ({})",
                    self.id().as_str(),
                    cfg.target
                ));
            }
            connected_before = true;
            match self.session(stream, &cfg, &stats).await {
                Ended::Deadline => return self.seq,
                Ended::Lost(why) => {
                    stats.lost_connections.fetch_add(1, Relaxed);
                    cfg.log(format_args!(
                        "agent {}: (1137) Lost connection with manager: {why}",
                        self.id()
                    ));
                }
            }
        }
    }

    /// The server loop: rounds of `max_retries` attempts until one succeeds or the deadline.
    pub(crate) async fn connect(
        &mut self,
        cfg: &AgentConfig,
        stats: &FleetStats,
        gate: Option<&Semaphore>,
    ) -> Option<TcpStream> {
        loop {
            for attempt in 1..=cfg.max_retries.max(1) {
                if Instant::now() >= cfg.deadline {
                    return None;
                }
                let permit = match gate {
                    Some(g) => g.acquire().await.ok(),
                    None => None,
                };
                let result = self.handshake(cfg).await;
                drop(permit);
                match result {
                    Ok(s) => return Some(s),
                    Err(e) => {
                        stats.failed_attempts.fetch_add(1, Relaxed);
                        cfg.log(format_args!(
                            "agent {}: attempt {attempt}: (1216) Unable to connect to '{}': {e}",
                            self.id().as_str(),
                            cfg.target
                        ));
                    }
                }
                let wake = Instant::now() + cfg.retry_interval;
                if wake >= cfg.deadline {
                    return None;
                }
                sleep_until(wake).await;
            }
            cfg.log(format_args!(
                "agent {}: (4101) Waiting for server reply (not started). Tried: '{}'",
                self.id().as_str(),
                cfg.target
            ));
        }
    }

    async fn session(
        &mut self,
        stream: TcpStream,
        cfg: &AgentConfig,
        stats: &Arc<FleetStats>,
    ) -> Ended {
        let (rd, mut wr) = stream.into_split();
        let lost = Arc::new(AtomicBool::new(false));
        let wake = Arc::new(Notify::new());
        let pending: Pending = Arc::default();
        let reader = tokio::spawn(read_loop(
            rd,
            self.sealer.key().clone(),
            self.sealer.cipher(),
            Arc::clone(&lost),
            Arc::clone(&wake),
            cfg.echo.then(|| Arc::clone(&pending)),
            Arc::clone(stats),
        ));
        let result = self
            .send_loop(&mut wr, cfg, stats, &lost, &wake, &pending)
            .await;
        let ended = match result {
            Err(e) => Ended::Lost(e.to_string()),
            Ok(false) => Ended::Lost("connection closed by the other side".into()),
            Ok(true) => {
                let mut shutdown = Vec::new();
                let sent = match self
                    .sealer
                    .frame_into(control::shutdown_text().as_bytes(), &mut shutdown)
                {
                    Ok(()) => wr.write_all(&shutdown).await.is_ok(),
                    Err(_) => false,
                };
                if sent {
                    stats.sent(1, 0, shutdown.len() as u64);
                }
                Ended::Deadline
            }
        };
        let _ = wr.shutdown().await;
        if matches!(ended, Ended::Deadline) {
            // Wait for the other side to close: everything sent has then been delivered.
            let abort = reader.abort_handle();
            if timeout_at(Instant::now() + cfg.drain, reader)
                .await
                .is_err()
            {
                abort.abort();
            }
        } else {
            reader.abort();
        }
        ended
    }

    /// Sends until the deadline (`Ok(true)`) or until the reader sees the end (`Ok(false)`).
    async fn send_loop(
        &mut self,
        wr: &mut tokio::net::tcp::OwnedWriteHalf,
        cfg: &AgentConfig,
        stats: &FleetStats,
        lost: &AtomicBool,
        wake: &Notify,
        pending: &Mutex<VecDeque<(u64, Instant)>>,
    ) -> Result<bool, FleetError> {
        // Past the deadline a write may still wait while buffers drain, up to the drain time.
        let write_limit = cfg.deadline + cfg.drain;
        let start = Instant::now();
        let mut next_ka = start + cfg.notify_time;
        let interval = match cfg.load {
            Load::Rate(r) if r > 0.0 => Some(Duration::from_secs_f64(1.0 / r)),
            _ => None,
        };
        // Spread agents over the interval so that they do not all send at once.
        let mut next_ev = start
            + interval.map_or(Duration::ZERO, |i| {
                i.mul_f64(((self.index as u64 * 2_654_435_761) % 1000) as f64 / 1000.0)
            });
        let mut msg = Vec::with_capacity(cfg.event_size);
        let mut buf = Vec::with_capacity(cfg.event_size + 128);
        loop {
            if lost.load(Relaxed) {
                return Ok(false);
            }
            let now = Instant::now();
            if now >= cfg.deadline {
                return Ok(true);
            }
            if now >= next_ka {
                buf.clear();
                self.sealer.frame_into(keepalive().as_bytes(), &mut buf)?;
                write(wr, &buf, write_limit).await?;
                stats.sent(1, 0, buf.len() as u64);
                next_ka += cfg.notify_time;
            }
            match cfg.load {
                Load::FlatOut { .. } => {
                    let (frames, bytes) = self.flat_chunk(&mut msg, &mut buf, cfg)?;
                    let chunk: &[u8] = match &self.pool {
                        Some(p) => {
                            let (s, e, _) =
                                p.chunks[(p.next + p.chunks.len() - 1) % p.chunks.len()];
                            &p.bytes[s..e]
                        }
                        None => &buf,
                    };
                    write(wr, chunk, write_limit).await?;
                    stats.sent(frames, frames, bytes);
                }
                Load::Rate(_) if now >= next_ev => {
                    let Some(step) = interval else { continue };
                    self.seq += 1;
                    self.text.write(&mut msg, self.seq, 0, cfg.event_size);
                    buf.clear();
                    self.sealer.frame_into(&msg, &mut buf)?;
                    if cfg.echo {
                        if let Ok(mut p) = pending.lock() {
                            // Bounded: a manager that never echoes cannot grow it forever.
                            if p.len() >= 4096 {
                                p.pop_front();
                            }
                            p.push_back((self.seq, Instant::now()));
                        }
                    }
                    write(wr, &buf, write_limit).await?;
                    stats.sent(1, 1, buf.len() as u64);
                    next_ev += step;
                    if next_ev + Duration::from_secs(1) < now {
                        // Fell more than a second behind: skip rather than burst.
                        next_ev = now;
                    }
                }
                _ => {
                    let mut until = next_ka.min(cfg.deadline);
                    if interval.is_some() {
                        until = until.min(next_ev);
                    }
                    tokio::select! {
                        _ = sleep_until(until) => {}
                        _ = wake.notified() => {}
                    }
                }
            }
        }
    }

    /// Prepares the next flat-out write; returns (frames, bytes). With a pool the chunk is
    /// the pool's next one, else `buf` is filled with freshly sealed events.
    fn flat_chunk(
        &mut self,
        msg: &mut Vec<u8>,
        buf: &mut Vec<u8>,
        cfg: &AgentConfig,
    ) -> Result<(u64, u64), FleetError> {
        if let Some(p) = &mut self.pool {
            let (s, e, frames) = p.chunks[p.next];
            p.next = (p.next + 1) % p.chunks.len();
            self.seq += frames;
            return Ok((frames, (e - s) as u64));
        }
        buf.clear();
        let mut frames = 0;
        while buf.len() < CHUNK / 2 || frames == 0 {
            self.seq += 1;
            self.text.write(msg, self.seq, 0, cfg.event_size);
            self.sealer.frame_into(msg, buf)?;
            frames += 1;
        }
        Ok((frames, buf.len() as u64))
    }
}

async fn write(
    wr: &mut tokio::net::tcp::OwnedWriteHalf,
    bytes: &[u8],
    limit: Instant,
) -> Result<(), FleetError> {
    timeout_at(limit, wr.write_all(bytes))
        .await
        .map_err(|_| FleetError::Timeout("a write stalled past the end of the run".into()))?
        .map_err(|e| FleetError::io("writing", e))
}

/// A keepalive as a 4.14.7 Linux agent writes it.
fn keepalive() -> String {
    control::keepalive_text(&KeepaliveSpec {
        uname: "Linux |fleet |6.1.0 |#1 SMP |x86_64 [Debian GNU/Linux|debian: 12] - Wazuh v4.14.7",
        agent_conf_md5: None,
        labels: &[],
        merged_md5: None,
        agent_ip: Some("127.0.0.1"),
    })
}

/// What the manager said, as far as the fleet cares.
#[derive(Debug, PartialEq, Eq)]
enum Reply {
    Ack,
    Echo(u64),
    Other,
}

fn open(key: &AgentKey, expected: Cipher, payload: &[u8]) -> Result<Option<Reply>, FleetError> {
    let env = Envelope::parse(payload)
        .map_err(|e| FleetError::Protocol(format!("manager frame: {e}")))?;
    let Some(cipher) = env.cipher() else {
        return Ok(None);
    };
    if cipher != expected {
        return Err(FleetError::Protocol(format!(
            "manager answered with {} instead of {}",
            cipher.name(),
            expected.name()
        )));
    }
    let msg = cipher::decrypt(key, cipher, env.ciphertext())
        .map_err(|e| FleetError::Protocol(format!("manager frame: {e}")))?;
    if let Some(seq) = echo_seq(&msg.message) {
        return Ok(Some(Reply::Echo(seq)));
    }
    Ok(Some(match control::parse(&msg.message) {
        Message::Control(Control::Ack) => Reply::Ack,
        _ => Reply::Other,
    }))
}

async fn read_loop(
    mut rd: OwnedReadHalf,
    key: Arc<AgentKey>,
    cipher: Cipher,
    lost: Arc<AtomicBool>,
    wake: Arc<Notify>,
    pending: Option<Pending>,
    stats: Arc<FleetStats>,
) {
    let mut buf = Vec::new();
    loop {
        match read_frame(&mut rd, &mut buf).await {
            Ok(true) => {}
            Ok(false) | Err(_) => break,
        }
        match open(&key, cipher, &buf) {
            Ok(Some(Reply::Ack)) => {
                stats.acks.fetch_add(1, Relaxed);
            }
            Ok(Some(Reply::Echo(seq))) => {
                stats.echoes.fetch_add(1, Relaxed);
                if let Some(p) = &pending {
                    if let Ok(mut p) = p.lock() {
                        while let Some(&(s, at)) = p.front() {
                            if s > seq {
                                break;
                            }
                            p.pop_front();
                            if s == seq {
                                stats.record_rtt(at);
                                break;
                            }
                        }
                    }
                }
            }
            Ok(_) => {}
            Err(_) => break,
        }
    }
    lost.store(true, Relaxed);
    wake.notify_one();
}
