//! A flood against a dead upstream stays bounded: in-flight queries are
//! capped, the rest get SERVFAIL, and memory does not grow with the flood.
//! A test binary of its own: it measures the process's RSS, which another
//! test failing alongside (a backtrace being symbolized) would inflate.
#![allow(clippy::unwrap_used)]

mod common;

use std::net::UdpSocket;
use std::time::Duration;

use common::{Proxy, config, query, rcode, shared, silent, udp_exchange};
use hickory_proto::op::ResponseCode;
use hickory_proto::rr::RecordType;
use sluice_dnsproxy::Config;

fn rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

#[test]
fn a_flood_against_a_dead_upstream_stays_bounded() {
    let (hold, quiet) = silent();
    let config = Config { timeout: Duration::from_secs(1), max_in_flight: 64, ..config(vec![quiet]) };
    let proxy = Proxy::start(config, shared(None));
    let s = UdpSocket::bind("127.0.0.1:0").unwrap();
    let before = rss_kib();
    for i in 0..50_000u32 {
        let _ = s.send_to(&query(i as u16, &format!("n{i}.flood.test."), RecordType::A, Some(1232)), proxy.addr);
    }
    std::thread::sleep(Duration::from_millis(1_500));
    let grown = rss_kib().saturating_sub(before);
    assert!(grown < 64 * 1024, "memory grew {grown} KiB under the flood");
    // What reached the upstream: the queries the cap let in (this client's
    // share, half of 64), each tried twice (a lone upstream), not the flood.
    hold.set_nonblocking(true).unwrap();
    let mut buf = [0u8; 512];
    let mut upstream = 0;
    while hold.recv(&mut buf).is_ok() {
        upstream += 1;
    }
    assert!((1..=64).contains(&upstream), "{upstream} queries reached the upstream");
    let answer = udp_exchange(proxy.addr, &query(1, "after.flood.test.", RecordType::A, None), Duration::from_secs(3));
    assert_eq!(rcode(&answer.unwrap()), ResponseCode::ServFail);
}
