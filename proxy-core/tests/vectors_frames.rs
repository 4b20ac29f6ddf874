//! Framing and envelope parsing against the third-party vectors in `../shared/vectors`.

use std::collections::HashMap;

use base64::Engine;
use bytes::BytesMut;
use serde_json::Value;
use tokio::io::AsyncWriteExt;
use tokio_util::codec::Decoder;
use wazuh_proxy_core::balance::Policy;
use wazuh_proxy_core::envelope::Envelope;
use wazuh_proxy_core::frame::{self, FrameCodec, HEADER_LEN, MAX_PAYLOAD};
use wazuh_proxy_core::relay::AgentRelayConfig;
use wazuh_proxy_core::sim::{Manager, Reply};
use wazuh_proxy_test_support::*;

fn rows(dir: &std::path::Path, file: &str) -> Vec<Value> {
    std::fs::read_to_string(dir.join(file))
        .unwrap()
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn b64(v: &Value) -> Vec<u8> {
    base64::engine::general_purpose::STANDARD
        .decode(v.as_str().unwrap())
        .unwrap()
}

struct Session {
    name: String,
    stream: Vec<u8>,
    /// (wire bytes, agent ID if the frame carries one) of each expected frame.
    frames: Vec<(Vec<u8>, Option<String>)>,
}

fn sessions() -> Option<Vec<Session>> {
    let dir = vectors_dir()?;
    let by_id: HashMap<String, Value> = rows(&dir, "agent_to_manager.jsonl")
        .into_iter()
        .map(|r| (r["vector_id"].as_str().unwrap().to_owned(), r))
        .collect();
    let list: Vec<Session> = rows(&dir, "sessions.jsonl")
        .into_iter()
        .filter(|s| s["transport"] == "tcp")
        .map(|s| Session {
            name: s["session"].as_str().unwrap().to_owned(),
            stream: b64(&s["stream_b64"]),
            frames: s["frame_vector_ids"]
                .as_array()
                .unwrap()
                .iter()
                .map(|id| {
                    let row = &by_id[id.as_str().unwrap()];
                    let agent = (row["id_prefix"] == true)
                        .then(|| row["agent_id"].as_str().unwrap().to_owned());
                    (b64(&row["wire_b64"]), agent)
                })
                .collect(),
        })
        .collect();
    assert!(!list.is_empty(), "no TCP session in sessions.jsonl");
    Some(list)
}

#[test]
fn every_session_splits_into_exactly_its_frames_with_their_agent_ids() {
    let Some(sessions) = sessions() else { return };
    for s in &sessions {
        let (count, end, err) = frame::scan(&s.stream, MAX_PAYLOAD);
        assert_eq!(
            (count, end, err),
            (s.frames.len(), s.stream.len(), None),
            "{}",
            s.name
        );
        // The codec agrees, fed one byte at a time.
        let mut codec = FrameCodec::default();
        let mut buf = BytesMut::new();
        let mut got = Vec::new();
        for b in &s.stream {
            buf.extend_from_slice(&[*b]);
            while let Some(p) = codec.decode(&mut buf).unwrap() {
                got.push(p);
            }
        }
        assert_eq!(got.len(), s.frames.len(), "{}", s.name);
        for (i, (payload, (wire, agent))) in got.iter().zip(&s.frames).enumerate() {
            assert_eq!(&wire[HEADER_LEN..], &payload[..], "{} frame {i}", s.name);
            let env = Envelope::parse(payload).unwrap();
            assert_eq!(
                env.agent_id().map(|a| a.to_string()),
                *agent,
                "{} frame {i}",
                s.name
            );
        }
    }
}

#[test]
fn every_single_frame_vector_parses() {
    let Some(dir) = vectors_dir() else { return };
    for file in ["agent_to_manager.jsonl", "manager_to_agent.jsonl"] {
        for row in rows(&dir, file) {
            let wire = b64(&row["wire_b64"]);
            let payload = if row["transport"] == "tcp" {
                let total = frame::check(&wire, MAX_PAYLOAD).unwrap().unwrap();
                assert_eq!(total, wire.len(), "{}", row["vector_id"]);
                wire[HEADER_LEN..].to_vec()
            } else {
                wire
            };
            let env = Envelope::parse(&payload).unwrap();
            let expected =
                (row["id_prefix"] == true).then(|| row["agent_id"].as_str().unwrap().to_owned());
            assert_eq!(
                env.agent_id().map(|a| a.to_string()),
                expected,
                "{}",
                row["vector_id"]
            );
            assert_eq!(
                env.cipher().unwrap().name(),
                row["cipher"].as_str().unwrap(),
                "{}",
                row["vector_id"]
            );
        }
    }
}

#[tokio::test]
async fn every_session_crosses_the_relay_frame_for_frame() {
    let Some(sessions) = sessions() else { return };
    let m = Manager::start("127.0.0.1:0".parse().unwrap(), "m", Reply::AckFirst)
        .await
        .unwrap();
    let relay = TestRelay::start(&[m.addr()], Policy::AgentId, AgentRelayConfig::default()).await;
    let mut expected: HashMap<String, Vec<Vec<u8>>> = HashMap::new();
    for (n, s) in sessions.iter().enumerate() {
        let mut conn = tokio::net::TcpStream::connect(relay.addr).await.unwrap();
        conn.set_nodelay(true).unwrap();
        // Odd-sized writes, so frames straddle segments.
        for chunk in s.stream.chunks(997 + n * 13) {
            conn.write_all(chunk).await.unwrap();
        }
        conn.shutdown().await.unwrap();
        let mut rest = Vec::new();
        tokio::io::AsyncReadExt::read_to_end(&mut conn, &mut rest)
            .await
            .unwrap();
        for (wire, agent) in &s.frames {
            expected
                .entry(agent.clone().unwrap_or_default())
                .or_default()
                .push(wire[HEADER_LEN..].to_vec());
        }
    }
    for (agent, frames) in expected {
        let got: Vec<Vec<u8>> = m.frames_from(&agent).iter().map(|f| f.to_vec()).collect();
        assert_eq!(got, frames, "agent {agent}");
    }
}
