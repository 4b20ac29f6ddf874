//! The stand-in manager's sockets: accepts agent connections and applies [`Admission`]'s
//! verdicts, records what arrives, answers as configured.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use tokio::io::AsyncWriteExt;
use tokio::sync::mpsc;
use tokio_util::codec::Framed;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::remoted::{Admission, Misbehave, Verdict, OVERTAKE_TIME};
use crate::cipher::{self, Counters, Decoder};
use crate::control::{self, Control, Message};
use crate::envelope::Envelope;
use crate::frame::FrameCodec;
use crate::keys::{AgentKey, KeySet};

/// How a stand-in manager answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reply {
    /// Never answers (`#ping` apart).
    Silent,
    /// Without keys: answers the first frame of each connection with one frame (like the
    /// startup ACK). With keys: answers every startup and keepalive with a sealed
    /// `#!-agent ack `, as remoted does.
    AckFirst,
    /// Answers every frame with a frame of the same ciphertext (with keys: the same message,
    /// sealed again), for round-trip measurements.
    Echo,
}

/// Settings of a stand-in manager beyond its address.
#[derive(Debug, Clone)]
pub struct ManagerOptions {
    /// Its name (it is in its ACK without keys).
    pub name: String,
    /// How it answers.
    pub reply: Reply,
    /// The agents' keys: every message is decrypted (a message that does not decrypt closes
    /// its connection, as remoted does), and ACKs are sealed with the agent's key.
    pub keys: Option<Arc<KeySet>>,
    /// With keys: drop a message whose counters are not newer than the agent's last one.
    pub verify_msg_id: bool,
    /// remoted's `connection_overtake_time` (`None`: connections of one agent never refuse
    /// each other).
    pub overtake_time: Option<Duration>,
}

impl ManagerOptions {
    /// A manager named `name` answering with `reply`, no keys, no overtake check.
    pub fn new(name: &str, reply: Reply) -> ManagerOptions {
        ManagerOptions {
            name: name.to_owned(),
            reply,
            keys: None,
            verify_msg_id: false,
            overtake_time: None,
        }
    }
}

/// What a stand-in manager saw.
#[derive(Debug, Default)]
struct Seen {
    frames: HashMap<String, Vec<Bytes>>,
    messages: HashMap<String, Vec<Bytes>>,
}

/// One open connection: how to close it and how to send to its agent.
#[derive(Debug)]
struct Conn {
    close: CancellationToken,
    out: mpsc::Sender<Bytes>,
}

/// State shared by the accept loop, the connections and the handle.
#[derive(Debug)]
struct Shared {
    options: ManagerOptions,
    seen: Mutex<Seen>,
    admission: Mutex<Admission>,
    conns: Mutex<HashMap<u64, Conn>>,
    next_conn: AtomicU64,
    accepted: AtomicUsize,
    open: AtomicUsize,
    refusals: AtomicUsize,
    misbehaved: AtomicUsize,
    dropped: AtomicUsize,
    stop: CancellationToken,
    silent: CancellationToken,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// A stand-in manager on a real socket.
#[derive(Debug)]
pub struct Manager {
    addr: SocketAddr,
    shared: Arc<Shared>,
    tasks: TaskTracker,
}

impl Manager {
    /// Starts a stand-in manager on `bind` (use port 0 for any), without keys.
    ///
    /// # Errors
    /// When the address cannot be bound.
    pub async fn start(bind: SocketAddr, name: &str, reply: Reply) -> io::Result<Manager> {
        Manager::start_with(bind, ManagerOptions::new(name, reply)).await
    }

    /// Starts a stand-in manager on `bind` with every setting.
    ///
    /// # Errors
    /// When the address cannot be bound.
    pub async fn start_with(bind: SocketAddr, options: ManagerOptions) -> io::Result<Manager> {
        let listener = crate::net::bind_tcp(bind, crate::net::DEFAULT_BACKLOG)?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            admission: Mutex::new(Admission::new(options.overtake_time)),
            options,
            seen: Mutex::default(),
            conns: Mutex::default(),
            next_conn: AtomicU64::new(1),
            accepted: AtomicUsize::new(0),
            open: AtomicUsize::new(0),
            refusals: AtomicUsize::new(0),
            misbehaved: AtomicUsize::new(0),
            dropped: AtomicUsize::new(0),
            stop: CancellationToken::new(),
            silent: CancellationToken::new(),
        });
        let tasks = TaskTracker::new();
        let (sh, tr) = (shared.clone(), tasks.clone());
        tasks.spawn(async move {
            loop {
                let (stream, peer) = tokio::select! {
                    _ = sh.stop.cancelled() => break,
                    // A hung manager accepts nothing more (its kernel still completes
                    // handshakes into the backlog, as a hung process's does).
                    _ = sh.silent.cancelled() => { sh.stop.cancelled().await; break }
                    r = listener.accept() => match r { Ok(c) => c, Err(_) => continue },
                };
                sh.accepted.fetch_add(1, Ordering::Relaxed);
                let sh2 = sh.clone();
                tr.spawn(async move {
                    sh2.open.fetch_add(1, Ordering::Relaxed);
                    connection(&sh2, stream, peer).await;
                    sh2.open.fetch_sub(1, Ordering::Relaxed);
                });
            }
        });
        Ok(Manager {
            addr,
            shared,
            tasks,
        })
    }

    /// Refuses `agent` (its ID, or `ip:<addr>`) from now on, as remoted does once an agent is
    /// removed: its next frame on any connection closes that connection, unanswered.
    pub fn refuse(&self, agent: &str) {
        lock(&self.shared.admission).refuse(agent);
    }

    /// Serves `agent` again (its key is back).
    pub fn allow(&self, agent: &str) {
        lock(&self.shared.admission).allow(agent);
    }

    /// Refuses a second connection of an agent whose first one was heard from within remoted's
    /// default overtake time (60 s): "Agent key already in use". Off: both are served.
    pub fn refuse_key_in_use(&self, on: bool) {
        lock(&self.shared.admission).set_overtake(on.then_some(OVERTAKE_TIME));
    }

    /// Sets remoted's `connection_overtake_time` (`None`: connections never refuse each other).
    pub fn set_overtake_time(&self, overtake: Option<Duration>) {
        lock(&self.shared.admission).set_overtake(overtake);
    }

    /// Mistreats `agent`'s connections from now on (a manager-side protocol fault).
    pub fn misbehave(&self, agent: &str, how: Misbehave) {
        lock(&self.shared.admission).misbehave(agent, how);
    }

    /// Hangs: stops accepting, reading and answering, and keeps every connection open (no FIN,
    /// no RST), as a manager whose process froze. [`Manager::stop`] still closes everything.
    pub fn hang(&self) {
        self.shared.silent.cancel();
    }

    /// Sends `payload` as one frame to `agent` (its ID, or `ip:<addr>`) on the connection that
    /// holds its key, as remoted sends requests and active responses. False when the agent
    /// has no connection here (remoted forgets the socket when it closes) or its queue is full.
    pub fn push(&self, agent: &str, payload: Vec<u8>) -> bool {
        let Some(conn) = lock(&self.shared.admission).holder(agent) else {
            return false;
        };
        lock(&self.shared.conns)
            .get(&conn)
            .is_some_and(|c| c.out.try_send(Bytes::from(payload)).is_ok())
    }

    /// Connections closed as refusals so far (removed keys, keys in use).
    pub fn refusals(&self) -> usize {
        self.shared.refusals.load(Ordering::Relaxed)
    }

    /// Connections mistreated so far (see [`Manager::misbehave`]).
    pub fn misbehaved(&self) -> usize {
        self.shared.misbehaved.load(Ordering::Relaxed)
    }

    /// With keys: messages dropped as replays (`verify_msg_id`).
    pub fn replays_dropped(&self) -> usize {
        self.shared.dropped.load(Ordering::Relaxed)
    }

    /// The address agents (or the proxy) connect to.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The manager's name (it is in its ACK without keys).
    pub fn name(&self) -> &str {
        &self.shared.options.name
    }

    /// Frames received from one agent (its ID, or `ip:<addr>` for ID-less frames), in order.
    pub fn frames_from(&self, agent: &str) -> Vec<Bytes> {
        lock(&self.shared.seen)
            .frames
            .get(agent)
            .cloned()
            .unwrap_or_default()
    }

    /// With keys: the decrypted messages of one agent, in order.
    pub fn messages_from(&self, agent: &str) -> Vec<Bytes> {
        lock(&self.shared.seen)
            .messages
            .get(agent)
            .cloned()
            .unwrap_or_default()
    }

    /// The agents seen, sorted.
    pub fn agents(&self) -> Vec<String> {
        let mut v: Vec<_> = lock(&self.shared.seen).frames.keys().cloned().collect();
        v.sort();
        v
    }

    /// Total frames received.
    pub fn frame_count(&self) -> usize {
        lock(&self.shared.seen).frames.values().map(Vec::len).sum()
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> usize {
        self.shared.accepted.load(Ordering::Relaxed)
    }

    /// Connections open now.
    pub fn open_connections(&self) -> usize {
        self.shared.open.load(Ordering::Relaxed)
    }

    /// Stops listening and closes every connection (a manager that dies), then waits for it.
    pub async fn stop(&self) {
        self.shared.stop.cancel();
        self.tasks.close();
        self.tasks.wait().await;
    }
}

impl Drop for Manager {
    fn drop(&mut self) {
        self.shared.stop.cancel();
    }
}

/// The manager side of one agent's key on one connection: seals answers with its own counters.
struct Peer {
    key: Arc<AgentKey>,
    cipher: crate::envelope::Cipher,
    counters: Counters,
}

impl Peer {
    fn seal(&mut self, message: &[u8]) -> Option<Bytes> {
        self.counters.advance();
        cipher::manager_payload(&self.key, self.cipher, &self.counters, message)
            .ok()
            .map(Bytes::from)
    }
}

/// What to do with one frame, decided under the locks and done after them.
enum Step {
    Continue,
    Answer(Bytes),
    Close,
    Mistreat(Misbehave),
}

async fn connection(sh: &Shared, stream: tokio::net::TcpStream, peer: SocketAddr) {
    let id = sh.next_conn.fetch_add(1, Ordering::Relaxed);
    let close = sh.stop.child_token();
    let (tx, mut rx) = mpsc::channel::<Bytes>(64);
    lock(&sh.conns).insert(
        id,
        Conn {
            close: close.clone(),
            out: tx,
        },
    );
    let mut framed = Framed::new(stream, FrameCodec::default());
    let mut first = true;
    let mut decoder = Decoder::new();
    let mut sealer: Option<Peer> = None;
    let mut park = false;
    loop {
        let frame = tokio::select! {
            _ = close.cancelled() => break,
            _ = sh.silent.cancelled() => { park = true; break }
            out = rx.recv() => match out {
                Some(p) => {
                    if framed.send(p).await.is_err() { break }
                    continue;
                }
                None => break,
            },
            f = framed.next() => match f { Some(Ok(f)) => f, _ => break },
        };
        let step = on_frame(sh, id, peer, &frame, first, &mut decoder, &mut sealer);
        // A ping is answered before remoted looks for a key: it is not the agent's first frame.
        first &= frame.as_ref() == b"#ping";
        match step {
            Step::Continue => {}
            Step::Answer(a) => {
                if framed.send(a).await.is_err() {
                    break;
                }
            }
            Step::Close => break,
            Step::Mistreat(how) => {
                let _ = match how {
                    Misbehave::NeverRead => {
                        let ack = Bytes::from(super::ack_payload("never-reads"));
                        framed.send(ack).await.map_err(|_| ())
                    }
                    Misbehave::Garbage => framed
                        .get_mut()
                        .write_all(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
                        .await
                        .map_err(|_| ()),
                    Misbehave::ZeroLength => framed
                        .get_mut()
                        .write_all(&[0, 0, 0, 0])
                        .await
                        .map_err(|_| ()),
                };
                park = true;
                break;
            }
        }
    }
    // Every key this connection held forgets it (remoted's _close_sock).
    lock(&sh.admission).closed(id);
    lock(&sh.conns).remove(&id);
    if park {
        // Hold the socket without reading or writing until the manager is stopped or the peer
        // goes (the kernel still acknowledges what fits in the receive buffer).
        close.cancelled().await;
    }
    drop(framed);
}

/// Decides what one frame gets.
fn on_frame(
    sh: &Shared,
    conn: u64,
    peer: SocketAddr,
    frame: &Bytes,
    first: bool,
    decoder: &mut Decoder,
    sealer: &mut Option<Peer>,
) -> Step {
    if frame.as_ref() == b"#ping" {
        // remoted answers a ping before looking for a key.
        return Step::Answer(Bytes::from_static(b"#pong"));
    }
    let Ok(env) = Envelope::parse(frame) else {
        return Step::Close;
    };
    let o = &sh.options;
    // Who the frame is from: its ID, or with keys the key of its source address.
    let key = o.keys.as_ref().and_then(|k| match env.agent_id() {
        Some(a) => k.get(&a).cloned(),
        None => k.by_ip(peer.ip()).cloned(),
    });
    let who = match (env.agent_id(), &key) {
        (Some(a), _) => a.to_string(),
        (None, Some(k)) => k.id().to_string(),
        (None, None) => format!("ip:{}", peer.ip()),
    };
    if o.keys.is_some() && key.is_none() {
        // Unknown agent: remoted closes without a word.
        sh.refusals.fetch_add(1, Ordering::Relaxed);
        return Step::Close;
    }
    let verdict = lock(&sh.admission).frame(&who, conn, Instant::now());
    match verdict {
        Verdict::Refuse(_) => {
            sh.refusals.fetch_add(1, Ordering::Relaxed);
            return Step::Close;
        }
        Verdict::Misbehave(how) => {
            sh.misbehaved.fetch_add(1, Ordering::Relaxed);
            return Step::Mistreat(how);
        }
        Verdict::Serve { overtaken } => {
            if let Some(old) = overtaken {
                if let Some(c) = lock(&sh.conns).get(&old) {
                    c.close.cancel();
                }
            }
        }
    }
    let mut seen = lock(&sh.seen);
    seen.frames
        .entry(who.clone())
        .or_default()
        .push(frame.clone());
    let Some(key) = key else {
        drop(seen);
        return clear_answer(o, first, &env);
    };
    let Some(tag) = env.cipher() else {
        return Step::Continue;
    };
    let Ok(opened) = decoder.open(&key, tag, env.ciphertext()) else {
        // "Decrypt the message fail": the connection is closed.
        return Step::Close;
    };
    if o.verify_msg_id && !lock(&sh.admission).fresh(&who, opened.counters.sequence()) {
        sh.dropped.fetch_add(1, Ordering::Relaxed);
        return Step::Continue;
    }
    let message = Bytes::copy_from_slice(opened.message);
    seen.messages.entry(who).or_default().push(message.clone());
    drop(seen);
    let peer_key = sealer.get_or_insert_with(|| Peer {
        key: key.clone(),
        cipher: tag,
        counters: Counters {
            rnd: (conn as u32).wrapping_mul(40_503) % 65_536,
            global: 0,
            local: 0,
        },
    });
    let answer = match o.reply {
        Reply::Silent => None,
        Reply::AckFirst => match control::parse(&message) {
            Message::Control(Control::Startup(_) | Control::Keepalive(_)) => {
                peer_key.seal(control::ack_text().as_bytes())
            }
            _ => None,
        },
        Reply::Echo => peer_key.seal(&message),
    };
    answer.map_or(Step::Continue, Step::Answer)
}

/// The answer of a manager without keys.
fn clear_answer(o: &ManagerOptions, first: bool, env: &Envelope<'_>) -> Step {
    match o.reply {
        Reply::Silent => Step::Continue,
        Reply::AckFirst if first => Step::Answer(Bytes::from(super::ack_payload(&o.name))),
        Reply::AckFirst => Step::Continue,
        Reply::Echo => {
            let mut p = b"#AES:".to_vec();
            p.extend_from_slice(env.ciphertext());
            Step::Answer(Bytes::from(p))
        }
    }
}
