//! Bad input and bad upstreams: garbage never takes the proxy down,
//! malformed queries get FORMERR (or nothing), a dead upstream fails over to
//! the next, all dead gives SERVFAIL quickly (the flood's memory bound is in
//! `flood.rs`, a process of its own).
#![allow(clippy::unwrap_used)]

mod common;

use std::io::Write;
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::{
    Proxy, Upstream, a_record, config, dig, header, kdig, query, question_end, rcode, shared, silent, status,
    tcp_exchange, tcp_receive, tcp_send, udp_exchange,
};
use hickory_proto::op::{Message, OpCode, Query, ResponseCode};
use hickory_proto::rr::{Name, RecordType};
use sluice_dnsproxy::Config;

/// Deterministic junk.
fn junk(len: usize, seed: u32) -> Vec<u8> {
    let mut x = seed.wrapping_mul(2_654_435_761).max(1);
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as u8
        })
        .collect()
}

#[test]
fn garbage_never_takes_the_proxy_down() {
    let up = Upstream::start();
    let proxy = Proxy::to(up.addr, shared(None));
    let s = UdpSocket::bind("127.0.0.1:0").unwrap();
    for (i, len) in [0, 1, 11, 12, 13, 40, 100, 512, 1500, 4096, 9000, 65_000].into_iter().enumerate() {
        for seed in 0..20 {
            let mut bytes = junk(len, seed * 31 + i as u32);
            if let Some(b) = bytes.get_mut(2) {
                *b &= 0x7f; // a "query", so it is parsed further
            }
            s.send_to(&bytes, proxy.addr).unwrap();
        }
    }
    for seed in 0..20 {
        let mut tcp = TcpStream::connect(proxy.addr).unwrap();
        let mut frame = vec![0x01, 0x2c]; // promises 300 bytes...
        frame.extend(junk(10 + seed, seed as u32)); // ...sends fewer, then goes away
        let _ = tcp.write_all(&frame);
        let mut tcp = TcpStream::connect(proxy.addr).unwrap();
        let body = junk(200, seed as u32 + 99);
        let _ = tcp.write_all(&[&[0, 200][..], &body].concat());
    }

    // A header that promises a question it does not carry: FORMERR, same id.
    let truncated = [0xab, 0xcd, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0, 3, b'a', b'b'];
    let answer = udp_exchange(proxy.addr, &truncated, Duration::from_secs(3)).unwrap();
    assert_eq!(answer[..2], [0xab, 0xcd]);
    assert_eq!(answer[3] & 0x0f, 1, "FORMERR");

    // Two questions: FORMERR. Another opcode: NOTIMP.
    let mut two = Message::query();
    two.metadata.id = 9;
    two.add_query(Query::query(Name::from_ascii("api.sluice.test.").unwrap(), RecordType::A));
    two.add_query(Query::query(Name::from_ascii("www.sluice.test.").unwrap(), RecordType::A));
    let answer = udp_exchange(proxy.addr, &two.to_vec().unwrap(), Duration::from_secs(3)).unwrap();
    assert_eq!(rcode(&answer), ResponseCode::FormErr);
    let mut notify = Message::query();
    notify.metadata.op_code = OpCode::Notify;
    notify.add_query(Query::query(Name::from_ascii("sluice.test.").unwrap(), RecordType::SOA));
    let answer = udp_exchange(proxy.addr, &notify.to_vec().unwrap(), Duration::from_secs(3)).unwrap();
    assert_eq!(rcode(&answer), ResponseCode::NotImp);

    // Still answering, on both transports.
    assert_eq!(status(&dig(proxy.addr, &["api.sluice.test", "A"])), "NOERROR");
    assert!(kdig(proxy.addr, &["+tcp", "api.sluice.test", "A"]).contains("status: NOERROR"));
}

/// A port nobody listens on: ICMP port unreachable, connection refused.
fn refused() -> SocketAddr {
    UdpSocket::bind("127.0.0.1:0").unwrap().local_addr().unwrap()
}

/// One UDP query for `name` (A) through `proxy`, timed in-process (a `dig`
/// process's start would be in the figure): its RCODE and how long it took.
fn timed(proxy: SocketAddr, name: &str) -> (ResponseCode, Duration) {
    let t = Instant::now();
    let answer = udp_exchange(proxy, &query(0x7157, name, RecordType::A, None), Duration::from_secs(5));
    (rcode(&answer.expect("an answer")), t.elapsed())
}

#[test]
fn failover_to_the_next_upstream_and_servfail_when_all_fail() {
    let up = Upstream::start();
    let (_hold, quiet) = silent();
    let timeout = Duration::from_millis(300);

    let proxy = Proxy::start(Config { timeout, ..config(vec![quiet, up.addr]) }, shared(None));
    assert_eq!(status(&dig(proxy.addr, &["api.sluice.test", "A"])), "NOERROR");
    let (code, took) = timed(proxy.addr, "api.sluice.test.");
    assert_eq!(code, ResponseCode::NoError);
    // The upstream that answered is tried first from now on.
    assert!(took < timeout, "{took:?}");
    let proxy = Proxy::start(Config { timeout, ..config(vec![quiet, up.addr]) }, shared(None));
    let (code, took) = timed(proxy.addr, "www.sluice.test.");
    assert_eq!(code, ResponseCode::NoError);
    assert!(took >= timeout && took < Duration::from_secs(2), "the first query waits one timeout: {took:?}");

    let proxy = Proxy::start(Config { timeout, ..config(vec![refused(), up.addr]) }, shared(None));
    let (code, took) = timed(proxy.addr, "api.sluice.test.");
    assert_eq!(code, ResponseCode::NoError);
    assert!(took < timeout, "a refused upstream fails over at once: {took:?}");
    assert!(kdig(proxy.addr, &["+tcp", "api.sluice.test", "A"]).contains("status: NOERROR"));

    let proxy = Proxy::start(Config { timeout, ..config(vec![quiet, refused()]) }, shared(None));
    let (code, took) = timed(proxy.addr, "api.sluice.test.");
    assert_eq!(code, ResponseCode::ServFail);
    assert!(took < Duration::from_millis(1_000), "{took:?}");
    assert!(kdig(proxy.addr, &["+tcp", "api.sluice.test", "A"]).contains("status: SERVFAIL"));
}

/// With a single upstream, a query whose datagram is lost is sent again
/// after the timeout instead of becoming a SERVFAIL.
#[test]
fn a_lone_upstream_gets_a_second_try() {
    let seen = Arc::new(AtomicUsize::new(0));
    let count = seen.clone();
    let up = Scripted::start(move |q| {
        if count.fetch_add(1, Ordering::SeqCst) == 0 {
            return Vec::new(); // the first datagram is lost
        }
        vec![[header(q, 0, 1, 1), q[12..].to_vec(), a_record([192, 0, 2, 9])].concat()]
    });
    let timeout = Duration::from_millis(300);
    let proxy = Proxy::start(Config { timeout, ..config(vec![up.addr]) }, shared(None));
    let asked = query(0x5151, "lossy.sluice.test.", RecordType::A, None);
    let got = udp_exchange(proxy.addr, &asked, Duration::from_secs(3)).unwrap();
    assert_eq!(got[3] & 0x0f, 0, "NOERROR on the second try, not SERVFAIL");
    assert_eq!(seen.load(Ordering::SeqCst), 2);
    assert_eq!(proxy.names("192.0.2.9"), ["lossy.sluice.test"]);
}

/// An upstream that stopped answering is skipped once three attempts in a
/// row failed: its queries get SERVFAIL at once, not after two timeouts;
/// one query every 500 ms probes it, and its first answer brings it back.
#[test]
fn a_dead_upstream_is_skipped_until_a_probe_answers() {
    let alive = Arc::new(AtomicBool::new(false));
    let seen = Arc::new(AtomicUsize::new(0));
    let (answering, count) = (alive.clone(), seen.clone());
    let up = Scripted::start(move |q| {
        count.fetch_add(1, Ordering::SeqCst);
        if !answering.load(Ordering::SeqCst) {
            return Vec::new();
        }
        vec![[header(q, 0, 1, 1), q[12..].to_vec(), a_record([192, 0, 2, 7])].concat()]
    });
    let timeout = Duration::from_millis(300);
    let proxy = Proxy::start(Config { timeout, ..config(vec![up.addr]) }, shared(None));
    let ask = |id: u16| {
        let t = Instant::now();
        let asked = query(id, "back.sluice.test.", RecordType::A, None);
        let answer = udp_exchange(proxy.addr, &asked, Duration::from_secs(3)).expect("an answer");
        (rcode(&answer), t.elapsed())
    };

    // A lone upstream gets two tries: two failures; the third takes it down
    // and the second query does not wait for a second timeout.
    let (code, took) = ask(1);
    assert_eq!(code, ResponseCode::ServFail);
    assert!(took >= 2 * timeout, "two tries: {took:?}");
    let (code, took) = ask(2);
    assert_eq!(code, ResponseCode::ServFail);
    assert!(took >= timeout && took < 2 * timeout, "one try, then down: {took:?}");

    // Down: SERVFAIL at once, and the upstream hears nothing but probes (a
    // probe waits its timeout, so the slow answers bound what it heard).
    let before = seen.load(Ordering::SeqCst);
    let mut fast = 0;
    for id in 10..30 {
        let (code, took) = ask(id);
        assert_eq!(code, ResponseCode::ServFail);
        fast += usize::from(took < Duration::from_millis(100));
    }
    let heard = seen.load(Ordering::SeqCst) - before;
    assert!(fast >= 15, "{fast} of 20 queries got SERVFAIL at once");
    assert!(heard <= 2 * (20 - fast), "the down upstream heard {heard} queries");

    // It answers again: the next probe (within 500 ms) brings it back.
    alive.store(true, Ordering::SeqCst);
    std::thread::sleep(Duration::from_millis(600));
    let (code, _) = ask(100);
    assert_eq!(code, ResponseCode::NoError, "the probe is answered");
    for id in 101..106 {
        let (code, took) = ask(id);
        assert_eq!(code, ResponseCode::NoError);
        assert!(took < timeout, "{took:?}");
    }
    assert_eq!(proxy.names("192.0.2.7"), ["back.sluice.test"]);
}

/// An upstream that answers every query with 192.0.2.8, but those whose
/// bytes hold `word`: it never answers them.
fn answering_but(word: &'static [u8]) -> Scripted {
    Scripted::start(move |q| {
        if q.windows(word.len()).any(|w| w == word) {
            return Vec::new();
        }
        vec![[header(q, 0, 1, 1), q[12..].to_vec(), a_record([192, 0, 2, 8])].concat()]
    })
}

/// An upstream that answers, but not some names (a pod's own slow zone, a
/// domain whose servers are dead), is not taken down by their timeouts:
/// many of them at once, while it answers the rest, and the node's other
/// lookups still go to it and are answered.
#[test]
fn slow_names_do_not_take_a_live_upstream_down() {
    let up = answering_but(b"slow");
    let timeout = Duration::from_millis(300);
    let proxy = Proxy::start(Config { timeout, ..config(vec![up.addr]) }, shared(None));
    let addr = proxy.addr;
    for round in 0..3u16 {
        // Eight slow lookups at once, and a fast one alongside, three rounds over.
        let slow: Vec<_> = (0..8u16)
            .map(|i| {
                std::thread::spawn(move || {
                    let asked = query(0x5000 + round * 16 + i, &format!("n{i}.slow.sluice.test."), RecordType::A, None);
                    udp_exchange(addr, &asked, Duration::from_secs(3)).map(|a| rcode(&a))
                })
            })
            .collect();
        let asked = query(0x6000 + round, "fine.sluice.test.", RecordType::A, None);
        let answer = udp_exchange(addr, &asked, Duration::from_secs(3)).expect("an answer");
        assert_eq!(rcode(&answer), ResponseCode::NoError, "round {round}");
        for t in slow {
            assert_eq!(t.join().unwrap().unwrap(), ResponseCode::ServFail, "round {round}: the slow name times out");
        }
    }
    // After 48 timeouts, the upstream is still in use: answered at once, not SERVFAIL.
    let t = Instant::now();
    let answer = udp_exchange(addr, &query(0x7000, "after.sluice.test.", RecordType::A, None), Duration::from_secs(3));
    assert_eq!(rcode(&answer.expect("an answer")), ResponseCode::NoError);
    assert!(t.elapsed() < timeout, "{:?}", t.elapsed());
}

/// Over TCP too: one client's pipelined queries (on any number of
/// connections) hold at most half of the in-flight cap; past it, SERVFAIL
/// at once, and another client is still answered.
#[test]
fn over_tcp_one_client_cannot_take_every_in_flight_slot() {
    let up = answering_but(b"stuck");
    let timeout = Duration::from_millis(500);
    let proxy = Proxy::start(Config { timeout, max_in_flight: 8, ..config(vec![up.addr]) }, shared(None));
    let from = |ip: &str| {
        let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        s.bind(&format!("{ip}:0").parse::<SocketAddr>().unwrap().into()).unwrap();
        s.connect(&proxy.addr.into()).unwrap();
        let s: TcpStream = s.into();
        s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
        s
    };
    let mut flooder = from("127.0.0.2");
    for id in 0..10 {
        tcp_send(&mut flooder, &query(id, &format!("s{id}.stuck.test."), RecordType::A, None));
    }
    let t = Instant::now();
    for _ in 0..6 {
        let answer = tcp_receive(&mut flooder).unwrap();
        assert_eq!(rcode(&answer), ResponseCode::ServFail);
    }
    assert!(t.elapsed() < timeout, "past its share (4 of 8): SERVFAIL at once, took {:?}", t.elapsed());
    let mut other = from("127.0.0.3");
    tcp_send(&mut other, &query(1, "fine.sluice.test.", RecordType::A, None));
    assert_eq!(rcode(&tcp_receive(&mut other).unwrap()), ResponseCode::NoError, "another client is answered");
}

/// A question name ending in a compression pointer (into the header: a
/// root label read from the question count's high byte) is FORMERR. It went
/// upstream; the answer's question, written out, matched no bytes sent, so
/// over TCP each such query counted against the upstream's health, and three
/// marked it down for every client on the node.
#[test]
fn a_compressed_question_name_is_formerr_and_leaves_the_upstream_up() {
    // Like CoreDNS or BIND (hickory's server echoes the question's bytes):
    // the question written out, the name in full.
    let up = Scripted::start(|q| {
        let mut answer = query(u16::from_be_bytes([q[0], q[1]]), "api.sluice.test.", RecordType::A, None);
        answer[2] |= 0x80;
        vec![answer]
    });
    let proxy = Proxy::to(up.addr, shared(None));
    let mut pointer = query(7, "api.sluice.test.", RecordType::A, None);
    let end = pointer.len() - 4;
    pointer.splice(end - 1..end, [0xc0, 0x04]);
    for id in 0..6u16 {
        pointer[..2].copy_from_slice(&id.to_be_bytes());
        let answer = tcp_exchange(proxy.addr, &pointer);
        assert_eq!((rcode(&answer), &answer[..2]), (ResponseCode::FormErr, &id.to_be_bytes()[..]), "over TCP");
        let answer = udp_exchange(proxy.addr, &pointer, Duration::from_secs(3)).unwrap();
        assert_eq!(rcode(&answer), ResponseCode::FormErr, "over UDP");
    }
    let answer = tcp_exchange(proxy.addr, &query(9, "api.sluice.test.", RecordType::A, None));
    assert_eq!(rcode(&answer), ResponseCode::NoError, "the upstream is still up");
}

/// Over TCP too: an upstream that accepts connections but never answers
/// is skipped after three timeouts in a row.
#[test]
fn over_tcp_a_dead_upstream_is_skipped_too() {
    let held = std::net::TcpListener::bind("127.0.0.1:0").unwrap(); // never accepts: the kernel does
    let timeout = Duration::from_millis(300);
    let proxy = Proxy::start(Config { timeout, ..config(vec![held.local_addr().unwrap()]) }, shared(None));
    let ask = |id: u16| {
        let t = Instant::now();
        let answer = tcp_exchange(proxy.addr, &query(id, "api.sluice.test.", RecordType::A, None));
        (rcode(&answer), t.elapsed())
    };
    for id in 0..3 {
        let (code, took) = ask(id);
        assert_eq!(code, ResponseCode::ServFail);
        assert!(took >= timeout, "attempt {id} waits its timeout: {took:?}");
    }
    for id in 3..8 {
        let (code, took) = ask(id);
        assert_eq!(code, ResponseCode::ServFail);
        assert!(took < timeout, "down: SERVFAIL at once, not after the timeout: took {took:?}");
    }
}

#[test]
fn the_in_flight_cap_answers_servfail_at_once() {
    let (_hold, quiet) = silent();
    let config = Config { timeout: Duration::from_secs(2), max_in_flight: 4, ..config(vec![quiet]) };
    let proxy = Proxy::start(config, shared(None));
    // Two clients, two queries each (each its share of the cap: half).
    let waiting: Vec<UdpSocket> = ["127.0.0.2", "127.0.0.3"]
        .into_iter()
        .flat_map(|ip| [ip, ip])
        .enumerate()
        .map(|(i, ip)| {
            let s = UdpSocket::bind((ip, 0)).unwrap();
            s.send_to(&query(i as u16, "api.sluice.test.", RecordType::A, None), proxy.addr).unwrap();
            s
        })
        .collect();
    std::thread::sleep(Duration::from_millis(100));
    let t = Instant::now();
    let answer = udp_exchange(proxy.addr, &query(3, "api.sluice.test.", RecordType::A, None), Duration::from_secs(1));
    assert_eq!(rcode(&answer.unwrap()), ResponseCode::ServFail);
    assert!(t.elapsed() < Duration::from_millis(500));
    for s in waiting {
        s.set_read_timeout(Some(Duration::from_secs(6))).unwrap();
        let mut buf = [0u8; 512];
        let n = s.recv(&mut buf).unwrap();
        assert_eq!(rcode(&buf[..n]), ResponseCode::ServFail);
    }
}

/// One client address may hold at most half of the in-flight cap: a client
/// that floods a slow upstream gets SERVFAIL for the rest, and the node's
/// other apps are still answered. Its share is given back as its queries end.
#[test]
fn one_client_cannot_take_every_in_flight_slot() {
    let up = answering_but(b"stuck");
    let timeout = Duration::from_millis(300);
    let proxy = Proxy::start(Config { timeout, max_in_flight: 8, ..config(vec![up.addr]) }, shared(None));

    let flooder = UdpSocket::bind("127.0.0.2:0").unwrap();
    flooder.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    for id in 0..10 {
        flooder.send_to(&query(id, &format!("s{id}.stuck.test."), RecordType::A, None), proxy.addr).unwrap();
    }
    let t = Instant::now();
    let mut buf = [0u8; 512];
    for _ in 0..6 {
        let n = flooder.recv(&mut buf).unwrap();
        assert_eq!(rcode(&buf[..n]), ResponseCode::ServFail);
    }
    assert!(t.elapsed() < timeout, "past its share (4 of 8): SERVFAIL at once, took {:?}", t.elapsed());

    // Another app, while the flooder holds its share: answered.
    let other = UdpSocket::bind("127.0.0.3:0").unwrap();
    other.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    other.send_to(&query(1, "fine.sluice.test.", RecordType::A, None), proxy.addr).unwrap();
    let n = other.recv(&mut buf).unwrap();
    assert_eq!(rcode(&buf[..n]), ResponseCode::NoError);

    // The flooder's four held queries end (SERVFAIL after their timeout)...
    for _ in 0..4 {
        let n = flooder.recv(&mut buf).unwrap();
        assert_eq!(rcode(&buf[..n]), ResponseCode::ServFail);
    }
    // ...and give its share back. (Four timeouts together count as one
    // failure of the upstream, which answered the other app meanwhile.)
    std::thread::sleep(Duration::from_millis(600));
    // Answered queries give it back too: more in a row than its share.
    for id in 100..106 {
        flooder.send_to(&query(id, "fine.sluice.test.", RecordType::A, None), proxy.addr).unwrap();
        let n = flooder.recv(&mut buf).unwrap();
        assert_eq!(rcode(&buf[..n]), ResponseCode::NoError, "query {id}");
    }
}

/// One client holds at most 4 queries upstream that ask one question
/// spelled differently (each under an ID a forger could hit); more get
/// SERVFAIL at once. Copies spelled the same join the one in flight instead,
/// and are not limited so.
#[test]
fn one_client_holds_few_copies_of_one_question_in_flight() {
    let up = answering_but(b"stuck");
    let timeout = Duration::from_millis(300);
    let proxy = Proxy::start(Config { timeout, ..config(vec![up.addr]) }, shared(None));
    let client = UdpSocket::bind("127.0.0.4:0").unwrap();
    client.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    let spelled = |id: u16| {
        let mut q = query(id, "copy.stuck.test.", RecordType::A, None);
        for (bit, i) in (13..17).enumerate() {
            if id >> bit & 1 == 1 {
                q[i] = q[i].to_ascii_uppercase(); // "copy" in the case the ID's bits say
            }
        }
        q
    };
    for id in 0..10 {
        client.send_to(&spelled(id), proxy.addr).unwrap();
    }
    let t = Instant::now();
    let mut buf = [0u8; 512];
    for _ in 0..6 {
        let n = client.recv(&mut buf).unwrap();
        assert_eq!(rcode(&buf[..n]), ResponseCode::ServFail);
        assert!(u16::from_be_bytes([buf[0], buf[1]]) >= 4, "a copy past the fourth");
    }
    assert!(t.elapsed() < timeout, "past 4 copies: SERVFAIL at once, took {:?}", t.elapsed());
    for _ in 0..4 {
        let n = client.recv(&mut buf).unwrap(); // the four upstream, after their timeouts
        assert_eq!(rcode(&buf[..n]), ResponseCode::ServFail);
    }
    // Ten of one spelling: one upstream query, nine joined, none refused at once.
    for id in 20..30 {
        client.send_to(&query(id, "same.stuck.test.", RecordType::A, None), proxy.addr).unwrap();
    }
    let t = Instant::now();
    for _ in 0..10 {
        let n = client.recv(&mut buf).unwrap();
        assert_eq!(rcode(&buf[..n]), ResponseCode::ServFail);
    }
    assert!(t.elapsed() >= timeout, "joined copies wait for the one upstream, took {:?}", t.elapsed());
}

/// The UDP path's threads sleep in blocking receives; stopping the proxy
/// wakes and ends them, so when `stop` returns its port is free again.
#[test]
fn stopping_ends_the_receiving_threads_and_frees_the_port() {
    let up = Upstream::start();
    let proxy = Proxy::to(up.addr, shared(None));
    let addr = proxy.addr;
    assert_eq!(status(&dig(addr, &["api.sluice.test", "A"])), "NOERROR");
    let t = Instant::now();
    proxy.stop().unwrap();
    assert!(t.elapsed() < Duration::from_secs(5), "stopping took {:?}", t.elapsed());
    UdpSocket::bind(addr).expect("the proxy's UDP port is free once it stopped");
}

/// A query in flight when the proxy is told to stop still gets its answer:
/// the client sockets stop taking queries, the upstream ones stay until the
/// answers are in (before, every receiving thread stopped at once, and the
/// client waited out its own timeout).
#[test]
fn a_query_in_flight_at_stop_is_answered() {
    let up = Scripted::start(|q| {
        std::thread::sleep(Duration::from_millis(500));
        let mut answer = q.to_vec();
        answer[2] |= 0x80;
        vec![answer]
    });
    let proxy = Proxy::to(up.addr, shared(None));
    let addr = proxy.addr;
    let client = UdpSocket::bind("127.0.0.1:0").unwrap();
    client.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    client.send_to(&query(7, "api.sluice.test.", RecordType::A, None), addr).unwrap();
    std::thread::sleep(Duration::from_millis(100));
    let t = Instant::now();
    let stopping = std::thread::spawn(move || proxy.stop());
    let mut buf = [0u8; 512];
    let n = client.recv(&mut buf).expect("the answer to the query in flight");
    assert_eq!((rcode(&buf[..n]), &buf[..2]), (ResponseCode::NoError, &[0u8, 7][..]));
    stopping.join().unwrap().unwrap();
    assert!(t.elapsed() < Duration::from_secs(3), "the stop waited for it, not for its grace: {:?}", t.elapsed());
    // Stopped: nothing answers on the port any more.
    client.send_to(&query(8, "api.sluice.test.", RecordType::A, None), addr).unwrap();
    client.set_read_timeout(Some(Duration::from_millis(800))).unwrap();
    assert!(client.recv(&mut buf).is_err(), "answered after the stop");
}

/// An upstream that sends, for each query, the datagrams `script` makes of
/// it: what no real server sends. Stopped on drop.
struct Scripted {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Scripted {
    fn start(script: impl Fn(&[u8]) -> Vec<Vec<u8>> + Send + Sync + 'static) -> Scripted {
        let (s, listener) = common::bind_pair("127.0.0.1");
        s.set_nonblocking(false).unwrap();
        listener.set_nonblocking(false).unwrap();
        s.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
        let addr = s.local_addr().unwrap();
        let script = Arc::new(script);
        // The same script over TCP on the same port (left running when the
        // test ends: it only ever answers the proxy).
        {
            let script = Arc::clone(&script);
            std::thread::spawn(move || {
                for mut stream in listener.incoming().flatten() {
                    let script = Arc::clone(&script);
                    std::thread::spawn(move || {
                        while let Ok(q) = tcp_receive(&mut stream) {
                            for answer in script(&q) {
                                tcp_send(&mut stream, &answer);
                            }
                        }
                    });
                }
            });
        }
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut buf = [0u8; 4_096];
            while !stopped.load(Ordering::Relaxed) {
                let Ok((n, from)) = s.recv_from(&mut buf) else { continue };
                for datagram in script(&buf[..n]) {
                    s.send_to(&datagram, from).unwrap();
                }
            }
        });
        Scripted { addr, stop, thread: Some(thread) }
    }
}

impl Drop for Scripted {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Answers that are not the query's are ignored (and a forged address is not
/// learned); a NOERROR answer hickory cannot parse reaches the client as it
/// came, not as SERVFAIL; a rejection may come without its question.
#[test]
fn forged_answers_are_ignored_and_an_unparseable_one_is_relayed() {
    let up = Scripted::start(|q| {
        let question = &q[12..]; // the test's queries carry no EDNS
        let forged_name = query(0, "evil.sluice.test.", RecordType::A, None);
        let forged = [header(q, 0, 1, 1), forged_name[12..].to_vec(), a_record([192, 0, 2, 66])].concat();
        let questionless = header(q, 0, 0, 0);
        if question.windows(6).any(|w| w == b"refuse") {
            return vec![questionless, header(q, 5, 0, 0)];
        }
        // A pointer past the end as the record's owner: hickory cannot read it.
        let bad = [0xc0, 0xff, 0, 1, 0, 1, 0, 0, 0, 60, 0, 4, 192, 0, 2, 77];
        let unparseable = [header(q, 0, 1, 1), question.to_vec(), bad.to_vec()].concat();
        vec![forged, questionless, unparseable]
    });
    let proxy = Proxy::to(up.addr, shared(None));

    let asked = query(0x4242, "bad.sluice.test.", RecordType::A, None);
    let got = udp_exchange(proxy.addr, &asked, Duration::from_secs(3)).unwrap();
    assert_eq!(got[..2], [0x42, 0x42]);
    assert_eq!(got[3] & 0x0f, 0, "NOERROR, not SERVFAIL");
    assert_eq!(got[12..], [&asked[12..], &[0xc0, 0xff, 0, 1, 0, 1, 0, 0, 0, 60, 0, 4, 192, 0, 2, 77][..]].concat());
    assert!(Message::from_vec(&got).is_err(), "the upstream's bytes, unparseable as they came");
    assert!(proxy.names("192.0.2.66").is_empty(), "the forged answer taught nothing");

    let asked = query(0x4343, "refuse.sluice.test.", RecordType::A, None);
    let got = udp_exchange(proxy.addr, &asked, Duration::from_secs(3)).unwrap();
    assert_eq!(got, [&[0x43, 0x43][..], &header(&asked, 5, 0, 0)[2..]].concat(), "REFUSED, question and all dropped");
}

/// Over TCP too, a NOERROR answer hickory cannot parse reaches the client
/// as it came, not as SERVFAIL, and teaches nothing.
#[test]
fn an_unparseable_answer_over_tcp_is_relayed_too() {
    // Nothing answers UDP at this address: the query goes over TCP, as after a truncated answer.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let bad = [0xc0, 0xff, 0, 1, 0, 1, 0, 0, 0, 60, 0, 4, 192, 0, 2, 77];
    let upstream = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        let q = tcp_receive(&mut s).unwrap();
        tcp_send(&mut s, &[header(&q, 0, 1, 1), q[12..].to_vec(), bad.to_vec()].concat());
    });
    let proxy = Proxy::to(addr, shared(None));

    let asked = query(0x4444, "bad.sluice.test.", RecordType::A, None);
    let got = tcp_exchange(proxy.addr, &asked);
    assert_eq!(got[..2], [0x44, 0x44]);
    assert_eq!(got[3] & 0x0f, 0, "NOERROR, not SERVFAIL");
    assert_eq!(got[12..], [&asked[12..], &bad[..]].concat());
    assert!(Message::from_vec(&got).is_err(), "the upstream's bytes, unparseable as they came");
    assert!(proxy.names("192.0.2.77").is_empty());
    upstream.join().unwrap();
}

/// An upstream that answers SERVFAIL (a broken cache) or REFUSED (an ACL)
/// does not answer for the others: the query moves on to the next
/// upstream, as a stub resolver with two nameservers would; when every
/// upstream rejects it, the last rejection is relayed as it came. Both
/// transports.
#[test]
fn servfail_and_refused_answers_move_on_to_the_next_upstream() {
    let rejecting = |code: u8| Scripted::start(move |q| vec![[header(q, code, 1, 0), q[12..].to_vec()].concat()]);
    let (servfail, refusing) = (rejecting(2), rejecting(5));
    let up = Upstream::start();
    for first in [&servfail, &refusing] {
        let proxy = Proxy::start(config(vec![first.addr, up.addr]), shared(None));
        for id in [1, 2] {
            let asked = query(id, "api.sluice.test.", RecordType::A, None);
            let got = udp_exchange(proxy.addr, &asked, Duration::from_secs(3)).expect("an answer");
            assert_eq!((rcode(&got), got[..2] == asked[..2]), (ResponseCode::NoError, true), "UDP, query {id}");
            let got = tcp_exchange(proxy.addr, &asked);
            assert_eq!((rcode(&got), got[..2] == asked[..2]), (ResponseCode::NoError, true), "TCP, query {id}");
        }
        assert_eq!(proxy.names("192.0.2.10"), ["api.sluice.test"]);
    }
    let proxy = Proxy::start(config(vec![servfail.addr, refusing.addr]), shared(None));
    let asked = query(7, "api.sluice.test.", RecordType::A, None);
    let got = udp_exchange(proxy.addr, &asked, Duration::from_secs(3)).expect("an answer");
    assert_eq!((rcode(&got), &got[..2]), (ResponseCode::Refused, &asked[..2]), "the last upstream's rejection");
    assert_eq!(rcode(&tcp_exchange(proxy.addr, &asked)), ResponseCode::Refused);
    // A lone upstream's SERVFAIL is its answer: asked once, relayed.
    let proxy = Proxy::start(config(vec![servfail.addr]), shared(None));
    let got = udp_exchange(proxy.addr, &asked, Duration::from_secs(3)).expect("an answer");
    assert_eq!(rcode(&got), ResponseCode::ServFail);
}

/// An upstream that answers after the timeout, while the query is on at the
/// next upstream, still answers it: a slow recursive lookup (cold cache)
/// is not thrown away for a next upstream that may be as slow, or silent.
#[test]
fn a_late_answer_from_an_earlier_upstream_is_taken() {
    // Slow for the first query (a cold cache), quick after it.
    let cold = AtomicBool::new(true);
    let slow = Scripted::start(move |q| {
        if cold.swap(false, Ordering::Relaxed) {
            std::thread::sleep(Duration::from_millis(450));
        }
        vec![[header(q, 0, 1, 1), q[12..].to_vec(), a_record([192, 0, 2, 45])].concat()]
    });
    let (hold, quiet) = silent();
    hold.set_nonblocking(true).unwrap();
    let timeout = Duration::from_millis(300);
    let proxy = Proxy::start(Config { timeout, ..config(vec![slow.addr, quiet]) }, shared(None));
    let asked = query(0x4545, "slow.sluice.test.", RecordType::A, None);
    let t = Instant::now();
    let got = udp_exchange(proxy.addr, &asked, Duration::from_secs(3)).expect("an answer");
    let took = t.elapsed();
    assert_eq!((rcode(&got), &got[..2]), (ResponseCode::NoError, &asked[..2]), "after {took:?}");
    assert!(took < Duration::from_secs(2), "the late answer, not a SERVFAIL after both timeouts: {took:?}");
    assert_eq!(proxy.names("192.0.2.45"), ["slow.sluice.test"]);
    // The slow upstream answered, so it is the one asked first next time: the
    // silent one hears nothing of the next query before its timeout.
    let mut buf = [0u8; 512];
    while hold.recv(&mut buf).is_ok() {} // the first query's attempt
    let client = UdpSocket::bind("127.0.0.1:0").unwrap();
    client.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    client.send_to(&query(0x4546, "slow.sluice.test.", RecordType::A, None), proxy.addr).unwrap();
    let n = client.recv(&mut buf).unwrap();
    assert_eq!(rcode(&buf[..n]), ResponseCode::NoError);
    assert!(hold.recv(&mut buf).is_err(), "the next query went to the silent upstream first");
}

/// Queries that ask what a query in flight asks (its bytes but the ID: the
/// name spelled the same) join it: the upstream hears one query, and every
/// client gets the answer under its own ID. Another spelling (a 0x20
/// client) is a query of its own, as is one with other options (here
/// EDNS). A client's retransmission of a query in flight gets no second
/// answer. The rejection a joined query ends with reaches every asker too.
/// An answer whose name is not spelled as it was sent upstream goes back as
/// it came.
#[test]
fn the_same_question_asked_while_in_flight_goes_upstream_once() {
    let asked = Arc::new(std::sync::Mutex::new(Vec::<Vec<u8>>::new()));
    let heard = Arc::clone(&asked);
    // The upstream holds its first answer until every query has been sent.
    let open = Arc::new(AtomicBool::new(false));
    let opened = Arc::clone(&open);
    let up = Scripted::start(move |q| {
        heard.lock().unwrap().push(q.to_vec());
        let t = Instant::now();
        while !opened.load(Ordering::Relaxed) && t.elapsed() < Duration::from_secs(3) {
            std::thread::sleep(Duration::from_millis(5));
        }
        let end = question_end(q);
        let mut question = q[12..end].to_vec();
        let code = if question.eq_ignore_ascii_case(b"\x04fail\x06sluice\x04test\x00\x00\x01\x00\x01") { 2 } else { 0 };
        if question.starts_with(b"\x05LOWER") {
            question.make_ascii_lowercase(); // an upstream that does not keep the case
        }
        vec![[header(q, code, 1, u16::from(code == 0)), question, a_record([192, 0, 2, 77])].concat()]
    });
    // Sends, lets the proxy read, then lets the upstream answer.
    let gated = |send: &dyn Fn()| {
        open.store(false, Ordering::Relaxed);
        send();
        std::thread::sleep(Duration::from_millis(300));
        open.store(true, Ordering::Relaxed);
    };
    let proxy = Proxy::start(Config { timeout: Duration::from_secs(5), ..config(vec![up.addr]) }, shared(None));
    // Three ask in one spelling (they join); one in another (a 0x20 client: it asks alone).
    let spellings = ["join.sluice.test.", "JOIN.sluice.test.", "join.sluice.test.", "join.sluice.test."];
    let clients: Vec<(UdpSocket, Vec<u8>)> = spellings
        .iter()
        .enumerate()
        .map(|(i, name)| {
            let s = UdpSocket::bind(format!("127.0.0.{}:0", 2 + i)).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
            (s, query(0x5100 + i as u16, name, RecordType::A, None))
        })
        .collect();
    let other = UdpSocket::bind("127.0.0.2:0").unwrap();
    other.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    let with_edns = query(0x5200, "join.sluice.test.", RecordType::A, Some(1_232));
    gated(&|| {
        for (s, q) in &clients {
            s.send_to(q, proxy.addr).unwrap();
        }
        clients[0].0.send_to(&clients[0].1, proxy.addr).unwrap(); // a retransmission
        other.send_to(&with_edns, proxy.addr).unwrap();
    });

    let mut buf = [0u8; 512];
    for (s, q) in &clients {
        let n = s.recv(&mut buf).unwrap();
        let end = question_end(q);
        assert_eq!(rcode(&buf[..n]), ResponseCode::NoError);
        assert_eq!(buf[..2], q[..2], "its own ID");
        assert_eq!(buf[12..end], q[12..end], "its own spelling of the name");
        assert_eq!(buf[n - 4..n], [192, 0, 2, 77]);
    }
    let n = other.recv(&mut buf).unwrap();
    assert_eq!((rcode(&buf[..n]), &buf[..2]), (ResponseCode::NoError, &with_edns[..2]));
    clients[0].0.set_read_timeout(Some(Duration::from_millis(400))).unwrap();
    assert!(clients[0].0.recv(&mut buf).is_err(), "one answer for a query and its retransmission");
    {
        let heard = asked.lock().unwrap();
        assert_eq!(heard.len(), 3, "one upstream query per spelling without EDNS, one with");
        assert_eq!(heard[0][2..], clients[0].1[2..], "the first asker's bytes went upstream");
        assert_eq!(heard[1][2..], clients[1].1[2..], "the other spelling's own query");
        assert_eq!(heard[2][2..], with_edns[2..]);
    }
    assert_eq!(proxy.names("192.0.2.77"), ["join.sluice.test"]);

    // A rejection, relayed to every asker of a joined query (a lone
    // upstream's SERVFAIL is its answer), and later queries go upstream again.
    asked.lock().unwrap().clear();
    gated(&|| {
        for (i, (s, _)) in clients.iter().enumerate() {
            s.send_to(&query(0x5300 + i as u16, "fail.sluice.test.", RecordType::A, None), proxy.addr).unwrap();
        }
    });
    for (i, (s, _)) in clients.iter().enumerate() {
        let n = s.recv(&mut buf).unwrap();
        assert_eq!((rcode(&buf[..n]), &buf[..2]), (ResponseCode::ServFail, &(0x5300 + i as u16).to_be_bytes()[..]));
    }
    let got = udp_exchange(proxy.addr, &clients[1].1, Duration::from_secs(3)).expect("an answer");
    assert_eq!(rcode(&got), ResponseCode::NoError);
    assert_eq!(asked.lock().unwrap().len(), 2, "the rejected question once, then the answered one again");

    // The upstream answers in lower case: the joined askers get its answer as it came.
    let lower = [
        query(0x5400, "LOWER.Sluice.TEST.", RecordType::A, None),
        query(0x5401, "LOWER.Sluice.TEST.", RecordType::A, None),
    ];
    gated(&|| {
        for (i, q) in lower.iter().enumerate() {
            clients[i].0.send_to(q, proxy.addr).unwrap();
        }
    });
    for (i, q) in lower.iter().enumerate() {
        let n = clients[i].0.recv(&mut buf).unwrap();
        let end = question_end(q);
        assert_eq!((rcode(&buf[..n]), &buf[..2]), (ResponseCode::NoError, &q[..2]));
        assert_eq!(buf[12..end], b"\x05lower\x06sluice\x04test\x00\x00\x01\x00\x01"[..], "as the upstream spelled it");
    }
}

/// The shares that joined queries hold are given back when they are
/// answered: a client may ask again as much as before.
#[test]
fn joined_queries_give_their_share_back() {
    let same = Arc::new(AtomicUsize::new(0));
    let heard = Arc::clone(&same);
    let up = Scripted::start(move |q| {
        if q.windows(4).any(|w| w == b"same") {
            heard.fetch_add(1, Ordering::SeqCst);
        }
        std::thread::sleep(Duration::from_millis(100));
        let end = question_end(q);
        vec![[header(q, 0, 1, 1), q[12..end].to_vec(), a_record([192, 0, 2, 78])].concat()]
    });
    // A share of 2 per client address.
    let proxy = Proxy::start(Config { max_in_flight: 4, ..config(vec![up.addr]) }, shared(None));
    let s = UdpSocket::bind("127.0.0.2:0").unwrap();
    s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    let mut buf = [0u8; 512];
    for round in 0..3u16 {
        // Two askers of one question (a join), then two of two others: each pair within the share.
        let names =
            if round == 0 { ["same.sluice.test.", "same.sluice.test."] } else { ["a.sluice.test.", "b.sluice.test."] };
        for (i, name) in names.iter().enumerate() {
            s.send_to(&query(round * 10 + i as u16, name, RecordType::A, None), proxy.addr).unwrap();
        }
        for _ in 0..2 {
            let n = s.recv(&mut buf).unwrap();
            assert_eq!(rcode(&buf[..n]), ResponseCode::NoError, "round {round}");
        }
    }
    assert_eq!(same.load(Ordering::SeqCst), 1, "the two askers of round 0 joined (else this tests no join)");
}
