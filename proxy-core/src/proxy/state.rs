//! The operator's runtime decisions, kept apart from the configuration.
//!
//! A configuration says what the proxy runs; the operator's decisions say what was done to
//! it since (today: the backends drained by hand, `POST /drain` or `wazuh-proxy drain`). They
//! are not written in any file, so a reload must not reset them, and an upgrade carries them
//! to the new process. [`OperatorState`] is that state as one value: pure data, read from a
//! running proxy with [`Proxy::operator_state`](super::Proxy::operator_state), given to a
//! new one with [`Proxy::start_with`](super::Proxy::start_with), sent over the hand-over.
//!
//! # What a new configuration keeps
//!
//! At a reload, and when a new process starts with the state of the old one, the state is
//! matched to the new configuration by [`OperatorState::retain_for`]:
//! - decisions are keyed by listener **name**: a listener that keeps its name keeps them,
//!   even when its address changes (the operator drained a manager, not a port);
//! - a listener that is gone, or is no longer an agent listener (the only kind that can drain
//!   a backend), forgets them;
//! - a drained backend that is no longer among the listener's backends is forgotten: the
//!   operator can no longer see or undo it, and a manager added back later is added back in
//!   rotation, as the configuration says.
//!
//! Backend sets that change without a reload (re-resolution of a manager's name) keep every
//! drain: a name that briefly resolves without an address must not undo the operator's drain.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::SocketAddr;

use super::config::ProxyConfig;
use super::listener::ListenerKind;

/// The operator's decisions on every listener, by listener name (see the
/// [module](self) for what a reload or an upgrade keeps).
///
/// Listeners without any decision are not stored: two states with the same decisions are
/// equal.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OperatorState {
    listeners: BTreeMap<String, ListenerState>,
}

/// The operator's decisions on one listener.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ListenerState {
    /// Backends out of rotation until undrained.
    drained: BTreeSet<SocketAddr>,
}

/// A decision the new configuration could not keep (see [`OperatorState::retain_for`]).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Forgotten {
    /// The listener is gone, or is no longer an agent listener: its drains are forgotten.
    Listener {
        /// The listener's name.
        listener: String,
        /// The backends it had drained.
        drained: Vec<SocketAddr>,
    },
    /// The backend is no longer one of the listener's: its drain is forgotten.
    Drain {
        /// The listener's name.
        listener: String,
        /// The backend.
        backend: SocketAddr,
    },
}

impl fmt::Display for Forgotten {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Forgotten::Listener { listener, drained } => write!(
                f,
                "listener {listener:?} is no longer an agent listener of the configuration: \
                 its drains of {drained:?} are forgotten"
            ),
            Forgotten::Drain { listener, backend } => write!(
                f,
                "backend {backend} is no longer one of listener {listener:?}: its drain is forgotten"
            ),
        }
    }
}

impl ListenerState {
    /// No decision.
    pub fn new() -> Self {
        ListenerState::default()
    }

    /// Whether the operator decided nothing on this listener.
    pub fn is_empty(&self) -> bool {
        self.drained.is_empty()
    }

    /// The drained backends, in address order.
    pub fn drained(&self) -> impl Iterator<Item = SocketAddr> + '_ {
        self.drained.iter().copied()
    }

    /// Whether `backend` is drained.
    pub fn is_drained(&self, backend: SocketAddr) -> bool {
        self.drained.contains(&backend)
    }

    /// Records a drain of `backend`; `false` when it was drained already.
    pub fn drain(&mut self, backend: SocketAddr) -> bool {
        self.drained.insert(backend)
    }

    /// Forgets the drain of `backend`; `false` when it was not drained.
    pub fn undrain(&mut self, backend: SocketAddr) -> bool {
        self.drained.remove(&backend)
    }
}

impl FromIterator<SocketAddr> for ListenerState {
    fn from_iter<I: IntoIterator<Item = SocketAddr>>(iter: I) -> Self {
        ListenerState {
            drained: iter.into_iter().collect(),
        }
    }
}

impl OperatorState {
    /// No decision on any listener.
    pub fn new() -> Self {
        OperatorState::default()
    }

    /// Whether the operator decided nothing.
    pub fn is_empty(&self) -> bool {
        self.listeners.is_empty()
    }

    /// The decisions on listener `name` (`None`: none).
    pub fn listener(&self, name: &str) -> Option<&ListenerState> {
        self.listeners.get(name)
    }

    /// Every listener with a decision, in name order.
    pub fn listeners(&self) -> impl Iterator<Item = (&str, &ListenerState)> {
        self.listeners.iter().map(|(n, s)| (n.as_str(), s))
    }

    /// Replaces the decisions on listener `name` (an empty `state` removes it).
    pub fn set_listener(&mut self, name: impl Into<String>, state: ListenerState) {
        let name = name.into();
        if state.is_empty() {
            self.listeners.remove(&name);
        } else {
            self.listeners.insert(name, state);
        }
    }

    /// The drained backends of listener `name`, in address order.
    pub fn drained_on(&self, name: &str) -> Vec<SocketAddr> {
        self.listener(name)
            .map(|s| s.drained().collect())
            .unwrap_or_default()
    }

    /// Every drain, as (listener, backend) pairs in name then address order.
    pub fn drained(&self) -> impl Iterator<Item = (&str, SocketAddr)> {
        self.listeners()
            .flat_map(|(name, s)| s.drained().map(move |b| (name, b)))
    }

    /// Records a drain of `backend` on listener `listener`; `false` when it was drained
    /// already.
    pub fn drain(&mut self, listener: &str, backend: SocketAddr) -> bool {
        self.listeners
            .entry(listener.to_owned())
            .or_default()
            .drain(backend)
    }

    /// Forgets the drain of `backend` on listener `listener`; `false` when it was not
    /// drained.
    pub fn undrain(&mut self, listener: &str, backend: SocketAddr) -> bool {
        let Some(s) = self.listeners.get_mut(listener) else {
            return false;
        };
        let was = s.undrain(backend);
        if s.is_empty() {
            self.listeners.remove(listener);
        }
        was
    }

    /// Keeps what `config` still has room for (see the [module](self)): the decisions on
    /// every agent listener of that name, without the drains of backends it no longer has.
    /// Returns what was forgotten, for the log.
    pub fn retain_for(&mut self, config: &ProxyConfig) -> Vec<Forgotten> {
        let mut forgotten = Vec::new();
        self.listeners.retain(|name, state| {
            let Some(l) = config
                .listener(name)
                .filter(|l| l.kind() == ListenerKind::Agent)
            else {
                forgotten.push(Forgotten::Listener {
                    listener: name.clone(),
                    drained: state.drained().collect(),
                });
                return false;
            };
            state.drained.retain(|b| {
                let kept = l.backends.iter().any(|c| c.addr == *b);
                if !kept {
                    forgotten.push(Forgotten::Drain {
                        listener: name.clone(),
                        backend: *b,
                    });
                }
                kept
            });
            !state.is_empty()
        });
        forgotten
    }
}

impl<'a> FromIterator<(&'a str, SocketAddr)> for OperatorState {
    fn from_iter<I: IntoIterator<Item = (&'a str, SocketAddr)>>(iter: I) -> Self {
        let mut state = OperatorState::new();
        for (listener, backend) in iter {
            state.drain(listener, backend);
        }
        state
    }
}

impl FromIterator<(String, SocketAddr)> for OperatorState {
    fn from_iter<I: IntoIterator<Item = (String, SocketAddr)>>(iter: I) -> Self {
        let mut state = OperatorState::new();
        for (listener, backend) in iter {
            state.drain(&listener, backend);
        }
        state
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proxy::{ListenerConfig, ListenerSettings};
    use crate::tcp::TcpRelayConfig;

    fn addr(port: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], port))
    }

    fn agents(name: &str, managers: &[u16]) -> ListenerConfig {
        let managers: Vec<SocketAddr> = managers.iter().map(|p| addr(*p)).collect();
        ListenerConfig::agent(name, addr(1514), &managers)
    }

    #[test]
    fn drains_are_recorded_once_and_undone() {
        let mut s = OperatorState::new();
        assert!(s.is_empty());
        assert!(s.drain("agents", addr(2)));
        assert!(!s.drain("agents", addr(2)), "already drained");
        assert!(s.drain("agents", addr(1)));
        assert!(s.drain("other", addr(1)));
        assert_eq!(s.drained_on("agents"), [addr(1), addr(2)]);
        assert!(s.listener("agents").unwrap().is_drained(addr(2)));
        assert_eq!(
            s.drained().collect::<Vec<_>>(),
            [("agents", addr(1)), ("agents", addr(2)), ("other", addr(1))]
        );
        assert!(s.undrain("other", addr(1)));
        assert!(!s.undrain("other", addr(1)));
        assert!(!s.undrain("nowhere", addr(1)));
        assert!(s.listener("other").is_none(), "no empty listener is kept");
        assert!(s.undrain("agents", addr(1)) && s.undrain("agents", addr(2)));
        assert_eq!(s, OperatorState::new());
    }

    #[test]
    fn pairs_make_the_same_state_in_any_order() {
        let a: OperatorState = [("b", addr(1)), ("a", addr(2)), ("a", addr(1))]
            .into_iter()
            .collect();
        let b: OperatorState = [
            ("a".to_owned(), addr(1)),
            ("b".to_owned(), addr(1)),
            ("a".to_owned(), addr(2)),
            ("a".to_owned(), addr(1)),
        ]
        .into_iter()
        .collect();
        assert_eq!(a, b);
        let mut c = OperatorState::new();
        c.set_listener("a", [addr(2), addr(1)].into_iter().collect());
        c.set_listener("b", [addr(1)].into_iter().collect());
        c.set_listener("c", ListenerState::new());
        assert_eq!(a, c);
        c.set_listener("b", ListenerState::new());
        assert_eq!(c.listeners().map(|(n, _)| n).collect::<Vec<_>>(), ["a"]);
    }

    #[test]
    fn the_same_configuration_keeps_everything() {
        let config = ProxyConfig::new(vec![agents("agents", &[1, 2, 3])]);
        let mut s: OperatorState = [("agents", addr(1)), ("agents", addr(3))]
            .into_iter()
            .collect();
        let before = s.clone();
        assert!(s.retain_for(&config).is_empty());
        assert_eq!(s, before);
    }

    #[test]
    fn a_backend_removed_from_the_set_loses_its_drain() {
        let config = ProxyConfig::new(vec![agents("agents", &[2, 3])]);
        let mut s: OperatorState = [("agents", addr(1)), ("agents", addr(2))]
            .into_iter()
            .collect();
        assert_eq!(
            s.retain_for(&config),
            [Forgotten::Drain {
                listener: "agents".into(),
                backend: addr(1)
            }]
        );
        assert_eq!(s.drained_on("agents"), [addr(2)]);
        // The manager added back later is in rotation: nothing remembers the old drain.
        let back = ProxyConfig::new(vec![agents("agents", &[1, 2, 3])]);
        assert!(s.retain_for(&back).is_empty());
        assert_eq!(s.drained_on("agents"), [addr(2)]);
    }

    #[test]
    fn one_listener_losing_a_backend_leaves_another_listeners_drain_of_it_alone() {
        // Both listeners drained manager 1; a reload takes it out of "east" only.
        let config = ProxyConfig::new(vec![agents("east", &[2]), agents("west", &[1, 2])]);
        let mut s: OperatorState = [("east", addr(1)), ("west", addr(1))].into_iter().collect();
        assert_eq!(
            s.retain_for(&config),
            [Forgotten::Drain {
                listener: "east".into(),
                backend: addr(1)
            }]
        );
        assert_eq!(s.drained_on("west"), [addr(1)]);
        assert!(s.drained_on("east").is_empty());
    }

    #[test]
    fn a_listener_removed_or_of_another_kind_loses_its_state() {
        let tcp = ListenerConfig::new(
            "api",
            addr(55000),
            vec![crate::balance::BackendConfig::new(addr(1))],
            ListenerSettings::Tcp(TcpRelayConfig::default()),
        );
        let config = ProxyConfig::new(vec![agents("agents", &[1]), tcp]);
        let mut s: OperatorState = [("gone", addr(1)), ("api", addr(1)), ("agents", addr(1))]
            .into_iter()
            .collect();
        let mut forgotten = s.retain_for(&config);
        forgotten.sort_by_key(|f| f.to_string());
        assert_eq!(forgotten.len(), 2);
        assert!(forgotten
            .iter()
            .all(|f| matches!(f, Forgotten::Listener { .. })));
        assert!(forgotten[0].to_string().contains("\"api\""));
        assert_eq!(
            s.listeners().map(|(n, _)| n).collect::<Vec<_>>(),
            ["agents"]
        );
        // Every drain of a listener gone: the state is empty.
        let mut s2 = s.clone();
        let none = ProxyConfig::new(Vec::new());
        assert_eq!(
            s2.retain_for(&none),
            [Forgotten::Listener {
                listener: "agents".into(),
                drained: vec![addr(1)]
            }]
        );
        assert!(s2.is_empty());
    }

    #[test]
    fn a_listener_keeps_its_state_at_a_new_address() {
        let mut moved = agents("agents", &[1, 2]);
        moved.listen = addr(1600);
        let config = ProxyConfig::new(vec![moved]);
        let mut s: OperatorState = [("agents", addr(2))].into_iter().collect();
        assert!(s.retain_for(&config).is_empty());
        assert_eq!(s.drained_on("agents"), [addr(2)]);
    }
}
