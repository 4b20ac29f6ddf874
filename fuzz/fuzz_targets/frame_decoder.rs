//! Arbitrary byte streams, split at arbitrary points, through [`FrameCodec`] and [`frame::scan`].
//!
//! Input layout (so that a recorded TCP stream is a good seed once one control byte is put in
//! front of it):
//!
//! ```text
//! byte 0        bits 0-3: n, the number of chunk-size bytes that follow
//!               bits 4-6: which payload limit to use (see LIMITS)
//! bytes 1..=n   chunk sizes, used in a cycle (see chunk_len); none means one single chunk
//! the rest      the byte stream
//! ```
//!
//! Checked on every input: neither decoder panics; the incremental codec yields exactly the
//! frames `scan` counts over the whole stream, byte for byte, and stops on the same error; at
//! end of stream the codec reports the same leftover `scan` left; re-encoding the payloads gives
//! back the stream; and what the codec keeps buffered stays below one frame of the limit.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use tokio_util::codec::{Decoder, Encoder};
use wazuh_proxy_core::frame::{self, CodecError, FrameCodec, FrameError, HEADER_LEN, MAX_PAYLOAD};

/// Payload limits to fuzz with: mostly the manager's, plus small ones so that `TooLong` and
/// frames right at the limit are common.
const LIMITS: [u32; 8] = [
    MAX_PAYLOAD,
    MAX_PAYLOAD,
    MAX_PAYLOAD,
    MAX_PAYLOAD,
    1,
    16,
    300,
    4096,
];

/// The largest chunk `chunk_len` can give.
const MAX_CHUNK: usize = 65536;

/// Small chunks (1 to 128 bytes) for the low half of the byte, multiples of 512 up to 64 KiB
/// for the high half, so both byte-by-byte arrival and whole large frames are reachable.
fn chunk_len(b: u8) -> usize {
    if b < 0x80 {
        usize::from(b) + 1
    } else {
        usize::from(b - 0x7f) * 512
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&control, rest)) = data.split_first() else {
        return;
    };
    let n = usize::from(control & 0x0f).min(rest.len());
    let (sizes, stream) = rest.split_at(n);
    let max = LIMITS[usize::from((control >> 4) & 0x07)];
    let frame_cap = HEADER_LEN + max as usize;

    let (frames, consumed, scan_err) = frame::scan(stream, max);
    assert!(consumed <= stream.len());

    // Feed the stream chunk by chunk, draining the codec after each chunk as a reader would.
    let mut codec = FrameCodec::new(max);
    let mut buf = BytesMut::new();
    let mut payloads = Vec::new();
    let mut codec_err = None;
    let mut at = 0;
    let mut turn = 0;
    'feed: while at < stream.len() {
        let len = match sizes {
            [] => stream.len(),
            _ => chunk_len(sizes[turn % sizes.len()]),
        };
        turn += 1;
        let end = stream.len().min(at + len);
        buf.extend_from_slice(&stream[at..end]);
        at = end;
        loop {
            match codec.decode(&mut buf) {
                Ok(Some(payload)) => payloads.push(payload),
                Ok(None) => break,
                Err(e) => {
                    codec_err = Some(e);
                    break 'feed;
                }
            }
        }
        // Memory stays bounded: what is left is less than one frame, and the allocation is a
        // small multiple of one frame plus one read, however long the stream.
        assert!(buf.len() < frame_cap, "{} bytes left buffered", buf.len());
        assert!(
            buf.capacity() <= 4 * (frame_cap + MAX_CHUNK),
            "capacity {} for a limit of {max}",
            buf.capacity()
        );
    }

    // Same frames, byte for byte.
    assert_eq!(payloads.len(), frames, "frame count differs from scan");
    let mut off = 0;
    for p in &payloads {
        let len = u32::try_from(p.len()).unwrap();
        assert_eq!(&stream[off..off + HEADER_LEN], &len.to_le_bytes());
        assert_eq!(
            &stream[off + HEADER_LEN..off + HEADER_LEN + p.len()],
            &p[..]
        );
        off += HEADER_LEN + p.len();
    }
    assert_eq!(off, consumed, "codec and scan consumed different lengths");

    // Same verdict on what follows the last whole frame.
    match codec_err {
        Some(CodecError::Frame(e)) => assert_eq!(Some(e), scan_err),
        Some(other) => panic!("unexpected codec error {other:?}"),
        None => {
            assert_eq!(scan_err, None, "scan found an error the codec missed");
            let left = &stream[consumed..];
            assert_eq!(&buf[..], left);
            match codec.decode_eof(&mut buf) {
                Ok(None) => assert!(left.is_empty()),
                Ok(Some(p)) => panic!("a whole frame ({} bytes) was left undecoded", p.len()),
                Err(CodecError::Frame(FrameError::Truncated { buffered, needed })) => {
                    assert_eq!(buffered, left.len());
                    let expected = match left.first_chunk::<HEADER_LEN>() {
                        Some(h) => HEADER_LEN + u32::from_le_bytes(*h) as usize,
                        None => HEADER_LEN,
                    };
                    assert_eq!(needed, expected);
                    assert!(needed > buffered);
                }
                Err(other) => panic!("unexpected error at end of stream: {other:?}"),
            }
        }
    }

    // The encoder gives the stream back.
    let mut wire = BytesMut::new();
    for p in payloads {
        codec.encode(p, &mut wire).unwrap();
    }
    assert_eq!(&wire[..], &stream[..consumed]);
});
