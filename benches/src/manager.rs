//! A stand-in manager: decrypts every message (or a sample), checks checksums, answers startups
//! and keepalives with `#!-agent ack ` sealed with the agent's key as remoted does, and counts
//! per agent what arrived, what is missing, duplicated or out of order (from the sequence
//! numbers of [`crate::wire::event_seq`]).
//!
//! Agents listed in [`ManagerConfig::refuse`] are refused as `wazuh-remoted` refuses a removed
//! or unknown agent (`(1408): Invalid ID`): their first frame on a connection closes that
//! connection, unanswered. The decision is the stand-in manager's model of remoted
//! ([`wazuh_proxy_core::sim::remoted::Admission`]), taken at each connection's first frame of
//! an agent (not at every frame: this manager must stay cheap under load).
//!
//! Sampling (`sample > 1`) decrypts the first two frames of each connection and one in
//! `sample` after that: it keeps a flat-out run from measuring the manager's MD5 instead of the
//! proxy. Sequence analysis needs every event, so it is off when sampling; frame and byte
//! counts stay exact and are compared with what the fleet sent.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use tokio::io::{AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use wazuh_proxy_core::cipher;
use wazuh_proxy_core::control::{self, Control, Message};
use wazuh_proxy_core::envelope::{AgentId, Envelope};
use wazuh_proxy_core::frame::HEADER_LEN;
use wazuh_proxy_core::keys::KeySet;
use wazuh_proxy_core::sim::remoted::{Admission, Verdict};

use crate::wire::{echo_text, event_seq, read_frame, Sealer};
use crate::FleetError;

/// Gaps wider than this are counted, not listed.
const MAX_LISTED_GAP: u64 = 100_000;

/// Settings of a stand-in manager.
#[derive(Debug)]
pub struct ManagerConfig {
    /// The agents' keys.
    pub keys: Arc<KeySet>,
    /// Answer each event with `#!-echo <seq>`.
    pub echo: bool,
    /// Decrypt one frame in `sample` (1: all).
    pub sample: u64,
    /// Agent IDs (`"001"`) whose connections are closed, unanswered, at their first frame.
    pub refuse: HashSet<String>,
}

/// What one agent sent, as seen by the manager.
#[derive(Debug, Default, Clone)]
pub struct AgentRecord {
    /// Frames received (all kinds).
    pub frames: u64,
    /// Bytes received, headers included.
    pub bytes: u64,
    /// Frames decrypted and checked.
    pub checked: u64,
    /// Events decrypted.
    pub events: u64,
    /// Startup messages.
    pub startups: u64,
    /// Keepalives.
    pub keepalives: u64,
    /// Shutdown messages.
    pub shutdowns: u64,
    /// Frames that failed to decrypt or check.
    pub bad: u64,
    /// Connections this agent used.
    pub connections: u64,
    /// Events whose number arrived again.
    pub duplicated: u64,
    /// Events that filled an earlier gap.
    pub reordered: u64,
    highest: u64,
    missing: BTreeSet<u64>,
    missing_unlisted: u64,
}

impl AgentRecord {
    /// Events never seen below the highest number seen.
    pub fn lost(&self) -> u64 {
        self.missing.len() as u64 + self.missing_unlisted
    }

    /// Records event `seq` (numbers running 1..=cycle over and over when `cycle` is not 0).
    ///
    /// ```
    /// use wazuh_proxy_benches::manager::AgentRecord;
    /// let mut r = AgentRecord::default();
    /// for s in [1, 2, 4, 3, 3, 6] { r.record_seq(s, 0); }
    /// assert_eq!((r.lost(), r.reordered, r.duplicated), (1, 1, 1));
    /// let mut c = AgentRecord::default();
    /// for s in [1, 2, 3, 1, 2, 3, 1] { c.record_seq(s, 3); }
    /// assert_eq!((c.lost(), c.reordered, c.duplicated), (0, 0, 0));
    /// ```
    pub fn record_seq(&mut self, seq: u64, cycle: u64) {
        let u = if cycle == 0 || seq == 0 || seq > cycle {
            seq
        } else {
            // The number of this cycle position closest to the one after the highest.
            let want = self.highest + 1;
            let base = (want / cycle) * cycle + seq;
            [base.saturating_sub(cycle), base, base + cycle]
                .into_iter()
                .filter(|&c| c > 0)
                .min_by_key(|&c| c.abs_diff(want))
                .unwrap_or(base)
        };
        if u > self.highest {
            let gap = u - self.highest - 1;
            if gap > MAX_LISTED_GAP {
                self.missing_unlisted += gap;
            } else {
                self.missing.extend(self.highest + 1..u);
            }
            self.highest = u;
        } else if self.missing.remove(&u) {
            self.reordered += 1;
        } else {
            self.duplicated += 1;
        }
    }
}

/// The manager's shared state: per-agent records and connection counts.
#[derive(Debug)]
pub struct ManagerState {
    cfg: ManagerConfig,
    agents: Mutex<HashMap<AgentId, Arc<Mutex<AgentRecord>>>>,
    /// Connections accepted.
    pub accepted: AtomicU64,
    /// Connections closed for a protocol error (bad frame, unknown agent...).
    pub rejected: AtomicU64,
    /// Connections still open.
    pub open: AtomicU64,
    /// Connections closed unanswered because their agent is refused.
    pub refusals: AtomicU64,
    window: Mutex<Option<(Instant, Instant)>>,
    admission: Mutex<Admission>,
    next_conn: AtomicU64,
}

impl ManagerState {
    /// A manager with no agents seen yet.
    pub fn new(cfg: ManagerConfig) -> Arc<ManagerState> {
        let mut admission = Admission::new(None);
        for id in &cfg.refuse {
            admission.refuse(id);
        }
        Arc::new(ManagerState {
            admission: Mutex::new(admission),
            next_conn: AtomicU64::new(1),
            cfg,
            agents: Mutex::default(),
            accepted: AtomicU64::new(0),
            rejected: AtomicU64::new(0),
            open: AtomicU64::new(0),
            refusals: AtomicU64::new(0),
            window: Mutex::new(None),
        })
    }

    fn record(&self, id: AgentId) -> Arc<Mutex<AgentRecord>> {
        let mut map = self.agents.lock().unwrap_or_else(|p| p.into_inner());
        Arc::clone(map.entry(id).or_default())
    }

    fn touch(&self, first: Instant, last: Instant) {
        let mut w = self.window.lock().unwrap_or_else(|p| p.into_inner());
        *w = Some(match *w {
            None => (first, last),
            Some((a, b)) => (a.min(first), b.max(last)),
        });
    }

    /// Every agent's record, sorted by ID.
    pub fn records(&self) -> Vec<(AgentId, AgentRecord)> {
        let map = self.agents.lock().unwrap_or_else(|p| p.into_inner());
        let mut v: Vec<(AgentId, AgentRecord)> = map
            .iter()
            .map(|(id, r)| (*id, r.lock().unwrap_or_else(|p| p.into_inner()).clone()))
            .collect();
        v.sort_by_key(|(id, _)| id.as_str().parse::<u64>().unwrap_or(u64::MAX));
        v
    }

    /// The report: anomalies per agent (at most 20 lines) and a `key=value` summary line.
    /// The flag is false when frames were bad, or when events were lost or duplicated and
    /// `expect_loss` is false.
    pub fn report(&self, name: &str, expect_loss: bool) -> (String, bool) {
        let records = self.records();
        let mut out = String::new();
        let mut t = AgentRecord::default();
        let (mut lost, mut shown) = (0, 0);
        for (id, r) in &records {
            let l = r.lost();
            if (l > 0 || r.duplicated > 0 || r.reordered > 0 || r.bad > 0) && shown < 20 {
                shown += 1;
                out.push_str(&format!(
                    "agent {}: received={} lost={l} duplicated={} reordered={} bad={} connections={}\n",
                    id.as_str(),
                    r.events,
                    r.duplicated,
                    r.reordered,
                    r.bad,
                    r.connections
                ));
            }
            lost += l;
            t.frames += r.frames;
            t.bytes += r.bytes;
            t.checked += r.checked;
            t.events += r.events;
            t.startups += r.startups;
            t.keepalives += r.keepalives;
            t.shutdowns += r.shutdowns;
            t.bad += r.bad;
            t.connections += r.connections;
            t.duplicated += r.duplicated;
            t.reordered += r.reordered;
        }
        let span = self
            .window
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .map_or(0.0, |(a, b)| (b - a).as_secs_f64());
        let rate = |n: u64| if span > 0.0 { n as f64 / span } else { 0.0 };
        out.push_str(&format!(
            "manager-summary name={name} agents={} connections={} rejected={} refusals={} \
             frames={} bytes={} \
             checked={} events={} startups={} keepalives={} shutdowns={} bad={} lost={lost} \
             duplicated={} reordered={} sequence_checked={} span_s={span:.3} frames_per_s={:.0} \
             mb_per_s={:.2}",
            records.len(),
            self.accepted.load(Relaxed),
            self.rejected.load(Relaxed),
            self.refusals.load(Relaxed),
            t.frames,
            t.bytes,
            t.checked,
            t.events,
            t.startups,
            t.keepalives,
            t.shutdowns,
            t.bad,
            t.duplicated,
            t.reordered,
            self.cfg.sample <= 1,
            rate(t.frames),
            rate(t.bytes) / 1e6,
        ));
        let ok = t.bad == 0 && (expect_loss || (lost == 0 && t.duplicated == 0));
        (out, ok)
    }
}

/// Accepts connections on `listener` until the task is dropped.
pub async fn serve(listener: TcpListener, state: Arc<ManagerState>) {
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => {
                state.accepted.fetch_add(1, Relaxed);
                state.open.fetch_add(1, Relaxed);
                let st = Arc::clone(&state);
                tokio::spawn(async move {
                    if let Err(e) = connection(stream, peer, &st).await {
                        st.rejected.fetch_add(1, Relaxed);
                        eprintln!("manager: connection from {peer}: {e}");
                    }
                    st.open.fetch_sub(1, Relaxed);
                });
            }
            Err(e) => {
                // Out of descriptors, mostly: wait a little rather than spin.
                eprintln!("manager: accept: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        }
    }
}

async fn connection(
    stream: TcpStream,
    peer: SocketAddr,
    state: &ManagerState,
) -> Result<(), FleetError> {
    let _ = stream.set_nodelay(true);
    let (rd, mut wr) = stream.into_split();
    let mut rd = BufReader::with_capacity(64 * 1024, rd);
    let mut buf = Vec::new();
    let mut out = Vec::new();
    let mut n: u64 = 0;
    let mut agent: Option<(AgentId, Arc<Mutex<AgentRecord>>, Sealer)> = None;
    let sample = state.cfg.sample.max(1);
    let mut first = None;
    let conn = state.next_conn.fetch_add(1, Relaxed);
    let mut admitted: Option<AgentId> = None;
    let result = loop {
        match read_frame(&mut rd, &mut buf).await {
            Ok(true) => {}
            Ok(false) => break Ok(()),
            Err(e) => break Err(e),
        }
        let now = Instant::now();
        first.get_or_insert(now);
        n += 1;
        let env = match Envelope::parse(&buf) {
            Ok(env) => env,
            Err(e) => break Err(FleetError::Protocol(format!("frame {n}: envelope: {e}"))),
        };
        if let Some(id) = env.agent_id().filter(|id| admitted != Some(*id)) {
            let verdict = state
                .admission
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .frame(id.as_str(), conn, now);
            if !matches!(verdict, Verdict::Serve { .. }) {
                // remoted logs "(1408): Invalid ID" and closes the socket without a word.
                state.refusals.fetch_add(1, Relaxed);
                break Ok(());
            }
            admitted = Some(id);
        }
        let (Some(cipher), ct) = (env.cipher(), env.ciphertext()) else {
            continue; // #ping
        };
        let key = match env.agent_id() {
            Some(id) => state.cfg.keys.get(&id).cloned(),
            None => state.cfg.keys.by_ip(peer.ip()).cloned(),
        };
        let Some(key) = key else {
            break Err(FleetError::Protocol(format!("frame {n}: unknown agent")));
        };
        if !matches!(&agent, Some((id, _, _)) if *id == key.id()) {
            let rec = state.record(key.id());
            rec.lock().unwrap_or_else(|p| p.into_inner()).connections += 1;
            let rnd = (n as u32).wrapping_mul(40503);
            agent = Some((
                key.id(),
                rec,
                Sealer::new(Arc::clone(&key), cipher, false, rnd),
            ));
        }
        let Some((_, rec, sealer)) = agent.as_mut() else {
            continue;
        };
        let decrypt = sample == 1 || n <= 2 || n % sample == 0;
        let msg = if decrypt {
            cipher::decrypt(&key, cipher, ct).ok()
        } else {
            None
        };
        out.clear();
        {
            let mut r = rec.lock().unwrap_or_else(|p| p.into_inner());
            r.frames += 1;
            r.bytes += (buf.len() + HEADER_LEN) as u64;
            if decrypt {
                match &msg {
                    None => r.bad += 1,
                    Some(m) => {
                        r.checked += 1;
                        let text = &m.message[..];
                        if let Some((seq, cycle)) = event_seq(text) {
                            r.events += 1;
                            if sample == 1 {
                                r.record_seq(seq, cycle);
                            }
                            if state.cfg.echo {
                                sealer.frame_into(echo_text(seq).as_bytes(), &mut out)?;
                            }
                        } else {
                            match control::parse(text) {
                                Message::Control(Control::Startup(_)) => {
                                    r.startups += 1;
                                    sealer.frame_into(control::ack_text().as_bytes(), &mut out)?;
                                }
                                Message::Control(Control::Shutdown) => r.shutdowns += 1,
                                Message::Control(_) => {
                                    r.keepalives += 1;
                                    sealer.frame_into(control::ack_text().as_bytes(), &mut out)?;
                                }
                                _ => r.events += 1,
                            }
                        }
                    }
                }
            }
        }
        if !out.is_empty() {
            if let Err(e) = wr.write_all(&out).await {
                break Err(FleetError::io("answering", e));
            }
        }
        if n % 1024 == 0 {
            if let Some(f) = first {
                state.touch(f, now);
            }
        }
    };
    if let Some(f) = first {
        state.touch(f, Instant::now());
    }
    state
        .admission
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .closed(conn);
    let _ = wr.shutdown().await;
    result
}
