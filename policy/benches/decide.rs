//! `decide()` on a large policy and a full name table.
//!
//! The snapshot is 10,000 ServiceEntries (half exact `svc-N.example.com`,
//! half wildcard `*.zone-N.example.net`), generated as YAML and loaded the
//! real way (`load_sources` + `Snapshot::compile`). The name table holds
//! 1,000,000 IPs. Each case cycles through 65,536 precomputed connections
//! to IPs spread over the whole table, so the numbers include the cache
//! misses of a large table, not one hot entry.
//!
//! Target (issue): under 300 ns per `decide()`.

use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::Path;
use std::time::{Duration, Instant};

mod common;

use common::{KEEP, Rng, T0, host, table_ip};
use criterion::{Criterion, criterion_group, criterion_main};
use sluice_policy::{
    Cluster, Connection, NameTable, Reason, Snapshot, SniffSource, Sniffed, SourceFile, decide, load_sources,
};

const ENTRIES: u32 = 10_000;
const FILES: u32 = 10;
const IPS: u32 = 1_000_000;
const WORKLOADS: u32 = 16;
/// Connections per case (a power of two).
const CONNS: usize = 1 << 16;
/// Distinct destinations in the hot-working-set case.
const HOT: usize = 1 << 10;

/// Entry `e`: even = exact host, odd = wildcard; `e % 4` in {0, 1} = TLS 443,
/// in {2, 3} = TCP `5000 + e % 1000`.
fn entry_port(e: u32) -> u16 {
    if e % 4 < 2 { 443 } else { 5000 + (e % 1000) as u16 }
}

fn entry_yaml(e: u32, out: &mut String) {
    use std::fmt::Write;
    let host = if e.is_multiple_of(2) { format!("svc-{e}.example.com") } else { format!("\"*.zone-{e}.example.net\"") };
    let (pname, proto) = if e % 4 < 2 { ("tls", "TLS") } else { ("tcp", "TCP") };
    // A few exact TCP entries also register an address range, so the
    // address trie is not empty (unmatched connections walk it).
    let addresses = if e % 200 == 2 { format!("\n  addresses: [172.16.{}.0/24]", e / 200) } else { String::new() };
    let _ = write!(
        out,
        "---\napiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {{name: se-{e}, namespace: bench}}\nspec:\n  hosts: [{host}]{addresses}\n  ports: [{{number: {port}, name: {pname}, protocol: {proto}}}]\n  location: MESH_EXTERNAL\n",
        port = entry_port(e),
    );
}

fn build_snapshot() -> Snapshot {
    let mut files = Vec::new();
    let per_file = ENTRIES / FILES;
    for f in 0..FILES {
        let mut text = String::new();
        for e in f * per_file..(f + 1) * per_file {
            entry_yaml(e, &mut text);
        }
        files.push(SourceFile { path: Path::new(&format!("entries-{f}.yaml")).into(), bytes: text.into_bytes() });
    }
    let mut own = String::from(
        "apiVersion: sluice.dev/v1alpha1\nkind: EgressPolicy\nmetadata: {name: bench}\nspec:\n  outboundTrafficPolicy: {mode: REGISTRY_ONLY}\n  enforcement: enforce\n  denyRanges: [169.254.169.254/32, 'fd00:ec2::254/128', 192.0.2.0/24]\n  workloads:\n",
    );
    for w in 0..WORKLOADS {
        own.push_str(&format!("  - name: wl-{w}\n    sources: [10.244.{w}.0/24]\n"));
    }
    files.push(SourceFile { path: Path::new("own.yaml").into(), bytes: own.into_bytes() });
    let set = load_sources(&files).unwrap_or_else(|e| panic!("policy does not load: {e}"));
    assert_eq!(set.entries.len(), ENTRIES as usize);
    Snapshot::compile(&set)
}

/// The registered entry an IP's name points at (see [`ip_name`]).
fn ip_entry(k: u32) -> u32 {
    let slot = 4 * ((k / 4) % (ENTRIES / 4));
    match k % 4 {
        0 => slot + 2, // exact, TCP
        1 => slot,     // exact, TLS 443
        3 => slot + 1, // wildcard, TLS 443
        _ => u32::MAX, // unregistered
    }
}

/// What DNS answered for IP `k`: `k % 4` = 0 exact TCP host, 1 exact TLS
/// host, 2 unregistered name, 3 a name under a registered wildcard.
fn ip_name(k: u32) -> String {
    match k % 4 {
        0 | 1 => format!("svc-{}.example.com", ip_entry(k)),
        2 => format!("host-{k}.unreg.example.org"),
        _ => format!("n{k}.zone-{}.example.net", ip_entry(k)),
    }
}

fn build_names() -> NameTable {
    let table = NameTable::new(IPS as usize * 2);
    let ttl = Duration::from_secs(3600);
    for k in 0..IPS {
        let ip = table_ip(k);
        table.record(ip, &host(&ip_name(k)), ttl, T0, KEEP);
        // One IP in eight also carries a CDN alias, recorded after.
        if k % 8 == 5 {
            table.record(ip, &host(&format!("a{k}.cdn.example.org")), ttl, T0, KEEP);
        }
    }
    assert_eq!(table.len(), IPS as usize);
    table
}

impl Rng {
    /// A random table index `k` with `k % 4 == rem`.
    fn ip_index(&mut self, rem: u32) -> u32 {
        self.below(IPS / 4) * 4 + rem
    }

    fn source(&mut self) -> IpAddr {
        let (w, h) = (self.below(WORKLOADS) as u8, 1 + self.below(250) as u8);
        IpAddr::V4(Ipv4Addr::new(10, 244, w, h))
    }
}

fn sni(name: String) -> Option<Sniffed> {
    Some(Sniffed { name: host(&name), via: SniffSource::TlsSni })
}

/// (a) opaque TCP, IP known under a registered exact host with a TCP port.
fn opaque_known(rng: &mut Rng) -> Connection {
    let k = rng.ip_index(0);
    Connection {
        source: rng.source(),
        destination: SocketAddr::new(table_ip(k), entry_port(ip_entry(k))),
        sniffed: None,
    }
}

/// (b) TLS SNI under a registered wildcard, destination IP not in the table.
fn sni_wildcard_unknown_ip(rng: &mut Rng) -> Connection {
    let e = 4 * rng.below(ENTRIES / 4) + 1;
    let r = rng.below(1 << 20);
    Connection {
        source: rng.source(),
        destination: SocketAddr::new(IpAddr::V4(Ipv4Addr::from(u32::from(Ipv4Addr::new(100, 64, 0, 0)) + r)), 443),
        sniffed: sni(format!("x{r}.zone-{e}.example.net")),
    }
}

/// (c) TLS SNI of one registered host to an IP DNS gave for another.
fn sni_contradicted(rng: &mut Rng) -> Connection {
    let k = rng.ip_index(1);
    let other = (ip_entry(k) + 4 * (1 + rng.below(100))) % ENTRIES;
    Connection {
        source: rng.source(),
        destination: SocketAddr::new(table_ip(k), 443),
        sniffed: sni(format!("svc-{other}.example.com")),
    }
}

/// (d) opaque TCP to an IP known only under an unregistered name.
fn unregistered(rng: &mut Rng) -> Connection {
    let k = rng.ip_index(2);
    Connection { source: rng.source(), destination: SocketAddr::new(table_ip(k), 443), sniffed: None }
}

fn expect_case(v: &sluice_policy::Verdict, case: &str) {
    let ok = match case {
        "a_opaque_tcp_dns_match" => {
            matches!(v.cluster, Cluster::ServiceEntry(_)) && matches!(v.reason, Reason::DnsName(_))
        }
        "b_sni_wildcard_unknown_ip" => {
            matches!(v.cluster, Cluster::ServiceEntry(_)) && v.reason == Reason::SniffedName(SniffSource::TlsSni)
        }
        "c_sni_contradicts_dns" => {
            v.cluster == Cluster::BlackHole && v.reason == Reason::NameContradictsDns(SniffSource::TlsSni)
        }
        _ => v.cluster == Cluster::BlackHole && v.reason == Reason::NotRegistered,
    };
    assert!(ok && v.workload.is_some(), "{case}: unexpected verdict {v:?}");
}

fn bench_decide(c: &mut Criterion) {
    let t = Instant::now();
    let snap = build_snapshot();
    eprintln!("setup: {ENTRIES} ServiceEntries loaded + compiled in {:?}", t.elapsed());
    let t = Instant::now();
    let names = build_names();
    eprintln!("setup: NameTable of {} IPs recorded in {:?}", names.len(), t.elapsed());
    let now = T0.plus(Duration::from_secs(1));

    type Gen = fn(&mut Rng) -> Connection;
    let cases: [(&str, Gen); 4] = [
        ("a_opaque_tcp_dns_match", opaque_known),
        ("b_sni_wildcard_unknown_ip", sni_wildcard_unknown_ip),
        ("c_sni_contradicts_dns", sni_contradicted),
        ("d_unregistered_blackhole", unregistered),
    ];
    let mut rng = Rng(0x5eed);
    let mut all = Vec::new();
    let mut group = c.benchmark_group("decide");
    for (case, generate) in cases {
        let conns: Vec<Connection> = (0..CONNS).map(|_| generate(&mut rng)).collect();
        for conn in &conns {
            expect_case(&decide(&snap, &names, conn, now), case);
        }
        let mut i = 0usize;
        group.bench_function(case, |b| {
            b.iter(|| {
                let conn = &conns[i & (CONNS - 1)];
                i = i.wrapping_add(1);
                decide(&snap, &names, black_box(conn), now)
            })
        });
        all.extend(conns);
    }
    // The four cases interleaved, in a random order.
    for n in (1..all.len()).rev() {
        all.swap(n, rng.below(n as u32 + 1) as usize);
    }
    let mask = all.len().next_power_of_two() - 1;
    assert_eq!(mask + 1, all.len());
    let mut i = 0usize;
    group.bench_function("e_mixed", |b| {
        b.iter(|| {
            let conn = &all[i & mask];
            i = i.wrapping_add(1);
            decide(&snap, &names, black_box(conn), now)
        })
    });
    // The same mix over 1,024 distinct destinations: a node's usual working
    // set, whose table entries stay in cache (the cases above cycle through
    // 65,536 random IPs of the 1M table, so most lookups miss the cache).
    let hot = &all[..HOT];
    let mut i = 0usize;
    group.bench_function("f_mixed_hot_1k_destinations", |b| {
        b.iter(|| {
            let conn = &hot[i & (HOT - 1)];
            i = i.wrapping_add(1);
            decide(&snap, &names, black_box(conn), now)
        })
    });
    group.finish();
}

criterion_group! {
    name = benches;
    config = common::criterion();
    targets = bench_decide
}
criterion_main!(benches);
