//! Every third-party vector of `shared/vectors` decrypts to its plaintext, re-encodes, and
//! classifies as its `kind` says.

use base64::Engine;
use serde_json::Value;
use wazuh_proxy_core::cipher::{self, Counters, Decoder};
use wazuh_proxy_core::control::{self, Control, Message};
use wazuh_proxy_core::envelope::{AgentId, Cipher, Envelope};
use wazuh_proxy_core::frame::{self, MAX_PAYLOAD};
use wazuh_proxy_core::keys::{KeySet, KeyStore};
use wazuh_proxy_test_support::vectors_dir;

fn rows(file: &str) -> Option<Vec<Value>> {
    let text = std::fs::read_to_string(vectors_dir()?.join(file)).unwrap();
    Some(
        text.lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| serde_json::from_str(l).unwrap())
            .collect(),
    )
}

fn b64(v: &Value) -> Vec<u8> {
    base64::engine::general_purpose::STANDARD
        .decode(v.as_str().unwrap())
        .unwrap()
}

fn s<'a>(row: &'a Value, field: &str) -> &'a str {
    row[field]
        .as_str()
        .unwrap_or_else(|| panic!("field {field}"))
}

/// The payload of a row: TCP rows lose their 4-byte length, UDP rows are the datagram.
fn payload(row: &Value) -> Vec<u8> {
    let wire = b64(&row["wire_b64"]);
    match s(row, "transport") {
        "tcp" => {
            let total = frame::check(&wire, MAX_PAYLOAD).unwrap().unwrap();
            assert_eq!(total, wire.len(), "{}", s(row, "vector_id"));
            wire[frame::HEADER_LEN..].to_vec()
        }
        "udp" => wire,
        other => panic!("transport {other}"),
    }
}

fn expected_kind(kind: &str) -> &'static [&'static str] {
    match kind {
        "startup" => &["startup"],
        "keepalive" => &["keepalive"],
        "shutdown" => &["shutdown"],
        "event" => &["event"],
        // A manager reply is an ACK, or the shutdown echo of qa-integration-framework.
        "reply" => &["ack", "shutdown"],
        "request" => &["request"],
        "command" => &["execd"],
        other => panic!("unknown kind {other}"),
    }
}

fn check_file(file: &str) -> usize {
    let Some(rows) = rows(file) else { return 0 };
    assert!(!rows.is_empty());
    let mut decoder = Decoder::new();
    for row in &rows {
        let vid = s(row, "vector_id");
        let (set, problems) = KeySet::parse(s(row, "client_keys").as_bytes());
        assert!(problems.is_empty(), "{vid}: {problems:?}");
        let store = KeyStore::new(set);
        let row_id: AgentId = s(row, "agent_id").parse().unwrap();
        let payload = payload(row);
        let env = Envelope::parse(&payload).unwrap_or_else(|e| panic!("{vid}: {e}"));
        let cipher = env.cipher().unwrap();
        assert_eq!(cipher.name(), s(row, "cipher"), "{vid}");

        // The key: by the header's ID for prefixed rows, by the key line's IP for ID-less
        // agent rows, by the connection's agent (the row's key) for manager rows.
        let key = if row["id_prefix"].as_bool().unwrap() {
            assert_eq!(env.agent_id(), Some(row_id), "{vid}");
            store.get(&row_id).unwrap()
        } else {
            assert_eq!(env.agent_id(), None, "{vid}");
            if s(row, "direction") == "agent_to_manager" {
                store.by_ip(s(row, "agent_ip").parse().unwrap()).unwrap()
            } else {
                store.get(&row_id).unwrap()
            }
        };
        assert_eq!(key.id(), row_id);

        let plaintext = b64(&row["plaintext_b64"]);
        let opened = decoder
            .open(&key, cipher, env.ciphertext())
            .unwrap_or_else(|e| panic!("{vid}: {e}"));
        assert_eq!(opened.message, &plaintext[..], "{vid}");
        let counters = opened.counters;
        // The inner message as a third-party receiver saw it carries the same counters.
        let inner = b64(&row["inner_b64"]);
        let header = format!(
            "{:05}{:010}:{:04}:",
            counters.rnd, counters.global, counters.local
        );
        assert_eq!(&inner[32..53], header.as_bytes(), "{vid}");

        // The owned convenience agrees.
        let msg = cipher::decrypt(&key, cipher, env.ciphertext()).unwrap();
        assert_eq!(&msg.message[..], &plaintext[..]);
        assert_eq!(msg.counters, counters);

        // Re-encode with the vector's counters and key; decoding gives it back.
        let ours = if s(row, "direction") == "agent_to_manager" {
            cipher::agent_payload(&key, cipher, &counters, &plaintext).unwrap()
        } else {
            cipher::manager_payload(&key, cipher, &counters, &plaintext).unwrap()
        };
        let our_env = Envelope::parse(&ours).unwrap();
        assert_eq!(our_env.agent_id(), env.agent_id(), "{vid}");
        assert_eq!(our_env.cipher(), Some(cipher));
        let back = decoder
            .open_unverified(&key, cipher, our_env.ciphertext())
            .unwrap();
        assert!(back.checksum_ok, "{vid}");
        assert_eq!(back.counters, counters);
        assert_eq!(back.message, &plaintext[..], "{vid}");
        if s(row, "transport") == "tcp" {
            assert!(frame::encode_frame(&ours, MAX_PAYLOAD).is_ok(), "{vid}");
        }

        // Classification.
        let parsed = control::parse(&plaintext);
        assert!(
            expected_kind(s(row, "kind")).contains(&parsed.kind()),
            "{vid}: kind {} parsed as {}",
            s(row, "kind"),
            parsed.kind()
        );
        match &parsed {
            Message::Control(Control::Keepalive(ka)) => {
                assert!(ka.version.as_deref().unwrap().starts_with("v4."), "{vid}");
                assert!(ka.merged_md5.is_some(), "{vid}");
                assert!(ka.agent_ip.is_some(), "{vid}");
            }
            Message::Event(e) => assert!(!e.location.is_empty(), "{vid}"),
            Message::Control(Control::Request(r)) => assert_eq!(r.target(), "agent"),
            _ => {}
        }
    }
    rows.len()
}

#[test]
fn agent_to_manager_rows_decrypt_reencode_and_classify() {
    let n = check_file("agent_to_manager.jsonl");
    if n > 0 {
        assert_eq!(n, 196);
    }
}

#[test]
fn manager_to_agent_rows_decrypt_reencode_and_classify() {
    let n = check_file("manager_to_agent.jsonl");
    if n > 0 {
        assert_eq!(n, 114);
    }
}

#[test]
fn wrong_key_fails_cleanly_on_every_row() {
    let Some(rows) = rows("agent_to_manager.jsonl") else {
        return;
    };
    let (set, _) = KeySet::parse(b"001 someone-else any 0000\n");
    let wrong = set.iter().next().unwrap().clone();
    let mut decoder = Decoder::new();
    for row in &rows {
        let payload = payload(row);
        let env = Envelope::parse(&payload).unwrap();
        let err = decoder
            .open(&wrong, env.cipher().unwrap(), env.ciphertext())
            .unwrap_err();
        assert!(!err.reason().is_empty());
    }
}

#[test]
fn keys_never_appear_in_debug_output() {
    let Some(rows) = rows("agent_to_manager.jsonl") else {
        return;
    };
    for row in rows.iter().step_by(7) {
        let (set, _) = KeySet::parse(s(row, "client_keys").as_bytes());
        let key = set.iter().next().unwrap().clone();
        let raw = s(row, "agent_key");
        let aes = std::str::from_utf8(key.aes_key()).unwrap().to_owned();
        let store = KeyStore::new(set);
        let text = format!("{key:?} {key:#?} {store:?} {:?}", store.snapshot());
        assert!(!text.contains(raw), "{text}");
        assert!(!text.contains(&aes), "{text}");
        assert!(!text.contains(&raw[..8]), "{text}");
    }
}

#[test]
fn counters_of_the_simulator_are_the_documented_ones() {
    let Some(rows) = rows("agent_to_manager.jsonl") else {
        return;
    };
    let row = &rows[0];
    let (set, _) = KeySet::parse(s(row, "client_keys").as_bytes());
    let key = set.iter().next().unwrap().clone();
    let payload = payload(row);
    let env = Envelope::parse(&payload).unwrap();
    let msg = cipher::decrypt(&key, Cipher::Aes, env.ciphertext()).unwrap();
    assert_eq!(
        msg.counters,
        Counters {
            rnd: 55555,
            global: 1234567891,
            local: 227
        }
    );
}
