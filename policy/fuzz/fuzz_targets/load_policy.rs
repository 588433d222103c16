//! Arbitrary bytes through `load_sources`, then `Snapshot::compile` and one
//! `decide`. None of these may panic or hang on any input.
//!
//! Input layout: if the first byte is 0xFF, the rest is split at the next
//! 0xFF into two files (cross-file checks, e.g. two EgressPolicy documents);
//! otherwise the whole input is one file, so plain YAML seeds work as is.
#![no_main]

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::Path;
use std::sync::Arc;

use libfuzzer_sys::fuzz_target;
use sluice_policy::{
    Connection, HostPattern, Hostname, NameTable, Snapshot, SniffSource, Sniffed, SourceFile, Timestamp, decide,
    load_sources,
};

fn file(name: &str, bytes: &[u8]) -> SourceFile {
    SourceFile { path: Arc::from(Path::new(name)), bytes: bytes.to_vec() }
}

fuzz_target!(|data: &[u8]| {
    let files = match data.split_first() {
        Some((0xFF, rest)) => match rest.iter().position(|&b| b == 0xFF) {
            Some(i) => vec![file("a.yaml", &rest[..i]), file("b.yaml", &rest[i + 1..])],
            None => vec![file("a.yaml", rest)],
        },
        _ => vec![file("a.yaml", data)],
    };

    let Ok(set) = load_sources(&files) else {
        return;
    };
    let snapshot = Snapshot::compile(&set);

    // A connection aimed at what the policy describes, so decide() walks
    // its matching paths rather than always falling through.
    let first = set.entries.first();
    let port = first.and_then(|e| e.ports.first()).map_or(443, |p| p.number);
    let destination_ip =
        first.and_then(|e| e.addresses.first()).map_or(IpAddr::V4(Ipv4Addr::new(203, 0, 113, 7)), |n| n.addr());
    let source = set
        .settings
        .workloads
        .first()
        .and_then(|w| w.sources.first())
        .map_or(IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1)), |n| n.addr());
    let sniffed = first.and_then(|e| e.hosts.first()).and_then(|h| {
        let name = match h {
            HostPattern::Exact(n) => Some(n.clone()),
            HostPattern::Wildcard(s) => Hostname::parse(&format!("x.{}", s.as_str())).ok(),
        }?;
        Some(Sniffed { name, via: SniffSource::TlsSni })
    });
    let conn = Connection { source, destination: SocketAddr::new(destination_ip, port), sniffed };
    let names = NameTable::new(16);
    let _ = decide(&snapshot, &names, &conn, Timestamp::from_unix_millis(1_700_000_000_000));
});
