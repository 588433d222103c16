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
//! short connections create none once the pool is warm. A direction that
//! fills its pipe again and again is a bulk transfer: its pipe grows (one
//! `F_SETPIPE_SZ`) and stays with it while the transfer moves (a pause of a
//! second gives it back), within a small per-worker budget, so bulk memory
//! stays bounded.
//!
//! A direction that never has to wait (a fast source, a destination with
//! room: a single stream on loopback ran 300 ms so) gives the worker back
//! every [`YIELD_BYTES`] (on io_uring through a park of the worker), and
//! makes it park every [`PARK_EVERY`] of those turns on both drivers: the worker's other
//! connections, its accepts, its timers (idle, sniff deadlines, the
//! heartbeat the systemd watchdog hangs on) and a drain go on beside it.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
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
    /// sluice stopped and the drain time was over: both reset.
    Shutdown,
}

/// A worker's "drain time over" signal: every connection still splicing
/// ends at once with [`End::Shutdown`] — both sides reset (not closed, which
/// would tell them all went well) and the connection reported.
#[derive(Default)]
pub(crate) struct Abort {
    fired: Cell<bool>,
    /// The task of each connection that is splicing, by its slot.
    tasks: RefCell<HashMap<u64, Waker>>,
    next: Cell<u64>,
}

impl Abort {
    /// Ends every connection that is splicing (they end as their tasks run),
    /// and every wait on [`fired`](Self::fired).
    pub(crate) fn fire(&self) {
        self.fired.set(true);
        for (_, task) in self.tasks.borrow_mut().drain() {
            task.wake();
        }
    }

    /// `fut`'s output, or `None` if the drain time ends first: for a
    /// connection that is not splicing yet, or no longer (connecting
    /// upstream, writing its first bytes, refusing). (Smaller in every
    /// connection's task than a `select!` of the two.)
    pub(crate) async fn or<F: std::future::Future>(&self, fut: F) -> Option<F::Output> {
        let mut fut = std::pin::pin!(fut);
        let mut fired = std::pin::pin!(self.fired());
        std::future::poll_fn(|cx| {
            if let Poll::Ready(out) = fut.as_mut().poll(cx) {
                return Poll::Ready(Some(out));
            }
            fired.as_mut().poll(cx).map(|()| None)
        })
        .await
    }

    /// Resolves once the drain time is over.
    fn fired(&self) -> Fired<'_> {
        Fired { abort: self, slot: self.next_slot(), registered: Cell::new(false) }
    }

    /// A slot of its own in [`tasks`](Self::tasks), for one task's waker.
    fn next_slot(&self) -> u64 {
        let slot = self.next.get();
        self.next.set(slot + 1);
        slot
    }
}

/// [`Abort::fired`]'s future; its task leaves the registry when dropped.
pub(crate) struct Fired<'a> {
    abort: &'a Abort,
    slot: u64,
    /// Its waker is in the registry (once: a task's waker stays the same on
    /// its worker).
    registered: Cell<bool>,
}

impl std::future::Future for Fired<'_> {
    type Output = ();

    fn poll(self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> Poll<()> {
        if self.abort.fired.get() {
            return Poll::Ready(());
        }
        if !self.registered.replace(true) {
            self.abort.tasks.borrow_mut().insert(self.slot, cx.waker().clone());
        }
        Poll::Pending
    }
}

impl Drop for Fired<'_> {
    fn drop(&mut self) {
        if self.registered.get() {
            self.abort.tasks.borrow_mut().remove(&self.slot);
        }
    }
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
    pipes: PipeSizes,
    abort: &'a Abort,
    /// This connection's slot in `abort` (its task is registered once).
    slot: u64,
    registered: Cell<bool>,
    /// Directions that are done (the idle watch ends at 2).
    pumps_done: Cell<u8>,
}

impl Drop for Link<'_> {
    fn drop(&mut self) {
        if self.registered.get() {
            self.abort.tasks.borrow_mut().remove(&self.slot);
        }
    }
}

/// Pipe capacities: every direction starts with a `base` pipe; one that
/// keeps filling it (a bulk transfer) grows it to `max`, within a per-worker
/// budget ([`GROWN_MAX`]). Fewer, larger splices: measured ~0.26 → 0.18
/// proxy CPU-s per GB on loopback between 64 KiB and 1 MiB (perf/RESULTS.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct PipeSizes {
    pub(crate) base: usize,
    pub(crate) max: usize,
}

/// Splices until both directions are done. Half-closes propagate (EOF from
/// one side becomes `shutdown(SHUT_WR)` on the other); a reset or error on
/// either side resets both; idleness past `idle` ends both.
pub(crate) async fn splice_both(
    client: &TcpStream,
    upstream: &TcpStream,
    idle: Duration,
    pipes: PipeSizes,
    meter: &Meter,
    abort: &Abort,
) -> Outcome {
    let slot = abort.next_slot();
    let link = Link {
        meter,
        client,
        upstream,
        idle,
        last_activity: Cell::new(Instant::now()),
        failed: Cell::new(None),
        waker: RefCell::new(None),
        pipes,
        abort,
        slot,
        registered: Cell::new(false),
        pumps_done: Cell::new(0),
    };
    let (sent, received, ()) = monoio::join!(link.pumped(Side::Client), link.pumped(Side::Upstream), link.watch_idle());
    Outcome { sent, received, end: link.failed.get().unwrap_or(End::Closed) }
}

impl Link<'_> {
    fn ends(&self, from: Side) -> (&TcpStream, &TcpStream) {
        match from {
            Side::Client => (self.client, self.upstream),
            Side::Upstream => (self.upstream, self.client),
        }
    }

    /// [`pump`](Self::pump), then tells [`watch_idle`](Self::watch_idle)
    /// that one more direction is done.
    async fn pumped(&self, from: Side) -> u64 {
        let moved = self.pump(from).await;
        self.pumps_done.set(self.pumps_done.get() + 1);
        if let Some(w) = self.waker.borrow().as_ref() {
            w.wake_by_ref();
        }
        moved
    }

    /// Ends the connection when no byte has moved either way for `idle` (a
    /// one-way download leaves the other way quiet: the whole connection's
    /// activity counts), and at once when the worker's drain time is over
    /// ([`Abort`]: the connection's task is registered there from its first
    /// wait); returns once both directions are done. One timer
    /// per connection, armed once per `idle`: the directions' readiness waits
    /// carry none (a timer per wait cost 640 B of every connection's task
    /// per direction, and a timer-wheel insert and removal per wait).
    async fn watch_idle(&self) {
        loop {
            // An idle timeout past what the clock holds: never idle.
            let far = || Instant::now() + Duration::from_secs(365 * 86_400);
            let deadline = self.last_activity.get().checked_add(self.idle).unwrap_or_else(far);
            let done = std::future::poll_fn(|cx| {
                if self.failed.get().is_none() && self.abort.fired.get() {
                    self.fail(End::Shutdown);
                }
                if self.pumps_done.get() == 2 || self.failed.get().is_some() {
                    return Poll::Ready(());
                }
                *self.waker.borrow_mut() = Some(cx.waker().clone());
                if !self.registered.replace(true) {
                    self.abort.tasks.borrow_mut().insert(self.slot, cx.waker().clone());
                }
                Poll::Pending
            });
            // Biased, `done` first: a connection that finished as its idle
            // deadline passed ended well (and no random draw per poll).
            monoio::select! {
                biased;
                () = done => return,
                () = monoio::time::sleep_until(deadline.into()) => {}
            }
            if self.last_activity.get().elapsed() >= self.idle {
                self.fail(End::Idle);
                return;
            }
        }
    }

    /// One direction: `from` → the other side. Returns the bytes delivered.
    async fn pump(&self, from: Side) -> u64 {
        let (src, dst) = self.ends(from);
        let mut moved = 0u64;
        // Since the last wait: bytes moved (since the last yield), and yields.
        // (Small: they are in every connection's task, twice.)
        let (mut run_bytes, mut yields) = (0u32, 0u32);
        let mut held = Held::default();
        let mut eof = false;
        // The source polled readable since the last fill: a fill that finds
        // nothing then may be stuck at an urgent mark.
        let mut readied = false;
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
                return moved;
            }
            // Fill the pipe from the source, unless it still holds bytes.
            if held.bytes == 0 && !eof {
                if let Err(e) = held.take(self.pipes.base) {
                    // Boxed, with all its state: rare, and inline it would grow every
                    // connection's task (measured: +256 B).
                    if let Err(end) = Box::pin(self.wait_for_pipe(e, &mut held)).await {
                        self.fail(end);
                        return moved;
                    }
                }
                // splice(2) stops at TCP's urgent mark: it says EAGAIN though the
                // socket polled readable, or 0 when the end is queued behind it.
                let filled = held.fill(src, self.pipes);
                let suspect = match &filled {
                    Ok(0) => true,
                    Err(e) => readied && e.kind() == io::ErrorKind::WouldBlock,
                    Ok(_) => false,
                };
                let filled = if suspect && sys::at_urgent_mark(src) {
                    readied = false;
                    match self.cross_urgent_mark(src, dst, from).await {
                        Ok(Some(n)) => {
                            moved += n;
                            self.delivered(from, n);
                            continue;
                        }
                        Ok(None) => Ok(0), // the end, right after the mark: as a fill that read it
                        Err(end) => {
                            self.fail(end);
                            return moved;
                        }
                    }
                } else {
                    filled
                };
                match filled {
                    Ok(0) => {
                        eof = true;
                        held.release();
                    }
                    Ok(_) => readied = false,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        if let Err(end) = self.wait_for_source(src, from, &mut held).await {
                            self.fail(end);
                            return moved;
                        }
                        readied = true;
                        (run_bytes, yields) = (0, 0);
                        continue;
                    }
                    Err(_) => {
                        self.fail(error_end(from));
                        return moved;
                    }
                }
            }
            if eof && held.bytes == 0 {
                // Every byte delivered: pass the half-close on.
                let _ = sys::shutdown(dst, Shutdown::Write);
                return moved;
            }
            match held.drain(dst) {
                Ok(n) => {
                    moved += n as u64;
                    self.delivered(from, n as u64);
                    run_bytes = run_bytes.saturating_add(u32::try_from(n).unwrap_or(u32::MAX));
                    if run_bytes >= YIELD_BYTES {
                        run_bytes = 0;
                        yields += 1;
                        if yields >= PARK_EVERY {
                            // Timers fire only when the worker parks: a sleep makes it (≤ 1 ms).
                            // Boxed: inline, its timer would grow every connection's task.
                            Box::pin(monoio::time::sleep(Duration::ZERO)).await;
                            yields = 0;
                        } else {
                            // On io_uring a readiness op (the destination has room: at once)
                            // makes the worker park, which is when the ring (DEFER_TASKRUN)
                            // posts the other connections' completions and timers fire; on
                            // epoll it returns at once, and the yield lets the others in.
                            if let Err(end) = self.wait(dst, false, from).await {
                                self.fail(end);
                                return moved;
                            }
                            yield_now().await;
                        }
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if let Err(end) = self.wait(dst, false, from).await {
                        self.fail(end);
                        return moved;
                    }
                    (run_bytes, yields) = (0, 0);
                }
                Err(_) => {
                    self.fail(error_end(other(from)));
                    return moved;
                }
            }
        }
    }

    /// `n` bytes from `from` reached the other side: counted, and the
    /// connection is active.
    fn delivered(&self, from: Side, n: u64) {
        self.last_activity.set(Instant::now());
        match from {
            Side::Client => self.meter.upstream.increment(n),
            Side::Upstream => self.meter.client.increment(n),
        }
    }

    /// Crosses TCP's urgent mark on `src`, which `splice(2)` never does: it
    /// stops there, so without this one urgent byte (telnet's interrupt and
    /// Synch, FTP's `ABOR`, Oracle Net's break) would stall the direction for
    /// good, its worker polling in a loop, or with the end queued behind it
    /// read as the end, the bytes past it lost. The urgent byte is read in
    /// line (both sockets have `SO_OOBINLINE`) and goes to `dst` out of band
    /// as it came, after every byte before it (the pipe is empty here).
    /// Returns the bytes delivered (0 when the read was interrupted by a
    /// signal: the socket stays readable and this comes back), `None` at
    /// the end.
    async fn cross_urgent_mark(&self, src: &TcpStream, dst: &TcpStream, from: Side) -> Result<Option<u64>, End> {
        let mut byte = [0u8; 1];
        match sys::recv_now(src, &mut byte) {
            Ok(0) => Ok(None),
            Ok(_) => {
                self.send_urgent(dst, byte[0], from).await?;
                Ok(Some(1))
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock || e.kind() == io::ErrorKind::Interrupted => Ok(Some(0)),
            Err(_) => Err(error_end(from)),
        }
    }

    /// One byte to `dst` as urgent data, waiting for room.
    async fn send_urgent(&self, dst: &TcpStream, byte: u8, from: Side) -> Result<(), End> {
        loop {
            match sys::send_urgent(dst, byte) {
                Ok(_) => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => self.wait(dst, false, from).await?,
                Err(_) => return Err(error_end(other(from))),
            }
        }
    }

    /// Waits for the source to have bytes again. Idle directions hold no
    /// pipe: a base pipe goes back to the pool at once; a grown one is kept
    /// through a short pause (the next burst of the transfer), and given back
    /// if the pause lasts longer than [`BULK_PAUSE`], so the per-worker budget
    /// serves transfers that are moving.
    async fn wait_for_source(&self, src: &TcpStream, from: Side, held: &mut Held) -> Result<(), End> {
        if !held.grown {
            held.release();
            return self.wait(src, true, from).await;
        }
        // Boxed: only bulk transfers take this path, and inline its timer
        // would grow every connection's task (~1.5 KiB on idle connections).
        match Box::pin(monoio::time::timeout(BULK_PAUSE, self.wait(src, true, from))).await {
            Ok(r) => r,
            Err(_paused) => {
                held.release();
                self.wait(src, true, from).await
            }
        }
    }

    /// No pipe could be made (out of file descriptors or memory, the process
    /// or the node): the bytes wait in the source socket meanwhile — TCP
    /// holds the sender back, nothing is lost — and the pipe is tried again
    /// after a pause, 10 ms doubling to 1 s, until `held` has one. Past the
    /// idle timeout without one, or on any other error, the connection is
    /// reset (`UO`).
    async fn wait_for_pipe(&self, mut e: io::Error, held: &mut Held) -> Result<(), End> {
        let since = Instant::now();
        crate::metrics::pipe_shortage();
        warn_shortage(&e);
        let mut pause = Duration::from_millis(10);
        loop {
            if !sys::is_resource_exhaustion(&e) || since.elapsed() >= self.idle {
                tracing::warn!(error = %e, "no pipe for splicing: resetting the connection");
                return Err(End::Internal);
            }
            monoio::select! {
                biased;
                end = self.failure() => return Err(end),
                () = monoio::time::sleep(pause) => {}
            }
            pause = (pause * 2).min(Duration::from_secs(1));
            match held.take(self.pipes.base) {
                Ok(()) => return Ok(()),
                Err(again) => e = again,
            }
        }
    }

    /// Waits for readiness, or until the connection fails (the other
    /// direction, the idle watch, the drain's end).
    async fn wait(&self, s: &TcpStream, read: bool, from: Side) -> Result<(), End> {
        let ready = async { if read { s.readable(false).await } else { s.writable(false).await } };
        // Biased: no random draw on every poll of every wait.
        let ready = monoio::select! {
            biased;
            r = ready => r,
            end = self.failure() => return Err(end),
        };
        ready.map_err(|_| error_end(if read { from } else { other(from) }))
    }

    /// Resolves once the connection has failed: either direction, the idle
    /// watch, or the worker's drain time over (both seen by the watch).
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
            End::Idle | End::Internal | End::Shutdown => {
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

/// At most one line per worker every 10 s: a shortage hits many
/// connections at once.
fn warn_shortage(e: &io::Error) {
    thread_local! {
        static LAST: Cell<Option<Instant>> = const { Cell::new(None) };
    }
    if LAST.with(warning_due) {
        tracing::warn!(error = %e, "no pipe for splicing: connections wait for one (raise LimitNOFILE?)");
    }
}

/// Whether a warning that `last` times (a worker's own) is due: the first,
/// then at most one every 10 s; if so, now is its time.
pub(crate) fn warning_due(last: &Cell<Option<Instant>>) -> bool {
    let due = last.get().is_none_or(|t| t.elapsed() >= Duration::from_secs(10));
    if due {
        last.set(Some(Instant::now()));
    }
    due
}

/// Bytes a direction moves without waiting before it gives the worker back.
const YIELD_BYTES: u32 = 1 << 20;
/// Of those turns, every this many makes the worker park with a timer, for
/// the epoll driver's timers: 64 MiB, ~30 ms at the 2 GB/s of a loopback
/// stream here; a park costs up to a timer tick, 1 ms.
const PARK_EVERY: u32 = 64;

/// Pending once, having woken itself: the worker runs its other ready tasks
/// (and, on epoll, polls for events) before this one goes on (monoio has no
/// `yield_now`).
fn yield_now() -> impl std::future::Future<Output = ()> {
    let mut yielded = false;
    std::future::poll_fn(move |cx| {
        if yielded {
            return Poll::Ready(());
        }
        yielded = true;
        cx.waker().wake_by_ref();
        Poll::Pending
    })
}

/// Spare empty pipes per worker thread. Small: pooled pipes still count
/// against the user's pipe pages.
const POOL_MAX: usize = 32;

/// Pipes grown past the base size, per worker thread. What a grown pipe can
/// hold stays pinned while its destination does not read, so this bounds
/// the memory bulk transfers take: `GROWN_MAX × max` per worker.
const GROWN_MAX: usize = 16;

/// Consecutive fills that filled the pipe before a direction is taken for a
/// bulk transfer and its pipe grown.
const GROW_AFTER: u32 = 4;

/// A bulk transfer quiet for this long gives its grown pipe back; it grows
/// again if it resumes.
const BULK_PAUSE: Duration = Duration::from_secs(1);

thread_local! {
    static POOL: RefCell<Vec<Pipe>> = const { RefCell::new(Vec::new()) };
    static GROWN: Cell<usize> = const { Cell::new(0) };
}

/// The pipe one direction holds, the bytes in it, and whether it has grown.
/// Dropping it releases the pipe (however the direction ends).
#[derive(Default)]
struct Held {
    pipe: Option<Pipe>,
    bytes: usize,
    /// Fills in a row that filled the pipe.
    full: u32,
    /// Grown past the base size: counts against [`GROWN_MAX`] until released.
    grown: bool,
    /// A resize was refused: this direction does not try again.
    tried: bool,
}

impl Held {
    /// Makes sure a pipe is held: the one already held, a pooled one, or a new one.
    fn take(&mut self, base: usize) -> io::Result<()> {
        if self.pipe.is_none() {
            self.pipe = Some(match POOL.with(|p| p.borrow_mut().pop()) {
                Some(p) => p,
                None => Pipe::new(base)?,
            });
        }
        Ok(())
    }

    /// Splices from `src` into the (empty, held) pipe, up to its capacity;
    /// grows the pipe once the direction looks like a bulk transfer.
    fn fill<S: std::os::fd::AsRawFd>(&mut self, src: &S, sizes: PipeSizes) -> io::Result<usize> {
        let Some(p) = self.pipe.as_mut() else { return Err(no_pipe()) };
        let n = p.fill(src, p.size())?;
        self.bytes = n;
        self.full = if n == p.size() { self.full + 1 } else { 0 };
        // With the budget spent, a later fill tries again; a refused resize
        // (EPERM: pipe-max-size or the user's pipe pages) is not retried.
        if self.full >= GROW_AFTER && !self.tried && sizes.max > p.size() && GROWN.get() < GROWN_MAX {
            match p.resize(sizes.max) {
                Ok(()) => {
                    GROWN.set(GROWN.get() + 1);
                    self.grown = true;
                }
                Err(_) => self.tried = true,
            }
        }
        Ok(n)
    }

    /// Splices what the pipe holds into `dst`.
    fn drain<S: std::os::fd::AsRawFd>(&mut self, dst: &S) -> io::Result<usize> {
        let Some(p) = self.pipe.as_ref() else { return Err(no_pipe()) };
        let n = p.drain(dst, self.bytes)?;
        self.bytes -= n;
        Ok(n)
    }

    /// Lets the pipe go: back to the pool when empty and of the base size,
    /// closed otherwise (a pipe that may hold bytes is never pooled).
    fn release(&mut self) {
        let Some(p) = self.pipe.take() else { return };
        if self.grown {
            // The transfer paused or ended: it proves itself bulk again before regrowing.
            self.grown = false;
            self.full = 0;
            GROWN.set(GROWN.get().saturating_sub(1));
        } else if self.bytes == 0 {
            POOL.with(|pool| {
                let mut pool = pool.borrow_mut();
                if pool.len() < POOL_MAX {
                    pool.push(p);
                }
            });
        }
        self.bytes = 0;
    }
}

/// Filling or draining without a pipe held: a bug, and never taken for EOF.
fn no_pipe() -> io::Error {
    io::Error::other("no pipe held")
}

impl Drop for Held {
    fn drop(&mut self) {
        self.release();
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
