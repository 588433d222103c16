#![allow(clippy::unwrap_used)]

use std::net::{Ipv4Addr, Ipv6Addr};
use std::str::FromStr;

use hickory_proto::rr::rdata::{A, AAAA, CNAME, TXT};

use super::*;

const NOW: Timestamp = Timestamp::from_unix_millis(1_700_000_000_000);
const KEEP: Retention = Retention { min_ttl: Duration::from_secs(0), grace: Duration::from_secs(0) };

fn name(s: &str) -> Name {
    Name::from_str(s).unwrap()
}

fn a(owner: &str, ttl: u32, ip: [u8; 4]) -> Record {
    Record::from_rdata(name(owner), ttl, RData::A(A(Ipv4Addr::from(ip))))
}

fn cname(owner: &str, ttl: u32, target: &str) -> Record {
    Record::from_rdata(name(owner), ttl, RData::CNAME(CNAME(name(target))))
}

fn names_at(table: &NameTable, ip: &str, at: Timestamp) -> Vec<String> {
    let mut v: Vec<String> = table.names(ip.parse().unwrap(), at).iter().map(|h| h.to_string()).collect();
    v.sort();
    v
}

fn after(secs: u64) -> Timestamp {
    NOW.plus(Duration::from_secs(secs))
}

#[test]
fn direct_answer_is_recorded_under_the_query_name() {
    let table = NameTable::new(100);
    let answers = [a("api.example.com.", 60, [192, 0, 2, 1]), a("api.example.com.", 60, [192, 0, 2, 2])];
    let l = learn(&table, &name("API.Example.COM."), &answers, NOW, KEEP);
    assert_eq!(l, Learned { ips: 2, records: 2 });
    assert_eq!(names_at(&table, "192.0.2.1", NOW), ["api.example.com"]);
    assert_eq!(names_at(&table, "192.0.2.2", NOW), ["api.example.com"]);
}

#[test]
fn cname_chain_records_every_name_with_its_weakest_link() {
    let table = NameTable::new(100);
    let answers = [
        cname("www.example.com.", 300, "edge.cdn.example.net."),
        cname("edge.cdn.example.net.", 20, "a1.cdn.example.net."),
        a("a1.cdn.example.net.", 100, [198, 51, 100, 7]),
        Record::from_rdata(
            name("a1.cdn.example.net."),
            100,
            RData::AAAA(AAAA(Ipv6Addr::from_str("2001:db8::7").unwrap())),
        ),
    ];
    let l = learn(&table, &name("www.example.com."), &answers, NOW, KEEP);
    assert_eq!(l, Learned { ips: 2, records: 6 });
    let all = ["a1.cdn.example.net", "edge.cdn.example.net", "www.example.com"];
    assert_eq!(names_at(&table, "198.51.100.7", NOW), all);
    assert_eq!(names_at(&table, "2001:db8::7", NOW), all);
    // www and edge go through the 20 s link; a1 itself lives 100 s.
    assert_eq!(names_at(&table, "198.51.100.7", after(21)), ["a1.cdn.example.net"]);
    assert!(names_at(&table, "198.51.100.7", after(101)).is_empty());
}

#[test]
fn records_outside_the_chain_are_ignored() {
    let table = NameTable::new(100);
    let answers = [
        cname("www.example.com.", 60, "target.example.com."),
        a("target.example.com.", 60, [192, 0, 2, 10]),
        // Out-of-chain addresses (a lying or sloppy upstream) teach nothing.
        a("bank.example.org.", 60, [192, 0, 2, 66]),
        a("www.example.com.", 60, [192, 0, 2, 67]),
        Record::from_rdata(name("target.example.com."), 60, RData::TXT(TXT::new(vec!["x".into()]))),
    ];
    let l = learn(&table, &name("www.example.com."), &answers, NOW, KEEP);
    assert_eq!(l.ips, 1);
    assert!(table.names("192.0.2.66".parse().unwrap(), NOW).is_empty());
    assert!(table.names("192.0.2.67".parse().unwrap(), NOW).is_empty());
}

#[test]
fn cname_loops_and_long_chains_end() {
    let table = NameTable::new(100);
    let answers = [cname("a.example.", 60, "b.example."), cname("b.example.", 60, "a.example.")];
    assert_eq!(learn(&table, &name("a.example."), &answers, NOW, KEEP), Learned::default());

    let mut long: Vec<Record> =
        (0..40).map(|i| cname(&format!("n{i}.example."), 60, &format!("n{}.example.", i + 1))).collect();
    long.push(a("n40.example.", 60, [192, 0, 2, 40]));
    // The chain is cut before it reaches the address: nothing learned, no panic.
    assert_eq!(learn(&table, &name("n0.example."), &long, NOW, KEEP), Learned::default());
}

#[test]
fn names_sharing_an_ip_accumulate() {
    let table = NameTable::new(100);
    for host in ["one.example.", "two.example.", "three.example."] {
        learn(&table, &name(host), &[a(host, 60, [203, 0, 113, 5])], NOW, KEEP);
    }
    assert_eq!(names_at(&table, "203.0.113.5", NOW), ["one.example", "three.example", "two.example"]);
}

#[test]
fn policy_retention_applies() {
    let table = NameTable::new(100);
    let keep = Retention { min_ttl: Duration::from_secs(30), grace: Duration::from_secs(10) };
    learn(&table, &name("short.example."), &[a("short.example.", 1, [192, 0, 2, 9])], NOW, keep);
    assert_eq!(names_at(&table, "192.0.2.9", after(39)), ["short.example"]);
    assert!(names_at(&table, "192.0.2.9", after(41)).is_empty());
}

#[test]
fn ttls_with_the_top_bit_set_are_zero_and_the_rest_are_capped_at_a_day() {
    let table = NameTable::new(100);
    learn(&table, &name("neg.example."), &[a("neg.example.", 0x8000_0000 | 3_600, [192, 0, 2, 1])], NOW, KEEP);
    assert!(names_at(&table, "192.0.2.1", after(1)).is_empty(), "RFC 2181 §8: read as 0");

    learn(&table, &name("huge.example."), &[a("huge.example.", 0x7fff_ffff, [192, 0, 2, 2])], NOW, KEEP);
    let day = u64::from(MAX_TTL);
    assert_eq!(names_at(&table, "192.0.2.2", after(day - 1)), ["huge.example"]);
    assert!(names_at(&table, "192.0.2.2", after(day + 1)).is_empty(), "capped at a day");

    // The same rules for the CNAME links of a chain.
    let answers = [cname("www.example.", u32::MAX, "cdn.example."), a("cdn.example.", 0x7fff_ffff, [192, 0, 2, 3])];
    learn(&table, &name("www.example."), &answers, NOW, KEEP);
    assert_eq!(names_at(&table, "192.0.2.3", after(1)), ["cdn.example"], "the link reads as 0: www is gone");
    let answers = [cname("www.example.", 0x7fff_ffff, "cdn.example."), a("cdn.example.", 0x7fff_ffff, [192, 0, 2, 4])];
    learn(&table, &name("www.example."), &answers, NOW, KEEP);
    assert!(names_at(&table, "192.0.2.4", after(day + 1)).is_empty());
}
