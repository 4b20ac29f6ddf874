//! Active health checks: a TCP connect to every backend at an interval, beside the passive
//! checks the relays make on real traffic.
//!
//! Passive checks only learn that a manager is dead when an agent tries it; a standby proxy
//! node with no traffic would otherwise report itself healthy while it cannot reach any
//! manager. Active checks take a backend out of rotation after `fall` failed probes and put
//! it back after `rise` good ones (HAProxy's terms).

use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use crate::balance::Balancer;

/// Settings of active health checks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HealthCheck {
    /// Time between two rounds of probes (default 2 s).
    pub interval: Duration,
    /// Time allowed to one connect (default 1 s).
    pub timeout: Duration,
    /// Good probes in a row that bring a backend back (default 2).
    pub rise: u32,
    /// Failed probes in a row that take a backend out (default 3).
    pub fall: u32,
}

impl Default for HealthCheck {
    fn default() -> Self {
        HealthCheck {
            interval: Duration::from_secs(2),
            timeout: Duration::from_secs(1),
            rise: 2,
            fall: 3,
        }
    }
}

/// Probes the backends of `balancer()` (read again every round, so a reload is followed)
/// until `stop` is cancelled. `on_change` is called when a backend goes up (`true`) or down.
pub async fn run(
    balancer: impl Fn() -> Arc<Balancer>,
    check: HealthCheck,
    stop: CancellationToken,
    on_change: impl Fn(std::net::SocketAddr, bool),
) {
    let mut tick = tokio::time::interval(check.interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let b = balancer();
        let probes = b
            .backends()
            .iter()
            .enumerate()
            .filter(|(_, be)| !be.config().down)
            .map(|(i, be)| {
                let addr = be.addr();
                async move {
                    let ok = matches!(
                        tokio::time::timeout(check.timeout, TcpStream::connect(addr)).await,
                        Ok(Ok(_))
                    );
                    (i, addr, ok)
                }
            });
        let results = futures_util::future::join_all(probes).await;
        for (i, addr, ok) in results {
            if let Some(up) = b.probe_result(i, ok, check.rise, check.fall) {
                on_change(addr, up);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::balance::{BackendConfig, Policy};

    #[tokio::test]
    async fn a_dead_backend_goes_out_and_comes_back() {
        let live = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let dead_addr = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap()
        };
        let balancer = Arc::new(
            Balancer::new(
                Policy::AgentId,
                vec![
                    BackendConfig::new(live.local_addr().unwrap()),
                    BackendConfig::new(dead_addr),
                ],
            )
            .unwrap(),
        );
        let check = HealthCheck {
            interval: Duration::from_millis(20),
            timeout: Duration::from_millis(200),
            rise: 2,
            fall: 2,
        };
        let stop = CancellationToken::new();
        let changes = Arc::new(std::sync::Mutex::new(Vec::new()));
        let task = tokio::spawn({
            let (b, stop, changes) = (balancer.clone(), stop.clone(), changes.clone());
            async move {
                run(
                    move || b.clone(),
                    check,
                    stop,
                    move |a, up| changes.lock().unwrap().push((a, up)),
                )
                .await
            }
        });
        let now = std::time::Instant::now;
        let dead = balancer.index_of(dead_addr).unwrap();
        for _ in 0..200 {
            if balancer.backends()[dead].probe_failed() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(balancer.backends()[dead].probe_failed());
        assert!(!balancer.is_available(dead, now()));
        assert!(balancer.any_available(now()));
        // It comes back.
        let _revived = std::net::TcpListener::bind(dead_addr).unwrap();
        for _ in 0..200 {
            if !balancer.backends()[dead].probe_failed() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(balancer.is_available(dead, now()));
        stop.cancel();
        task.await.unwrap();
        assert_eq!(
            *changes.lock().unwrap(),
            vec![(dead_addr, false), (dead_addr, true)]
        );
    }
}
