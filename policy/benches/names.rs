//! NameTable lookups on a table of 1,000,000 IPs, alone and while a DNS
//! writer thread keeps recording answers.
//!
//! Lookups use the non-allocating path (`with_names(..).count()`) and cycle
//! through 65,536 random IPs spread over the whole table.
//!
//! Target (issue): under 100 ns per lookup. `a_name_count_walk` and
//! `a_pair_count`: the two ways to count the table's (IP, name) pairs (a
//! `/metrics` scrape reads the second for `sluice_dns_names_tracked`).

use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

mod common;

use common::{KEEP, Rng, T0, host, table_ip};
use criterion::{Criterion, criterion_group, criterion_main};
use sluice_policy::{Hostname, NameTable};

const IPS: u32 = 1_000_000;
/// IPs the writer may add on top of the table (so it inserts as well as
/// updates) while staying under the capacity: no eviction during the run.
const EXTRA_IPS: u32 = 100_000;
const MAX_WRITES: u64 = 50_000_000;
/// Lookups per case (a power of two).
const LOOKUPS: usize = 1 << 16;

fn bench_names(c: &mut Criterion) {
    // The names DNS gives for each IP (also what the writer re-records).
    let names: Vec<Hostname> =
        (0..IPS + EXTRA_IPS).map(|k| host(&format!("h{k}.zone-{}.example.net", k % 5000))).collect();
    let t = Instant::now();
    let table = NameTable::new((IPS + 2 * EXTRA_IPS) as usize);
    let ttl = Duration::from_secs(3600);
    for k in 0..IPS {
        table.record(table_ip(k), &names[k as usize], ttl, T0, KEEP);
        // One IP in eight also carries a CDN alias.
        if k % 8 == 5 {
            let alias = host(&format!("a{k}.cdn.example.org"));
            table.record(table_ip(k), &alias, ttl, T0, KEEP);
        }
    }
    eprintln!("setup: NameTable of {} IPs recorded in {:?}", table.len(), t.elapsed());
    let now = T0.plus(Duration::from_secs(1));

    let mut rng = Rng(0x5eed);
    let hits: Vec<IpAddr> = (0..LOOKUPS).map(|_| table_ip(rng.below(IPS))).collect();
    let misses: Vec<IpAddr> = (0..LOOKUPS)
        .map(|_| {
            let r = rng.below(1 << 20);
            IpAddr::V4(Ipv4Addr::from(u32::from(Ipv4Addr::new(100, 64, 0, 0)) + r))
        })
        .collect();
    for ip in &hits {
        assert!(table.with_names(*ip, now, |it| it.count()) >= 1);
    }

    let lookup = |ips: &[IpAddr], i: &mut usize| {
        let ip = ips[*i & (LOOKUPS - 1)];
        *i = i.wrapping_add(1);
        table.with_names(black_box(ip), now, |it| it.count())
    };

    let mut group = c.benchmark_group("names");
    let mut i = 0usize;
    group.bench_function("a_lookup_hit", |b| b.iter(|| lookup(&hits, &mut i)));
    let mut i = 0usize;
    group.bench_function("a_lookup_miss", |b| b.iter(|| lookup(&misses, &mut i)));
    // 1,024 distinct IPs, repeated: a node's usual working set, in cache.
    let hot: Vec<IpAddr> = hits.iter().take(1024).cycle().take(LOOKUPS).copied().collect();
    let mut i = 0usize;
    group.bench_function("a_lookup_hit_hot_1k", |b| b.iter(|| lookup(&hot, &mut i)));
    // Counting the (IP, name) pairs by a walk of the whole table, and by the table's own count.
    group.bench_function("a_name_count_walk", |b| b.iter(|| black_box(table.name_count())));
    group.bench_function("a_pair_count", |b| b.iter(|| black_box(table.pair_count())));

    // (b) the same lookups while a writer records answers (updates of
    // existing IPs, and inserts of up to EXTRA_IPS new ones) as fast as it can.
    let stop = AtomicBool::new(false);
    let writes = AtomicU64::new(0);
    let t = Instant::now();
    std::thread::scope(|s| {
        s.spawn(|| {
            let mut rng = Rng(0xd15c);
            let mut n = 0u64;
            while n < MAX_WRITES && !stop.load(Ordering::Relaxed) {
                let k = rng.below(IPS + EXTRA_IPS);
                let ttl = Duration::from_secs(60 + n % 600);
                table.record(table_ip(k), &names[k as usize], ttl, now, KEEP);
                n += 1;
            }
            writes.store(n, Ordering::Relaxed);
        });
        let mut i = 0usize;
        group.bench_function("b_lookup_hit_with_writer", |b| b.iter(|| lookup(&hits, &mut i)));
        let mut i = 0usize;
        group.bench_function("b_lookup_hit_hot_1k_with_writer", |b| b.iter(|| lookup(&hot, &mut i)));
        stop.store(true, Ordering::Relaxed);
    });
    let n = writes.load(Ordering::Relaxed);
    let secs = t.elapsed().as_secs_f64();
    eprintln!("writer: {n} records in {secs:.1} s ({:.2} M/s), table now {} IPs", n as f64 / secs / 1e6, table.len());
    group.finish();
}

criterion_group! {
    name = benches;
    config = common::criterion();
    targets = bench_names
}
criterion_main!(benches);
