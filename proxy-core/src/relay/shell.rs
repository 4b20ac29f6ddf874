//! The I/O shell around the session state machine ([`super::machine`]): it reads the first
//! frame, registers the session, connects to managers, runs the steady-state relay
//! ([`super::drive`]), and at the end of each manager connection reports the event to the
//! machine and carries out the actions it returns. Decisions are not made here; sockets, timers,
//! counters and logs are.

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::net::TcpStream;

use super::decide::StintCause;
use super::drive::{read_once, FIRST_READ};
use super::machine::{self, Action, Machine, Note, Resend, StintEnd};
use super::pipe::{self, Pipe};
use super::unacked::Unacked;
use super::{AgentRelay, AgentRelayConfig, End};
use crate::balance::{BalanceKey, ConnectError, Connected};
use crate::frame::HEADER_LEN;
use crate::session::{Claim, Session, SessionHandle, SessionKey};
use crate::stats::Rejection;
use crate::verify::{verify_first, KeepaliveWatch};

impl AgentRelay {
    /// [`AgentRelay::handle`] for a socket that already has the TCP settings (accepted from a
    /// listener tuned by [`crate::net::tune_listener`]).
    pub(super) fn handle_tuned(
        self: Arc<Self>,
        agent: TcpStream,
        peer: SocketAddr,
    ) -> impl std::future::Future<Output = ()> + Send + 'static {
        self.start_sweeper();
        self.stats.accepted.fetch_add(1, Ordering::Relaxed);
        let admitted = match self.admission.admit(peer.ip(), Instant::now()) {
            Ok(a) => Some(a),
            Err(why) => {
                self.stats.reject(Rejection::SourceLimit);
                // A flood must not become a log flood.
                if self.may_log_refusal() {
                    tracing::warn!(listener = %self.name, client = %peer,
                        refused_total = self.stats.rejected(Rejection::SourceLimit), "refusing connection: {why}");
                }
                None
            }
        };
        let setup = admitted.map(|admitted| {
            self.stats.active.fetch_add(1, Ordering::Relaxed);
            let relay = self.clone();
            Box::pin(async move { relay.setup(agent, peer, admitted).await })
        });
        async move {
            let Some(setup) = setup else { return };
            if let Some(conn) = setup.await {
                self.run_session(conn, false).await;
            }
            self.stats.active.fetch_sub(1, Ordering::Relaxed);
        }
    }

    /// The first frame, agent verification and the session: everything before frames flow.
    /// Returns `None` when the connection was refused (already logged and counted).
    async fn setup(
        &self,
        agent: TcpStream,
        peer: SocketAddr,
        admitted: crate::limits::Admitted,
    ) -> Option<Box<Conn>> {
        let cfg = &self.config;
        let mut up = Pipe::default();

        // 1. The first frame names the agent.
        let first = tokio::select! {
            r = tokio::time::timeout(cfg.first_frame_timeout, first_frame(&agent, peer, &mut up, cfg)) => r,
            _ = self.hard_stop.cancelled() => return None,
        };
        let (mut key, first_len) = match first {
            Ok(Ok(found)) => found,
            Ok(Err(end)) => {
                self.refuse(peer, None, &end);
                return None;
            }
            Err(_) => {
                self.stats.reject(Rejection::FirstFrameTimeout);
                tracing::warn!(listener = %self.name, client = %peer,
                    "closing agent connection: no complete first frame within {:?}", cfg.first_frame_timeout);
                return None;
            }
        };

        // With client.keys: the agent must be who it claims to be.
        let mut keepalives = None;
        let mut info = None;
        let mut claim = Claim::Unverified;
        if let Some(keys) = &self.keys {
            match verify_first(keys, &up.buf[HEADER_LEN..first_len], peer.ip()) {
                Ok(Some(v)) => {
                    key = SessionKey::Agent(v.key.id());
                    keepalives = Some(Box::new(KeepaliveWatch::new(v.key)));
                    info = Some(v.info);
                    claim = Claim::Verified {
                        startup: v.startup,
                        counter: v.counter,
                    };
                }
                Ok(None) => {}
                Err(refusal) => {
                    self.stats.reject(refusal.rejection());
                    tracing::warn!(listener = %self.name, client = %peer, "closing agent connection: {refusal}");
                    return None;
                }
            }
        }

        // An agent every manager refused a moment ago is answered here, not by the managers.
        let kept_away = self.refused.lock().unwrap_or_else(|p| p.into_inner()).wait(
            key,
            peer.ip(),
            Instant::now(),
        );
        if let Some(wait) = kept_away {
            self.refuse(peer, Some(key), &End::KeptAway(wait));
            return None;
        }

        // 2. The session, under the duplicate policy.
        let counter = match claim {
            Claim::Verified { counter, .. } => Some(counter),
            _ => None,
        };
        let handle = match self.sessions.register(key, peer, claim).await {
            Ok(h) => h,
            Err(e) => {
                let why = match e {
                    crate::session::SessionError::Live { .. } => Rejection::Overtake,
                    _ => Rejection::Duplicate,
                };
                self.stats.reject(why);
                self.log_refusal(
                    peer,
                    Some(key),
                    format_args!("refusing agent connection: {e}"),
                );
                return None;
            }
        };
        let session = handle.session().clone();
        if let Some(info) = info {
            session.update_agent_info(|i| *i = info);
        }
        if let Some(c) = counter {
            session.note_counter(c);
        }

        let replay = up.buf[HEADER_LEN..first_len].to_vec();
        Some(Box::new(Conn::new(
            agent,
            handle,
            up,
            replay,
            keepalives,
            Some(admitted),
        )))
    }

    /// Carries an agent's session to its end: a manager, then frames both ways. When the
    /// manager side fails, the agent's connection stays and its stream continues on another
    /// manager at a frame boundary. `conn.replay` is the frame a new manager must see first so
    /// that it registers the agent's reply socket (its startup message, or with keys its
    /// latest keepalive); `adopted` sessions come from a previous process and replay it at
    /// once.
    ///
    /// Everything that lasts the whole session lives in `conn` (one allocation), and the
    /// steps around relaying (finding a manager, handling its end) run boxed: while frames
    /// flow, this future holds a few words, so an idle agent's task is small.
    pub(super) async fn run_session(&self, mut conn: Box<Conn>, adopted: bool) {
        let session = conn.handle.session().clone();
        // When the manager carrying the agent failed (for the failover-time histogram).
        let mut failed_at: Option<Instant> = None;
        let end = loop {
            let awaiting_reply =
                match Box::pin(self.start_stint(&mut conn, &session, adopted)).await {
                    StintStart::Relay { awaiting_reply } => {
                        if let Some(t) = failed_at.take() {
                            crate::timing::FAILOVER.record(t.elapsed());
                        }
                        awaiting_reply
                    }
                    StintStart::Retry => continue,
                    StintStart::Stop(end) => break end,
                };
            let replies_before = session.stats().frames_down.load(Ordering::Relaxed);
            let end = self.relay(&mut conn, &session, awaiting_reply).await;
            let answered = session.stats().frames_down.load(Ordering::Relaxed) != replies_before;
            let failing = (!matches!(end, End::Moved)).then(Instant::now);
            match Box::pin(self.end_stint(&mut conn, &session, end, answered)).await {
                AfterStint::Next => failed_at = failed_at.or(failing),
                AfterStint::Stop(end) => break end,
                AfterStint::HandOver => return self.hand_over(conn),
            }
        };
        self.finish(conn, &session, end);
    }

    /// Finds the session a manager (after the pause its last stint's end asked for, and
    /// avoiding the managers that refused the agent), sends it the control frame when it needs
    /// one, and leaves the connection in `conn.manager`.
    async fn start_stint(&self, conn: &mut Conn, session: &Session, adopted: bool) -> StintStart {
        let cfg = &self.config;
        let key = session.key();
        let plan = conn.machine.next_connect();
        if !plan.hold.is_zero() {
            tokio::select! {
                _ = tokio::time::sleep(plan.hold) => {}
                _ = session.closing() => return StintStart::Stop(End::Closed),
            }
        }
        let connected = tokio::select! {
            r = self.connect_holding(session, &plan.avoid) => r,
            _ = session.closing() => return StintStart::Stop(End::Closed),
        };
        let connected = match connected {
            Ok(c) => c,
            Err(e) => {
                let out_of_sockets = e.is_out_of_sockets();
                if out_of_sockets {
                    // Every agent arriving while the host is out of descriptors would log it.
                    if let Some(held) = OUT_OF_SOCKETS_LOG.allow_now() {
                        tracing::warn!(listener = %self.name, agent = %key, client = %session.client(),
                            held_back = held, "closing agent connection: {e}");
                    }
                } else {
                    tracing::warn!(listener = %self.name, agent = %key, client = %session.client(),
                        "closing agent connection: no manager reachable: {e}");
                }
                let mut end = End::NoManager;
                for action in Machine::on_connect_failed(out_of_sockets) {
                    match action {
                        Action::Count(m) => self.count(m),
                        Action::CloseAgent(e) => end = e,
                        _ => {}
                    }
                }
                return StintStart::Stop(end);
            }
        };
        // TCP_NODELAY is set by the balancer's connect.
        crate::net::tune_manager(
            socket2::SockRef::from(&connected.stream),
            cfg.tcp_keepalive,
            cfg.manager_user_timeout,
        );
        let addr = connected.addr;
        // The session's backend is the previous manager until now (none at the start).
        let moved_from = session.backend();
        session.set_backend(Some(addr));
        let attached = conn.machine.on_connected(
            addr,
            moved_from,
            adopted,
            std::mem::take(&mut conn.unacked.replay_resent),
            pipe::clock_secs(),
        );
        if attached.replay_first {
            if let Err(e) = write_frame(&connected.stream, &conn.replay).await {
                let during = if moved_from.is_none() {
                    "taking over the agent"
                } else {
                    "the hand-over"
                };
                tracing::warn!(listener = %self.name, agent = %key, backend = %addr, error = %e,
                    "manager failed during {during}; trying another");
                self.balancer
                    .load_full()
                    .report_failure(connected.index, Instant::now());
                if moved_from.is_none() {
                    session.set_backend(None);
                }
                return StintStart::Retry;
            }
        }
        let client = session.client();
        match moved_from {
            Some(from) => {
                tracing::info!(listener = %self.name, agent = %key, client = %client, from = %from, to = %addr,
                    "agent moved to another manager without disconnecting");
            }
            None => {
                self.stats.sessions.fetch_add(1, Ordering::Relaxed);
                let how = if adopted { "taken_over" } else { "connected" };
                crate::access::session_start(&self.name, &session.snapshot(), how);
            }
        }
        conn.manager = Some(connected);
        StintStart::Relay {
            awaiting_reply: attached.awaiting_reply,
        }
    }

    /// Reports the end of relaying on `conn.manager` to the state machine and carries out
    /// what it decides (see [`machine::Machine::on_stint_end`]): the session's end, a
    /// hand-over to the next process, or the old manager closed at a frame boundary and the
    /// next one to be found. `answered`: the manager sent the agent something during this
    /// stint.
    async fn end_stint(
        &self,
        conn: &mut Conn,
        session: &Session,
        end: End,
        answered: bool,
    ) -> AfterStint {
        let keep = self.config.resend_unacknowledged;
        let Some(manager) = conn.manager.take() else {
            // Not reached: the relay ran on this manager connection.
            return AfterStint::Stop(end);
        };
        if matches!(end, End::HandedOver) {
            // A planned hand-over: complete the frame being written, deliver what the
            // agent is owed, close the manager connection (FIN) before the next process
            // opens its own, then pass the agent's socket on.
            if finish_head(
                &mut conn.up,
                keep.then_some(&mut conn.unacked),
                &manager.stream,
            )
            .await
            .is_err()
            {
                conn.up.drop_partial_head();
            }
            let _ =
                tokio::time::timeout(Duration::from_secs(2), flush(&mut conn.down, &conn.agent))
                    .await;
            drop(manager);
            return AfterStint::HandOver;
        }
        let cause = match machine::cause(&end, || crate::net::unacked_bytes(&manager.stream)) {
            Some(cause) if self.config.failover => cause,
            _ => {
                drop(manager);
                return AfterStint::Stop(end);
            }
        };
        // A planned move waits for the frame being written to end, so none is cut, and is
        // left only once the old manager's TCP acknowledged everything written.
        let cause = match cause {
            StintCause::Moved => machine::settle_move(
                match finish_head(
                    &mut conn.up,
                    keep.then_some(&mut conn.unacked),
                    &manager.stream,
                )
                .await
                {
                    Ok(()) => Ok(acknowledged(&manager.stream, MOVE_ACK_WAIT).await),
                    Err(e) => Err(e),
                },
            ),
            other => other,
        };
        let managers = self
            .balancer
            .load_full()
            .backends()
            .iter()
            .filter(|b| !b.config().down)
            .count();
        let actions = conn.machine.on_stint_end(StintEnd {
            cause,
            answered,
            manager: manager.addr,
            managers,
            now_secs: pipe::clock_secs(),
        });
        let Connected {
            stream,
            index,
            addr,
            guard,
            ..
        } = manager;
        let (mut stream, mut guard) = (Some(stream), Some(guard));
        let (key, client) = (session.key(), session.client());
        let (mut resent, mut cut, mut at_risk) = (0, 0, 0);
        let mut next = AfterStint::Next;
        for action in actions {
            match action {
                Action::Replay(what) => {
                    let unacked = match what {
                        Resend::Nothing => {
                            conn.unacked.clear();
                            continue;
                        }
                        Resend::All => None,
                        Resend::Unacknowledged => Some(
                            stream
                                .as_ref()
                                .and_then(|s| crate::net::unacked_bytes(s).ok())
                                .map_or(usize::MAX, |n| n as usize),
                        ),
                    };
                    let (bytes, frames) = conn.unacked.take_resend(unacked);
                    resent = frames;
                    if !bytes.is_empty() {
                        conn.unacked.replay_resent = machine::holds_frame(&bytes, &conn.replay);
                        conn.up.requeue(bytes, frames);
                    }
                }
                Action::CloseUpstream { failed } => {
                    drop(stream.take());
                    drop(guard.take());
                    if failed {
                        self.balancer
                            .load_full()
                            .report_failure(index, Instant::now());
                    }
                }
                Action::ForgetRefusal => self.forget_refusal(key, client.ip()),
                Action::Count(m) => self.count(m),
                Action::DropPartials => {
                    // The rest of a frame whose start went to the old manager must not reach
                    // the next one, and the start of a frame the old manager never finished
                    // must not be completed by the next one's bytes.
                    cut = u64::from(conn.up.drop_partial_head());
                    if conn.down.drop_partial_tail() {
                        self.stats.reject(Rejection::ManagerPartialFrame);
                    }
                    if resent > 0 {
                        self.stats
                            .frames_resent
                            .fetch_add(resent, Ordering::Relaxed);
                    }
                }
                Action::CountAtRisk => {
                    // Written, acknowledged by the manager's TCP, and perhaps lost with its
                    // process.
                    at_risk = machine::at_risk(
                        conn.up.recently_written(),
                        resent,
                        cut,
                        std::mem::take(&mut conn.unacked.unprotected),
                    );
                    conn.up.forget_written();
                    self.stats
                        .frames_at_risk
                        .fetch_add(at_risk, Ordering::Relaxed);
                    session
                        .stats()
                        .frames_at_risk
                        .fetch_add(at_risk, Ordering::Relaxed);
                }
                Action::Log(note) => match note {
                    Note::ManagerFailed => {
                        tracing::warn!(listener = %self.name, agent = %key, client = %client, backend = %addr,
                            frames_at_risk = at_risk, frames_resent = resent, "manager failed ({end}); keeping the agent and moving it");
                    }
                    Note::ManagerEnded => {
                        tracing::info!(listener = %self.name, agent = %key, client = %client, backend = %addr,
                            frames_at_risk = at_risk, frames_resent = resent, answered, "manager ended the agent's connection ({end}); the manager stays in rotation");
                    }
                    Note::Refused => {
                        // Debug: one refused agent retried a few times must not fill the log;
                        // the give-up is logged once (rate-limited) and every refusal is counted.
                        tracing::debug!(listener = %self.name, agent = %key, client = %client, backend = %addr,
                            frames_resent = resent, "manager refused the agent ({end}); the manager stays in rotation");
                    }
                    Note::Quiet => {}
                },
                Action::Connect => next = AfterStint::Next,
                Action::CloseAgent(end) => next = AfterStint::Stop(end),
            }
        }
        session.stats().moves.fetch_add(1, Ordering::Relaxed);
        session.clear_move_request();
        next
    }

    /// Counts and logs a session's end, then closes it.
    fn finish(&self, mut conn: Box<Conn>, session: &Session, end: End) {
        if let Some(why) = end.rejection() {
            self.stats.reject(why);
        }
        let (key, ip) = (session.key(), session.client().ip());
        if let End::Refused(_) = end {
            let wait = self
                .refused
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .refused(key, ip, Instant::now());
            self.log_refusal(
                session.client(),
                Some(key),
                format_args!(
                    "agent disconnected: {end}; its reconnections are answered by the proxy for {}s",
                    wait.as_secs()
                ),
            );
        } else if session.stats().frames_down.load(Ordering::Relaxed) > 0 {
            self.forget_refusal(key, ip);
        }
        let clean = match (conn.keepalives.as_deref_mut(), &end) {
            (Some(t), End::AgentClosed) => Some(t.ended_cleanly(session)),
            (Some(_), _) => Some(false),
            (None, _) => None,
        };
        let stop = match clean {
            Some(true) => "clean",
            Some(false) => "lost",
            None => "unknown",
        };
        match stop {
            "clean" => self.stats.clean_stops.fetch_add(1, Ordering::Relaxed),
            "lost" => self.stats.lost.fetch_add(1, Ordering::Relaxed),
            _ => 0,
        };
        let fault = end.rejection().is_some() || matches!(end, End::NoManager);
        crate::access::session_end(
            &self.name,
            &session.snapshot(),
            end.reason_code(),
            &end,
            stop,
            fault,
        );
        // The manager connection is already closed (by `end_stint`), before the handle goes: a
        // replacing connection of the same agent must not reach a manager that still holds
        // this one. (Fields drop in order: the agent's socket, then the handle.)
        drop(conn);
    }

    /// Connects to a manager for `key`, holding the agent while none can be reached (up to
    /// `hold_timeout`), so that a short outage costs the agent a delay, not a disconnect.
    async fn connect_holding(
        &self,
        session: &Session,
        avoid: &[SocketAddr],
    ) -> Result<Connected, ConnectError> {
        let cfg = &self.config;
        let key = &balance_key(self.balancer.load_full().policy(), session);
        let deadline = Instant::now() + cfg.hold_timeout;
        let mut pause = machine::FIRST_HOLD_PAUSE;
        let mut _held = None;
        let source = cfg.transparent.then(|| session.client().ip());
        loop {
            let balancer = self.balancer.load_full();
            match balancer
                .connect_avoiding(key, cfg.connect_timeout, source, avoid)
                .await
            {
                Ok(c) => {
                    if c.attempts > 1 {
                        self.stats
                            .connect_failures
                            .fetch_add(u64::from(c.attempts - 1), Ordering::Relaxed);
                    }
                    return Ok(c);
                }
                Err(e) => {
                    self.stats.connect_failures.fetch_add(1, Ordering::Relaxed);
                    if e.is_out_of_sockets() {
                        // Holding would keep the agent's descriptor while nothing frees one.
                        return Err(e);
                    }
                    let Some((now, after)) =
                        machine::hold(cfg.failover, pause, Instant::now(), deadline)
                    else {
                        return Err(e);
                    };
                    tracing::debug!(listener = %self.name, agent = %session.key(), error = %e,
                        "no manager reachable; holding the agent");
                    _held.get_or_insert_with(crate::timing::Held::start);
                    tokio::time::sleep(now).await;
                    pause = after;
                }
            }
        }
    }
}

/// One line a second about agents closed because this host is out of sockets (the rest are
/// counted in `wazuh_proxy_rejected_total{reason="out_of_sockets"}`).
static OUT_OF_SOCKETS_LOG: crate::limits::LogLimit = crate::limits::LogLimit::new();

/// What [`AgentRelay::start_stint`] found.
enum StintStart {
    /// A manager is in `conn.manager`; relay (arming the reply timeout if asked).
    Relay { awaiting_reply: bool },
    /// That manager failed at once: find another.
    Retry,
    /// The session ends.
    Stop(End),
}

/// What [`AgentRelay::end_stint`] decided.
enum AfterStint {
    /// Find the next manager.
    Next,
    /// The session ends.
    Stop(End),
    /// Pass the agent's socket to the next process.
    HandOver,
}

/// A session's connection state from its first frame to its end, in one allocation. Fields
/// drop in order: the agent's socket closes before the session handle goes.
pub(super) struct Conn {
    pub(super) agent: TcpStream,
    pub(super) handle: SessionHandle,
    /// Agent to manager, and manager to agent.
    pub(super) up: Pipe,
    pub(super) down: Pipe,
    /// The frame a new manager must see first (see [`AgentRelay::carry`]).
    pub(super) replay: Vec<u8>,
    pub(super) keepalives: Option<Box<KeepaliveWatch>>,
    /// The manager connection being relayed to, while there is one.
    pub(super) manager: Option<Connected>,
    /// The session state machine: what this connection remembers about its managers.
    pub(super) machine: Machine,
    /// Frames written to the current manager that its TCP may not have acknowledged.
    pub(super) unacked: Unacked,

    /// The connection's place under the per-source limits (none for adopted sessions).
    _admitted: Option<crate::limits::Admitted>,
}

impl Conn {
    pub(super) fn new(
        agent: TcpStream,
        handle: SessionHandle,
        up: Pipe,
        replay: Vec<u8>,
        keepalives: Option<Box<KeepaliveWatch>>,
        admitted: Option<crate::limits::Admitted>,
    ) -> Self {
        Conn {
            agent,
            handle,
            up,
            down: Pipe::default(),
            replay,
            keepalives,
            manager: None,
            machine: Machine::new(pipe::clock_secs()),
            unacked: Unacked::default(),

            _admitted: admitted,
        }
    }
}

/// What a session is balanced by: its client's address under `balance = "source"` (what
/// nginx's `hash $remote_addr` does), otherwise the agent (ID-less agents by their address).
fn balance_key(policy: crate::balance::Policy, session: &Session) -> BalanceKey {
    match (policy, session.key()) {
        (crate::balance::Policy::Source, _) => BalanceKey::Source(session.client().ip()),
        (_, SessionKey::Agent(id)) => BalanceKey::Agent(id),
        (_, SessionKey::Source(ip)) => BalanceKey::Source(ip),
    }
}

/// How long a planned move waits for the old manager's TCP to acknowledge what was written.
const MOVE_ACK_WAIT: Duration = Duration::from_secs(2);

/// Waits (up to `limit`) until the peer's TCP acknowledged every byte written to `stream`;
/// returns what is still unacknowledged then (0: all of it, or the count is not available).
async fn acknowledged(stream: &TcpStream, limit: Duration) -> u32 {
    let until = Instant::now() + limit;
    loop {
        match crate::net::unacked_bytes(stream) {
            Ok(0) => return 0,
            Ok(n) if Instant::now() >= until => return n,
            Ok(_) => tokio::time::sleep(Duration::from_millis(5)).await,
            // Cannot tell (not Linux): a plain move, as before the count existed.
            Err(_) => return 0,
        }
    }
}

/// Writes one whole frame (payload given without its header) to a manager.
async fn write_frame(manager: &TcpStream, payload: &[u8]) -> io::Result<()> {
    let mut frame = Vec::with_capacity(HEADER_LEN + payload.len());
    frame.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    frame.extend_from_slice(payload);
    let mut at = 0;
    while at < frame.len() {
        match manager.try_write(&frame[at..]) {
            Ok(n) => at += n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => manager.writable().await?,
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Writes every whole frame a pipe holds (a hand-over delivers what the agent is owed).
async fn flush(pipe: &mut Pipe, dst: &TcpStream) -> io::Result<()> {
    while pipe.ready > 0 {
        match dst.try_write(&pipe.buf[..pipe.ready]) {
            Ok(n) => {
                pipe.consume(n);
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => dst.writable().await?,
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Writes the rest of a partly written frame, so that a planned move happens at a boundary.
async fn finish_head(
    up: &mut Pipe,
    mut copy: Option<&mut Unacked>,
    manager: &TcpStream,
) -> io::Result<()> {
    while up.head_left > 0 {
        let n = up.head_left.min(up.ready);
        match manager.try_write(&up.buf[..n]) {
            Ok(w) => {
                if let Some(copy) = copy.as_deref_mut() {
                    copy.record(&up.buf[..w]);
                }
                up.consume(w);
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => manager.writable().await?,
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Reads until the first whole frame is buffered and returns who it belongs to.
async fn first_frame(
    agent: &TcpStream,
    peer: SocketAddr,
    up: &mut Pipe,
    cfg: &AgentRelayConfig,
) -> Result<(SessionKey, usize), End> {
    loop {
        if let Some(found) = machine::first_frame(&up.buf, cfg.max_payload, peer.ip())? {
            return Ok(found);
        }
        up.buf.reserve(FIRST_READ.min(cfg.read_chunk));
        agent.readable().await.map_err(End::AgentIo)?;
        // A first frame read whole leaves the socket marked drained, so the relay's first
        // read waits for new data instead of asking the kernel for none (one system call
        // fewer per agent in a reconnect storm).
        match read_once(agent, &mut up.buf) {
            Ok(0) if up.buf.is_empty() => return Err(End::AgentClosed),
            Ok(0) => return Err(End::AgentFrame(crate::frame::truncated(&up.buf))),
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(End::AgentIo(e)),
        }
    }
}
