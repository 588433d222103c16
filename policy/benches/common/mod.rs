//! What both benchmarks share: the clock, the TTL rules, the table's
//! addresses, and a small deterministic generator.
#![allow(dead_code, unreachable_pub)]

use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

use sluice_policy::{Hostname, Retention, Timestamp};

pub const T0: Timestamp = Timestamp::from_unix_millis(1_700_000_000_000);
pub const KEEP: Retention = Retention { min_ttl: Duration::from_secs(5), grace: Duration::from_secs(600) };

/// The `k`-th address of the name table: 198.18.0.0/15 first, then 10.0.0.0/8
/// (table keys only: nothing is sent anywhere).
pub fn table_ip(k: u32) -> IpAddr {
    const BENCHMARK_NET: u32 = 131_072;
    let v4 = if k < BENCHMARK_NET {
        u32::from(Ipv4Addr::new(198, 18, 0, 0)) + k
    } else {
        u32::from(Ipv4Addr::new(10, 0, 0, 0)) + k
    };
    IpAddr::V4(Ipv4Addr::from(v4))
}

pub fn host(s: &str) -> Hostname {
    Hostname::parse(s).unwrap_or_else(|e| panic!("{s}: {e}"))
}

/// splitmix64: a small, deterministic generator (no extra dependency).
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    pub fn below(&mut self, n: u32) -> u32 {
        (self.next() % u64::from(n)) as u32
    }
}

/// Short runs: the machine is shared, the figures are compared within a run.
pub fn criterion() -> criterion::Criterion {
    criterion::Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(4))
        .sample_size(30)
}
