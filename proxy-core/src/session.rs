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
//! use wazuh_proxy_core::session::{DuplicatePolicy, SessionKey, SessionRegistry};
//!
//! let registry = SessionRegistry::new(DuplicatePolicy::Replace);
//! let key = SessionKey::Agent(AgentId::parse(b"001").unwrap());
//! let first = registry.register(key, "192.0.2.1:40000".parse().unwrap()).await.unwrap();
//! assert_eq!(registry.len(), 1);
//! // A second connection of agent 001 asks the first one to close, then takes its place.
//! let waiter = first.session().clone();
//! let second = tokio::spawn({
//!     let registry = registry.clone();
//!     async move { registry.register(key, "192.0.2.1:40001".parse().unwrap()).await }
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
    /// Close the old connection first, then forward the new one (default). The agent that
    /// reconnects is the live one; the old connection is usually half-dead. Closing it first
    /// keeps the manager from refusing the new one with "Agent key already in use".
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
    /// When a manager must have answered the handshake by (ms since the start; 0: not armed),
    /// and the count of manager frames when it was armed.
    reply_deadline_ms: AtomicU64,
    reply_baseline: AtomicU64,
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
        self.reply_baseline.store(
            self.stats.frames_down.load(Ordering::Relaxed),
            Ordering::Relaxed,
        );
        self.reply_deadline_ms.store(at, Ordering::Release);
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
            if self.stats.frames_down.load(Ordering::Relaxed)
                > self.reply_baseline.load(Ordering::Relaxed)
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
    pub fn with_parent(policy: DuplicatePolicy, parent: CancellationToken) -> Self {
        SessionRegistry {
            inner: Arc::new(Inner {
                policy,
                replace_wait: Duration::from_secs(5),
                sessions: DashMap::new(),
                owners: DashMap::new(),
                next_id: AtomicU64::new(1),
                root: parent,
            }),
        }
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
            reply_deadline_ms: AtomicU64::new(0),
            reply_baseline: AtomicU64::new(0),
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
                    DuplicatePolicy::Replace => slot.get().clone(),
                },
            };
            // The map's shard lock is released here: never await while holding it.
            tracing::info!(agent = %key, old_client = %old.client, new_client = %client,
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
    pub fn wake_all(&self) {
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
        let first = reg.register(key("001"), addr(1)).await.unwrap();
        let err = reg.register(key("001"), addr(2)).await.unwrap_err();
        assert!(err.to_string().contains("001"), "{err}");
        drop(first);
        assert!(reg.is_empty());
        reg.register(key("001"), addr(3)).await.unwrap();
    }

    #[tokio::test]
    async fn allow_keeps_both_and_the_newest_owns_the_key() {
        let reg = SessionRegistry::new(DuplicatePolicy::Allow);
        let a = reg.register(key("002"), addr(1)).await.unwrap();
        let b = reg.register(key("002"), addr(2)).await.unwrap();
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
        let reg = SessionRegistry::new(DuplicatePolicy::Replace);
        let stuck = reg.register(key("003"), addr(1)).await.unwrap();
        let new = reg.register(key("003"), addr(2)).await.unwrap();
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
        let a = reg.register(key("004"), addr(1)).await.unwrap();
        let b = reg
            .register(SessionKey::Source("192.0.2.9".parse().unwrap()), addr(2))
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
        let h = rt.block_on(reg.register(key("005"), addr(7))).unwrap();
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
}
