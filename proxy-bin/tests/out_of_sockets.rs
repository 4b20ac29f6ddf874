//! A proxy out of descriptors: the agent it cannot open a manager connection for is closed at
//! once (as nginx closes it), and nothing is held against the managers: no failed connect
//! counted, no backend marked failed, health probes not run rather than failed. Once
//! descriptors free up, the next agent is served at once.

use std::time::Duration;

use wazuh_proxy_core::envelope::AgentId;
use wazuh_proxy_core::sim::agent_payload;
use wazuh_proxy_test_support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn running_out_of_descriptors_closes_the_agent_and_blames_no_manager() {
    let m1 = manager("m1").await;
    let m2 = manager("m2").await;
    let listen = free_addr();
    let admin = free_addr();
    // Probes every 100 ms, one failure takes a backend out: a probe that could not be made
    // and counted as failed would show within the window below.
    let file = write_config(
        "out-of-sockets",
        &format!(
            "[[listener]]\nname = \"agents\"\nlisten = \"{listen}\"\nhealth_check_interval = \"100ms\"\n\
             health_check_fall = 1\nbackends = [{{ address = \"{}\" }}, {{ address = \"{}\" }}]\n",
            m1.addr(),
            m2.addr()
        ),
    );
    let proxy = ProxyProcess::start(
        &[
            "run",
            "--config",
            file.to_str().unwrap(),
            "--admin",
            &admin.to_string(),
        ],
        listen,
    );
    let mut served = vec![agent(listen, "001").await, agent(listen, "002").await];

    // The next agent's connection is accepted (the proxy waits for its first frame to know
    // where it goes); then the proxy may open no new descriptor, so no socket towards a
    // manager can be opened for it.
    let before = proxy.open_descriptors();
    let mut starved = connect(listen).await;
    wait_for("the proxy accepted the agent", 5, || {
        proxy.open_descriptors() > before
    })
    .await;
    proxy.allow_no_new_descriptor();
    send(&mut starved, agent_payload(AgentId::parse(b"003"), 0, 64)).await;
    assert!(
        closed(&mut starved).await,
        "the agent the proxy had no socket for was not closed within 5 s:\n{}",
        proxy.logs()
    );
    // Long enough for several health rounds at the limit.
    tokio::time::sleep(Duration::from_millis(500)).await;
    proxy.limit_descriptors(before + 64);

    let logs = proxy.logs();
    assert!(
        logs.contains("reason=\"out_of_sockets\""),
        "no out_of_sockets end in the access log:\n{logs}"
    );
    for blame in [
        "backend marked unavailable",
        "out of rotation",
        "connect to backend failed",
    ] {
        assert!(
            !logs.contains(blame),
            "a manager was blamed for this host's shortage ({blame}):\n{logs}"
        );
    }
    assert!(
        metric(
            admin,
            "wazuh_proxy_rejected_total{listener=\"agents\",reason=\"out_of_sockets\"}"
        )
        .await
            >= 1.0
    );
    for m in [&m1, &m2] {
        let line = format!(
            "wazuh_proxy_backend_failures_total{{listener=\"agents\",backend=\"{}\"}}",
            m.addr()
        );
        assert_eq!(metric(admin, &line).await, 0.0, "{line}");
    }
    assert!(cli_ok(&["health", "--admin", &admin.to_string()]).0);
    // The agents already served never noticed; the next one is served at once.
    still_open(&mut served).await;
    let _next = agent(listen, "004").await;
}
