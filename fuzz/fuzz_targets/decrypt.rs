//! The secure-message layers ([`cipher`]) with a fixed key, both ciphers, on hostile input.
//!
//! Input layout:
//!
//! ```text
//! byte 0   bit 0: cipher (0 AES, 1 Blowfish); bits 1-2: mode (below)
//! the rest depends on the mode:
//!   0  a ciphertext, decrypted as received from the network
//!   1  a plaintext under the cipher layer ("!" padding + zlib stream), encrypted here with the
//!      fixed key so that the inflate and header checks are reached, then decrypted
//!   2  two bytes n (little endian) then a pattern: the pattern repeated until it fills
//!      n * 4 bytes (up to 256 KiB) is compressed and sealed, a decompression bomb when large
//!   3  a round trip: 3 counter bytes, then a message sealed with `encrypt` and opened again
//! ```
//!
//! Checked on every input: nothing panics; an opened message never exceeds `MAX_MESSAGE`
//! bytes; a bomb is refused with `TooLarge` (never inflated past `MAX_INNER`); an inner message
//! within the limit opens to what was sealed; every message `encrypt` accepts decrypts to
//! itself and its counters, with both `decrypt` and a reused `Decoder`.
#![no_main]

use std::io::Write;

use aes::Aes256;
use blowfish::cipher::block_padding::Pkcs7;
use blowfish::cipher::{BlockEncrypt, BlockEncryptMut, KeyInit, KeyIvInit};
use blowfish::Blowfish;
use flate2::write::ZlibEncoder;
use flate2::Compression;
use libfuzzer_sys::fuzz_target;
use md5::{Digest, Md5};
use wazuh_proxy_core::cipher::{
    self, CipherError, Counters, Decoder, AES_IV, BLOWFISH_IV, INNER_HEADER_LEN, MAX_INNER,
    MAX_MESSAGE,
};
use wazuh_proxy_core::envelope::{AgentId, Cipher};
use wazuh_proxy_core::keys::{AgentKey, KeyIp};

fn key() -> AgentKey {
    AgentKey::new(
        AgentId::parse(b"001").expect("a valid ID"),
        "web-01",
        KeyIp::Any,
        b"61f01f714746b01b977d7c65a724409f33ad89c391ad93f918eb27202dca8223",
    )
}

/// The cipher layer alone, written from the protocol description (PKCS#7 for AES, none for
/// Blowfish, whose input is padded to 8 bytes with leading '!' by the sender).
fn seal_layer(key: &AgentKey, cipher: Cipher, plain: &[u8]) -> Vec<u8> {
    match cipher {
        Cipher::Aes => {
            let mut buf = plain.to_vec();
            let n = buf.len();
            buf.resize(n + 16 - n % 16, 0);
            let len = cbc::Encryptor::<Aes256>::new(key.aes_key().into(), AES_IV.into())
                .encrypt_padded_mut::<Pkcs7>(&mut buf, n)
                .expect("room for the padding")
                .len();
            buf.truncate(len);
            buf
        }
        Cipher::Blowfish => {
            let mut buf = plain.to_vec();
            buf.resize(plain.len().div_ceil(8).max(1) * 8, 0);
            let bf: Blowfish = Blowfish::new_from_slice(key.blowfish_key()).expect("a 47-byte key");
            let mut prev = BLOWFISH_IV;
            for block in buf.chunks_exact_mut(8) {
                for (b, p) in block.iter_mut().zip(prev) {
                    *b ^= p;
                }
                bf.encrypt_block(block.into());
                prev.copy_from_slice(block);
            }
            buf
        }
    }
}

/// `!` padding + zlib(inner), as a sender builds it before the cipher layer.
fn padded_zlib(inner: &[u8]) -> Vec<u8> {
    let mut z = ZlibEncoder::new(Vec::new(), Compression::fast());
    z.write_all(inner).expect("writing to a Vec");
    let z = z.finish().expect("writing to a Vec");
    let bangs = 8 - z.len() % 8;
    let mut plain = vec![b'!'; bangs];
    plain.extend_from_slice(&z);
    plain
}

/// An inner message with a correct MD5, from a counters-and-message body.
fn with_md5(body: &[u8]) -> Vec<u8> {
    let sum = Md5::digest(body);
    let mut inner: Vec<u8> = sum
        .iter()
        .flat_map(|b| format!("{b:02x}").into_bytes())
        .collect();
    inner.extend_from_slice(body);
    inner
}

fn check_bounded(r: &Result<cipher::SecureMessage, CipherError>) {
    if let Ok(m) = r {
        assert!(
            m.message.len() <= MAX_MESSAGE,
            "{} bytes opened",
            m.message.len()
        );
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&control, rest)) = data.split_first() else {
        return;
    };
    let cipher = if control & 1 == 0 {
        Cipher::Aes
    } else {
        Cipher::Blowfish
    };
    let key = key();
    match (control >> 1) & 3 {
        0 => {
            let r = cipher::decrypt(&key, cipher, rest);
            check_bounded(&r);
            let mut d = Decoder::new();
            let u = d
                .open_unverified(&key, cipher, rest)
                .map(|o| o.message.len());
            if let Ok(n) = u {
                assert!(n <= MAX_MESSAGE);
            }
            // Verified success implies unverified success with the same message.
            if let Ok(m) = &r {
                assert_eq!(u, Ok(m.message.len()));
            }
        }
        1 => {
            let ct = seal_layer(&key, cipher, rest);
            let r = cipher::decrypt(&key, cipher, &ct);
            check_bounded(&r);
            // In place gives the same verdict as the copying path.
            let mut buf = ct.clone();
            let mut d = Decoder::new();
            let inplace = d
                .open_in_place(&key, cipher, &mut buf)
                .map(|o| (o.counters, o.message.to_vec()));
            assert_eq!(inplace, r.map(|m| (m.counters, m.message.to_vec())));
        }
        2 => {
            let Some((n, pattern)) = rest.split_first_chunk::<2>() else {
                return;
            };
            if pattern.is_empty() {
                return;
            }
            let total = usize::from(u16::from_le_bytes(*n)) * 4;
            let body: Vec<u8> = pattern.iter().copied().cycle().take(total).collect();
            let inner = with_md5(&body);
            let ct = seal_layer(&key, cipher, &padded_zlib(&inner));
            let r = cipher::decrypt(&key, cipher, &ct);
            check_bounded(&r);
            if inner.len() > MAX_INNER {
                assert_eq!(
                    r.err(),
                    Some(CipherError::TooLarge),
                    "{} byte bomb",
                    inner.len()
                );
            } else if let Ok(m) = r {
                assert_eq!(&m.message[..], &inner[INNER_HEADER_LEN..]);
            } else {
                // Within the limit, only the inner header may be refused.
                assert!(
                    matches!(
                        r,
                        Err(CipherError::TooShort { .. } | CipherError::MalformedField { .. })
                    ),
                    "{r:?}"
                );
            }
        }
        _ => {
            let Some((c, message)) = rest.split_first_chunk::<3>() else {
                return;
            };
            let counters = Counters {
                rnd: u32::from(u16::from_le_bytes([c[0], c[1]])),
                global: u64::from(c[2]) * 39_062_500,
                local: u32::from(c[2]) * 39,
            };
            match cipher::encrypt(&key, cipher, &counters, message) {
                Ok(ct) => {
                    let m = cipher::decrypt(&key, cipher, &ct).expect("a sealed message opens");
                    assert_eq!(m.counters, counters);
                    assert_eq!(&m.message[..], message);
                    let mut d = Decoder::new();
                    for _ in 0..2 {
                        let o = d
                            .open(&key, cipher, &ct)
                            .expect("a reused decoder opens it");
                        assert_eq!(o.message, message);
                    }
                }
                Err(e) => {
                    assert!(
                        message.len() > MAX_MESSAGE,
                        "{e:?} for {} bytes",
                        message.len()
                    );
                    assert_eq!(e, CipherError::TooLarge);
                }
            }
        }
    }
});
