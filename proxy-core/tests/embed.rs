//! `examples/embed.rs` as a user runs it: a child process in front of two stand-in managers,
//! an agent relayed through it, then Ctrl-C (SIGINT) and a drain that ends with `drained`.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use wazuh_proxy_core::envelope::AgentId;
use wazuh_proxy_core::sim::{agent_payload, Manager, Reply};
use wazuh_proxy_test_support::*;

/// The example's executable: `cargo test` builds examples beside the tests; when only this
/// test was built, build the example now.
fn example() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let dir = exe.parent().unwrap().parent().unwrap().join("examples");
    let path = dir.join(format!("embed{}", std::env::consts::EXE_SUFFIX));
    if !path.exists() {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let status = Command::new(cargo)
            .args(["build", "-p", "wazuh-proxy-core", "--example", "embed"])
            .status()
            .unwrap();
        assert!(status.success(), "cannot build the embed example");
    }
    path
}

/// Kills the child if the test fails before it exits.
struct Reaped(Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test]
async fn the_example_relays_then_drains_on_ctrl_c() {
    let m1 = Manager::start("127.0.0.1:0".parse().unwrap(), "m1", Reply::AckFirst)
        .await
        .unwrap();
    let m2 = Manager::start("127.0.0.1:0".parse().unwrap(), "m2", Reply::AckFirst)
        .await
        .unwrap();
    let listen = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let mut child = Reaped(
        Command::new(example())
            .args([listen, m1.addr(), m2.addr()].map(|a| a.to_string()))
            .stdout(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    // Lines of the child's standard output, read on a thread.
    let (tx, lines) = mpsc::channel();
    let out = BufReader::new(child.0.stdout.take().unwrap());
    std::thread::spawn(move || {
        for line in out.lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let line = lines.recv_timeout(Duration::from_secs(60)).unwrap();
    assert!(line.starts_with("listening on"), "{line}");

    let mut agent = connect(listen).await;
    let id = AgentId::parse(b"001").unwrap();
    send(&mut agent, agent_payload(Some(id), 1, 64)).await;
    let ack = recv(&mut agent).await.expect("the manager's answer");
    assert!(ack.starts_with(b"#AES:ack from m"), "{ack:?}");
    assert_eq!(m1.frame_count() + m2.frame_count(), 1);
    drop(agent);

    let pid = child.0.id().to_string();
    let sent = Command::new("kill").args(["-INT", &pid]).status().unwrap();
    assert!(sent.success());
    let drained = lines.recv_timeout(Duration::from_secs(20)).unwrap();
    assert!(drained.contains("drained"), "{drained}");
    let status = child.0.wait().unwrap();
    assert!(status.success(), "{status}");
}
