//! Out of file descriptors mid-connection: a direction that needs a pipe
//! waits for one (the bytes wait in the socket, TCP holds the sender back)
//! instead of resetting the connection, and every byte arrives once
//! descriptors are free again. In its own test binary: it lowers the
//! process's RLIMIT_NOFILE.
#![allow(clippy::unwrap_used)]

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::time::Duration;

use common::{ALLOW_ANY, DRIVERS, Fwd, Netns};
use metrics_exporter_prometheus::PrometheusBuilder;
use nix::sys::resource::{Resource, getrlimit, setrlimit};

/// More than the sockets on the way can buffer with the namespace's buffer
/// limits lowered (below): the client stays blocked, so its direction's pipe
/// stays held with bytes in it.
const STUCK: usize = 8 << 20;
const REPLY: usize = 256 << 10;

/// RLIMIT_NOFILE lowered while held; the old limit comes back when it is
/// dropped (a failed assertion included).
struct Limit {
    soft: u64,
    hard: u64,
}

impl Limit {
    fn to(soft: u64) -> Limit {
        let (old, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
        setrlimit(Resource::RLIMIT_NOFILE, soft, hard).unwrap();
        Limit { soft: old, hard }
    }
}

impl Drop for Limit {
    fn drop(&mut self) {
        let _ = setrlimit(Resource::RLIMIT_NOFILE, self.soft, self.hard);
    }
}

#[test]
fn a_connection_waits_for_a_pipe_while_descriptors_run_out() {
    let prometheus = PrometheusBuilder::new().install_recorder().unwrap();
    let shortages = || {
        let text = prometheus.render();
        let line = text.lines().find(|l| l.starts_with("sluice_forwarder_pipe_shortages_total "));
        line.and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok()).unwrap_or(0.0)
    };
    for driver in DRIVERS {
        let ns = Netns::new();
        // With buffers autotuned to 32 MiB the stuck bytes could all fit in them, the emptied pipe go
        // back to the pool and the reply direction find it there (a flaky test).
        ns.small_socket_buffers();
        let fwd = Fwd::start(&ns, driver, ALLOW_ANY, |c| c.workers = 1);
        ns.redirect_to(&fwd);
        let dst = SocketAddr::new(ns.v4(9), 7010);
        let l = ns.within(move || TcpListener::bind(dst).unwrap());
        // Three connections whose servers do not read yet: each client → upstream direction holds a
        // full pipe, so the worker's pool of spare pipes is empty.
        let mut conns = Vec::new();
        for _ in 0..3 {
            let c = ns.within(move || TcpStream::connect(dst).unwrap());
            let (s, _) = l.accept().unwrap();
            let w = c.try_clone().unwrap();
            let writer = std::thread::spawn(move || (&w).write_all(&vec![7u8; STUCK]).map_err(|e| e.kind()));
            conns.push((c, s, writer));
        }
        std::thread::sleep(Duration::from_millis(300));
        assert!(
            conns.iter().all(|(_, _, w)| !w.is_finished()),
            "{driver:?}: every client is still sending (its pipe holds bytes)"
        );
        let before = shortages();

        // No descriptor left for the process: the lowest free one is the limit.
        let lowest = std::fs::File::open("/dev/null").unwrap().as_raw_fd();
        let (c, s, _) = &conns[0];
        s.set_write_timeout(Some(Duration::from_secs(10))).unwrap();
        let limited = Limit::to(lowest as u64);
        // The first server answers: that direction needs a pipe it cannot make now.
        (&*s).write_all(&vec![9u8; REPLY]).unwrap();
        let t = std::time::Instant::now();
        while shortages() <= before && t.elapsed() < Duration::from_secs(5) {
            std::thread::sleep(Duration::from_millis(10));
        }
        drop(limited);
        assert!(shortages() > before, "{driver:?}: the forwarder did run out of pipes");

        // Everything arrives: the reply, and what each client sent.
        c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut reply = vec![0u8; REPLY];
        (&*c).read_exact(&mut reply).unwrap_or_else(|e| panic!("{driver:?}: {e}"));
        assert!(reply.iter().all(|b| *b == 9));
        assert!(fwd.reports.lock().unwrap().is_empty(), "{driver:?}: no connection was reset");
        for (_, s, writer) in conns {
            s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            let mut got = vec![0u8; STUCK];
            (&s).read_exact(&mut got).unwrap_or_else(|e| panic!("{driver:?}: {e}"));
            assert!(got.iter().all(|b| *b == 7));
            assert_eq!(writer.join().unwrap(), Ok(()));
        }
    }
}
