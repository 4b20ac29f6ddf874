//! The session state machine driven by event sequences, without sockets or clocks.

use std::io;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use super::super::check::{check_agent_frame, check_agent_prefix, check_unbound};
use super::*;
use crate::envelope::AgentId;
use crate::session::{overtake, Claim, Incumbent, Overtake};

fn addr(n: u8) -> SocketAddr {
    SocketAddr::from(([10, 0, 0, n], 1514))
}

fn end(cause: StintCause, answered: bool, manager: u8, managers: usize) -> StintEnd {
    StintEnd {
        cause,
        answered,
        manager: addr(manager),
        managers,
        now_secs: 1,
    }
}

fn agent(id: &[u8]) -> SessionKey {
    SessionKey::Agent(AgentId::parse(id).unwrap())
}

fn list(actions: &Actions) -> Vec<String> {
    actions.iter().map(|a| format!("{a:?}")).collect()
}

fn has(actions: &Actions, f: impl Fn(&Action) -> bool) -> bool {
    actions.iter().any(f)
}

#[test]
fn an_agent_scoped_close_never_fails_the_manager() {
    let mut m = Machine::new(1);
    // Closed right after the first frame, nothing answered: remoted refusing this agent.
    let out = m.on_stint_end(end(StintCause::Closed, false, 1, 2));
    assert!(has(&out, |a| matches!(
        a,
        Action::CloseUpstream { failed: false }
    )));
    assert!(has(&out, |a| matches!(
        a,
        Action::Count(Metric::ManagerRefusals)
    )));
    assert!(has(&out, |a| matches!(a, Action::Replay(Resend::All))));
    assert!(has(&out, |a| matches!(a, Action::Connect)));
    // A protocol violation on one session: counted, the manager stays available.
    let out = m.on_stint_end(end(StintCause::Protocol, true, 1, 2));
    assert!(has(&out, |a| matches!(
        a,
        Action::CloseUpstream { failed: false }
    )));
    assert!(has(&out, |a| matches!(
        a,
        Action::Count(Metric::Reject(Rejection::ManagerProtocol))
    )));
}

#[test]
fn a_manager_scoped_failure_marks_the_manager_and_replays_the_unacknowledged() {
    let mut m = Machine::new(1);
    for cause in [StintCause::Unreachable, StintCause::Silent { unacked: 10 }] {
        let out = m.on_stint_end(end(cause, true, 1, 2));
        let l = list(&out);
        assert!(
            has(&out, |a| matches!(
                a,
                Action::CloseUpstream { failed: true }
            )),
            "{l:?}"
        );
        assert!(has(&out, |a| matches!(
            a,
            Action::Replay(Resend::Unacknowledged)
        )));
        assert!(has(&out, |a| matches!(a, Action::CountAtRisk)));
        assert!(has(&out, |a| matches!(a, Action::Count(Metric::Failovers))));
    }
    // The replay comes before the upstream is closed (the kernel is asked on the open socket)
    // and the partial frames are dropped after it (the re-sent start makes a cut frame whole).
    let out = m.on_stint_end(end(StintCause::Unreachable, true, 2, 2));
    let pos = |f: &dyn Fn(&Action) -> bool| out.iter().position(f).unwrap();
    let replay = pos(&|a| matches!(a, Action::Replay(_)));
    let close = pos(&|a| matches!(a, Action::CloseUpstream { .. }));
    let drop_partials = pos(&|a| matches!(a, Action::DropPartials));
    assert!(replay < close && close < drop_partials);
}

#[test]
fn a_silent_manager_that_acknowledged_everything_refused_the_agent() {
    let mut m = Machine::new(1);
    let out = m.on_stint_end(end(StintCause::Silent { unacked: 0 }, false, 1, 2));
    assert!(has(&out, |a| matches!(
        a,
        Action::CloseUpstream { failed: false }
    )));
    assert!(has(&out, |a| matches!(a, Action::Log(Note::Refused))));
}

#[test]
fn silent_manager_timers_become_stint_causes() {
    // The reply timer fired; the kernel still holds bytes: silent with unacknowledged data.
    let c = cause(&End::ManagerTimeout, || Ok::<u32, ()>(42));
    assert_eq!(c, Some(StintCause::Silent { unacked: 42 }));
    // A socket that cannot be asked is not healthy.
    let c = cause(&End::ManagerTimeout, || Err::<u32, ()>(()));
    assert_eq!(c, Some(StintCause::Silent { unacked: u32::MAX }));
    // TCP_USER_TIMEOUT firing is unreachable; a reset is a close.
    let c = cause(&End::ManagerIo(io::ErrorKind::TimedOut.into()), || {
        Ok::<u32, ()>(0)
    });
    assert_eq!(c, Some(StintCause::Unreachable));
    let c = cause(
        &End::ManagerIo(io::ErrorKind::ConnectionReset.into()),
        || Ok::<u32, ()>(0),
    );
    assert_eq!(c, Some(StintCause::Closed));
    // Ends of the session itself are not stint causes (no failover).
    assert_eq!(cause(&End::AgentClosed, || Ok::<u32, ()>(0)), None);
    assert_eq!(cause(&End::Idle, || Ok::<u32, ()>(0)), None);
    // The timers themselves: the reply timer only when an answer is owed and failover is on;
    // the liveness timer only for agent frames.
    let t = Some(Duration::from_secs(20));
    assert_eq!(reply_timer(true, true, t), t);
    assert_eq!(reply_timer(false, true, t), None);
    assert_eq!(reply_timer(true, false, t), None);
    assert_eq!(liveness_timer(true, true, t), t);
    assert_eq!(liveness_timer(false, true, t), None);
    assert_eq!(liveness_timer(true, false, t), None);
    // Timer events, by priority behind operator commands.
    let expired = Interrupts {
        expired: Some(Expiry::Reply),
        ..Interrupts::default()
    };
    assert!(matches!(interrupt(expired), Some(End::ManagerTimeout)));
    let idle = Interrupts {
        expired: Some(Expiry::Idle),
        ..Interrupts::default()
    };
    assert!(matches!(interrupt(idle), Some(End::Idle)));
    let moved = Interrupts {
        move_requested: true,
        ..expired
    };
    assert!(matches!(interrupt(moved), Some(End::Moved)));
    let handover = Interrupts {
        handover: true,
        ..moved
    };
    assert!(matches!(interrupt(handover), Some(End::HandedOver)));
    let drain = Interrupts {
        closing: true,
        ..handover
    };
    assert!(matches!(interrupt(drain), Some(End::Closed)));
    assert!(interrupt(Interrupts::default()).is_none());
}

#[test]
fn a_move_replays_nothing_and_drops_partial_frames() {
    let mut m = Machine::new(1);
    let out = m.on_stint_end(end(StintCause::Moved, true, 1, 2));
    assert!(has(&out, |a| matches!(a, Action::Replay(Resend::Nothing))));
    assert!(has(&out, |a| matches!(a, Action::DropPartials)));
    assert!(has(&out, |a| matches!(a, Action::Count(Metric::Moves))));
    assert!(!has(&out, |a| matches!(a, Action::CountAtRisk)));
    // Every kind of end of a stint drops partial frames, failovers too.
    for cause in [
        StintCause::Closed,
        StintCause::Unreachable,
        StintCause::Protocol,
        StintCause::Silent { unacked: 1 },
    ] {
        let out = Machine::new(1).on_stint_end(end(cause, true, 1, 2));
        assert!(
            has(&out, |a| matches!(a, Action::DropPartials)),
            "{cause:?}"
        );
    }
    // A move whose old manager had not acknowledged everything is a failure after all.
    assert_eq!(settle_move(Ok(0)), StintCause::Moved);
    assert_eq!(settle_move(Ok(7)), StintCause::Silent { unacked: 7 });
    assert_eq!(
        settle_move(Err(io::ErrorKind::BrokenPipe.into())),
        StintCause::Closed
    );
}

#[test]
fn the_control_frame_goes_once_to_each_manager_that_needs_it() {
    let mut m = Machine::new(1);
    // A fresh session: its first frame is written with the rest, no replay; answer owed.
    let a = m.on_connected(addr(1), None, false, false, 1);
    assert_eq!(
        a,
        Attached {
            replay_first: false,
            awaiting_reply: true
        }
    );
    // Adopted from a previous process: the manager needs it.
    assert!(
        Machine::new(1)
            .on_connected(addr(1), None, true, false, 1)
            .replay_first
    );
    // Served by 1, moved to 2: 2 needs it.
    m.on_stint_end(end(StintCause::Moved, true, 1, 2));
    assert!(
        m.on_connected(addr(2), Some(addr(1)), false, false, 2)
            .replay_first
    );
    // Served by 2, back to 1 which registered it: not twice.
    m.on_stint_end(end(StintCause::Moved, true, 2, 2));
    let back = m.on_connected(addr(1), Some(addr(2)), false, false, 3);
    assert!(!back.replay_first && !back.awaiting_reply);
    // Manager 1 ended the session (forgets the agent's reply socket): needs it again.
    m.on_stint_end(end(StintCause::Closed, true, 1, 2));
    assert!(
        m.on_connected(addr(1), Some(addr(1)), false, false, 4)
            .replay_first
    );
    // Unless the re-sent frames already carry it.
    m.on_stint_end(end(StintCause::Closed, true, 1, 2));
    assert!(
        !m.on_connected(addr(1), Some(addr(1)), false, true, 5)
            .replay_first
    );
}

#[test]
fn an_agent_refused_everywhere_is_held_with_backoff_then_closed() {
    let mut m = Machine::new(1);
    let mut holds = Vec::new();
    let mut gave_up_after = None;
    for round in 0..20 {
        let out = m.on_stint_end(end(StintCause::Closed, false, 1 + (round % 2) as u8, 2));
        if let Some(why) = gave_up(&out) {
            assert_eq!(why, GiveUp::RefusedEverywhere);
            gave_up_after = Some(round + 1);
            break;
        }
        holds.push(m.next_connect().hold);
    }
    // Bounded, and the holds grow once both managers refused.
    let n = gave_up_after.expect("never gave up");
    assert!(n <= 2 * decide::REFUSALS_PER_MANAGER as usize);
    assert!(holds.windows(2).all(|w| w[1] >= w[0]), "{holds:?}");
    assert!(holds.last().unwrap() > &Duration::ZERO);
    // The hold while no manager can be connected: doubling to 2 s, within the deadline.
    let t0 = Instant::now();
    let deadline = t0 + Duration::from_secs(3);
    let (now, next) = hold(true, FIRST_HOLD_PAUSE, t0, deadline).unwrap();
    assert_eq!((now, next), (FIRST_HOLD_PAUSE, FIRST_HOLD_PAUSE * 2));
    let (_, next) = hold(true, Duration::from_secs(2), t0, deadline).unwrap();
    assert_eq!(next, Duration::from_secs(2));
    assert!(hold(
        true,
        Duration::from_secs(2),
        t0 + Duration::from_secs(2),
        deadline
    )
    .is_none());
    assert!(hold(false, FIRST_HOLD_PAUSE, t0, deadline).is_none());
    // No manager reachable at all: counted and closed.
    let out = Machine::on_connect_failed(false);
    assert!(has(&out, |a| matches!(
        a,
        Action::Count(Metric::Reject(Rejection::NoBackend))
    )));
    assert!(has(&out, |a| matches!(
        a,
        Action::CloseAgent(End::NoManager)
    )));
    // This host out of sockets: the agent is closed as that, not as a manager outage (its end
    // counts it once, as out_of_sockets).
    let out = Machine::on_connect_failed(true);
    assert!(!has(&out, |a| matches!(a, Action::Count(_))));
    assert!(has(&out, |a| matches!(
        a,
        Action::CloseAgent(End::OutOfSockets)
    )));
    assert_eq!(End::OutOfSockets.rejection(), Some(Rejection::OutOfSockets));
}

#[test]
fn repeated_protocol_faults_give_up() {
    let mut m = Machine::new(1);
    let mut last = None;
    for _ in 0..3 {
        last = gave_up(&m.on_stint_end(end(StintCause::Protocol, true, 1, 2)));
    }
    assert_eq!(last, Some(GiveUp::RepeatedFaults));
}

#[test]
fn keyed_and_unkeyed_sessions_stay_bound_to_their_first_identity() {
    let k1 = agent(b"001");
    // Another agent's frame on agent 001's session.
    assert!(matches!(
        check_agent_prefix(k1, b"!002!#AES:x"),
        Err(End::AgentIdChanged)
    ));
    assert!(check_agent_prefix(k1, b"!001!#AES:x").is_ok());
    // A source-keyed session (ID-less first frame, or #ping first) never carries an ID.
    let src = SessionKey::Source([192, 0, 2, 1].into());
    assert!(matches!(
        check_agent_frame(src, b"!001!#AES:x"),
        Err(End::AgentIdChanged)
    ));
    assert!(check_agent_frame(src, b"#AES:x").is_ok());
    // With keys, a session whose first frame was not verified carries only #ping.
    assert!(check_unbound(src, true, b"#ping").is_ok());
    assert!(matches!(
        check_unbound(src, true, b"#AES:x"),
        Err(End::Unverified)
    ));
    assert!(matches!(
        check_unbound(src, true, b"!001!#AES:x"),
        Err(End::AgentIdChanged)
    ));
    // The first frame binds the key: an ID names the agent, none the source.
    let f = crate::frame::encode_frame(b"!001!#AES:x", 65536).unwrap();
    let ip = [192, 0, 2, 1].into();
    assert_eq!(first_frame(&f, 65536, ip).unwrap(), Some((k1, f.len())));
    assert_eq!(first_frame(&f[..5], 65536, ip).unwrap(), None);
    let f = crate::frame::encode_frame(b"#ping", 65536).unwrap();
    assert_eq!(
        first_frame(&f, 65536, ip).unwrap(),
        Some((SessionKey::Source(ip), f.len()))
    );
    assert!(first_frame(&[0, 0, 0, 0], 65536, ip).is_err());
}

#[test]
fn overtake_keeps_a_live_incumbent_unless_the_newcomer_proves_itself() {
    let t = Duration::from_secs(60);
    let live = |counter| Incumbent {
        heard_ago: Duration::from_secs(5),
        counter,
    };
    // On its word alone: refused while the incumbent is heard from.
    assert_eq!(overtake(live(None), Claim::Unverified, t), Overtake::Refuse);
    // A replayed startup (old counter) proves nothing.
    let replayed = Claim::Verified {
        startup: true,
        counter: 10,
    };
    assert_eq!(overtake(live(Some(10)), replayed, t), Overtake::Refuse);
    // A verified startup with a newer counter is the agent reconnecting.
    let newer = Claim::Verified {
        startup: true,
        counter: 11,
    };
    assert_eq!(overtake(live(Some(10)), newer, t), Overtake::Replace);
    // A keepalive, even verified, is not a reconnection.
    let keepalive = Claim::Verified {
        startup: false,
        counter: 11,
    };
    assert_eq!(overtake(live(Some(10)), keepalive, t), Overtake::Refuse);
    // A silent incumbent is replaced.
    let silent = Incumbent {
        heard_ago: t,
        counter: None,
    };
    assert_eq!(overtake(silent, Claim::Unverified, t), Overtake::Replace);
}

#[test]
fn at_risk_counts_what_was_acknowledged_but_not_resent() {
    assert_eq!(at_risk(10, 4, 1, 2), 9);
    assert_eq!(at_risk(3, 5, 0, 0), 0);
    let a = crate::frame::encode_frame(b"#AES:a", 65536).unwrap();
    let b = crate::frame::encode_frame(b"#AES:bb", 65536).unwrap();
    let both: Vec<u8> = [&a[..], &b[..]].concat();
    assert!(holds_frame(&both, b"#AES:bb"));
    assert!(!holds_frame(&both, b"#AES:c"));
    assert!(!holds_frame(&both[..both.len() - 1], b"#AES:bb"));
}
