//! The narrow view of a running proxy that the admin API and operators use: its listeners
//! (read-only handles), whether it still accepts, and the operator actions on backends.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use crate::balance::BalanceError;
use crate::session::SessionInfo;

use super::listener::ListenerHandle;

/// One listener as a view shows it.
#[derive(Debug, Clone)]
pub struct ListenerEntry {
    /// Its name.
    pub name: String,
    /// Its address.
    pub listen: SocketAddr,
    /// The running listener.
    pub handle: ListenerHandle,
}

/// Why an operator action was refused.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum OperatorError {
    /// No agent listener has this backend.
    #[error("no agent listener has backend {0}")]
    NoSuchBackend(SocketAddr),
    /// A listener refused the action (e.g. draining its last backend).
    #[error("listener {listener}: {source}")]
    Refused {
        /// The listener.
        listener: String,
        /// Why.
        source: BalanceError,
    },
}

/// A cheap, cloneable snapshot of a proxy's listeners (taken with
/// [`Proxy::view`](super::Proxy::view); take a new one after a reload).
#[derive(Debug, Clone)]
pub struct ProxyView {
    listeners: Arc<[ListenerEntry]>,
    accepting: CancellationToken,
}

impl ProxyView {
    pub(crate) fn new(listeners: Vec<ListenerEntry>, accepting: CancellationToken) -> Self {
        ProxyView {
            listeners: listeners.into(),
            accepting,
        }
    }

    /// The listeners, in configuration order.
    pub fn listeners(&self) -> &[ListenerEntry] {
        &self.listeners
    }

    /// Whether the proxy has stopped accepting (a drain or a hand-over has begun).
    pub fn draining(&self) -> bool {
        self.accepting.is_cancelled()
    }

    /// Cancelled once the proxy stops accepting.
    pub fn stopped_accepting(&self) -> CancellationToken {
        self.accepting.clone()
    }

    /// The operator's decisions in force (see [`Proxy::operator_state`](super::Proxy::operator_state)).
    pub fn operator_state(&self) -> super::OperatorState {
        super::operator_state(self.listeners.iter().map(|l| (l.name.as_str(), &l.handle)))
    }

    /// Every live agent session, with its listener's name.
    pub fn sessions(&self) -> Vec<(&str, SessionInfo)> {
        self.agent_listeners()
            .flat_map(|(name, r)| r.sessions().snapshot().into_iter().map(move |s| (name, s)))
            .collect()
    }

    fn agent_listeners(&self) -> impl Iterator<Item = (&str, &Arc<crate::relay::AgentRelay>)> {
        self.listeners
            .iter()
            .filter_map(|l| Some((l.name.as_str(), l.handle.as_agent()?)))
    }

    /// Moves up to `limit` agents of every agent listener back to their preferred manager;
    /// returns, per listener, how many are moving.
    pub fn rebalance(&self, limit: usize) -> Vec<(&str, usize)> {
        self.agent_listeners()
            .map(|(name, r)| (name, r.rebalance(limit)))
            .collect()
    }

    /// Takes `backend` out of rotation on every agent listener that has it and moves its
    /// agents away; returns, per listener, how many are moving.
    ///
    /// # Errors
    /// When no agent listener has it, or a listener refuses (its last backend).
    pub fn drain_backend(&self, backend: SocketAddr) -> Result<Vec<(&str, usize)>, OperatorError> {
        self.on_backend(backend, |r| r.drain_backend(backend))
    }

    /// Puts `backend` back in rotation on every agent listener that has it.
    ///
    /// # Errors
    /// When no agent listener has it.
    pub fn undrain_backend(&self, backend: SocketAddr) -> Result<Vec<&str>, OperatorError> {
        self.on_backend(backend, |r| r.undrain_backend(backend))
            .map(|v| v.into_iter().map(|(name, ())| name).collect())
    }

    fn on_backend<T>(
        &self,
        backend: SocketAddr,
        act: impl Fn(&crate::relay::AgentRelay) -> Result<T, BalanceError>,
    ) -> Result<Vec<(&str, T)>, OperatorError> {
        let mut done = Vec::new();
        for (name, r) in self.agent_listeners() {
            if r.balancer().index_of(backend).is_none() {
                continue;
            }
            let t = act(r).map_err(|source| OperatorError::Refused {
                listener: name.to_owned(),
                source,
            })?;
            done.push((name, t));
        }
        if done.is_empty() {
            return Err(OperatorError::NoSuchBackend(backend));
        }
        Ok(done)
    }
}
