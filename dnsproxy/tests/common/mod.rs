//! Test scaffolding: a real upstream, the proxy on its own runtime thread
//! (as the daemon runs it), and real `dig` / `kdig` processes. Everything
//! listens on 127.0.0.1 port 0 and stops when dropped; every external
//! command has a deadline.
#![allow(dead_code, unreachable_pub, clippy::unwrap_used)]

pub mod upstream;

use std::future::Future;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use hickory_proto::op::{Edns, Message, Query, ResponseCode};
use hickory_proto::rr::{Name, RecordType};
use sluice_dnsproxy::{Config, DnsError, Shared};
use sluice_policy::{NameTable, Snapshot, SourceFile, Timestamp, load_sources};
use tokio::sync::oneshot;

#[allow(unused_imports)] // not every test binary starts an upstream (flood.rs)
pub use upstream::Upstream;

/// A future on its own thread and tokio current-thread runtime, given a
/// shutdown signal; dropping it (or [`stop`](Self::stop)) signals and joins.
pub struct Background<T: Send + 'static> {
    stop: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<T>>,
}

pub type Shutdown = std::pin::Pin<Box<dyn Future<Output = ()> + Send>>;

impl<T: Send + 'static> Background<T> {
    pub fn spawn<F, Fut>(f: F) -> Self
    where
        F: FnOnce(Shutdown) -> Fut + Send + 'static,
        Fut: Future<Output = T>,
    {
        let (tx, rx) = oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            rt.block_on(f(Box::pin(async move {
                let _ = rx.await;
            })))
        });
        Background { stop: Some(tx), thread: Some(thread) }
    }

    pub fn stop(mut self) -> T {
        self.stop.take().map(|s| s.send(()));
        self.thread.take().unwrap().join().unwrap()
    }
}

impl<T: Send + 'static> Drop for Background<T> {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A UDP socket and a TCP listener on the same free port of `ip`.
pub fn bind_pair(ip: &str) -> (UdpSocket, TcpListener) {
    for _ in 0..50 {
        let udp = UdpSocket::bind((ip, 0)).unwrap();
        if let Ok(tcp) = TcpListener::bind(udp.local_addr().unwrap()) {
            udp.set_nonblocking(true).unwrap();
            tcp.set_nonblocking(true).unwrap();
            return (udp, tcp);
        }
    }
    panic!("no free port pair on {ip}");
}

pub fn snapshot(yaml: &str) -> Snapshot {
    let file = SourceFile { path: std::path::Path::new("test.yaml").into(), bytes: yaml.as_bytes().to_vec() };
    Snapshot::compile(&load_sources(&[file]).unwrap())
}

pub fn shared(policy: Option<&str>) -> Shared {
    let snap = policy.map_or_else(Snapshot::empty, snapshot);
    Shared { policy: Arc::new(ArcSwap::from_pointee(snap)), names: Arc::new(NameTable::new(10_000)) }
}

/// The proxy, serving on 127.0.0.1 (UDP and TCP on one port).
pub struct Proxy {
    pub addr: SocketAddr,
    pub shared: Shared,
    server: Background<Result<(), DnsError>>,
}

impl Proxy {
    pub fn start(config: Config, shared: Shared) -> Proxy {
        Proxy::start_on("127.0.0.1", config, shared)
    }

    /// The proxy serving on `ip` (a wildcard address too).
    pub fn start_on(ip: &str, config: Config, shared: Shared) -> Proxy {
        Proxy::start_tuned(ip, config, shared, |_| {})
    }

    /// The proxy serving on `ip`, its TCP listener set up by `tune` first
    /// (options its connections inherit).
    pub fn start_tuned(ip: &str, config: Config, shared: Shared, tune: impl FnOnce(&TcpListener)) -> Proxy {
        let (udp, tcp) = bind_pair(ip);
        tune(&tcp);
        let addr = udp.local_addr().unwrap();
        let s = shared.clone();
        let server = Background::spawn(move |shutdown| async move {
            let udp = tokio::net::UdpSocket::from_std(udp).unwrap();
            let tcp = tokio::net::TcpListener::from_std(tcp).unwrap();
            sluice_dnsproxy::serve(config, s, vec![udp], vec![tcp], shutdown).await
        });
        Proxy { addr, shared, server }
    }

    /// A proxy in front of `upstream` with test-sized timeouts.
    pub fn to(upstream: SocketAddr, shared: Shared) -> Proxy {
        Proxy::start(config(vec![upstream]), shared)
    }

    pub fn stop(self) -> Result<(), DnsError> {
        self.server.stop()
    }

    pub fn names(&self, ip: &str) -> Vec<String> {
        let now = Timestamp::now();
        let mut v: Vec<String> =
            self.shared.names.names(ip.parse().unwrap(), now).iter().map(ToString::to_string).collect();
        v.sort();
        v
    }
}

pub fn config(upstreams: Vec<SocketAddr>) -> Config {
    Config { upstreams, timeout: Duration::from_millis(500), ..Config::default() }
}

/// Runs a command with a deadline; returns its stdout.
pub fn run(program: &str, args: &[String]) -> String {
    let mut child = Command::new(program)
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{program}: {e} (install dnsutils / knot-dnsutils)"));
    let deadline = Instant::now() + Duration::from_secs(15);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("{program} {args:?} did not finish in 15 s");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let mut out = String::new();
    child.stdout.take().unwrap().read_to_string(&mut out).unwrap();
    out
}

fn with_server(server: SocketAddr, extra: &[&str]) -> Vec<String> {
    let mut args = vec![format!("@{}", server.ip()), "-p".into(), server.port().to_string()];
    args.extend(extra.iter().map(|s| (*s).to_owned()));
    args
}

/// `dig` against `server`: one try, 2 s, no cookie (so outputs compare).
pub fn dig(server: SocketAddr, extra: &[&str]) -> String {
    let mut args = with_server(server, &["+time=2", "+tries=1", "+nocookie"]);
    args.extend(extra.iter().map(|s| (*s).to_owned()));
    run("dig", &args)
}

/// `kdig` against `server`.
pub fn kdig(server: SocketAddr, extra: &[&str]) -> String {
    let mut args = with_server(server, &["+time=2", "+retry=0", "+nocookie"]);
    args.extend(extra.iter().map(|s| (*s).to_owned()));
    run("kdig", &args)
}

/// dig/kdig output without what differs between any two runs: the
/// banner, timing, server, message id and (re-encoding) message size.
pub fn normalize(out: &str) -> String {
    let skip = [
        "; <<>> DiG",
        ";; global options",
        ";; Query time",
        ";; SERVER",
        ";; WHEN",
        ";; MSG SIZE",
        ";; Received",
        ";; Time ",
        ";; From ",
    ];
    out.lines()
        .filter(|l| !skip.iter().any(|s| l.starts_with(s)))
        .map(|l| match l.find("id: ") {
            Some(i) => {
                let rest = &l[i + 4..];
                let end = rest.find(|c: char| !c.is_ascii_digit()).unwrap_or(rest.len());
                format!("{}id: X{}", &l[..i], &rest[end..])
            }
            None => l.to_owned(),
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// The `status:` of a dig answer.
pub fn status(out: &str) -> String {
    let at = out.find("status: ").map(|i| &out[i + 8..]).unwrap_or("");
    at.split(|c: char| c == ',' || c == ';' || c.is_whitespace()).next().unwrap_or("").to_owned()
}

/// The `flags:` of a dig answer (`qr aa rd`).
pub fn flags(out: &str) -> String {
    let line = out.lines().find(|l| l.starts_with(";; flags:")).unwrap_or("");
    line.trim_start_matches(";; flags:").split(';').next().unwrap_or("").trim().to_owned()
}

/// A query message: `name type`, RD set, EDNS with `payload` if given.
pub fn query(id: u16, name: &str, rtype: RecordType, payload: Option<u16>) -> Vec<u8> {
    let mut msg = Message::query();
    msg.metadata.id = id;
    msg.metadata.recursion_desired = true;
    msg.add_query(Query::query(Name::from_ascii(name).unwrap(), rtype));
    if let Some(p) = payload {
        let mut edns = Edns::new();
        edns.set_max_payload(p);
        msg.set_edns(edns);
    }
    msg.to_vec().unwrap()
}

/// One UDP exchange; `None` if nothing came back within `wait`.
pub fn udp_exchange(server: SocketAddr, bytes: &[u8], wait: Duration) -> Option<Vec<u8>> {
    let s = UdpSocket::bind("127.0.0.1:0").unwrap();
    s.set_read_timeout(Some(wait)).unwrap();
    s.send_to(bytes, server).unwrap();
    let mut buf = vec![0u8; 65_535];
    let n = s.recv(&mut buf).ok()?;
    buf.truncate(n);
    Some(buf)
}

/// One TCP exchange on a new connection.
pub fn tcp_exchange(server: SocketAddr, bytes: &[u8]) -> Vec<u8> {
    let mut s = TcpStream::connect(server).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    tcp_send(&mut s, bytes);
    tcp_receive(&mut s).unwrap()
}

/// Sends one DNS message over TCP (behind its two-byte length).
pub fn tcp_send(s: &mut TcpStream, bytes: &[u8]) {
    let mut framed = (bytes.len() as u16).to_be_bytes().to_vec();
    framed.extend_from_slice(bytes);
    s.write_all(&framed).unwrap();
}

/// Reads one DNS message from TCP (behind its two-byte length).
pub fn tcp_receive(s: &mut TcpStream) -> std::io::Result<Vec<u8>> {
    let mut len = [0u8; 2];
    s.read_exact(&mut len)?;
    let mut buf = vec![0u8; usize::from(u16::from_be_bytes(len))];
    s.read_exact(&mut buf)?;
    Ok(buf)
}

/// The alive names of `ip` in the table, sorted.
pub fn names(table: &NameTable, ip: &str) -> Vec<String> {
    let now = Timestamp::now();
    let mut v: Vec<String> = table.names(ip.parse().unwrap(), now).iter().map(ToString::to_string).collect();
    v.sort();
    v
}

/// Polls `cond` every 20 ms for up to 5 s.
pub fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The RCODE of a DNS message (parsed with hickory).
pub fn rcode(answer: &[u8]) -> ResponseCode {
    Message::from_vec(answer).unwrap().metadata.response_code
}

/// A UDP port that swallows queries and never answers (kept open while held).
pub fn silent() -> (UdpSocket, SocketAddr) {
    let s = UdpSocket::bind("127.0.0.1:0").unwrap();
    let addr = s.local_addr().unwrap();
    (s, addr)
}

/// A response header to `query` (ID and RD kept): `rcode`, the counts given.
pub fn header(query: &[u8], rcode: u8, questions: u16, answers: u16) -> Vec<u8> {
    let mut h = query[..12].to_vec();
    h[2] |= 0x80;
    h[3] = 0x80 | rcode;
    h[4..6].copy_from_slice(&questions.to_be_bytes());
    h[6..8].copy_from_slice(&answers.to_be_bytes());
    h[8..12].fill(0);
    h
}

/// An A record for the name at offset 12, TTL 60.
pub fn a_record(ip: [u8; 4]) -> Vec<u8> {
    [&[0xc0, 12, 0, 1, 0, 1, 0, 0, 0, 60, 0, 4][..], &ip].concat()
}

/// Where the question of a message ends (its name, type and class).
pub fn question_end(m: &[u8]) -> usize {
    let mut i = 12;
    while m[i] != 0 {
        i += 1 + usize::from(m[i]);
    }
    i + 5
}
