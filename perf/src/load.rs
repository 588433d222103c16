//! Load generator and sinks, on tokio-uring (io_uring on the client side too),
//! each on its own thread inside the benchmark namespace. Every loop stops on
//! a flag, on a hard deadline, and on a count cap, whichever comes first.

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, mpsc};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow};
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

/// One short connection: connect, write 64 bytes, read 64 bytes, close.
async fn once(addr: SocketAddr) -> io::Result<()> {
    let s = TcpStream::connect(addr).await?;
    s.write_all(vec![0x5au8; MSG]).await.0?;
    read_exact(&s, MSG).await.map(drop)
}

async fn short(k: usize, ctl: Arc<Ctl>, live: impl Fn(&Ctl) -> bool) -> Vec<u32> {
    let mut samples = Vec::with_capacity(64 * 1024);
    let mut i = k;
    while live(&ctl) && samples.len() < MAX_SAMPLES {
        let addr = sink_addr(PORT_ECHO + (i % usize::from(ECHO_PORTS)) as u16);
        i += 1;
        let t0 = Instant::now();
        let res = timeout(OP_TIMEOUT, once(addr)).await;
        let took = t0.elapsed();
        if let Ok(Ok(())) = res {
            ctl.done.fetch_add(1, Relaxed);
            if ctl.measuring.load(Relaxed) {
                samples.push(took.as_micros().min(u128::from(u32::MAX)) as u32);
            }
        } else {
            ctl.errors.fetch_add(1, Relaxed);
            sleep(Duration::from_millis(1)).await; // a broken target must not make this spin
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

/// Opens `n` connections to the hold sink, 32 at a time.
async fn idle(n: usize, ctl: &Ctl, live: impl Fn(&Ctl) -> bool) -> Vec<TcpStream> {
    let mut conns = Vec::with_capacity(n);
    while conns.len() < n && live(ctl) {
        let batch = (n - conns.len()).min(32);
        let tasks: Vec<_> = (0..batch).map(|_| tokio_uring::spawn(connect(sink_addr(PORT_HOLD)))).collect();
        for t in tasks {
            match t.await {
                Ok(Ok(s)) => {
                    conns.push(s);
                    ctl.ready.fetch_add(1, Relaxed);
                }
                _ => drop(ctl.errors.fetch_add(1, Relaxed)),
            }
        }
    }
    conns
}

/// One short connection from inside the namespace (bounded): is the whole path up?
pub(crate) fn probe(ns: &Netns) -> Result<()> {
    let res = ns.within(|| tokio_uring::start(async { timeout(OP_TIMEOUT, once(sink_addr(PORT_ECHO))).await }))?;
    res.map_err(|_| anyhow!("probe timed out"))?.context("probe connection")
}
