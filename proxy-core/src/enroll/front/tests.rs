//! Tests of the enrollment front's reading of requests and replies.

use super::*;
use std::collections::VecDeque;
use std::pin::Pin;
use std::task::{Context, Poll};
use tokio::io::AsyncRead;

/// A backend that delivers its reply in the given reads, then closes (or stays open).
struct Chunks(VecDeque<&'static [u8]>, bool);

impl AsyncRead for Chunks {
    fn poll_read(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.0.pop_front() {
            Some(chunk) => {
                buf.put_slice(chunk);
                Poll::Ready(Ok(()))
            }
            None if self.1 => Poll::Pending,
            None => Poll::Ready(Ok(())),
        }
    }
}

async fn read(chunks: &[&'static [u8]], stays_open: bool) -> (Vec<u8>, Vec<usize>) {
    let mut backend = Chunks(chunks.iter().copied().collect(), stays_open);
    let got = read_reply(&mut backend, 64 * 1024, Duration::from_millis(50))
        .await
        .unwrap();
    (got.bytes.to_vec(), got.writes)
}

// The three ways `acknowledged` ends: all acknowledged, a peer that does not take the
// bytes (a silent or vanished host looks the same: nothing comes back), a reset.
#[tokio::test]
async fn acknowledged_waits_for_the_peers_tcp_and_no_longer() {
    use tokio::io::AsyncWriteExt;
    let listener = crate::net::bind_tcp("127.0.0.1:0".parse().unwrap(), 4).unwrap();
    let addr = listener.local_addr().unwrap();
    let limit = Duration::from_millis(300);

    let client = TcpStream::connect(addr).await.unwrap();
    let (mut server, _) = listener.accept().await.unwrap();
    server.write_all(&[1u8; 1000]).await.unwrap();
    assert!(
        acknowledged(&server, limit).await,
        "read or not, the kernel ACKs"
    );

    // A peer whose window is full leaves bytes unacknowledged: false at the limit.
    socket2::SockRef::from(&client)
        .set_recv_buffer_size(4096)
        .unwrap();
    let big = vec![2u8; 4 << 20];
    let _ = tokio::time::timeout(Duration::from_millis(200), server.write_all(&big)).await;
    let started = Instant::now();
    assert!(!acknowledged(&server, limit).await);
    assert!(started.elapsed() >= limit);

    // A reset: false at once.
    socket2::SockRef::from(&client)
        .set_linger(Some(Duration::ZERO))
        .unwrap();
    drop(client);
    tokio::time::sleep(Duration::from_millis(50)).await;
    let started = Instant::now();
    assert!(!acknowledged(&server, Duration::from_secs(5)).await);
    assert!(started.elapsed() < Duration::from_secs(1));
}

// Agents take the key from one TLS read: it goes to them as one record however it came,
// without waiting for the manager to close.
#[tokio::test]
async fn a_key_is_whole_at_its_quote_and_goes_out_as_one_record() {
    let (bytes, writes) = read(&[b"OSSEC K:'001 a", b"1 any k'\n", b"junk"], true).await;
    assert_eq!(bytes, b"OSSEC K:'001 a1 any k'\n");
    assert_eq!(writes, vec![bytes.len()]);
}

// A refusal in two writes (4.0-4.12) keeps its two records, whether the manager closes or
// goes quiet.
#[tokio::test]
async fn a_refusal_ends_at_the_close_or_when_quiet_and_keeps_its_writes() {
    for open in [false, true] {
        let (bytes, writes) = read(
            &[b"ERROR: Invalid password", b"ERROR: Unable to add agent"],
            open,
        )
        .await;
        assert_eq!(bytes, b"ERROR: Invalid passwordERROR: Unable to add agent");
        assert_eq!(writes, vec![23, bytes.len()]);
    }
}

#[test]
fn rate_log_lets_a_few_lines_through_per_second_and_counts_the_rest() {
    let log = RateLog::new(3);
    let allowed: Vec<_> = (0..10).map(|_| log.allow()).collect();
    // Within one second (the test runs well within it, or straddles one boundary).
    let written = allowed.iter().filter(|a| a.is_some()).count();
    assert!((3..=6).contains(&written), "{allowed:?}");
    assert_eq!(allowed[0], Some(0));
    // Every line left out is reported by a later line, or still pending.
    let reported: u64 = allowed.iter().flatten().sum();
    assert_eq!(
        reported + log.suppressed.load(Ordering::Relaxed),
        (10 - written) as u64
    );
}
