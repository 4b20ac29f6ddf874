//! The 1514/TCP framing: a 4-byte little-endian payload length, then the payload.
//!
//! Decoding is two-step, as the manager does it: the 4-byte header is checked first (a length
//! of 0 or above the limit is rejected before a single body byte is buffered), and only then is
//! the body awaited. [`check`] is the allocation-free core used by the relay, which forwards
//! frames as raw bytes; [`FrameCodec`] wraps it as a `tokio_util` codec for tools and tests.
//!
//! ```
//! use bytes::BytesMut;
//! use tokio_util::codec::{Decoder, Encoder};
//! use wazuh_proxy_core::frame::FrameCodec;
//!
//! let mut codec = FrameCodec::default();
//! let mut wire = BytesMut::new();
//! codec.encode(&b"#ping"[..], &mut wire).unwrap();
//! assert_eq!(&wire[..], b"\x05\x00\x00\x00#ping");
//! let payload = codec.decode(&mut wire).unwrap().unwrap();
//! assert_eq!(&payload[..], b"#ping");
//! ```

#[cfg(feature = "runtime")]
use bytes::{Buf, BufMut, Bytes, BytesMut};
#[cfg(feature = "runtime")]
use tokio_util::codec::{Decoder, Encoder};

/// Length of the frame header.
pub const HEADER_LEN: usize = 4;

/// The manager's limit on a payload (`OS_MAXSTR`): remoted closes a connection announcing more.
pub const MAX_PAYLOAD: u32 = 65536;

/// Why a byte stream is not a valid sequence of frames.
///
/// Cheap and `Copy`: it is created on the hot path and maps one to one to a metric label
/// ([`FrameError::reason`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum FrameError {
    /// The header announced an empty payload. The manager closes such a connection, and an
    /// agent reads it as "manager disconnected", so it is never forwarded.
    #[error("frame header announces a zero-length payload")]
    ZeroLength,
    /// The header announced more than the limit. An HTTP request or a TLS ClientHello on 1514
    /// lands here too: their first four bytes read as a huge length.
    #[error("frame header announces {len} bytes, above the limit of {max}")]
    TooLong {
        /// Announced payload length.
        len: u32,
        /// The limit in force.
        max: u32,
    },
    /// The stream ended inside a frame.
    #[error("stream ended inside a frame ({buffered} of {needed} bytes received)")]
    Truncated {
        /// Bytes of the frame (header included) that arrived.
        buffered: usize,
        /// Bytes the frame needed (header included).
        needed: usize,
    },
}

impl FrameError {
    /// A short static name for logs and metric labels.
    pub fn reason(&self) -> &'static str {
        match self {
            FrameError::ZeroLength => "zero_length",
            FrameError::TooLong { .. } => "too_long",
            FrameError::Truncated { .. } => "truncated",
        }
    }
}

/// Reads and validates a frame header (at least 4 bytes) and returns the payload length.
///
/// # Errors
/// [`FrameError::ZeroLength`] or [`FrameError::TooLong`].
#[inline]
pub fn check_header(header: [u8; HEADER_LEN], max: u32) -> Result<usize, FrameError> {
    let len = u32::from_le_bytes(header);
    if len == 0 {
        Err(FrameError::ZeroLength)
    } else if len > max {
        Err(FrameError::TooLong { len, max })
    } else {
        Ok(len as usize)
    }
}

/// Looks at the front of `buf` for one whole frame.
///
/// Returns `Ok(Some(total))` with the frame's full length (header included) when it is all
/// there, `Ok(None)` when more bytes are needed, and an error as soon as the header is known to
/// be bad, even if the body has not arrived. Never allocates and never consumes.
#[inline]
pub fn check(buf: &[u8], max: u32) -> Result<Option<usize>, FrameError> {
    let Some(header) = buf.first_chunk::<HEADER_LEN>() else {
        return Ok(None);
    };
    let total = HEADER_LEN + check_header(*header, max)?;
    Ok((buf.len() >= total).then_some(total))
}

/// Counts the whole frames at the front of `buf`, checking each header.
///
/// Returns the number of frames and the bytes they span; the rest of `buf` is the start of an
/// incomplete frame. On a bad header the error comes with the frames counted before it, so a
/// caller can still forward what preceded the bad frame.
///
/// ```
/// use wazuh_proxy_core::frame::{scan, MAX_PAYLOAD};
/// let wire = b"\x01\x00\x00\x00a\x02\x00\x00\x00bc\x03\x00";
/// assert_eq!(scan(wire, MAX_PAYLOAD), (2, 11, None));
/// ```
#[inline]
pub fn scan(buf: &[u8], max: u32) -> (usize, usize, Option<FrameError>) {
    let mut frames = 0;
    let mut at = 0;
    loop {
        match check(&buf[at..], max) {
            Ok(Some(total)) => {
                frames += 1;
                at += total;
            }
            Ok(None) => return (frames, at, None),
            Err(e) => return (frames, at, Some(e)),
        }
    }
}

/// The error for a stream that ended inside the frame at the front of `buf`.
pub fn truncated(buf: &[u8]) -> FrameError {
    let needed = buf
        .first_chunk::<HEADER_LEN>()
        .map_or(HEADER_LEN, |h| HEADER_LEN + u32::from_le_bytes(*h) as usize);
    FrameError::Truncated {
        buffered: buf.len(),
        needed,
    }
}

/// A `tokio_util` codec for 1514/TCP frames: decodes to payloads, encodes payloads.
#[derive(Debug, Clone, Copy)]
pub struct FrameCodec {
    max: u32,
}

impl FrameCodec {
    /// A codec that rejects payloads above `max` bytes.
    pub fn new(max: u32) -> Self {
        FrameCodec { max }
    }

    /// The payload limit in force.
    pub fn max_payload(&self) -> u32 {
        self.max
    }
}

impl Default for FrameCodec {
    /// The manager's own limit, [`MAX_PAYLOAD`].
    fn default() -> Self {
        FrameCodec::new(MAX_PAYLOAD)
    }
}

/// Error of [`FrameCodec`]: a framing rule broke, or the underlying I/O failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CodecError {
    /// The peer broke a framing rule.
    #[error(transparent)]
    Frame(#[from] FrameError),
    /// The transport failed.
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

// The tokio codec traits, for `Framed` sockets (runtime).
#[cfg(feature = "runtime")]
impl Decoder for FrameCodec {
    type Item = Bytes;
    type Error = CodecError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Bytes>, CodecError> {
        match check(src, self.max)? {
            Some(total) => {
                let mut frame = src.split_to(total);
                frame.advance(HEADER_LEN);
                Ok(Some(frame.freeze()))
            }
            None => {
                // Reserve the announced body once, so a large frame is not grown step by step.
                if let Some(header) = src.first_chunk::<HEADER_LEN>() {
                    let total = HEADER_LEN + u32::from_le_bytes(*header) as usize;
                    src.reserve(total - src.len());
                }
                Ok(None)
            }
        }
    }

    fn decode_eof(&mut self, src: &mut BytesMut) -> Result<Option<Bytes>, CodecError> {
        match self.decode(src)? {
            Some(frame) => Ok(Some(frame)),
            None if src.is_empty() => Ok(None),
            None => Err(truncated(src).into()),
        }
    }
}

#[cfg(feature = "runtime")]
impl Encoder<&[u8]> for FrameCodec {
    type Error = CodecError;

    fn encode(&mut self, payload: &[u8], dst: &mut BytesMut) -> Result<(), CodecError> {
        let len = u32::try_from(payload.len()).unwrap_or(u32::MAX);
        check_header(len.to_le_bytes(), self.max)?;
        dst.reserve(HEADER_LEN + payload.len());
        dst.put_u32_le(len);
        dst.put_slice(payload);
        Ok(())
    }
}

#[cfg(feature = "runtime")]
impl Encoder<Bytes> for FrameCodec {
    type Error = CodecError;

    fn encode(&mut self, payload: Bytes, dst: &mut BytesMut) -> Result<(), CodecError> {
        self.encode(&payload[..], dst)
    }
}

/// Prepends the 4-byte header to `payload` and returns the frame.
///
/// # Errors
/// When the payload is empty or above `max`.
pub fn encode_frame(payload: &[u8], max: u32) -> Result<Vec<u8>, FrameError> {
    let len = u32::try_from(payload.len()).unwrap_or(u32::MAX);
    check_header(len.to_le_bytes(), max)?;
    let mut out = Vec::with_capacity(HEADER_LEN + payload.len());
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(payload);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(payload: &[u8]) -> Vec<u8> {
        encode_frame(payload, MAX_PAYLOAD).unwrap()
    }

    #[test]
    fn header_rules() {
        assert_eq!(
            check_header([0, 0, 0, 0], MAX_PAYLOAD),
            Err(FrameError::ZeroLength)
        );
        assert_eq!(check_header([0, 0, 1, 0], MAX_PAYLOAD), Ok(65536));
        assert_eq!(
            check_header([1, 0, 1, 0], MAX_PAYLOAD),
            Err(FrameError::TooLong {
                len: 65537,
                max: MAX_PAYLOAD
            })
        );
        // "GET " as a length.
        assert!(matches!(
            check_header(*b"GET ", MAX_PAYLOAD),
            Err(FrameError::TooLong { .. })
        ));
        // A TLS ClientHello record header.
        assert!(matches!(
            check_header([0x16, 0x03, 0x01, 0x02], MAX_PAYLOAD),
            Err(FrameError::TooLong { .. })
        ));
    }

    #[test]
    fn check_rejects_a_bad_header_before_the_body() {
        assert_eq!(
            check(&[0xff, 0xff, 0xff, 0xff], MAX_PAYLOAD)
                .unwrap_err()
                .reason(),
            "too_long"
        );
        assert_eq!(check(&[1, 0, 0], MAX_PAYLOAD), Ok(None));
        assert_eq!(check(&[2, 0, 0, 0, b'a'], MAX_PAYLOAD), Ok(None));
        assert_eq!(
            check(&[2, 0, 0, 0, b'a', b'b', b'c'], MAX_PAYLOAD),
            Ok(Some(6))
        );
    }

    #[test]
    fn scan_stops_at_a_bad_frame_with_what_preceded_it() {
        let mut wire = frame(b"one");
        wire.extend(frame(b"two"));
        wire.extend([0, 0, 0, 0]);
        assert_eq!(
            scan(&wire, MAX_PAYLOAD),
            (2, 14, Some(FrameError::ZeroLength))
        );
    }

    #[test]
    fn codec_splits_byte_by_byte() {
        let mut wire = frame(b"first");
        wire.extend(frame(&[7u8; 300]));
        let mut codec = FrameCodec::default();
        let mut buf = BytesMut::new();
        let mut out = Vec::new();
        for b in wire {
            buf.put_u8(b);
            while let Some(p) = codec.decode(&mut buf).unwrap() {
                out.push(p);
            }
        }
        assert_eq!(out.len(), 2);
        assert_eq!(&out[0][..], b"first");
        assert_eq!(&out[1][..], &[7u8; 300][..]);
        assert!(codec.decode_eof(&mut buf).unwrap().is_none());
    }

    #[test]
    fn codec_reports_truncation_at_eof() {
        let mut codec = FrameCodec::default();
        let mut buf = BytesMut::from(&b"\x10\x00\x00\x00abc"[..]);
        match codec.decode_eof(&mut buf) {
            Err(CodecError::Frame(FrameError::Truncated {
                buffered: 7,
                needed: 20,
            })) => {}
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn encoder_refuses_what_the_decoder_would_refuse() {
        let mut codec = FrameCodec::new(4);
        let mut dst = BytesMut::new();
        assert!(codec.encode(&b""[..], &mut dst).is_err());
        assert!(codec.encode(&b"12345"[..], &mut dst).is_err());
        assert!(dst.is_empty());
    }
}
