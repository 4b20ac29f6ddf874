//! The secure message layers under the envelope header, in both directions.
//!
//! ```text
//! ciphertext = AES-256-CBC (IV "FEDCBA0987654321", PKCS#7)  or  Blowfish-CBC (IV fe dc ba 98 76 54 32 10)
//!   of   "!" x B || zlib(inner)                         B = 1..8, total a multiple of 8
//! inner = md5hex(R) || R,   R = RND(5 digits) GLOBAL(10) ":" LOCAL(4) ":" MESSAGE
//! ```
//!
//! [`Decoder`] and [`Encoder`] keep their buffers and (de)compressor between messages, which
//! is what the relay uses; [`decrypt`], [`encrypt`], [`agent_payload`] and [`manager_payload`]
//! are conveniences built on them.
//!
//! ```
//! use wazuh_proxy_core::cipher::{self, Counters};
//! use wazuh_proxy_core::envelope::{AgentId, Cipher, Envelope};
//! use wazuh_proxy_core::keys::{AgentKey, KeyIp};
//!
//! let key = AgentKey::new(AgentId::parse(b"001").unwrap(), "web-01", KeyIp::Any, b"secret");
//! let counters = Counters { rnd: 55555, global: 1234567891, local: 227 };
//! let payload = cipher::agent_payload(&key, Cipher::Aes, &counters, b"#!-agent startup ").unwrap();
//! let env = Envelope::parse(&payload).unwrap();
//! assert_eq!(env.agent_id(), Some(key.id()));
//! let msg = cipher::decrypt(&key, Cipher::Aes, env.ciphertext()).unwrap();
//! assert_eq!(msg.counters, counters);
//! assert_eq!(&msg.message[..], b"#!-agent startup ");
//! ```

use std::cell::RefCell;

use aes::Aes256;
use blowfish::cipher::block_padding::Pkcs7;
use blowfish::cipher::{BlockDecrypt, BlockDecryptMut, BlockEncrypt, BlockEncryptMut, KeyIvInit};
use bytes::Bytes;
use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress, Status};
use md5::{Digest, Md5};

use crate::envelope::{write_header, Cipher};
use crate::keys::{hex32, AgentKey};

/// The AES IV: 16 ASCII bytes, constant.
pub const AES_IV: &[u8; 16] = b"FEDCBA0987654321";

/// The Blowfish IV, constant.
pub const BLOWFISH_IV: [u8; 8] = [0xfe, 0xdc, 0xba, 0x98, 0x76, 0x54, 0x32, 0x10];

/// The largest inflated inner message accepted (the manager's `OS_MAXSTR`).
pub const MAX_INNER: usize = 65536;

/// Length of the inner header: MD5 (32), RND (5), GLOBAL (10), `:`, LOCAL (4), `:`.
pub const INNER_HEADER_LEN: usize = 53;

/// The largest MESSAGE that fits in an inner message.
pub const MAX_MESSAGE: usize = MAX_INNER - INNER_HEADER_LEN;

/// Why a ciphertext did not yield a message, or a message could not be sealed.
///
/// Cheap and `Copy`, never holds key or message bytes; [`CipherError::reason`] gives a metric
/// label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CipherError {
    /// The ciphertext is empty or not a whole number of cipher blocks.
    #[error("ciphertext of {len} bytes is not a non-zero multiple of {block}")]
    BadLength {
        /// Ciphertext length.
        len: usize,
        /// The cipher's block size.
        block: usize,
    },
    /// Invalid PKCS#7 padding after AES decryption (the manager reads this as a wrong key).
    #[error("invalid PKCS#7 padding (wrong key?)")]
    BadPadding,
    /// The decrypted text does not start with `!` (a wrong key, for Blowfish).
    #[error("decrypted text does not start with '!' padding (wrong key?)")]
    NoBangPadding,
    /// The zlib stream is corrupt or truncated.
    #[error("zlib stream is corrupt or truncated")]
    Inflate,
    /// The inflated message would exceed [`MAX_INNER`] bytes, or a message to seal exceeds
    /// [`MAX_MESSAGE`].
    #[error("message exceeds {MAX_INNER} bytes")]
    TooLarge,
    /// The inflated message is shorter than its 53-byte header.
    #[error("inner message of {len} bytes is shorter than its {INNER_HEADER_LEN}-byte header")]
    TooShort {
        /// Inflated length.
        len: usize,
    },
    /// The MD5 in the header does not match the rest of the message.
    #[error("MD5 checksum mismatch")]
    ChecksumMismatch,
    /// A header field (`rnd`, `global`, `local`, or a `:` separator) is malformed.
    #[error("malformed inner header field '{field}'")]
    MalformedField {
        /// Which field.
        field: &'static str,
    },
    /// A counter does not fit its fixed-width field when sealing.
    #[error("counter '{field}' does not fit its field width")]
    CounterOutOfRange {
        /// Which counter.
        field: &'static str,
    },
}

impl CipherError {
    /// A short static name for logs and metric labels.
    pub fn reason(&self) -> &'static str {
        match self {
            CipherError::BadLength { .. } => "bad_length",
            CipherError::BadPadding => "bad_padding",
            CipherError::NoBangPadding => "no_bang_padding",
            CipherError::Inflate => "inflate",
            CipherError::TooLarge => "too_large",
            CipherError::TooShort { .. } => "too_short",
            CipherError::ChecksumMismatch => "checksum_mismatch",
            CipherError::MalformedField { .. } => "malformed_field",
            CipherError::CounterOutOfRange { .. } => "counter_out_of_range",
        }
    }
}

/// The three counters of the inner header.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Counters {
    /// RND: 5 digits (a 16-bit random value in practice).
    pub rnd: u32,
    /// GLOBAL: 10 digits.
    pub global: u64,
    /// LOCAL: 4 digits (1..=9997 from a real agent).
    pub local: u32,
}

impl Counters {
    /// Largest RND that fits 5 digits.
    pub const MAX_RND: u32 = 99_999;
    /// Largest GLOBAL that fits 10 digits.
    pub const MAX_GLOBAL: u64 = 9_999_999_999;
    /// Largest LOCAL that fits 4 digits.
    pub const MAX_LOCAL: u32 = 9_999;

    /// Advances the pair as an agent does before each message: LOCAL runs 1..=9997, then GLOBAL
    /// goes up by one.
    ///
    /// ```
    /// use wazuh_proxy_core::cipher::Counters;
    /// let mut c = Counters { rnd: 0, global: 4, local: 9997 };
    /// c.advance();
    /// assert_eq!((c.global, c.local), (5, 1));
    /// ```
    pub fn advance(&mut self) {
        if self.local >= 9997 {
            self.local = 0;
            self.global = self.global.saturating_add(1);
        }
        self.local += 1;
    }

    /// The (GLOBAL, LOCAL) pair, ordered as the manager's replay check orders it.
    pub fn sequence(&self) -> (u64, u32) {
        (self.global, self.local)
    }
}

/// A decrypted message, owning its text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SecureMessage {
    /// The counters of the inner header.
    pub counters: Counters,
    /// MESSAGE: a control message (`#!-...`) or an event.
    pub message: Bytes,
}

/// A decrypted message borrowed from a [`Decoder`]'s buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Opened<'a> {
    /// The counters of the inner header.
    pub counters: Counters,
    /// MESSAGE.
    pub message: &'a [u8],
    /// Whether the MD5 matched (always true from [`Decoder::open`]).
    pub checksum_ok: bool,
}

/// Decrypts messages, reusing its buffers and inflater: one per thread or connection.
pub struct Decoder {
    plain: Vec<u8>,
    inner: Vec<u8>,
    inflate: Decompress,
}

impl Default for Decoder {
    fn default() -> Self {
        Decoder::new()
    }
}

impl std::fmt::Debug for Decoder {
    // The buffers hold decrypted text: not for logs.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Decoder")
    }
}

impl Decoder {
    /// A decoder with empty buffers.
    pub fn new() -> Decoder {
        Decoder {
            plain: Vec::new(),
            inner: Vec::new(),
            inflate: Decompress::new(true),
        }
    }

    /// Decrypts, inflates and checks one ciphertext (the bytes after the envelope tag).
    ///
    /// # Errors
    /// Any [`CipherError`], including [`CipherError::ChecksumMismatch`].
    pub fn open(
        &mut self,
        key: &AgentKey,
        cipher: Cipher,
        ciphertext: &[u8],
    ) -> Result<Opened<'_>, CipherError> {
        self.open_copy(key, cipher, ciphertext, true)
    }

    /// Like [`Decoder::open`] but a checksum mismatch is reported in
    /// [`Opened::checksum_ok`] instead of failing (for inspection tools).
    ///
    /// # Errors
    /// Any [`CipherError`] except [`CipherError::ChecksumMismatch`].
    pub fn open_unverified(
        &mut self,
        key: &AgentKey,
        cipher: Cipher,
        ciphertext: &[u8],
    ) -> Result<Opened<'_>, CipherError> {
        self.open_copy(key, cipher, ciphertext, false)
    }

    /// Decrypts a copy of `ciphertext` in the decoder's own buffer.
    fn open_copy(
        &mut self,
        key: &AgentKey,
        cipher: Cipher,
        ciphertext: &[u8],
        verify: bool,
    ) -> Result<Opened<'_>, CipherError> {
        self.plain.clear();
        self.plain.extend_from_slice(ciphertext);
        let zlib = decrypt_layer(key, cipher, &mut self.plain)?;
        inflate(&mut self.inflate, zlib, &mut self.inner)?;
        parse_inner(&self.inner, verify)
    }

    /// Like [`Decoder::open`], decrypting in the caller's buffer (which is overwritten) instead
    /// of copying it first.
    ///
    /// # Errors
    /// Any [`CipherError`].
    pub fn open_in_place(
        &mut self,
        key: &AgentKey,
        cipher: Cipher,
        ciphertext: &mut [u8],
    ) -> Result<Opened<'_>, CipherError> {
        let zlib = decrypt_layer(key, cipher, ciphertext)?;
        inflate(&mut self.inflate, zlib, &mut self.inner)?;
        parse_inner(&self.inner, true)
    }
}

/// Decrypts the cipher layer in place and returns the zlib stream after the `!` padding.
fn decrypt_layer<'b>(
    key: &AgentKey,
    cipher: Cipher,
    buf: &'b mut [u8],
) -> Result<&'b [u8], CipherError> {
    let plain: &[u8] = match cipher {
        Cipher::Aes => {
            if buf.is_empty() || buf.len() % 16 != 0 {
                return Err(CipherError::BadLength {
                    len: buf.len(),
                    block: 16,
                });
            }
            cbc::Decryptor::<Aes256>::new(key.aes_key().into(), AES_IV.into())
                .decrypt_padded_mut::<Pkcs7>(buf)
                .map_err(|_| CipherError::BadPadding)?
        }
        Cipher::Blowfish => {
            if buf.is_empty() || buf.len() % 8 != 0 {
                return Err(CipherError::BadLength {
                    len: buf.len(),
                    block: 8,
                });
            }
            // CBC by hand over the cached key schedule: `cbc::Decryptor` would need an owned
            // copy of Blowfish's 4 KiB of state per message.
            let bf = key.blowfish();
            let mut prev = BLOWFISH_IV;
            for block in buf.chunks_exact_mut(8) {
                let mut ct = [0u8; 8];
                ct.copy_from_slice(block);
                bf.decrypt_block(block.into());
                for (b, p) in block.iter_mut().zip(prev) {
                    *b ^= p;
                }
                prev = ct;
            }
            buf
        }
    };
    let bangs = plain.iter().take_while(|&&b| b == b'!').count();
    if bangs == 0 {
        return Err(CipherError::NoBangPadding);
    }
    Ok(&plain[bangs..])
}

/// Inflates `zlib` into `out`, never producing more than about [`MAX_INNER`] bytes. Bytes after
/// the end of the stream are ignored, as the manager ignores them.
fn inflate(z: &mut Decompress, zlib: &[u8], out: &mut Vec<u8>) -> Result<(), CipherError> {
    z.reset(true);
    out.clear();
    // One byte more than the limit, to tell "exactly the limit" from "more".
    out.reserve(MAX_INNER + 1);
    let status = z
        .decompress_vec(zlib, out, FlushDecompress::Finish)
        .map_err(|_| CipherError::Inflate)?;
    if out.len() > MAX_INNER {
        return Err(CipherError::TooLarge);
    }
    match status {
        Status::StreamEnd => Ok(()),
        // Output room is left, so the stream must have ended early (truncated input).
        Status::Ok | Status::BufError if out.len() < out.capacity() => Err(CipherError::Inflate),
        Status::Ok | Status::BufError => Err(CipherError::TooLarge),
    }
}

fn digits(text: &[u8], field: &'static str) -> Result<u64, CipherError> {
    text.iter().try_fold(0u64, |acc, &b| {
        if b.is_ascii_digit() {
            Ok(acc * 10 + u64::from(b - b'0'))
        } else {
            Err(CipherError::MalformedField { field })
        }
    })
}

/// Checks and splits an inflated inner message.
fn parse_inner(inner: &[u8], verify: bool) -> Result<Opened<'_>, CipherError> {
    if inner.len() < INNER_HEADER_LEN {
        return Err(CipherError::TooShort { len: inner.len() });
    }
    let checksum_ok = hex32(&Md5::digest(&inner[32..]).into()).eq_ignore_ascii_case(&inner[..32]);
    if verify && !checksum_ok {
        return Err(CipherError::ChecksumMismatch);
    }
    if inner[47] != b':' || inner[52] != b':' {
        return Err(CipherError::MalformedField { field: "separator" });
    }
    let counters = Counters {
        rnd: digits(&inner[32..37], "rnd")? as u32,
        global: digits(&inner[37..47], "global")?,
        local: digits(&inner[48..52], "local")? as u32,
    };
    Ok(Opened {
        counters,
        message: &inner[INNER_HEADER_LEN..],
        checksum_ok,
    })
}

thread_local! {
    static DECODER: RefCell<Decoder> = RefCell::new(Decoder::new());
    static ENCODER: RefCell<Encoder> = RefCell::new(Encoder::new());
}

/// Decrypts one ciphertext (the bytes after the envelope tag) with a per-thread [`Decoder`].
///
/// # Errors
/// Any [`CipherError`].
pub fn decrypt(
    key: &AgentKey,
    cipher: Cipher,
    ciphertext: &[u8],
) -> Result<SecureMessage, CipherError> {
    let owned = |d: &mut Decoder| {
        d.open(key, cipher, ciphertext).map(|o| SecureMessage {
            counters: o.counters,
            message: Bytes::copy_from_slice(o.message),
        })
    };
    DECODER.with(|cell| match cell.try_borrow_mut() {
        Ok(mut d) => owned(&mut d),
        Err(_) => owned(&mut Decoder::new()),
    })
}

/// Builds ciphertexts, reusing its buffers and compressor.
pub struct Encoder {
    inner: Vec<u8>,
    zlib: Vec<u8>,
    deflate: Compress,
}

impl Default for Encoder {
    fn default() -> Self {
        Encoder::new()
    }
}

impl std::fmt::Debug for Encoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Encoder")
    }
}

impl Encoder {
    /// An encoder compressing at level 9, as real agents do.
    pub fn new() -> Encoder {
        Encoder {
            inner: Vec::new(),
            zlib: Vec::new(),
            deflate: Compress::new(Compression::best(), true),
        }
    }

    /// Appends the ciphertext of `message` to `out` (no envelope header).
    ///
    /// # Errors
    /// [`CipherError::TooLarge`] above [`MAX_MESSAGE`] bytes, or
    /// [`CipherError::CounterOutOfRange`].
    pub fn seal_into(
        &mut self,
        key: &AgentKey,
        cipher: Cipher,
        counters: &Counters,
        message: &[u8],
        out: &mut Vec<u8>,
    ) -> Result<(), CipherError> {
        if message.len() > MAX_MESSAGE {
            return Err(CipherError::TooLarge);
        }
        if counters.rnd > Counters::MAX_RND {
            return Err(CipherError::CounterOutOfRange { field: "rnd" });
        }
        if counters.global > Counters::MAX_GLOBAL {
            return Err(CipherError::CounterOutOfRange { field: "global" });
        }
        if counters.local > Counters::MAX_LOCAL {
            return Err(CipherError::CounterOutOfRange { field: "local" });
        }
        // inner = md5hex(R) || R
        let inner = &mut self.inner;
        inner.clear();
        inner.resize(32, 0);
        {
            use std::io::Write;
            // Writing to a Vec cannot fail.
            let _ = write!(
                inner,
                "{:05}{:010}:{:04}:",
                counters.rnd, counters.global, counters.local
            );
        }
        inner.extend_from_slice(message);
        let sum = hex32(&Md5::digest(&inner[32..]).into());
        inner[..32].copy_from_slice(&sum);

        // zlib, with room for the worst case (zlib's compressBound plus slack).
        let z = &mut self.zlib;
        z.clear();
        z.reserve(inner.len() + inner.len() / 1000 + 64);
        self.deflate.reset();
        loop {
            let consumed = self.deflate.total_in() as usize;
            let status = self
                .deflate
                .compress_vec(&inner[consumed..], z, FlushCompress::Finish)
                .map_err(|_| CipherError::Inflate)?;
            if status == Status::StreamEnd {
                break;
            }
            z.reserve(z.len().max(64));
        }

        let start = out.len();
        let bangs = 8 - z.len() % 8;
        out.resize(start + bangs, b'!');
        out.extend_from_slice(z);
        let plain_len = out.len() - start;
        match cipher {
            Cipher::Aes => {
                // PKCS#7 always adds 1..=16 bytes (8 or 16 here: the input is a multiple of 8).
                out.resize(start + plain_len + 16 - plain_len % 16, 0);
                let sealed = cbc::Encryptor::<Aes256>::new(key.aes_key().into(), AES_IV.into())
                    .encrypt_padded_mut::<Pkcs7>(&mut out[start..], plain_len)
                    .map(<[u8]>::len)
                    .map_err(|_| CipherError::BadPadding)?;
                out.truncate(start + sealed);
            }
            Cipher::Blowfish => {
                let bf = key.blowfish();
                let mut prev = BLOWFISH_IV;
                for block in out[start..].chunks_exact_mut(8) {
                    for (b, p) in block.iter_mut().zip(prev) {
                        *b ^= p;
                    }
                    bf.encrypt_block(block.into());
                    prev.copy_from_slice(block);
                }
            }
        }
        Ok(())
    }
}

fn with_encoder<T>(f: impl FnOnce(&mut Encoder) -> T) -> T {
    ENCODER.with(|cell| match cell.try_borrow_mut() {
        Ok(mut e) => f(&mut e),
        Err(_) => f(&mut Encoder::new()),
    })
}

/// Encrypts `message` with `counters` and returns the ciphertext (no envelope header).
///
/// # Errors
/// See [`Encoder::seal_into`].
pub fn encrypt(
    key: &AgentKey,
    cipher: Cipher,
    counters: &Counters,
    message: &[u8],
) -> Result<Vec<u8>, CipherError> {
    let mut out = Vec::with_capacity(message.len() / 2 + 64);
    with_encoder(|e| e.seal_into(key, cipher, counters, message, &mut out))?;
    Ok(out)
}

/// A whole agent -> manager payload (without the TCP length): `!ID!` when the agent's key IP
/// calls for it (see [`AgentKey::sends_id_prefix`]), the cipher tag, the ciphertext.
///
/// # Errors
/// See [`Encoder::seal_into`].
pub fn agent_payload(
    key: &AgentKey,
    cipher: Cipher,
    counters: &Counters,
    message: &[u8],
) -> Result<Vec<u8>, CipherError> {
    let mut out = Vec::with_capacity(message.len() / 2 + 80);
    write_header(&mut out, key.sends_id_prefix().then(|| key.id()), cipher);
    with_encoder(|e| e.seal_into(key, cipher, counters, message, &mut out))?;
    Ok(out)
}

/// A whole manager -> agent payload (without the TCP length): the cipher tag and the
/// ciphertext (the manager never adds an ID).
///
/// # Errors
/// See [`Encoder::seal_into`].
pub fn manager_payload(
    key: &AgentKey,
    cipher: Cipher,
    counters: &Counters,
    message: &[u8],
) -> Result<Vec<u8>, CipherError> {
    let mut out = Vec::with_capacity(message.len() / 2 + 80);
    write_header(&mut out, None, cipher);
    with_encoder(|e| e.seal_into(key, cipher, counters, message, &mut out))?;
    Ok(out)
}

#[cfg(test)]
mod tests;
