//! The connection-level pieces of the enrollment front: reading the request line and the
//! backend's reply, watching the agent's side, waiting for TCP acknowledgement, and the
//! bookkeeping of active connections and rate-limited log lines.

use std::io;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::net::TcpStream;
use tokio_rustls::server::TlsStream;
use zeroize::Zeroizing;

use crate::enroll::reply::{reply_progress, ReplyProgress};
use crate::enroll::request::MAX_REQUEST;
/// A few log lines per second at most for a kind of refusal, so that a flood does not become
/// a log flood; the next line written says how many were left out.
#[derive(Debug)]
pub(super) struct RateLog {
    per_second: u64,
    /// The current second (since `START`, plus one) in the high bits, lines written in it in
    /// the low 16.
    window: AtomicU64,
    pub(super) suppressed: AtomicU64,
}

impl RateLog {
    pub(super) fn new(per_second: u16) -> Self {
        RateLog {
            per_second: u64::from(per_second),
            window: AtomicU64::new(0),
            suppressed: AtomicU64::new(0),
        }
    }

    /// `Some(lines left out since the last one written)` when a line may be written now.
    pub(super) fn allow(&self) -> Option<u64> {
        static START: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
        let now = START.get_or_init(Instant::now).elapsed().as_secs() + 1;
        let granted = self
            .window
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |w| {
                let (second, used) = (w >> 16, w & 0xffff);
                if second != now {
                    Some((now << 16) | 1)
                } else if used < self.per_second {
                    Some(w + 1)
                } else {
                    None
                }
            })
            .is_ok();
        if granted {
            Some(self.suppressed.swap(0, Ordering::Relaxed))
        } else {
            self.suppressed.fetch_add(1, Ordering::Relaxed);
            None
        }
    }
}

/// Counts a connection as active while alive.
pub(super) struct Active(Arc<AtomicUsize>);

impl Active {
    pub(super) fn enter(count: &Arc<AtomicUsize>) -> Active {
        count.fetch_add(1, Ordering::Relaxed);
        Active(count.clone())
    }
}

impl Drop for Active {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Waits until the peer's TCP has acknowledged every byte written to `tcp`: true at zero
/// outstanding bytes, false on a reset or error first, or at `limit`.
pub(super) async fn acknowledged(tcp: &TcpStream, limit: Duration) -> bool {
    let until = tokio::time::Instant::now() + limit;
    let mut pause = Duration::from_millis(1);
    loop {
        match crate::net::unacked_bytes(tcp) {
            Ok(0) => return true,
            Ok(_) => {}
            Err(_) => return false,
        }
        // A reset: nothing more will be acknowledged (the count above was taken first, so
        // bytes acknowledged before the reset were seen).
        if !matches!(tcp.take_error(), Ok(None)) {
            return matches!(crate::net::unacked_bytes(tcp), Ok(0));
        }
        if tokio::time::Instant::now() >= until {
            return false;
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_millis(50));
    }
}

/// Time allowed for closing a connection properly (close_notify) before it is dropped.
pub(super) const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);

/// The request line as read.
pub(super) enum Line {
    /// Everything up to the first LF (LF excluded).
    Complete(Zeroizing<Vec<u8>>),
    /// No LF within [`MAX_REQUEST`] bytes.
    TooLong,
    /// The agent closed first.
    Closed,
}

/// Reads up to the first LF, at most [`MAX_REQUEST`] bytes. Bytes after the LF are ignored
/// (authd ignores them too).
pub(super) async fn read_line<S: AsyncRead + Unpin>(agent: &mut S) -> io::Result<Line> {
    let mut buf = Zeroizing::new(Vec::with_capacity(4096));
    let mut chunk = Zeroizing::new([0u8; 4096]);
    loop {
        let n = match agent.read(&mut chunk[..]).await {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => 0,
            Err(e) => return Err(e),
        };
        if n == 0 {
            return Ok(Line::Closed);
        }
        let start = buf.len();
        buf.extend_from_slice(&chunk[..n]);
        if let Some(lf) = buf[start..].iter().position(|&b| b == b'\n') {
            buf.truncate(start + lf);
            return Ok(if buf.len() < MAX_REQUEST {
                Line::Complete(buf)
            } else {
                Line::TooLong
            });
        }
        if buf.len() >= MAX_REQUEST {
            return Ok(Line::TooLong);
        }
    }
}

/// A backend's reply as received: the bytes, and where each of the backend's reads ended
/// (a 4.0-4.12 refusal comes in two writes; they are relayed as two).
pub(super) struct Received {
    pub(super) bytes: Zeroizing<Vec<u8>>,
    pub(super) writes: Vec<usize>,
}

/// Reads a backend's reply until it is complete: a key at its closing quote (the manager's
/// close is not awaited: the QA simulators keep the connection open), anything else at the
/// manager's close or after `quiet` without a byte. A close without close_notify ends the
/// reply too (authd does not always send one).
pub(super) async fn read_reply<S: AsyncRead + Unpin>(
    backend: &mut S,
    max: usize,
    quiet: Duration,
) -> Result<Received, String> {
    let mut got = Received {
        bytes: Zeroizing::new(Vec::with_capacity(4096)),
        writes: Vec::new(),
    };
    let mut chunk = Zeroizing::new([0u8; 4096]);
    loop {
        let progress = reply_progress(&got.bytes);
        if let ReplyProgress::Key(end) = progress {
            // One record, however it arrived: the agent parses the key from a single read.
            got.bytes.truncate(end);
            got.writes = vec![end];
            return Ok(got);
        }
        let read = if progress == ReplyProgress::Other {
            match tokio::time::timeout(quiet, backend.read(&mut chunk[..])).await {
                Ok(r) => r,
                // Quiet: the refusal is whole.
                Err(_) => return Ok(got),
            }
        } else {
            backend.read(&mut chunk[..]).await
        };
        match read {
            Ok(0) => return Ok(got),
            Ok(n) => {
                if got.bytes.len() + n > max {
                    return Err(format!("reply longer than {max} bytes"));
                }
                got.bytes.extend_from_slice(&chunk[..n]);
                got.writes.push(got.bytes.len());
            }
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(got),
            // A reset after some bytes still leaves a whole reply (authd writes it in one go).
            Err(_) if !got.bytes.is_empty() => return Ok(got),
            Err(e) => return Err(format!("reading the reply failed: {e}")),
        }
    }
}

/// Runs `work` while watching the agent's side: any close, reset or error there means a
/// reply written later cannot reach it. Returns the work's result and whether the agent went.
pub(super) async fn watch_agent<T>(
    agent: &mut TlsStream<TcpStream>,
    work: impl std::future::Future<Output = T>,
) -> (T, bool) {
    tokio::pin!(work);
    let mut gone = false;
    let mut scratch = [0u8; 512];
    loop {
        tokio::select! {
            result = &mut work => return (result, gone),
            read = agent.read(&mut scratch), if !gone => {
                // Bytes after the request line are ignored, as authd does.
                if !matches!(read, Ok(n) if n > 0) {
                    gone = true;
                }
            }
        }
    }
}
