//! `wazuh-proxy inspect` on third-party vectors: every line decodes to its plaintext.

use std::path::PathBuf;
use std::process::Command;

use serde_json::Value;

fn vectors_dir() -> Option<PathBuf> {
    let dir = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../../shared/vectors"));
    if dir.is_dir() {
        Some(dir)
    } else {
        eprintln!(
            "!!!!! SKIPPED: test vectors not found at {} !!!!!",
            dir.display()
        );
        None
    }
}

fn temp_dir() -> PathBuf {
    let dir = std::env::temp_dir().join(format!("wazuh-proxy-inspect-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Runs `inspect` on the first `n` rows of a vector file, in both framings (TCP rows carry
/// their length, UDP rows are bare payloads), and checks every output line.
fn check(file: &str, direction: &str, n: usize) {
    let Some(dir) = vectors_dir() else { return };
    let text = std::fs::read_to_string(dir.join(file)).unwrap();
    let rows: Vec<Value> = text
        .lines()
        .take(n)
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let tmp = temp_dir();
    let keys = tmp.join(format!("{direction}-client.keys"));
    let input = tmp.join(format!("{direction}-input.b64"));
    let mut key_lines: Vec<&str> = rows
        .iter()
        .map(|r| r["client_keys"].as_str().unwrap())
        .collect();
    key_lines.sort();
    key_lines.dedup();
    std::fs::write(&keys, key_lines.join("\n") + "\n").unwrap();
    let wires: Vec<&str> = rows
        .iter()
        .map(|r| r["wire_b64"].as_str().unwrap())
        .collect();
    std::fs::write(&input, wires.join("\n") + "\n").unwrap();

    let out = Command::new(env!("CARGO_BIN_EXE_wazuh-proxy"))
        .args(["inspect", "--keys"])
        .arg(&keys)
        .args(["--direction", direction])
        .arg(&input)
        .output()
        .unwrap();
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert!(
        out.status.success() && !stdout.is_empty(),
        "`wazuh-proxy inspect` is missing or failed (is the subcommand wired in main.rs?)\n\
         status: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), rows.len(), "{stdout}");
    for (row, line) in rows.iter().zip(&lines) {
        let vid = row["vector_id"].as_str().unwrap();
        assert_eq!(line["error"], Value::Null, "{vid}: {line}");
        assert_eq!(line["checksum_ok"], Value::Bool(true), "{vid}");
        assert_eq!(line["plaintext"], row["plaintext"], "{vid}");
        assert_eq!(line["cipher"], row["cipher"], "{vid}");
        assert_eq!(line["agent_id"], row["agent_id"], "{vid}");
        assert!(line["counters"]["global"].is_u64(), "{vid}");
    }
    std::fs::remove_file(&keys).ok();
    std::fs::remove_file(&input).ok();
}

#[test]
fn inspect_agent_to_manager_vectors() {
    check("agent_to_manager.jsonl", "agent", 40);
}

#[test]
fn inspect_manager_to_agent_vectors() {
    check("manager_to_agent.jsonl", "manager", 20);
}
