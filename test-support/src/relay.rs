//! An agent relay of the core library serving on loopback.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use wazuh_proxy_core::balance::{BackendConfig, Balancer, Policy};
use wazuh_proxy_core::relay::{AgentRelay, AgentRelayConfig};

/// A relay listening on loopback.
pub struct TestRelay {
    pub relay: Arc<AgentRelay>,
    pub addr: SocketAddr,
    pub stop: CancellationToken,
    pub tracker: TaskTracker,
}

impl TestRelay {
    pub async fn start(
        backends: &[SocketAddr],
        policy: Policy,
        config: AgentRelayConfig,
    ) -> TestRelay {
        let backends = backends.iter().map(|a| BackendConfig::new(*a)).collect();
        let balancer = Balancer::new(policy, backends).unwrap();
        TestRelay::serve(AgentRelay::new("test", config, balancer)).await
    }

    /// Serves an already built relay (for example one with keys).
    pub async fn serve(relay: AgentRelay) -> TestRelay {
        let relay = Arc::new(relay);
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let stop = CancellationToken::new();
        let tracker = TaskTracker::new();
        tokio::spawn(relay.clone().serve(listener, stop.clone(), tracker.clone()));
        TestRelay {
            relay,
            addr,
            stop,
            tracker,
        }
    }
}
