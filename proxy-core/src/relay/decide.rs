//! The relay's per-session decisions, free of sockets and clocks: whose fault the end of a
//! manager connection is, what an agent's connection does next, how long an agent that every
//! manager refused is kept away, and whether a second connection may take an agent's place.
//!
//! Everything here takes the state, the event and the time, and returns what to do; the relay's
//! I/O shell only carries it out. That keeps the rule that matters most testable without a
//! socket: **a fault is charged to the smallest thing it belongs to**. A manager that closes one
//! agent's connection (remoted does so for an unknown or removed ID, a source address the key does
//! not allow, a key that does not decrypt, "Agent key already in use") has refused that agent, not
//! failed; only a manager that cannot be connected to, whose TCP stops acknowledging, or that
//! fails an active health check is marked failed, and only that affects `/health`.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use crate::session::SessionKey;

/// How a connection to a manager (one "stint" of a session) ended, as the relay saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum StintCause {
    /// The manager closed the connection (FIN) or reset it.
    Closed,
    /// The manager's TCP stopped acknowledging what was sent (`TCP_USER_TIMEOUT`, keepalive
    /// probes unanswered, host or network unreachable): the manager or the path to it is gone.
    Unreachable,
    /// The manager sent nothing back in time although it owed an answer. `unacked`: bytes
    /// written to it that its TCP had not acknowledged when the time ran out.
    Silent {
        /// Bytes its kernel had not acknowledged.
        unacked: u32,
    },
    /// The manager sent something that is not a frame for an agent (never forwarded).
    Protocol,
    /// The proxy moved the session on purpose (drain, rebalance).
    Moved,
}

/// Whose fault the end of a stint is, and so what it may affect.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// The manager is unreachable: mark it failed (passive health, as nginx does for a refused
    /// connect) and continue the agent elsewhere.
    ManagerFailed,
    /// The manager refused this agent (closed it before answering it, or never answered it
    /// while acknowledging everything): try the other managers; this manager stays available.
    AgentRefused,
    /// The manager ended a session it had been serving (a restart, or a per-agent close such as
    /// a removed key): reconnect; the connect attempt says whether the manager is down.
    Ended,
    /// The manager broke the protocol on this session: this upstream is closed and counted;
    /// the manager stays available.
    SessionFault,
    /// A planned move.
    Moved,
}

/// Judges the end of a stint. `answered`: the manager sent the agent at least one frame
/// during it.
pub(crate) fn judge(cause: StintCause, answered: bool) -> Verdict {
    match cause {
        StintCause::Moved => Verdict::Moved,
        StintCause::Unreachable => Verdict::ManagerFailed,
        // Its TCP holds bytes it never acknowledged: the manager (or the path) is dead.
        StintCause::Silent { unacked } if unacked > 0 => Verdict::ManagerFailed,
        // Everything acknowledged, nothing answered: remoted drops messages it will not serve
        // (a replayed counter, for one) without closing; that is about this agent.
        StintCause::Silent { .. } => Verdict::AgentRefused,
        StintCause::Protocol => Verdict::SessionFault,
        StintCause::Closed if answered => Verdict::Ended,
        StintCause::Closed => Verdict::AgentRefused,
    }
}

/// What an agent's connection does after a stint ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Next {
    /// Connect again after `pause`, avoiding the managers in `avoid` while others remain.
    Reconnect {
        /// Time to wait first.
        pause: Duration,
        /// Managers that refused this agent on this connection.
        avoid: Vec<SocketAddr>,
    },
    /// Close the agent's connection: every manager refused it, or its sessions keep failing.
    GiveUp(GiveUp),
}

/// Why an agent's connection was given up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum GiveUp {
    /// Every available manager refused the agent.
    RefusedEverywhere,
    /// Managers kept breaking the protocol on this session.
    RepeatedFaults,
}

/// Refusals by one manager tolerated on one agent connection (with a pause between them:
/// remoted refuses an agent whose previous connection it still holds for a while).
pub(super) const REFUSALS_PER_MANAGER: u32 = 3;
/// The first pause once every manager has refused the agent; doubles per round.
const REFUSAL_PAUSE: Duration = Duration::from_millis(500);
/// Session faults tolerated on one agent connection before it is closed.
const MAX_SESSION_FAULTS: u32 = 3;
/// Stints served and then ended by the manager in a row before reconnecting is paced.
const FREE_REDIALS: u32 = 1;
/// A stint longer than this was a working session: counters of trouble start again.
const HEALTHY_STINT: Duration = Duration::from_secs(30);

/// The trouble one agent connection has had with managers: which refused it and how often,
/// how many times they broke the protocol or dropped it. Bounded: at most one entry per manager.
#[derive(Debug, Default, Clone)]
pub(crate) struct Attempts {
    refused_by: Vec<(SocketAddr, u32)>,
    faults: u32,
    redials: u32,
}

impl Attempts {
    /// Managers not to try next: those that refused while some have not; else those that
    /// refused more often than the others, or as often as tolerated (so the tries alternate).
    fn avoid(&self, managers: usize) -> Vec<SocketAddr> {
        let all_refused = self.refused_by.len() >= managers;
        let least = self.refused_by.iter().map(|(_, n)| *n).min().unwrap_or(0);
        self.refused_by
            .iter()
            .filter(|(_, n)| !all_refused || *n >= REFUSALS_PER_MANAGER || *n > least)
            .map(|(a, _)| *a)
            .collect()
    }

    /// Decides what follows a stint on `manager` that lasted `lasted` and ended with `verdict`.
    /// `managers` is the number of managers the agent could be sent to now (not `down`).
    pub(crate) fn after(
        &mut self,
        verdict: Verdict,
        manager: SocketAddr,
        lasted: Duration,
        managers: usize,
    ) -> Next {
        if lasted >= HEALTHY_STINT {
            self.faults = 0;
            self.redials = 0;
        }
        let pause = match verdict {
            // A move (drain, rebalance) says nothing about who refused this agent: the
            // refusals still count, so the bound on tries holds across moves.
            Verdict::Moved => Duration::ZERO,
            Verdict::ManagerFailed => Duration::ZERO,
            Verdict::AgentRefused => {
                let managers = managers.max(1);
                match self.refused_by.iter_mut().find(|(a, _)| *a == manager) {
                    Some((_, n)) => *n += 1,
                    None => self.refused_by.push((manager, 1)),
                }
                let exhausted = self
                    .refused_by
                    .iter()
                    .filter(|(_, n)| *n >= REFUSALS_PER_MANAGER)
                    .count();
                if exhausted >= managers {
                    return Next::GiveUp(GiveUp::RefusedEverywhere);
                }
                if self.refused_by.len() < managers {
                    // Another manager has not refused it yet: go there at once.
                    Duration::ZERO
                } else {
                    let round = self.refused_by.iter().map(|(_, n)| *n).min().unwrap_or(1);
                    REFUSAL_PAUSE.saturating_mul(1 << round.saturating_sub(1).min(4))
                }
            }
            Verdict::SessionFault => {
                self.faults += 1;
                if self.faults >= MAX_SESSION_FAULTS {
                    return Next::GiveUp(GiveUp::RepeatedFaults);
                }
                Duration::from_millis(250 << self.faults.min(4))
            }
            Verdict::Ended => {
                // It was served: earlier refusals (say, a key that had not reached a worker
                // yet) are history.
                self.refused_by.clear();
                self.redials += 1;
                if self.redials <= FREE_REDIALS {
                    Duration::ZERO
                } else {
                    Duration::from_millis(250 << (self.redials - FREE_REDIALS).min(4))
                }
            }
        };
        Next::Reconnect {
            pause,
            avoid: self.avoid(managers.max(1)),
        }
    }
}

/// Agents every manager refused, kept away for a while so that a removed agent that keeps
/// running does not make the managers refuse it over and over: the proxy answers its
/// reconnections itself (by closing them) until its time is up, with exponential backoff.
///
/// Keyed by agent and source address, so a connection that only claims an agent's ID from
/// elsewhere never keeps the real agent away. Bounded: at most `capacity` entries; when full,
/// expired entries are dropped, and if none are, a new agent is not remembered (the proxy then
/// behaves like a plain TCP proxy for it).
#[derive(Debug)]
pub(crate) struct RefusalBook {
    entries: HashMap<(SessionKey, IpAddr), Backoff>,
    capacity: usize,
    base: Duration,
    max: Duration,
}

#[derive(Debug, Clone, Copy)]
struct Backoff {
    until: Instant,
    level: u32,
    last: Instant,
}

impl RefusalBook {
    /// A book of at most `capacity` agents, keeping each away `base`, doubling per refusal in
    /// a row up to `max`.
    pub(crate) fn new(capacity: usize, base: Duration, max: Duration) -> Self {
        RefusalBook {
            entries: HashMap::new(),
            capacity,
            base,
            max: max.max(base),
        }
    }

    /// Agents remembered.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether no agent is remembered.
    pub(crate) fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Agents that must still stay away at `now`.
    pub(crate) fn waiting(&self, now: Instant) -> usize {
        self.entries.values().filter(|b| b.until > now).count()
    }

    /// How long the agent must still stay away, if it must.
    pub(crate) fn wait(&self, key: SessionKey, ip: IpAddr, now: Instant) -> Option<Duration> {
        let b = self.entries.get(&(key, ip))?;
        (b.until > now).then(|| b.until - now)
    }

    /// Records that every manager refused the agent; returns how long it is kept away.
    pub(crate) fn refused(&mut self, key: SessionKey, ip: IpAddr, now: Instant) -> Duration {
        if self.entries.len() >= self.capacity && !self.entries.contains_key(&(key, ip)) {
            self.entries.retain(|_, b| b.until > now);
            if self.entries.len() >= self.capacity {
                return Duration::ZERO;
            }
        }
        let (base, max) = (self.base, self.max);
        let b = self.entries.entry((key, ip)).or_insert(Backoff {
            until: now,
            level: 0,
            last: now,
        });
        // A refusal long after the previous one starts the backoff again.
        if now.saturating_duration_since(b.last) > max * 4 {
            b.level = 0;
        }
        let wait = base.saturating_mul(1u32 << b.level.min(16)).min(max);
        b.level = b.level.saturating_add(1);
        b.until = now + wait;
        b.last = now;
        wait
    }

    /// Forgets the agent (a manager served it).
    pub(crate) fn served(&mut self, key: SessionKey, ip: IpAddr) {
        self.entries.remove(&(key, ip));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(n: u8) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, n], 1514))
    }

    #[test]
    fn a_close_before_any_answer_is_the_agents_refusal_not_a_manager_failure() {
        assert_eq!(judge(StintCause::Closed, false), Verdict::AgentRefused);
        assert_eq!(judge(StintCause::Closed, true), Verdict::Ended);
        assert_eq!(judge(StintCause::Protocol, true), Verdict::SessionFault);
        assert_eq!(judge(StintCause::Protocol, false), Verdict::SessionFault);
        assert_eq!(judge(StintCause::Unreachable, true), Verdict::ManagerFailed);
        assert_eq!(
            judge(StintCause::Silent { unacked: 120 }, false),
            Verdict::ManagerFailed
        );
        assert_eq!(
            judge(StintCause::Silent { unacked: 0 }, false),
            Verdict::AgentRefused
        );
        assert_eq!(judge(StintCause::Moved, true), Verdict::Moved);
    }

    #[test]
    fn an_agent_refused_by_every_manager_is_given_up_after_a_bounded_number_of_tries() {
        let mut a = Attempts::default();
        // Refused by the first: the other one at once.
        assert_eq!(
            a.after(Verdict::AgentRefused, addr(1), Duration::ZERO, 2),
            Next::Reconnect {
                pause: Duration::ZERO,
                avoid: vec![addr(1)]
            }
        );
        // Refused by both: rounds with a growing pause.
        let mut pauses = Vec::new();
        let mut tries = 1;
        loop {
            let m = if tries % 2 == 0 { addr(1) } else { addr(2) };
            tries += 1;
            match a.after(Verdict::AgentRefused, m, Duration::ZERO, 2) {
                Next::Reconnect { pause, avoid } => {
                    assert!(avoid.len() < 2, "never both avoided");
                    pauses.push(pause);
                }
                Next::GiveUp(why) => {
                    assert_eq!(why, GiveUp::RefusedEverywhere);
                    break;
                }
            }
            assert!(tries < 20, "bounded");
        }
        assert_eq!(tries as u32, 2 * REFUSALS_PER_MANAGER);
        assert!(pauses.iter().all(|p| !p.is_zero()));
        assert!(pauses.windows(2).all(|w| w[0] <= w[1]));
        // One manager: refused as often as tolerated, then given up.
        let mut one = Attempts::default();
        for _ in 1..REFUSALS_PER_MANAGER {
            assert!(matches!(
                one.after(Verdict::AgentRefused, addr(1), Duration::ZERO, 1),
                Next::Reconnect { .. }
            ));
        }
        assert_eq!(
            one.after(Verdict::AgentRefused, addr(1), Duration::ZERO, 1),
            Next::GiveUp(GiveUp::RefusedEverywhere)
        );
    }

    #[test]
    fn service_clears_refusals_and_repeated_faults_give_up() {
        let mut a = Attempts::default();
        a.after(Verdict::AgentRefused, addr(1), Duration::ZERO, 2);
        assert_eq!(
            a.after(Verdict::Ended, addr(2), Duration::from_secs(1), 2),
            Next::Reconnect {
                pause: Duration::ZERO,
                avoid: vec![]
            }
        );
        // Served then dropped again at once: paced.
        match a.after(Verdict::Ended, addr(2), Duration::from_secs(1), 2) {
            Next::Reconnect { pause, .. } => assert!(pause > Duration::ZERO),
            other => panic!("{other:?}"),
        }
        let mut f = Attempts::default();
        for _ in 0..MAX_SESSION_FAULTS - 1 {
            assert!(matches!(
                f.after(Verdict::SessionFault, addr(1), Duration::ZERO, 2),
                Next::Reconnect { .. }
            ));
        }
        assert_eq!(
            f.after(Verdict::SessionFault, addr(1), Duration::ZERO, 2),
            Next::GiveUp(GiveUp::RepeatedFaults)
        );
        // A long healthy stint forgives earlier faults.
        let mut g = Attempts::default();
        g.after(Verdict::SessionFault, addr(1), Duration::ZERO, 2);
        g.after(Verdict::SessionFault, addr(1), Duration::ZERO, 2);
        assert!(matches!(
            g.after(Verdict::SessionFault, addr(1), HEALTHY_STINT, 2),
            Next::Reconnect { .. }
        ));
    }

    #[test]
    fn moves_do_not_reset_the_bound_on_refusals() {
        let mut a = Attempts::default();
        let mut given_up = false;
        for i in 0..20 {
            // A rebalance moves the refused agent between tries.
            assert!(matches!(
                a.after(Verdict::Moved, addr(2), Duration::ZERO, 2),
                Next::Reconnect { .. }
            ));
            let m = if i % 2 == 0 { addr(1) } else { addr(2) };
            if let Next::GiveUp(_) = a.after(Verdict::AgentRefused, m, Duration::ZERO, 2) {
                given_up = true;
                assert!(i < 2 * REFUSALS_PER_MANAGER as usize);
                break;
            }
        }
        assert!(given_up);
    }

    #[test]
    fn a_manager_failure_never_counts_as_a_refusal() {
        let mut a = Attempts::default();
        for _ in 0..10 {
            assert_eq!(
                a.after(Verdict::ManagerFailed, addr(1), Duration::ZERO, 1),
                Next::Reconnect {
                    pause: Duration::ZERO,
                    avoid: vec![]
                }
            );
        }
    }

    #[test]
    fn refusal_book_backs_off_per_agent_and_source() {
        let t0 = Instant::now();
        let id = SessionKey::Agent(crate::envelope::AgentId::parse(b"666").unwrap());
        let ip: IpAddr = "192.0.2.1".parse().unwrap();
        let other: IpAddr = "192.0.2.2".parse().unwrap();
        let mut book = RefusalBook::new(2, Duration::from_secs(2), Duration::from_secs(60));
        assert_eq!(book.wait(id, ip, t0), None);
        assert_eq!(book.refused(id, ip, t0), Duration::from_secs(2));
        assert_eq!(book.wait(id, ip, t0), Some(Duration::from_secs(2)));
        // Someone claiming the ID from elsewhere is not the agent.
        assert_eq!(book.wait(id, other, t0), None);
        let t1 = t0 + Duration::from_secs(3);
        assert_eq!(book.wait(id, ip, t1), None);
        assert_eq!(book.refused(id, ip, t1), Duration::from_secs(4));
        let mut t = t1;
        for _ in 0..10 {
            t += Duration::from_secs(1);
            book.refused(id, ip, t);
        }
        assert_eq!(book.refused(id, ip, t), Duration::from_secs(60));
        book.served(id, ip);
        assert_eq!(book.wait(id, ip, t), None);
        // Bounded: a third agent while two are kept away is not remembered.
        let k = |s: &[u8]| SessionKey::Agent(crate::envelope::AgentId::parse(s).unwrap());
        book.refused(k(b"1"), ip, t);
        book.refused(k(b"2"), ip, t);
        assert_eq!(book.refused(k(b"3"), ip, t), Duration::ZERO);
        assert_eq!(book.len(), 2);
        // Once they expire, room is made.
        assert!(book.refused(k(b"3"), ip, t + Duration::from_secs(120)) > Duration::ZERO);
    }
}
