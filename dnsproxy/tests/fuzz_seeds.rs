//! The fuzz target's seeds (`dnsproxy/fuzz/seeds`, made by
//! `dnsproxy/fuzz/make_seeds.py`), replayed through the same entry points as
//! `cargo fuzz` (`sluice_dnsproxy::fuzz`) on every test run: none may panic,
//! and the seeds reach what they were written for (learning along a CNAME
//! chain, blocking, truncation), so the fuzzer starts from those paths.
#![allow(clippy::unwrap_used)]

use std::net::IpAddr;
use std::path::PathBuf;

use hickory_proto::op::{Message, ResponseCode};
use sluice_dnsproxy::fuzz;
use sluice_policy::{Hostname, Timestamp};

fn seed(name: &str) -> Vec<u8> {
    std::fs::read(seeds().join(name)).unwrap_or_else(|e| panic!("seed {name}: {e}"))
}

fn seeds() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fuzz/seeds")
}

/// The query and the answer of a seed (the layout `fuzz::run` reads).
fn parts(data: &[u8]) -> (&[u8], &[u8]) {
    let len = usize::from(u16::from_be_bytes([data[1], data[2]]));
    data[3..].split_at(len)
}

#[test]
fn every_seed_runs_through_without_a_panic() {
    let shared = fuzz::shared();
    let mut n = 0;
    for entry in std::fs::read_dir(seeds()).unwrap() {
        fuzz::run(&std::fs::read(entry.unwrap().path()).unwrap(), &shared);
        n += 1;
    }
    assert!(n >= 9, "the seeds are there: {n}");
}

#[test]
fn the_cname_chain_seed_is_learned_under_every_name_of_the_chain() {
    let shared = fuzz::shared();
    fuzz::run(&seed("cname-chain.bin"), &shared);
    let ip: IpAddr = "198.18.0.1".parse().unwrap();
    let mut names = shared.names.names(ip, Timestamp::now());
    names.sort();
    let want: Vec<Hostname> =
        ["a.example", "c.b.example", "d.b.example"].iter().map(|n| Hostname::parse(n).unwrap()).collect();
    assert_eq!(names, want);
}

#[test]
fn the_blocked_seed_gets_nxdomain_and_a_registered_name_is_forwarded() {
    let shared = fuzz::shared();
    let blocked_seed = seed("blocked.bin");
    let (blocked, _) = parts(&blocked_seed);
    let fuzz::Fate::Answered(reply) = fuzz::query(blocked, false, &shared) else { panic!("x.test forwarded") };
    assert_eq!(Message::from_vec(&reply).unwrap().metadata.response_code, ResponseCode::NXDomain);
    let registered_seed = seed("cname-chain.bin");
    let (registered, _) = parts(&registered_seed);
    let fuzz::Fate::Forwarded { question, max_udp } = fuzz::query(registered, false, &shared) else {
        panic!("a.example not forwarded")
    };
    assert_eq!((question.start, max_udp), (12, 1232));
    let axfr_seed = seed("axfr.bin");
    let (axfr, _) = parts(&axfr_seed);
    let fuzz::Fate::Answered(reply) = fuzz::query(axfr, false, &shared) else { panic!("a transfer forwarded") };
    assert_eq!(Message::from_vec(&reply).unwrap().metadata.response_code, ResponseCode::Refused);
}

#[test]
fn the_large_seed_is_truncated_for_a_client_without_edns() {
    let shared = fuzz::shared();
    let large = seed("large-no-edns.bin");
    let (query, answer) = parts(&large);
    let fuzz::Fate::Forwarded { question, max_udp } = fuzz::query(query, false, &shared) else {
        panic!("x.b.example not forwarded")
    };
    assert_eq!(max_udp, 512);
    let reply = fuzz::answer(&query[question], answer, max_udp, &shared).unwrap();
    assert!(reply.len() <= 512 && reply[2] & 0x02 != 0, "TC set, within 512 bytes");
}
