//! The core's `Proxy` on loopback: start, reload all or nothing with every change classified,
//! the operator's view, and the drain.

use std::time::Duration;

use wazuh_proxy_core::balance::BackendConfig;
use wazuh_proxy_core::envelope::AgentId;
use wazuh_proxy_core::proxy::{
    Applies, ListenerConfig, ListenerSettings, OperatorError, Proxy, ProxyConfig, ProxyError,
};
use wazuh_proxy_core::sim::agent_payload;
use wazuh_proxy_core::udp::UdpRelayConfig;
use wazuh_proxy_test_support::*;

/// Sends one frame as agent `id` and returns the name of the manager that answered.
async fn through(proxy: &Proxy, id: &[u8]) -> String {
    let mut agent = connect(proxy.local_addr("agents").unwrap()).await;
    send(&mut agent, agent_payload(AgentId::parse(id), 1, 32)).await;
    let ack = recv(&mut agent).await.expect("an answer");
    String::from_utf8_lossy(&ack)
        .rsplit(' ')
        .next()
        .unwrap()
        .to_owned()
}

fn relay_idle(config: &ProxyConfig) -> Option<Duration> {
    config.listeners[0]
        .settings
        .agent()
        .unwrap()
        .relay
        .idle_timeout
}

#[tokio::test]
async fn reload_is_all_or_nothing_and_says_what_waits_for_an_upgrade() {
    let (m1, m2) = (manager("m1").await, manager("m2").await);
    let agents = ListenerConfig::agent("agents", "127.0.0.1:0".parse().unwrap(), &[m1.addr()]);
    let mut config = ProxyConfig::new(vec![agents]);
    config.drain_timeout = Duration::from_secs(2);
    let mut proxy = Proxy::start(config.clone()).await.unwrap();
    assert_eq!(through(&proxy, b"001").await, "m1");

    // A new listener on a taken address: nothing changes, not even the backends.
    let taken = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let mut next = config.clone();
    next.listeners[0].backends = vec![BackendConfig::new(m2.addr())];
    next.listeners.push(ListenerConfig::new(
        "udp",
        taken.local_addr().unwrap(),
        vec![BackendConfig::new(m2.addr())],
        ListenerSettings::Udp(UdpRelayConfig::default()),
    ));
    match proxy.reload(next).await {
        Err(ProxyError::Bind { name, .. }) => assert_eq!(name, "udp"),
        other => panic!("{other:?}"),
    }
    assert_eq!(proxy.listeners().count(), 1);
    assert_eq!(proxy.config().listeners[0].backends[0].addr, m1.addr());
    assert_eq!(through(&proxy, b"002").await, "m1");

    // New backends apply in place; a relay setting waits for an upgrade, and says so.
    let mut next = config.clone();
    next.listeners[0].backends = vec![BackendConfig::new(m2.addr())];
    let ListenerSettings::Agent(a) = &mut next.listeners[0].settings else {
        unreachable!()
    };
    a.relay.idle_timeout = Some(Duration::from_secs(5));
    let plan = proxy.reload(next).await.unwrap();
    let changes: Vec<_> = plan.changes.iter().map(|c| (c.field, c.applies)).collect();
    assert_eq!(
        changes,
        [
            ("backends", Applies::InPlace),
            ("relay.idle_timeout", Applies::AfterUpgrade)
        ]
    );
    assert_eq!(relay_idle(&proxy.config()), relay_idle(&config));
    assert_eq!(through(&proxy, b"003").await, "m2");

    // The operator's view.
    let view = proxy.view();
    assert_eq!(view.listeners().len(), 1);
    assert!(matches!(
        view.drain_backend(m1.addr()),
        Err(OperatorError::NoSuchBackend(_))
    ));
    assert!(matches!(
        view.drain_backend(m2.addr()),
        Err(OperatorError::Refused { .. })
    ));
    assert!(!view.draining());

    proxy.drain().await;
    assert!(view.draining());
    assert_eq!(proxy.open_sessions(), 0);
}

/// A drain is the operator's state, not configuration: it survives a reload that keeps the
/// manager, is forgotten by one that removes it, and goes to a successor in a hand-over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drain_survives_reload_and_hand_over() {
    use wazuh_proxy_core::proxy::{handover, OperatorState};
    let (m1, m2, m3) = (
        manager("m1").await,
        manager("m2").await,
        manager("m3").await,
    );
    let managers = [m1.addr(), m2.addr(), m3.addr()];
    let agents = ListenerConfig::agent("agents", "127.0.0.1:0".parse().unwrap(), &managers);
    let mut config = ProxyConfig::new(vec![agents]);
    config.drain_timeout = Duration::from_secs(2);
    let mut proxy = Proxy::start(config.clone()).await.unwrap();
    // Twenty agents, new ones each round (an agent ID is one session at a time).
    async fn answered(proxy: &Proxy, round: usize) -> Vec<String> {
        let mut out = Vec::new();
        for n in round * 30 + 1..=round * 30 + 20 {
            out.push(through(proxy, format!("{n:03}").as_bytes()).await);
        }
        out
    }
    assert!(answered(&proxy, 0).await.iter().any(|m| m == "m1"));
    assert!(proxy.operator_state().is_empty());
    proxy.view().drain_backend(m1.addr()).unwrap();
    proxy.view().drain_backend(m2.addr()).unwrap();
    let drained: OperatorState = [("agents", m1.addr()), ("agents", m2.addr())]
        .into_iter()
        .collect();
    assert_eq!(proxy.operator_state(), drained);
    assert_eq!(proxy.view().operator_state(), drained);

    // The same configuration again: both stay drained.
    proxy.reload(config.clone()).await.unwrap();
    assert_eq!(proxy.operator_state(), drained);
    assert!(answered(&proxy, 1).await.iter().all(|m| m == "m3"));

    // m2 leaves the set, then comes back: its drain is forgotten, m1's is kept.
    let mut without_m2 = config.clone();
    without_m2.listeners[0]
        .backends
        .retain(|b| b.addr != m2.addr());
    proxy.reload(without_m2).await.unwrap();
    proxy.reload(config.clone()).await.unwrap();
    let only_m1: OperatorState = [("agents", m1.addr())].into_iter().collect();
    assert_eq!(proxy.operator_state(), only_m1);
    let got = answered(&proxy, 2).await;
    assert!(got.iter().all(|m| m != "m1"), "{got:?}");
    assert!(got.iter().any(|m| m == "m2"), "{got:?}");

    // A hand-over to a second proxy in this process: the drain goes with the listeners.
    let (old_side, new_side) = tokio::net::UnixStream::pair().unwrap();
    let successor = async {
        let inherited = handover::receive_inheritance(&new_side).await.unwrap();
        assert_eq!(inherited.listeners.len(), 1);
        assert_eq!(inherited.state, only_m1);
        let new = Proxy::start_with(config.clone(), inherited).await.unwrap();
        new.adopt(&new_side).await.unwrap();
        new
    };
    let predecessor = async {
        proxy.offer_listeners(&old_side).await.unwrap();
        proxy.hand_over(&old_side).await.unwrap();
    };
    let (mut new, ()) = tokio::join!(successor, predecessor);
    assert_eq!(new.operator_state(), only_m1);
    let got = answered(&new, 3).await;
    assert!(got.iter().all(|m| m != "m1"), "{got:?}");
    new.view().undrain_backend(m1.addr()).unwrap();
    assert!(new.operator_state().is_empty());
    proxy.drain().await;
    new.drain().await;
}
