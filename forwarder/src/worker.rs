//! Worker threads: one monoio runtime each, an accept loop per listener,
//! a cap on connections, EMFILE backoff, and a clean shutdown.

use std::cell::Cell;
use std::io;
use std::net::SocketAddr;
use std::os::unix::net::UnixStream as StdUnixStream;
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use monoio::net::{TcpListener, UnixStream};

use crate::conn::{self, Listener};
use crate::{Accept, Config, Driver, Shared, listener, sys};

/// How often each worker's event loop bumps its heartbeat counter.
const HEARTBEAT: Duration = Duration::from_millis(250);
/// The names of the destinations of open connections are renewed four times
/// per `grace`, at most every this long (the default 10 m grace: every minute).
const RENEW_IN_USE_MAX: Duration = Duration::from_secs(60);

/// The running forwarder. [`Handle::shutdown`] stops it with a drain;
/// dropping the handle stops the workers at once (no drain).
#[derive(Debug)]
pub struct Handle {
    /// The bound address of each configured listener (port 0 resolved).
    pub local_addrs: Vec<SocketAddr>,
    /// Which driver each worker got ("io_uring" or "epoll").
    pub drivers: Vec<&'static str>,
    /// One counter per worker, bumped by its event loop every [`HEARTBEAT`]
    /// (250 ms): a counter that stops moving means a stuck worker (watchdog).
    pub heartbeats: Vec<Arc<AtomicU64>>,
    stop: Vec<StdUnixStream>,
    threads: Vec<JoinHandle<()>>,
}

impl Handle {
    /// Current heartbeat counts, one per worker.
    pub fn beats(&self) -> Vec<u64> {
        self.heartbeats.iter().map(|h| h.load(Ordering::Relaxed)).collect()
    }

    /// Stops accepting, lets open connections finish for up to `drain`,
    /// then closes what is left and joins the workers.
    pub fn shutdown(mut self, drain: Duration) {
        let secs = drain.as_millis().min(u128::from(u32::MAX)) as u32;
        for s in &self.stop {
            use std::io::Write;
            let _ = (&*s).write_all(&secs.to_le_bytes());
        }
        self.stop.clear();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// Binds every listener on every worker and starts the workers. Fails (with
/// nothing left running) if a bind fails or the requested driver is unavailable.
pub fn start(config: Config, shared: Shared) -> io::Result<Handle> {
    crate::metrics::register();
    let workers = config.workers.max(1);
    let mut per_worker: Vec<Vec<std::net::TcpListener>> = (0..workers).map(|_| Vec::new()).collect();
    let mut local_addrs = Vec::new();
    let uring = match config.driver {
        Driver::Epoll => false,
        Driver::Auto => monoio::utils::detect_uring(),
        Driver::Uring if monoio::utils::detect_uring() => true,
        Driver::Uring => {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "io_uring is not available (kernel.io_uring_disabled, seccomp, or an old kernel)",
            ));
        }
    };
    // Shared on io_uring: measured on 2 workers against HAProxy in alternating
    // runs, 1.07–1.10× its short-connection rate with one shared socket vs
    // 0.95–1.06× with a SO_REUSEPORT socket per worker, bulk and keepalive
    // unchanged (perf/RESULTS.md). A connection then waits for no busy worker.
    let one_socket = match config.accept {
        Accept::Shared => true,
        Accept::PerWorker => false,
        Accept::Auto => uring,
    };
    for l in &config.listen {
        let first = listener::bind(l, l.addr)?;
        let bound = first.local_addr()?;
        local_addrs.push(bound);
        for w in per_worker.iter_mut().skip(1) {
            w.push(if one_socket { first.try_clone()? } else { listener::bind(l, bound)? });
        }
        per_worker[0].push(first);
    }
    tracing::info!(accept = if one_socket { "shared" } else { "per-worker" }, "forwarder listeners bound");
    warn_if_few_descriptors(workers, config.max_connections_per_worker);
    let heartbeats: Vec<Arc<AtomicU64>> = (0..workers).map(|_| Arc::new(AtomicU64::new(0))).collect();
    // Filled as the workers start; on a failure, what started is stopped.
    let mut h = Handle { local_addrs, drivers: Vec::new(), heartbeats, stop: Vec::new(), threads: Vec::new() };
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    for (id, socks) in per_worker.into_iter().enumerate() {
        let beat = h.heartbeats[id].clone();
        match spawn_worker(id, socks, uring, &config, &shared, ready_tx.clone(), beat) {
            Ok((ours, t)) => {
                h.stop.push(ours);
                h.threads.push(t);
            }
            Err(e) => {
                // Out of descriptors or threads: the workers already started stop too.
                h.shutdown(Duration::ZERO);
                return Err(e);
            }
        }
    }
    drop(ready_tx); // the workers hold the only senders now
    for _ in 0..workers {
        match ready_rx.recv() {
            Ok(Ok(d)) => h.drivers.push(d),
            Ok(Err(e)) => {
                h.shutdown(Duration::ZERO);
                return Err(io::Error::new(e.kind(), format!("forwarder runtime: {e}")));
            }
            Err(_) => {
                h.shutdown(Duration::ZERO);
                return Err(io::Error::other("a forwarder worker died while starting (see the panic logged above)"));
            }
        }
    }
    Ok(h)
}

/// What a worker sends once, when its listeners are registered (its
/// driver) or when it cannot serve.
type Ready = std::sync::mpsc::Sender<io::Result<&'static str>>;

/// Starts worker `id` on its listening sockets; returns the stop socket's
/// other end and the thread.
fn spawn_worker(
    id: usize,
    socks: Vec<std::net::TcpListener>,
    uring: bool,
    config: &Config,
    shared: &Shared,
    ready: Ready,
    beat: Arc<AtomicU64>,
) -> io::Result<(StdUnixStream, JoinHandle<()>)> {
    let (ours, theirs) = StdUnixStream::pair()?;
    theirs.set_nonblocking(true)?;
    let (config, shared) = (config.clone(), shared.clone());
    // Sent once, then dropped: a worker that dies before it is ready (its
    // sender dropped as it unwinds) leaves start() no sender to wait on once
    // the others have reported.
    let ready = Cell::new(Some(ready));
    let t = std::thread::Builder::new().name(format!("sluice-fwd-{id}")).spawn(move || {
        #[cfg(test)]
        tests::maybe_die_before_ready(id);
        let auto = config.driver == Driver::Auto;
        let ready = &ready;
        // In the worker's runtime: its listeners registered with its driver,
        // then ready reported and connections served; or the error reported.
        let serve = move |driver: &'static str| async move {
            let ctx = Rc::new(conn::Ctx::new(config.clone(), shared, &socks, driver == "io_uring"));
            match register(config.listen, socks) {
                Ok(listeners) => {
                    report(ready, Ok(driver));
                    tracing::info!(worker = id, driver, "forwarder worker started");
                    worker(id, ctx, listeners, theirs, beat).await;
                }
                Err(e) => {
                    tracing::error!(worker = id, error = %e, "cannot register a listener with this worker's driver");
                    report(ready, Err(e));
                }
            }
        };
        // A ring that cannot be set up in this worker (locked memory, a
        // ring limit): with `auto`, this worker runs on epoll instead.
        let ring = match uring.then(|| uring_runtime(id)) {
            Some(Err(error)) if auto => {
                tracing::warn!(worker = id, %error, "cannot set up an io_uring ring: this worker uses epoll");
                None
            }
            ring => ring,
        };
        let res = if let Some(ring) = ring {
            ring.map(|mut rt| rt.block_on(serve("io_uring")))
        } else {
            monoio::RuntimeBuilder::<monoio::LegacyDriver>::new()
                .enable_timer()
                .build()
                .map(|mut rt| rt.block_on(serve("epoll")))
        };
        if let Err(e) = res {
            report(ready, Err(e));
        }
    })?;
    Ok((ours, t))
}

/// Sends a worker's readiness (its driver) or why it cannot serve, the
/// first time only.
fn report(ready: &Cell<Option<Ready>>, how: io::Result<&'static str>) {
    if let Some(ready) = ready.take() {
        let _ = ready.send(how);
    }
}

/// A worker's listening sockets registered with its runtime's driver (in
/// that runtime). All of them, or the worker does not serve and start()
/// fails: a worker that shares a listening socket it cannot accept on would
/// strand the connections the kernel hands it.
fn register(
    listens: Vec<crate::Listen>,
    socks: Vec<std::net::TcpListener>,
) -> io::Result<Vec<(crate::Listen, TcpListener)>> {
    listens.into_iter().zip(socks).map(|(listen, sock)| Ok((listen, TcpListener::from_std(sock)?))).collect()
}

/// A worker's io_uring runtime. The ring is set up with `SINGLE_ISSUER` and
/// `DEFER_TASKRUN` (Linux 6.1) where the kernel has them: completions are
/// then posted when the worker asks for them (as it parks), instead of
/// interrupting it while it runs. Measured on short connections against
/// HAProxy in alternating runs: ~9% less CPU per connection and a
/// connection rate 0.98–1.08× HAProxy's instead of 0.86–1.01×, bulk and
/// keepalive unchanged (perf/RESULTS.md). Each worker owns its ring and is
/// the only thread that submits to it, which is what the flags require.
/// Older kernels: a plain ring.
fn uring_runtime(id: usize) -> io::Result<monoio::Runtime<monoio::time::TimeDriver<monoio::IoUringDriver>>> {
    let build = |ring: io_uring::Builder| {
        monoio::RuntimeBuilder::<monoio::IoUringDriver>::new()
            .enable_timer()
            .uring_builder(ring)
            .with_entries(1024)
            .build()
    };
    let mut deferred = io_uring::IoUring::builder();
    deferred.setup_single_issuer().setup_defer_taskrun();
    build(deferred).or_else(|error| {
        tracing::info!(worker = id, %error, "io_uring without DEFER_TASKRUN (needs Linux 6.1)");
        build(io_uring::IoUring::builder())
    })
}

async fn worker(
    id: usize,
    ctx: Rc<conn::Ctx>,
    listeners: Vec<(crate::Listen, TcpListener)>,
    stop: StdUnixStream,
    beat: Arc<AtomicU64>,
) {
    let active = Rc::new(Cell::new(0usize));
    // Stopping cancels the waiting accepts. Not a timeout: an io_uring accept
    // dropped by a timer can lose a connection the kernel has just accepted
    // (its fd is never seen, the client left hanging); a cancelled one still
    // returns that connection.
    let accepts = monoio::io::Canceller::new();
    for (listen, l) in listeners {
        let (ctx, active, cancel) = (ctx.clone(), active.clone(), accepts.handle());
        monoio::spawn(accept_loop(id, l, listen, ctx, active, cancel));
    }
    let heart = ctx.clone();
    monoio::spawn(async move {
        let mut renew_at = std::time::Instant::now();
        while !heart.stopping.get() {
            beat.fetch_add(1, Ordering::Relaxed);
            if std::time::Instant::now() >= renew_at {
                let grace = heart.renew_in_use();
                renew_at = std::time::Instant::now() + (grace / 4).clamp(HEARTBEAT, RENEW_IN_USE_MAX);
            }
            monoio::time::sleep(HEARTBEAT).await;
        }
    });
    // Wait for the stop message: 4 bytes, the drain time in milliseconds.
    let drain = match UnixStream::from_std(stop) {
        Ok(mut s) => {
            use monoio::io::AsyncReadRent;
            let (n, buf) = s.read(Vec::with_capacity(4)).await;
            match n {
                Ok(4) => Duration::from_millis(u64::from(u32::from_le_bytes([buf[0], buf[1], buf[2], buf[3]]))),
                _ => Duration::ZERO,
            }
        }
        Err(_) => Duration::ZERO,
    };
    ctx.stopping.set(true);
    let _ = accepts.cancel();
    until_none_open(&active, drain).await;
    if active.get() > 0 {
        tracing::info!(worker = id, open = active.get(), "drain time over: resetting the remaining connections");
        ctx.abort.fire();
        // Their tasks end them and report them (connecting, writing the first
        // bytes, refusing or splicing); one still sniffing (bounded by the sniff
        // deadline) is dropped when the worker ends.
        until_none_open(&active, Duration::from_secs(1)).await;
    }
}

/// Waits until no connection is open, or for `at_most`.
async fn until_none_open(active: &Cell<usize>, at_most: Duration) {
    let deadline = std::time::Instant::now() + at_most;
    while active.get() > 0 && std::time::Instant::now() < deadline {
        monoio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn accept_loop(
    id: usize,
    l: TcpListener,
    listen: crate::Listen,
    ctx: Rc<conn::Ctx>,
    active: Rc<Cell<usize>>,
    cancel: monoio::io::CancelHandle,
) {
    let max = ctx.config.max_connections_per_worker.max(1);
    let mut backoff = Duration::from_millis(10);
    // Accept errors in a row: one about a single connection is retried at
    // once, but not for ever (an LSM or seccomp denial can look like one,
    // and comes back at once: on epoll the listener stays ready).
    let mut failing = 0u32;
    let port = l.local_addr().map_or(listen.addr.port(), |a| a.port());
    let kind = Listener { intercept: listen.intercept, v6: listen.addr.is_ipv6(), port };
    while !ctx.stopping.get() {
        if active.get() >= max {
            // Accepting pauses: the backlog holds new connections meanwhile.
            monoio::time::sleep(Duration::from_millis(5)).await;
            continue;
        }
        match l.cancelable_accept(cancel.clone()).await {
            // Accepted as the accept was cancelled: served (the drain waits for it).
            Ok((stream, peer)) => {
                backoff = Duration::from_millis(10);
                failing = 0;
                active.set(active.get() + 1);
                let (ctx, active) = (ctx.clone(), active.clone());
                monoio::spawn(async move {
                    conn::handle(stream, peer, kind, &ctx).await;
                    active.set(active.get() - 1);
                });
            }
            Err(_) if ctx.stopping.get() => break,
            Err(e) if sys::is_per_connection_accept_error(&e) && failing < PER_CONNECTION_RETRIES => {
                failing += 1;
                tracing::debug!(worker = id, error = %e, "accept failed (that connection only)")
            }
            Err(e) => {
                failing += 1;
                let backoff_ms = backoff.as_millis() as u64;
                if sys::is_resource_exhaustion(&e) {
                    tracing::warn!(worker = id, error = %e, backoff_ms, "accept: out of file descriptors or memory, backing off");
                } else {
                    tracing::warn!(worker = id, error = %e, backoff_ms, "accept failed, backing off");
                }
                monoio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(1));
            }
        }
    }
}

/// Accept errors about one connection retried at once in a row, before accepting backs off.
const PER_CONNECTION_RETRIES: u32 = 8;

/// Descriptors one spliced connection can hold: its two sockets and a pipe
/// (two ends) each way.
const FDS_PER_CONNECTION: u64 = 6;

/// Says so at start when the connection cap cannot be reached within
/// `RLIMIT_NOFILE`: nothing breaks past it (accepts back off, connections
/// wait for pipes), but the node's connections then wait.
fn warn_if_few_descriptors(workers: usize, per_worker: usize) {
    use nix::sys::resource::{Resource, getrlimit};
    let Ok((soft, _)) = getrlimit(Resource::RLIMIT_NOFILE) else { return };
    let need = (workers as u64).saturating_mul(per_worker as u64).saturating_mul(FDS_PER_CONNECTION);
    if soft < need {
        tracing::warn!(
            limit = soft,
            need,
            "RLIMIT_NOFILE is below what the connection cap may need (6 per connection): past it, accepting \
             backs off, connections wait for pipes and new ones are reset when their upstream socket cannot be \
             opened; raise LimitNOFILE or lower maxConnectionsPerWorker"
        );
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use std::sync::atomic::AtomicUsize;

    use arc_swap::ArcSwap;
    use sluice_policy::{NameTable, Snapshot};

    use super::*;
    use crate::{Intercept, Listen};

    /// 1 + the id of a worker that is to panic before it reports ready (0: none).
    static DIE_BEFORE_READY: AtomicUsize = AtomicUsize::new(0);

    pub(super) fn maybe_die_before_ready(id: usize) {
        if DIE_BEFORE_READY.load(Ordering::SeqCst) == id + 1 {
            panic!("test: worker {id} dies before it is ready");
        }
    }

    /// A worker that panics before it is ready makes start() fail, with the
    /// other workers stopped, instead of waiting for ever.
    #[test]
    fn a_worker_that_dies_while_starting_fails_the_start() {
        DIE_BEFORE_READY.store(2, Ordering::SeqCst); // worker 1 of 3
        let config = Config {
            listen: vec![Listen { addr: "127.0.0.1:0".parse().unwrap(), intercept: Intercept::Redirect }],
            workers: 3,
            driver: Driver::Epoll,
            ..Config::default()
        };
        let shared = Shared {
            policy: Arc::new(ArcSwap::from_pointee(Snapshot::empty())),
            names: Arc::new(NameTable::new(16)),
            report: Arc::new(|_: &crate::ConnReport| {}),
        };
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(start(config, shared).map(|h| h.local_addrs));
        });
        let got = rx.recv_timeout(Duration::from_secs(10)).expect("start() returned");
        DIE_BEFORE_READY.store(0, Ordering::SeqCst);
        let error = got.expect_err("start() failed");
        assert!(error.to_string().contains("died while starting"), "{error}");
    }
}
