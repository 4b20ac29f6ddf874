//! Decrypt throughput of the secure message layers (AES and Blowfish; decrypt, inflate, MD5
//! check), per ciphertext byte.

use criterion::{black_box, criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use std::time::Duration;
use wazuh_proxy_core::cipher::{self, Counters, Decoder};
use wazuh_proxy_core::envelope::{AgentId, Cipher};
use wazuh_proxy_core::keys::{AgentKey, KeyIp};

/// Printable pseudo-random text (compresses like the vectors' `large-random` rows).
fn random_text(len: usize, mut seed: u64) -> Vec<u8> {
    (0..len)
        .map(|_| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            b' ' + (seed % 95) as u8
        })
        .collect()
}

/// Syslog-like lines (compress well, like most real events).
fn log_text(len: usize) -> Vec<u8> {
    let mut out = b"x:syslog:".to_vec();
    let mut i = 0u32;
    while out.len() < len {
        out.extend_from_slice(
            format!("Nov 24 10:12:{:02} host sshd[{}]: Accepted publickey for user{} from 10.0.{}.{} port {}\n",
                i % 60, 1000 + i, i % 17, i % 255, (i * 7) % 255, 40000 + i).as_bytes(),
        );
        i += 1;
    }
    out.truncate(len);
    out
}

fn bench_decrypt(c: &mut Criterion) {
    let key = AgentKey::new(
        AgentId::parse(b"001").unwrap(),
        "web-01",
        KeyIp::Any,
        b"61f01f714746b01b977d7c65a724409f33ad89c391ad93f918eb27202dca8223",
    );
    let counters = Counters {
        rnd: 55555,
        global: 1234567891,
        local: 227,
    };
    let messages = [
        ("small-200B", random_text(200, 1)),
        ("large-60KB-random", random_text(60_000, 2)),
        ("large-60KB-logs", log_text(60_000)),
    ];
    let mut group = c.benchmark_group("decrypt");
    group.measurement_time(Duration::from_secs(3));
    group.warm_up_time(Duration::from_secs(1));
    for cipher in [Cipher::Aes, Cipher::Blowfish] {
        for (name, msg) in &messages {
            let ct = cipher::encrypt(&key, cipher, &counters, msg).unwrap();
            group.throughput(Throughput::Bytes(ct.len() as u64));
            let mut decoder = Decoder::new();
            group.bench_with_input(BenchmarkId::new(cipher.name(), name), &ct, |b, ct| {
                b.iter(|| {
                    let opened = decoder.open(&key, cipher, black_box(ct)).unwrap();
                    black_box(opened.message.len())
                })
            });
        }
    }
    group.finish();

    // Encrypt, for forged frames (ACKs) and load tools.
    let mut group = c.benchmark_group("encrypt");
    group.measurement_time(Duration::from_secs(2));
    group.warm_up_time(Duration::from_secs(1));
    for cipher in [Cipher::Aes, Cipher::Blowfish] {
        let (name, msg) = &messages[0];
        group.throughput(Throughput::Bytes(msg.len() as u64));
        group.bench_with_input(BenchmarkId::new(cipher.name(), name), msg, |b, msg| {
            b.iter(|| cipher::encrypt(&key, cipher, &counters, black_box(msg)).unwrap())
        });
    }
    group.finish();
}

criterion_group!(benches, bench_decrypt);
criterion_main!(benches);
