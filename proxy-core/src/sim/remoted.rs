//! What `wazuh-remoted` decides about a connection's frame before it reads the message, as a
//! pure model (no sockets, time passed in), so that the stand-in [`Manager`](super::Manager)
//! refuses agents for the same per-agent reasons the real daemon does.
//!
//! Modelled on `HandleSecureMessage` in Wazuh 4.x `src/remoted/secure.c`:
//! - an agent whose key is removed or unknown (`(1408): Invalid ID`, `ENC_IP_ERROR`): the
//!   connection is closed, unanswered;
//! - a frame of an agent whose key already has another live socket: if that socket was heard
//!   from within `connection_overtake_time` (60 s by default), the newcomer is closed ("Agent
//!   key already in use"); otherwise the idle socket is closed and the newcomer takes the key;
//! - when a connection closes, the key forgets its socket (`_close_sock`): messages for that
//!   agent cannot be sent until it connects again;
//! - with `verify_msg_id`, a message whose counters are not newer than the last one accepted
//!   from that agent is dropped (the connection stays).

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

/// remoted's default `connection_overtake_time`.
pub const OVERTAKE_TIME: Duration = Duration::from_secs(60);

/// How a stand-in mistreats one agent's connections (the manager side of a protocol fault).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Misbehave {
    /// Answers the first frame, then never reads again (but keeps the connection).
    NeverRead,
    /// Answers the first frame with bytes that are not a frame (an HTTP response).
    Garbage,
    /// Answers the first frame with a zero-length frame.
    ZeroLength,
}

/// Why a connection's frame is not served.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The agent's key was removed (or never existed): `(1408): Invalid ID`.
    Removed,
    /// Another connection holds the agent's key and was heard from recently.
    KeyInUse,
}

/// The fate of one frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Served. `overtaken`: the idle connection this one replaces, to be closed.
    Serve {
        /// The connection that held the key and went idle past the overtake time.
        overtaken: Option<u64>,
    },
    /// Closed, unanswered.
    Refuse(Refusal),
    /// Mistreated as configured.
    Misbehave(Misbehave),
}

#[derive(Debug, Clone, Copy)]
struct Holder {
    conn: u64,
    heard: Instant,
}

/// The per-agent state remoted keeps in its key table, for the parts that decide admission.
#[derive(Debug)]
pub struct Admission {
    refused: HashSet<String>,
    misbehave: HashMap<String, Misbehave>,
    /// `None`: a second connection never replaces the first (refusals off: the stand-in
    /// serves both, as a manager without the check would).
    overtake: Option<Duration>,
    holders: HashMap<String, Holder>,
    counters: HashMap<String, (u64, u32)>,
}

impl Default for Admission {
    fn default() -> Self {
        Admission::new(None)
    }
}

impl Admission {
    /// An empty table. `overtake`: remoted's `connection_overtake_time`, or `None` to serve
    /// any number of connections per agent.
    pub fn new(overtake: Option<Duration>) -> Admission {
        Admission {
            refused: HashSet::new(),
            misbehave: HashMap::new(),
            overtake,
            holders: HashMap::new(),
            counters: HashMap::new(),
        }
    }

    /// Removes `agent`'s key: its next frame on any connection closes that connection.
    pub fn refuse(&mut self, agent: &str) {
        self.refused.insert(agent.to_owned());
    }

    /// Restores `agent`'s key.
    pub fn allow(&mut self, agent: &str) {
        self.refused.remove(agent);
    }

    /// Sets the overtake time (`None`: connections of one agent never refuse each other).
    pub fn set_overtake(&mut self, overtake: Option<Duration>) {
        self.overtake = overtake;
    }

    /// Mistreats `agent`'s connections from now on.
    pub fn misbehave(&mut self, agent: &str, how: Misbehave) {
        self.misbehave.insert(agent.to_owned(), how);
    }

    /// Decides the fate of a frame of `agent` on connection `conn` at `now`.
    pub fn frame(&mut self, agent: &str, conn: u64, now: Instant) -> Verdict {
        if self.refused.contains(agent) {
            return Verdict::Refuse(Refusal::Removed);
        }
        if let Some(how) = self.misbehave.get(agent) {
            return Verdict::Misbehave(*how);
        }
        let holder = self.holders.get(agent).copied();
        let overtaken = match holder {
            None => None,
            Some(h) if h.conn == conn => None,
            Some(h) => match self.overtake {
                // Both served; the key stays with the first.
                None => return Verdict::Serve { overtaken: None },
                Some(limit) if now.saturating_duration_since(h.heard) <= limit => {
                    return Verdict::Refuse(Refusal::KeyInUse);
                }
                Some(_) => Some(h.conn),
            },
        };
        self.holders
            .insert(agent.to_owned(), Holder { conn, heard: now });
        Verdict::Serve { overtaken }
    }

    /// With `verify_msg_id`: whether a message with these counters is newer than the last one
    /// accepted from `agent` (and then remembers them). Older or equal: remoted drops it.
    pub fn fresh(&mut self, agent: &str, counters: (u64, u32)) -> bool {
        match self.counters.get(agent) {
            Some(last) if counters <= *last => false,
            _ => {
                self.counters.insert(agent.to_owned(), counters);
                true
            }
        }
    }

    /// The connection that holds `agent`'s key now.
    pub fn holder(&self, agent: &str) -> Option<u64> {
        self.holders.get(agent).map(|h| h.conn)
    }

    /// Connection `conn` closed: every key it held forgets it.
    pub fn closed(&mut self, conn: u64) {
        self.holders.retain(|_, h| h.conn != conn);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_removed_agent_is_refused_on_every_connection() {
        let mut a = Admission::new(Some(OVERTAKE_TIME));
        let t = Instant::now();
        assert_eq!(a.frame("001", 1, t), Verdict::Serve { overtaken: None });
        a.refuse("001");
        assert_eq!(a.frame("001", 1, t), Verdict::Refuse(Refusal::Removed));
        assert_eq!(a.frame("001", 2, t), Verdict::Refuse(Refusal::Removed));
        a.allow("001");
        assert_eq!(a.frame("001", 1, t), Verdict::Serve { overtaken: None });
    }

    #[test]
    fn a_second_connection_is_refused_while_the_first_was_heard_from_recently() {
        let mut a = Admission::new(Some(OVERTAKE_TIME));
        let t = Instant::now();
        assert_eq!(a.frame("001", 1, t), Verdict::Serve { overtaken: None });
        let soon = t + Duration::from_secs(30);
        assert_eq!(a.frame("001", 2, soon), Verdict::Refuse(Refusal::KeyInUse));
        // The incumbent keeps talking: still its key.
        assert_eq!(a.frame("001", 1, soon), Verdict::Serve { overtaken: None });
        let later = soon + OVERTAKE_TIME + Duration::from_secs(1);
        assert_eq!(
            a.frame("001", 2, later),
            Verdict::Serve { overtaken: Some(1) }
        );
        assert_eq!(a.holder("001"), Some(2));
        // The overtaken one is now the newcomer.
        assert_eq!(a.frame("001", 1, later), Verdict::Refuse(Refusal::KeyInUse));
    }

    #[test]
    fn a_closed_connection_frees_the_key_at_once() {
        let mut a = Admission::new(Some(OVERTAKE_TIME));
        let t = Instant::now();
        a.frame("001", 1, t);
        a.frame("002", 1, t);
        a.closed(1);
        assert_eq!(a.holder("001"), None);
        assert_eq!(a.frame("001", 2, t), Verdict::Serve { overtaken: None });
    }

    #[test]
    fn without_overtake_connections_never_refuse_each_other() {
        let mut a = Admission::new(None);
        let t = Instant::now();
        assert_eq!(a.frame("001", 1, t), Verdict::Serve { overtaken: None });
        assert_eq!(a.frame("001", 2, t), Verdict::Serve { overtaken: None });
        assert_eq!(a.holder("001"), Some(1));
    }

    #[test]
    fn misbehaviour_is_per_agent() {
        let mut a = Admission::default();
        let t = Instant::now();
        a.misbehave("013", Misbehave::Garbage);
        assert_eq!(a.frame("013", 1, t), Verdict::Misbehave(Misbehave::Garbage));
        assert_eq!(a.frame("014", 2, t), Verdict::Serve { overtaken: None });
    }

    #[test]
    fn counters_must_grow_per_agent() {
        let mut a = Admission::default();
        assert!(a.fresh("001", (1, 1)));
        assert!(a.fresh("001", (1, 2)));
        assert!(!a.fresh("001", (1, 2)), "replay");
        assert!(!a.fresh("001", (0, 9000)), "older");
        assert!(a.fresh("002", (0, 1)), "another agent");
        assert!(a.fresh("001", (2, 1)));
    }
}
