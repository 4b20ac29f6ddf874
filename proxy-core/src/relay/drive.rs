//! The I/O shell's steady state: one hand-written future relays both directions of a session
//! on its current manager, frame by frame, until the session needs the state machine again (a
//! side closed or broke a rule, a timer fired, the operator asked for a move, a hand-over).
//!
//! This is the hot path: per read, a header walk and the per-frame checks of [`super::check`];
//! per write, one `write` of every whole frame ready. No allocation of its own per frame, no
//! dynamic dispatch, no system call beyond the reads and writes (the kernel's unacknowledged
//! count is asked only each time the copy of unacknowledged frames doubled, and when a manager
//! answers while some are kept).

use std::io;

use bytes::BytesMut;
use tokio::net::TcpStream;

use super::check::{agent_check, check_manager_frame};
use super::machine::{self, Interrupts};
use super::pipe::Pipe;
use super::shell::Conn;
use super::unacked::Unacked;
use super::{AgentRelay, End};
use crate::frame::{self, HEADER_LEN};
use crate::session::Session;
use std::sync::atomic::Ordering;

/// Which way a pipe carries frames.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Dir {
    /// Agent -> manager.
    Up,
    /// Manager -> agent.
    Down,
}

impl AgentRelay {
    /// Relays frames both ways on `conn.manager` until one side ends or the session needs
    /// attention.
    pub(super) fn relay<'a>(
        &'a self,
        conn: &'a mut Conn,
        session: &'a Session,
        awaiting_reply: bool,
    ) -> Relaying<'a> {
        // A timeout noticed while no manager carried the session (held, or reconnecting) is
        // stale: the hold timeout governs that time, and a new manager connection is activity.
        let _ = session.take_expired();
        session.touch();
        if let Some(t) = machine::reply_timer(
            awaiting_reply,
            self.config.failover,
            self.config.reply_timeout,
        ) {
            session.arm_reply(t);
        } else {
            session.disarm_reply();
        }
        let mut relaying = Relaying {
            relay: self,
            conn,
            session,
        };
        relaying.take_early_frames();
        relaying
    }
}

/// The steady state of a session: both directions relayed by one hand-written future, so that
/// an idle agent costs a few words of task state rather than a tree of futures and timers.
/// All state lives in the connection's pipes: dropping this future leaves them at a known byte
/// position (what a manager failover, a move and a hand-over rely on).
pub(super) struct Relaying<'a> {
    relay: &'a AgentRelay,
    conn: &'a mut Conn,
    session: &'a Session,
}

/// Bytes asked of the kernel by the first read after an idle period: enough for a startup or
/// keepalive message, small enough that thousands of agents waking at once (a reconnect storm)
/// do not each allocate a full read chunk.
pub(super) const FIRST_READ: usize = 4096;

/// Bytes a direction may hold before it stops reading (whole frames waiting to be written and
/// the start of the next). Above the largest frame, so a frame always fits.
const HIGH_WATER: usize = 128 * 1024;

/// Reads (or writes) a direction may do in one poll before yielding, so one busy agent cannot
/// hold a worker thread.
const POLL_BUDGET: u32 = 32;

impl Relaying<'_> {
    /// Takes the frames read before relaying started (the first frame, and what came with it).
    fn take_early_frames(&mut self) {
        let (relay, session) = (self.relay, self.session);
        let max = relay.config.max_payload;
        let key = session.key();
        let Conn {
            up,
            down,
            keepalives,
            replay,
            ..
        } = &mut *self.conn;
        if up.ready == 0 && !up.buf.is_empty() {
            let check = agent_check(
                key,
                relay.keys.is_some(),
                keepalives.as_deref_mut(),
                replay,
                session,
            );
            take_counted(up, Dir::Up, max, check, relay, session);
        }
        if down.ready == 0 && !down.buf.is_empty() {
            take_counted(down, Dir::Down, max, check_manager_frame, relay, session);
        }
    }

    /// The operator's commands and the timers, as the state machine's event.
    #[inline]
    fn interrupt(&self) -> Option<End> {
        let s = self.session;
        machine::interrupt(Interrupts {
            closing: s.is_closing(),
            handover: self.relay.handover.load(Ordering::Relaxed),
            move_requested: self.relay.config.failover && s.is_move_requested(),
            expired: s.take_expired(),
        })
    }
}

impl std::future::Future for Relaying<'_> {
    type Output = End;

    fn poll(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<End> {
        use std::task::Poll;
        let this = self.get_mut();
        if let Some(end) = this.interrupt() {
            return Poll::Ready(end);
        }
        this.session.register_relay_waker(cx.waker());
        // Checked again: a flag set between the first check and the registration would
        // otherwise wait for the next wake-up.
        if let Some(end) = this.interrupt() {
            return Poll::Ready(end);
        }
        let (relay, session) = (this.relay, this.session);
        let Conn {
            agent,
            manager,
            up,
            down,
            keepalives,
            replay,
            unacked,
            ..
        } = &mut *this.conn;
        let Some(manager) = manager.as_ref().map(|m| &m.stream) else {
            return Poll::Ready(End::ManagerClosed);
        };
        let mut up_check = agent_check(
            session.key(),
            relay.keys.is_some(),
            keepalives.as_deref_mut(),
            replay,
            session,
        );
        let up = drive(
            up,
            agent,
            manager,
            Dir::Up,
            relay,
            session,
            &mut up_check,
            relay.config.resend_unacknowledged.then_some(&mut *unacked),
            cx,
        );
        if let Poll::Ready(end) = up {
            return Poll::Ready(end);
        }
        let mut down_check = check_manager_frame;
        drive(
            down,
            manager,
            agent,
            Dir::Down,
            relay,
            session,
            &mut down_check,
            relay.config.resend_unacknowledged.then_some(&mut *unacked),
            cx,
        )
    }
}

/// [`Pipe::take_frames`], counting the new frames for the session and the listener.
fn take_counted(
    pipe: &mut Pipe,
    dir: Dir,
    max: u32,
    check: impl FnMut(&[u8]) -> Result<(), End>,
    relay: &AgentRelay,
    session: &Session,
) {
    let (frames, bytes) = pipe.take_frames(max, check);
    if frames > 0 {
        let up = dir == Dir::Up;
        session.record(up, frames, bytes);
        relay.stats.record(up, frames, bytes);
        // The manager owes an answer within the liveness time (keepalives are answered).
        if let Some(t) =
            machine::liveness_timer(up, relay.config.failover, relay.config.liveness_timeout)
        {
            session.arm_reply_if_idle(t);
        }
    }
}

/// Moves whole frames from `src` to `dst` until nothing more can be done without waiting
/// (`Pending`, with the right readiness registered) or the stream ends.
///
/// Reading goes on while earlier frames wait to be written, up to [`HIGH_WATER`] bytes held:
/// the two sockets work in parallel, and a peer that stops reading stops the other side's
/// reads once that much is buffered (backpressure with a bounded buffer).
#[allow(clippy::too_many_arguments)]
fn drive(
    pipe: &mut Pipe,
    src: &TcpStream,
    dst: &TcpStream,
    dir: Dir,
    relay: &AgentRelay,
    session: &Session,
    check: &mut impl FnMut(&[u8]) -> Result<(), End>,
    // Agent to manager: the copy of what was written; manager to agent: trimmed on answers.
    mut copy: Option<&mut Unacked>,
    cx: &mut std::task::Context<'_>,
) -> std::task::Poll<End> {
    use std::task::Poll;
    let cfg = &relay.config;
    let up = dir == Dir::Up;
    type IoEnd = fn(io::Error) -> End;
    let (src_io, dst_io): (IoEnd, IoEnd) = match dir {
        Dir::Up => (End::AgentIo, End::ManagerIo),
        Dir::Down => (End::ManagerIo, End::AgentIo),
    };
    for _ in 0..POLL_BUDGET {
        let mut progressed = false;
        if pipe.ready > 0 {
            match dst.try_write(&pipe.buf[..pipe.ready]) {
                Ok(n) => {
                    if let Some(copy) = copy.as_deref_mut().filter(|_| up) {
                        copy.record(&pipe.buf[..n]);
                        // Asked of the kernel only each time the copy doubled: one system
                        // call per many writes under load.
                        if copy.should_trim() {
                            if let Ok(left) = crate::net::unacked_bytes(dst) {
                                copy.trim(left as usize);
                            }
                        }
                    }
                    let done = pipe.consume(n);
                    if up {
                        pipe.note_written(done);
                    }
                    progressed = true;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => match dst.poll_write_ready(cx) {
                    Poll::Ready(Ok(())) => progressed = true,
                    Poll::Ready(Err(e)) => return Poll::Ready(dst_io(e)),
                    Poll::Pending => {}
                },
                Err(e) => return Poll::Ready(dst_io(e)),
            }
        }
        if pipe.failed.is_some() {
            // Every good frame before the bad one goes out first.
            if pipe.ready > 0 {
                if progressed {
                    continue;
                }
                return Poll::Pending;
            }
            return Poll::Ready(match (dir, pipe.failed.take().map(|b| *b)) {
                (Dir::Down, Some(End::AgentFrame(e))) => End::ManagerProtocol(e.reason()),
                (_, Some(end)) => end,
                (_, None) => End::Closed,
            });
        }
        if pipe.buf.len() < HIGH_WATER {
            // Room for a read, or for the rest of a large frame. A pipe that has been idle
            // starts small (agents mostly send small messages after a pause); one that is
            // streaming reads in full chunks.
            let want = match pipe
                .buf
                .get(pipe.ready..)
                .and_then(|t| t.first_chunk::<HEADER_LEN>())
            {
                Some(h) => (HEADER_LEN + u32::from_le_bytes(*h) as usize)
                    .saturating_sub(pipe.buf.len() - pipe.ready),
                None => 0,
            };
            let chunk = if pipe.buf.capacity() == 0 {
                FIRST_READ.min(cfg.read_chunk)
            } else {
                cfg.read_chunk
            };
            // At least a read's worth, and room for the rest of the frame being read (never
            // more than the largest frame: `want` comes from a checked header).
            pipe.buf.reserve(want.max(chunk));
            match read_once(src, &mut pipe.buf) {
                Ok(0) => {
                    if pipe.ready > 0 {
                        // The source closed: deliver what is ready first, then end.
                        if progressed {
                            continue;
                        }
                        return Poll::Pending;
                    }
                    return Poll::Ready(if pipe.buf.is_empty() {
                        if up {
                            End::AgentClosed
                        } else {
                            End::ManagerClosed
                        }
                    } else {
                        let e = frame::truncated(&pipe.buf);
                        if up {
                            End::AgentFrame(e)
                        } else {
                            End::ManagerProtocol(e.reason())
                        }
                    });
                }
                Ok(n) => {
                    crate::pace::note(n);
                    let frames_before = pipe.ready;
                    take_counted(pipe, dir, cfg.max_payload, &mut *check, relay, session);
                    if !up && pipe.ready != frames_before {
                        // The manager answered: it has the agent's frames, so let go of what
                        // its TCP acknowledged (how an idle agent's copy is freed).
                        if let Some(copy) = copy.as_deref_mut().filter(|c| c.len() > 0) {
                            if let Ok(left) = crate::net::unacked_bytes(src) {
                                copy.trim_and_release(left as usize);
                            }
                        }
                    }
                    progressed = true;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if pipe.buf.is_empty() {
                        // Idle: give the buffer back so idle agents hold no buffer memory.
                        pipe.buf = BytesMut::new();
                        if let Some(copy) = copy.as_deref_mut() {
                            copy.release_if_empty();
                        }
                    }
                    match src.poll_read_ready(cx) {
                        Poll::Ready(Ok(())) => progressed = true,
                        Poll::Ready(Err(e)) => return Poll::Ready(src_io(e)),
                        Poll::Pending => {}
                    }
                }
                Err(e) => return Poll::Ready(src_io(e)),
            }
        }
        // (At the high-water mark the ready region is never empty: a lone incomplete frame
        // is smaller than HIGH_WATER.)
        if !progressed {
            return Poll::Pending;
        }
    }
    // Budget spent with work left: yield, and come back at once.
    cx.waker().wake_by_ref();
    Poll::Pending
}

/// Reads once into `buf`'s spare room. A read that did not fill the room it was given drained
/// the socket, so its readiness is cleared at once (as tokio's own `poll_read` does on
/// epoll): the next attempt waits for new data instead of making a system call that can only
/// say "would block". Data arriving after the read is a new edge and wakes the task again.
pub(super) fn read_once(src: &TcpStream, buf: &mut BytesMut) -> io::Result<usize> {
    let room = buf.capacity() - buf.len();
    let mut drained = None;
    let read = src.try_io(tokio::io::Interest::READABLE, || {
        let n = src.try_read_buf(buf)?;
        if n > 0 && n < room {
            drained = Some(n);
            return Err(io::ErrorKind::WouldBlock.into());
        }
        Ok(n)
    });
    match (read, drained) {
        (Err(e), Some(n)) if e.kind() == io::ErrorKind::WouldBlock => Ok(n),
        (r, _) => r,
    }
}
