//! Agent verification and session enrichment with client.keys, through the relay.

use std::sync::atomic::Ordering;

use wazuh_proxy_core::balance::{BackendConfig, Balancer, Policy};
use wazuh_proxy_core::cipher::{agent_payload, Counters};
use wazuh_proxy_core::control::{keepalive_text, shutdown_text, startup_text, KeepaliveSpec};
use wazuh_proxy_core::envelope::{AgentId, Cipher};
use wazuh_proxy_core::keys::{AgentKey, KeyIp, KeySet, KeyStore};
use wazuh_proxy_core::relay::{AgentRelay, AgentRelayConfig};
use wazuh_proxy_core::session::SessionKey;
use wazuh_proxy_core::sim::{Manager, Reply};
use wazuh_proxy_core::stats::Rejection;
use wazuh_proxy_test_support::*;

fn key(id: &str, name: &str, ip: &str, secret: &str) -> AgentKey {
    AgentKey::new(
        AgentId::parse(id.as_bytes()).unwrap(),
        name,
        KeyIp::parse(ip).unwrap(),
        secret.as_bytes(),
    )
}

fn keys() -> KeyStore {
    KeyStore::new(KeySet::from_keys([
        key(
            "001",
            "web-01",
            "any",
            "61f01f714746b01b977d7c65a724409f33ad89c391ad93f918eb27202dca8223",
        ),
        key(
            "002",
            "db-02",
            "any",
            "aaaa1f714746b01b977d7c65a724409f33ad89c391ad93f918eb27202dcabbbb",
        ),
        key(
            "007",
            "fixed-ip-host",
            "127.0.0.1",
            "cccc1f714746b01b977d7c65a724409f33ad89c391ad93f918eb27202dcadddd",
        ),
        key(
            "009",
            "elsewhere",
            "192.0.2.10",
            "eeee1f714746b01b977d7c65a724409f33ad89c391ad93f918eb27202dcaffff",
        ),
    ]))
}

fn msg(k: &AgentKey, cipher: Cipher, n: u32, text: &str) -> Vec<u8> {
    agent_payload(
        k,
        cipher,
        &Counters {
            rnd: 4242,
            global: 1,
            local: n,
        },
        text.as_bytes(),
    )
    .unwrap()
}

async fn relay_with_keys(m: &Manager) -> TestRelay {
    let balancer = Balancer::new(Policy::AgentId, vec![BackendConfig::new(m.addr())]).unwrap();
    TestRelay::serve(
        AgentRelay::new("verified", AgentRelayConfig::default(), balancer).with_keys(keys()),
    )
    .await
}

#[tokio::test]
async fn a_real_agent_is_verified_and_its_session_learns_who_it_is() {
    let m = Manager::start("127.0.0.1:0".parse().unwrap(), "m", Reply::AckFirst)
        .await
        .unwrap();
    let relay = relay_with_keys(&m).await;
    let k = key(
        "001",
        "web-01",
        "any",
        "61f01f714746b01b977d7c65a724409f33ad89c391ad93f918eb27202dca8223",
    );
    let mut agent = connect(relay.addr).await;
    send(
        &mut agent,
        msg(&k, Cipher::Aes, 1, &startup_text(Some("v4.14.7"))),
    )
    .await;
    recv(&mut agent).await.expect("ACK");
    let session = relay
        .relay
        .sessions()
        .by_key(&SessionKey::Agent(k.id()))
        .unwrap();
    let info = session.agent_info();
    assert_eq!(
        (info.name.as_deref(), info.version.as_deref()),
        (Some("web-01"), Some("v4.14.7"))
    );
    assert!(info.last_keepalive.is_none());
    let uname =
        "Linux |web-01 |6.1.0 |#1 SMP |x86_64 [Debian GNU/Linux|debian: 12] - Wazuh v4.14.7";
    let ka = keepalive_text(&KeepaliveSpec {
        uname,
        agent_conf_md5: None,
        labels: &[],
        merged_md5: None,
        agent_ip: Some("10.0.0.5"),
    });
    send(
        &mut agent,
        msg(&k, Cipher::Aes, 2, "1:/var/log/syslog:an event"),
    )
    .await;
    send(&mut agent, msg(&k, Cipher::Aes, 3, &ka)).await;
    wait_for("keepalive noticed", 5, || {
        session.agent_info().last_keepalive.is_some()
    })
    .await;
    let info = session.agent_info();
    assert_eq!(info.os.as_deref(), Some(uname));
    assert_eq!(info.version.as_deref(), Some("v4.14.7"));
    send(&mut agent, msg(&k, Cipher::Aes, 4, shutdown_text())).await;
    wait_for("frames at the manager", 5, || {
        m.frames_from("001").len() == 4
    })
    .await;
    drop(agent);
    wait_for("clean stop counted", 5, || {
        relay.relay.stats().clean_stops.load(Ordering::Relaxed) == 1
    })
    .await;
    assert_eq!(relay.relay.stats().lost.load(Ordering::Relaxed), 0);

    // Without a shutdown message the end is a lost connection.
    let mut agent = connect(relay.addr).await;
    send(
        &mut agent,
        msg(&k, Cipher::Blowfish, 5, &startup_text(None)),
    )
    .await;
    recv(&mut agent).await.expect("ACK");
    drop(agent);
    wait_for("lost counted", 5, || {
        relay.relay.stats().lost.load(Ordering::Relaxed) == 1
    })
    .await;
}

#[tokio::test]
async fn spoofed_unknown_and_misplaced_agents_are_refused() {
    capture_logs();
    let m = Manager::start("127.0.0.1:0".parse().unwrap(), "m", Reply::AckFirst)
        .await
        .unwrap();
    let relay = relay_with_keys(&m).await;
    let stats = relay.relay.stats().clone();
    // Claims to be 002 but encrypts with another key.
    let wrong = key("002", "db-02", "any", "not-the-key-of-002");
    let mut a = connect(relay.addr).await;
    send(&mut a, msg(&wrong, Cipher::Aes, 1, &startup_text(None))).await;
    assert!(recv(&mut a).await.is_none());
    assert_eq!(stats.rejected(Rejection::Unverified), 1);
    wait_for("log line", 5, || {
        logs().contains("agent 002: first message does not decrypt with its key")
    })
    .await;
    // Not in client.keys.
    let stranger = key("003", "ghost", "any", "whatever");
    let mut a = connect(relay.addr).await;
    send(&mut a, msg(&stranger, Cipher::Aes, 1, &startup_text(None))).await;
    assert!(recv(&mut a).await.is_none());
    assert_eq!(stats.rejected(Rejection::UnknownAgent), 1);
    // A key bound to another address: an ID-less message from 127.0.0.1 maps to agent 007,
    // but agent 009's key only allows 192.0.2.10 (it sends no prefix, so it looks up by source
    // and finds 007's key: the message then fails to decrypt).
    let k9 = key(
        "009",
        "elsewhere",
        "192.0.2.10",
        "eeee1f714746b01b977d7c65a724409f33ad89c391ad93f918eb27202dcaffff",
    );
    let mut a = connect(relay.addr).await;
    send(&mut a, msg(&k9, Cipher::Aes, 1, &startup_text(None))).await;
    assert!(recv(&mut a).await.is_none());
    assert_eq!(stats.rejected(Rejection::Unverified), 2);
    assert_eq!(m.frame_count(), 0, "a refused agent reached the manager");
}

#[tokio::test]
async fn id_less_agents_are_identified_by_their_key_address() {
    let m = Manager::start("127.0.0.1:0".parse().unwrap(), "m", Reply::AckFirst)
        .await
        .unwrap();
    let relay = relay_with_keys(&m).await;
    let k7 = key(
        "007",
        "fixed-ip-host",
        "127.0.0.1",
        "cccc1f714746b01b977d7c65a724409f33ad89c391ad93f918eb27202dcadddd",
    );
    assert!(!k7.sends_id_prefix());
    let mut a = connect(relay.addr).await;
    send(
        &mut a,
        msg(&k7, Cipher::Aes, 1, &startup_text(Some("v4.9.0"))),
    )
    .await;
    recv(&mut a).await.expect("ACK");
    let s = relay
        .relay
        .sessions()
        .by_key(&SessionKey::Agent(k7.id()))
        .expect("session keyed by agent 007");
    assert_eq!(s.agent_info().name.as_deref(), Some("fixed-ip-host"));
}

fn web01() -> AgentKey {
    key(
        "001",
        "web-01",
        "any",
        "61f01f714746b01b977d7c65a724409f33ad89c391ad93f918eb27202dca8223",
    )
}

/// Reads until the connection closes (frames before the close are skipped).
async fn closed(conn: &mut AgentConn) -> bool {
    use futures_util::StreamExt;
    loop {
        match tokio::time::timeout(std::time::Duration::from_secs(5), conn.next()).await {
            Ok(Some(Ok(_))) => continue,
            Ok(_) => return true,
            Err(_) => return false,
        }
    }
}

#[tokio::test]
async fn a_replayed_captured_frame_does_not_evict_the_live_agent_but_its_reconnection_does() {
    let m = Manager::start("127.0.0.1:0".parse().unwrap(), "m", Reply::AckFirst)
        .await
        .unwrap();
    let relay = relay_with_keys(&m).await;
    let k = web01();
    let startup = msg(&k, Cipher::Aes, 10, &startup_text(Some("v4.14.7")));
    let mut live = connect(relay.addr).await;
    send(&mut live, startup.clone()).await;
    recv(&mut live).await.expect("ACK");
    send(
        &mut live,
        msg(&k, Cipher::Aes, 11, "1:/var/log/syslog:an event"),
    )
    .await;

    // A frame captured on the wire and sent again from another connection: it decrypts, but
    // its counter is not newer than the live session's.
    let mut replayer = connect(relay.addr).await;
    send(&mut replayer, startup).await;
    assert!(closed(&mut replayer).await, "the replay was not refused");
    // A captured event (newer than the startup, but not a startup) does not evict either.
    let mut replayer = connect(relay.addr).await;
    send(
        &mut replayer,
        msg(&k, Cipher::Aes, 11, "1:/var/log/syslog:an event"),
    )
    .await;
    assert!(
        closed(&mut replayer).await,
        "the captured event was not refused"
    );
    assert_eq!(relay.relay.stats().rejected(Rejection::Overtake), 2);
    send(
        &mut live,
        msg(&k, Cipher::Aes, 12, "1:/var/log/syslog:still here"),
    )
    .await;
    wait_for("the live agent's frames", 5, || {
        m.frames_from("001").len() == 3
    })
    .await;

    // The agent itself reconnecting: a startup with a newer counter replaces the old session.
    let mut again = connect(relay.addr).await;
    send(
        &mut again,
        msg(&k, Cipher::Aes, 13, &startup_text(Some("v4.14.7"))),
    )
    .await;
    recv(&mut again).await.expect("ACK on the new connection");
    assert!(closed(&mut live).await, "the old connection was kept");
    let session = relay
        .relay
        .sessions()
        .by_key(&SessionKey::Agent(k.id()))
        .unwrap();
    assert_eq!(
        session.client(),
        again.get_ref().local_addr().unwrap(),
        "the reconnection does not own the session"
    );
}

#[tokio::test]
async fn with_keys_a_ping_first_session_carries_nothing_but_ping() {
    let m = Manager::start("127.0.0.1:0".parse().unwrap(), "m", Reply::AckFirst)
        .await
        .unwrap();
    let relay = relay_with_keys(&m).await;
    let k = web01();
    let mut c = connect(relay.addr).await;
    send(&mut c, b"#ping".to_vec()).await;
    send(&mut c, b"#ping".to_vec()).await;
    // A valid message of agent 001 behind a #ping: it was never verified as the first frame.
    send(
        &mut c,
        msg(&k, Cipher::Aes, 1, &startup_text(Some("v4.14.7"))),
    )
    .await;
    assert!(closed(&mut c).await, "not closed");
    assert!(m.frames_from("001").is_empty(), "agent 001's frame passed");
    // ID-less behind a #ping: refused as well.
    let mut c = connect(relay.addr).await;
    send(&mut c, b"#ping".to_vec()).await;
    let mut idless = msg(&k, Cipher::Aes, 2, "1:/var/log/syslog:x");
    idless.drain(..5); // drop "!001!"
    send(&mut c, idless).await;
    assert!(closed(&mut c).await, "not closed");
    assert!(relay.relay.stats().rejected(Rejection::Unverified) >= 1);
    assert_eq!(m.frames_from("001").len(), 0);
}
