//! One live session's state: its counters, flags and timeouts, updated lock-free by the relay.

use std::fmt;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime};

use tokio_util::sync::CancellationToken;

use super::SessionKey;

/// Traffic counters of one session, updated lock-free by the relay.
#[derive(Debug, Default)]
pub struct SessionStats {
    /// Frames agent -> manager.
    pub frames_up: AtomicU64,
    /// Bytes agent -> manager (headers included).
    pub bytes_up: AtomicU64,
    /// Frames manager -> agent.
    pub frames_down: AtomicU64,
    /// Bytes manager -> agent (headers included).
    pub bytes_down: AtomicU64,
    /// Frames written to a manager that then failed, which it may not have processed.
    pub frames_at_risk: AtomicU64,
    /// Times the session moved to another manager without disconnecting the agent.
    pub moves: AtomicU64,
    /// Milliseconds since the session started at which the last frame (either way) arrived.
    last_frame_ms: AtomicU64,
}

/// A timeout noticed by the relay's sweeper.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Expiry {
    /// No frame either way for longer than the idle timeout.
    Idle = 1,
    /// The manager did not answer the handshake in time.
    Reply = 2,
}

/// What the proxy learned about an agent from its control messages (needs client.keys).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AgentInfo {
    /// The agent's name in client.keys.
    pub name: Option<String>,
    /// The agent's version (`v4.14.7`), from its startup or keepalive message.
    pub version: Option<String>,
    /// The agent's uname line from its keepalive (OS, host, kernel).
    pub os: Option<String>,
    /// When the last keepalive was seen.
    pub last_keepalive: Option<SystemTime>,
    /// Whether the agent announced its shutdown (a clean stop rather than a lost connection).
    pub shutdown: bool,
    /// The newest message counter decrypted (see `pack_counter`): what
    /// a reconnection must beat to replace this session.
    pub counter: Option<u64>,
}

/// One live agent connection.
pub struct Session {
    pub(super) id: u64,
    pub(super) key: SessionKey,
    pub(super) client: SocketAddr,
    pub(super) backend: Mutex<Option<SocketAddr>>,
    pub(super) started_at: Instant,
    pub(super) stats: SessionStats,
    /// Boxed, and only once something is known (with client.keys): most sessions carry none.
    pub(super) info: Mutex<Option<Box<AgentInfo>>>,
    /// The registry's hard-stop token (a clone: no allocation per session).
    pub(super) root: CancellationToken,
    /// Flags with a `Notify` each rather than a token each: a token per session would cost
    /// an allocation and a node in the token tree.
    pub(super) close_flag: std::sync::atomic::AtomicBool,
    pub(super) close_notify: tokio::sync::Notify,
    pub(super) ended_flag: std::sync::atomic::AtomicBool,
    pub(super) ended_notify: tokio::sync::Notify,
    pub(super) move_flag: std::sync::atomic::AtomicBool,
    /// Woken whenever something needs the relay's attention (close, move, hand-over, a
    /// timeout): one waker instead of a future per event keeps an idle session small.
    pub(super) relay_waker: futures_util::task::AtomicWaker,
    /// Timeouts noticed by the relay's sweeper ([`Expiry`] bits).
    pub(super) expired: std::sync::atomic::AtomicU8,
    /// Hundredths of a second since the session started at which the agent last sent a frame
    /// (four bytes: it fits beside the flags; saturates after 497 days).
    pub(super) last_up_cs: std::sync::atomic::AtomicU32,
    /// When a manager must have answered the handshake by (ms since the start; 0: not armed),
    /// and the count of manager frames when it was armed.
    pub(super) reply_deadline_ms: AtomicU64,
    pub(super) reply_baseline: std::sync::atomic::AtomicU32,
}

impl fmt::Debug for Session {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Session")
            .field("id", &self.id)
            .field("key", &self.key)
            .field("client", &self.client)
            .field("backend", &self.backend())
            .finish_non_exhaustive()
    }
}

impl Session {
    /// A process-unique session number.
    pub fn id(&self) -> u64 {
        self.id
    }
    /// The agent (or source) the session belongs to.
    pub fn key(&self) -> SessionKey {
        self.key
    }
    /// The agent's address as the proxy sees it.
    pub fn client(&self) -> SocketAddr {
        self.client
    }
    /// The manager currently carrying the session, once connected.
    pub fn backend(&self) -> Option<SocketAddr> {
        *self.backend.lock().unwrap_or_else(|p| p.into_inner())
    }
    /// Records the manager that carries the session.
    pub(crate) fn set_backend(&self, addr: Option<SocketAddr>) {
        *self.backend.lock().unwrap_or_else(|p| p.into_inner()) = addr;
    }
    /// Wall-clock start time (derived from the monotonic start: one clock kept per session).
    pub fn started(&self) -> SystemTime {
        SystemTime::now()
            .checked_sub(self.started_at.elapsed())
            .unwrap_or(SystemTime::UNIX_EPOCH)
    }
    /// Time since the session started.
    pub fn age(&self) -> Duration {
        self.started_at.elapsed()
    }
    /// What is known about the agent.
    pub fn agent_info(&self) -> AgentInfo {
        self.info
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_deref()
            .cloned()
            .unwrap_or_default()
    }
    /// Updates what is known about the agent.
    pub(crate) fn update_agent_info(&self, f: impl FnOnce(&mut AgentInfo)) {
        f(self
            .info
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get_or_insert_with(Box::default));
    }
    /// Traffic counters.
    pub fn stats(&self) -> &SessionStats {
        &self.stats
    }
    /// Records traffic: `frames` frames of `bytes` bytes in one direction.
    #[inline]
    pub fn record(&self, up: bool, frames: u64, bytes: u64) {
        let (f, b) = if up {
            (&self.stats.frames_up, &self.stats.bytes_up)
        } else {
            (&self.stats.frames_down, &self.stats.bytes_down)
        };
        f.fetch_add(frames, Ordering::Relaxed);
        b.fetch_add(bytes, Ordering::Relaxed);
        let ms = self.started_at.elapsed().as_millis() as u64;
        self.stats.last_frame_ms.store(ms, Ordering::Relaxed);
        if up {
            let cs = u32::try_from(ms / 10).unwrap_or(u32::MAX);
            self.last_up_cs.store(cs, Ordering::Relaxed);
        }
    }
    /// Time since the agent last sent a frame on this session (since it started if none).
    pub(crate) fn heard_ago(&self) -> Duration {
        let last = Duration::from_millis(u64::from(self.last_up_cs.load(Ordering::Relaxed)) * 10);
        self.started_at.elapsed().saturating_sub(last)
    }
    /// Notes a message counter decrypted on this session (the newest is kept; with keys only,
    /// so it lives with what the keys taught, not in every session).
    pub(crate) fn note_counter(&self, counter: u64) {
        self.update_agent_info(|i| i.counter = i.counter.max(Some(counter)));
    }
    /// The newest message counter decrypted on this session, if any.
    pub fn counter(&self) -> Option<u64> {
        self.info
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .and_then(|i| i.counter)
    }
    /// Counts now as activity (a new manager connection), for the idle timeout.
    pub fn touch(&self) {
        let ms = self.started_at.elapsed().as_millis() as u64;
        self.stats.last_frame_ms.store(ms, Ordering::Relaxed);
    }
    /// Time since the last frame either way (since the start when none arrived yet).
    pub fn idle(&self) -> Duration {
        let last = Duration::from_millis(self.stats.last_frame_ms.load(Ordering::Relaxed));
        self.started_at.elapsed().saturating_sub(last)
    }
    /// Asks the connection that owns this session to close (the relay watches [`closing`]).
    ///
    /// [`closing`]: Session::closing
    pub(crate) fn request_close(&self) {
        self.close_flag.store(true, Ordering::Release);
        self.close_notify.notify_waiters();
        self.relay_waker.wake();
    }
    /// Resolves once someone asked this session to close.
    pub async fn closing(&self) {
        loop {
            let notified = self.close_notify.notified();
            if self.is_closing() {
                return;
            }
            tokio::select! {
                _ = notified => {}
                _ = self.root.cancelled() => return,
            }
        }
    }
    /// Whether a close was requested.
    pub(crate) fn is_closing(&self) -> bool {
        self.close_flag.load(Ordering::Acquire) || self.root.is_cancelled()
    }
    /// Asks the relay to move this session to another manager at the next frame boundary,
    /// without disconnecting the agent (drain, rebalance).
    pub fn request_move(&self) {
        self.move_flag.store(true, Ordering::Release);
        self.relay_waker.wake();
    }
    /// Whether a move is pending.
    pub(crate) fn is_move_requested(&self) -> bool {
        self.move_flag.load(Ordering::Acquire)
    }
    /// Registers the task to wake when the session needs attention (see [`Session::wake`]).
    pub(crate) fn register_relay_waker(&self, waker: &std::task::Waker) {
        self.relay_waker.register(waker);
    }
    /// Wakes the relay task of this session so it looks at its flags.
    pub(crate) fn wake(&self) {
        self.relay_waker.wake();
    }
    /// Records a timeout and wakes the relay.
    pub(crate) fn expire(&self, why: Expiry) {
        self.expired.fetch_or(why as u8, Ordering::AcqRel);
        self.relay_waker.wake();
    }
    /// Takes the timeout recorded, if any.
    pub(crate) fn take_expired(&self) -> Option<Expiry> {
        let bits = self.expired.swap(0, Ordering::AcqRel);
        if bits & Expiry::Idle as u8 != 0 {
            Some(Expiry::Idle)
        } else if bits & Expiry::Reply as u8 != 0 {
            Some(Expiry::Reply)
        } else {
            None
        }
    }
    /// Arms the handshake deadline: a manager that sends nothing back within `timeout` is
    /// expired with [`Expiry::Reply`] by the relay's sweeper.
    pub(crate) fn arm_reply(&self, timeout: Duration) {
        let at = (self.started_at.elapsed() + timeout).as_millis().max(1) as u64;
        // The low 32 bits are enough to tell whether a frame came since (and keep the
        // session within its allocation size class).
        self.reply_baseline.store(
            self.stats.frames_down.load(Ordering::Relaxed) as u32,
            Ordering::Relaxed,
        );
        self.reply_deadline_ms.store(at, Ordering::Release);
    }
    /// Arms the answer deadline unless one is armed already (a manager that must answer
    /// something within `timeout` of the agent's frames; keepalives are answered).
    pub(crate) fn arm_reply_if_idle(&self, timeout: Duration) {
        if self.reply_deadline_ms.load(Ordering::Relaxed) == 0 {
            self.arm_reply(timeout);
        }
    }
    /// Disarms the handshake deadline.
    pub(crate) fn disarm_reply(&self) {
        self.reply_deadline_ms.store(0, Ordering::Release);
    }
    /// Checks the timeouts at `idle_limit` and the handshake deadline; called by the sweeper.
    pub(crate) fn check_timeouts(&self, idle_limit: Option<Duration>) {
        if idle_limit.is_some_and(|d| self.idle() >= d) {
            self.expire(Expiry::Idle);
        }
        let deadline = self.reply_deadline_ms.load(Ordering::Acquire);
        if deadline != 0 {
            if self.stats.frames_down.load(Ordering::Relaxed) as u32
                != self.reply_baseline.load(Ordering::Relaxed)
            {
                self.disarm_reply();
            } else if self.started_at.elapsed().as_millis() as u64 >= deadline {
                self.disarm_reply();
                self.expire(Expiry::Reply);
            }
        }
    }
    /// Marks a pending move as done.
    pub(crate) fn clear_move_request(&self) {
        self.move_flag.store(false, Ordering::Release);
    }
    /// Resolves once the session's `SessionHandle` was dropped.
    pub async fn ended(&self) {
        loop {
            let notified = self.ended_notify.notified();
            if self.ended_flag.load(Ordering::Acquire) {
                return;
            }
            notified.await;
        }
    }
    /// A point-in-time copy for the admin API and logs.
    pub fn snapshot(&self) -> SessionInfo {
        SessionInfo {
            id: self.id,
            key: self.key,
            client: self.client,
            backend: self.backend(),
            started: self.started(),
            age: self.age(),
            idle: self.idle(),
            frames_up: self.stats.frames_up.load(Ordering::Relaxed),
            bytes_up: self.stats.bytes_up.load(Ordering::Relaxed),
            frames_down: self.stats.frames_down.load(Ordering::Relaxed),
            bytes_down: self.stats.bytes_down.load(Ordering::Relaxed),
            agent: self.agent_info(),
            frames_at_risk: self.stats.frames_at_risk.load(Ordering::Relaxed),
            moves: self.stats.moves.load(Ordering::Relaxed),
        }
    }
}

/// A copy of one session's state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionInfo {
    /// Session number.
    pub id: u64,
    /// The agent or source.
    pub key: SessionKey,
    /// The agent's address.
    pub client: SocketAddr,
    /// The manager carrying it.
    pub backend: Option<SocketAddr>,
    /// Wall-clock start.
    pub started: SystemTime,
    /// Time since the start.
    pub age: Duration,
    /// Time since the last frame.
    pub idle: Duration,
    /// Frames agent -> manager.
    pub frames_up: u64,
    /// Bytes agent -> manager.
    pub bytes_up: u64,
    /// Frames manager -> agent.
    pub frames_down: u64,
    /// Bytes manager -> agent.
    pub bytes_down: u64,
    /// What is known about the agent (with client.keys).
    pub agent: AgentInfo,
    /// Frames written to managers that then failed.
    pub frames_at_risk: u64,
    /// Moves to another manager without disconnecting.
    pub moves: u64,
}
