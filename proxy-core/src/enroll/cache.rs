//! Lost-reply replay for the enrollment front.
//!
//! Keyed by the agent's source address and the exact request line (password included): a
//! kept reply is only ever given to the same address asking the same thing, once. Entries
//! hold key material, so their memory is zeroized when they go.

use std::collections::HashMap;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use zeroize::{Zeroize, ZeroizeOnDrop};

use super::reply::EnrollReply;

/// Bytes that may hold a password or a key: zeroized on drop, redacted in `Debug`.
#[derive(Clone, PartialEq, Eq, Hash, Zeroize, ZeroizeOnDrop)]
pub(crate) struct Secret(Vec<u8>);

impl Secret {
    pub(crate) fn new(bytes: Vec<u8>) -> Self {
        Secret(bytes)
    }

    pub(crate) fn as_bytes(&self) -> &[u8] {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "<{} bytes redacted>", self.0.len())
    }
}

/// Who asked what: the canonical source address and the request line.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct RequestKey {
    source: IpAddr,
    line: Arc<Secret>,
}

impl RequestKey {
    pub(crate) fn new(source: IpAddr, line: Secret) -> Self {
        RequestKey {
            source: source.to_canonical(),
            line: Arc::new(line),
        }
    }

    pub(crate) fn line(&self) -> &[u8] {
        self.line.as_bytes()
    }

    pub(crate) fn source(&self) -> IpAddr {
        self.source
    }
}

/// What one upstream exchange gave.
#[derive(Debug)]
pub(crate) enum Upstream {
    /// The backend answered (a key or a refusal) and closed.
    Reply {
        /// The reply exactly as received.
        bytes: Arc<Secret>,
        /// Where each of the backend's writes ended in `bytes`, as it was read.
        writes: Vec<usize>,
        /// The reply, classified.
        reply: EnrollReply,
        /// The backend that answered.
        backend: SocketAddr,
    },
    /// No answer: no backend reachable, TLS failed, timeout, or closed without a reply.
    Failed {
        /// Why, for the log.
        reason: String,
        /// The backend, if one was reached.
        backend: Option<SocketAddr>,
    },
}

/// Replies kept for a retry because the agent did not acknowledge them.
#[derive(Debug)]
pub(crate) struct ReplayCache {
    ttl: Duration,
    capacity: usize,
    map: Mutex<HashMap<RequestKey, Kept>>,
}

#[derive(Debug)]
struct Kept {
    reply: Arc<Secret>,
    expires: Instant,
}

impl ReplayCache {
    pub(crate) fn new(ttl: Duration, capacity: usize) -> Self {
        ReplayCache {
            ttl,
            capacity,
            map: Mutex::new(HashMap::new()),
        }
    }

    /// Takes the kept reply for this exact request from this address, if still fresh: it
    /// leaves the cache, so it is given out at most once.
    pub(crate) fn take(&self, key: &RequestKey, now: Instant) -> Option<Arc<Secret>> {
        lock(&self.map)
            .remove(key)
            .filter(|kept| kept.expires > now)
            .map(|kept| kept.reply)
    }

    /// Keeps a reply. Expired entries go first; when still full, the one closest to expiry
    /// makes room. Returns whether the reply was kept (not with a capacity of 0).
    pub(crate) fn put(&self, key: RequestKey, reply: Arc<Secret>, now: Instant) -> bool {
        if self.capacity == 0 {
            return false;
        }
        let mut map = lock(&self.map);
        map.retain(|_, kept| kept.expires > now);
        if map.len() >= self.capacity && !map.contains_key(&key) {
            let oldest = map
                .iter()
                .min_by_key(|(_, kept)| kept.expires)
                .map(|(k, _)| k.clone());
            if let Some(oldest) = oldest {
                map.remove(&oldest);
            }
        }
        map.insert(
            key,
            Kept {
                reply,
                expires: now + self.ttl,
            },
        );
        true
    }

    /// Takes every fresh entry out (for a successor process), with the time it has left.
    pub(crate) fn drain(&self, now: Instant) -> Vec<(RequestKey, Arc<Secret>, Duration)> {
        lock(&self.map)
            .drain()
            .filter(|(_, kept)| kept.expires > now)
            .map(|(key, kept)| (key, kept.reply, kept.expires - now))
            .collect()
    }

    /// Keeps an entry handed over by a predecessor for the time it had left (at most this
    /// cache's own TTL). Returns whether it was kept.
    pub(crate) fn put_for(
        &self,
        key: RequestKey,
        reply: Arc<Secret>,
        left: Duration,
        now: Instant,
    ) -> bool {
        if !self.put(key.clone(), reply, now) {
            return false;
        }
        if let Some(kept) = lock(&self.map).get_mut(&key) {
            kept.expires = now + left.min(self.ttl);
        }
        true
    }

    /// Replies kept now (expired ones included until the next `put`).
    pub(crate) fn len(&self) -> usize {
        lock(&self.map).len()
    }
}

/// Locks a map; a panic elsewhere while holding it leaves the map usable (entries are
/// self-contained), so poisoning is ignored.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(ip: &str, line: &str) -> RequestKey {
        RequestKey::new(ip.parse().unwrap(), Secret::new(line.as_bytes().to_vec()))
    }

    #[test]
    fn replay_is_per_source_and_request_and_expires() {
        let cache = ReplayCache::new(Duration::from_secs(60), 2);
        let now = Instant::now();
        let reply = Arc::new(Secret::new(b"OSSEC K:'001 a1 any k'".to_vec()));
        assert!(cache.put(key("10.0.0.1", "A"), reply.clone(), now));
        assert!(cache.take(&key("10.0.0.2", "A"), now).is_none());
        assert!(cache.take(&key("10.0.0.1", "B"), now).is_none());
        assert!(cache.take(&key("::ffff:10.0.0.1", "A"), now).is_some());
        assert!(
            cache.take(&key("10.0.0.1", "A"), now).is_none(),
            "given out once"
        );
        assert!(cache.put(key("10.0.0.1", "A"), reply, now));
        assert!(cache
            .take(&key("10.0.0.1", "A"), now + Duration::from_secs(61))
            .is_none());
        assert_eq!(cache.len(), 0);
    }

    #[test]
    fn bounded() {
        let cache = ReplayCache::new(Duration::from_secs(60), 2);
        let now = Instant::now();
        let r = Arc::new(Secret::new(vec![1]));
        cache.put(key("10.0.0.1", "A"), r.clone(), now);
        cache.put(
            key("10.0.0.1", "B"),
            r.clone(),
            now + Duration::from_secs(1),
        );
        cache.put(
            key("10.0.0.1", "C"),
            r.clone(),
            now + Duration::from_secs(2),
        );
        assert_eq!(cache.len(), 2);
        assert!(cache.take(&key("10.0.0.1", "A"), now).is_none());
        let disabled = ReplayCache::new(Duration::from_secs(1), 0);
        assert!(!disabled.put(key("10.0.0.1", "A"), r, now));
    }
}
