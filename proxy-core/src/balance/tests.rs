use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use super::health::ticks;
use super::ring::{mix64, portable_ln, smooth_schedule, unit_interval};
use super::*;

fn addr(last: u8) -> SocketAddr {
    SocketAddr::from(([10, 0, 0, last], 1514))
}

#[test]
fn portable_ln_matches_std() {
    for i in 1..10_000u64 {
        let x = unit_interval(mix64(i));
        let (ours, std) = (portable_ln(x), x.ln());
        assert!(
            (ours - std).abs() <= 1e-14 * std.abs().max(1.0),
            "{x}: {ours} vs {std}"
        );
    }
    assert_eq!(portable_ln(1.0), 0.0);
    assert!((portable_ln(0.5) + std::f64::consts::LN_2).abs() < 1e-16);
}

#[test]
fn unit_interval_is_open() {
    assert!(unit_interval(0) > 0.0);
    assert!(unit_interval(u64::MAX) < 1.0);
}

#[test]
fn smooth_schedule_spreads_weights() {
    let base = Instant::now();
    let backends: Vec<Backend> = [(1, 5), (2, 1), (3, 1)]
        .into_iter()
        .map(|(a, w)| Backend::new(BackendConfig::new(addr(a)).with_weight(w), base))
        .collect();
    assert_eq!(smooth_schedule(&backends, |_| true), [0, 0, 1, 0, 2, 0, 0]);
    // Common factors are removed.
    let backends: Vec<Backend> = [(1, 20), (2, 10)]
        .into_iter()
        .map(|(a, w)| Backend::new(BackendConfig::new(addr(a)).with_weight(w), base))
        .collect();
    assert_eq!(smooth_schedule(&backends, |_| true), [0, 1, 0]);
    assert!(smooth_schedule(&backends, |_| false).is_empty());
}

#[test]
fn policy_names_round_trip() {
    for p in Policy::ALL {
        assert_eq!(p.to_string().parse::<Policy>(), Ok(p));
    }
    let err = "ip-hash".parse::<Policy>().unwrap_err();
    assert!(err.to_string().contains("\"ip-hash\""), "{err}");
    assert_eq!(Policy::default(), Policy::AgentId);
}

#[test]
fn ticks_saturate_before_base() {
    let base = Instant::now() + Duration::from_secs(5);
    assert_eq!(ticks(base, Instant::now()), 1);
}

#[test]
fn source_key_canonical() {
    let v4: IpAddr = "192.0.2.7".parse().unwrap();
    let mapped: IpAddr = "::ffff:192.0.2.7".parse().unwrap();
    assert_eq!(
        BalanceKey::Source(v4).hash64(),
        BalanceKey::Source(mapped).hash64()
    );
    assert_eq!(BalanceKey::None.hash64(), None);
}

#[test]
fn bad_indexes_are_harmless() {
    let b = Balancer::new(Policy::RoundRobin, vec![BackendConfig::new(addr(1))]).unwrap();
    let now = Instant::now();
    b.report_failure(7, now);
    b.report_success(7);
    assert!(!b.is_available(7, now));
    drop(b.open(7));
    assert_eq!(b.backends()[0].active(), 0);
}

#[test]
fn running_out_of_sockets_is_this_hosts_fault_not_the_backends() {
    use nix::errno::Errno;
    let err = |e: Errno| std::io::Error::from_raw_os_error(e as i32);
    for local in [
        Errno::EMFILE,
        Errno::ENFILE,
        Errno::EADDRNOTAVAIL,
        Errno::ENOBUFS,
        Errno::ENOMEM,
    ] {
        assert!(out_of_sockets(&err(local)), "{local}");
        assert!(matches!(
            AttemptError::from(err(local)),
            AttemptError::OutOfSockets(_)
        ));
    }
    for remote in [Errno::ECONNREFUSED, Errno::EHOSTUNREACH, Errno::ETIMEDOUT] {
        assert!(!out_of_sockets(&err(remote)), "{remote}");
        assert!(matches!(
            AttemptError::from(err(remote)),
            AttemptError::Io(_)
        ));
    }
    let addr = addr(1);
    let attempt = |e: Errno| ConnectAttempt {
        index: 0,
        addr,
        error: err(e).into(),
    };
    assert!(
        ConnectError::AllFailed(vec![attempt(Errno::EMFILE), attempt(Errno::ENFILE)])
            .is_out_of_sockets()
    );
    // One manager that answered (refused) means the agent may still be held for it.
    assert!(
        !ConnectError::AllFailed(vec![attempt(Errno::EMFILE), attempt(Errno::ECONNREFUSED)])
            .is_out_of_sockets()
    );
    assert!(!ConnectError::NoBackend.is_out_of_sockets());
}
