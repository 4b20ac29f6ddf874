//! Stand-in managers and agents that speak the 1514 framing over real sockets.
//!
//! They exist for the demo, the integration tests and the load tools: a [`Manager`] accepts
//! agent connections, records every frame per agent in arrival order, and answers as configured;
//! [`agent_payload`] builds an agent frame that carries a sequence number, so loss, duplication
//! and reordering can be counted on the other side. The ciphertext region holds clear marker
//! bytes: these stand-ins exercise routing and framing, not cryptography.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use tokio_util::codec::Framed;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::envelope::{AgentId, Envelope};
use crate::frame::FrameCodec;

/// Builds an agent -> manager payload: `!ID!#AES:` (or `#AES:` without an ID), then
/// `seq=<n>;`, then filler up to `size` bytes in total (at least the marker is written).
///
/// ```
/// use wazuh_proxy_core::envelope::AgentId;
/// use wazuh_proxy_core::sim::{agent_payload, payload_seq};
/// let p = agent_payload(AgentId::parse(b"001"), 42, 64);
/// assert!(p.starts_with(b"!001!#AES:seq=42;"));
/// assert_eq!(p.len(), 64);
/// assert_eq!(payload_seq(&p), Some(42));
/// ```
pub fn agent_payload(agent: Option<AgentId>, seq: u64, size: usize) -> Vec<u8> {
    let mut p = Vec::with_capacity(size.max(32));
    crate::envelope::write_header(&mut p, agent, crate::envelope::Cipher::Aes);
    p.extend_from_slice(format!("seq={seq};").as_bytes());
    let fill = b"abcdefghijklmnopqrstuvwxyz0123456789";
    let mut i = 0;
    while p.len() < size {
        p.push(fill[i % fill.len()]);
        i += 1;
    }
    p
}

/// Reads the sequence number written by [`agent_payload`].
pub fn payload_seq(payload: &[u8]) -> Option<u64> {
    let ct = Envelope::parse(payload).ok()?.ciphertext();
    let rest = ct.strip_prefix(b"seq=")?;
    let end = rest.iter().position(|&b| b == b';')?;
    std::str::from_utf8(&rest[..end]).ok()?.parse().ok()
}

/// How a stand-in manager answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reply {
    /// Never answers.
    Silent,
    /// Answers the first frame of each connection with one frame (like the startup ACK).
    AckFirst,
    /// Answers every frame with a frame of the same ciphertext (for round-trip measurements).
    Echo,
}

/// What a stand-in manager saw.
#[derive(Debug, Default)]
struct Seen {
    frames: HashMap<String, Vec<Bytes>>,
}

/// The per-agent refusals of a stand-in, modelled on remoted: it closes the connection of an
/// agent it will not serve (unknown or removed ID, `(1408): Invalid ID`), also one already
/// connected when its key is removed; and, with `key_in_use`, a second connection of an agent
/// whose first one is still open ("Agent key already in use").
#[derive(Debug, Default)]
struct Rules {
    refused: std::collections::HashSet<String>,
    key_in_use: bool,
    live: HashMap<String, usize>,
}

/// A stand-in manager on a real socket.
#[derive(Debug)]
pub struct Manager {
    addr: SocketAddr,
    name: String,
    seen: Arc<Mutex<Seen>>,
    accepted: Arc<AtomicUsize>,
    open: Arc<AtomicUsize>,
    rules: Arc<Mutex<Rules>>,
    refusals: Arc<AtomicUsize>,
    stop: CancellationToken,
    tasks: TaskTracker,
}

/// The reply a stand-in sends as its ACK: a tagged ciphertext carrying the manager's name.
pub fn ack_payload(manager: &str) -> Vec<u8> {
    format!("#AES:ack from {manager}").into_bytes()
}

impl Manager {
    /// Starts a stand-in manager on `bind` (use port 0 for any).
    ///
    /// # Errors
    /// When the address cannot be bound.
    pub async fn start(bind: SocketAddr, name: &str, reply: Reply) -> io::Result<Manager> {
        let listener = crate::net::bind_tcp(bind, crate::net::DEFAULT_BACKLOG)?;
        let addr = listener.local_addr()?;
        let m = Manager {
            addr,
            name: name.to_owned(),
            seen: Arc::default(),
            accepted: Arc::default(),
            open: Arc::default(),
            rules: Arc::default(),
            refusals: Arc::default(),
            stop: CancellationToken::new(),
            tasks: TaskTracker::new(),
        };
        let (seen, accepted, open, stop, tasks) = (
            m.seen.clone(),
            m.accepted.clone(),
            m.open.clone(),
            m.stop.clone(),
            m.tasks.clone(),
        );
        let (rules, refusals) = (m.rules.clone(), m.refusals.clone());
        let ack = Bytes::from(ack_payload(name));
        m.tasks.spawn(async move {
            loop {
                let (stream, peer) = tokio::select! {
                    _ = stop.cancelled() => break,
                    r = listener.accept() => match r { Ok(c) => c, Err(_) => continue },
                };
                accepted.fetch_add(1, Ordering::Relaxed);
                let (seen, open, stop, ack) =
                    (seen.clone(), open.clone(), stop.clone(), ack.clone());
                let (rules, refusals) = (rules.clone(), refusals.clone());
                tasks.spawn(async move {
                    open.fetch_add(1, Ordering::Relaxed);
                    let key = format!("ip:{}", peer.ip());
                    let mut framed = Framed::new(stream, FrameCodec::default());
                    let mut first = true;
                    let mut registered: Option<String> = None;
                    loop {
                        let frame = tokio::select! {
                            _ = stop.cancelled() => break,
                            f = framed.next() => match f { Some(Ok(f)) => f, _ => break },
                        };
                        let agent = Envelope::parse(&frame).ok().and_then(|e| e.agent_id());
                        let who = agent.map_or_else(|| key.clone(), |a| a.to_string());
                        {
                            let mut r = rules.lock().unwrap_or_else(|p| p.into_inner());
                            let in_use =
                                first && r.key_in_use && r.live.get(&who).is_some_and(|n| *n > 0);
                            if r.refused.contains(&who) || in_use {
                                // remoted logs why and closes the connection, answering nothing.
                                refusals.fetch_add(1, Ordering::Relaxed);
                                break;
                            }
                            if first {
                                *r.live.entry(who.clone()).or_default() += 1;
                                registered = Some(who.clone());
                            }
                        }
                        let answer = match reply {
                            Reply::Silent => None,
                            Reply::AckFirst if first => Some(ack.clone()),
                            Reply::AckFirst => None,
                            Reply::Echo => {
                                let ct = Envelope::parse(&frame)
                                    .map(|e| e.ciphertext().to_vec())
                                    .unwrap_or_default();
                                let mut p = b"#AES:".to_vec();
                                p.extend_from_slice(&ct);
                                Some(Bytes::from(p))
                            }
                        };
                        first = false;
                        seen.lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .frames
                            .entry(who)
                            .or_default()
                            .push(frame);
                        if let Some(a) = answer {
                            if framed.send(a).await.is_err() {
                                break;
                            }
                        }
                    }
                    if let Some(who) = registered {
                        let mut r = rules.lock().unwrap_or_else(|p| p.into_inner());
                        if let Some(n) = r.live.get_mut(&who) {
                            *n = n.saturating_sub(1);
                        }
                    }
                    open.fetch_sub(1, Ordering::Relaxed);
                });
            }
        });
        Ok(m)
    }

    /// Refuses `agent` (its ID, or `ip:<addr>`) from now on, as remoted does once an agent is
    /// removed: its next frame on any connection closes that connection, unanswered.
    pub fn refuse(&self, agent: &str) {
        self.rules
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .refused
            .insert(agent.to_owned());
    }

    /// Refuses a second connection of an agent whose first one is open ("Agent key already
    /// in use").
    pub fn refuse_key_in_use(&self, on: bool) {
        self.rules
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .key_in_use = on;
    }

    /// Connections closed as refusals so far.
    pub fn refusals(&self) -> usize {
        self.refusals.load(Ordering::Relaxed)
    }

    /// The address agents (or the proxy) connect to.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The manager's name (it is in its ACK).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Frames received from one agent (its ID, or `ip:<addr>` for ID-less frames), in order.
    pub fn frames_from(&self, agent: &str) -> Vec<Bytes> {
        self.seen
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .frames
            .get(agent)
            .cloned()
            .unwrap_or_default()
    }

    /// The agents seen, sorted.
    pub fn agents(&self) -> Vec<String> {
        let mut v: Vec<_> = self
            .seen
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .frames
            .keys()
            .cloned()
            .collect();
        v.sort();
        v
    }

    /// Total frames received.
    pub fn frame_count(&self) -> usize {
        self.seen
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .frames
            .values()
            .map(Vec::len)
            .sum()
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> usize {
        self.accepted.load(Ordering::Relaxed)
    }

    /// Connections open now.
    pub fn open_connections(&self) -> usize {
        self.open.load(Ordering::Relaxed)
    }

    /// Stops listening and closes every connection (a manager that dies), then waits for it.
    pub async fn stop(&self) {
        self.stop.cancel();
        self.tasks.close();
        self.tasks.wait().await;
    }
}

impl Drop for Manager {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}
