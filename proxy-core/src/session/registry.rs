//! The registry of live sessions and the duplicate policy applied when an agent registers.

use std::fmt;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use dashmap::DashMap;
use tokio_util::sync::CancellationToken;

use super::claim::DEFAULT_OVERTAKE;
use super::{
    overtake, Claim, DuplicatePolicy, Incumbent, Overtake, Session, SessionError, SessionInfo,
    SessionKey, SessionStats,
};

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
            relay_waker: futures_util::task::AtomicWaker::new(),
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
