//! The relay's frame pipes and session state machine, driven without sockets, for the fuzz
//! targets (`fuzz/fuzz_targets/pipe.rs`). Not a stable API.
//!
//! [`Pipes`] holds both directions of one agent session as the relay does, with a simulated
//! kernel in place of the sockets: bytes arrive in arbitrary chunks, leave in arbitrary writes,
//! the manager's TCP acknowledges arbitrary amounts, and the session moves or fails over at
//! arbitrary points, carried out as the I/O shell carries out the state machine's actions.
//! Every call checks the invariants and panics (a fuzz finding) when one breaks.

use bytes::BytesMut;

use super::check::{check_agent_prefix, check_manager_frame};
use super::decide::{StintCause, REFUSALS_PER_MANAGER};
use super::machine::{Action, Machine, Resend, StintEnd};
use super::pipe::Pipe;
use super::unacked::{Unacked, KEEP_MAX};
use crate::frame::{self, HEADER_LEN};
use crate::session::SessionKey;

/// Bytes a direction may hold before the relay stops reading (as in the steady state).
const HIGH_WATER: usize = 128 * 1024;

/// How a session leaves its manager.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Switch {
    /// A planned move (drain, rebalance): the frame being written is finished first.
    Move,
    /// The manager died; its TCP left this many of the bytes it was sent unacknowledged
    /// (capped at what it can have left).
    Failover(usize),
    /// The manager refused the agent: everything kept goes again.
    Refused,
}

/// Both directions of one session, with what each side received.
#[derive(Debug)]
pub struct Pipes {
    key: SessionKey,
    max: u32,
    up: Pipe,
    down: Pipe,
    copy: Unacked,
    /// Bytes written to the current manager, and how many of them its TCP has not
    /// acknowledged (at most: what it last reported plus what was written since).
    to_manager: Vec<u8>,
    outstanding: usize,
    /// Frames the managers processed, in order, and frames the relay accepted from the agent.
    processed: Vec<Vec<u8>>,
    accepted: Vec<Vec<u8>>,
    /// Bytes delivered to the agent.
    to_agent: Vec<u8>,
    /// Frames may have been let go (the copy's bound, a cut frame): loss is then allowed.
    lossy: bool,
    agent_failed: bool,
}

impl Pipes {
    /// A session of agent `id` (`None`: an ID-less, source-keyed one), payloads up to `max`.
    pub fn new(id: Option<crate::envelope::AgentId>, max: u32) -> Self {
        Pipes {
            key: id.map_or(SessionKey::Source([192, 0, 2, 1].into()), SessionKey::Agent),
            max: max.clamp(1, frame::MAX_PAYLOAD),
            up: Pipe::default(),
            down: Pipe::default(),
            copy: Unacked::default(),
            to_manager: Vec::new(),
            outstanding: 0,
            processed: Vec::new(),
            accepted: Vec::new(),
            to_agent: Vec::new(),
            lossy: false,
            agent_failed: false,
        }
    }

    /// The agent sent `chunk` (ignored once the agent broke a rule, or while the relay would
    /// not read: the pipe is at its high-water mark).
    pub fn agent_bytes(&mut self, chunk: &[u8]) {
        if self.agent_failed || self.up.failed.is_some() || self.up.buf.len() >= HIGH_WATER {
            return;
        }
        let from = self.up.ready;
        self.up.buf.extend_from_slice(chunk);
        let key = self.key;
        self.up
            .take_frames(self.max, |p| check_agent_prefix(key, p));
        let mut at = from;
        while at < self.up.ready {
            let total = frame_len(&self.up.buf[at..]);
            self.accepted
                .push(self.up.buf[at + HEADER_LEN..at + total].to_vec());
            at += total;
        }
        if self.up.failed.is_some() {
            self.agent_failed = true;
        }
        self.check_bounds();
    }

    /// The manager sent `chunk`; a manager that broke the protocol is failed over.
    pub fn manager_bytes(&mut self, chunk: &[u8]) {
        if self.down.buf.len() >= HIGH_WATER {
            return;
        }
        self.down.buf.extend_from_slice(chunk);
        self.down.take_frames(self.max, check_manager_frame);
        if self.down.failed.is_some() {
            self.write_down(usize::MAX);
            let unacked = self.outstanding;
            self.switch(Switch::Failover(unacked));
        }
        self.check_bounds();
    }

    /// Up to `n` ready bytes are written to the manager.
    pub fn write_up(&mut self, n: usize) {
        let n = n.min(self.up.ready);
        if n == 0 {
            return;
        }
        self.to_manager.extend_from_slice(&self.up.buf[..n]);
        self.outstanding += n;
        self.copy.record(&self.up.buf[..n]);
        let done = self.up.consume(n);
        self.up.note_written(done);
        self.check_bounds();
    }

    /// Up to `n` ready bytes are written to the agent; it always receives whole frames.
    pub fn write_down(&mut self, n: usize) {
        let n = n.min(self.down.ready);
        self.to_agent.extend_from_slice(&self.down.buf[..n]);
        self.down.consume(n);
    }

    /// The manager's TCP reports `left` bytes still unacknowledged.
    pub fn kernel_reports(&mut self, left: usize) {
        self.outstanding = self.outstanding.min(left);
        self.copy.trim(self.outstanding);
    }

    /// The session leaves its manager, as the shell carries out the state machine's actions.
    pub fn switch(&mut self, how: Switch) {
        let written = self.to_manager.len();
        let (cause, answered) = match how {
            Switch::Move => {
                // The shell finishes the frame being written first.
                let rest = self.up.head_left.min(self.up.ready);
                self.write_up(rest);
                assert_eq!(self.up.head_left, 0, "a move left a frame half written");
                (StintCause::Moved, true)
            }
            Switch::Failover(_) => (StintCause::Unreachable, true),
            Switch::Refused => (StintCause::Closed, false),
        };
        let unacked = match how {
            Switch::Failover(n) => n.min(self.outstanding),
            _ => 0,
        };
        let mut machine = Machine::new(0);
        let actions = machine.on_stint_end(StintEnd {
            cause,
            answered,
            manager: ([10, 0, 0, 1], 1514).into(),
            managers: 2,
            now_secs: 0,
        });
        let mut resent = BytesMut::new();
        for action in actions {
            match action {
                Action::Replay(Resend::Nothing) => self.copy.clear(),
                Action::Replay(r) => {
                    let (bytes, frames) = self
                        .copy
                        .take_resend((r == Resend::Unacknowledged).then_some(unacked));
                    resent = bytes.clone();
                    if !bytes.is_empty() {
                        self.up.requeue(bytes, frames);
                    }
                }
                Action::DropPartials => {
                    if self.up.drop_partial_head() {
                        self.lossy = true;
                    }
                    self.down.drop_partial_tail();
                }
                _ => {}
            }
        }
        if std::mem::take(&mut self.copy.unprotected) > 0 {
            self.lossy = true;
        }
        // What is re-sent is the tail of what the old manager was sent, from a frame start.
        assert!(
            self.to_manager.ends_with(&resent),
            "re-sent bytes are not what the old manager was last sent"
        );
        let kept = written - resent.len();
        self.finish_stint(kept);
        self.check_bounds();
    }

    /// The end of the input: everything ready is written both ways, then the invariants
    /// that span the whole session are checked.
    pub fn finish(mut self) {
        self.write_down(usize::MAX);
        self.write_up(usize::MAX);
        let all = self.to_manager.len();
        self.finish_stint(all);
        // The agent received only whole manager frames, never spliced.
        let got = whole_frames(&self.to_agent, self.max).expect("the agent got a spliced frame");
        for p in &got {
            assert!(
                check_manager_frame(p).is_ok(),
                "a bad manager frame reached the agent"
            );
        }
        if !self.lossy {
            assert_eq!(
                self.processed, self.accepted,
                "frames lost, duplicated or reordered across managers"
            );
        }
    }

    /// The manager of the stint processed the whole frames among its first `kept` bytes.
    fn finish_stint(&mut self, kept: usize) {
        let sent = std::mem::take(&mut self.to_manager);
        let mut rest = &sent[..kept];
        while let Ok(Some(total)) = frame::check(rest, self.max) {
            let payload = &rest[HEADER_LEN..total];
            assert!(
                check_agent_prefix(self.key, payload).is_ok(),
                "a frame that fails the agent check reached a manager"
            );
            self.processed.push(payload.to_vec());
            rest = &rest[total..];
        }
        if !rest.is_empty() {
            // Only a manager that died mid-frame gets a partial frame; it was lost with it
            // unless re-sent (then `kept` ends at a frame start).
            self.lossy = true;
        }
        self.outstanding = 0;
    }

    fn check_bounds(&self) {
        let frame_max = HEADER_LEN + self.max as usize;
        assert!(self.up.ready <= self.up.buf.len());
        assert!(self.down.ready <= self.down.buf.len());
        // One read beyond the high-water mark, plus frames put back after a failover.
        assert!(self.up.buf.len() <= HIGH_WATER + 2 * KEEP_MAX + 2 * frame_max);
        assert!(self.down.buf.len() <= HIGH_WATER + 2 * frame_max);
        assert!(self.copy.len() <= KEEP_MAX + frame_max);
    }
}

fn frame_len(buf: &[u8]) -> usize {
    let header = buf.first_chunk::<HEADER_LEN>().copied().unwrap_or_default();
    HEADER_LEN + u32::from_le_bytes(header) as usize
}

fn whole_frames(mut b: &[u8], max: u32) -> Option<Vec<Vec<u8>>> {
    let mut out = Vec::new();
    while !b.is_empty() {
        let total = frame::check(b, max).ok()??;
        out.push(b[HEADER_LEN..total].to_vec());
        b = &b[total..];
    }
    Some(out)
}

/// One event for [`machine_events`].
#[derive(Debug, Clone, Copy)]
pub enum Event {
    /// A manager connection was made to manager `n` (of up to 4).
    Connected(u8),
    /// The stint ended for a cause (0..=5), answered or not, after `secs` seconds.
    StintEnded {
        /// Which cause (taken modulo 6).
        cause: u8,
        /// Whether the manager answered.
        answered: bool,
        /// How long the stint lasted.
        secs: u8,
    },
}

/// Drives one session's state machine through `events` with `managers` managers, checking
/// that every stint's end yields exactly one replay decision, one upstream close, one
/// partial-frame drop and one next step (last), and that an agent refused by every manager
/// is given up within the bound.
pub fn machine_events(events: &[Event], managers: u8) {
    let managers = usize::from(managers % 4) + 1;
    let mut m = Machine::new(1);
    let (mut now, mut refusals_in_row) = (1u32, 0usize);
    let mut manager: std::net::SocketAddr = ([10, 0, 0, 1], 1514).into();
    let mut avoid = Vec::new();
    for e in events {
        match *e {
            Event::Connected(n) => {
                // The shell connects to a manager the plan does not avoid, if there is one.
                let wanted = ([10, 0, 0, n % managers as u8 + 1], 1514).into();
                manager = if avoid.contains(&wanted) {
                    (0..managers as u8)
                        .map(|i| ([10, 0, 0, i + 1], 1514).into())
                        .find(|a| !avoid.contains(a))
                        .unwrap_or(wanted)
                } else {
                    wanted
                };
                let _ = m.on_connected(manager, None, false, false, now);
            }
            Event::StintEnded {
                cause,
                answered,
                secs,
            } => {
                now = now.saturating_add(u32::from(secs));
                let cause = match cause % 6 {
                    0 => StintCause::Closed,
                    1 => StintCause::Unreachable,
                    2 => StintCause::Silent { unacked: 0 },
                    3 => StintCause::Silent { unacked: 1 },
                    4 => StintCause::Protocol,
                    _ => StintCause::Moved,
                };
                let refused = matches!(
                    super::decide::judge(cause, answered),
                    super::decide::Verdict::AgentRefused
                );
                let actions = m.on_stint_end(StintEnd {
                    cause,
                    answered,
                    manager,
                    managers,
                    now_secs: now,
                });
                let all: Vec<Action> = actions.into_iter().collect();
                let count = |f: fn(&Action) -> bool| all.iter().filter(|a| f(a)).count();
                assert_eq!(count(|a| matches!(a, Action::Replay(_))), 1);
                assert_eq!(count(|a| matches!(a, Action::CloseUpstream { .. })), 1);
                assert_eq!(count(|a| matches!(a, Action::DropPartials)), 1);
                assert!(matches!(
                    all.last(),
                    Some(Action::Connect | Action::CloseAgent(_))
                ));
                if refused {
                    refusals_in_row += 1;
                } else if !matches!(cause, StintCause::Moved) {
                    refusals_in_row = 0;
                }
                if matches!(all.last(), Some(Action::CloseAgent(_))) {
                    return;
                }
                assert!(
                    refusals_in_row <= managers * REFUSALS_PER_MANAGER as usize,
                    "an agent refused everywhere was not given up"
                );
                let plan = m.next_connect();
                assert!(plan.hold <= std::time::Duration::from_secs(60));
                avoid = plan.avoid;
                // Without a connect event the next stint is on the first manager allowed.
                if avoid.contains(&manager) {
                    if let Some(a) = (0..managers as u8)
                        .map(|i| ([10, 0, 0, i + 1], 1514).into())
                        .find(|a| !avoid.contains(a))
                    {
                        manager = a;
                    }
                }
            }
        }
    }
}
