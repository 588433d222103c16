//! Transparent forwarding: through the proxy, `dig` and `kdig` see what
//! they see straight from the upstream — flags, TTLs, EDNS options, DNSSEC
//! records, TC on truncated UDP answers, full answers over TCP — and the
//! bytes are the upstream's apart from what re-encoding must change.
#![allow(clippy::unwrap_used)]

mod common;

use std::net::{SocketAddr, UdpSocket};
use std::time::Duration;

use common::{Proxy, Upstream, dig, flags, kdig, normalize, query, shared, status, tcp_exchange, udp_exchange};
use hickory_proto::op::Message;
use hickory_proto::rr::RecordType;

const CASES: &[(&str, &str)] = &[
    ("api.sluice.test", "A"),
    ("api.sluice.test", "AAAA"),
    ("www.sluice.test", "A"),
    ("www.sluice.test", "AAAA"),
    ("edge.cdn.sluice.test", "CNAME"),
    ("many.sluice.test", "A"),
    ("one.sluice.test", "A"),
    ("x.wild.sluice.test", "A"),
    ("mx.sluice.test", "MX"),
    ("one.sluice.test", "AAAA"),
    ("missing.sluice.test", "A"),
    ("sluice.test", "SOA"),
    ("sluice.test", "NS"),
    ("outside.example", "A"),
];

#[test]
fn dig_sees_the_upstreams_answers() {
    let up = Upstream::start();
    let proxy = Proxy::to(up.addr, shared(None));
    for (name, rtype) in CASES {
        for extra in [&[][..], &["+bufsize=4096"][..], &["+noedns"][..], &["+dnssec"][..]] {
            let mut args = vec![*name, *rtype];
            args.extend_from_slice(extra);
            let direct = dig(up.addr, &args);
            let via = dig(proxy.addr, &args);
            assert!(direct.contains("status:"), "{direct}");
            assert_eq!(normalize(&via), normalize(&direct), "{name} {rtype} {extra:?}");
        }
    }
}

#[test]
fn answers_are_the_upstreams_bytes() {
    let up = Upstream::start();
    let proxy = Proxy::to(up.addr, shared(None));
    let wait = Duration::from_secs(3);
    let types = [RecordType::A, RecordType::AAAA, RecordType::CNAME, RecordType::MX, RecordType::TXT];
    for (i, name) in
        ["api.sluice.test.", "www.sluice.test.", "many.sluice.test.", "big.sluice.test.", "nope.sluice.test."]
            .iter()
            .enumerate()
    {
        for (j, rtype) in types.iter().enumerate() {
            for payload in [None, Some(1232), Some(4096)] {
                let q = query((i * 100 + j) as u16, name, *rtype, payload);
                let direct = udp_exchange(up.addr, &q, wait).unwrap();
                let via = udp_exchange(proxy.addr, &q, wait).unwrap();
                // Both transports relay the upstream's message as it came (the client's ID restored).
                assert_eq!(via, direct, "UDP {name} {rtype} {payload:?}");
                let direct = tcp_exchange(up.addr, &q);
                assert_eq!(tcp_exchange(proxy.addr, &q), direct, "TCP {name} {rtype} {payload:?}");
            }
        }
    }
}

#[test]
fn truncated_udp_keeps_tc_and_tcp_gets_everything() {
    let up = Upstream::start();
    let proxy = Proxy::to(up.addr, shared(None));
    // 30 TXT records of 200 bytes: too big for 1232 bytes of UDP.
    let direct = dig(up.addr, &["big.sluice.test", "TXT", "+ignore", "+bufsize=1232"]);
    let via = dig(proxy.addr, &["big.sluice.test", "TXT", "+ignore", "+bufsize=1232"]);
    assert!(flags(&via).split(' ').any(|f| f == "tc"), "{via}");
    assert_eq!(normalize(&via), normalize(&direct));
    // Without EDNS, 40 A records do not fit 512 bytes either.
    let via = dig(proxy.addr, &["many.sluice.test", "A", "+ignore", "+noedns"]);
    assert!(flags(&via).split(' ').any(|f| f == "tc"), "{via}");

    // dig retries over TCP by itself; kdig asks over TCP from the start.
    let via = dig(proxy.addr, &["big.sluice.test", "TXT", "+bufsize=1232"]);
    assert_eq!(via.matches("\tTXT\t").count(), 30, "{via}");
    let direct = kdig(up.addr, &["+tcp", "big.sluice.test", "TXT"]);
    let via = kdig(proxy.addr, &["+tcp", "big.sluice.test", "TXT"]);
    assert!(via.contains("(TCP)"), "{via}");
    assert_eq!(normalize(&via), normalize(&direct));
    assert_eq!(via.matches("\tTXT\t").count(), 30, "{via}");
}

#[test]
fn flags_ttls_edns_options_and_dnssec_records_pass_through() {
    let up = Upstream::start();
    let proxy = Proxy::to(up.addr, shared(None));
    for client in ["dig", "kdig"] {
        let args = ["signed.special.test", "A", "+dnssec", "+nsid"];
        let (direct, via) = match client {
            "dig" => (dig(up.addr, &args), dig(proxy.addr, &args)),
            _ => (kdig(up.addr, &args), kdig(proxy.addr, &args)),
        };
        assert_eq!(normalize(&via), normalize(&direct), "{client}");
        assert!(via.contains("RRSIG"), "{via}");
        assert!(via.contains("1234"), "TTL kept: {via}");
        assert!(via.contains("upstream-1"), "NSID kept: {via}");
        assert!(via.contains("65001"), "unknown EDNS option kept: {via}");
    }
    let via = dig(proxy.addr, &["signed.special.test", "A", "+dnssec"]);
    assert_eq!(flags(&via), "qr rd ra ad");
    assert_eq!(status(&via), "NOERROR");

    let q = query(7, "signed.special.test.", RecordType::A, Some(1232));
    let direct = udp_exchange(up.addr, &q, Duration::from_secs(3)).unwrap();
    let via = udp_exchange(proxy.addr, &q, Duration::from_secs(3)).unwrap();
    assert_eq!(Message::from_vec(&via).unwrap(), Message::from_vec(&direct).unwrap());
}

/// A socket bound to the wildcard address answers each query from the
/// address it was sent to: a connected client (as every stub resolver is)
/// drops datagrams from any other address.
#[test]
fn a_wildcard_socket_answers_from_the_address_asked() {
    let up = Upstream::start();
    for (wildcard, asked) in [("0.0.0.0", &["127.0.0.1", "127.0.0.9", "127.31.2.3"][..]), ("::", &["::1", "127.0.0.9"])]
    {
        let proxy = Proxy::start_on(wildcard, common::config(vec![up.addr]), shared(None));
        for ip in asked {
            let server = SocketAddr::new(ip.parse().unwrap(), proxy.addr.port());
            let client = UdpSocket::bind(if server.is_ipv6() { "[::1]:0" } else { "127.0.0.1:0" }).unwrap();
            client.connect(server).unwrap();
            client.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
            client.send(&query(77, "api.sluice.test.", RecordType::A, None)).unwrap();
            let mut buf = [0u8; 512];
            let n = client.recv(&mut buf).unwrap_or_else(|e| panic!("no answer from {server} ({wildcard}): {e}"));
            assert_eq!(Message::from_vec(&buf[..n]).unwrap().answers.len(), 1, "{server}");
        }
    }
}

/// Zone transfers are refused by the proxy on both transports: it relays one
/// answer per query, and a transfer relayed that way would be cut short
/// after its first message without anyone noticing.
#[test]
fn zone_transfers_are_refused() {
    let up = Upstream::start();
    let proxy = Proxy::to(up.addr, shared(None));
    let refused = |answer: &[u8]| answer.len() >= 12 && answer[3] & 0x0f == 5;
    let axfr = query(0x4a58, "sluice.test", RecordType::AXFR, None);
    let answer = tcp_exchange(proxy.addr, &axfr);
    assert!(refused(&answer) && answer[..2] == axfr[..2], "AXFR over TCP: {answer:?}");
    let ixfr = query(0x1f58, "sluice.test", RecordType::IXFR, None);
    let answer = udp_exchange(proxy.addr, &ixfr, Duration::from_secs(2)).unwrap();
    assert!(refused(&answer) && answer[..2] == ixfr[..2], "IXFR over UDP: {answer:?}");
    // Other queries still pass.
    assert_eq!(status(&dig(proxy.addr, &["sluice.test", "SOA"])), "NOERROR");
}
