//! [`Envelope::parse`] on arbitrary payloads, against a plain reading of the header rules.
//!
//! Checked on every input: parsing never panics; it agrees with an independent reference
//! parser (below) on the verdict; a prefixed payload yields an agent ID of 1 to 8 digits;
//! `write_header` plus the ciphertext rebuilds every secure payload exactly; and a header built
//! by `write_header` from fuzzed parts parses back to those parts.
#![no_main]

use libfuzzer_sys::fuzz_target;
use wazuh_proxy_core::envelope::{
    write_header, AgentId, Cipher, Envelope, EnvelopeError, MAX_ID_LEN,
};

/// The header rules read straight from the protocol description, written differently from the
/// library on purpose (digits counted first, no search window).
fn reference(p: &[u8]) -> Result<(Option<&[u8]>, Option<Cipher>, &[u8]), EnvelopeError> {
    fn tag(rest: &[u8]) -> Result<(Cipher, &[u8]), EnvelopeError> {
        if rest.len() >= 5 && &rest[..5] == b"#AES:" {
            Ok((Cipher::Aes, &rest[5..]))
        } else if rest.first() == Some(&b':') {
            Ok((Cipher::Blowfish, &rest[1..]))
        } else {
            Err(EnvelopeError::UnknownTag)
        }
    }
    if p.is_empty() {
        return Err(EnvelopeError::Empty);
    }
    if p[0] == b'!' {
        let digits = p[1..].iter().take_while(|b| b.is_ascii_digit()).count();
        if digits == 0 || digits > MAX_ID_LEN || p.get(1 + digits) != Some(&b'!') {
            return Err(EnvelopeError::BadId);
        }
        let (c, ct) = tag(&p[2 + digits..])?;
        return Ok((Some(&p[1..1 + digits]), Some(c), ct));
    }
    if p == b"#ping" || p == b"#pong" {
        return Ok((None, None, &[]));
    }
    let (c, ct) = tag(p)?;
    Ok((None, Some(c), ct))
}

fuzz_target!(|data: &[u8]| {
    let parsed = Envelope::parse(data);
    match (parsed, reference(data)) {
        (Err(e), Err(r)) => assert_eq!(e, r),
        (Ok(env), Ok((id, cipher, ct))) => {
            assert_eq!(env.agent_id().as_ref().map(AgentId::as_bytes), id);
            assert_eq!(env.cipher(), cipher);
            assert_eq!(env.ciphertext(), ct);
            match env {
                Envelope::Secure {
                    agent_id,
                    cipher,
                    ciphertext,
                } => {
                    if data[0] == b'!' {
                        let id = agent_id.expect("a prefixed payload has an agent ID");
                        let len = id.as_bytes().len();
                        assert!((1..=MAX_ID_LEN).contains(&len));
                        assert!(id.as_bytes().iter().all(u8::is_ascii_digit));
                        assert_eq!(id.as_str().len(), len);
                    } else {
                        assert_eq!(agent_id, None);
                    }
                    let mut rebuilt = Vec::new();
                    write_header(&mut rebuilt, agent_id, cipher);
                    rebuilt.extend_from_slice(ciphertext);
                    assert_eq!(rebuilt, data);
                }
                Envelope::Ping => assert_eq!(data, b"#ping"),
                Envelope::Pong => assert_eq!(data, b"#pong"),
            }
        }
        (got, want) => panic!("parse gave {got:?}, the reference {want:?}"),
    }

    // The other direction: an ID and cipher picked from the input survive write_header + parse.
    if let Some((&first, rest)) = data.split_first() {
        let len = usize::from(first % MAX_ID_LEN as u8) + 1;
        let digits: Vec<u8> = rest.iter().take(len).map(|b| b'0' + b % 10).collect();
        let id = AgentId::parse(&digits);
        assert_eq!(id.is_some(), !digits.is_empty());
        let cipher = if first & 0x80 == 0 {
            Cipher::Aes
        } else {
            Cipher::Blowfish
        };
        let ct = rest.get(len..).unwrap_or(&[]);
        for agent_id in [id, None] {
            let mut out = Vec::new();
            write_header(&mut out, agent_id, cipher);
            out.extend_from_slice(ct);
            let env = Envelope::parse(&out).unwrap();
            assert_eq!(
                env,
                Envelope::Secure {
                    agent_id,
                    cipher,
                    ciphertext: ct
                }
            );
        }
    }
});
