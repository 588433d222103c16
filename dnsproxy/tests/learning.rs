//! Learning: every answer's addresses are in the NameTable under every
//! name of the CNAME chain, with the policy's TTL rules, by the time the
//! client holds the answer.
#![allow(clippy::unwrap_used)]

mod common;

use std::net::IpAddr;
use std::time::Duration;

use common::{Proxy, Upstream, dig, kdig, query, shared, status, udp_exchange};
use hickory_proto::rr::RecordType;
use sluice_policy::Timestamp;

#[test]
fn answers_teach_the_table_every_name_of_the_chain() {
    let up = Upstream::start();
    let proxy = Proxy::to(up.addr, shared(None));

    dig(proxy.addr, &["www.sluice.test", "A"]);
    let chain = ["a1.cdn.sluice.test", "edge.cdn.sluice.test", "www.sluice.test"];
    assert_eq!(proxy.names("198.51.100.7"), chain);
    kdig(proxy.addr, &["+tcp", "www.sluice.test", "AAAA"]);
    assert_eq!(proxy.names("2001:db8::7"), chain);

    dig(proxy.addr, &["many.sluice.test", "A", "+bufsize=4096"]);
    for i in 1..=40 {
        assert_eq!(proxy.names(&format!("198.18.0.{i}")), ["many.sluice.test"], "198.18.0.{i}");
    }

    for name in ["one", "two", "three"] {
        dig(proxy.addr, &[&format!("{name}.sluice.test"), "A"]);
    }
    assert_eq!(proxy.names("203.0.113.99"), ["one.sluice.test", "three.sluice.test", "two.sluice.test"]);

    // Names are normalised: the client's spelling does not matter.
    dig(proxy.addr, &["API.Sluice.TEST", "A"]);
    assert_eq!(proxy.names("192.0.2.10"), ["api.sluice.test"]);

    // Nothing is learned from NXDOMAIN, NODATA or non-address answers (the
    // MX's target, api.sluice.test, may come with its address: it is not
    // learned under mx.sluice.test).
    let table = &proxy.shared.names;
    let before = (table.len(), table.pair_count());
    assert_eq!(status(&dig(proxy.addr, &["missing.sluice.test", "A"])), "NXDOMAIN");
    let nodata = dig(proxy.addr, &["one.sluice.test", "AAAA"]);
    assert_eq!((status(&nodata), nodata.contains("ANSWER: 0")), ("NOERROR".to_owned(), true), "{nodata}");
    assert_eq!(status(&dig(proxy.addr, &["mx.sluice.test", "MX"])), "NOERROR");
    assert_eq!(status(&dig(proxy.addr, &["big.sluice.test", "TXT"])), "NOERROR");
    assert_eq!((table.len(), table.pair_count()), before);
    assert_eq!(proxy.names("192.0.2.10"), ["api.sluice.test"]);
}

#[test]
fn the_table_is_updated_before_the_reply_leaves() {
    let up = Upstream::start();
    let proxy = Proxy::to(up.addr, shared(None));
    let ip: IpAddr = "192.0.2.50".parse().unwrap();
    for i in 0..200u16 {
        let name = format!("n{i}.wild.sluice.test.");
        let answer = udp_exchange(proxy.addr, &query(i, &name, RecordType::A, Some(1232)), Duration::from_secs(3));
        assert!(answer.is_some());
        // No waiting: the answer is in hand, so the table must already know.
        let now = Timestamp::now();
        let known = proxy.shared.names.names(ip, now);
        assert!(known.iter().any(|h| h.as_str() == name.trim_end_matches('.')), "{name} not yet in the table");
    }
}

const RETENTION: &str = "\
apiVersion: sluice.dev/v1alpha1
kind: EgressPolicy
metadata: {name: node}
spec:
  dns: {minTtl: 60s, grace: 5s}
";

#[test]
fn ttl_rules_of_the_policy_apply() {
    let up = Upstream::start();
    let proxy = Proxy::to(up.addr, shared(Some(RETENTION)));
    let at = |secs: u64| Timestamp::now().plus(Duration::from_secs(secs));
    let names = |ip: &str, t| proxy.shared.names.names(ip.parse().unwrap(), t);

    // short.sluice.test has a 2 s TTL: raised to minTtl (60 s), plus 5 s grace.
    dig(proxy.addr, &["short.sluice.test", "A"]);
    assert_eq!(names("192.0.2.60", at(55)).len(), 1);
    assert!(names("192.0.2.60", at(70)).is_empty());

    // The chain: www and edge live as long as the 30 s link (raised to 60 s), a1 its own 100 s.
    dig(proxy.addr, &["www.sluice.test", "A"]);
    assert_eq!(names("198.51.100.7", at(55)).len(), 3);
    let later: Vec<String> = names("198.51.100.7", at(80)).iter().map(ToString::to_string).collect();
    assert_eq!(later, ["a1.cdn.sluice.test"]);
    assert!(names("198.51.100.7", at(110)).is_empty());
}
