//! Tests of the message cipher.

use super::*;
use crate::envelope::{AgentId, Envelope};
use crate::keys::KeyIp;
use std::io::Write;

fn key() -> AgentKey {
    AgentKey::new(
        AgentId::parse(b"001").unwrap(),
        "web-01",
        KeyIp::Any,
        b"61f01f714746b01b977d7c65a724409f33ad89c391ad93f918eb27202dca8223",
    )
}

/// Seals a raw zlib body (already padded or not) to exercise the inner layers.
fn seal_plain(cipher: Cipher, plain: &[u8]) -> Vec<u8> {
    let k = key();
    let mut buf = plain.to_vec();
    match cipher {
        Cipher::Aes => {
            let n = buf.len();
            buf.resize(n + 16 - n % 16, 0);
            let len = cbc::Encryptor::<Aes256>::new(k.aes_key().into(), AES_IV.into())
                .encrypt_padded_mut::<Pkcs7>(&mut buf, n)
                .unwrap()
                .len();
            buf.truncate(len);
        }
        Cipher::Blowfish => {
            assert_eq!(buf.len() % 8, 0);
            let mut prev = BLOWFISH_IV;
            for block in buf.chunks_exact_mut(8) {
                for (b, p) in block.iter_mut().zip(prev) {
                    *b ^= p;
                }
                k.blowfish().encrypt_block(block.into());
                prev.copy_from_slice(block);
            }
        }
    }
    buf
}

fn zlib(data: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::ZlibEncoder::new(Vec::new(), Compression::best());
    e.write_all(data).unwrap();
    e.finish().unwrap()
}

fn padded(z: &[u8]) -> Vec<u8> {
    let mut p = vec![b'!'; 8 - z.len() % 8];
    p.extend_from_slice(z);
    p
}

#[test]
fn worked_example_inner() {
    let inner = b"35c10b69f4253bee3663048d3b4edf0c555551234567891:0227:#!-agent startup ";
    let o = parse_inner(inner, true).unwrap();
    assert_eq!(
        o.counters,
        Counters {
            rnd: 55555,
            global: 1234567891,
            local: 227
        }
    );
    assert_eq!(o.message, b"#!-agent startup ");
}

#[test]
fn round_trip_both_ciphers_and_sizes() {
    let k = key();
    let mut dec = Decoder::new();
    for cipher in [Cipher::Aes, Cipher::Blowfish] {
        for len in [0usize, 1, 7, 8, 100, 5000, MAX_MESSAGE] {
            let msg: Vec<u8> = (0..len).map(|i| (i * 7 % 251) as u8).collect();
            let c = Counters {
                rnd: 1,
                global: 2,
                local: 3,
            };
            let ct = encrypt(&k, cipher, &c, &msg).unwrap();
            let o = dec.open(&k, cipher, &ct).unwrap();
            assert_eq!(o.counters, c);
            assert_eq!(o.message, &msg[..], "{cipher:?} {len}");
        }
    }
    assert_eq!(
        encrypt(
            &k,
            Cipher::Aes,
            &Counters::default(),
            &vec![0; MAX_MESSAGE + 1]
        ),
        Err(CipherError::TooLarge)
    );
    assert_eq!(
        encrypt(
            &k,
            Cipher::Aes,
            &Counters {
                rnd: 100_000,
                ..Default::default()
            },
            b""
        ),
        Err(CipherError::CounterOutOfRange { field: "rnd" })
    );
}

#[test]
fn payload_headers() {
    let k = key();
    let p = agent_payload(&k, Cipher::Blowfish, &Counters::default(), b"x").unwrap();
    assert!(p.starts_with(b"!001!:"));
    let fixed = AgentKey::new(k.id(), "h", KeyIp::parse("10.0.0.1").unwrap(), b"k");
    let p = agent_payload(&fixed, Cipher::Aes, &Counters::default(), b"x").unwrap();
    assert!(p.starts_with(b"#AES:"));
    let p = manager_payload(&k, Cipher::Aes, &Counters::default(), b"#!-agent ack ").unwrap();
    let env = Envelope::parse(&p).unwrap();
    assert_eq!(env.agent_id(), None);
    let m = decrypt(&k, Cipher::Aes, env.ciphertext()).unwrap();
    assert_eq!(&m.message[..], b"#!-agent ack ");
}

#[test]
fn in_place_matches_copying() {
    let k = key();
    let mut ct = encrypt(&k, Cipher::Aes, &Counters::default(), b"hello").unwrap();
    let mut dec = Decoder::new();
    assert_eq!(
        dec.open_in_place(&k, Cipher::Aes, &mut ct).unwrap().message,
        b"hello"
    );
}

#[test]
fn errors() {
    let k = key();
    let other = AgentKey::new(k.id(), "web-01", KeyIp::Any, b"other");
    let mut dec = Decoder::new();
    let msg = b"#!-agent startup ";
    let aes = encrypt(&k, Cipher::Aes, &Counters::default(), msg).unwrap();
    let bf = encrypt(&k, Cipher::Blowfish, &Counters::default(), msg).unwrap();
    assert_eq!(
        dec.open(&k, Cipher::Aes, &aes[..aes.len() - 1])
            .unwrap_err(),
        CipherError::BadLength {
            len: aes.len() - 1,
            block: 16
        }
    );
    assert_eq!(
        dec.open(&k, Cipher::Aes, &[]).unwrap_err().reason(),
        "bad_length"
    );
    assert_eq!(
        dec.open(&k, Cipher::Blowfish, &bf[..bf.len() - 3])
            .unwrap_err()
            .reason(),
        "bad_length"
    );
    // A wrong AES key almost always breaks the padding; a wrong Blowfish key the '!'.
    let e = dec.open(&other, Cipher::Aes, &aes).unwrap_err();
    assert!(
        matches!(e, CipherError::BadPadding | CipherError::NoBangPadding),
        "{e:?}"
    );
    assert_eq!(
        dec.open(&other, Cipher::Blowfish, &bf).unwrap_err(),
        CipherError::NoBangPadding
    );

    // Checksum mismatch: valid layers around a wrong MD5.
    let inner = b"00000000000000000000000000000000555551234567891:0227:x";
    for cipher in [Cipher::Aes, Cipher::Blowfish] {
        let ct = seal_plain(cipher, &padded(&zlib(inner)));
        assert_eq!(
            dec.open(&k, cipher, &ct).unwrap_err(),
            CipherError::ChecksumMismatch
        );
        let o = dec.open_unverified(&k, cipher, &ct).unwrap();
        assert!(!o.checksum_ok);
        assert_eq!(o.message, b"x");
    }
    // Too short, malformed fields.
    let ct = seal_plain(Cipher::Aes, &padded(&zlib(b"short")));
    assert_eq!(
        dec.open(&k, Cipher::Aes, &ct).unwrap_err(),
        CipherError::TooShort { len: 5 }
    );
    let body = b"5555a1234567891:0227:x";
    let mut inner = hex32(&Md5::digest(body).into()).to_vec();
    inner.extend_from_slice(body);
    let ct = seal_plain(Cipher::Aes, &padded(&zlib(&inner)));
    assert_eq!(
        dec.open(&k, Cipher::Aes, &ct).unwrap_err(),
        CipherError::MalformedField { field: "rnd" }
    );
    // Not zlib.
    let ct = seal_plain(Cipher::Aes, b"!!!!!!!!garbage!");
    assert_eq!(
        dec.open(&k, Cipher::Aes, &ct).unwrap_err(),
        CipherError::Inflate
    );
    // Truncated zlib.
    let z = zlib(&[b'a'; 1000]);
    let ct = seal_plain(Cipher::Aes, &padded(&z[..z.len() / 2]));
    assert_eq!(
        dec.open(&k, Cipher::Aes, &ct).unwrap_err(),
        CipherError::Inflate
    );
}

#[test]
fn trailing_bytes_after_the_stream_are_ignored() {
    let k = key();
    let body = b"555551234567891:0227:hi";
    let mut inner = hex32(&Md5::digest(body).into()).to_vec();
    inner.extend_from_slice(body);
    let mut z = zlib(&inner);
    z.extend_from_slice(b"trailing junk");
    let ct = seal_plain(Cipher::Blowfish, &padded(&z));
    assert_eq!(
        Decoder::new()
            .open(&k, Cipher::Blowfish, &ct)
            .unwrap()
            .message,
        b"hi"
    );
}

#[test]
fn decompression_bomb_is_refused() {
    let k = key();
    let mut dec = Decoder::new();
    for size in [MAX_INNER + 1, 10 * 1024 * 1024] {
        let ct = seal_plain(Cipher::Aes, &padded(&zlib(&vec![b'0'; size])));
        assert_eq!(
            dec.open(&k, Cipher::Aes, &ct).unwrap_err(),
            CipherError::TooLarge
        );
        assert!(dec.inner.capacity() < 2 * MAX_INNER);
    }
    // Exactly the limit is fine.
    let body_len = MAX_INNER - 32;
    let mut body = b"555551234567891:0227:".to_vec();
    body.resize(body_len, b'z');
    let mut inner = hex32(&Md5::digest(&body).into()).to_vec();
    inner.extend_from_slice(&body);
    let ct = seal_plain(Cipher::Aes, &padded(&zlib(&inner)));
    assert_eq!(
        dec.open(&k, Cipher::Aes, &ct).unwrap().message.len(),
        MAX_MESSAGE
    );
}

#[test]
fn errors_never_show_key_bytes() {
    let k = key();
    let e = Decoder::new().open(&k, Cipher::Aes, &[0; 16]).unwrap_err();
    let text = format!("{e} {e:?}");
    assert!(!text.contains("7859") && !text.contains("61f0"), "{text}");
}
