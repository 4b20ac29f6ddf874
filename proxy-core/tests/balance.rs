//! Backend selection: consistency, movement, weights, tiers, passive health, real connects.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use tokio::net::TcpListener;
use wazuh_proxy_core::balance::{
    BackendConfig, BalanceError, BalanceKey, Balancer, ConnectError, Policy, Tier,
};
use wazuh_proxy_core::envelope::AgentId;

const AGENTS: u32 = 10_000;

fn addr(last: u8) -> SocketAddr {
    SocketAddr::from(([10, 0, 0, last], 1514))
}

fn agent(n: u32) -> BalanceKey {
    BalanceKey::Agent(AgentId::parse(format!("{n:03}").as_bytes()).unwrap())
}

fn primaries(lasts: &[u8]) -> Vec<BackendConfig> {
    lasts.iter().map(|&l| BackendConfig::new(addr(l))).collect()
}

/// The first choice's address for every agent.
fn assignment(b: &Balancer, now: Instant) -> Vec<SocketAddr> {
    (0..AGENTS)
        .map(|n| b.backends()[b.candidates(&agent(n), now)[0]].addr())
        .collect()
}

/// The full candidate order, as addresses, for one key.
fn order(b: &Balancer, key: &BalanceKey, now: Instant) -> Vec<SocketAddr> {
    b.candidates(key, now)
        .iter()
        .map(|&i| b.backends()[i].addr())
        .collect()
}

fn shares(assigned: &[SocketAddr]) -> HashMap<SocketAddr, f64> {
    let mut counts = HashMap::new();
    for a in assigned {
        *counts.entry(*a).or_insert(0.0) += 1.0;
    }
    for v in counts.values_mut() {
        *v /= assigned.len() as f64;
    }
    counts
}

#[test]
fn hash_order_is_independent_of_config_order() {
    let a = Balancer::new(Policy::AgentId, primaries(&[1, 2, 3, 4])).unwrap();
    let b = Balancer::new(Policy::AgentId, primaries(&[3, 1, 4, 2])).unwrap();
    let now = Instant::now();
    for n in 0..AGENTS {
        assert_eq!(order(&a, &agent(n), now), order(&b, &agent(n), now));
    }
    let a = Balancer::new(Policy::Source, primaries(&[1, 2, 3, 4])).unwrap();
    let b = Balancer::new(Policy::Source, primaries(&[4, 3, 2, 1])).unwrap();
    for n in 0..1000u32 {
        let key = BalanceKey::Source(IpAddr::from([192, 168, (n >> 8) as u8, n as u8]));
        assert_eq!(order(&a, &key, now), order(&b, &key, now));
    }
}

/// The mapping is part of the product's contract: proxy nodes running different releases must
/// agree. A change here means mixed-version clusters would split agents.
#[test]
fn hash_mapping_is_pinned() {
    let b = Balancer::new(Policy::AgentId, primaries(&[1, 2, 3, 4])).unwrap();
    let now = Instant::now();
    let got: Vec<String> = (1..=8)
        .map(|n| order(&b, &agent(n), now)[0].to_string())
        .collect();
    assert_eq!(got, PINNED);
}

const PINNED: [&str; 8] = [
    "10.0.0.3:1514",
    "10.0.0.3:1514",
    "10.0.0.3:1514",
    "10.0.0.1:1514",
    "10.0.0.2:1514",
    "10.0.0.3:1514",
    "10.0.0.1:1514",
    "10.0.0.1:1514",
];

#[test]
fn removing_a_backend_moves_only_its_agents() {
    let now = Instant::now();
    let four = assignment(
        &Balancer::new(Policy::AgentId, primaries(&[1, 2, 3, 4])).unwrap(),
        now,
    );
    let three = assignment(
        &Balancer::new(Policy::AgentId, primaries(&[1, 2, 4])).unwrap(),
        now,
    );
    let mut moved = 0;
    for (before, after) in four.iter().zip(&three) {
        if *before == addr(3) {
            moved += 1;
        } else {
            assert_eq!(before, after, "an agent not on the removed backend moved");
        }
    }
    let share = moved as f64 / AGENTS as f64;
    assert!((0.22..0.28).contains(&share), "{share}");
}

#[test]
fn adding_a_backend_moves_a_fair_share_onto_it_only() {
    let now = Instant::now();
    let four = assignment(
        &Balancer::new(Policy::AgentId, primaries(&[1, 2, 3, 4])).unwrap(),
        now,
    );
    let five = assignment(
        &Balancer::new(Policy::AgentId, primaries(&[1, 2, 3, 4, 5])).unwrap(),
        now,
    );
    let mut moved = 0;
    for (before, after) in four.iter().zip(&five) {
        if before != after {
            assert_eq!(*after, addr(5), "an agent moved between old backends");
            moved += 1;
        }
    }
    let share = moved as f64 / AGENTS as f64;
    assert!((0.18..0.22).contains(&share), "{share}");
}

#[test]
fn marking_down_moves_only_its_agents_and_failover_is_the_next_rank() {
    let now = Instant::now();
    let all = Balancer::new(Policy::AgentId, primaries(&[1, 2, 3, 4])).unwrap();
    let mut cfg = primaries(&[1, 2, 3, 4]);
    cfg[1].down = true;
    let down = Balancer::new(Policy::AgentId, cfg).unwrap();
    for n in 0..AGENTS {
        let full = order(&all, &agent(n), now);
        let mut expected = full.clone();
        expected.retain(|a| *a != addr(2));
        // Down servers are never listed, and the rest keep their relative order.
        assert_eq!(order(&down, &agent(n), now), expected);
    }
}

#[test]
fn hash_weights_are_respected() {
    let cfg: Vec<BackendConfig> = (1..=4)
        .map(|l| BackendConfig::new(addr(l)).with_weight(u32::from(l)))
        .collect();
    let b = Balancer::new(Policy::AgentId, cfg).unwrap();
    let shares = shares(&assignment(&b, Instant::now()));
    for l in 1..=4u8 {
        let expected = f64::from(l) / 10.0;
        let got = shares[&addr(l)];
        assert!((got - expected).abs() < 0.02, "{l}: {got} vs {expected}");
    }
}

#[test]
fn equal_weights_spread_evenly() {
    let b = Balancer::new(
        Policy::AgentId,
        primaries(&[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16]),
    )
    .unwrap();
    for (a, share) in shares(&assignment(&b, Instant::now())) {
        assert!((share - 1.0 / 16.0).abs() < 0.012, "{a}: {share}");
    }
}

#[test]
fn round_robin_is_smooth_and_weighted() {
    let cfg = vec![
        BackendConfig::new(addr(1)).with_weight(5),
        BackendConfig::new(addr(2)),
        BackendConfig::new(addr(3)),
    ];
    let b = Balancer::new(Policy::RoundRobin, cfg).unwrap();
    let now = Instant::now();
    let picks: Vec<usize> = (0..14)
        .map(|_| b.candidates(&BalanceKey::None, now)[0])
        .collect();
    assert_eq!(picks, [0, 0, 1, 0, 2, 0, 0, 0, 0, 1, 0, 2, 0, 0]);
    // Every candidate list holds every available backend once.
    let mut list = b.candidates(&BalanceKey::None, now).to_vec();
    list.sort();
    assert_eq!(list, [0, 1, 2]);
}

#[test]
fn hash_policy_without_key_rotates() {
    let b = Balancer::new(Policy::AgentId, primaries(&[1, 2])).unwrap();
    let now = Instant::now();
    let first: Vec<usize> = (0..4)
        .map(|_| b.candidates(&BalanceKey::None, now)[0])
        .collect();
    assert_eq!(first, [0, 1, 0, 1]);
}

#[test]
fn random_is_weighted() {
    let cfg = vec![
        BackendConfig::new(addr(1)).with_weight(3),
        BackendConfig::new(addr(2)),
    ];
    let b = Balancer::new(Policy::Random, cfg).unwrap().with_seed(42);
    let now = Instant::now();
    let draws = 20_000;
    let first = (0..draws)
        .filter(|_| b.candidates(&BalanceKey::None, now)[0] == 0)
        .count();
    let share = first as f64 / draws as f64;
    assert!((share - 0.75).abs() < 0.02, "{share}");
    assert_eq!(b.candidates(&BalanceKey::None, now).len(), 2);
}

#[test]
fn least_conn_follows_guards() {
    let cfg = vec![
        BackendConfig::new(addr(1)),
        BackendConfig::new(addr(2)),
        BackendConfig::new(addr(3)).with_weight(2),
    ];
    let b = Balancer::new(Policy::LeastConn, cfg).unwrap();
    let now = Instant::now();
    let g0 = b.open(0);
    let _g1 = b.open(1);
    let _g2 = b.open(2);
    // Loads: 1/1, 1/1, 1/2: the heavier-weighted server wins.
    assert_eq!(b.candidates(&BalanceKey::None, now)[0], 2);
    let _g2b = b.open(2);
    let _g1b = b.open(1);
    // Loads: 1, 2, 1: a tie between 0 and 2, then 1 last.
    let c = b.candidates(&BalanceKey::None, now);
    assert!(c[0] == 0 || c[0] == 2, "{c:?}");
    assert_eq!(c[2], 1);
    drop(g0);
    assert_eq!(b.backends()[0].active(), 0);
    assert_eq!(b.candidates(&BalanceKey::None, now)[0], 0);
    assert_eq!(b.backends()[0].opened_total(), 1);
}

#[test]
fn backups_only_when_every_primary_is_unavailable() {
    let cfg = vec![
        BackendConfig::new(addr(1)),
        BackendConfig::new(addr(2)),
        BackendConfig::new(addr(3)).as_backup(),
        BackendConfig::new(addr(4)).as_backup(),
    ];
    let b = Balancer::new(Policy::AgentId, cfg).unwrap();
    let now = Instant::now();
    for n in 0..100 {
        let c = b.candidates(&agent(n), now);
        assert_eq!(c.tier(), Tier::Primary);
        assert!(c.iter().all(|&i| i < 2), "{c:?}");
    }
    b.report_failure(0, now);
    let c = b.candidates(&agent(1), now);
    assert_eq!((c.as_slice(), c.tier()), (&[1][..], Tier::Primary));
    b.report_failure(1, now);
    let c = b.candidates(&agent(1), now);
    assert_eq!(c.tier(), Tier::Backup);
    let mut list = c.to_vec();
    list.sort();
    assert_eq!(list, [2, 3]);
    assert!(b.any_available(now));
    // Backups fail too: everything is tried anyway, primaries first.
    b.report_failure(2, now);
    b.report_failure(3, now);
    assert!(!b.any_available(now));
    let c = b.candidates(&agent(1), now);
    assert_eq!(c.tier(), Tier::AllFailed);
    let mut head = c[..2].to_vec();
    head.sort();
    let mut tail = c[2..].to_vec();
    tail.sort();
    assert_eq!((head, tail), (vec![0, 1], vec![2, 3]));
    // A primary recovering takes over again.
    b.report_success(1);
    let c = b.candidates(&agent(1), now);
    assert_eq!((c.as_slice(), c.tier()), (&[1][..], Tier::Primary));
}

#[test]
fn down_is_never_chosen() {
    let cfg = vec![
        BackendConfig::new(addr(1)).as_down(),
        BackendConfig::new(addr(2)),
        BackendConfig::new(addr(3)).as_backup().as_down(),
    ];
    for policy in Policy::ALL {
        let b = Balancer::new(policy, cfg.clone()).unwrap();
        let now = Instant::now();
        for n in 0..200 {
            assert_eq!(b.candidates(&agent(n), now).as_slice(), &[1], "{policy}");
        }
        // Even when the only live server is marked failed.
        b.report_failure(1, now);
        let c = b.candidates(&agent(1), now);
        assert_eq!((c.as_slice(), c.tier()), (&[1][..], Tier::AllFailed));
        assert!(!b.is_available(0, now));
    }
}

#[test]
fn invalid_sets_are_rejected() {
    assert_eq!(
        Balancer::new(Policy::AgentId, vec![]).unwrap_err(),
        BalanceError::Empty
    );
    assert_eq!(
        Balancer::new(Policy::AgentId, primaries(&[1, 2, 1])).unwrap_err(),
        BalanceError::DuplicateAddress(addr(1))
    );
    let err = Balancer::new(
        Policy::AgentId,
        vec![BackendConfig::new(addr(1)).with_weight(0)],
    )
    .unwrap_err();
    assert_eq!(
        err,
        BalanceError::BadWeight {
            addr: addr(1),
            weight: 0
        }
    );
    assert!(err.to_string().contains("10.0.0.1:1514"), "{err}");
    assert!(Balancer::new(
        Policy::AgentId,
        vec![BackendConfig::new(addr(1)).with_weight(1001)],
    )
    .is_err());
    assert_eq!(
        Balancer::new(
            Policy::AgentId,
            vec![
                BackendConfig::new(addr(1)).as_down(),
                BackendConfig::new(addr(2)).as_backup().as_down()
            ]
        )
        .unwrap_err(),
        BalanceError::AllDown
    );
}

#[test]
fn max_fails_within_fail_timeout() {
    let cfg = vec![
        BackendConfig::new(addr(1))
            .with_max_fails(3)
            .with_fail_timeout(Duration::from_secs(10)),
        BackendConfig::new(addr(2)),
    ];
    let b = Balancer::new(Policy::RoundRobin, cfg).unwrap();
    let t0 = Instant::now();
    let s = Duration::from_secs;
    // Two failures, then the window expires: the count starts again.
    b.report_failure(0, t0);
    b.report_failure(0, t0 + s(5));
    assert!(b.is_available(0, t0 + s(5)));
    assert_eq!(b.backends()[0].fails(), 2);
    b.report_failure(0, t0 + s(11));
    assert_eq!(b.backends()[0].fails(), 1);
    assert!(b.is_available(0, t0 + s(11)));
    // Three within 10 s: unavailable for 10 s from the third.
    b.report_failure(0, t0 + s(12));
    b.report_failure(0, t0 + s(13));
    assert!(!b.is_available(0, t0 + s(13)));
    assert_eq!(b.backends()[0].failed_until(t0 + s(13)), Some(t0 + s(23)));
    assert!(!b.is_available(0, t0 + s(22)));
    assert!(b.is_available(0, t0 + s(23)));
    assert_eq!(b.backends()[0].failed_until(t0 + s(23)), None);
    assert_eq!(b.backends()[0].unavailable_total(), 1);
    // On trial: one failure marks it again.
    b.report_failure(0, t0 + s(24));
    assert!(!b.is_available(0, t0 + s(24)));
    assert!(b.is_available(0, t0 + s(34)));
    // A success clears everything: three failures are needed again.
    b.report_success(0);
    assert_eq!(b.backends()[0].fails(), 0);
    b.report_failure(0, t0 + s(35));
    b.report_failure(0, t0 + s(35));
    assert!(b.is_available(0, t0 + s(35)));
    assert_eq!(b.backends()[0].failures_total(), 8);
    assert_eq!(b.backends()[0].successes_total(), 1);
}

#[test]
fn success_resets_the_count() {
    let cfg = vec![BackendConfig::new(addr(1)).with_max_fails(2)];
    let b = Balancer::new(Policy::AgentId, cfg).unwrap();
    let t0 = Instant::now();
    b.report_failure(0, t0);
    b.report_success(0);
    b.report_failure(0, t0);
    assert!(b.is_available(0, t0));
    b.report_failure(0, t0);
    assert!(!b.is_available(0, t0));
}

#[test]
fn max_fails_zero_never_marks() {
    let cfg = vec![BackendConfig::new(addr(1)).with_max_fails(0)];
    let b = Balancer::new(Policy::AgentId, cfg).unwrap();
    let t0 = Instant::now();
    for _ in 0..100 {
        b.report_failure(0, t0);
    }
    assert!(b.is_available(0, t0));
    assert_eq!(b.backends()[0].failures_total(), 100);
}

#[test]
fn reload_keeps_health_and_active_counts() {
    let old = Balancer::new(Policy::LeastConn, primaries(&[1, 2, 3])).unwrap();
    let t0 = Instant::now();
    old.report_failure(0, t0);
    let guard = old.open(1);
    let new = Balancer::new(Policy::LeastConn, primaries(&[4, 2, 1]))
        .unwrap()
        .with_state_from(&old);
    let (i1, i2, i4) = (
        new.index_of(addr(1)).unwrap(),
        new.index_of(addr(2)).unwrap(),
        new.index_of(addr(4)).unwrap(),
    );
    let s = Duration::from_secs;
    assert!(!new.is_available(i1, t0 + s(9)));
    assert!(new.is_available(i1, t0 + s(10)));
    assert_eq!(new.backends()[i1].failures_total(), 1);
    assert_eq!(new.backends()[i2].active(), 1);
    drop(guard);
    assert_eq!(new.backends()[i2].active(), 0);
    assert_eq!(new.backends()[i4].opened_total(), 0);
    // The carried mark is still "on trial" after it expires: one failure marks it again.
    new.report_failure(i1, t0 + s(11));
    assert!(!new.is_available(i1, t0 + s(11)));
}

#[test]
fn balancer_is_send_and_sync() {
    fn check<T: Send + Sync>() {}
    check::<Balancer>();
    check::<wazuh_proxy_core::balance::ConnGuard>();
}

/// A loopback address nobody listens on: bind, take the port, close.
async fn refused_addr() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let a = l.local_addr().unwrap();
    drop(l);
    a
}

#[tokio::test]
async fn connect_fails_over_and_marks_the_refused_backend() {
    let live = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let live_addr = live.local_addr().unwrap();
    let dead_addr = refused_addr().await;
    let cfg = vec![BackendConfig::new(dead_addr), BackendConfig::new(live_addr)];
    let b = Balancer::new(Policy::AgentId, cfg).unwrap();
    // An agent whose first choice is the dead backend.
    let key = (0..)
        .map(agent)
        .find(|k| b.candidates(k, Instant::now())[0] == 0)
        .unwrap();
    let c = b.connect(&key, Duration::from_secs(2)).await.unwrap();
    assert_eq!((c.index, c.addr, c.attempts), (1, live_addr, 2));
    assert!(c.stream.nodelay().unwrap());
    let (_server, _) = live.accept().await.unwrap();
    let now = Instant::now();
    assert!(!b.is_available(0, now));
    assert_eq!(b.backends()[0].failures_total(), 1);
    assert_eq!(b.backends()[1].active(), 1);
    assert_eq!(b.backends()[0].active(), 0);
    drop(c);
    assert_eq!(b.backends()[1].active(), 0);
    // The marked backend is skipped now: one attempt.
    let c = b.connect(&key, Duration::from_secs(2)).await.unwrap();
    assert_eq!((c.index, c.attempts), (1, 1));
}

#[tokio::test]
async fn connect_reaches_backups_then_reports_every_attempt() {
    let backup = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let backup_addr = backup.local_addr().unwrap();
    let dead1 = refused_addr().await;
    let dead2 = refused_addr().await;
    let cfg = vec![
        BackendConfig::new(dead1),
        BackendConfig::new(dead2),
        BackendConfig::new(backup_addr).as_backup(),
    ];
    let b = Balancer::new(Policy::AgentId, cfg).unwrap();
    let key = agent(7);
    let c = b.connect(&key, Duration::from_secs(2)).await.unwrap();
    assert_eq!((c.addr, c.attempts), (backup_addr, 3));
    drop(c);
    drop(backup);
    // Now nothing answers: every server is tried once (all-failed fallback) and listed.
    let err = b.connect(&key, Duration::from_secs(2)).await.unwrap_err();
    let ConnectError::AllFailed(attempts) = &err else {
        panic!("{err}")
    };
    let mut tried: Vec<SocketAddr> = attempts.iter().map(|a| a.addr).collect();
    tried.sort();
    let mut all = vec![dead1, dead2, backup_addr];
    all.sort();
    assert_eq!(tried, all);
    let text = err.to_string();
    for a in all {
        assert!(text.contains(&a.to_string()), "{text}");
    }
}

/// A loopback listener that never answers new connections: backlog 0, never accepted, and
/// its accept queue filled, so the kernel drops further SYNs.
async fn silent_listener() -> (socket2::Socket, Vec<tokio::net::TcpStream>) {
    use socket2::{Domain, Socket, Type};
    let socket = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
    socket
        .bind(&SocketAddr::from(([127, 0, 0, 1], 0)).into())
        .unwrap();
    socket.listen(0).unwrap();
    let addr = socket.local_addr().unwrap().as_socket().unwrap();
    let mut fillers = Vec::new();
    for _ in 0..8 {
        let attempt = tokio::time::timeout(
            Duration::from_millis(100),
            tokio::net::TcpStream::connect(addr),
        )
        .await;
        match attempt {
            Ok(Ok(s)) => fillers.push(s),
            _ => break,
        }
    }
    (socket, fillers)
}

#[tokio::test]
async fn connect_timeout_fails_over() {
    let (silent, _fillers) = silent_listener().await;
    let silent_addr = silent.local_addr().unwrap().as_socket().unwrap();
    let live = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let live_addr = live.local_addr().unwrap();
    let cfg = vec![
        BackendConfig::new(silent_addr),
        BackendConfig::new(live_addr),
    ];
    let b = Balancer::new(Policy::AgentId, cfg).unwrap();
    let key = (0..)
        .map(agent)
        .find(|k| b.candidates(k, Instant::now())[0] == 0)
        .unwrap();
    let started = Instant::now();
    let c = b.connect(&key, Duration::from_millis(300)).await.unwrap();
    assert!(started.elapsed() >= Duration::from_millis(300));
    assert_eq!((c.addr, c.attempts), (live_addr, 2));
    assert!(!b.is_available(0, Instant::now()));
    // The error text names the timeout.
    drop(live);
    drop(c);
    let err = b
        .connect(&key, Duration::from_millis(300))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("timed out after 300ms"), "{err}");
}
