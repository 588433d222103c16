//! Out of file descriptors, the DNS proxy's TCP accept backs off instead of
//! retrying at once (a busy loop on the control plane's thread), and serves
//! the waiting client once descriptors are free again. In its own test
//! binary: it lowers the process's RLIMIT_NOFILE.
#![allow(clippy::unwrap_used)]

mod common;

use std::net::TcpStream;
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use common::{Proxy, Upstream, query, shared, tcp_exchange, tcp_receive, tcp_send};
use hickory_proto::op::Message;
use hickory_proto::rr::RecordType;
use nix::sys::resource::{Resource, UsageWho, getrlimit, getrusage, setrlimit};
use socket2::{Domain, Socket, Type};

/// CPU time of the whole process (every thread) so far.
fn cpu() -> Duration {
    let usage = getrusage(UsageWho::RUSAGE_SELF).unwrap();
    let (u, s) = (usage.user_time(), usage.system_time());
    Duration::from_micros((u.tv_sec() * 1_000_000 + u.tv_usec() + s.tv_sec() * 1_000_000 + s.tv_usec()) as u64)
}

#[test]
fn out_of_descriptors_accepting_backs_off_and_resumes() {
    let up = Upstream::start();
    let proxy = Proxy::to(up.addr, shared(None));
    let ok = tcp_exchange(proxy.addr, &query(1, "api.sluice.test.", RecordType::A, None));
    assert_eq!(Message::from_vec(&ok).unwrap().metadata.id, 1);

    // The client's socket is made first: no descriptor is left for anyone afterwards.
    let client = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
    let lowest = std::fs::File::open("/dev/null").unwrap().as_raw_fd();
    setrlimit(Resource::RLIMIT_NOFILE, lowest as u64, hard).unwrap();
    // Connected by the kernel (the backlog); the proxy's accept fails with EMFILE.
    client.connect(&proxy.addr.into()).unwrap();
    let (cpu_before, wall) = (cpu(), Instant::now());
    std::thread::sleep(Duration::from_secs(1));
    let spent = cpu() - cpu_before;
    let elapsed = wall.elapsed();
    setrlimit(Resource::RLIMIT_NOFILE, soft, hard).unwrap();
    // Retrying at once keeps a core busy (~1 s of CPU in this second); backing off costs next to nothing.
    assert!(spent < elapsed / 5, "{spent:?} of CPU in {elapsed:?} while accepts failed");

    // Descriptors are back: the waiting client is accepted (within the backoff, ≤ 1 s) and answered.
    let mut s: TcpStream = client.into();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    tcp_send(&mut s, &query(2, "api.sluice.test.", RecordType::A, None));
    let reply = tcp_receive(&mut s).unwrap();
    assert_eq!(Message::from_vec(&reply).unwrap().metadata.id, 2);
}
