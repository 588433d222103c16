//! DNS over TCP: sluice's own accept loop and message framing (RFC 1035
//! §4.2.2: each message behind its two-byte length), each query answered
//! by `handler::Proxy` (the upstream's answer as it came, or a local
//! reply). A connection's queries are answered concurrently, each reply
//! sent as soon as it is ready (RFC 7766 §6.2.1.1), up to [`PIPELINE`] at
//! once: a slow answer does not hold back the ones behind it.
//!
//! Not hickory-server's `Server` loop: it accepts without a cap (every
//! connection a pod opens to :53 holds one of the descriptors the forwarder
//! also lives on) and retries a failed accept at once, so out of descriptors
//! it spins on the control plane's thread. Here open connections are capped
//! (accepting pauses at the cap; the kernel's backlog holds the rest), a
//! failed accept backs off (10 ms doubling to 1 s), one client address
//! holds at most half of the cap (a new connection past its share is closed
//! at once), and a connection is closed when a query takes longer than the
//! idle timeout to arrive or its reply as long to be taken, or when more
//! than [`UNSENT_MAX`] of its answers wait for it to take them.
//!
//! Nor hickory-server's request handler: its response types re-encode the
//! answer, so a NOERROR answer hickory cannot parse could only become
//! SERVFAIL; here, as over UDP, the upstream's bytes go back as they came.

use std::io;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use metrics::Gauge;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};

use crate::handler::Proxy;
use crate::metrics as m;
use crate::share::{ClientShare, Shares};

/// Beyond any node's need, and what one semaphore call can take back.
const MAX_CONNECTIONS: usize = 1 << 20;

/// How long a stop waits for connections to finish the queries they are on.
pub(crate) const STOP_GRACE: Duration = Duration::from_secs(5);

/// Queries of one client connection answered at once; past them, the next
/// one is read when one is answered.
const PIPELINE: usize = 32;

/// Bytes of answers one connection may have waiting for the client to take
/// them (the one being written included): past it, the client is not reading
/// and the connection is closed. Without it, a client that pipelines
/// queries with large answers and reads none held [`PIPELINE`] answers of
/// up to 64 KiB on each of its connections (2 MiB each; 1,024 connections, 2 GiB).
const UNSENT_MAX: usize = 256 * 1024;

/// The TCP side of the proxy: its listeners, the connection cap, the idle timeout.
#[derive(Debug)]
pub(crate) struct TcpServer {
    proxy: Arc<Proxy>,
    slots: Arc<Semaphore>,
    max: usize,
    /// Open connections per client address: at most half of `max` each.
    by_client: Arc<Mutex<Shares>>,
    idle: Duration,
    open: Gauge,
}

impl TcpServer {
    pub(crate) fn new(proxy: Proxy, max_connections: usize, idle: Duration) -> TcpServer {
        let max = max_connections.clamp(1, MAX_CONNECTIONS);
        let open = metrics::gauge!(m::TCP_CONNECTIONS);
        let by_client = Arc::new(Mutex::new(Shares::of(max)));
        TcpServer { proxy: Arc::new(proxy), slots: Arc::new(Semaphore::new(max)), max, by_client, idle, open }
    }

    /// Answers on `listeners` until `shutdown` completes; then stops
    /// accepting, closes each connection once its current query is answered
    /// (waiting at most [`STOP_GRACE`]) and returns.
    pub(crate) async fn serve(self: Arc<Self>, listeners: Vec<TcpListener>, shutdown: impl Future<Output = ()>) {
        let (stop, stopping) = watch::channel(());
        let mut accepts = tokio::task::JoinSet::new();
        for listener in listeners {
            accepts.spawn(self.clone().accept_loop(listener, stopping.clone()));
        }
        shutdown.await;
        accepts.abort_all();
        drop(stop);
        let all = u32::try_from(self.max).unwrap_or(u32::MAX); // ≤ MAX_CONNECTIONS
        if tokio::time::timeout(STOP_GRACE, self.slots.acquire_many(all)).await.is_err() {
            tracing::warn!("DNS over TCP: connections still answering after {STOP_GRACE:?}, stopping anyway");
        }
    }

    async fn accept_loop(self: Arc<Self>, listener: TcpListener, stopping: watch::Receiver<()>) {
        let mut backoff = Duration::from_millis(10);
        let (mut warned, mut warned_share): (Option<Instant>, Option<Instant>) = (None, None);
        loop {
            let slot = match self.slots.clone().try_acquire_owned() {
                Ok(slot) => slot,
                Err(_) => {
                    if warned.is_none_or(|t| t.elapsed() >= Duration::from_secs(10)) {
                        warned = Some(Instant::now());
                        tracing::warn!(cap = self.max, "DNS over TCP: connection cap reached, accepting pauses");
                    }
                    match self.slots.clone().acquire_owned().await {
                        Ok(slot) => slot,
                        Err(_closed) => return,
                    }
                }
            };
            match listener.accept().await {
                Ok((stream, peer)) => {
                    backoff = Duration::from_millis(10);
                    let Some(share) = ClientShare::take(&self.by_client, peer.ip()) else {
                        // Closed unanswered: the client's resolver moves on (to UDP, or its next server).
                        if warned_share.is_none_or(|t| t.elapsed() >= Duration::from_secs(10)) {
                            warned_share = Some(Instant::now());
                            tracing::warn!(client = %peer.ip(), cap = self.max, "DNS over TCP: one client holds half the connection cap; its new ones are closed");
                        }
                        continue;
                    };
                    tokio::spawn(self.clone().connection(stream, (slot, share), stopping.clone()));
                }
                Err(e) if is_per_connection(&e) => tracing::debug!(error = %e, "DNS over TCP: accept failed"),
                Err(e) => {
                    tracing::warn!(error = %e, backoff_ms = backoff.as_millis() as u64, "DNS over TCP: accept failed, backing off");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                }
            }
        }
    }

    /// Queries, answered as they come, until the client closes, sends a
    /// frame that is not a DNS message or does not take a reply within the
    /// idle timeout, is idle that long (no query in flight, none arriving),
    /// or the proxy stops; those in flight are answered first, but after a
    /// frame that is not DNS or a reply it cannot write (they finish
    /// upstream without the client).
    async fn connection(
        self: Arc<Self>,
        stream: TcpStream,
        held: (OwnedSemaphorePermit, ClientShare),
        mut stopping: watch::Receiver<()>,
    ) {
        let client = held.1.client();
        self.open.increment(1.0);
        let _ = stream.set_nodelay(true);
        let (mut read, write) = stream.into_split();
        // Answers are written by a task of their own, so that the ones that
        // come while the client is slow to read are counted (and bounded).
        let unsent = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let (to_write, writing) = tokio::sync::mpsc::unbounded_channel::<Vec<u8>>();
        let writer = tokio::spawn(write_replies(write, writing, unsent.clone(), self.idle));
        let mut frames = Frames::default();
        let mut answering: tokio::task::JoinSet<Option<Vec<u8>>> = tokio::task::JoinSet::new();
        let mut reading = true;
        let mut last = tokio::time::Instant::now();
        let mut not_taking = false;
        while reading || !answering.is_empty() {
            tokio::select! {
                biased;
                // The writer gave up: the client does not take its answers.
                () = to_write.closed() => break,
                answered = answering.join_next(), if !answering.is_empty() => {
                    // `None` from the proxy: not DNS (the framing is lost) or an answer sent to us.
                    let Some(Ok(Some(reply))) = answered else { break };
                    let Some(frame) = framed(&reply) else { break };
                    let held = unsent.fetch_add(frame.len(), Ordering::Relaxed) + frame.len();
                    if held > UNSENT_MAX {
                        tracing::debug!(%client, held, "DNS over TCP: the client does not take its answers; closing");
                        not_taking = true;
                        break;
                    }
                    // Fails once the writer gave up (a reply not taken within the idle timeout).
                    if to_write.send(frame).is_err() {
                        break;
                    }
                    last = tokio::time::Instant::now();
                }
                query = frames.next(&mut read), if reading && answering.len() < PIPELINE => match query {
                    Ok(Some(query)) => {
                        let proxy = Arc::clone(&self.proxy);
                        answering.spawn(async move { proxy.answer(&query, client).await });
                        last = tokio::time::Instant::now();
                    }
                    _ => reading = false,
                },
                () = tokio::time::sleep_until(last + self.idle), if answering.is_empty() => break,
                _ = stopping.changed(), if reading => reading = false,
            }
        }
        // Queries still upstream when the client connection ends finish
        // without it: their answers are learned from, and the shared
        // upstream connection they went out on is not retired, as it is when
        // a query on it is given up unanswered (their count stays within the
        // in-flight cap, their time within the upstream timeouts).
        answering.detach_all();
        // The answers queued go out before the connection closes (each within
        // the idle timeout), unless the client was not taking them.
        drop(to_write);
        if not_taking {
            writer.abort();
        }
        let _ = writer.await;
        self.open.decrement(1.0);
    }
}

/// Writes the frames that come on `frames` until the channel closes or one
/// is not taken within `idle`; `unsent` counts the bytes not yet written.
async fn write_replies(
    mut write: impl AsyncWrite + Unpin,
    mut frames: tokio::sync::mpsc::UnboundedReceiver<Vec<u8>>,
    unsent: Arc<std::sync::atomic::AtomicUsize>,
    idle: Duration,
) {
    while let Some(frame) = frames.recv().await {
        if !matches!(tokio::time::timeout(idle, write.write_all(&frame)).await, Ok(Ok(()))) {
            return;
        }
        unsent.fetch_sub(frame.len(), Ordering::Relaxed);
    }
}

/// `message` behind its two-byte length, as it goes on a TCP stream;
/// `None` if it is longer than a length can say.
pub(crate) fn framed(message: &[u8]) -> Option<Vec<u8>> {
    let len = u16::try_from(message.len()).ok()?;
    let mut frame = Vec::with_capacity(2 + message.len());
    frame.extend_from_slice(&len.to_be_bytes());
    frame.extend_from_slice(message);
    Some(frame)
}

/// DNS messages off a TCP stream, each behind its two-byte length.
/// [`next`](Self::next) is cancel-safe (what was read stays here), so it
/// can wait beside other work in a `select!`.
#[derive(Debug, Default)]
pub(crate) struct Frames {
    buf: Vec<u8>,
}

impl Frames {
    /// Whether every byte read has been taken as a message.
    pub(crate) fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    /// The next whole message; `None` once the stream ends (a message cut
    /// short by the end is dropped). Reads only while no whole message is
    /// here, so the buffer holds one message (at most 64 KiB) and what came
    /// with its last read.
    pub(crate) async fn next(&mut self, read: &mut (impl AsyncRead + Unpin)) -> io::Result<Option<Vec<u8>>> {
        loop {
            if let Some(len) = self.buf.get(..2).map(|l| 2 + usize::from(u16::from_be_bytes([l[0], l[1]])))
                && self.buf.len() >= len
            {
                let message = self.buf.get(2..len).unwrap_or_default().to_vec();
                self.buf.drain(..len);
                return Ok(Some(message));
            }
            self.buf.reserve(4_096);
            if read.read_buf(&mut self.buf).await? == 0 {
                return Ok(None);
            }
        }
    }
}

/// Accept errors that concern one connection (it was reset before it was
/// accepted, a signal): the next accept may succeed at once. Every other
/// error backs off, `EPERM` included (the forwarder's list, in its `sys`,
/// retries a few of those at once before backing off too).
fn is_per_connection(e: &io::Error) -> bool {
    matches!(e.kind(), io::ErrorKind::ConnectionAborted | io::ErrorKind::ConnectionReset | io::ErrorKind::Interrupted)
}
