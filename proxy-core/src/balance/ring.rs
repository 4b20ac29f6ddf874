//! Ordering the candidates: weighted rendezvous hashing for the hash policies, smooth
//! weighted round robin, least-conn and weighted random, and the portable arithmetic that
//! keeps every proxy node's choice bit-for-bit identical.

use std::sync::atomic::Ordering;

use super::health::Backend;
use super::{BalanceKey, Balancer, Policy};

impl Balancer {
    /// Orders a set of indexes from one group (primaries or backups) by the policy.
    pub(super) fn order(&self, group: usize, set: Vec<usize>, key: &BalanceKey) -> Vec<usize> {
        if set.len() <= 1 {
            return set;
        }
        match self.policy {
            Policy::AgentId | Policy::Source => match key.hash64() {
                Some(h) => self.rendezvous(set, h),
                None => self.round_robin(group, &set),
            },
            Policy::RoundRobin => self.round_robin(group, &set),
            Policy::LeastConn => {
                // Round robin first, then a stable sort by load: ties keep the rotating order
                // (nginx breaks least_conn ties with weighted round robin too).
                let mut list = self.round_robin(group, &set);
                list.sort_by(|&a, &b| {
                    let (a, b) = (&self.backends[a], &self.backends[b]);
                    // active/weight compared without division.
                    let la = u128::from(a.active()) * u128::from(b.config.weight);
                    let lb = u128::from(b.active()) * u128::from(a.config.weight);
                    la.cmp(&lb)
                });
                list
            }
            Policy::Random => self.weighted_shuffle(set),
        }
    }

    /// Weighted rendezvous (highest random weight) hashing.
    ///
    /// Chosen over a ketama ring because: the share of each backend equals its weight share
    /// exactly in expectation (a ring with a few hundred points per backend is off by several
    /// percent); the failover order is simply the ranking, with no ring walk; and the minimal
    /// movement property is exact (removing a backend moves only its agents, adding one moves
    /// agents only onto it). The O(n) cost per new connection is negligible for a handful of
    /// managers, and nothing is computed per frame.
    ///
    /// Score of backend b for key k: `weight_b / -ln(u)` with `u` uniform in (0, 1) from a
    /// 64-bit mix of the key's hash and the hash of b's address text. Ties (practically
    /// impossible) go to the smaller address, so no input order matters.
    fn rendezvous(&self, mut set: Vec<usize>, key_hash: u64) -> Vec<usize> {
        let mut scored: Vec<(f64, usize)> = set
            .iter()
            .map(|&i| {
                let b = &self.backends[i];
                let u = unit_interval(mix64(key_hash ^ b.addr_hash));
                (f64::from(b.config.weight) / -portable_ln(u), i)
            })
            .collect();
        scored.sort_by(|(sa, ia), (sb, ib)| {
            sb.total_cmp(sa)
                .then_with(|| self.backends[*ia].addr().cmp(&self.backends[*ib].addr()))
        });
        set.clear();
        set.extend(scored.into_iter().map(|(_, i)| i));
        set
    }

    /// Walks the group's smooth weighted round-robin schedule from the next position,
    /// collecting the members of `set` in the order first met.
    fn round_robin(&self, group: usize, set: &[usize]) -> Vec<usize> {
        let schedule = &self.schedule[group];
        let mut list = Vec::with_capacity(set.len());
        if !schedule.is_empty() {
            let len = schedule.len() as u64;
            let start = self.cursor[group].fetch_add(1, Ordering::Relaxed) % len;
            for step in 0..len {
                let i = schedule[((start + step) % len) as usize] as usize;
                if set.contains(&i) && !list.contains(&i) {
                    list.push(i);
                    if list.len() == set.len() {
                        break;
                    }
                }
            }
        }
        // Every member is in the schedule; this only guards against a caller mixing groups.
        for &i in set {
            if !list.contains(&i) {
                list.push(i);
            }
        }
        list
    }

    /// Repeated weighted draws without replacement: the first element is a weighted random
    /// choice, and so is each following one among the rest.
    fn weighted_shuffle(&self, mut set: Vec<usize>) -> Vec<usize> {
        let mut list = Vec::with_capacity(set.len());
        while !set.is_empty() {
            let total: u64 = set
                .iter()
                .map(|&i| u64::from(self.backends[i].config.weight))
                .sum();
            let mut r = self.next_random() % total.max(1);
            let mut pick = set.len() - 1;
            for (pos, &i) in set.iter().enumerate() {
                let w = u64::from(self.backends[i].config.weight);
                if r < w {
                    pick = pos;
                    break;
                }
                r -= w;
            }
            list.push(set.remove(pick));
        }
        list
    }

    fn next_random(&self) -> u64 {
        // splitmix64: a Weyl sequence through a bijective mixer; one atomic add per draw.
        mix64(
            self.rng
                .fetch_add(0x9e37_79b9_7f4a_7c15, Ordering::Relaxed)
                .wrapping_add(0x9e37_79b9_7f4a_7c15),
        )
    }
}

pub(super) fn digest_u64(digest: &[u8]) -> u64 {
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest[..8]);
    u64::from_le_bytes(first)
}

/// The splitmix64 finalizer: a bijection with full avalanche, so related inputs (the same key
/// against different backends) give unrelated outputs.
pub(super) fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Maps a hash to (0, 1) exactly: the top 52 bits, centred in their interval (53 bits of
/// precision hold `n + 0.5` for every 52-bit `n`, so neither 0 nor 1 is reached).
pub(super) fn unit_interval(h: u64) -> f64 {
    ((h >> 12) as f64 + 0.5) / (1u64 << 52) as f64
}

/// Natural logarithm for `x` in (0, 1], from basic IEEE operations only.
///
/// `f64::ln` comes from the platform's libm, which may differ in the last bit between glibc,
/// musl and macOS; a one-ulp difference could flip a near tie and send an agent to different
/// managers from two proxy nodes. Additions, multiplications and divisions are correctly
/// rounded everywhere, so this gives the same bits on every machine.
pub(super) fn portable_ln(x: f64) -> f64 {
    let bits = x.to_bits();
    // Only called with normal numbers (unit_interval's output is at least 2^-53).
    let mut exp = ((bits >> 52) & 0x7ff) as i64 - 1023;
    let mut m = f64::from_bits((bits & 0x000f_ffff_ffff_ffff) | 0x3ff0_0000_0000_0000);
    if m > std::f64::consts::SQRT_2 {
        m *= 0.5;
        exp += 1;
    }
    // ln m = 2 atanh(s) = 2 (s + s^3/3 + s^5/5 + ...), |s| < 0.172: 12 terms reach 1e-18.
    let s = (m - 1.0) / (m + 1.0);
    let s2 = s * s;
    let mut term = s;
    let mut sum = 0.0;
    for k in 0..12 {
        sum += term / f64::from(2 * k + 1);
        term *= s2;
    }
    exp as f64 * std::f64::consts::LN_2 + 2.0 * sum
}

/// nginx's smooth weighted round robin, run once over the static weights: each backend appears
/// `weight / gcd` times, spread out (weights 5,1,1 give a a b a c a a, not a a a a a b c).
pub(super) fn smooth_schedule(backends: &[Backend], member: impl Fn(&Backend) -> bool) -> Vec<u32> {
    let mut members: Vec<(usize, i64)> = backends
        .iter()
        .enumerate()
        .filter(|(_, b)| member(b))
        .map(|(i, b)| (i, i64::from(b.config.weight)))
        .collect();
    if members.is_empty() {
        return Vec::new();
    }
    // Address order, so the schedule does not depend on configuration order.
    members.sort_by_key(|&(i, _)| backends[i].addr());
    let g = members.iter().fold(0, |g, &(_, w)| gcd(g, w));
    for m in &mut members {
        m.1 /= g.max(1);
    }
    let total: i64 = members.iter().map(|m| m.1).sum();
    let mut current = vec![0i64; members.len()];
    let mut schedule = Vec::with_capacity(total as usize);
    for _ in 0..total {
        let mut best = 0;
        for (pos, &(_, w)) in members.iter().enumerate() {
            current[pos] += w;
            if current[pos] > current[best] {
                best = pos;
            }
        }
        current[best] -= total;
        schedule.push(members[best].0 as u32);
    }
    schedule
}

fn gcd(a: i64, b: i64) -> i64 {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}
