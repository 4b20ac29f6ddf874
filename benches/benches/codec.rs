//! Throughput of the 1514 hot path's parsing: splitting a buffer of back-to-back frames (the
//! allocation-free `frame::scan` the relay uses, and the `FrameCodec` decoder the tools use),
//! and reading the envelope header of each payload.

use std::hint::black_box;

use bytes::BytesMut;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use tokio_util::codec::Decoder;
use wazuh_proxy_core::envelope::{write_header, AgentId, Cipher, Envelope};
use wazuh_proxy_core::frame::{encode_frame, scan, FrameCodec, MAX_PAYLOAD};

/// Bytes of frames per benchmark buffer: large enough to leave the L1/L2 caches, as a busy
/// relay's socket buffers do.
const BUFFER_BYTES: usize = 1 << 20;

/// Frame sizes on the wire (header included): a keepalive-sized message and a batched event.
const FRAME_SIZES: [usize; 2] = [256, 4096];

/// An agent -> manager payload of `len` bytes: `!ID!#AES:` then pseudo-random ciphertext.
fn payload(len: usize, n: u32) -> Vec<u8> {
    let id = AgentId::parse(format!("{:03}", n % 2000).as_bytes());
    let mut out = Vec::with_capacity(len);
    write_header(&mut out, id, Cipher::Aes);
    // xorshift: cheap bytes that never form a second header by accident.
    let mut x = 0x9e37_79b9_u32 ^ n.wrapping_mul(0x85eb_ca6b);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        out.push(x as u8);
    }
    out
}

/// About [`BUFFER_BYTES`] of frames of `frame_len` bytes each, and how many there are.
fn wire(frame_len: usize) -> (Vec<u8>, u64) {
    let mut buf = Vec::with_capacity(BUFFER_BYTES + frame_len);
    let mut n = 0;
    while buf.len() < BUFFER_BYTES {
        match encode_frame(&payload(frame_len - 4, n), MAX_PAYLOAD) {
            Ok(f) => buf.extend_from_slice(&f),
            Err(e) => panic!("bench frame rejected: {e}"),
        }
        n += 1;
    }
    (buf, u64::from(n))
}

fn frame_split(c: &mut Criterion) {
    let mut group = c.benchmark_group("frame_split");
    for size in FRAME_SIZES {
        let (buf, frames) = wire(size);
        group.throughput(Throughput::Bytes(buf.len() as u64));
        group.bench_with_input(BenchmarkId::new("scan", size), &buf, |b, buf| {
            b.iter(|| {
                let (n, at, err) = scan(black_box(buf), MAX_PAYLOAD);
                assert_eq!((n as u64, at, err), (frames, buf.len(), None));
            })
        });
        // The decoder consumes its input, so each iteration gets a fresh copy; the copy is
        // made in the setup closure and not timed.
        group.bench_with_input(BenchmarkId::new("codec_decode", size), &buf, |b, buf| {
            b.iter_batched_ref(
                || BytesMut::from(&buf[..]),
                |src| {
                    let mut codec = FrameCodec::default();
                    let mut n = 0u64;
                    while let Ok(Some(payload)) = codec.decode(src) {
                        black_box(payload);
                        n += 1;
                    }
                    assert_eq!(n, frames);
                },
                criterion::BatchSize::LargeInput,
            )
        });
    }
    group.finish();
}

fn envelope_parse(c: &mut Criterion) {
    // The parser reads at most the first 15 bytes, so the payload size does not matter: the
    // cost is per message.
    let mut group = c.benchmark_group("envelope_parse");
    let prefixed: Vec<Vec<u8>> = (0..1024).map(|n| payload(252, n)).collect();
    let id_less: Vec<Vec<u8>> = prefixed
        .iter()
        .map(|p| match Envelope::parse(p) {
            Ok(env) => [Cipher::Aes.tag(), env.ciphertext()].concat(),
            Err(e) => panic!("bench payload rejected: {e}"),
        })
        .collect();
    for (name, payloads) in [("prefixed", &prefixed), ("id_less", &id_less)] {
        group.throughput(Throughput::Elements(payloads.len() as u64));
        group.bench_with_input(name, payloads, |b, ps| {
            b.iter(|| {
                for p in ps {
                    match Envelope::parse(black_box(p)) {
                        Ok(env) => {
                            black_box(env.agent_id());
                        }
                        Err(e) => panic!("bench payload rejected: {e}"),
                    }
                }
            })
        });
    }
    group.finish();
}

criterion_group!(benches, frame_split, envelope_parse);
criterion_main!(benches);
