//! Bulk transfers' pipes. In its own test binary: it looks at every pipe the
//! process holds, which tests running beside it would disturb.
#![allow(clippy::unwrap_used)]

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::Duration;

use common::{ALLOW_ANY, DRIVERS, Fwd, Netns};

/// The grown pipes of bulk transfers — as distinct pipes (inode, size) open
/// in this process, found through `/proc/self/fd`.
fn grown_pipes() -> std::collections::BTreeSet<u64> {
    use std::os::unix::fs::MetadataExt;
    let mut grown = std::collections::BTreeSet::new();
    for e in std::fs::read_dir("/proc/self/fd").unwrap().flatten() {
        let is_pipe = std::fs::read_link(e.path()).is_ok_and(|t| t.to_string_lossy().starts_with("pipe:"));
        // Reopening /proc/self/fd/N opens the same pipe; its size is the pipe's.
        let Some(f) = is_pipe.then(|| std::fs::File::open(e.path()).ok()).flatten() else { continue };
        let size = nix::fcntl::fcntl(&f, nix::fcntl::FcntlArg::F_GETPIPE_SZ).unwrap_or(0);
        if size > 64 * 1024 {
            grown.insert(f.metadata().map(|m| m.ino()).unwrap_or(0));
        }
    }
    grown
}

/// Bulk transfers grow their pipes, within the per-worker budget (16 per
/// worker); a transfer that pauses gives its grown pipe back, and none
/// outlives its connection.
#[test]
fn bulk_pipes_grow_within_the_budget_and_go_back_when_the_transfer_pauses() {
    const CONNS: usize = 40;
    const BYTES: usize = 16 << 20;
    for driver in DRIVERS {
        let ns = Netns::new();
        let fwd = Fwd::start(&ns, driver, ALLOW_ANY, |_| {});
        ns.redirect_to(&fwd);
        let dst = SocketAddr::new(ns.v4(9), 7007);
        let l = ns.within(move || TcpListener::bind(dst).unwrap());
        let pairs: Vec<(TcpStream, TcpStream)> = (0..CONNS)
            .map(|_| {
                let c = ns.within(move || TcpStream::connect(dst).unwrap());
                (c, l.accept().unwrap().0)
            })
            .collect();
        // Every connection downloads at once; the pipes are looked at while they run.
        let mut transfers = Vec::new();
        for (c, s) in &pairs {
            let (c, s) = (c.try_clone().unwrap(), s.try_clone().unwrap());
            transfers.push(std::thread::spawn(move || {
                let chunk = vec![7u8; 1 << 20];
                (0..BYTES / chunk.len()).for_each(|_| (&s).write_all(&chunk).unwrap());
            }));
            transfers.push(std::thread::spawn(move || {
                let mut buf = vec![0u8; 1 << 20];
                let mut got = 0;
                while got < BYTES {
                    got += (&c).read(&mut buf).unwrap();
                }
            }));
        }
        let mut most = 0;
        while !transfers.iter().all(|t| t.is_finished()) {
            most = most.max(grown_pipes().len());
            std::thread::sleep(Duration::from_millis(5));
        }
        transfers.into_iter().for_each(|t| t.join().unwrap());
        assert!(most > 0, "{driver:?}: no bulk transfer grew its pipe");
        assert!(most <= 16 * 2, "{driver:?}: {most} grown pipes at once in 2 workers (budget 16 each)");
        // The connections stay open but quiet: past the pause (1 s) the grown pipes go back.
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while !grown_pipes().is_empty() && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        let left = grown_pipes().len();
        assert_eq!(left, 0, "{driver:?}: {left} grown pipes still held by quiet connections after 5 s");
        drop(pairs);
        drop(fwd);
    }
}
