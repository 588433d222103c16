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
/// worker), keep them while the connection lives, and let them go with it.
#[test]
fn bulk_pipes_grow_within_the_budget_and_go_with_their_connection() {
    const CONNS: usize = 40;
    for driver in DRIVERS {
        let ns = Netns::new();
        let fwd = Fwd::start(&ns, driver, ALLOW_ANY, |_| {});
        ns.redirect_to(&fwd);
        let dst = SocketAddr::new(ns.v4(9), 7007);
        let l = ns.within(move || TcpListener::bind(dst).unwrap());
        let chunk = vec![7u8; 1 << 20];
        let mut buf = vec![0u8; 1 << 20];
        let mut held = Vec::new();
        for _ in 0..CONNS {
            let c = ns.within(move || TcpStream::connect(dst).unwrap());
            let (s, _) = l.accept().unwrap();
            // 16 MiB down, read as it comes: the forwarder fills its pipe again and again.
            let writer = {
                let (s, chunk) = (s.try_clone().unwrap(), chunk.clone());
                std::thread::spawn(move || (0..16).for_each(|_| (&s).write_all(&chunk).unwrap()))
            };
            let mut got = 0;
            while got < 16 << 20 {
                got += (&c).read(&mut buf).unwrap();
            }
            writer.join().unwrap();
            held.push((c, s));
        }
        let grown = grown_pipes().len();
        assert!(grown > 0, "{driver:?}: no bulk transfer grew its pipe");
        assert!(grown <= 16 * 2, "{driver:?}: {grown} grown pipes held by 2 workers (budget 16 each)");
        drop(held);
        std::thread::sleep(Duration::from_millis(300));
        assert_eq!(grown_pipes().len(), 0, "{driver:?}: grown pipes outlived their connections");
        drop(fwd);
    }
}
