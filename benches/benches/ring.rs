//! Cost of ordering backends for a new agent connection with the consistent agent-id policy
//! (the default on 1514): key hash, one score per backend, sort.

use std::hint::black_box;
use std::net::SocketAddr;
use std::time::Instant;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use wazuh_proxy_core::balance::{BackendConfig, BalanceKey, Balancer, Policy};
use wazuh_proxy_core::envelope::AgentId;

fn balancer(n: u8) -> Balancer {
    let backends = (1..=n)
        .map(|i| BackendConfig::new(SocketAddr::from(([10, 0, 0, i], 1514))))
        .collect();
    match Balancer::new(Policy::AgentId, backends) {
        Ok(b) => b,
        Err(e) => panic!("bench backend set rejected: {e}"),
    }
}

fn candidates(c: &mut Criterion) {
    let keys: Vec<BalanceKey> = (0..1024u32)
        .filter_map(|n| AgentId::parse(format!("{n:03}").as_bytes()))
        .map(BalanceKey::Agent)
        .collect();
    let now = Instant::now();
    let mut group = c.benchmark_group("candidates/agent-id");
    for n in [2u8, 4, 16] {
        let b = balancer(n);
        group.bench_with_input(BenchmarkId::from_parameter(n), &b, |bench, b| {
            let mut i = 0;
            bench.iter(|| {
                i = (i + 1) % keys.len();
                black_box(b.candidates(black_box(&keys[i]), now))
            })
        });
    }
    group.finish();
    // The key hash alone (MD5 of the ID), shared by every backend count above.
    c.bench_function("balance_key/hash64", |bench| {
        bench.iter(|| black_box(black_box(&keys[7]).hash64()))
    });
}

criterion_group!(benches, candidates);
criterion_main!(benches);
