//! The forwarder, end to end on both drivers: real sockets, a network
//! namespace per test, nftables REDIRECT sending connections to it.
#![allow(clippy::unwrap_used)]

mod common;

use std::hash::Hasher;
use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::time::Duration;

use common::{ALLOW_ANY, Bytes, DRIVERS, Fwd, Netns};
use sluice_forwarder::splice::End;
use sluice_forwarder::{Accept, ConnOutcome, Driver};

const MIB: usize = 1 << 20;

/// Sends `len` pseudo-random bytes from `seed` and returns their hash.
fn send_random(s: &mut TcpStream, seed: u64, len: usize) -> u64 {
    let (mut bytes, mut h) = (Bytes::new(seed), std::hash::DefaultHasher::new());
    let mut buf = vec![0u8; 256 * 1024];
    let mut left = len;
    while left > 0 {
        let n = left.min(buf.len());
        bytes.fill(&mut buf[..n]);
        s.write_all(&buf[..n]).unwrap();
        h.write(&buf[..n]);
        left -= n;
    }
    h.finish()
}

/// Reads to EOF, returning (bytes, hash).
fn recv_all(s: &mut TcpStream) -> std::io::Result<(usize, u64)> {
    let mut h = std::hash::DefaultHasher::new();
    let mut buf = vec![0u8; 256 * 1024];
    let mut total = 0;
    loop {
        let n = s.read(&mut buf)?;
        if n == 0 {
            return Ok((total, h.finish()));
        }
        h.write(&buf[..n]);
        total += n;
    }
}

fn timeouts(s: &TcpStream) {
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    s.set_write_timeout(Some(Duration::from_secs(20))).unwrap();
}

/// 64 MiB of random bytes each way at once: every byte arrives, in order.
fn both_ways_intact(driver: Driver, v6: bool) {
    let ns = Netns::new();
    let fwd = Fwd::start(&ns, driver, ALLOW_ANY, |_| {});
    ns.redirect_to(&fwd);
    let dst = SocketAddr::new(if v6 { ns.v6(2) } else { ns.v4(2) }, 9000);
    let server = ns.serve(dst, move |l| {
        let (mut s, _) = l.accept().unwrap();
        timeouts(&s);
        let mut r = s.try_clone().unwrap();
        let reader = std::thread::spawn(move || recv_all(&mut r).unwrap());
        let sent = send_random(&mut s, 2, 64 * MIB);
        s.shutdown(Shutdown::Write).unwrap();
        (sent, reader.join().unwrap())
    });
    let client = ns.within(move || {
        let mut c = TcpStream::connect(dst).unwrap();
        timeouts(&c);
        let mut r = c.try_clone().unwrap();
        let reader = std::thread::spawn(move || recv_all(&mut r).unwrap());
        let sent = send_random(&mut c, 1, 64 * MIB);
        c.shutdown(Shutdown::Write).unwrap();
        (sent, reader.join().unwrap())
    });
    let (server_sent, (server_got, server_hash)) = server.join().unwrap();
    let (client_sent, (client_got, client_hash)) = client;
    assert_eq!(server_got, 64 * MIB);
    assert_eq!(server_hash, client_sent, "client → server bytes differ");
    assert_eq!(client_got, 64 * MIB);
    assert_eq!(client_hash, server_sent, "server → client bytes differ");
    let r = &fwd.wait_reports(1)[0];
    assert_eq!(r.destination, Some(dst));
    assert_eq!((r.sent, r.received), (64 * MIB as u64, 64 * MIB as u64));
    assert_eq!(r.outcome, ConnOutcome::Spliced(End::Closed));
}

#[test]
fn sixty_four_mib_each_way_arrive_intact_v4() {
    for d in DRIVERS {
        both_ways_intact(d, false);
    }
}

#[test]
fn sixty_four_mib_each_way_arrive_intact_v6() {
    for d in DRIVERS {
        both_ways_intact(d, true);
    }
}

/// The client half-closes first; the server answers after EOF. Then the
/// server half-closes first while the client keeps sending.
#[test]
fn half_close_propagates_each_way() {
    for driver in DRIVERS {
        let ns = Netns::new();
        let fwd = Fwd::start(&ns, driver, ALLOW_ANY, |_| {});
        ns.redirect_to(&fwd);
        let dst = SocketAddr::new(ns.v4(3), 7000);
        let server = ns.serve(dst, move |l| {
            // 1: read to EOF, then answer.
            let (mut s, _) = l.accept().unwrap();
            timeouts(&s);
            let mut req = Vec::new();
            s.read_to_end(&mut req).unwrap();
            s.write_all(format!("got {} bytes", req.len()).as_bytes()).unwrap();
            drop(s);
            // 2: close our sending half at once, keep reading.
            let (mut s, _) = l.accept().unwrap();
            timeouts(&s);
            s.write_all(b"bye").unwrap();
            s.shutdown(Shutdown::Write).unwrap();
            let mut rest = Vec::new();
            s.read_to_end(&mut rest).unwrap();
            rest.len()
        });
        let answer = ns.within(move || {
            let mut c = TcpStream::connect(dst).unwrap();
            timeouts(&c);
            c.write_all(&[7u8; 100_000]).unwrap();
            c.shutdown(Shutdown::Write).unwrap();
            let mut answer = String::new();
            c.read_to_string(&mut answer).unwrap();

            let mut c = TcpStream::connect(dst).unwrap();
            timeouts(&c);
            let mut bye = Vec::new();
            c.read_to_end(&mut bye).unwrap(); // the server's FIN arrives...
            assert_eq!(bye, b"bye");
            c.write_all(&[1u8; 50_000]).unwrap(); // ...and we can still send
            c.shutdown(Shutdown::Write).unwrap();
            answer
        });
        assert_eq!(answer, "got 100000 bytes");
        assert_eq!(server.join().unwrap(), 50_000, "{driver:?}: bytes after the server's half-close");
        let reports = fwd.wait_reports(2);
        assert!(reports.iter().all(|r| r.outcome == ConnOutcome::Spliced(End::Closed)), "{reports:?}");
    }
}

/// A reset on one side becomes a reset on the other, not a clean close.
#[test]
fn resets_propagate() {
    for driver in DRIVERS {
        let ns = Netns::new();
        let fwd = Fwd::start(&ns, driver, ALLOW_ANY, |_| {});
        ns.redirect_to(&fwd);
        let dst = SocketAddr::new(ns.v4(4), 7001);
        let server = ns.serve(dst, move |l| {
            let (s, _) = l.accept().unwrap();
            let mut first = [0u8; 5];
            (&s).read_exact(&mut first).unwrap();
            socket2::SockRef::from(&s).set_linger(Some(Duration::ZERO)).unwrap();
            drop(s); // RST to the forwarder
            // Second connection: the client resets; we should see it as an error.
            let (mut s, _) = l.accept().unwrap();
            timeouts(&s);
            let mut buf = [0u8; 64];
            loop {
                match s.read(&mut buf) {
                    Ok(0) => return Ok(()),
                    Ok(_) => continue,
                    Err(e) => return Err(e.kind()),
                }
            }
        });
        let client_saw = ns.within(move || {
            let mut c = TcpStream::connect(dst).unwrap();
            timeouts(&c);
            c.write_all(b"hello").unwrap();
            let mut buf = [0u8; 16];
            let r = c.read(&mut buf).map_err(|e| e.kind());
            // Now reset our own side of a second connection.
            let c2 = TcpStream::connect(dst).unwrap();
            (&c2).write_all(b"data").unwrap();
            std::thread::sleep(Duration::from_millis(100));
            socket2::SockRef::from(&c2).set_linger(Some(Duration::ZERO)).unwrap();
            drop(c2);
            r
        });
        assert_eq!(client_saw, Err(ErrorKind::ConnectionReset), "{driver:?}: upstream reset reaches the client");
        assert_eq!(
            server.join().unwrap(),
            Err(ErrorKind::ConnectionReset),
            "{driver:?}: client reset reaches the upstream"
        );
        let mut ends: Vec<_> = fwd.wait_reports(2).iter().map(|r| r.outcome).collect();
        ends.sort_by_key(|o| format!("{o:?}"));
        assert_eq!(ends, [ConnOutcome::Spliced(End::ClientError), ConnOutcome::Spliced(End::UpstreamError)]);
    }
}

/// A client that does not read: the server's writes block after a bounded
/// amount (socket buffers + one pipe), the forwarder does not buffer more.
#[test]
fn a_slow_reader_gets_backpressure() {
    for driver in DRIVERS {
        let ns = Netns::new();
        ns.small_socket_buffers();
        let fwd = Fwd::start(&ns, driver, ALLOW_ANY, |_| {});
        ns.redirect_to(&fwd);
        let dst = SocketAddr::new(ns.v4(5), 7002);
        let server = ns.serve(dst, move |l| {
            let (s, _) = l.accept().unwrap();
            s.set_nonblocking(true).unwrap();
            let chunk = vec![9u8; 64 * 1024];
            let mut written = 0usize;
            let mut stalled = 0;
            // Write until the path is full: 40 consecutive would-blocks, 10 ms apart.
            while stalled < 40 && written < 512 * MIB {
                match (&s).write(&chunk) {
                    Ok(n) => {
                        written += n;
                        stalled = 0;
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock => {
                        stalled += 1;
                        std::thread::sleep(Duration::from_millis(10));
                    }
                    Err(e) => panic!("{e}"),
                }
            }
            written
        });
        let c = ns.within(move || TcpStream::connect(dst).unwrap());
        let written = server.join().unwrap();
        // Four socket buffers of at most 256 KiB on the way, and the forwarder's pipe (≤ 1 MiB grown).
        assert!(written < 3 * MIB, "{driver:?}: {written} bytes accepted while nobody read");
        // And then everything flows once the client reads.
        c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut got = 0usize;
        let mut buf = vec![0u8; 1 << 20];
        while got < written {
            got += (&c).read(&mut buf).unwrap();
        }
        assert_eq!(got, written);
        drop(fwd);
    }
}

/// A server-first protocol (SMTP's banner) flows at once: the forwarder
/// does not wait for client bytes that will not come.
#[test]
fn server_first_protocols_are_not_delayed() {
    for driver in DRIVERS {
        let ns = Netns::new();
        // A sniff timeout longer than the client's read timeout: waiting would fail the test.
        let fwd = Fwd::start(&ns, driver, ALLOW_ANY, |c| c.sniff_timeout = Duration::from_secs(30));
        ns.redirect_to(&fwd);
        let dst = SocketAddr::new(ns.v4(6), 25);
        let server = ns.serve(dst, move |l| {
            let (mut s, _) = l.accept().unwrap();
            s.write_all(b"220 mail.test ESMTP\r\n").unwrap();
            let mut buf = [0u8; 64];
            let n = s.read(&mut buf).unwrap();
            buf[..n].to_vec()
        });
        let banner = ns.within(move || {
            let mut c = TcpStream::connect(dst).unwrap();
            c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            let mut buf = [0u8; 64];
            let n = c.read(&mut buf).unwrap();
            c.write_all(b"EHLO me\r\n").unwrap();
            String::from_utf8_lossy(&buf[..n]).into_owned()
        });
        assert_eq!(banner, "220 mail.test ESMTP\r\n", "{driver:?}");
        assert_eq!(server.join().unwrap(), b"EHLO me\r\n");
    }
}

/// Connecting to the forwarder's own address (no redirect) is refused:
/// sluice is never an open relay.
#[test]
fn direct_connections_to_the_forwarder_are_refused() {
    for driver in DRIVERS {
        let ns = Netns::new();
        let fwd = Fwd::start(&ns, driver, ALLOW_ANY, |_| {});
        let addr = fwd.addr;
        let outcome = ns.within(move || {
            let mut c = TcpStream::connect(addr).unwrap();
            c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            let _ = c.write_all(b"CONNECT 198.18.0.1:443 HTTP/1.1\r\n\r\n");
            let mut buf = [0u8; 16];
            c.read(&mut buf).map_err(|e| e.kind())
        });
        assert!(matches!(outcome, Err(ErrorKind::ConnectionReset) | Ok(0)), "{driver:?}: {outcome:?}");
        let r = &fwd.wait_reports(1)[0];
        assert_eq!(r.outcome, ConnOutcome::NotIntercepted);
        assert!(r.verdict.is_none());
    }
}

/// Nobody listens at the destination: the client is reset, and the
/// connection is counted as a connect failure.
#[test]
fn an_upstream_connect_failure_resets_the_client() {
    for driver in DRIVERS {
        let ns = Netns::new();
        let fwd = Fwd::start(&ns, driver, ALLOW_ANY, |_| {});
        ns.redirect_to(&fwd);
        let dst = SocketAddr::new(ns.v4(7), 7003);
        let saw = ns.within(move || {
            let mut c = TcpStream::connect(dst).unwrap();
            c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            let mut b = [0u8; 1];
            c.read(&mut b).map_err(|e| e.kind())
        });
        assert_eq!(saw, Err(ErrorKind::ConnectionReset), "{driver:?}");
        assert_eq!(fwd.wait_reports(1)[0].outcome, ConnOutcome::ConnectFailed);
    }
}

/// No byte either way for the idle timeout: both sides are reset.
#[test]
fn idle_connections_are_closed_after_the_idle_timeout() {
    for driver in DRIVERS {
        let ns = Netns::new();
        let fwd = Fwd::start(&ns, driver, ALLOW_ANY, |c| c.idle_timeout = Duration::from_millis(300));
        ns.redirect_to(&fwd);
        let dst = SocketAddr::new(ns.v4(8), 7004);
        let (c, s) = ns.connected(dst);
        (&c).write_all(b"one message, then silence").unwrap();
        c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut b = [0u8; 1];
        let saw = (&c).read(&mut b).map_err(|e| e.kind());
        assert_eq!(saw, Err(ErrorKind::ConnectionReset), "{driver:?}");
        let r = &fwd.wait_reports(1)[0];
        assert_eq!(r.outcome, ConnOutcome::Spliced(End::Idle));
        assert_eq!(r.sent, 25);
        drop(s);
    }
}

/// Past `max_connections_per_worker`, accepting pauses: the extra client
/// waits in the backlog and is served as soon as a slot frees up.
#[test]
fn accepting_pauses_at_the_connection_cap() {
    for driver in DRIVERS {
        let ns = Netns::new();
        let fwd = Fwd::start(&ns, driver, ALLOW_ANY, |c| {
            c.workers = 1;
            c.max_connections_per_worker = 2;
        });
        ns.redirect_to(&fwd);
        let dst = SocketAddr::new(ns.v4(9), 7005);
        let l = ns.within(move || TcpListener::bind(dst).unwrap());
        l.set_nonblocking(true).unwrap();
        let clients: Vec<TcpStream> = (0..3).map(|_| ns.within(move || TcpStream::connect(dst).unwrap())).collect();
        // Accepts until `want` came (at most 5 s), then for 500 ms more: any beyond `want` shows.
        let accept_all = |l: &TcpListener, want: usize| {
            let mut got = Vec::new();
            let start = std::time::Instant::now();
            let mut quiet_from = None;
            while quiet_from.is_none_or(|t: std::time::Instant| t.elapsed() < Duration::from_millis(500))
                && start.elapsed() < Duration::from_secs(5)
            {
                if let Ok((s, _)) = l.accept() {
                    got.push(s);
                }
                if got.len() >= want && quiet_from.is_none() {
                    quiet_from = Some(std::time::Instant::now());
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            got
        };
        let first = accept_all(&l, 2);
        assert_eq!(first.len(), 2, "{driver:?}: only two connections forwarded at the cap");
        // One connection ends (both sides close; a half-closed one still holds its slot)...
        let mut clients = clients.into_iter();
        drop(clients.next());
        drop(first);
        let more = accept_all(&l, 1);
        assert_eq!(more.len(), 1, "{driver:?}: ...and the waiting one is served");
    }
}

/// TCP sockets listening on `port` (IPv4) in the calling thread's network
/// namespace, from /proc's table (state 0A is LISTEN).
fn listening_sockets(port: u16) -> usize {
    let table = std::fs::read_to_string("/proc/thread-self/net/tcp").unwrap();
    let local = format!(":{port:04X}");
    table
        .lines()
        .skip(1)
        .filter(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            f.len() > 3 && f[1].ends_with(&local) && f[3] == "0A"
        })
        .count()
}

/// Both ways of sharing the listening address (one socket every worker
/// accepts from, or a SO_REUSEPORT socket per worker) serve connections on
/// both drivers, whichever the default picks for a driver.
#[test]
fn both_accept_modes_serve_connections() {
    const CONNS: usize = 16;
    for driver in DRIVERS {
        for accept in [Accept::Shared, Accept::PerWorker] {
            let ns = Netns::new();
            let fwd = Fwd::start(&ns, driver, ALLOW_ANY, |c| c.accept = accept);
            ns.redirect_to(&fwd);
            // The mode took effect: one listening socket on the port, or one per worker (2).
            let port = fwd.addr.port();
            let listening = ns.within(move || listening_sockets(port));
            let expect = if accept == Accept::Shared { 1 } else { 2 };
            assert_eq!(listening, expect, "{driver:?} {accept:?}: listening sockets on :{port}");
            let dst = SocketAddr::new(ns.v4(7), 7);
            let server = ns.serve(dst, move |l| {
                for _ in 0..CONNS {
                    let (mut s, _) = l.accept().unwrap();
                    let mut buf = [0u8; 5];
                    s.read_exact(&mut buf).unwrap();
                    s.write_all(&buf).unwrap();
                }
            });
            let echoed = ns.within(move || {
                (0..CONNS)
                    .filter(|_| {
                        let mut c = TcpStream::connect(dst).unwrap();
                        c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
                        c.write_all(b"hello").unwrap();
                        let mut buf = [0u8; 5];
                        c.read_exact(&mut buf).is_ok() && &buf == b"hello"
                    })
                    .count()
            });
            server.join().unwrap();
            assert_eq!(echoed, CONNS, "{driver:?} {accept:?}");
            assert_eq!(fwd.wait_reports(CONNS).len(), CONNS, "{driver:?} {accept:?}");
        }
    }
}

/// A connection still open when the drain time is over is reset on both
/// sides (a close would tell them the transfer was complete) and reported.
#[test]
fn connections_left_when_the_drain_ends_are_reset_and_reported() {
    for driver in DRIVERS {
        let ns = Netns::new();
        let mut fwd = Fwd::start(&ns, driver, ALLOW_ANY, |_| {});
        ns.redirect_to(&fwd);
        let dst = SocketAddr::new(ns.v4(4), 7002);
        let (c, s) = ns.connected(dst);
        (&c).write_all(b"mid-transfer").unwrap();
        let mut buf = [0u8; 12];
        (&s).read_exact(&mut buf).unwrap();
        let (started, handle) = (std::time::Instant::now(), fwd.handle.take().unwrap());
        handle.shutdown(Duration::from_millis(300));
        assert!(started.elapsed() >= Duration::from_millis(300), "{driver:?}: the drain waited");
        for (side, mut sock) in [("client", &c), ("upstream", &s)] {
            timeouts(sock);
            let mut b = [0u8; 1];
            assert_eq!(sock.read(&mut b).map_err(|e| e.kind()), Err(ErrorKind::ConnectionReset), "{driver:?}: {side}");
        }
        assert_eq!(fwd.wait_reports(1)[0].outcome, ConnOutcome::Spliced(End::Shutdown), "{driver:?}");
    }
}

/// An open connection keeps its destination's names alive while it lasts,
/// as new connections do: one judged once and open for longer than the
/// name's TTL and grace leaves the name to the app's next connection to the
/// same address (made without asking DNS again).
#[test]
fn an_open_connection_keeps_its_destinations_names_alive() {
    use sluice_policy::{Hostname, Retention, Timestamp};
    let keep = Retention { min_ttl: Duration::from_secs(1), grace: Duration::from_secs(2) };
    let yaml = "apiVersion: sluice.dev/v1alpha1\nkind: EgressPolicy\nspec:\n  dns: {minTtl: 1s, grace: 2s}\n";
    for driver in DRIVERS {
        let ns = Netns::new();
        let fwd = Fwd::start(&ns, driver, yaml, |_| {});
        ns.redirect_to(&fwd);
        let dst = SocketAddr::new(ns.v4(6), 7004);
        let name = Hostname::parse("long.example").unwrap();
        fwd.names.record(dst.ip(), &name, Duration::from_secs(1), Timestamp::now(), keep);
        let (c, _s) = ns.connected(dst);
        let idle = SocketAddr::new(ns.v4(7), 7005); // DNS gave it a name too; no connection uses it
        fwd.names.record(idle.ip(), &name, Duration::from_secs(1), Timestamp::now(), keep);
        std::thread::sleep(Duration::from_secs(4)); // past the TTL (1 s) and grace (2 s)
        assert_eq!(fwd.names.names(dst.ip(), Timestamp::now()), vec![name.clone()], "{driver:?}: in use");
        assert!(fwd.names.names(idle.ip(), Timestamp::now()).is_empty(), "{driver:?}: not in use");
        drop(c);
    }
}

/// A connection the drain time ends before its splice began — still
/// connecting to an upstream that does not answer (its SYNs dropped) — is
/// reset and reported too, not dropped with the worker unreported.
#[test]
fn a_connection_still_connecting_when_the_drain_ends_is_reset_and_reported() {
    for driver in DRIVERS {
        let ns = Netns::new();
        let mut fwd = Fwd::start(&ns, driver, ALLOW_ANY, |c| c.connect_timeout = Duration::from_secs(30));
        ns.redirect_to(&fwd);
        let dst = SocketAddr::new(ns.v4(5), 7003);
        // The forwarder's own SYNs to it vanish (the client's are redirected before this hook).
        let drop_syns = format!("ip daddr {} tcp dport 7003 drop", dst.ip());
        ns.nft(&format!("table inet blackhole {{\n  chain out {{\n    type filter hook output priority 0;\n    {drop_syns}\n  }}\n}}"));
        let c = ns.within(move || TcpStream::connect(dst).unwrap());
        std::thread::sleep(Duration::from_millis(200)); // accepted, and connecting upstream
        let started = std::time::Instant::now();
        fwd.handle.take().unwrap().shutdown(Duration::from_millis(100));
        assert!(started.elapsed() < Duration::from_secs(5), "{driver:?}: the drain did not wait for the connect");
        timeouts(&c);
        let mut b = [0u8; 1];
        assert_eq!((&c).read(&mut b).map_err(|e| e.kind()), Err(ErrorKind::ConnectionReset), "{driver:?}");
        assert_eq!(fwd.wait_reports(1)[0].outcome, ConnOutcome::Spliced(End::Shutdown), "{driver:?}");
    }
}

/// TCP urgent data (`MSG_OOB`: telnet's interrupt, FTP's ABOR, Oracle Net's
/// break) stops `splice(2)` at the urgent mark: the bytes around it must
/// still all arrive, each way, the urgent byte out of band as it came, and
/// the connection must not stall.
#[test]
fn urgent_data_passes_and_does_not_stall_a_connection() {
    use nix::sys::socket::{MsgFlags, recv};
    for driver in DRIVERS {
        let ns = Netns::new();
        let fwd = Fwd::start(&ns, driver, ALLOW_ANY, |_| {});
        ns.redirect_to(&fwd);
        let dst = SocketAddr::new(ns.v4(3), 7100);
        let (mut c, mut s) = ns.connected(dst);
        timeouts(&c);
        timeouts(&s);
        for client_sends in [true, false] {
            let (from, to) = if client_sends { (&mut c, &mut s) } else { (&mut s, &mut c) };
            let mut got = [0u8; 2];
            from.write_all(b"ab").unwrap();
            to.read_exact(&mut got).unwrap();
            assert_eq!(&got, b"ab");
            socket2::SockRef::from(&*from).send_out_of_band(b"!").unwrap();
            std::thread::sleep(Duration::from_millis(50));
            from.write_all(b"cd").unwrap();
            // The receiver reads the urgent byte before it reads past the mark (as it would direct).
            let deadline = std::time::Instant::now() + Duration::from_secs(5);
            let mut oob = [0u8; 1];
            while recv(to.as_raw_fd(), &mut oob, MsgFlags::MSG_OOB | MsgFlags::MSG_DONTWAIT).is_err() {
                assert!(std::time::Instant::now() < deadline, "{driver:?}: no urgent byte came");
                std::thread::sleep(Duration::from_millis(10));
            }
            assert_eq!(oob[0], b'!', "{driver:?}");
            to.read_exact(&mut got).map_err(|e| format!("{driver:?}: {e}")).unwrap();
            assert_eq!(&got, b"cd", "{driver:?}");
        }
        // An urgent byte alone, nothing after it (telnet's Synch, sent last):
        // the socket does not poll readable for it unless urgent data is inline.
        for (from, to) in [(&c, &s), (&s, &c)] {
            socket2::SockRef::from(from).send_out_of_band(b"#").unwrap();
            let deadline = std::time::Instant::now() + Duration::from_secs(3);
            let mut oob = [0u8; 1];
            while recv(to.as_raw_fd(), &mut oob, MsgFlags::MSG_OOB | MsgFlags::MSG_DONTWAIT).is_err() {
                assert!(std::time::Instant::now() < deadline, "{driver:?}: a lone urgent byte did not come");
                std::thread::sleep(Duration::from_millis(10));
            }
            assert_eq!(oob[0], b'#', "{driver:?}");
        }
        // Urgent data with the end right behind it: splice(2) at the mark with
        // the FIN queued reads as the end; the bytes past the mark must still come.
        c.write_all(b"xy").unwrap();
        socket2::SockRef::from(&c).send_out_of_band(b"!").unwrap();
        c.write_all(b"zw").unwrap();
        c.shutdown(Shutdown::Write).unwrap();
        let mut rest = Vec::new();
        s.read_to_end(&mut rest).unwrap();
        assert_eq!(rest, b"xyzw", "{driver:?}: every byte before the end");
        drop((c, s));
        let reports = fwd.wait_reports(1);
        assert_eq!(reports[0].outcome, ConnOutcome::Spliced(End::Closed), "{driver:?}");
    }
}

/// An answer written in two pieces (a header, then its body) reaches the
/// client as soon as each piece reaches sluice: the client's socket does
/// not hold the second back until the first is acknowledged (Nagle's
/// algorithm against the client's delayed ACK: ~40 ms per exchange on a
/// keep-alive connection, where a direct connection has none).
#[test]
fn answers_in_two_pieces_are_not_held_back() {
    const EXCHANGES: u32 = 30;
    for driver in DRIVERS {
        let ns = Netns::new();
        let fwd = Fwd::start(&ns, driver, ALLOW_ANY, |_| {});
        ns.redirect_to(&fwd);
        let dst = SocketAddr::new(ns.v4(3), 7200);
        let (mut c, mut s) = ns.connected(dst);
        timeouts(&c);
        timeouts(&s);
        s.set_nodelay(true).unwrap();
        c.set_nodelay(true).unwrap();
        let server = std::thread::spawn(move || {
            let mut q = [0u8; 1];
            for _ in 0..EXCHANGES {
                s.read_exact(&mut q).unwrap();
                s.write_all(b"head").unwrap();
                std::thread::sleep(Duration::from_millis(2));
                s.write_all(b"body").unwrap();
            }
        });
        let started = std::time::Instant::now();
        let mut answer = [0u8; 8];
        for _ in 0..EXCHANGES {
            c.write_all(b"?").unwrap();
            c.read_exact(&mut answer).unwrap();
        }
        let took = started.elapsed();
        server.join().unwrap();
        // Each exchange takes ~2 ms; held back, each would take ~40 ms more.
        assert!(took < Duration::from_millis(EXCHANGES as u64 * 25), "{driver:?}: {EXCHANGES} exchanges took {took:?}");
    }
}
