//! The `tcp-relay` target (bulk scenarios only): the floor under a splicing
//! TCP proxy on this machine. A bare transparent relay in this process — an
//! accepting thread, then per connection one thread per direction doing
//! blocking `splice(2)` socket → pipe (1 MiB) → socket until EOF, then
//! `shutdown(SHUT_WR)` — with the same REDIRECT rule as the other proxies and
//! the original destination from `SO_ORIGINAL_DST`. No readiness waits, no
//! policy, no metrics, no limits: what it reaches is what the wake-ups and
//! TCP work of a second connection allow here, which no proxy can beat. A
//! thread per direction is fine for a few streams, not for the short or
//! idle scenarios, which it does not run.

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::{Context, Result};
use nix::fcntl::{FcntlArg, SpliceFFlags, fcntl, splice};
use nix::sys::socket::{Shutdown, getsockopt, shutdown, sockopt};

use crate::ns::{MARK, Netns};

/// Its threads' names start with this: their CPU is the relay's.
pub(crate) const TCP_RELAY_THREAD: &str = "tcp-relay";
/// Each direction's pipe, as sluice's grown bulk pipes.
const PIPE: usize = 1 << 20;
/// How often the accepting thread looks at the stop flag.
const STOP_POLL: Duration = Duration::from_millis(5);

/// The running relay; stops accepting on drop (connections end with their streams).
pub(crate) struct TcpRelay {
    pub(crate) port: u16,
    stop: Arc<AtomicBool>,
    accepting: Option<JoinHandle<Result<()>>>,
    pumps: Arc<Mutex<Vec<JoinHandle<()>>>>,
}

impl TcpRelay {
    /// Listens on 127.0.0.1 (a free port) in the namespace and starts accepting.
    pub(crate) fn start(ns: &Netns) -> Result<TcpRelay> {
        let listener = ns.within(|| -> std::io::Result<TcpListener> {
            let l = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
            l.set_nonblocking(true)?;
            Ok(l)
        })??;
        let port = listener.local_addr()?.port();
        let stop = Arc::new(AtomicBool::new(false));
        let pumps = Arc::new(Mutex::new(Vec::new()));
        let (s, p) = (stop.clone(), pumps.clone());
        // In the namespace: the upstream sockets it makes must be there too.
        let accepting = ns
            .spawn(&format!("{TCP_RELAY_THREAD}-acc"), move || accept(&listener, &s, &p))
            .context("starting the relay's accepting thread")?;
        Ok(TcpRelay { port, stop, accepting: Some(accepting), pumps })
    }

    /// Whether the accepting thread has ended (only a panic ends it before drop).
    pub(crate) fn ended(&self) -> bool {
        self.accepting.as_ref().is_none_or(|t| t.is_finished())
    }
}

impl Drop for TcpRelay {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.accepting.take() {
            let _ = t.join();
        }
        // Bounded: a stream still open at the end of a run is left behind.
        let pumps = std::mem::take(&mut *self.pumps.lock().unwrap_or_else(PoisonError::into_inner));
        for t in pumps.into_iter().filter(|t| t.is_finished()) {
            let _ = t.join();
        }
    }
}

fn accept(listener: &TcpListener, stop: &AtomicBool, pumps: &Mutex<Vec<JoinHandle<()>>>) {
    while !stop.load(Ordering::Relaxed) {
        // Nothing to accept (or an error, EMFILE say): look at `stop` again in a moment.
        let Ok((client, _)) = listener.accept() else {
            std::thread::sleep(STOP_POLL);
            continue;
        };
        let Ok(upstream) = connect_original(&client) else { continue };
        let mut pumps = pumps.lock().unwrap_or_else(PoisonError::into_inner);
        pumps.retain(|t| !t.is_finished());
        for (from, to) in [(&client, &upstream), (&upstream, &client)] {
            let (Ok(from), Ok(to)) = (from.try_clone(), to.try_clone()) else { continue };
            let thread = std::thread::Builder::new().name(format!("{TCP_RELAY_THREAD}-pump")).spawn(move || {
                let _ = pump(&from, &to);
                // EOF passed on, or an error: either way this direction is over.
                let _ = shutdown(to.as_raw_fd(), Shutdown::Write);
            });
            pumps.extend(thread.ok());
        }
    }
}

/// Connects to where the client was going (REDIRECT keeps it in
/// `SO_ORIGINAL_DST`), marked so the rule lets the relay's own connection through.
fn connect_original(client: &TcpStream) -> std::io::Result<TcpStream> {
    client.set_nonblocking(false)?;
    let dst = getsockopt(client, sockopt::OriginalDst)?;
    let dst = SocketAddrV4::new(Ipv4Addr::from(u32::from_be(dst.sin_addr.s_addr)), u16::from_be(dst.sin_port));
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
    socket.set_mark(MARK)?;
    socket.connect(&SocketAddr::V4(dst).into())?;
    Ok(socket.into())
}

/// `from` → `to` through a pipe until EOF (`Ok`) or an error.
fn pump(from: &TcpStream, to: &TcpStream) -> nix::Result<()> {
    let (r, w): (OwnedFd, OwnedFd) = nix::unistd::pipe()?;
    fcntl(w.as_fd(), FcntlArg::F_SETPIPE_SZ(PIPE as i32))?;
    loop {
        let n = splice(from, None, &w, None, PIPE, SpliceFFlags::SPLICE_F_MOVE)?;
        if n == 0 {
            return Ok(());
        }
        let mut left = n;
        while left > 0 {
            left -= splice(&r, None, to, None, left, SpliceFFlags::SPLICE_F_MOVE)?;
        }
    }
}
