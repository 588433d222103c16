//! Idle connections hold no pipes. In its own test binary: it counts the
//! process's fds, which tests running beside it would disturb.
#![allow(clippy::unwrap_used)]

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::Duration;

use common::{ALLOW_ANY, DRIVERS, Fwd, Netns};

/// Idle connections hold no pipes: per connection, only the sockets
/// (here four in one process: client, forwarder's two, server) stay open.
#[test]
fn idle_connections_hold_no_pipes() {
    let fds = || std::fs::read_dir("/proc/self/fd").map(|d| d.count()).unwrap_or(0);
    for driver in DRIVERS {
        let ns = Netns::new();
        let fwd = Fwd::start(&ns, driver, ALLOW_ANY, |_| {});
        ns.redirect_to(&fwd);
        let dst = SocketAddr::new(ns.v4(9), 7006);
        let l = ns.within(move || TcpListener::bind(dst).unwrap());
        let before = fds();
        let mut held = Vec::new();
        for _ in 0..50 {
            let c = ns.within(move || TcpStream::connect(dst).unwrap());
            let (s, _) = l.accept().unwrap();
            (&c).write_all(b"x").unwrap(); // one byte through, then idle
            let mut b = [0u8; 1];
            (&s).read_exact(&mut b).unwrap();
            held.push((c, s));
        }
        std::thread::sleep(Duration::from_millis(200));
        let per_conn = (fds() - before) as f64 / 50.0;
        assert!(per_conn <= 4.2, "{driver:?}: {per_conn} fds per idle connection (pipes held?)");
        drop(held);
    }
}
