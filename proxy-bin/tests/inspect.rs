//! `wazuh-proxy inspect` on third-party vectors: every line decodes to its plaintext.

use std::path::PathBuf;

use serde_json::Value;
use wazuh_proxy_test_support::{bin, temp_dir, vectors_dir};

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
    let tmp = temp_dir("inspect");
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

    let out = bin()
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

/// A classic pcap (Ethernet, IPv4, TCP from 10.0.0.5:40000 to 10.0.0.1:1514) carrying
/// `stream` in segments of `size` bytes after a SYN.
fn pcap_of(stream: &[u8], size: usize) -> Vec<u8> {
    let mut out = vec![0xd4, 0xc3, 0xb2, 0xa1, 2, 0, 4, 0];
    out.extend_from_slice(&[0; 8]);
    out.extend_from_slice(&65535u32.to_le_bytes());
    out.extend_from_slice(&1u32.to_le_bytes());
    let mut packet = |seq: u32, flags: u8, data: &[u8]| {
        let mut pkt = vec![0u8; 12];
        pkt.extend_from_slice(&[0x08, 0x00, 0x45, 0]);
        pkt.extend_from_slice(&((40 + data.len()) as u16).to_be_bytes());
        pkt.extend_from_slice(&[0, 0, 0x40, 0, 64, 6, 0, 0, 10, 0, 0, 5, 10, 0, 0, 1]);
        pkt.extend_from_slice(&40000u16.to_be_bytes());
        pkt.extend_from_slice(&1514u16.to_be_bytes());
        pkt.extend_from_slice(&seq.to_be_bytes());
        pkt.extend_from_slice(&[0, 0, 0, 0, 0x50, flags, 0xff, 0xff, 0, 0, 0, 0]);
        pkt.extend_from_slice(data);
        out.extend_from_slice(&[0; 8]);
        out.extend_from_slice(&(pkt.len() as u32).to_le_bytes());
        out.extend_from_slice(&(pkt.len() as u32).to_le_bytes());
        out.extend_from_slice(&pkt);
    };
    packet(999, 0x02, &[]);
    let mut seq = 1000u32;
    for chunk in stream.chunks(size) {
        packet(seq, 0x18, chunk);
        seq += chunk.len() as u32;
    }
    out
}

/// A keys file and a pcap of `n` agent messages, in a fresh directory.
fn capture_fixture(tag: &str, n: usize) -> (PathBuf, PathBuf, Vec<u8>) {
    use wazuh_proxy_core::cipher::{agent_payload, Counters};
    use wazuh_proxy_core::envelope::Cipher;
    use wazuh_proxy_core::keys::KeySet;
    let dir = temp_dir("inspect").join(tag);
    std::fs::create_dir_all(&dir).unwrap();
    let keys_text = "001 web-01 any 61f01f71\n";
    let keys = dir.join("client.keys");
    std::fs::write(&keys, keys_text).unwrap();
    let (set, _) = KeySet::parse(keys_text.as_bytes());
    let key = set.iter().next().unwrap().clone();
    let mut stream = Vec::new();
    for i in 0..n {
        let text = format!("#!-agent message {i} ");
        let p = agent_payload(&key, Cipher::Aes, &Counters::default(), text.as_bytes()).unwrap();
        stream.extend(wazuh_proxy_core::frame::encode_frame(&p, 65536).unwrap());
    }
    let pcap = pcap_of(&stream, 300);
    let file = dir.join("capture.pcap");
    std::fs::write(&file, &pcap).unwrap();
    (dir, keys, pcap)
}

/// `inspect -` with `bytes` written to its standard input in small pieces, with pauses, as
/// `tcpdump -w -` does.
fn inspect_stdin(keys: &std::path::Path, bytes: Vec<u8>) -> std::process::Output {
    use std::io::Write;
    use std::process::Stdio;
    let mut child = bin()
        .args(["inspect", "--keys"])
        .arg(keys)
        .arg("-")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let writer = std::thread::spawn(move || {
        for (i, chunk) in bytes.chunks(173).enumerate() {
            stdin.write_all(chunk).unwrap();
            stdin.flush().unwrap();
            if i % 8 == 0 {
                std::thread::sleep(std::time::Duration::from_millis(2));
            }
        }
    });
    let out = child.wait_with_output().unwrap();
    writer.join().unwrap();
    out
}

fn inspect_file(keys: &std::path::Path, file: &std::path::Path) -> std::process::Output {
    bin()
        .args(["inspect", "--keys"])
        .arg(keys)
        .arg(file)
        .output()
        .unwrap()
}

#[test]
fn a_pcap_streamed_through_standard_input_reads_as_the_file_does() {
    let (dir, keys, pcap) = capture_fixture("stdin", 60);
    let from_file = inspect_file(&keys, &dir.join("capture.pcap"));
    assert!(
        from_file.status.success(),
        "{}",
        String::from_utf8_lossy(&from_file.stderr)
    );
    let lines: Vec<Value> = String::from_utf8(from_file.stdout.clone())
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 60);
    for (i, line) in lines.iter().enumerate() {
        assert_eq!(line["error"], Value::Null, "{line}");
        assert_eq!(
            line["plaintext"],
            format!("#!-agent message {i} "),
            "{line}"
        );
        assert_eq!(line["agent_id"], "001");
    }
    let from_stdin = inspect_stdin(&keys, pcap);
    assert!(
        from_stdin.status.success(),
        "{}",
        String::from_utf8_lossy(&from_stdin.stderr)
    );
    assert_eq!(
        String::from_utf8(from_stdin.stdout).unwrap(),
        String::from_utf8(from_file.stdout).unwrap()
    );
    std::fs::remove_dir_all(dir).ok();
}

#[test]
fn a_truncated_capture_prints_the_messages_before_it_then_a_clear_error() {
    let (dir, keys, mut pcap) = capture_fixture("truncated", 20);
    // Cut inside the last packet record, as a killed writer leaves it.
    pcap.truncate(pcap.len() - 50);
    let out = inspect_stdin(&keys, pcap);
    let stdout = String::from_utf8(out.stdout).unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("-: capture: truncated at byte")
            && stderr.contains("inside a packet record"),
        "{stderr}"
    );
    let lines: Vec<Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let decoded: Vec<&Value> = lines.iter().filter(|l| l["error"].is_null()).collect();
    // Every message whose bytes were all in whole records came out, in order.
    assert!(decoded.len() >= 18, "{stdout}");
    for (i, line) in decoded.iter().enumerate() {
        assert_eq!(
            line["plaintext"],
            format!("#!-agent message {i} "),
            "{line}"
        );
    }
    let last = lines.last().unwrap();
    assert!(
        last["error"].as_str().unwrap().contains("truncated"),
        "the last line is the capture's error: {stdout}"
    );
    std::fs::remove_dir_all(dir).ok();
}
