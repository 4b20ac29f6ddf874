//! Handing listening sockets and live agent connections to another process, over a Unix
//! socket with `SCM_RIGHTS` (binary upgrade without refusing a connection or dropping an
//! agent).
//!
//! The old process sends each listening socket ([`Message::Listener`]), then
//! [`Message::ListenersDone`]; the new process starts serving on them and answers
//! [`Message::Ready`]; the old one stops accepting and hands each agent connection over at a
//! frame boundary ([`Message::Agent`], see [`crate::relay::AgentRelay::hand_over_all`]), then
//! sends [`Message::Done`]. The agents' TCP connections never close.
//!
//! This module is the wire format only; [`crate::proxy::handover`] runs the exchange.
//!
//! Wire format of one message: `u32` little-endian length of the rest, a kind byte, then
//! fields, each a `u32` length and its bytes. A file descriptor, when the message carries one,
//! travels as ancillary data on the message's first byte.

use std::io::{self, IoSlice, IoSliceMut};
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

use tokio::io::Interest;
use tokio::net::UnixStream;

use zeroize::Zeroizing;

use crate::envelope::AgentId;
use crate::session::SessionKey;

/// An agent connection in transit between two processes.
#[derive(Debug)]
pub struct AgentInTransit {
    /// The listener it was accepted on (by name).
    pub listener: String,
    /// The agent's address.
    pub client: SocketAddr,
    /// The agent.
    pub key: SessionKey,
    /// Bytes read from the agent and not forwarded yet: whole frames, then the start of an
    /// incomplete one.
    pub pending: Vec<u8>,
    /// The frame (payload) a new manager must see first: the agent's startup or latest
    /// keepalive message.
    pub replay: Vec<u8>,
    /// The agent's socket.
    pub socket: OwnedFd,
}

/// One hand-over message.
#[derive(Debug)]
#[non_exhaustive]
pub enum Message {
    /// A listening socket.
    Listener {
        /// The listener's name in the configuration.
        name: String,
        /// Its address.
        addr: SocketAddr,
        /// Whether it is a UDP socket.
        udp: bool,
        /// The socket.
        socket: OwnedFd,
    },
    /// Every listener has been sent.
    ListenersDone,
    /// The new process serves on the listeners (sent by the new process).
    Ready,
    /// An agent connection.
    Agent(AgentInTransit),
    /// A backend the operator drained on a listener (operator state outlives the process).
    Drained {
        /// The listener's name.
        listener: String,
        /// The drained backend.
        backend: SocketAddr,
    },
    /// A key reply the enrollment front keeps for a retry (on the listener of that name).
    /// Its bytes travel in zeroized buffers.
    #[cfg(feature = "enroll")]
    EnrollReply {
        /// The enroll listener's name.
        listener: String,
        /// The kept reply.
        kept: crate::enroll::KeptReply,
    },
    /// Nothing more follows.
    Done,
}

/// Why a hand-over message could not be read or written.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HandoverError {
    /// The socket failed.
    #[error("hand-over socket: {0}")]
    Io(#[from] io::Error),
    /// The peer sent something this version does not understand.
    #[error("malformed hand-over message: {0}")]
    Malformed(&'static str),
    /// A message that must carry a socket came without one.
    #[error("hand-over message without its socket")]
    MissingSocket,
}

/// Largest message accepted (an agent's pending bytes are at most two frames).
const MAX_MESSAGE: usize = 1 << 20;

const LISTENER: u8 = 1;
const LISTENERS_DONE: u8 = 2;
const READY: u8 = 3;
const AGENT: u8 = 4;
const DONE: u8 = 5;
const DRAINED: u8 = 6;
const ENROLL_REPLY: u8 = 7;

fn put(out: &mut Vec<u8>, field: &[u8]) {
    out.extend_from_slice(&(field.len() as u32).to_le_bytes());
    out.extend_from_slice(field);
}

/// Encodes a message. The buffers are zeroized when dropped: an enrollment reply carries a
/// password and a key.
fn encode(msg: &Message) -> (Zeroizing<Vec<u8>>, Option<RawFd>) {
    let mut body = Zeroizing::new(Vec::new());
    let fd = match msg {
        Message::Listener {
            name,
            addr,
            udp,
            socket,
        } => {
            body.push(LISTENER);
            put(&mut body, name.as_bytes());
            put(&mut body, addr.to_string().as_bytes());
            put(&mut body, &[u8::from(*udp)]);
            Some(socket.as_raw_fd())
        }
        Message::ListenersDone => {
            body.push(LISTENERS_DONE);
            None
        }
        Message::Ready => {
            body.push(READY);
            None
        }
        Message::Agent(h) => {
            body.push(AGENT);
            put(&mut body, h.listener.as_bytes());
            put(&mut body, h.client.to_string().as_bytes());
            put(&mut body, h.key.to_string().as_bytes());
            put(&mut body, &h.pending);
            put(&mut body, &h.replay);
            Some(h.socket.as_raw_fd())
        }
        Message::Done => {
            body.push(DONE);
            None
        }
        Message::Drained { listener, backend } => {
            body.push(DRAINED);
            put(&mut body, listener.as_bytes());
            put(&mut body, backend.to_string().as_bytes());
            None
        }
        #[cfg(feature = "enroll")]
        Message::EnrollReply { listener, kept } => {
            body.push(ENROLL_REPLY);
            put(&mut body, listener.as_bytes());
            put(&mut body, kept.source().to_string().as_bytes());
            put(&mut body, kept.request());
            put(&mut body, kept.reply());
            let ms = u64::try_from(kept.left().as_millis()).unwrap_or(u64::MAX);
            put(&mut body, &ms.to_le_bytes());
            None
        }
    };
    let mut out = Zeroizing::new(Vec::with_capacity(4 + body.len()));
    out.extend_from_slice(&(body.len() as u32).to_le_bytes());
    out.extend_from_slice(&body);
    (out, fd)
}

struct Fields<'a>(&'a [u8]);

impl<'a> Fields<'a> {
    fn next(&mut self) -> Result<&'a [u8], HandoverError> {
        let len = self
            .0
            .first_chunk::<4>()
            .ok_or(HandoverError::Malformed("truncated field"))?;
        let len = u32::from_le_bytes(*len) as usize;
        let field = self
            .0
            .get(4..4 + len)
            .ok_or(HandoverError::Malformed("truncated field"))?;
        self.0 = &self.0[4 + len..];
        Ok(field)
    }
    fn text(&mut self) -> Result<&'a str, HandoverError> {
        std::str::from_utf8(self.next()?)
            .map_err(|_| HandoverError::Malformed("text field is not UTF-8"))
    }
    fn addr(&mut self) -> Result<SocketAddr, HandoverError> {
        self.text()?
            .parse()
            .map_err(|_| HandoverError::Malformed("bad socket address"))
    }
}

fn parse_key(text: &str) -> Result<SessionKey, HandoverError> {
    match text.strip_prefix("ip:") {
        Some(ip) => ip
            .parse()
            .map(SessionKey::Source)
            .map_err(|_| HandoverError::Malformed("bad agent source")),
        None => AgentId::parse(text.as_bytes())
            .map(SessionKey::Agent)
            .ok_or(HandoverError::Malformed("bad agent ID")),
    }
}

fn decode(body: &[u8], fd: Option<OwnedFd>) -> Result<Message, HandoverError> {
    let (&kind, rest) = body
        .split_first()
        .ok_or(HandoverError::Malformed("empty message"))?;
    let mut f = Fields(rest);
    Ok(match kind {
        LISTENER => Message::Listener {
            name: f.text()?.to_owned(),
            addr: f.addr()?,
            udp: f.next()? == [1],
            socket: fd.ok_or(HandoverError::MissingSocket)?,
        },
        LISTENERS_DONE => Message::ListenersDone,
        READY => Message::Ready,
        AGENT => Message::Agent(AgentInTransit {
            listener: f.text()?.to_owned(),
            client: f.addr()?,
            key: parse_key(f.text()?)?,
            pending: f.next()?.to_vec(),
            replay: f.next()?.to_vec(),
            socket: fd.ok_or(HandoverError::MissingSocket)?,
        }),
        DONE => Message::Done,
        DRAINED => Message::Drained {
            listener: f.text()?.to_owned(),
            backend: f.addr()?,
        },
        #[cfg(not(feature = "enroll"))]
        ENROLL_REPLY => {
            return Err(HandoverError::Malformed(
                "an enrollment reply, and this build has no enrollment",
            ))
        }
        #[cfg(feature = "enroll")]
        ENROLL_REPLY => {
            let listener = f.text()?.to_owned();
            let source = f
                .text()?
                .parse()
                .map_err(|_| HandoverError::Malformed("bad enrollment source"))?;
            let request = f.next()?.to_vec();
            let reply = f.next()?.to_vec();
            let ms = f
                .next()?
                .try_into()
                .map(u64::from_le_bytes)
                .map_err(|_| HandoverError::Malformed("bad time left"))?;
            Message::EnrollReply {
                listener,
                kept: crate::enroll::KeptReply::new(
                    source,
                    request,
                    reply,
                    std::time::Duration::from_millis(ms),
                ),
            }
        }
        _ => return Err(HandoverError::Malformed("unknown message kind")),
    })
}

/// Sends one message (and its socket, if any).
///
/// # Errors
/// When the Unix socket fails.
pub async fn send(stream: &UnixStream, msg: &Message) -> Result<(), HandoverError> {
    use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};
    let (bytes, fd) = encode(msg);
    let fds: Vec<RawFd> = fd.into_iter().collect();
    // The socket rides on the first byte; the rest may follow in plain writes.
    let first = stream
        .async_io(Interest::WRITABLE, || {
            let iov = [IoSlice::new(&bytes)];
            let cmsg: Vec<ControlMessage<'_>> = if fds.is_empty() {
                Vec::new()
            } else {
                vec![ControlMessage::ScmRights(&fds)]
            };
            sendmsg::<()>(
                stream.as_raw_fd(),
                &iov,
                &cmsg,
                MsgFlags::MSG_NOSIGNAL,
                None,
            )
            .map_err(io::Error::from)
        })
        .await?;
    let mut at = first;
    while at < bytes.len() {
        stream.writable().await?;
        match stream.try_write(&bytes[at..]) {
            Ok(n) => at += n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// Takes ownership of a descriptor the kernel just passed to this process.
#[allow(unsafe_code)]
fn adopt_fd(fd: RawFd) -> OwnedFd {
    // SAFETY: `fd` comes from an SCM_RIGHTS message received by this process: the kernel
    // installed it as a new descriptor that nothing else in the process owns or will close.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

/// Receives one message, or `None` when the peer closed the socket between messages.
///
/// # Errors
/// When the socket fails or the message is malformed.
pub async fn recv(stream: &UnixStream) -> Result<Option<Message>, HandoverError> {
    use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags};
    let mut header = [0u8; 4];
    let mut got = 0;
    let mut fd: Option<OwnedFd> = None;
    while got < header.len() {
        let (n, fds) = stream
            .async_io(Interest::READABLE, || {
                let mut cmsg = nix::cmsg_space!([RawFd; 2]);
                let mut iov = [IoSliceMut::new(&mut header[got..])];
                let msg = recvmsg::<()>(
                    stream.as_raw_fd(),
                    &mut iov,
                    Some(&mut cmsg),
                    MsgFlags::MSG_CMSG_CLOEXEC,
                )
                .map_err(io::Error::from)?;
                let mut fds = Vec::new();
                for c in msg.cmsgs().map_err(io::Error::from)? {
                    if let ControlMessageOwned::ScmRights(list) = c {
                        fds.extend(list);
                    }
                }
                Ok((msg.bytes, fds))
            })
            .await?;
        for raw in fds {
            let owned = adopt_fd(raw);
            if fd.is_none() {
                fd = Some(owned);
            }
        }
        if n == 0 {
            return if got == 0 {
                Ok(None)
            } else {
                Err(HandoverError::Malformed("truncated message"))
            };
        }
        got += n;
    }
    let len = u32::from_le_bytes(header) as usize;
    if len == 0 || len > MAX_MESSAGE {
        return Err(HandoverError::Malformed("message length out of range"));
    }
    // Zeroized when dropped: it may hold an enrollment reply.
    let mut body = Zeroizing::new(vec![0u8; len]);
    let mut at = 0;
    while at < len {
        stream.readable().await?;
        match stream.try_read(&mut body[at..]) {
            Ok(0) => return Err(HandoverError::Malformed("truncated message")),
            Ok(n) => at += n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e.into()),
        }
    }
    decode(&body, fd).map(Some)
}

/// Duplicates a socket for sending (the sender keeps its own copy open until the receiver
/// has taken over).
///
/// # Errors
/// When the descriptor cannot be duplicated (descriptor limit).
pub(crate) fn dup(fd: BorrowedFd<'_>) -> io::Result<OwnedFd> {
    fd.try_clone_to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn messages_and_sockets_cross_a_socket_pair() {
        let (a, b) = UnixStream::pair().unwrap();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let agent = std::net::TcpStream::connect(addr).unwrap();
        let pending = vec![7u8; 70_000];
        send(
            &a,
            &Message::Listener {
                name: "agents".into(),
                addr,
                udp: false,
                socket: OwnedFd::from(listener),
            },
        )
        .await
        .unwrap();
        let handed = AgentInTransit {
            listener: "agents".into(),
            client: agent.local_addr().unwrap(),
            key: SessionKey::Agent(AgentId::parse(b"042").unwrap()),
            pending: pending.clone(),
            replay: b"#AES:startup".to_vec(),
            socket: OwnedFd::from(agent),
        };
        let send_all = async {
            send(&a, &Message::Agent(handed)).await.unwrap();
            send(&a, &Message::Done).await.unwrap();
            drop(a);
        };
        let recv_all = async {
            let mut got = Vec::new();
            while let Some(m) = recv(&b).await.unwrap() {
                got.push(m);
            }
            got
        };
        let ((), got) = tokio::join!(send_all, recv_all);
        assert_eq!(got.len(), 3);
        match &got[0] {
            Message::Listener {
                name,
                addr: a2,
                udp,
                socket,
            } => {
                assert_eq!((name.as_str(), *a2, *udp), ("agents", addr, false));
                let l = std::net::TcpListener::from(socket.try_clone().unwrap());
                assert_eq!(l.local_addr().unwrap(), addr);
            }
            other => panic!("{other:?}"),
        }
        match &got[1] {
            Message::Agent(h) => {
                assert_eq!(h.key.to_string(), "042");
                assert_eq!(h.pending, pending);
                assert_eq!(h.replay, b"#AES:startup");
                let s = std::net::TcpStream::from(h.socket.try_clone().unwrap());
                assert_eq!(s.peer_addr().unwrap(), addr);
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(got[2], Message::Done));
    }

    #[cfg(feature = "enroll")]
    #[test]
    fn enrollment_replies_round_trip_redacted() {
        let kept = crate::enroll::KeptReply::new(
            "10.0.0.7".parse().unwrap(),
            b"OSSEC PASS: s3cret OSSEC A:'web-01'\n".to_vec(),
            b"OSSEC K:'001 web-01 any 0123abcd'".to_vec(),
            std::time::Duration::from_millis(123_456),
        );
        let msg = Message::EnrollReply {
            listener: "enrollment".into(),
            kept,
        };
        assert!(!format!("{msg:?}").contains("s3cret"));
        assert!(!format!("{msg:?}").contains("0123abcd"));
        let (bytes, fd) = encode(&msg);
        assert!(fd.is_none());
        let Ok(Message::EnrollReply { listener, kept }) = decode(&bytes[4..], None) else {
            panic!("not an enrollment reply")
        };
        assert_eq!(listener, "enrollment");
        assert_eq!(kept.source().to_string(), "10.0.0.7");
        assert_eq!(kept.request(), b"OSSEC PASS: s3cret OSSEC A:'web-01'\n");
        assert_eq!(kept.reply(), b"OSSEC K:'001 web-01 any 0123abcd'");
        assert_eq!(kept.left(), std::time::Duration::from_millis(123_456));
        // Truncated: an error, not a panic.
        assert!(decode(&bytes[4..bytes.len() - 3], None).is_err());
    }

    #[test]
    fn malformed_messages_are_errors() {
        assert!(decode(&[], None).is_err());
        assert!(decode(&[99], None).is_err());
        assert!(matches!(
            decode(&[AGENT, 200, 0, 0, 0], None),
            Err(HandoverError::Malformed(_))
        ));
        let (bytes, _) = encode(&Message::Ready);
        assert!(matches!(decode(&bytes[4..], None), Ok(Message::Ready)));
    }
}
