//! The registry of live agent sessions: who is connected, from where, to which manager, and how
//! much traffic each has moved.
//!
//! A manager (4.4+) refuses a second live connection for the same agent ("Agent key already in
//! use"), so the registry also decides what happens when an agent connects while an older
//! connection of it is still open ([`DuplicatePolicy`]).
//!
//! ```
//! # tokio_test_block_on(async {
//! use wazuh_proxy_core::envelope::AgentId;
//! use wazuh_proxy_core::session::{Claim, DuplicatePolicy, SessionError, SessionKey, SessionRegistry};
//!
//! let registry = SessionRegistry::new(DuplicatePolicy::Replace);
//! let key = SessionKey::Agent(AgentId::parse(b"001").unwrap());
//! let first = registry.register(key, "192.0.2.1:40000".parse().unwrap(), Claim::Unverified).await.unwrap();
//! assert_eq!(registry.len(), 1);
//! // A second connection claiming agent 001 proves nothing while the first is live: refused.
//! let refused = registry.register(key, "198.51.100.7:5000".parse().unwrap(), Claim::Unverified).await;
//! assert!(matches!(refused, Err(SessionError::Live { .. })));
//! // One that is the agent's own session (here handed over by a previous process; with keys, a
//! // newer startup message) asks the first one to close, then takes its place.
//! let waiter = first.session().clone();
//! let second = tokio::spawn({
//!     let registry = registry.clone();
//!     async move { registry.register(key, "192.0.2.1:40001".parse().unwrap(), Claim::HandedOver).await }
//! });
//! waiter.closing().await; // the first connection sees the request...
//! drop(first);            // ...and ends.
//! let second = second.await.unwrap().unwrap();
//! assert_eq!(registry.len(), 1);
//! assert_eq!(second.session().client().port(), 40001);
//! # });
//! # fn tokio_test_block_on<F: std::future::Future>(f: F) -> F::Output {
//! #     tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(f)
//! # }
//! ```

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use dashmap::DashMap;
use tokio_util::sync::CancellationToken;

use crate::envelope::AgentId;

/// Who a session belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SessionKey {
    /// An agent that sends its ID in every frame (`!ID!`).
    Agent(AgentId),
    /// An ID-less agent (fixed-IP key) or a `#ping` probe, known by its source address only.
    Source(IpAddr),
}

impl fmt::Display for SessionKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SessionKey::Agent(id) => write!(f, "{id}"),
            SessionKey::Source(ip) => write!(f, "ip:{ip}"),
        }
    }
}

/// What to do when an agent connects while an older connection of the same agent is live.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DuplicatePolicy {
    /// Replace the old connection when the new one is the agent reconnecting (default): the
    /// old one has not been heard from within the overtake time (60 s, remoted's
    /// `connection_overtake_time`), or, with keys, the new one's startup message decrypts
    /// with the agent's key and is newer than anything seen on the old one. Otherwise the new
    /// connection is refused and the live one kept, as remoted 4.6+ does: a connection
    /// never evicts a live agent on its word alone. The old connection is closed before the
    /// new one is forwarded, so the manager does not refuse it with "Agent key already in use".
    #[default]
    Replace,
    /// Refuse the new connection while the old one lives.
    Reject,
    /// Let both live (for managers older than 4.4, which accept both).
    Allow,
}

impl std::str::FromStr for DuplicatePolicy {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "replace" => Ok(DuplicatePolicy::Replace),
            "reject" => Ok(DuplicatePolicy::Reject),
            "allow" => Ok(DuplicatePolicy::Allow),
            other => Err(format!(
                "unknown duplicate policy {other:?} (expected replace, reject or allow)"
            )),
        }
    }
}

impl fmt::Display for DuplicatePolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DuplicatePolicy::Replace => "replace",
            DuplicatePolicy::Reject => "reject",
            DuplicatePolicy::Allow => "allow",
        })
    }
}

/// Why a session could not be registered.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum SessionError {
    /// The policy is [`DuplicatePolicy::Reject`] and the agent already has a live connection.
    #[error("agent {key} already has a live connection from {existing}")]
    Duplicate {
        /// The agent.
        key: SessionKey,
        /// The client address of the live connection.
        existing: SocketAddr,
    },
    /// The policy is [`DuplicatePolicy::Replace`], but the live connection was heard from
    /// within the overtake time and the newcomer proved nothing (see [`overtake`]).
    #[error("agent {key} is live on another connection from {existing}, heard from {heard_ago:?} ago; refusing the newcomer")]
    Live {
        /// The agent.
        key: SessionKey,
        /// The client address of the live connection.
        existing: SocketAddr,
        /// Time since the live connection's agent last sent a frame.
        heard_ago: Duration,
    },
}

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
    /// The newest message counter decrypted (see [`pack_counter`]): what a reconnection must
    /// beat to replace this session.
    pub counter: Option<u64>,
}

/// One live agent connection.
pub struct Session {
    id: u64,
    key: SessionKey,
    client: SocketAddr,
    backend: Mutex<Option<SocketAddr>>,
    started_at: Instant,
    stats: SessionStats,
    /// Boxed, and only once something is known (with client.keys): most sessions carry none.
    info: Mutex<Option<Box<AgentInfo>>>,
    /// The registry's hard-stop token (a clone: no allocation per session).
    root: CancellationToken,
    /// Flags with a `Notify` each rather than a token each: a token per session would cost
    /// an allocation and a node in the token tree.
    close_flag: std::sync::atomic::AtomicBool,
    close_notify: tokio::sync::Notify,
    ended_flag: std::sync::atomic::AtomicBool,
    ended_notify: tokio::sync::Notify,
    move_flag: std::sync::atomic::AtomicBool,
    /// Woken whenever something needs the relay's attention (close, move, hand-over, a
    /// timeout): one waker instead of a future per event keeps an idle session small.
    attention: futures_util::task::AtomicWaker,
    /// Timeouts noticed by the relay's sweeper ([`Expiry`] bits).
    expired: std::sync::atomic::AtomicU8,
    /// Hundredths of a second since the session started at which the agent last sent a frame
    /// (four bytes: it fits beside the flags; saturates after 497 days).
    last_up_cs: std::sync::atomic::AtomicU32,
    /// When a manager must have answered the handshake by (ms since the start; 0: not armed),
    /// and the count of manager frames when it was armed.
    reply_deadline_ms: AtomicU64,
    reply_baseline: std::sync::atomic::AtomicU32,
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
    pub fn set_backend(&self, addr: Option<SocketAddr>) {
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
    pub fn update_agent_info(&self, f: impl FnOnce(&mut AgentInfo)) {
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
    pub fn heard_ago(&self) -> Duration {
        let last = Duration::from_millis(u64::from(self.last_up_cs.load(Ordering::Relaxed)) * 10);
        self.started_at.elapsed().saturating_sub(last)
    }
    /// Notes a message counter decrypted on this session (the newest is kept; with keys only,
    /// so it lives with what the keys taught, not in every session).
    pub fn note_counter(&self, counter: u64) {
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
    pub fn request_close(&self) {
        self.close_flag.store(true, Ordering::Release);
        self.close_notify.notify_waiters();
        self.attention.wake();
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
    pub fn is_closing(&self) -> bool {
        self.close_flag.load(Ordering::Acquire) || self.root.is_cancelled()
    }
    /// Asks the relay to move this session to another manager at the next frame boundary,
    /// without disconnecting the agent (drain, rebalance).
    pub fn request_move(&self) {
        self.move_flag.store(true, Ordering::Release);
        self.attention.wake();
    }
    /// Whether a move is pending.
    pub fn is_move_requested(&self) -> bool {
        self.move_flag.load(Ordering::Acquire)
    }
    /// Registers the task to wake when the session needs attention (see [`Session::wake`]).
    pub fn register_attention(&self, waker: &std::task::Waker) {
        self.attention.register(waker);
    }
    /// Wakes the relay task of this session so it looks at its flags.
    pub fn wake(&self) {
        self.attention.wake();
    }
    /// Records a timeout and wakes the relay.
    pub fn expire(&self, why: Expiry) {
        self.expired.fetch_or(why as u8, Ordering::AcqRel);
        self.attention.wake();
    }
    /// Takes the timeout recorded, if any.
    pub fn take_expired(&self) -> Option<Expiry> {
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
    pub fn arm_reply(&self, timeout: Duration) {
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
    pub fn arm_reply_if_idle(&self, timeout: Duration) {
        if self.reply_deadline_ms.load(Ordering::Relaxed) == 0 {
            self.arm_reply(timeout);
        }
    }
    /// Disarms the handshake deadline.
    pub fn disarm_reply(&self) {
        self.reply_deadline_ms.store(0, Ordering::Release);
    }
    /// Checks the timeouts at `idle_limit` and the handshake deadline; called by the sweeper.
    pub fn check_timeouts(&self, idle_limit: Option<Duration>) {
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
    pub fn clear_move_request(&self) {
        self.move_flag.store(false, Ordering::Release);
    }
    /// Resolves once the session's [`SessionHandle`] was dropped.
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

struct Inner {
    policy: DuplicatePolicy,
    replace_wait: Duration,
    sessions: DashMap<u64, Arc<Session>>,
    /// The newest session of each agent: what [`DuplicatePolicy`] acts on.
    owners: DashMap<SessionKey, Arc<Session>>,
    next_id: AtomicU64,
    root: CancellationToken,
    /// See [`SessionRegistry::with_overtake_time`], in milliseconds.
    overtake_ms: AtomicU64,
}

/// The live sessions. Cheap to clone; every clone is the same registry.
#[derive(Clone)]
pub struct SessionRegistry {
    inner: Arc<Inner>,
}

impl fmt::Debug for SessionRegistry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SessionRegistry")
            .field("policy", &self.inner.policy)
            .field("sessions", &self.inner.sessions.len())
            .finish()
    }
}

impl SessionRegistry {
    /// An empty registry applying `policy` to duplicate connections.
    pub fn new(policy: DuplicatePolicy) -> Self {
        Self::with_parent(policy, CancellationToken::new())
    }

    /// An empty registry whose sessions are all asked to close when `parent` is cancelled
    /// (the process's hard-stop token).
    pub(crate) fn with_parent(policy: DuplicatePolicy, parent: CancellationToken) -> Self {
        SessionRegistry {
            inner: Arc::new(Inner {
                policy,
                replace_wait: Duration::from_secs(5),
                overtake_ms: AtomicU64::new(DEFAULT_OVERTAKE.as_millis() as u64),
                sessions: DashMap::new(),
                owners: DashMap::new(),
                next_id: AtomicU64::new(1),
                root: parent,
            }),
        }
    }

    /// Sets the overtake time of [`DuplicatePolicy::Replace`]: a live session heard from
    /// within it is not replaced by a newcomer that proves nothing (default 60 s).
    pub fn with_overtake_time(self, overtake: Duration) -> Self {
        self.inner.overtake_ms.store(
            u64::try_from(overtake.as_millis()).unwrap_or(u64::MAX),
            Ordering::Relaxed,
        );
        self
    }

    /// The duplicate policy in force.
    pub fn policy(&self) -> DuplicatePolicy {
        self.inner.policy
    }

    /// Registers a new connection for `key`, applying the duplicate policy.
    ///
    /// With [`DuplicatePolicy::Replace`] this waits (up to 5 s) until the older connection has
    /// closed, so that the manager has seen it go before the new one arrives.
    ///
    /// # Errors
    /// [`SessionError::Duplicate`] under [`DuplicatePolicy::Reject`].
    pub async fn register(
        &self,
        key: SessionKey,
        client: SocketAddr,
        claim: Claim,
    ) -> Result<SessionHandle, SessionError> {
        let inner = &self.inner;
        let session = Arc::new(Session {
            id: inner.next_id.fetch_add(1, Ordering::Relaxed),
            key,
            client,
            backend: Mutex::new(None),
            started_at: Instant::now(),
            stats: SessionStats::default(),
            info: Mutex::default(),
            root: inner.root.clone(),
            close_flag: std::sync::atomic::AtomicBool::new(false),
            close_notify: tokio::sync::Notify::new(),
            ended_flag: std::sync::atomic::AtomicBool::new(false),
            ended_notify: tokio::sync::Notify::new(),
            move_flag: std::sync::atomic::AtomicBool::new(false),
            attention: futures_util::task::AtomicWaker::new(),
            expired: std::sync::atomic::AtomicU8::new(0),
            last_up_cs: std::sync::atomic::AtomicU32::new(0),
            reply_deadline_ms: AtomicU64::new(0),
            reply_baseline: std::sync::atomic::AtomicU32::new(0),
        });
        loop {
            let old = match inner.owners.entry(key) {
                dashmap::Entry::Vacant(slot) => {
                    slot.insert(session.clone());
                    break;
                }
                dashmap::Entry::Occupied(mut slot) => match inner.policy {
                    DuplicatePolicy::Allow => {
                        slot.insert(session.clone());
                        break;
                    }
                    DuplicatePolicy::Reject => {
                        return Err(SessionError::Duplicate {
                            key,
                            existing: slot.get().client,
                        });
                    }
                    DuplicatePolicy::Replace => {
                        let live = slot.get();
                        let incumbent = Incumbent {
                            heard_ago: live.heard_ago(),
                            counter: live.counter(),
                        };
                        let overtake_time =
                            Duration::from_millis(inner.overtake_ms.load(Ordering::Relaxed));
                        if overtake(incumbent, claim, overtake_time) == Overtake::Refuse {
                            Err((live.clone(), incumbent.heard_ago))
                        } else {
                            Ok(live.clone())
                        }
                    }
                },
            };
            let old = match old {
                Ok(old) => old,
                Err((live, heard_ago)) => {
                    // An agent that reconnects closes its old connection first; that close
                    // may still be on its way. Give it a moment before refusing.
                    if tokio::time::timeout(CLOSE_GRACE, live.ended())
                        .await
                        .is_ok()
                    {
                        continue;
                    }
                    return Err(SessionError::Live {
                        key,
                        existing: live.client,
                        heard_ago,
                    });
                }
            };
            // The map's shard lock is released here: never await while holding it.
            tracing::info!(agent = %key, old_client = %old.client, new_client = %client, ?claim,
                heard_ago = ?old.heard_ago(),
                "agent reconnected while its previous connection is open; closing the previous one");
            old.request_close();
            if tokio::time::timeout(inner.replace_wait, old.ended())
                .await
                .is_err()
            {
                tracing::warn!(agent = %key, old_client = %old.client,
                    "previous connection did not close in time; taking its place anyway");
                inner.owners.remove_if(&key, |_, s| Arc::ptr_eq(s, &old));
            }
        }
        inner.sessions.insert(session.id, session.clone());
        Ok(SessionHandle {
            session,
            registry: self.clone(),
        })
    }

    /// Number of live sessions.
    pub fn len(&self) -> usize {
        self.inner.sessions.len()
    }

    /// Whether no session is live.
    pub fn is_empty(&self) -> bool {
        self.inner.sessions.is_empty()
    }

    /// The session with this number.
    pub fn get(&self, id: u64) -> Option<Arc<Session>> {
        self.inner.sessions.get(&id).map(|s| s.clone())
    }

    /// The newest live session of an agent.
    pub fn by_key(&self, key: &SessionKey) -> Option<Arc<Session>> {
        self.inner.owners.get(key).map(|s| s.clone())
    }

    /// Every live session.
    pub fn sessions(&self) -> Vec<Arc<Session>> {
        self.inner
            .sessions
            .iter()
            .map(|s| s.value().clone())
            .collect()
    }

    /// A copy of every live session's state, sorted by session number.
    pub fn snapshot(&self) -> Vec<SessionInfo> {
        let mut all: Vec<_> = self.inner.sessions.iter().map(|s| s.snapshot()).collect();
        all.sort_by_key(|s| s.id);
        all
    }

    /// Asks every live session to close.
    pub fn close_all(&self) {
        for s in self.inner.sessions.iter() {
            s.request_close();
        }
    }

    /// Wakes every session's relay task so it looks at its flags (after a relay-wide event:
    /// a hand-over, a hard stop).
    pub(crate) fn wake_all(&self) {
        for s in self.inner.sessions.iter() {
            s.wake();
        }
    }
}

/// Ownership of a registered session: dropping it removes the session from the registry and
/// wakes whoever waits for its end.
pub struct SessionHandle {
    session: Arc<Session>,
    registry: SessionRegistry,
}

impl fmt::Debug for SessionHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.session.fmt(f)
    }
}

impl SessionHandle {
    /// The session.
    pub fn session(&self) -> &Arc<Session> {
        &self.session
    }
}

impl Drop for SessionHandle {
    fn drop(&mut self) {
        let inner = &self.registry.inner;
        let s = &self.session;
        inner.sessions.remove(&s.id);
        inner
            .owners
            .remove_if(&s.key, |_, owner| Arc::ptr_eq(owner, s));
        s.ended_flag.store(true, Ordering::Release);
        s.ended_notify.notify_waiters();
    }
}

/// How long a refused newcomer waits for the live connection to end by itself first (an
/// agent closes its old connection before it reconnects; the close may still be in flight).
const CLOSE_GRACE: Duration = Duration::from_millis(250);

/// remoted's default `connection_overtake_time`.
pub const DEFAULT_OVERTAKE: Duration = Duration::from_secs(60);

/// What a new connection proved about the agent it claims to be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Claim {
    /// Nothing: its first frame was not verified (no `keys`, or an ID-less probe).
    Unverified,
    /// Its first frame decrypted with the agent's key.
    Verified {
        /// It is the agent's startup message (what an agent sends first on every connection).
        startup: bool,
        /// The message's counters, ordered (see [`pack_counter`]).
        counter: u64,
    },
    /// A session handed over by the previous process of this proxy (it is the same session).
    HandedOver,
}

/// What is known of the live session of the agent a newcomer claims to be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Incumbent {
    /// Time since the agent last sent a frame on it (since it started if none).
    pub heard_ago: Duration,
    /// The newest counter decrypted on it, if any (see [`pack_counter`]).
    pub counter: Option<u64>,
}

/// The outcome of a second connection for an agent that has a live session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Overtake {
    /// Keep the live session; refuse the newcomer.
    Refuse,
    /// Close the live session and let the newcomer take its place.
    Replace,
}

/// Decides whether a newcomer may take a live session's place (duplicate policy `replace`).
///
/// As remoted 4.6+ does with `connection_overtake_time`, the incumbent is kept while it has been
/// heard from within `overtake`; a connection cannot evict an agent on its word alone. With
/// keys the newcomer can prove more: its startup message, decrypted with the agent's key, with a
/// counter newer than anything seen on the incumbent, is the agent reconnecting (a captured
/// frame replayed carries an old counter and proves nothing).
pub fn overtake(incumbent: Incumbent, claim: Claim, overtake: Duration) -> Overtake {
    if incumbent.heard_ago >= overtake {
        return Overtake::Replace;
    }
    match claim {
        Claim::HandedOver => Overtake::Replace,
        Claim::Verified {
            startup: true,
            counter,
        } if incumbent.counter.is_some_and(|c| counter > c) => Overtake::Replace,
        _ => Overtake::Refuse,
    }
}

/// Orders a message's counters: the global counter, then the local one (`global:local` in the
/// message header; the global counter is persisted by the agent across restarts).
pub fn pack_counter(global: u64, local: u32) -> u64 {
    global
        .saturating_mul(10_000)
        .saturating_add(u64::from(local % 10_000))
        .max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(id: &str) -> SessionKey {
        SessionKey::Agent(AgentId::parse(id.as_bytes()).unwrap())
    }
    fn addr(port: u16) -> SocketAddr {
        SocketAddr::from(([192, 0, 2, 1], port))
    }

    #[tokio::test]
    async fn reject_refuses_while_the_first_lives() {
        let reg = SessionRegistry::new(DuplicatePolicy::Reject);
        let first = reg
            .register(key("001"), addr(1), Claim::Unverified)
            .await
            .unwrap();
        let err = reg
            .register(key("001"), addr(2), Claim::Unverified)
            .await
            .unwrap_err();
        assert!(err.to_string().contains("001"), "{err}");
        drop(first);
        assert!(reg.is_empty());
        reg.register(key("001"), addr(3), Claim::Unverified)
            .await
            .unwrap();
    }

    #[tokio::test]
    async fn allow_keeps_both_and_the_newest_owns_the_key() {
        let reg = SessionRegistry::new(DuplicatePolicy::Allow);
        let a = reg
            .register(key("002"), addr(1), Claim::Unverified)
            .await
            .unwrap();
        let b = reg
            .register(key("002"), addr(2), Claim::Unverified)
            .await
            .unwrap();
        assert_eq!(reg.len(), 2);
        assert_eq!(reg.by_key(&key("002")).unwrap().client(), addr(2));
        drop(b);
        // The older session no longer owns the key, but is still listed.
        assert!(reg.by_key(&key("002")).is_none());
        assert_eq!(reg.len(), 1);
        drop(a);
        assert!(reg.is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn replace_gives_up_waiting_after_the_deadline() {
        let overtake_time = Duration::from_millis(50);
        let reg = SessionRegistry::new(DuplicatePolicy::Replace).with_overtake_time(overtake_time);
        let stuck = reg
            .register(key("003"), addr(1), Claim::Unverified)
            .await
            .unwrap();
        // Live and heard from: a newcomer that proves nothing is refused, the incumbent kept.
        assert!(matches!(
            reg.register(key("003"), addr(2), Claim::Unverified).await,
            Err(SessionError::Live { .. })
        ));
        assert!(!stuck.session().is_closing());
        // Silent past the overtake time: the newcomer takes its place.
        std::thread::sleep(overtake_time);
        let new = reg
            .register(key("003"), addr(2), Claim::Unverified)
            .await
            .unwrap();
        assert!(stuck.session().is_closing());
        assert_eq!(reg.by_key(&key("003")).unwrap().client(), addr(2));
        // Dropping the stale handle late must not evict the new owner.
        drop(stuck);
        assert_eq!(reg.by_key(&key("003")).unwrap().id(), new.session().id());
    }

    #[tokio::test]
    async fn parent_token_closes_everything() {
        let root = CancellationToken::new();
        let reg = SessionRegistry::with_parent(DuplicatePolicy::Replace, root.clone());
        let a = reg
            .register(key("004"), addr(1), Claim::Unverified)
            .await
            .unwrap();
        let b = reg
            .register(
                SessionKey::Source("192.0.2.9".parse().unwrap()),
                addr(2),
                Claim::Unverified,
            )
            .await
            .unwrap();
        root.cancel();
        assert!(a.session().is_closing() && b.session().is_closing());
    }

    #[test]
    fn stats_and_snapshot() {
        let reg = SessionRegistry::new(DuplicatePolicy::Replace);
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let h = rt
            .block_on(reg.register(key("005"), addr(7), Claim::Unverified))
            .unwrap();
        h.session().record(true, 3, 300);
        h.session().record(false, 1, 20);
        h.session().set_backend(Some(addr(1514)));
        let snap = reg.snapshot();
        assert_eq!(snap.len(), 1);
        assert_eq!(
            (
                snap[0].frames_up,
                snap[0].bytes_up,
                snap[0].frames_down,
                snap[0].bytes_down
            ),
            (3, 300, 1, 20)
        );
        assert_eq!(snap[0].backend, Some(addr(1514)));
    }

    #[test]
    fn a_live_agent_is_never_evicted_on_a_newcomers_word() {
        let live = Incumbent {
            heard_ago: Duration::from_secs(5),
            counter: Some(pack_counter(100, 3)),
        };
        let min = Duration::from_secs(60);
        assert_eq!(overtake(live, Claim::Unverified, min), Overtake::Refuse);
        // A replayed frame: verified, but not newer.
        let replay = Claim::Verified {
            startup: true,
            counter: pack_counter(100, 3),
        };
        assert_eq!(overtake(live, replay, min), Overtake::Refuse);
        // A newer message that is not a startup (a captured event): refused.
        let event = Claim::Verified {
            startup: false,
            counter: pack_counter(101, 0),
        };
        assert_eq!(overtake(live, event, min), Overtake::Refuse);
        // The agent reconnecting: its startup is newer than anything seen.
        let startup = Claim::Verified {
            startup: true,
            counter: pack_counter(101, 0),
        };
        assert_eq!(overtake(live, startup, min), Overtake::Replace);
        // An incumbent silent past the overtake time gives way to anyone.
        let silent = Incumbent {
            heard_ago: min,
            counter: None,
        };
        assert_eq!(overtake(silent, Claim::Unverified, min), Overtake::Replace);
        assert_eq!(overtake(live, Claim::HandedOver, min), Overtake::Replace);
        assert!(pack_counter(5, 9999) < pack_counter(6, 0));
    }
}
