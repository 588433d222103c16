//! Moving bytes both ways, the measured fast way (DESIGN.md): readiness from
//! the runtime (io_uring `POLL_ADD` on the uring driver, epoll on the
//! fallback), data moved by a direct non-blocking `splice(2)` through a
//! per-direction pipe. No `IORING_OP_SPLICE` (punted to io-wq threads), no
//! user-space copy. A splice is tried first; readiness is awaited only on
//! EAGAIN, so a busy stream costs no poll round trip per chunk.
//!
//! Pipes are held only while bytes are in flight: a direction takes one from
//! a small per-worker pool when it has something to move and gives it back,
//! empty, before waiting. Idle connections hold no pipe (no fds, no pipe
//! pages: unprivileged users' pipe pages are capped by
//! `fs.pipe-user-pages-soft`, past which new pipes shrink to 8 KiB), and
//! short connections create none once the pool is warm.

use std::cell::{Cell, RefCell};
use std::io;
use std::task::{Poll, Waker};
use std::time::{Duration, Instant};

use monoio::net::TcpStream;
use nix::sys::socket::Shutdown;

use crate::metrics::Meter;
use crate::sys::{self, Pipe};

/// How a spliced connection ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    /// Both sides closed their half (FIN each way).
    Closed,
    /// The client reset or failed; the upstream was reset in turn.
    ClientError,
    /// The upstream reset or failed; the client was reset in turn.
    UpstreamError,
    /// No byte moved either way for the idle timeout.
    Idle,
    /// sluice itself ran out of a resource (no pipe could be made): both reset.
    Internal,
}

/// Bytes moved and how it ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Outcome {
    /// Client → upstream.
    pub sent: u64,
    /// Upstream → client.
    pub received: u64,
    pub end: End,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Side {
    Client,
    Upstream,
}

/// Shared between the two directions of one connection.
struct Link<'a> {
    meter: &'a Meter,
    client: &'a TcpStream,
    upstream: &'a TcpStream,
    idle: Duration,
    last_activity: Cell<Instant>,
    failed: Cell<Option<End>>,
    /// The connection task, to wake the other direction when one fails.
    waker: RefCell<Option<Waker>>,
    pipe_size: usize,
}

/// Splices until both directions are done. Half-closes propagate (EOF from
/// one side becomes `shutdown(SHUT_WR)` on the other); a reset or error on
/// either side resets both; idleness past `idle` ends both.
pub(crate) async fn splice_both(
    client: &TcpStream,
    upstream: &TcpStream,
    idle: Duration,
    pipe_size: usize,
    meter: &Meter,
) -> Outcome {
    let link = Link {
        meter,
        client,
        upstream,
        idle,
        last_activity: Cell::new(Instant::now()),
        failed: Cell::new(None),
        waker: RefCell::new(None),
        pipe_size,
    };
    let (sent, received) = monoio::join!(link.pump(Side::Client), link.pump(Side::Upstream));
    Outcome { sent, received, end: link.failed.get().unwrap_or(End::Closed) }
}

impl Link<'_> {
    fn ends(&self, from: Side) -> (&TcpStream, &TcpStream) {
        match from {
            Side::Client => (self.client, self.upstream),
            Side::Upstream => (self.upstream, self.client),
        }
    }

    /// One direction: `from` → the other side. Returns the bytes delivered.
    async fn pump(&self, from: Side) -> u64 {
        let (src, dst) = self.ends(from);
        let mut moved = 0u64;
        let mut in_pipe = 0usize;
        let mut pipe: Option<Pipe> = None;
        let mut eof = false;
        // The upstream speaks after it has heard the client (or, for
        // server-first protocols, at once — readiness says so): a first
        // splice would only come back EAGAIN.
        if from == Side::Upstream
            && let Err(end) = self.wait(src, true, from).await
        {
            self.fail(end);
            return moved;
        }
        loop {
            if self.failed.get().is_some() {
                discard(pipe, in_pipe);
                return moved;
            }
            // Fill the pipe from the source, unless it still holds bytes.
            if in_pipe == 0 && !eof {
                let p = match pipe.take().map_or_else(|| take_pipe(self.pipe_size), Ok) {
                    Ok(p) => p,
                    Err(e) => {
                        tracing::warn!(error = %e, "no pipe for splicing: resetting the connection");
                        self.fail(End::Internal);
                        return moved;
                    }
                };
                match p.fill(src, self.pipe_size) {
                    Ok(0) => {
                        eof = true;
                        give_back(p);
                    }
                    Ok(n) => {
                        in_pipe = n;
                        pipe = Some(p);
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        give_back(p); // empty: idle directions hold no pipe
                        if let Err(end) = self.wait(src, true, from).await {
                            self.fail(end);
                            return moved;
                        }
                        continue;
                    }
                    Err(_) => {
                        give_back(p);
                        self.fail(error_end(from));
                        return moved;
                    }
                }
            }
            if eof && in_pipe == 0 {
                // Every byte delivered: pass the half-close on.
                let _ = sys::shutdown(dst, Shutdown::Write);
                return moved;
            }
            let Some(p) = pipe.as_ref() else { continue };
            match p.drain(dst, in_pipe) {
                Ok(n) => {
                    in_pipe -= n;
                    moved += n as u64;
                    self.last_activity.set(Instant::now());
                    match from {
                        Side::Client => self.meter.upstream.increment(n as u64),
                        Side::Upstream => self.meter.client.increment(n as u64),
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if let Err(end) = self.wait(dst, false, from).await {
                        self.fail(end);
                        discard(pipe, in_pipe);
                        return moved;
                    }
                }
                Err(_) => {
                    self.fail(error_end(other(from)));
                    discard(pipe, in_pipe);
                    return moved;
                }
            }
        }
    }

    /// Waits for readiness, waking at least every `idle` to check the whole
    /// connection's idleness (a one-way download leaves the other way quiet),
    /// and at once when the other direction fails.
    async fn wait(&self, s: &TcpStream, read: bool, from: Side) -> Result<(), End> {
        loop {
            let ready = monoio::select! {
                r = monoio::time::timeout(self.idle, s.readable(false)), if read => r,
                r = monoio::time::timeout(self.idle, s.writable(false)), if !read => r,
                end = self.failure() => return Err(end),
            };
            match ready {
                Ok(Ok(())) => return Ok(()),
                Ok(Err(_)) => return Err(error_end(if read { from } else { other(from) })),
                Err(_elapsed) => {
                    if self.last_activity.get().elapsed() >= self.idle {
                        return Err(End::Idle);
                    }
                }
            }
        }
    }

    /// Resolves once either direction has failed.
    fn failure(&self) -> impl std::future::Future<Output = End> + '_ {
        std::future::poll_fn(|cx| match self.failed.get() {
            Some(end) => Poll::Ready(end),
            None => {
                *self.waker.borrow_mut() = Some(cx.waker().clone());
                Poll::Pending
            }
        })
    }

    /// Ends both directions. The side that did not fail is reset (SO_LINGER
    /// 0: the RST goes out when the connection's sockets are dropped), never
    /// half-closed first — a FIN would tell the peer all went well.
    fn fail(&self, end: End) {
        if self.failed.get().is_some() {
            return;
        }
        self.failed.set(Some(end));
        match end {
            End::ClientError => sys::reset_on_close(self.upstream),
            End::UpstreamError => sys::reset_on_close(self.client),
            End::Idle | End::Internal => {
                sys::reset_on_close(self.client);
                sys::reset_on_close(self.upstream);
            }
            End::Closed => {}
        }
        if let Some(w) = self.waker.borrow_mut().take() {
            w.wake();
        }
    }
}

/// Spare empty pipes per worker thread. Small: pooled pipes still count
/// against the user's pipe pages.
const POOL_MAX: usize = 32;

thread_local! {
    static POOL: RefCell<Vec<Pipe>> = const { RefCell::new(Vec::new()) };
}

fn take_pipe(size: usize) -> io::Result<Pipe> {
    match POOL.with(|p| p.borrow_mut().pop()) {
        Some(p) => Ok(p),
        None => Pipe::new(size),
    }
}

/// Returns an empty pipe to the pool (or closes it when the pool is full).
fn give_back(p: Pipe) {
    POOL.with(|pool| {
        let mut pool = pool.borrow_mut();
        if pool.len() < POOL_MAX {
            pool.push(p);
        }
    });
}

/// A pipe that may still hold bytes is closed, never pooled.
fn discard(p: Option<Pipe>, in_pipe: usize) {
    if let Some(p) = p
        && in_pipe == 0
    {
        give_back(p);
    }
}

fn other(side: Side) -> Side {
    match side {
        Side::Client => Side::Upstream,
        Side::Upstream => Side::Client,
    }
}

fn error_end(side: Side) -> End {
    match side {
        Side::Client => End::ClientError,
        Side::Upstream => End::UpstreamError,
    }
}
