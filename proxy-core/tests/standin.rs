//! The stand-in manager behaves like `wazuh-remoted` where the relay can tell: per-agent
//! refusals by closing, "key already in use" within the overtake time, the reply socket
//! forgotten when a connection closes, `#pong`, sealed ACKs to startups and keepalives, replayed
//! counters dropped, and a hang that keeps connections open. Checked on its own socket, without
//! the relay, so the relay's tests can rely on it.

use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use wazuh_proxy_core::cipher::{agent_payload, Counters, Decoder};
use wazuh_proxy_core::control::{self, keepalive_text, startup_text, Control, KeepaliveSpec};
use wazuh_proxy_core::envelope::{AgentId, Cipher, Envelope};
use wazuh_proxy_core::keys::{AgentKey, KeyIp, KeySet};
use wazuh_proxy_core::sim::{Manager, ManagerOptions, Reply};
use wazuh_proxy_test_support::*;

const SECRET: &str = "61f01f714746b01b977d7c65a724409f33ad89c391ad93f918eb27202dca8223";

fn key() -> AgentKey {
    AgentKey::new(
        AgentId::parse(b"001").unwrap(),
        "web-01",
        KeyIp::Any,
        SECRET.as_bytes(),
    )
}

async fn keyed(verify_msg_id: bool) -> Manager {
    let mut o = ManagerOptions::new("m", Reply::AckFirst);
    o.keys = Some(Arc::new(KeySet::from_keys([key()])));
    o.verify_msg_id = verify_msg_id;
    o.overtake_time = Some(Duration::from_secs(60));
    Manager::start_with("127.0.0.1:0".parse().unwrap(), o)
        .await
        .unwrap()
}

fn sealed(n: u32, text: &str) -> Vec<u8> {
    let c = Counters {
        rnd: 4242,
        global: 1,
        local: n,
    };
    agent_payload(&key(), Cipher::Aes, &c, text.as_bytes()).unwrap()
}

/// Reads one frame and decrypts it with the agent's key.
async fn read_sealed(c: &mut AgentConn) -> String {
    let f = tokio::time::timeout(Duration::from_secs(5), recv(c))
        .await
        .expect("an answer in time")
        .expect("a frame");
    let env = Envelope::parse(&f).unwrap();
    assert_eq!(env.agent_id(), None, "a manager never writes !ID!");
    let mut d = Decoder::new();
    let opened = d
        .open(&key(), env.cipher().unwrap(), env.ciphertext())
        .unwrap();
    String::from_utf8_lossy(opened.message).into_owned()
}

async fn closed(c: &mut AgentConn) -> bool {
    matches!(
        tokio::time::timeout(Duration::from_secs(5), c.next()).await,
        Ok(None | Some(Err(_)))
    )
}

#[tokio::test]
async fn startups_and_keepalives_get_a_sealed_ack_and_events_nothing() {
    let m = keyed(false).await;
    let mut c = connect(m.addr()).await;
    send(&mut c, sealed(1, &startup_text(Some("v4.14.7")))).await;
    let ack = read_sealed(&mut c).await;
    assert!(matches!(
        control::parse(ack.as_bytes()),
        control::Message::Control(Control::Ack)
    ));
    send(&mut c, sealed(2, "1:/var/log/syslog:hello")).await;
    let ka = keepalive_text(&KeepaliveSpec {
        uname: "Linux |h |6.1 |#1 |x86_64 [Debian|debian: 12] - Wazuh v4.14.7",
        agent_conf_md5: None,
        labels: &[],
        merged_md5: None,
        agent_ip: None,
    });
    send(&mut c, sealed(3, &ka)).await;
    // The next frame is the keepalive's ACK: the event was not answered.
    assert!(read_sealed(&mut c).await.starts_with("#!-agent ack"));
    let got = m.messages_from("001");
    assert_eq!(got.len(), 3);
    assert_eq!(&got[1][..], b"1:/var/log/syslog:hello");
}

#[tokio::test]
async fn a_message_that_does_not_decrypt_closes_its_connection() {
    let m = keyed(false).await;
    let mut c = connect(m.addr()).await;
    let mut bad = sealed(1, "1:x:y");
    let n = bad.len();
    bad[n - 3] ^= 0x55;
    send(&mut c, bad).await;
    assert!(closed(&mut c).await);
}

#[tokio::test]
async fn replayed_counters_are_dropped_with_verify_msg_id() {
    let m = keyed(true).await;
    let mut c = connect(m.addr()).await;
    send(&mut c, sealed(1, "1:x:first")).await;
    send(&mut c, sealed(1, "1:x:first")).await;
    send(&mut c, sealed(2, "1:x:second")).await;
    wait_for("two messages", 5, || m.messages_from("001").len() == 2).await;
    assert_eq!(m.replays_dropped(), 1);
    let unverified = keyed(false).await;
    let mut c = connect(unverified.addr()).await;
    send(&mut c, sealed(1, "1:x:first")).await;
    send(&mut c, sealed(1, "1:x:first")).await;
    wait_for("both", 5, || unverified.messages_from("001").len() == 2).await;
}

#[tokio::test]
async fn a_second_connection_is_refused_while_the_first_is_live() {
    let m = keyed(false).await;
    let mut first = connect(m.addr()).await;
    send(&mut first, sealed(1, &startup_text(None))).await;
    read_sealed(&mut first).await;
    let mut second = connect(m.addr()).await;
    send(&mut second, sealed(2, &startup_text(None))).await;
    assert!(closed(&mut second).await, "key already in use");
    assert_eq!(m.refusals(), 1);
    // Once the first goes, the key is free at once.
    drop(first);
    let mut third = connect(m.addr()).await;
    wait_for("the key freed", 5, || m.open_connections() == 1).await;
    send(&mut third, sealed(3, &startup_text(None))).await;
    assert!(read_sealed(&mut third).await.starts_with("#!-agent ack"));
}

#[tokio::test]
async fn a_removed_agent_is_closed_unanswered_and_pushes_need_a_live_connection() {
    let m = keyed(false).await;
    assert!(!m.push("001", b"#AES:x".to_vec()), "no connection yet");
    let mut c = connect(m.addr()).await;
    send(&mut c, sealed(1, &startup_text(None))).await;
    read_sealed(&mut c).await;
    assert!(m.push("001", b"#AES:request".to_vec()));
    let pushed = recv(&mut c).await.unwrap();
    assert_eq!(&pushed[..], b"#AES:request");
    m.refuse("001");
    send(&mut c, sealed(2, "1:x:y")).await;
    assert!(closed(&mut c).await);
    wait_for("the socket forgotten", 5, || {
        !m.push("001", b"#AES:x".to_vec())
    })
    .await;
}

#[tokio::test]
async fn a_ping_is_answered_with_a_pong_before_any_key() {
    let m = keyed(false).await;
    let mut c = connect(m.addr()).await;
    send(&mut c, b"#ping".to_vec()).await;
    assert_eq!(&recv(&mut c).await.unwrap()[..], b"#pong");
    assert!(m.agents().is_empty());
}

#[tokio::test]
async fn a_hung_manager_keeps_its_connections_open_and_answers_nothing() {
    let m = keyed(false).await;
    let mut c = connect(m.addr()).await;
    send(&mut c, sealed(1, &startup_text(None))).await;
    read_sealed(&mut c).await;
    m.hang();
    send(&mut c, sealed(2, &startup_text(None))).await;
    assert!(
        tokio::time::timeout(Duration::from_millis(500), c.next())
            .await
            .is_err(),
        "no answer and no close"
    );
    assert_eq!(m.messages_from("001").len(), 1);
    m.stop().await;
    assert!(closed(&mut c).await);
}
