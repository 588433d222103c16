//! DNS over TCP: pipelined queries on one connection answered as they are
//! ready, upstream connections shared and asked again when the upstream
//! closes one, idle connections closed, the connection cap (accepting
//! pauses, then resumes) and one client address's share of it.
#![allow(clippy::unwrap_used)]

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{Proxy, Upstream, a_record, config, header, query, shared, tcp_send as send};
use hickory_proto::op::{Message, ResponseCode};
use hickory_proto::rr::{RData, RecordType};
use sluice_dnsproxy::Config;

fn receive(s: &mut TcpStream) -> std::io::Result<Message> {
    Ok(Message::from_vec(&common::tcp_receive(s)?).unwrap())
}

fn connect(addr: SocketAddr) -> TcpStream {
    connect_from("127.0.0.1", addr)
}

/// A connection from `ip` (another loopback address is another client).
fn connect_from(ip: &str, addr: SocketAddr) -> TcpStream {
    let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    s.bind(&SocketAddr::new(ip.parse().unwrap(), 0).into()).unwrap();
    s.connect(&addr.into()).unwrap();
    let s = TcpStream::from(s);
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s
}

#[test]
fn pipelined_queries_on_one_connection_are_all_answered() {
    let up = Upstream::start();
    let proxy = Proxy::to(up.addr, shared(None));
    let mut s = connect(proxy.addr);
    // Sent back to back, before reading: pipelined.
    send(&mut s, &query(1, "api.sluice.test.", RecordType::A, None));
    send(&mut s, &query(2, "www.sluice.test.", RecordType::A, Some(1232)));
    send(&mut s, &query(3, "ghost.sluice.test.", RecordType::A, None));
    // In whatever order they are ready.
    let mut answers: Vec<Message> = (0..3).map(|_| receive(&mut s).unwrap()).collect();
    answers.sort_by_key(|m| m.metadata.id);
    let ids: Vec<u16> = answers.iter().map(|m| m.metadata.id).collect();
    assert_eq!(ids, [1, 2, 3]);
    let rcodes: Vec<ResponseCode> = answers.iter().map(|m| m.metadata.response_code).collect();
    assert_eq!(rcodes, [ResponseCode::NoError, ResponseCode::NoError, ResponseCode::NXDomain]);
    assert!(!answers[0].answers.is_empty());
    assert_eq!(proxy.names("192.0.2.10"), ["api.sluice.test"]);

    // A header that promises a question it does not carry: FORMERR, and the connection goes on.
    send(&mut s, &[0xab, 0xcd, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0, 3, b'a', b'b']);
    let formerr = receive(&mut s).unwrap();
    assert_eq!((formerr.metadata.id, formerr.metadata.response_code), (0xabcd, ResponseCode::FormErr));
    send(&mut s, &query(4, "api.sluice.test.", RecordType::A, None));
    assert_eq!(receive(&mut s).unwrap().metadata.id, 4);
}

/// A TCP upstream written for these tests: the query for `qN.…` gets one
/// A record, 192.0.2.N, and the one for `slowN.…` too but 800 ms late
/// (long past the others even on a loaded machine);
/// each is answered from its own thread, so the answers on a connection go
/// back in the order they are ready. Counts the connections it accepts, and
/// those the proxy closed.
/// With `limit`, a connection's query past that many closes it unanswered,
/// as a server's per-connection query limit does. The query for `wrongN.…`
/// gets an answer to another question (type TXT). With `close_on_eof`, the
/// proxy's FIN closes the connection at once, answers still owed dropped
/// (as BIND and Unbound do).
struct TcpUpstream {
    addr: SocketAddr,
    accepted: Arc<AtomicUsize>,
    closed: Arc<AtomicUsize>,
}

impl TcpUpstream {
    fn start(limit: Option<usize>) -> TcpUpstream {
        Self::start_with(limit, false)
    }

    fn start_with(limit: Option<usize>, close_on_eof: bool) -> TcpUpstream {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let (accepted, closed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let (count, closes) = (Arc::clone(&accepted), Arc::clone(&closed));
        // Left running when the test ends: it only ever answers the proxy.
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                count.fetch_add(1, Ordering::SeqCst);
                let closes = Arc::clone(&closes);
                std::thread::spawn(move || {
                    let eof = stream.try_clone().unwrap();
                    if Self::serve(stream, limit) {
                        closes.fetch_add(1, Ordering::SeqCst);
                        if close_on_eof {
                            let _ = eof.shutdown(std::net::Shutdown::Both);
                        }
                    }
                });
            }
        });
        TcpUpstream { addr, accepted, closed }
    }

    /// Answers until the proxy closes the connection (true) or the limit closes it here.
    fn serve(mut s: TcpStream, limit: Option<usize>) -> bool {
        let writer = Arc::new(Mutex::new(s.try_clone().unwrap()));
        let mut taken = 0;
        while let Ok(q) = common::tcp_receive(&mut s) {
            if limit.is_some_and(|l| taken >= l) {
                let _ = s.shutdown(std::net::Shutdown::Both);
                return false;
            }
            taken += 1;
            let writer = Arc::clone(&writer);
            std::thread::spawn(move || {
                // The first label, e.g. "q7" or "slow1"; the queries carry no EDNS.
                let label = std::str::from_utf8(&q[13..13 + usize::from(q[12])]).unwrap().to_owned();
                let n: u8 = label.trim_start_matches(|c: char| c.is_ascii_alphabetic()).parse().unwrap();
                if label.starts_with("slow") {
                    std::thread::sleep(Duration::from_millis(800));
                }
                let mut reply = [header(&q, 0, 1, 1), q[12..].to_vec(), a_record([192, 0, 2, n])].concat();
                if label.starts_with("wrong") {
                    reply[common::question_end(&q) - 3] = 16; // another question's answer
                }
                if label.starts_with("big") {
                    // A second record: 30 KB of TXT strings (255 bytes each).
                    reply[7] = 2;
                    let strings: Vec<u8> = (0..120).flat_map(|_| [&[255u8][..], &[b'x'; 255]].concat()).collect();
                    reply.extend_from_slice(&[0xc0, 12, 0, 16, 0, 1, 0, 0, 1, 44]);
                    reply.extend_from_slice(&(strings.len() as u16).to_be_bytes());
                    reply.extend_from_slice(&strings);
                }
                send(&mut writer.lock().unwrap(), &reply);
            });
        }
        true
    }

    fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }

    fn closed(&self) -> usize {
        self.closed.load(Ordering::SeqCst)
    }
}

/// A client that pipelines queries with large answers (30 KB each) and
/// reads none is closed once its answers waiting to be taken pass 256 KiB;
/// before, the proxy held all 32 (2 MiB a connection at 64 KiB each) until
/// the idle timeout, and gave them all when the client read at last.
#[test]
fn a_client_that_does_not_take_its_answers_is_closed() {
    let up = TcpUpstream::start(None);
    // Small socket buffers both sides (the proxy's connections inherit its
    // listener's), or the kernel takes all 32 answers (its send buffer grows
    // to 4 MB) and they never wait in the proxy.
    let small = |l: &TcpListener| socket2::SockRef::from(l).set_send_buffer_size(16_384).unwrap();
    let proxy = Proxy::start_tuned("127.0.0.1", config(vec![up.addr]), shared(None), small);
    let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    s.set_recv_buffer_size(4096).unwrap();
    s.connect(&proxy.addr.into()).unwrap();
    let mut s = TcpStream::from(s);
    for n in 1..=32 {
        send(&mut s, &query(n, &format!("big{n}.sluice.test."), RecordType::A, None));
    }
    std::thread::sleep(Duration::from_secs(1));
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let (t, mut answers) = (Instant::now(), 0);
    while let Ok(_answer) = common::tcp_receive(&mut s) {
        answers += 1;
    }
    assert!(answers < 32, "all {answers} answers were kept for a client that read none");
    assert!(t.elapsed() < Duration::from_secs(4), "closed, not left to the idle timeout: {:?}", t.elapsed());
}

/// A connection that takes no new queries (here: an answer to another
/// question came on it) keeps its socket open until the answers still owed
/// on it are in: a FIN at once made a server that closes on EOF drop them.
#[test]
fn a_retired_connection_gets_the_answers_still_owed_on_it() {
    let up = TcpUpstream::start_with(None, true);
    let timeout = Duration::from_secs(3); // slow1 takes 800 ms
    let proxy = Proxy::start(Config { timeout, ..config(vec![up.addr]) }, shared(None));
    let mut s = connect(proxy.addr);
    send(&mut s, &query(1, "slow1.sluice.test.", RecordType::A, None));
    std::thread::sleep(Duration::from_millis(100)); // on the connection slow1 opened
    send(&mut s, &query(2, "wrong2.sluice.test.", RecordType::A, None));
    let mut answers: Vec<(u16, ResponseCode)> =
        (0..2).map(|_| receive(&mut s).unwrap()).map(|m| (m.metadata.id, m.metadata.response_code)).collect();
    answers.sort_unstable_by_key(|a| a.0);
    assert_eq!(answers, [(1, ResponseCode::NoError), (2, ResponseCode::ServFail)]);
    assert_eq!(up.accepted(), 1, "one upstream connection carried both");
    // Nothing owed any more: it closes now, not at the idle timeout (10 s).
    let t = Instant::now();
    while up.closed() == 0 {
        assert!(t.elapsed() < Duration::from_secs(3), "the retired connection is still open");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The next answer on `s`: its ID and its A record's address.
fn answered(s: &mut TcpStream) -> (u16, [u8; 4]) {
    let m = receive(s).unwrap();
    match &m.answers[..] {
        [record] => match &record.data {
            RData::A(a) => (m.metadata.id, a.0.octets()),
            other => panic!("not an A record: {other:?}"),
        },
        other => panic!("{} records: {other:?}", other.len()),
    }
}

/// A connection's queries are answered as they are ready (RFC 7766
/// §6.2.1.1), and the queries of several clients share one upstream
/// connection under IDs of their own (two clients' queries with the same ID
/// in flight at once each get their own answer).
#[test]
fn a_slow_answer_does_not_hold_back_the_others_and_one_upstream_connection_carries_all() {
    let up = TcpUpstream::start(None);
    // Time enough for the slow answer.
    let proxy = Proxy::start(Config { timeout: Duration::from_secs(3), ..config(vec![up.addr]) }, shared(None));
    let mut s = connect(proxy.addr);
    send(&mut s, &query(1, "slow1.sluice.test.", RecordType::A, None));
    for n in 2..=4 {
        send(&mut s, &query(n, &format!("q{n}.sluice.test."), RecordType::A, None));
    }
    let mut other = connect_from("127.0.0.2", proxy.addr);
    send(&mut other, &query(1, "q5.sluice.test.", RecordType::A, None));
    assert_eq!(answered(&mut other), (1, [192, 0, 2, 5]));
    let got: Vec<(u16, [u8; 4])> = (0..4).map(|_| answered(&mut s)).collect();
    assert_eq!(got.last(), Some(&(1, [192, 0, 2, 1])), "the slow one comes last: {got:?}");
    let mut quick = got[..3].to_vec();
    quick.sort();
    assert_eq!(quick, [(2, [192, 0, 2, 2]), (3, [192, 0, 2, 3]), (4, [192, 0, 2, 4])]);
    assert_eq!(up.accepted(), 1, "one upstream connection for the five queries");
    assert_eq!(proxy.names("192.0.2.5"), ["q5.sluice.test"]);
}

/// An upstream may close a connection the proxy reuses, even with a query
/// on it (its per-connection limit): that query is asked again on a new
/// connection, not answered SERVFAIL.
#[test]
fn a_query_on_a_connection_the_upstream_closes_is_asked_again_on_a_new_one() {
    let up = TcpUpstream::start(Some(1));
    let proxy = Proxy::to(up.addr, shared(None));
    let mut s = connect(proxy.addr);
    for n in 1..=4 {
        send(&mut s, &query(n, &format!("q{n}.sluice.test."), RecordType::A, None));
        assert_eq!(answered(&mut s), (n, [192, 0, 2, n as u8]));
    }
    assert_eq!(up.accepted(), 4, "each query after the first found its connection closed under it");
}

/// A client connection that ends before its answer comes (here the proxy
/// hangs up on a frame that is not a query; a reply it cannot write ends
/// one the same way) costs nothing upstream: the query is still answered
/// there and learned from, and the shared connection it went out on keeps
/// carrying the others' queries (a connection is retired only when a query
/// on it goes unanswered past the timeout).
#[test]
fn a_client_connection_that_ends_before_its_answer_does_not_retire_the_upstream_connection() {
    let up = TcpUpstream::start(None);
    let proxy = Proxy::start(Config { timeout: Duration::from_secs(3), ..config(vec![up.addr]) }, shared(None));
    let mut s = connect(proxy.addr);
    send(&mut s, &query(1, "slow1.sluice.test.", RecordType::A, None));
    send(&mut s, &query(2, "q2.sluice.test.", RecordType::A, None));
    assert_eq!(answered(&mut s), (2, [192, 0, 2, 2]));
    // While slow1 is upstream, a frame that is not a query (an answer): the proxy hangs up on it.
    let mut junk = query(3, "q3.sluice.test.", RecordType::A, None);
    junk[2] |= 0x80;
    send(&mut s, &junk);
    assert_eq!(s.read(&mut [0; 1]).unwrap(), 0, "closed by the proxy");
    common::wait_for("the abandoned answer to be learned", || proxy.names("192.0.2.1") == ["slow1.sluice.test"]);
    let mut other = connect_from("127.0.0.2", proxy.addr);
    send(&mut other, &query(3, "q3.sluice.test.", RecordType::A, None));
    assert_eq!(answered(&mut other), (3, [192, 0, 2, 3]));
    assert_eq!((up.accepted(), up.closed()), (1, 0), "the first upstream connection carries every query");
}

/// An upstream connection with no query in flight for the idle timeout is
/// closed (by the proxy: a socket in TIME_WAIT per idle spell, not per
/// query), and the next query opens another.
#[test]
fn an_idle_upstream_connection_is_closed() {
    let up = TcpUpstream::start(None);
    let idle = Duration::from_secs(1);
    let proxy = Proxy::start(Config { tcp_idle_timeout: idle, ..config(vec![up.addr]) }, shared(None));
    let mut s = connect(proxy.addr);
    let t = Instant::now(); // before the query, so before the idle spell starts
    send(&mut s, &query(1, "q1.sluice.test.", RecordType::A, None));
    assert_eq!(answered(&mut s), (1, [192, 0, 2, 1]));
    assert_eq!(up.closed(), 0, "closed at once");
    common::wait_for("the idle upstream connection to close", || up.closed() == 1);
    assert!(t.elapsed() >= idle, "closed after {:?}", t.elapsed());
    let mut s = connect(proxy.addr);
    send(&mut s, &query(2, "q2.sluice.test.", RecordType::A, None));
    assert_eq!(answered(&mut s), (2, [192, 0, 2, 2]));
    assert_eq!(up.accepted(), 2);
}

#[test]
fn an_idle_connection_is_closed() {
    let up = Upstream::start();
    let idle = Duration::from_millis(300);
    let proxy = Proxy::start(Config { tcp_idle_timeout: idle, ..config(vec![up.addr]) }, shared(None));
    let mut s = connect(proxy.addr);
    let t = Instant::now(); // before the query, so before the idle spell starts
    send(&mut s, &query(1, "api.sluice.test.", RecordType::A, None));
    receive(&mut s).unwrap();
    let mut buf = [0u8; 1];
    assert_eq!(s.read(&mut buf).unwrap(), 0, "closed by the proxy");
    assert!(t.elapsed() >= idle && t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());

    // A query cut short (its length promises more than comes) is not waited on forever either.
    let mut s = connect(proxy.addr);
    s.write_all(&[0, 40, 0x12, 0x34]).unwrap();
    assert_eq!(s.read(&mut buf).unwrap(), 0, "closed by the proxy");
}

#[test]
fn at_the_connection_cap_accepting_pauses_until_one_closes() {
    let up = Upstream::start();
    let proxy = Proxy::start(Config { max_tcp_connections: 2, ..config(vec![up.addr]) }, shared(None));
    // Two clients: one address may hold only half the cap.
    let mut first = connect(proxy.addr);
    let mut second = connect_from("127.0.0.2", proxy.addr);
    for (i, s) in [&mut first, &mut second].into_iter().enumerate() {
        send(s, &query(i as u16, "api.sluice.test.", RecordType::A, None));
        receive(s).unwrap();
    }
    // The third connection is made (the kernel's backlog) but not served while two are open.
    let mut third = connect_from("127.0.0.3", proxy.addr);
    third.set_read_timeout(Some(Duration::from_millis(700))).unwrap();
    send(&mut third, &query(3, "api.sluice.test.", RecordType::A, None));
    let waited = receive(&mut third);
    assert!(waited.is_err(), "the third connection was served beyond the cap: {waited:?}");
    // One closes: the third is accepted and its query, already sent, answered.
    drop(first);
    third.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    assert_eq!(receive(&mut third).unwrap().metadata.id, 3);
    send(&mut second, &query(4, "api.sluice.test.", RecordType::A, None));
    assert_eq!(receive(&mut second).unwrap().metadata.id, 4);
}

#[test]
fn stopping_closes_idle_connections_at_once() {
    let up = Upstream::start();
    let proxy =
        Proxy::start(Config { tcp_idle_timeout: Duration::from_secs(30), ..config(vec![up.addr]) }, shared(None));
    let mut s = connect(proxy.addr);
    send(&mut s, &query(1, "api.sluice.test.", RecordType::A, None));
    receive(&mut s).unwrap();
    let t = Instant::now();
    proxy.stop().unwrap();
    assert!(t.elapsed() < Duration::from_secs(2), "stopping took {:?}", t.elapsed());
    let mut buf = [0u8; 1];
    assert_eq!(s.read(&mut buf).unwrap(), 0, "closed by the proxy");
}

#[test]
fn one_client_cannot_take_every_connection() {
    let up = Upstream::start();
    let proxy = Proxy::start(Config { max_tcp_connections: 4, ..config(vec![up.addr]) }, shared(None));
    let served = |s: &mut TcpStream, id: u16| {
        send(s, &query(id, "api.sluice.test.", RecordType::A, None));
        receive(s).map(|m| m.metadata.id).ok()
    };
    let mut held = vec![connect(proxy.addr), connect(proxy.addr)];
    for (i, s) in held.iter_mut().enumerate() {
        assert_eq!(served(s, i as u16), Some(i as u16));
    }
    // Past its share (half of 4): closed at once, unanswered — not left waiting in the backlog.
    let mut third = connect(proxy.addr);
    third.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let closed = match third.read(&mut [0u8; 1]) {
        Ok(0) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => Ok(()),
        other => Err(other),
    };
    assert!(closed.is_ok(), "the client's third connection was not closed: {closed:?}");
    // Another client is served meanwhile, and its share is its own.
    let mut other = connect_from("127.0.0.2", proxy.addr);
    assert_eq!(served(&mut other, 4), Some(4));
    // The first client closes one: its next connection is served.
    held.pop();
    let mut again = None;
    for _ in 0..50 {
        let mut s = connect(proxy.addr);
        if served(&mut s, 5) == Some(5) {
            again = Some(s);
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(again.is_some(), "the share given back was not taken again");
}
