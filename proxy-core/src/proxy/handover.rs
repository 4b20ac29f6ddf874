//! Hand-over orchestration: which listeners and sessions go to a successor process and in
//! what order, over the wire format of [`crate::handover`]. The old process calls
//! [`Proxy::offer_listeners`] then [`Proxy::hand_over`]; the new one
//! [`receive_inheritance`], [`Proxy::start_with`](super::Proxy::start_with), then
//! [`Proxy::adopt`].
//!
//! The operator's state ([`OperatorState`]) travels with the listeners, one
//! [`Message::Drained`] per drained backend before [`Message::ListenersDone`]: the messages
//! every version since drains were handed over sends and reads, so an old process hands
//! over to a new one (and back) with its drains.

use std::net::SocketAddr;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::UnixStream;
use tokio_util::task::TaskTracker;

#[cfg(feature = "enroll")]
use crate::enroll::EnrollFront;
use crate::handover::{dup, recv, send, AgentInTransit, HandoverError, Message};
use crate::relay::AgentRelay;

use super::{OperatorState, Proxy};

impl Proxy {
    /// Old process, step 1: sends every listening socket and the operator's state (see
    /// [`Proxy::operator_state`]), then waits for the successor to say it serves them. This process keeps
    /// accepting until [`Proxy::hand_over`].
    ///
    /// # Errors
    /// When the socket fails or the successor does not answer [`Message::Ready`].
    pub async fn offer_listeners(&self, stream: &UnixStream) -> Result<(), HandoverError> {
        let sockets = self.listener_sockets();
        let offered: Vec<_> = sockets
            .iter()
            .map(|(n, a, u, fd)| (n.clone(), *a, *u, fd.as_fd()))
            .collect();
        offer_listeners_with(stream, &offered, &self.operator_state()).await
    }

    /// Old process, step 2: stops accepting and hands every agent session and kept
    /// enrollment reply to the successor (see [`hand_over_all_or_keep`]); returns how many
    /// sessions and replies went.
    ///
    /// # Errors
    /// When the socket fails; what was not sent has been taken back, and the caller may
    /// [`Proxy::resume_accepting`].
    pub async fn hand_over(&self, stream: &UnixStream) -> Result<(usize, usize), HandoverError> {
        self.stop_accepting().cancel();
        hand_over_all_or_keep(
            stream,
            &self.agent_relays(),
            &self.fronts(),
            self.drain_timeout(),
            self.tracker(),
        )
        .await
    }

    /// New process, step 2 (serving on the inherited listeners): says so, then adopts every
    /// session and kept enrollment reply the old process hands over; returns how many.
    ///
    /// # Errors
    /// When the socket fails.
    pub async fn adopt(&self, stream: &UnixStream) -> Result<(usize, usize), HandoverError> {
        adopt_all(stream, &self.agent_relays(), &self.fronts(), self.tracker()).await
    }

    fn fronts(&self) -> Vec<(String, Arc<EnrollFront>)> {
        #[cfg(feature = "enroll")]
        return self.enroll_fronts();
        #[cfg(not(feature = "enroll"))]
        Vec::new()
    }
}

/// Built without the `enroll` feature there is no enrollment front: this uninhabited
/// stand-in keeps the hand-over's signatures the same.
#[cfg(not(feature = "enroll"))]
#[derive(Debug)]
pub enum EnrollFront {}

/// A listening socket received from the previous process.
#[derive(Debug)]
pub struct InheritedListener {
    /// Listener name.
    pub name: String,
    /// Its address.
    pub addr: SocketAddr,
    /// Whether it is UDP.
    pub udp: bool,
    /// The socket.
    pub socket: OwnedFd,
}

/// What a new process receives from the old one before it serves: the listening sockets
/// and the operator's state, for [`Proxy::start_with`](super::Proxy::start_with).
#[derive(Debug, Default)]
pub struct Inheritance {
    /// The listening sockets.
    pub listeners: Vec<InheritedListener>,
    /// The operator's decisions in the old process (its drains), kept by the new one.
    pub state: OperatorState,
}

/// Old process, step 1: sends every listening socket (duplicated: this process keeps
/// accepting on its own copy until the new one is ready), then waits for the new process to
/// say it serves them.
///
/// # Errors
/// When the socket fails or the new process does not answer [`Message::Ready`].
pub async fn offer_listeners(
    stream: &UnixStream,
    listeners: &[(String, SocketAddr, bool, BorrowedFd<'_>)],
) -> Result<(), HandoverError> {
    offer_listeners_with(stream, listeners, &OperatorState::new()).await
}

/// [`offer_listeners`], with the operator's state, so that the new process applies it before
/// it accepts anything.
///
/// # Errors
/// When the socket fails or the new process does not answer [`Message::Ready`].
pub async fn offer_listeners_with(
    stream: &UnixStream,
    listeners: &[(String, SocketAddr, bool, BorrowedFd<'_>)],
    state: &OperatorState,
) -> Result<(), HandoverError> {
    for (name, addr, udp, fd) in listeners {
        let socket = dup(*fd)?;
        send(
            stream,
            &Message::Listener {
                name: name.clone(),
                addr: *addr,
                udp: *udp,
                socket,
            },
        )
        .await?;
    }
    for (listener, backend) in state.drained() {
        send(
            stream,
            &Message::Drained {
                listener: listener.to_owned(),
                backend,
            },
        )
        .await?;
    }
    send(stream, &Message::ListenersDone).await?;
    match recv(stream).await? {
        Some(Message::Ready) => Ok(()),
        Some(_) => Err(HandoverError::Malformed("expected Ready")),
        None => Err(HandoverError::Malformed(
            "the new process closed the hand-over socket before it was ready",
        )),
    }
}

/// Old process, step 2 (after it stopped accepting): hands every agent session of `relays`
/// to the new process, and returns how many were handed once every connection has left
/// (or `deadline` passed; what is left then is closed by the caller's drain).
///
/// # Errors
/// When the socket fails.
pub async fn hand_over_sessions(
    stream: &UnixStream,
    relays: &[Arc<AgentRelay>],
    deadline: Duration,
) -> Result<usize, HandoverError> {
    hand_over_all(stream, relays, &[], deadline)
        .await
        .map(|(sessions, _)| sessions)
}

/// Old process, step 2 with enrollment: the agent sessions as [`hand_over_sessions`] does,
/// then, once the enroll listeners' connections in progress have ended (or `deadline`
/// passed), every reply they keep for a retry ([`Message::EnrollReply`]). Returns the number
/// of sessions and of replies handed.
///
/// # Errors
/// When the socket fails.
pub async fn hand_over_all(
    stream: &UnixStream,
    relays: &[Arc<AgentRelay>],
    fronts: &[(String, Arc<EnrollFront>)],
    deadline: Duration,
) -> Result<(usize, usize), HandoverError> {
    hand_over_inner(stream, relays, fronts, deadline, None).await
}

/// [`hand_over_all`], and when it fails (the new process died or broke the protocol after
/// it said it was ready) the sessions not handed yet stay in this process: the relays stop
/// handing over, and every session already detached for the hand-over but not sent is
/// adopted again here, on `tracker` (its agent never sees its connection close; it reconnects
/// to a manager as after an upgrade). Kept enrollment replies not sent stay kept. Sessions
/// sent before the failure belonged to the new process and are gone with it.
///
/// # Errors
/// When the socket fails; what is left has then been taken back.
pub async fn hand_over_all_or_keep(
    stream: &UnixStream,
    relays: &[Arc<AgentRelay>],
    fronts: &[(String, Arc<EnrollFront>)],
    deadline: Duration,
    tracker: &TaskTracker,
) -> Result<(usize, usize), HandoverError> {
    hand_over_inner(stream, relays, fronts, deadline, Some(tracker)).await
}

/// Adopts `h` on the relay of its listener in this process.
fn adopt_here(relays: &[Arc<AgentRelay>], tracker: &TaskTracker, h: AgentInTransit) {
    let relay = relays
        .iter()
        .find(|r| r.name() == h.listener)
        .or_else(|| relays.first());
    if let Some(r) = relay {
        tracker.spawn(r.clone().adopt(h));
    }
}

/// Takes everything back after a failed hand-over (see [`hand_over_all_or_keep`]).
fn take_back(
    relays: &[Arc<AgentRelay>],
    tracker: &TaskTracker,
    unsent: Option<AgentInTransit>,
    mut rx: tokio::sync::mpsc::UnboundedReceiver<AgentInTransit>,
) {
    for r in relays {
        r.cancel_hand_over();
    }
    let mut back = 0;
    if let Some(h) = unsent {
        adopt_here(relays, tracker, h);
        back += 1;
    }
    while let Ok(h) = rx.try_recv() {
        adopt_here(relays, tracker, h);
        back += 1;
    }
    tracing::warn!(
        sessions = back,
        "hand-over failed: taking back the agent sessions not handed yet"
    );
    // Sessions that were finishing a frame when the hand-over stopped arrive later; the
    // channel closes when a next hand-over replaces it.
    let relays = relays.to_vec();
    let t = tracker.clone();
    tracker.spawn(async move {
        while let Some(h) = rx.recv().await {
            tracing::info!(agent = %h.key, "hand-over failed: taking back an agent session");
            adopt_here(&relays, &t, h);
        }
    });
}

async fn hand_over_inner(
    stream: &UnixStream,
    relays: &[Arc<AgentRelay>],
    fronts: &[(String, Arc<EnrollFront>)],
    deadline: Duration,
    keep: Option<&TaskTracker>,
) -> Result<(usize, usize), HandoverError> {
    use std::sync::atomic::Ordering;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    for r in relays {
        r.hand_over_all(tx.clone());
    }
    drop(tx);
    let until = tokio::time::Instant::now() + deadline;
    let mut handed = 0;
    loop {
        let idle = relays
            .iter()
            .all(|r| r.stats().active.load(Ordering::Relaxed) <= 0);
        tokio::select! {
            h = rx.recv() => match h {
                Some(h) => {
                    let msg = Message::Agent(h);
                    if let Err(e) = send(stream, &msg).await {
                        if let (Some(tracker), Message::Agent(h)) = (keep, msg) {
                            take_back(relays, tracker, Some(h), rx);
                        }
                        return Err(e);
                    }
                    handed += 1;
                }
                None => break,
            },
            _ = tokio::time::sleep(Duration::from_millis(20)) => {
                if idle && rx.is_empty() {
                    break;
                }
            }
            _ = tokio::time::sleep_until(until) => break,
        }
    }
    #[cfg(not(feature = "enroll"))]
    let replies = {
        let _ = fronts;
        0
    };
    #[cfg(feature = "enroll")]
    let replies = match hand_over_replies(stream, fronts, until).await {
        Ok(n) => n,
        Err((e, unsent)) => {
            if let Some(tracker) = keep {
                for (front, reply) in unsent {
                    front.keep(reply);
                }
                take_back(relays, tracker, None, rx);
            }
            return Err(e);
        }
    };
    if let Err(e) = send(stream, &Message::Done).await {
        if let Some(tracker) = keep {
            take_back(relays, tracker, None, rx);
        }
        return Err(e);
    }
    Ok((handed, replies))
}

/// The kept enrollment replies, once the enrollments in progress have ended (or `until`);
/// on failure, the replies not sent with their front.
#[cfg(feature = "enroll")]
#[allow(clippy::type_complexity)]
async fn hand_over_replies<'f>(
    stream: &UnixStream,
    fronts: &'f [(String, Arc<EnrollFront>)],
    until: tokio::time::Instant,
) -> Result<
    usize,
    (
        HandoverError,
        Vec<(&'f EnrollFront, crate::enroll::KeptReply)>,
    ),
> {
    // An enrollment in progress may still keep a reply: wait for it (each is bounded by
    // the front's timeouts), then hand over what is kept.
    while fronts.iter().any(|(_, f)| f.active() > 0) && tokio::time::Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut replies = 0;
    for (name, front) in fronts {
        let mut kept = front.take_kept().into_iter();
        while let Some(reply) = kept.next() {
            let msg = Message::EnrollReply {
                listener: name.clone(),
                kept: reply,
            };
            if let Err(e) = send(stream, &msg).await {
                let mut unsent = Vec::new();
                if let Message::EnrollReply { kept: reply, .. } = msg {
                    unsent.push((&**front, reply));
                }
                unsent.extend(kept.map(|r| (&**front, r)));
                // The other fronts' replies were not taken yet: they stay kept.
                return Err((e, unsent));
            }
            replies += 1;
        }
    }
    Ok(replies)
}

/// New process, step 1: receives the listening sockets and the operator's state.
///
/// # Errors
/// When the socket fails or the old process sends something unexpected.
pub async fn receive_inheritance(stream: &UnixStream) -> Result<Inheritance, HandoverError> {
    let mut out = Inheritance::default();
    loop {
        match recv(stream).await? {
            Some(Message::Listener {
                name,
                addr,
                udp,
                socket,
            }) => out.listeners.push(InheritedListener {
                name,
                addr,
                udp,
                socket,
            }),
            // Matched to this process's listeners by name when it starts (a listener whose
            // socket is not inherited, at a new address, keeps its drains too).
            Some(Message::Drained { listener, backend }) => {
                out.state.drain(&listener, backend);
            }
            Some(Message::ListenersDone) => return Ok(out),
            Some(_) => return Err(HandoverError::Malformed("expected a listener")),
            None => {
                return Err(HandoverError::Malformed(
                    "the old process closed the hand-over socket early",
                ))
            }
        }
    }
}

/// New process, step 2 (serving on the inherited listeners): says so, then adopts every
/// agent session the old process hands over, on the relay with the same listener name.
/// Returns the number adopted.
///
/// # Errors
/// When the socket fails.
pub async fn adopt_sessions(
    stream: &UnixStream,
    relays: &[Arc<AgentRelay>],
    tracker: &TaskTracker,
) -> Result<usize, HandoverError> {
    adopt_all(stream, relays, &[], tracker)
        .await
        .map(|(sessions, _)| sessions)
}

/// New process, step 2 with enrollment: as [`adopt_sessions`], and every kept enrollment
/// reply goes to the enroll listener of the same name (dropped, zeroized, when there is
/// none). Returns the number of sessions adopted and of replies kept.
///
/// # Errors
/// When the socket fails.
pub async fn adopt_all(
    stream: &UnixStream,
    relays: &[Arc<AgentRelay>],
    fronts: &[(String, Arc<EnrollFront>)],
    tracker: &TaskTracker,
) -> Result<(usize, usize), HandoverError> {
    #[cfg(not(feature = "enroll"))]
    let _ = fronts;
    send(stream, &Message::Ready).await?;
    let mut adopted = 0;
    #[cfg_attr(not(feature = "enroll"), allow(unused_mut))]
    let mut kept = 0;
    loop {
        match recv(stream).await? {
            Some(Message::Agent(h)) => {
                let relay = relays
                    .iter()
                    .find(|r| r.name() == h.listener)
                    .or_else(|| relays.first());
                match relay {
                    Some(r) => {
                        tracker.spawn(r.clone().adopt(h));
                        adopted += 1;
                    }
                    None => {
                        tracing::warn!(listener = %h.listener, "no agent listener to adopt a session; closing it")
                    }
                }
            }
            #[cfg(feature = "enroll")]
            Some(Message::EnrollReply {
                listener,
                kept: reply,
            }) => match fronts.iter().find(|(n, _)| *n == listener) {
                Some((_, front)) => kept += usize::from(front.keep(reply)),
                None => {
                    tracing::warn!(listener = %listener, "no enroll listener of that name to keep an enrollment reply; dropped")
                }
            },
            Some(Message::Done) | None => return Ok((adopted, kept)),
            Some(_) => return Err(HandoverError::Malformed("expected an agent session")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn listener() -> (SocketAddr, OwnedFd) {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        (l.local_addr().unwrap(), OwnedFd::from(l))
    }

    /// What a process of the previous release sends: each drain as its own message, after
    /// the listeners, which may name a listener it does not hand over.
    #[tokio::test]
    async fn the_state_is_read_from_the_drain_messages_of_an_older_process() {
        let (old, new) = UnixStream::pair().unwrap();
        let (addr, socket) = listener();
        let (b1, b2): (SocketAddr, SocketAddr) = (
            "10.0.0.1:1514".parse().unwrap(),
            "10.0.0.2:1514".parse().unwrap(),
        );
        let older = async {
            let listener = Message::Listener {
                name: "agents".into(),
                addr,
                udp: false,
                socket,
            };
            send(&old, &listener).await.unwrap();
            for (l, b) in [("agents", b2), ("agents", b1), ("gone", b1)] {
                let m = Message::Drained {
                    listener: l.into(),
                    backend: b,
                };
                send(&old, &m).await.unwrap();
            }
            send(&old, &Message::ListenersDone).await.unwrap();
        };
        let ((), got) = tokio::join!(older, receive_inheritance(&new));
        let got = got.unwrap();
        assert_eq!(got.listeners.len(), 1);
        assert_eq!(got.listeners[0].addr, addr);
        let want: OperatorState = [("agents", b1), ("agents", b2), ("gone", b1)]
            .into_iter()
            .collect();
        assert_eq!(got.state, want);
    }

    /// What a process of the previous release reads: the same drain messages.
    #[tokio::test]
    async fn the_state_goes_as_drain_messages_an_older_process_reads() {
        let (old, new) = UnixStream::pair().unwrap();
        let (addr, socket) = listener();
        let state: OperatorState = [
            ("agents", "10.0.0.1:1514".parse().unwrap()),
            ("more", "10.0.0.2:1514".parse().unwrap()),
        ]
        .into_iter()
        .collect();
        let older = async {
            let mut drained = Vec::new();
            loop {
                match recv(&new).await.unwrap() {
                    Some(Message::Listener { .. }) => {}
                    Some(Message::Drained { listener, backend }) => {
                        drained.push((listener, backend))
                    }
                    Some(Message::ListenersDone) => break,
                    other => panic!("{other:?}"),
                }
            }
            send(&new, &Message::Ready).await.unwrap();
            drained
        };
        let offered = [("agents".to_owned(), addr, false, socket.as_fd())];
        let (sent, drained) = tokio::join!(offer_listeners_with(&old, &offered, &state), older);
        sent.unwrap();
        assert_eq!(drained.into_iter().collect::<OperatorState>(), state);
    }
}
