//! One connection: original destination → (sniff) → verdict → splice or refuse.

use std::cell::Cell;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use monoio::io::AsyncWriteRentExt;
use monoio::net::TcpStream;
use sluice_policy::{Connection, Snapshot, Timestamp, Verdict, decide};

use crate::sniff::{MAX_SNIFF_BYTES, MAX_SNIFF_READS, Sniff, sniff};
use crate::splice::{Abort, End, PipeSizes, splice_both};
use crate::{Config, Intercept, Shared, sys};

/// Per-worker state every connection reads.
pub(crate) struct Ctx {
    pub(crate) config: Config,
    pub(crate) shared: Shared,
    /// Our own listening addresses: a connection "to" one of them was not
    /// intercepted, and sluice is never an open relay.
    own: Vec<SocketAddr>,
    pub(crate) stopping: Cell<bool>,
    /// This worker's driver is io_uring, whose accept (as monoio issues it)
    /// leaves the socket blocking and inheritable; epoll's `accept4` sets
    /// `SOCK_NONBLOCK | SOCK_CLOEXEC` itself.
    uring: bool,
    /// Fired when the drain time is over.
    pub(crate) abort: crate::splice::Abort,
    /// The destinations of this worker's connections that are splicing, and
    /// how many each: their names are kept alive while they are in use
    /// ([`Ctx::renew_in_use`]).
    in_use: std::cell::RefCell<std::collections::HashMap<IpAddr, u32, foldhash::quality::RandomState>>,
}

/// A connection's place in [`Ctx`]'s destinations in use, left on drop.
struct InUse<'a> {
    ctx: &'a Ctx,
    ip: IpAddr,
}

impl Drop for InUse<'_> {
    fn drop(&mut self) {
        let mut in_use = self.ctx.in_use.borrow_mut();
        if let Some(n) = in_use.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                in_use.remove(&self.ip);
            }
        }
    }
}

impl Ctx {
    pub(crate) fn new(config: Config, shared: Shared, socks: &[std::net::TcpListener], uring: bool) -> Ctx {
        let own = socks.iter().filter_map(|s| s.local_addr().ok()).collect();
        let (stopping, abort, in_use) = (Cell::new(false), crate::splice::Abort::default(), Default::default());
        Ctx { config, shared, own, stopping, uring, abort, in_use }
    }

    /// `ip` is in use by a connection until the guard drops.
    fn use_ip(&self, ip: IpAddr) -> InUse<'_> {
        *self.in_use.borrow_mut().entry(ip).or_insert(0) += 1;
        InUse { ctx: self, ip }
    }

    /// Keeps the names of every destination in use alive for another
    /// `grace` (the worker calls it every grace / 4, at most every minute), as a new connection to it would: a connection open for hours
    /// (judged once, when it opened) keeps its names, so the app's next
    /// connection to the same address, made without asking DNS again, is
    /// judged as the first was.
    /// Returns the grace it renewed them for.
    pub(crate) fn renew_in_use(&self) -> Duration {
        let grace = self.shared.policy.load().settings().dns.grace;
        let now = Timestamp::now();
        for ip in self.in_use.borrow().keys() {
            self.shared.names.touch(*ip, now, grace);
        }
        grace
    }

    /// Whether `dst` (a TPROXY connection's local address) is one of our
    /// listeners: on its port, and its address or — for a wildcard listener
    /// — an address of this host. A remote destination that happens to use
    /// the same port is not ours (with `net.ipv4.ip_nonlocal_bind` on, every
    /// address binds, and such a destination is refused: fail-closed).
    fn is_own(&self, dst: SocketAddr) -> bool {
        self.own
            .iter()
            .any(|l| l.port() == dst.port() && (l.ip() == dst.ip() || (l.ip().is_unspecified() && is_local(dst))))
    }
}

/// Whether `dst`'s address is one of this host's: only those can be bound.
/// The IPv6 scope is kept (a link-local address binds only with it), and an
/// error other than "not an address here" (out of descriptors) counts as
/// local: fail-closed, never a loop through our own listener.
fn is_local(mut dst: SocketAddr) -> bool {
    dst.set_port(0);
    match std::net::UdpSocket::bind(dst) {
        Ok(_) => true,
        Err(e) => e.kind() != std::io::ErrorKind::AddrNotAvailable,
    }
}

#[derive(Debug, Clone, Copy)]
pub(crate) struct Listener {
    pub(crate) intercept: Intercept,
    pub(crate) v6: bool,
    /// The port it listens on.
    pub(crate) port: u16,
}

/// How a connection ended, for metrics and logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Spliced; see [`End`].
    Spliced(End),
    /// Refused by policy: `502 Bad Gateway` written.
    Refused502,
    /// Refused by policy: reset.
    RefusedReset,
    /// Not intercepted (addressed to sluice itself, or no original destination): reset.
    NotIntercepted,
    /// The upstream did not accept the connection in time, or refused it: client reset.
    ConnectFailed,
    /// The client reset or failed while its first bytes were read, before any
    /// upstream connection: nothing was forwarded.
    ClientFailed,
}

/// Everything known about one finished connection.
#[derive(Debug, Clone)]
pub struct ConnReport {
    pub source: SocketAddr,
    /// The original destination (None when there was none: not intercepted).
    pub destination: Option<SocketAddr>,
    pub verdict: Option<Verdict>,
    /// The policy the verdict came from (its ServiceEntry names).
    pub snapshot: Option<Arc<Snapshot>>,
    /// The client spoke HTTP/1.x (its first bytes were a request head).
    pub http: bool,
    pub sent: u64,
    pub received: u64,
    pub duration: Duration,
    pub outcome: Outcome,
}

pub(crate) async fn handle(client: TcpStream, peer: SocketAddr, l: Listener, ctx: &Ctx) {
    let started = Instant::now();
    let mut report = ConnReport {
        source: peer,
        destination: None,
        verdict: None,
        snapshot: None,
        http: false,
        sent: 0,
        received: 0,
        duration: Duration::ZERO,
        outcome: Outcome::NotIntercepted,
    };
    // io_uring accepts blocking sockets; splice(2) on a blocking socket
    // blocks the whole worker whatever its flags say.
    if ctx.uring
        && let Err(e) = sys::prepare_accepted(&client)
    {
        tracing::warn!(%peer, error = %e, "cannot make the client socket non-blocking and close-on-exec: refusing");
        sys::reset_on_close(&client);
        return;
    }
    let local = || client.local_addr().ok().map(unmap_v4);
    let dst = match l.intercept {
        // Not NATed: conntrack's original destination is where the socket
        // was accepted, i.e. the client dialed sluice itself. Only a
        // destination on our own port can be that (REDIRECT changes the
        // port), so only then is the local address asked for.
        Intercept::Redirect => {
            sys::original_dst(&client, l.v6).ok().map(unmap_v4).filter(|d| d.port() != l.port || Some(*d) != local())
        }
        // The local address is the destination; one of ours means nobody tproxied it.
        Intercept::Tproxy => local().filter(|d| !ctx.is_own(*d)),
    };
    let mut meter = None;
    match dst {
        Some(dst) => {
            report.destination = Some(dst);
            forward(client, dst, ctx, &mut report, &mut meter).await;
        }
        _ => {
            tracing::debug!(%peer, ?dst, "connection was not intercepted: refusing (sluice is not an open relay)");
            sys::reset_on_close(&client);
        }
    }
    report.duration = started.elapsed();
    crate::metrics::closed(&report, meter.as_ref());
    (ctx.shared.report)(&report);
}

/// `::ffff:a.b.c.d` (a v4 client on a dual-stack socket) as the v4 address it is.
fn unmap_v4(a: SocketAddr) -> SocketAddr {
    match a.ip() {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(a, |v4| SocketAddr::new(IpAddr::V4(v4), a.port())),
        IpAddr::V4(_) => a,
    }
}

/// Judges the connection and carries the verdict out; `meter` gets its
/// counters (and labels) once it is judged.
async fn forward(
    mut client: TcpStream,
    dst: SocketAddr,
    ctx: &Ctx,
    report: &mut ConnReport,
    meter: &mut Option<crate::metrics::Meter>,
) {
    let snapshot = ctx.shared.policy.load_full();
    let names = &ctx.shared.names;
    let mut first = Vec::new();
    let mut seen = Sniff::NeedMore;
    let mut conn = Connection { source: unmap_v4(report.source).ip(), destination: dst, sniffed: None };
    let mut failed = None;
    if snapshot.sniff_useful(dst) {
        match read_first(&client, &mut first, ctx.config.sniff_timeout).await {
            Ok(s) => seen = s,
            Err(e) => failed = Some(e),
        }
        conn.sniffed = seen.sniffed();
    }
    let mut verdict = decide(&snapshot, names, &conn, Timestamp::now());
    if !verdict.allow && !seen.is_final() && first.is_empty() && failed.is_none() {
        // Refusing anyway: waiting for the client's bytes costs nothing, and
        // tells whether to answer HTTP 502 (and which Host it wanted).
        seen = read_first(&client, &mut first, ctx.config.sniff_timeout).await.unwrap_or(Sniff::NeedMore);
        if let Some(s) = seen.sniffed() {
            conn.sniffed = Some(s);
            // On a port where no name counts (opaque TCP), it only says to whom the refusal was.
            verdict = decide(&snapshot, names, &conn, Timestamp::now());
        }
    }
    report.http = seen.is_http();
    let meter = &*meter.insert(crate::metrics::opened(&verdict, &snapshot, dst));
    report.verdict = Some(verdict.clone());
    report.snapshot = Some(snapshot.clone());
    if let Some(e) = failed {
        // Reset at once: the partial first bytes of a client that reset or
        // failed must not reach the upstream as if they were a whole request.
        tracing::debug!(source = %report.source, %dst, error = %e, "client failed while its first bytes were read");
        sys::reset_on_close(&client);
        report.outcome = Outcome::ClientFailed;
        return;
    }
    // The waits before the splice race the worker's drain time too: past it,
    // both sides are reset and the connection reported, not dropped with the
    // worker (a close after part of the first bytes would look complete).
    if !verdict.allow {
        // Boxed: rare, kept out of every connection's task.
        report.outcome = Box::pin(refuse(&mut client, &verdict, &seen, dst, &ctx.abort)).await;
        return;
    }
    let Some(connected) = ctx.abort.or(connect(dst, ctx.config.mark, ctx.config.connect_timeout)).await else {
        sys::reset_on_close(&client);
        report.outcome = Outcome::Spliced(End::Shutdown);
        return;
    };
    let mut upstream = match connected {
        Ok(u) => u,
        Err(e) => {
            if sys::is_local_shortage(&e) {
                local_shortage(dst, &e);
            } else {
                tracing::debug!(%dst, error = %e, "upstream connect failed: resetting client");
            }
            sys::reset_on_close(&client);
            report.outcome = Outcome::ConnectFailed;
            return;
        }
    };
    // The bytes read for sniffing go first, then the splice takes over; the
    // buffer (16 KiB of capacity once sniffing read into it, even when it
    // read nothing) is freed before the splice, which may last hours.
    if first.is_empty() {
        drop(first);
    } else {
        let n = first.len() as u64;
        // Bounded like any other wait: an upstream that never opens its window.
        let written = ctx.abort.or(monoio::time::timeout(ctx.config.idle_timeout, upstream.write_all(first))).await;
        if !matches!(written, Some(Ok((Ok(_), _)))) {
            // Both reset: an upstream that got part of the first bytes must
            // not see a clean close after them, as if they were whole.
            sys::reset_on_close(&client);
            sys::reset_on_close(&upstream);
            report.outcome = Outcome::Spliced(if written.is_some() { End::UpstreamError } else { End::Shutdown });
            return;
        }
        report.sent = n;
        meter.upstream.increment(n);
    }
    let pipes = PipeSizes { base: ctx.config.pipe_size, max: ctx.config.pipe_max_size };
    let _in_use = ctx.use_ip(dst.ip());
    let o = splice_both(&client, &upstream, ctx.config.idle_timeout, pipes, meter, &ctx.abort).await;
    report.sent += o.sent;
    report.received = o.received;
    report.outcome = Outcome::Spliced(o.end);
}

/// Reads the client's first bytes until sniffing can tell, the cap (in
/// bytes, and [`MAX_SNIFF_READS`] reads: then it is opaque), the deadline,
/// or EOF — whichever comes first. What was read is kept in `buf`.
async fn read_first(client: &TcpStream, buf: &mut Vec<u8>, deadline: Duration) -> io::Result<Sniff> {
    let until = Instant::now() + deadline;
    let mut filled = buf.len();
    buf.resize(MAX_SNIFF_BYTES, 0); // zeroed once, read into in place
    let mut reads = 0;
    let seen = loop {
        let seen = sniff(&buf[..filled]);
        if seen.is_final() || filled >= MAX_SNIFF_BYTES {
            break Ok(seen);
        }
        if reads == MAX_SNIFF_READS {
            break Ok(Sniff::Opaque);
        }
        reads += 1;
        match recv_by(client, until, &mut buf[filled..]).await {
            Ok(Some(0) | None) => break Ok(seen), // EOF, or the deadline
            Ok(Some(n)) => filled += n,
            Err(e) => break Err(e),
        }
    };
    buf.truncate(filled);
    seen
}

/// Waits until `client` has bytes (or EOF, or an error), but not past
/// `until`, then reads what is there without blocking; `Ok(None)`: the
/// deadline came first. Only the wait runs under the deadline: an io_uring
/// read dropped by a timer can lose bytes the kernel had already copied.
async fn recv_by(client: &TcpStream, until: Instant, buf: &mut [u8]) -> io::Result<Option<usize>> {
    loop {
        let left = until.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Ok(None);
        }
        match monoio::time::timeout(left, client.readable(false)).await {
            Err(_deadline) => return Ok(None),
            Ok(ready) => ready?,
        }
        match sys::recv_now(client, buf) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            read => return read.map(Some),
        }
    }
}

/// Refuses: an HTTP client gets its 502, then a lingering close; any other a
/// reset. The drain time's end (`abort`) cuts either wait short with a reset.
async fn refuse(client: &mut TcpStream, verdict: &Verdict, seen: &Sniff, dst: SocketAddr, abort: &Abort) -> Outcome {
    if seen.is_http() {
        let host = verdict.name.as_ref().map_or_else(|| dst.ip().to_string(), ToString::to_string);
        let mode = match verdict.mode {
            sluice_policy::model::Mode::AllowAny => "ALLOW_ANY",
            sluice_policy::model::Mode::RegistryOnly => "REGISTRY_ONLY",
        };
        let body = format!("sluice: egress to {host} refused: {}, mode {mode}\n", verdict.reason);
        let resp = format!(
            "HTTP/1.1 502 Bad Gateway\r\ncontent-type: text/plain\r\ncontent-length: {}\r\nconnection: close\r\nx-sluice-verdict: BlackHoleCluster\r\n\r\n{body}",
            body.len()
        );
        let write = monoio::time::timeout(Duration::from_secs(5), client.write_all(resp.into_bytes()));
        if let Some(Ok((Ok(_), _))) = abort.or(write).await {
            let _ = sys::shutdown(client, nix::sys::socket::Shutdown::Write);
            if abort.or(linger(client)).await.is_none() {
                sys::reset_on_close(client);
            }
            return Outcome::Refused502;
        }
    }
    sys::reset_on_close(client);
    Outcome::RefusedReset
}

/// After a 502: how long, and how many bytes of the rest of the request (a
/// POST body) are read and dropped while waiting for the client to close.
const LINGER: Duration = Duration::from_secs(2);
const LINGER_BYTES: usize = 256 << 10;

/// A lingering close (as web servers do): closing a socket that still holds
/// unread bytes sends a reset, which can reach the client before it has read
/// the 502 — it would then see "connection reset" instead. So the client's
/// remaining bytes are read and dropped until it closes, bounded by
/// [`LINGER`] and [`LINGER_BYTES`].
async fn linger(client: &TcpStream) {
    let until = Instant::now() + LINGER;
    let mut sink = vec![0u8; 16 << 10]; // on the heap: this path only
    let mut dropped = 0;
    while dropped < LINGER_BYTES {
        match recv_by(client, until, &mut sink).await {
            Ok(Some(n)) if n > 0 => dropped += n,
            _ => return, // EOF, the deadline, or an error
        }
    }
}

/// The upstream connection failed for want of this node's descriptors,
/// memory or ports: counted, and logged at most every 10 s per worker
/// (the connection's own flag, `UF`, would blame the destination).
fn local_shortage(dst: SocketAddr, e: &io::Error) {
    thread_local! {
        static LAST: Cell<Option<Instant>> = const { Cell::new(None) };
    }
    crate::metrics::local_connect_failure();
    if LAST.with(crate::splice::warning_due) {
        tracing::warn!(%dst, error = %e, "cannot open upstream connections (out of descriptors, memory or local ports): resetting clients (raise LimitNOFILE? net.ipv4.ip_local_port_range?)");
    }
}

/// Connects to the original destination with `SO_MARK` set before connect
/// (the loop guard), then hands the socket to the runtime.
async fn connect(dst: SocketAddr, mark: u32, timeout: Duration) -> io::Result<TcpStream> {
    use socket2::{Domain, Protocol, Socket, Type};
    let domain = if dst.is_ipv6() { Domain::IPV6 } else { Domain::IPV4 };
    let socket = Socket::new(domain, Type::STREAM.nonblocking().cloexec(), Some(Protocol::TCP))?;
    if mark != 0 {
        socket.set_mark(mark)?;
    }
    crate::listener::spliced_options(&socket)?;
    match socket.connect(&dst.into()) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(nix::libc::EINPROGRESS) => {}
        Err(e) => return Err(e),
    }
    let std: std::net::TcpStream = socket.into();
    let stream = TcpStream::from_std(std)?;
    match monoio::time::timeout(timeout, stream.writable(false)).await {
        Err(_) => return Err(io::ErrorKind::TimedOut.into()),
        Ok(r) => r?,
    }
    if let Some(e) = sys::with_sock(&stream, |s| s.take_error())? {
        return Err(e);
    }
    Ok(stream)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use std::net::{Ipv6Addr, SocketAddrV6};

    use super::*;

    #[test]
    fn own_addresses_are_local_and_others_are_not() {
        assert!(is_local("127.0.0.1:15001".parse().unwrap()));
        assert!(is_local("[::1]:15001".parse().unwrap()));
        assert!(!is_local("198.18.0.1:15001".parse().unwrap()), "a test-net address no interface has");
        assert!(!is_local("[2001:db8::1]:15001".parse().unwrap()));
    }

    /// A link-local address binds only with its scope: is_local keeps it.
    /// In a network namespace of the test thread's own, with a veth pair
    /// holding fe80::1 (needs root, as the suite does; this kernel has no
    /// dummy interfaces).
    #[test]
    fn a_link_local_address_of_this_host_is_local() {
        let found = std::thread::spawn(|| {
            nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
            // Children of this thread start in its namespace.
            let ip = |args: &str| {
                let ok = std::process::Command::new("ip").args(args.split(' ')).status().unwrap().success();
                assert!(ok, "ip {args}");
            };
            ip("link add d0 type veth peer name d1");
            ip("link set d0 up");
            ip("-6 addr add fe80::1/64 dev d0 nodad");
            let table = std::fs::read_to_string("/proc/thread-self/net/if_inet6").unwrap();
            let (ip, scope) = table
                .lines()
                .find_map(|l| {
                    let f: Vec<&str> = l.split_whitespace().collect();
                    let ip = Ipv6Addr::from(u128::from_str_radix(f.first()?, 16).ok()?);
                    let scope = u32::from_str_radix(f.get(1)?, 16).ok()?;
                    (ip.segments()[0] & 0xffc0 == 0xfe80).then_some((ip, scope))
                })
                .expect("fe80::1 on d0");
            let other = Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 2);
            (
                ip,
                scope,
                is_local(SocketAddr::V6(SocketAddrV6::new(ip, 15001, 0, scope))),
                // Not this host's, on the same link: not local (with the scope
                // dropped, the bind fails otherwise and would read as local).
                is_local(SocketAddr::V6(SocketAddrV6::new(other, 15001, 0, scope))),
            )
        })
        .join()
        .unwrap();
        assert!(found.2, "{}%{}", found.0, found.1);
        assert!(!found.3, "fe80::2%{} is not this host's", found.1);
    }
}
