//! The per-agent session state machine: the state one agent connection keeps about its
//! managers, the events the I/O shell reports, and the actions it must carry out.
//!
//! Nothing here touches a socket, a clock or a shared counter: the shell measures (what the
//! kernel left unacknowledged, the current second, how many managers are in rotation), passes
//! it in with the event, and executes the [`Action`]s that come back in order. The decisions
//! themselves (whose fault the end of a manager connection is, what to re-send, when to give an
//! agent up) are in [`super::decide`]; this module sequences them for one session.
//!
//! Events and where they are handled:
//!
//! | event | handled by | what comes out |
//! | --- | --- | --- |
//! | first frame | [`first_frame`] | the session's key, or the end |
//! | agent frame, manager frame | [`super::check`] (per frame, inlined in the pipes) | forward, or the end |
//! | operator move, drain, hand-over, timer | [`interrupt`] | the end of the current stint |
//! | manager connected | [`Machine::on_connected`] | replay the control frame, arm the reply timer |
//! | manager connect failed | [`Machine::on_connect_failed`], [`hold`] | hold with backoff, or close the agent (at once when this host is out of sockets) |
//! | manager closed / reset / silent / moved | [`cause`], [`Machine::on_stint_end`] | replay, close upstream, counts, reconnect or close |
//!
//! Timers: the reply timer ([`reply_timer`]) and the liveness timer ([`liveness_timer`]) are
//! the two ways a manager that died silently is noticed besides `TCP_USER_TIMEOUT`; when one
//! fires, [`cause`] turns it into [`StintCause::Silent`] with the bytes the manager's TCP left
//! unacknowledged, which [`super::decide::judge`] charges to the manager only if there are any.

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

#[cfg(test)]
use super::decide::GiveUp;
use super::decide::{self, Attempts, Next, StintCause, Verdict};
use super::End;
use crate::envelope::Envelope;
use crate::frame::{self, HEADER_LEN};
use crate::session::{Expiry, SessionKey};
use crate::stats::Rejection;

/// What one agent connection remembers about its managers across stints (one stint: one
/// manager connection). Lives in the connection's allocation; small while nothing went wrong.
#[derive(Debug, Default)]
pub(super) struct Machine {
    /// Managers that registered this agent (answered it) before it moved away: a return to
    /// one of them must not replay the control frame. Empty unless the agent has moved.
    registered_with: Vec<SocketAddr>,
    /// When the current manager connection was made (in [`super::pipe::clock_secs`]: a
    /// second's precision is enough to tell a working session from one that keeps failing).
    stint_started: u32,
    /// Refusals and faults met so far, once there has been one (boxed: most sessions have none).
    trouble: Option<Box<Trouble>>,
}

/// What a session's connection has met from managers (see [`decide::Attempts`]).
#[derive(Debug, Default)]
struct Trouble {
    attempts: Attempts,
    /// Time to hold the agent before the next manager connection.
    hold: Duration,
    /// Managers not to try for it.
    avoid: Vec<SocketAddr>,
}

/// Something the shell must do, in the order given.
#[derive(Debug)]
pub(super) enum Action {
    /// Put frames the old manager never processed back at the front of the agent's pipe, to
    /// be written to the next manager (or let go of the copy, for [`Resend::Nothing`]).
    Replay(Resend),
    /// Close the connection to the old manager; `failed`: report it to passive health.
    CloseUpstream {
        /// The manager is unreachable (the only verdict that marks it failed).
        failed: bool,
    },
    /// A manager served this agent: forget that every manager once refused it.
    ForgetRefusal,
    /// Add one to a listener counter.
    Count(Metric),
    /// Drop partial frames both ways: the rest of a frame whose start went to the old manager,
    /// and the start of one the old manager never finished.
    DropPartials,
    /// Count the frames the old manager's TCP acknowledged but its process may have lost.
    CountAtRisk,
    /// Log the end of the stint.
    Log(Note),
    /// Find the next manager (after the hold [`Machine::next_connect`] gives).
    Connect,
    /// Close the agent's connection.
    CloseAgent(End),
}

/// What a failover re-sends to the next manager.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Resend {
    /// Nothing: the old manager acknowledged everything (a planned move). The copy is cleared.
    Nothing,
    /// Every frame kept: the manager processed none (it refused the agent).
    All,
    /// The frames the old manager's TCP never acknowledged (the shell asks the kernel).
    Unacknowledged,
}

/// Listener counters the machine asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Metric {
    /// A planned move.
    Moves,
    /// The agent continued on another manager after an unplanned end.
    Failovers,
    /// A manager refused the agent.
    ManagerRefusals,
    /// A manager ended a session it served.
    ManagerCloses,
    /// A protocol failure, by its label.
    Reject(Rejection),
}

/// The log line of a stint's end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Note {
    /// Warning: the manager failed; the agent moves.
    ManagerFailed,
    /// Information: the manager ended the session (or broke the protocol); it stays in rotation.
    ManagerEnded,
    /// Debug: the manager refused the agent (one refused agent must not fill the log).
    Refused,
    /// Nothing beyond the move counter.
    Quiet,
}

/// A short list of actions, kept inline (a stint's end yields at most [`MAX_ACTIONS`]).
#[derive(Debug, Default)]
pub(super) struct Actions {
    list: [Option<Action>; MAX_ACTIONS],
    len: usize,
}

/// The most actions one event yields.
const MAX_ACTIONS: usize = 10;

impl Actions {
    fn push(&mut self, action: Action) {
        if let Some(slot) = self.list.get_mut(self.len) {
            *slot = Some(action);
            self.len += 1;
        }
    }

    /// The actions, in order.
    #[cfg(test)]
    pub(super) fn iter(&self) -> impl Iterator<Item = &Action> {
        self.list.iter().flatten()
    }
}

impl IntoIterator for Actions {
    type Item = Action;
    type IntoIter = std::iter::Flatten<std::array::IntoIter<Option<Action>, MAX_ACTIONS>>;
    fn into_iter(self) -> Self::IntoIter {
        self.list.into_iter().flatten()
    }
}

/// The end of a stint as the shell saw it.
#[derive(Debug, Clone, Copy)]
pub(super) struct StintEnd {
    /// What ended it (from [`cause`]).
    pub cause: StintCause,
    /// The manager sent the agent at least one frame during the stint.
    pub answered: bool,
    /// The manager of the stint.
    pub manager: SocketAddr,
    /// Managers in rotation now (not `down`).
    pub managers: usize,
    /// The current second (of [`super::pipe::clock_secs`]).
    pub now_secs: u32,
}

/// What to do with a new manager connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Attached {
    /// Write the control frame (startup, or the latest keepalive) before any other frame.
    pub replay_first: bool,
    /// The manager owes an answer: arm the reply timer.
    pub awaiting_reply: bool,
}

/// The hold before the next manager connection and the managers to avoid.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(super) struct ConnectPlan {
    /// Time to hold the agent first.
    pub hold: Duration,
    /// Managers that refused the agent on this connection.
    pub avoid: Vec<SocketAddr>,
}

impl Machine {
    /// A new session's state, its first stint starting at `now_secs`.
    pub(super) fn new(now_secs: u32) -> Self {
        Machine {
            registered_with: Vec::new(),
            stint_started: now_secs,
            trouble: None,
        }
    }

    /// The hold and the managers to avoid before connecting (taken: used once).
    pub(super) fn next_connect(&mut self) -> ConnectPlan {
        match self.trouble.as_deref_mut() {
            Some(t) => ConnectPlan {
                hold: std::mem::take(&mut t.hold),
                avoid: std::mem::take(&mut t.avoid),
            },
            None => ConnectPlan::default(),
        }
    }

    /// Event: a manager connection is made to `addr`. `previous`: the manager the session was
    /// on (none at its start); `adopted`: the session came from a previous process;
    /// `replay_resent`: the frames re-sent from the last manager already hold the control
    /// frame.
    pub(super) fn on_connected(
        &mut self,
        addr: SocketAddr,
        previous: Option<SocketAddr>,
        adopted: bool,
        replay_resent: bool,
        now_secs: u32,
    ) -> Attached {
        // A new manager gets the control frame that registers the agent before any newer
        // frame: after a hand-over from a previous process, and after a move to a manager
        // that has not registered this agent yet (never twice: a duplicate may close the
        // connection).
        let replay_first = match previous {
            None => adopted,
            Some(_) => !self.registered_with.contains(&addr),
        } && !replay_resent;
        self.stint_started = now_secs;
        Attached {
            replay_first,
            awaiting_reply: replay_first || previous.is_none(),
        }
    }

    /// Event: no manager could be reached within the hold time, or (`out_of_sockets`) this
    /// host could not open a connection to any: the managers are not at fault and the agent is
    /// closed at once (its end is counted as `out_of_sockets`).
    pub(super) fn on_connect_failed(out_of_sockets: bool) -> Actions {
        let mut out = Actions::default();
        if out_of_sockets {
            out.push(Action::CloseAgent(End::OutOfSockets));
        } else {
            out.push(Action::Count(Metric::Reject(Rejection::NoBackend)));
            out.push(Action::CloseAgent(End::NoManager));
        }
        out
    }

    /// Event: the stint on `end.manager` ended for `end.cause` (with failover on; without it
    /// every end of a stint ends the session). Returns what to do, in order.
    pub(super) fn on_stint_end(&mut self, end: StintEnd) -> Actions {
        let mut out = Actions::default();
        let verdict = decide::judge(end.cause, end.answered);
        // What the old manager never received goes to the next one: nothing, after a move
        // (it was left at a boundary, everything acknowledged); every kept frame after a
        // refusal (it processed none); otherwise the frames its TCP never acknowledged.
        out.push(Action::Replay(match verdict {
            Verdict::Moved => Resend::Nothing,
            Verdict::AgentRefused => Resend::All,
            _ => Resend::Unacknowledged,
        }));
        out.push(Action::CloseUpstream {
            failed: verdict == Verdict::ManagerFailed,
        });
        if end.answered {
            out.push(Action::ForgetRefusal);
        }
        if end.answered && verdict != Verdict::Ended {
            // It registered the agent: a later return to it must not replay the frame.
            if !self.registered_with.contains(&end.manager) {
                self.registered_with.push(end.manager);
            }
        } else {
            // It did not register the agent, or dropped it (remoted forgets an agent's reply
            // socket with its connection): a later return to it needs the frame again.
            self.registered_with.retain(|a| *a != end.manager);
        }
        match verdict {
            Verdict::Moved => out.push(Action::Count(Metric::Moves)),
            Verdict::ManagerFailed => out.push(Action::Count(Metric::Failovers)),
            Verdict::AgentRefused => out.push(Action::Count(Metric::ManagerRefusals)),
            Verdict::Ended => {
                // The agent is kept and reconnected: a failover, though not the manager's
                // failure (the connect attempt tells whether it is down).
                out.push(Action::Count(Metric::ManagerCloses));
                out.push(Action::Count(Metric::Failovers));
            }
            // Counted; the manager stays available.
            Verdict::SessionFault => {
                out.push(Action::Count(Metric::Reject(Rejection::ManagerProtocol)))
            }
        }
        // Every kind of move drops partial frames, both ways.
        out.push(Action::DropPartials);
        // A manager that refused the agent processed none of its frames (every kept one is
        // re-sent): nothing is at risk there, nor after a move.
        let note = match verdict {
            Verdict::Moved => Note::Quiet,
            Verdict::AgentRefused => Note::Refused,
            Verdict::ManagerFailed => Note::ManagerFailed,
            Verdict::Ended | Verdict::SessionFault => Note::ManagerEnded,
        };
        if matches!(note, Note::ManagerFailed | Note::ManagerEnded) {
            out.push(Action::CountAtRisk);
        }
        out.push(Action::Log(note));
        let lasted =
            Duration::from_secs(u64::from(end.now_secs.saturating_sub(self.stint_started)));
        let trouble = self.trouble.get_or_insert_with(Box::default);
        match trouble
            .attempts
            .after(verdict, end.manager, lasted, end.managers)
        {
            Next::Reconnect { pause, avoid } => {
                trouble.hold = pause;
                trouble.avoid = avoid;
                out.push(Action::Connect);
            }
            Next::GiveUp(why) => out.push(Action::CloseAgent(End::Refused(why))),
        }
        out
    }
}

/// Event: the agent's first bytes (`buf`, from the start of the connection). `Ok(None)`: no
/// whole frame yet, read more; `Ok(Some((key, len)))`: the session's key (the agent, or its
/// source address when the frame carries no ID) and the first frame's length.
pub(super) fn first_frame(
    buf: &[u8],
    max_payload: u32,
    peer: IpAddr,
) -> Result<Option<(SessionKey, usize)>, End> {
    match frame::check(buf, max_payload) {
        Ok(Some(total)) => match Envelope::parse(&buf[HEADER_LEN..total]) {
            Ok(env) => Ok(Some((
                env.agent_id()
                    .map_or(SessionKey::Source(peer), SessionKey::Agent),
                total,
            ))),
            Err(e) => Err(End::AgentEnvelope(e)),
        },
        Ok(None) => Ok(None),
        Err(e) => Err(End::AgentFrame(e)),
    }
}

/// What the session's flags ask of the stint in progress (checked on every wake-up).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(super) struct Interrupts {
    /// The proxy closes the session (replaced, drain's end, shutdown).
    pub closing: bool,
    /// Sessions are being handed to the next process.
    pub handover: bool,
    /// The operator asked the session to move (drain, rebalance), with failover on.
    pub move_requested: bool,
    /// A timer fired.
    pub expired: Option<Expiry>,
}

/// Event: operator command or timer. The end of the stint it asks for, if any, by priority.
#[inline]
pub(super) fn interrupt(a: Interrupts) -> Option<End> {
    if a.closing {
        return Some(End::Closed);
    }
    if a.handover {
        return Some(End::HandedOver);
    }
    if a.move_requested {
        return Some(End::Moved);
    }
    match a.expired {
        Some(Expiry::Idle) => Some(End::Idle),
        Some(Expiry::Reply) => Some(End::ManagerTimeout),
        None => None,
    }
}

/// What the end of a stint says about the manager connection, or `None` when the session
/// itself ends (the agent closed or broke a rule, the proxy closed it). `unacked` is asked only
/// when the manager was silent: bytes its TCP has not acknowledged (`Err`: cannot tell).
pub(super) fn cause<E>(end: &End, unacked: impl FnOnce() -> Result<u32, E>) -> Option<StintCause> {
    use std::io::ErrorKind;
    Some(match end {
        End::ManagerClosed => StintCause::Closed,
        End::ManagerIo(e) => match e.kind() {
            ErrorKind::TimedOut | ErrorKind::HostUnreachable | ErrorKind::NetworkUnreachable => {
                StintCause::Unreachable
            }
            _ => StintCause::Closed,
        },
        End::ManagerTimeout => StintCause::Silent {
            // Unknown counts as unacknowledged: a socket that cannot be asked is not healthy.
            unacked: unacked().unwrap_or(u32::MAX),
        },
        End::ManagerProtocol(_) => StintCause::Protocol,
        End::Moved => StintCause::Moved,
        _ => return None,
    })
}

/// A planned move, once the frame being written is complete (`Ok(unacked)`: what the old
/// manager's TCP still had not acknowledged after the wait; `Err`: finishing the frame failed).
/// A manager moved away from because it stopped answering is a failure, and what it never
/// acknowledged goes to the next one.
pub(super) fn settle_move(finished: std::io::Result<u32>) -> StintCause {
    match finished {
        Ok(0) => StintCause::Moved,
        Ok(unacked) => StintCause::Silent { unacked },
        Err(e) => {
            cause(&End::ManagerIo(e), || Ok::<u32, ()>(u32::MAX)).unwrap_or(StintCause::Closed)
        }
    }
}

/// Event: a connect attempt failed while holding the agent. The pause before the next one
/// and the one after it (doubling up to 2 s), or `None` to give up: failover off, or past the hold `deadline`
/// (`now` and `deadline` on one clock).
pub(super) fn hold(
    failover: bool,
    pause: Duration,
    now: Instant,
    deadline: Instant,
) -> Option<(Duration, Duration)> {
    if !failover || now + pause > deadline {
        return None;
    }
    Some((pause, (pause * 2).min(MAX_HOLD_PAUSE)))
}

/// The first pause between connect attempts while no manager can be reached.
pub(super) const FIRST_HOLD_PAUSE: Duration = Duration::from_millis(250);
/// The longest pause between connect attempts while holding.
const MAX_HOLD_PAUSE: Duration = Duration::from_secs(2);

/// The reply timer to arm when a stint starts: a manager handed the agent's startup (or a
/// replayed keepalive) owes an answer within the reply timeout, with failover on.
pub(super) fn reply_timer(
    awaiting_reply: bool,
    failover: bool,
    reply_timeout: Option<Duration>,
) -> Option<Duration> {
    reply_timeout.filter(|_| awaiting_reply && failover)
}

/// The liveness timer to arm (unless one is armed) when agent frames went up: remoted answers
/// keepalives, so a manager that sends nothing back for this long while the agent keeps
/// sending is hung.
#[inline]
pub(super) fn liveness_timer(
    up: bool,
    failover: bool,
    liveness_timeout: Option<Duration>,
) -> Option<Duration> {
    if up && failover {
        liveness_timeout
    } else {
        None
    }
}

/// Frames acknowledged by the old manager's TCP and perhaps lost with its process: those
/// written in the last second or two (`recent`) that were not re-sent, the frame cut in the
/// middle, and those let go unprotected while the copy was over its bound.
pub(super) fn at_risk(recent: u64, resent: u64, cut: u64, unprotected: u32) -> u64 {
    recent.saturating_sub(resent) + cut + u64::from(unprotected)
}

/// Whether `frames` (whole frames from the front) holds one whose payload is `payload` (the
/// re-sent frames already carry the control frame: it is not replayed twice).
pub(super) fn holds_frame(frames: &[u8], payload: &[u8]) -> bool {
    let mut at = 0;
    while let Some(header) = frames.get(at..).and_then(|b| b.first_chunk::<HEADER_LEN>()) {
        let end = at + HEADER_LEN + u32::from_le_bytes(*header) as usize;
        match frames.get(at + HEADER_LEN..end) {
            Some(p) if p == payload => return true,
            Some(_) => at = end,
            None => return false,
        }
    }
    false
}

/// Why an agent's connection was given up, as the end of its session.
#[cfg(test)]
pub(super) fn gave_up(actions: &Actions) -> Option<GiveUp> {
    actions.iter().find_map(|a| match a {
        Action::CloseAgent(End::Refused(why)) => Some(*why),
        _ => None,
    })
}

#[cfg(test)]
mod tests;
