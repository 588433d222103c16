//! Load generator and sinks, on tokio-uring (io_uring on the client side too),
//! each on its own thread inside the benchmark namespace. Every loop stops on
//! a flag, on a hard deadline, and on a count cap, whichever comes first.

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, mpsc};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow};
use serde::Serialize;
use tokio::time::{sleep, timeout};
use tokio_uring::buf::BoundedBuf;
use tokio_uring::net::{TcpListener, TcpStream};

use crate::ns::{ECHO_PORTS, Netns, PORT_BULK, PORT_ECHO, PORT_HOLD, sink_addr};

/// Bytes per write (client) and per read (bulk sink).
const CHUNK: usize = 128 * 1024;
/// Request and response size of a short connection.
const MSG: usize = 64;
/// Latency samples kept per short-connection client (count cap of the loop).
const MAX_SAMPLES: usize = 2_000_000;
const OP_TIMEOUT: Duration = Duration::from_secs(2);

/// What the sinks have seen.
#[derive(Debug, Default)]
pub(crate) struct SinkStats {
    pub(crate) bulk_bytes: AtomicU64,
    pub(crate) hold_open: AtomicI64,
}

/// The sinks: one thread ("perf-sink"), listening on every sink port.
#[derive(Debug)]
pub(crate) struct Sink {
    pub(crate) stats: Arc<SinkStats>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<Result<()>>>,
}

impl Sink {
    pub(crate) fn start(ns: &Netns) -> Result<Sink> {
        let stats = Arc::new(SinkStats::default());
        let stop = Arc::new(AtomicBool::new(false));
        let (tx, rx) = mpsc::channel::<io::Result<()>>();
        let (st, sp) = (stats.clone(), stop.clone());
        let thread = ns.spawn("perf-sink", move || {
            tokio_uring::builder().entries(1024).start(async move {
                let listeners = match bind_all() {
                    Ok(l) => l,
                    Err(e) => return drop(tx.send(Err(e))),
                };
                for (port, l) in listeners {
                    let st = st.clone();
                    tokio_uring::spawn(accept_loop(port, l, st));
                }
                let _ = tx.send(Ok(()));
                while !sp.load(Relaxed) {
                    sleep(Duration::from_millis(50)).await;
                }
            })
        })?;
        rx.recv_timeout(Duration::from_secs(5)).context("sink did not start")?.context("binding the sinks")?;
        Ok(Sink { stats, stop, thread: Some(thread) })
    }
}

impl Drop for Sink {
    fn drop(&mut self) {
        self.stop.store(true, Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn bind_all() -> io::Result<Vec<(u16, TcpListener)>> {
    let ports = [PORT_BULK, PORT_HOLD].into_iter().chain((0..ECHO_PORTS).map(|i| PORT_ECHO + i));
    ports
        .map(|port| {
            use socket2::{Domain, Protocol, Socket, Type};
            let s = Socket::new(Domain::IPV4, Type::STREAM.cloexec(), Some(Protocol::TCP))?;
            s.set_reuse_address(true)?;
            s.bind(&sink_addr(port).into())?;
            s.listen(4096)?;
            Ok((port, TcpListener::from_std(s.into())))
        })
        .collect()
}

async fn accept_loop(port: u16, l: TcpListener, stats: Arc<SinkStats>) {
    loop {
        match l.accept().await {
            Ok((s, _)) => {
                let stats = stats.clone();
                tokio_uring::spawn(async move {
                    match port {
                        PORT_BULK => discard(s, &stats).await,
                        PORT_HOLD => {
                            stats.hold_open.fetch_add(1, Relaxed);
                            let _ = s.read(Vec::with_capacity(16)).await;
                            stats.hold_open.fetch_sub(1, Relaxed);
                        }
                        _ => echo(s).await,
                    }
                });
            }
            Err(_) => sleep(Duration::from_millis(5)).await,
        }
    }
}

async fn discard(s: TcpStream, stats: &SinkStats) {
    let mut buf = vec![0u8; CHUNK];
    loop {
        let (r, b) = s.read(buf).await;
        buf = b;
        match r {
            Ok(n) if n > 0 => drop(stats.bulk_bytes.fetch_add(n as u64, Relaxed)),
            _ => return,
        }
    }
}

/// Reads exactly `len` bytes into a fresh buffer (EOF before that is an error).
async fn read_exact(s: &TcpStream, len: usize) -> io::Result<Vec<u8>> {
    let mut buf = vec![0u8; len];
    let mut got = 0;
    while got < len {
        let (r, slice) = s.read(buf.slice(got..)).await;
        buf = slice.into_inner();
        match r? {
            0 => return Err(io::ErrorKind::UnexpectedEof.into()),
            n => got += n,
        }
    }
    Ok(buf)
}

/// Echoes `MSG`-byte messages until EOF.
async fn echo(s: TcpStream) {
    while let Ok(msg) = read_exact(&s, MSG).await {
        if s.write_all(msg).await.0.is_err() {
            return;
        }
    }
}

/// Shared between the benchmark thread and a generator's tasks.
#[derive(Debug, Default)]
pub(crate) struct Ctl {
    pub(crate) stop: AtomicBool,
    /// Latencies are recorded while this is set.
    pub(crate) measuring: AtomicBool,
    /// Connections established (bulk streams, idle connections).
    pub(crate) ready: AtomicU64,
    /// Short connections completed.
    pub(crate) done: AtomicU64,
    pub(crate) errors: AtomicU64,
    /// Short connections that failed, by [`Failure`] (each also counts in `errors`).
    failures: [AtomicU64; Failure::ALL.len()],
}

impl Ctl {
    fn fail(&self, f: Failure) {
        self.errors.fetch_add(1, Relaxed);
        self.failures[f as usize].fetch_add(1, Relaxed);
    }

    /// The short-connection failures so far.
    pub(crate) fn failures(&self) -> Failures {
        let n = |f: Failure| self.failures[f as usize].load(Relaxed);
        Failures {
            refused: n(Failure::Refused),
            reset: n(Failure::Reset),
            wrong_echo: n(Failure::WrongEcho),
            timed_out: n(Failure::TimedOut),
            other: n(Failure::Other),
        }
    }
}

/// Why one short connection failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Failure {
    /// The connect was refused.
    Refused,
    /// Connected, then reset or closed before the whole echo came back (a
    /// BlackHole verdict looks like this: the forwarder accepts, then resets).
    Reset,
    /// The echo came back, but not the bytes sent (a 502 page, another connection's data).
    WrongEcho,
    TimedOut,
    /// Any other I/O error (e.g. no local port left).
    Other,
}

impl Failure {
    const ALL: [Failure; 5] = [Failure::Refused, Failure::Reset, Failure::WrongEcho, Failure::TimedOut, Failure::Other];

    fn of(e: &io::Error) -> Failure {
        use io::ErrorKind::*;
        match e.kind() {
            ConnectionRefused => Failure::Refused,
            ConnectionReset | ConnectionAborted | BrokenPipe | UnexpectedEof => Failure::Reset,
            TimedOut => Failure::TimedOut,
            _ => Failure::Other,
        }
    }
}

/// Short-connection failures by kind.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub(crate) struct Failures {
    pub(crate) refused: u64,
    pub(crate) reset: u64,
    pub(crate) wrong_echo: u64,
    pub(crate) timed_out: u64,
    pub(crate) other: u64,
}

impl Failures {
    pub(crate) fn total(&self) -> u64 {
        self.refused + self.reset + self.wrong_echo + self.timed_out + self.other
    }

    /// The failures between `earlier` and this snapshot.
    pub(crate) fn since(&self, earlier: &Failures) -> Failures {
        Failures {
            refused: self.refused - earlier.refused,
            reset: self.reset - earlier.reset,
            wrong_echo: self.wrong_echo - earlier.wrong_echo,
            timed_out: self.timed_out - earlier.timed_out,
            other: self.other - earlier.other,
        }
    }
}

/// A generator running on its own thread ("perf-gen").
#[derive(Debug)]
pub(crate) struct Gen {
    pub(crate) ctl: Arc<Ctl>,
    /// Latency samples: µs for short connections, ns for keepalive round trips, nothing for the others.
    rx: mpsc::Receiver<Vec<u32>>,
}

#[derive(Debug, Clone, Copy)]
pub(crate) enum Load {
    /// Streams writing to the bulk sink.
    Bulk { streams: usize },
    /// Clients doing connect, 64 bytes each way, close, in a loop.
    Short { clients: usize },
    /// Connections opened to the hold sink and left idle.
    Idle { conns: usize },
    /// One persistent connection to an echo sink: 64 bytes each way, in a loop.
    Keepalive,
}

impl Drop for Gen {
    /// A scenario that gives up (an error) stops its generator at once: its
    /// connections must not outlive it, holding descriptors and ports the
    /// next target needs.
    fn drop(&mut self) {
        self.ctl.stop.store(true, Relaxed);
    }
}

impl Gen {
    /// Starts `load`; it runs until [`Gen::finish`] or `limit`, whichever is first.
    pub(crate) fn start(ns: &Netns, load: Load, limit: Duration) -> Result<Gen> {
        let ctl = Arc::new(Ctl::default());
        let (tx, rx) = mpsc::channel();
        let c = ctl.clone();
        let deadline = Instant::now() + limit;
        ns.spawn("perf-gen", move || {
            let out = tokio_uring::builder().entries(1024).start(generate(load, c, deadline));
            let _ = tx.send(out);
        })?;
        Ok(Gen { ctl, rx })
    }

    /// Waits (bounded) until `n` connections are up.
    pub(crate) fn wait_ready(&self, n: u64, within: Duration) -> Result<()> {
        let until = Instant::now() + within;
        while self.ctl.ready.load(Relaxed) < n {
            if Instant::now() > until {
                return Err(anyhow!(
                    "only {} of {n} connections up after {within:?} ({} errors)",
                    self.ctl.ready.load(Relaxed),
                    self.ctl.errors.load(Relaxed)
                ));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        Ok(())
    }

    /// Stops the generator and collects what it returns.
    pub(crate) fn finish(self, within: Duration) -> Result<Vec<u32>> {
        self.ctl.stop.store(true, Relaxed);
        self.rx.recv_timeout(within).context("generator did not stop in time")
    }
}

async fn generate(load: Load, ctl: Arc<Ctl>, deadline: Instant) -> Vec<u32> {
    let live = move |ctl: &Ctl| !ctl.stop.load(Relaxed) && Instant::now() < deadline;
    match load {
        Load::Bulk { streams } => {
            let tasks: Vec<_> = (0..streams).map(|_| tokio_uring::spawn(bulk(ctl.clone(), live))).collect();
            for t in tasks {
                let _ = t.await;
            }
            Vec::new()
        }
        Load::Short { clients } => {
            let tasks: Vec<_> = (0..clients).map(|k| tokio_uring::spawn(short(k, ctl.clone(), live))).collect();
            let mut all = Vec::new();
            for t in tasks {
                all.extend(t.await.unwrap_or_default());
            }
            all
        }
        Load::Keepalive => keepalive(ctl, live).await,
        Load::Idle { conns } => {
            let conns = idle(conns, &ctl, live).await;
            while live(&ctl) {
                sleep(Duration::from_millis(10)).await;
            }
            drop(conns);
            Vec::new()
        }
    }
}

async fn connect(addr: SocketAddr) -> io::Result<TcpStream> {
    timeout(OP_TIMEOUT, TcpStream::connect(addr)).await.unwrap_or_else(|_| Err(io::ErrorKind::TimedOut.into()))
}

async fn bulk(ctl: Arc<Ctl>, live: impl Fn(&Ctl) -> bool) {
    let Ok(s) = connect(sink_addr(PORT_BULK)).await else {
        ctl.errors.fetch_add(1, Relaxed);
        return;
    };
    ctl.ready.fetch_add(1, Relaxed);
    let mut buf = vec![0xa5u8; CHUNK];
    while live(&ctl) {
        match timeout(OP_TIMEOUT, s.write(buf).submit()).await {
            Ok((Ok(_), b)) => buf = b,
            _ => {
                ctl.errors.fetch_add(1, Relaxed);
                return;
            }
        }
    }
}

/// One short connection: connect, write 64 bytes of `fill`, read the 64-byte echo, check it, close.
async fn once(addr: SocketAddr, fill: u8) -> Result<(), Failure> {
    let exchange = async {
        let s = TcpStream::connect(addr).await.map_err(|e| Failure::of(&e))?;
        s.write_all(vec![fill; MSG]).await.0.map_err(|e| Failure::of(&e))?;
        let echoed = read_exact(&s, MSG).await.map_err(|e| Failure::of(&e))?;
        if echoed.iter().all(|b| *b == fill) { Ok(()) } else { Err(Failure::WrongEcho) }
    };
    timeout(OP_TIMEOUT, exchange).await.unwrap_or(Err(Failure::TimedOut))
}

async fn short(k: usize, ctl: Arc<Ctl>, live: impl Fn(&Ctl) -> bool) -> Vec<u32> {
    let mut samples = Vec::with_capacity(64 * 1024);
    let mut i = k;
    while live(&ctl) && samples.len() < MAX_SAMPLES {
        let addr = sink_addr(PORT_ECHO + (i % usize::from(ECHO_PORTS)) as u16);
        i += 1;
        // A different byte per connection: an echo of someone else's bytes is caught.
        let fill = (i % 251) as u8 + 1;
        let t0 = Instant::now();
        let res = once(addr, fill).await;
        let took = t0.elapsed();
        match res {
            Ok(()) => {
                ctl.done.fetch_add(1, Relaxed);
                if ctl.measuring.load(Relaxed) {
                    samples.push(took.as_micros().min(u128::from(u32::MAX)) as u32);
                }
            }
            Err(f) => {
                ctl.fail(f);
                sleep(Duration::from_millis(1)).await; // a broken target must not make this spin
            }
        }
    }
    samples
}

/// One connection to an echo sink, kept open: write 64 bytes, read the 64-byte
/// echo, repeat; a round-trip time (ns) per exchange while measuring. A broken
/// connection counts an error and is replaced (after 1 ms).
async fn keepalive(ctl: Arc<Ctl>, live: impl Fn(&Ctl) -> bool) -> Vec<u32> {
    let mut samples = Vec::with_capacity(256 * 1024);
    let mut buf = vec![0x5au8; MSG];
    'conn: while live(&ctl) && samples.len() < MAX_SAMPLES {
        let Ok(s) = connect(sink_addr(PORT_ECHO)).await else {
            ctl.errors.fetch_add(1, Relaxed);
            sleep(Duration::from_millis(1)).await;
            continue;
        };
        let _ = s.set_nodelay(true);
        ctl.ready.fetch_add(1, Relaxed);
        while live(&ctl) && samples.len() < MAX_SAMPLES {
            let t0 = Instant::now();
            let res = timeout(OP_TIMEOUT, async {
                let (r, b) = s.write_all(buf).await;
                r?;
                let echoed = read_exact(&s, MSG).await?;
                Ok::<_, io::Error>((b, echoed))
            })
            .await;
            let took = t0.elapsed();
            match res {
                Ok(Ok((b, _))) => {
                    buf = b;
                    ctl.done.fetch_add(1, Relaxed);
                    if ctl.measuring.load(Relaxed) {
                        samples.push(took.as_nanos().min(u128::from(u32::MAX)) as u32);
                    }
                }
                _ => {
                    ctl.errors.fetch_add(1, Relaxed);
                    buf = vec![0x5au8; MSG];
                    sleep(Duration::from_millis(1)).await;
                    continue 'conn;
                }
            }
        }
    }
    samples
}

/// Opens `n` connections to the hold sink, 32 at a time (a batch with
/// failures waits 1 ms: a broken target must not make this spin).
async fn idle(n: usize, ctl: &Ctl, live: impl Fn(&Ctl) -> bool) -> Vec<TcpStream> {
    let mut conns = Vec::with_capacity(n);
    while conns.len() < n && live(ctl) {
        let batch = (n - conns.len()).min(32);
        let tasks: Vec<_> = (0..batch).map(|_| tokio_uring::spawn(connect(sink_addr(PORT_HOLD)))).collect();
        let mut failed = false;
        for t in tasks {
            match t.await {
                Ok(Ok(s)) => {
                    conns.push(s);
                    ctl.ready.fetch_add(1, Relaxed);
                }
                _ => {
                    ctl.errors.fetch_add(1, Relaxed);
                    failed = true;
                }
            }
        }
        if failed {
            sleep(Duration::from_millis(1)).await;
        }
    }
    conns
}

/// One short connection from inside the namespace (bounded): is the whole path up?
pub(crate) fn probe(ns: &Netns) -> Result<()> {
    probe_port(ns, PORT_ECHO)
}

/// One short connection to sink `port` (bounded); an error says how it failed.
pub(crate) fn probe_port(ns: &Netns, port: u16) -> Result<()> {
    let res = ns.within(move || tokio_uring::start(once(sink_addr(port), 0x5a)))?;
    res.map_err(|f| anyhow!("probe connection to port {port}: {f:?}"))
}
