//! DNS over TCP: several queries on one connection answered in order, idle
//! connections closed, the connection cap (accepting pauses, then resumes)
//! and one client address's share of it.
#![allow(clippy::unwrap_used)]

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use common::{Proxy, Upstream, config, query, shared, tcp_send as send};
use hickory_proto::op::{Message, ResponseCode};
use hickory_proto::rr::RecordType;
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
fn queries_on_one_connection_are_answered_in_order() {
    let up = Upstream::start();
    let proxy = Proxy::to(up.addr, shared(None));
    let mut s = connect(proxy.addr);
    // Sent back to back, before reading: pipelined.
    send(&mut s, &query(1, "api.sluice.test.", RecordType::A, None));
    send(&mut s, &query(2, "www.sluice.test.", RecordType::A, Some(1232)));
    send(&mut s, &query(3, "ghost.sluice.test.", RecordType::A, None));
    let answers: Vec<Message> = (0..3).map(|_| receive(&mut s).unwrap()).collect();
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

#[test]
fn an_idle_connection_is_closed() {
    let up = Upstream::start();
    let idle = Duration::from_millis(300);
    let proxy = Proxy::start(Config { tcp_idle_timeout: idle, ..config(vec![up.addr]) }, shared(None));
    let mut s = connect(proxy.addr);
    send(&mut s, &query(1, "api.sluice.test.", RecordType::A, None));
    receive(&mut s).unwrap();
    let t = Instant::now();
    let mut buf = [0u8; 1];
    assert_eq!(s.read(&mut buf).unwrap(), 0, "closed by the proxy");
    assert!(
        t.elapsed() >= idle - Duration::from_millis(50) && t.elapsed() < Duration::from_secs(3),
        "{:?}",
        t.elapsed()
    );

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
