//! `--log-format json`: every line on standard error is one JSON object, and each agent session
//! gives one `session_start` and one `session_end` line with the documented fields.

use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use serde_json::Value;
use tokio::net::TcpStream;
use tokio_util::codec::Framed;
use wazuh_proxy_core::envelope::AgentId;
use wazuh_proxy_core::frame::FrameCodec;
use wazuh_proxy_core::sim::{agent_payload, Manager, Reply};
use wazuh_proxy_test_support::*;

const START_FIELDS: [&str; 7] = [
    "event", "listener", "session", "agent", "client", "manager", "how",
];
const END_FIELDS: [&str; 17] = [
    "event",
    "listener",
    "session",
    "agent",
    "client",
    "manager",
    "duration_ms",
    "frames_up",
    "bytes_up",
    "frames_down",
    "bytes_down",
    "moves",
    "frames_at_risk",
    "reason",
    "detail",
    "stop",
    "message",
];

fn json_lines(text: &str) -> Vec<Value> {
    text.lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect()
}

#[tokio::test]
async fn json_logs_parse_line_by_line_with_one_start_and_end_per_session() {
    let m = Manager::start("127.0.0.1:0".parse().unwrap(), "m", Reply::AckFirst)
        .await
        .unwrap();
    let listen = free_addr();
    let mut proxy = ProxyProcess::start(
        &[
            "run",
            "--log-format",
            "json",
            "--listen",
            &listen.to_string(),
            "--backend",
            &m.addr().to_string(),
        ],
        listen,
    );
    let stream = TcpStream::connect(listen).await.unwrap();
    let client = stream.local_addr().unwrap().to_string();
    let mut a = Framed::new(stream, FrameCodec::default());
    for seq in 0..3 {
        a.send(Bytes::from(agent_payload(AgentId::parse(b"007"), seq, 100)))
            .await
            .unwrap();
    }
    let _ack = tokio::time::timeout(Duration::from_secs(5), a.next())
        .await
        .unwrap();
    for _ in 0..500 {
        if m.frames_from("007").len() == 3 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    drop(a);
    for _ in 0..500 {
        if proxy.logs().contains("\"session_end\"") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    proxy.signal("TERM");
    assert!(proxy.wait_exit(40).is_some_and(|s| s.success()));

    let lines = json_lines(&proxy.logs());
    for l in &lines {
        for f in ["timestamp", "level", "target", "message"] {
            assert!(l[f].is_string(), "no {f} in {l}");
        }
    }
    let starts: Vec<_> = lines
        .iter()
        .filter(|l| l["event"] == "session_start")
        .collect();
    let ends: Vec<_> = lines
        .iter()
        .filter(|l| l["event"] == "session_end")
        .collect();
    assert_eq!((starts.len(), ends.len()), (1, 1), "{lines:#?}");
    let (s, e) = (starts[0], ends[0]);
    for f in START_FIELDS {
        assert!(!s[f].is_null(), "session_start lacks {f}: {s}");
    }
    for f in END_FIELDS {
        assert!(!e[f].is_null(), "session_end lacks {f}: {e}");
    }
    assert_eq!(s["target"], "wazuh_proxy::access");
    assert_eq!(s["agent"], "007");
    assert_eq!(s["client"], client);
    assert_eq!(s["manager"], m.addr().to_string());
    assert_eq!(s["how"], "connected");
    assert_eq!(e["session"], s["session"]);
    assert_eq!(e["frames_up"], 3);
    assert!(e["bytes_up"].as_u64().unwrap() >= 300, "{e}");
    assert_eq!(e["frames_down"], 1);
    assert_eq!(e["reason"], "agent_closed");
    assert_eq!(e["stop"], "unknown");
    assert!(e["duration_ms"].is_u64());
    assert_eq!(e["level"], "INFO");

    // The documented schema lists every field a line carries.
    let docs = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/operations.md"),
    )
    .unwrap();
    for l in [s, e] {
        for key in l.as_object().unwrap().keys() {
            assert!(
                docs.contains(&format!("`{key}`")),
                "docs/operations.md lacks `{key}`"
            );
        }
    }
}

/// Every `reason` the proxy can log is documented for operators, and nothing else is.
#[test]
fn every_end_reason_is_documented() {
    let doc = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../docs/operations.md"
    ))
    .unwrap();
    let row = doc
        .lines()
        .find(|l| l.starts_with("| `reason` |"))
        .expect("the reason row of the access log table");
    let documented: Vec<&str> = row.split('`').skip(1).step_by(2).skip(1).collect();
    let mut missing: Vec<&str> = wazuh_proxy_core::access::END_REASONS
        .iter()
        .copied()
        .filter(|r| !documented.contains(r))
        .collect();
    missing.sort_unstable();
    assert!(
        missing.is_empty(),
        "reasons not in docs/operations.md: {missing:?}"
    );
    let unknown: Vec<&&str> = documented
        .iter()
        .filter(|d| d.chars().all(|c| c.is_ascii_lowercase() || c == '_') && **d != "keys")
        .filter(|d| !wazuh_proxy_core::access::END_REASONS.contains(d))
        .collect();
    assert!(
        unknown.is_empty(),
        "documented reasons the proxy never logs: {unknown:?}"
    );
}
