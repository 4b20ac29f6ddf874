//! Tests of the pipes and the per-frame checks together, without sockets.

use super::check::{check_agent_frame, check_manager_frame};
use super::pipe::Pipe;
use super::unacked::Unacked;
use super::End;
use crate::frame::{self, encode_frame, FrameError, HEADER_LEN, MAX_PAYLOAD};
use crate::session::SessionKey;

#[test]
fn pipe_keeps_bad_frames_out_and_good_ones_in() {
    let mut p = Pipe::default();
    p.buf
        .extend_from_slice(&encode_frame(b"!001!#AES:x", MAX_PAYLOAD).unwrap());
    p.buf
        .extend_from_slice(&encode_frame(b"!001!:y", MAX_PAYLOAD).unwrap());
    p.buf.extend_from_slice(&[0, 0, 0, 0]);
    let key = SessionKey::Agent(crate::envelope::AgentId::parse(b"001").unwrap());
    let (frames, bytes) = p.take_frames(MAX_PAYLOAD, |pl| check_agent_frame(key, pl).map(drop));
    assert_eq!((frames, bytes), (2, 26));
    assert!(matches!(
        p.failed.as_deref(),
        Some(End::AgentFrame(FrameError::ZeroLength))
    ));
}

#[test]
fn pipe_tracks_boundaries_across_partial_writes() {
    let mut p = Pipe::default();
    p.buf
        .extend_from_slice(&encode_frame(b"#AES:abcdef", MAX_PAYLOAD).unwrap()); // 15 bytes
    p.buf
        .extend_from_slice(&encode_frame(b"#AES:g", MAX_PAYLOAD).unwrap()); // 10 bytes
    p.buf.extend_from_slice(&[9, 0]);
    let (frames, _) = p.take_frames(MAX_PAYLOAD, check_manager_frame);
    assert_eq!(frames, 2);
    assert!(p.at_boundary());
    p.consume(3);
    assert!(!p.at_boundary());
    p.consume(12);
    assert!(p.at_boundary());
    p.consume(9);
    assert!(!p.at_boundary());
    p.consume(1);
    assert!(p.at_boundary());
    assert_eq!(p.ready, 0);
    assert_eq!(p.buffered(), 2);
}

#[test]
fn id_change_and_manager_prefix_are_refused() {
    let key = SessionKey::Agent(crate::envelope::AgentId::parse(b"001").unwrap());
    assert!(matches!(
        check_agent_frame(key, b"!002!#AES:x"),
        Err(End::AgentIdChanged)
    ));
    assert!(check_agent_frame(key, b"#ping").is_ok());
    assert!(matches!(
        check_manager_frame(b"!001!#AES:x"),
        Err(End::ManagerProtocol(_))
    ));
    assert!(matches!(
        check_manager_frame(b"HTTP/1.1 200 OK"),
        Err(End::ManagerProtocol(_))
    ));
}

/// A small deterministic generator for the randomized tests below.
struct Rng(u64);
impl Rng {
    fn below(&mut self, n: usize) -> usize {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 % n.max(1) as u64) as usize
    }
}

/// Frames with distinct payloads (`#AES:` + tag + index + filler), and their bytes.
fn stream_of(rng: &mut Rng, tag: u8, n: usize) -> (Vec<Vec<u8>>, Vec<u8>) {
    let mut frames = Vec::new();
    let mut bytes = Vec::new();
    for i in 0..n {
        let mut p = format!("#AES:{}{i};", tag as char).into_bytes();
        p.resize(p.len() + rng.below(300), b'x');
        bytes.extend_from_slice(&encode_frame(&p, MAX_PAYLOAD).unwrap());
        frames.push(p);
    }
    (frames, bytes)
}

/// Splits a byte stream into its frames' payloads; `None` if it is not whole frames.
fn parse_all(mut b: &[u8]) -> Option<Vec<Vec<u8>>> {
    let mut out = Vec::new();
    while !b.is_empty() {
        let total = frame::check(b, MAX_PAYLOAD).ok()??;
        out.push(b[HEADER_LEN..total].to_vec());
        b = &b[total..];
    }
    Some(out)
}

/// Feeds `pipe` up to `len` bytes of `src` from `*at` (one read).
fn feed(pipe: &mut Pipe, src: &[u8], at: &mut usize, len: usize) {
    let n = len.min(src.len() - *at);
    pipe.buf.extend_from_slice(&src[*at..*at + n]);
    *at += n;
    pipe.take_frames(MAX_PAYLOAD, check_manager_frame);
}

/// Writes up to `len` ready bytes of `pipe` to `out` (one write).
fn drain(pipe: &mut Pipe, out: &mut Vec<u8>, copy: Option<&mut Unacked>, len: usize) {
    let n = len.min(pipe.ready);
    out.extend_from_slice(&pipe.buf[..n]);
    if let Some(c) = copy {
        c.record(&pipe.buf[..n]);
    }
    pipe.consume(n);
}

#[test]
fn a_move_never_splices_manager_frames_for_the_agent() {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    for _ in 0..2000 {
        let n = 1 + rng.below(8);
        let (a_frames, a) = stream_of(&mut rng, b'a', n);
        let n = 1 + rng.below(8);
        let (b_frames, b) = stream_of(&mut rng, b'b', n);
        let mut down = Pipe::default();
        let mut to_agent = Vec::new();
        let (mut at, cut) = (0, rng.below(a.len() + 1));
        // Manager A, read and written in random pieces, until the move.
        while at < cut {
            feed(&mut down, &a[..cut], &mut at, 1 + rng.below(120));
            drain(&mut down, &mut to_agent, None, rng.below(150));
        }
        // The move: what end_stint does to the manager-to-agent pipe.
        down.drop_partial_tail();
        let mut at = 0;
        while at < b.len() || down.ready > 0 {
            if at < b.len() {
                feed(&mut down, &b, &mut at, 1 + rng.below(120));
            }
            drain(&mut down, &mut to_agent, None, 1 + rng.below(150));
        }
        let got = parse_all(&to_agent).expect("the agent received a spliced frame");
        // A prefix of A's frames (whole), then all of B's.
        let from_a = got.len() - b_frames.len();
        assert_eq!(&got[..from_a], &a_frames[..from_a]);
        assert_eq!(&got[from_a..], &b_frames[..]);
    }
}

#[test]
fn a_failover_sends_the_next_manager_exactly_what_the_dead_one_never_acknowledged() {
    let mut rng = Rng(0x2545_f491_4f6c_dd1d);
    for _ in 0..2000 {
        let n = 2 + rng.below(12);
        let (frames, agent) = stream_of(&mut rng, b'e', n);
        let mut up = Pipe::default();
        let mut copy = Unacked::default();
        let mut to_a = Vec::new();
        let (mut at, fail_at) = (0, rng.below(agent.len() + 1));
        while at < fail_at {
            feed(&mut up, &agent[..fail_at], &mut at, 1 + rng.below(90));
            drain(&mut up, &mut to_a, Some(&mut copy), rng.below(110));
            // Now and then the kernel says what it acknowledged.
            if rng.below(3) == 0 {
                copy.trim(rng.below(copy.len() + 1).max(copy.len() / 2));
            }
        }
        // A dies: its TCP acknowledged a random prefix of what it was sent (never less
        // than what it already reported).
        let unacked = rng.below(copy.len() + 1);
        let acked = to_a.len() - unacked;
        let (resend, _) = copy.take_resend(Some(unacked));
        up.requeue(resend, 0);
        let mut to_b = Vec::new();
        while at < agent.len() || up.ready > 0 {
            if at < agent.len() {
                feed(&mut up, &agent, &mut at, 1 + rng.below(90));
            }
            drain(&mut up, &mut to_b, None, 1 + rng.below(110));
        }
        // What A processed: the whole frames within what its TCP acknowledged.
        let mut a_got = Vec::new();
        let mut rest = &to_a[..acked];
        while let Ok(Some(total)) = frame::check(rest, MAX_PAYLOAD) {
            a_got.push(rest[HEADER_LEN..total].to_vec());
            rest = &rest[total..];
        }
        let b_got = parse_all(&to_b).expect("B received a spliced frame");
        let mut all = a_got.clone();
        all.extend(b_got);
        assert_eq!(all, frames, "lost, duplicated or reordered");
    }
}

/// What an idle agent costs is mostly these two allocations; jemalloc rounds each up to a size
/// class (448 and 320 bytes with the session's Arc header), so a field that crosses a class
/// costs 64 bytes per agent. Grow them only on purpose.
mod size_classes {
    #[test]
    fn per_session_allocations_stay_in_their_size_classes() {
        assert!(std::mem::size_of::<super::super::shell::Conn>() <= 448);
        assert!(std::mem::size_of::<crate::session::Session>() + 16 <= 320);
    }
}

#[test]
fn frames_counted_at_risk_are_not_counted_again_at_the_next_failover() {
    let mut p = Pipe::default();
    p.note_written(21);
    assert_eq!(p.recently_written(), 21);
    p.forget_written();
    assert_eq!(p.recently_written(), 0);
    p.note_written(1);
    assert_eq!(p.recently_written(), 1);
}
