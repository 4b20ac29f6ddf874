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
