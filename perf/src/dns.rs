//! The `dns` scenario (the port of `dnsproxy/bench/dnsperf.sh`): nsd,
//! authoritative for a 1000-name zone, is the upstream; dnsperf sends the
//! queries straight to it (`dns-direct`), through sluice's DNS proxy running
//! in this process exactly as the daemon runs it (one tokio current-thread
//! runtime on its own thread, `sluice_dnsproxy::serve`), or through dnsdist
//! (no packet cache), or through a bare relay that does nothing else
//! (`dns-relay`, the floor: `dns_relay.rs`). Two dnsperf runs per target:
//! full speed (queries/s and the proxy's CPU per query), then a fixed 10,000
//! queries/s (latency). `dns-tcp` does the same over TCP (dnsperf's
//! clients each keep a connection and pipeline their queries on it), for
//! every target but the relay.
//! Everything listens on 127.0.0.1 inside the benchmark namespace.

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use arc_swap::ArcSwap;
use hickory_proto::op::{Message, Query, ResponseCode};
use hickory_proto::rr::{Name, RecordType};
use serde::Serialize;
use sluice_policy::{NameTable, Snapshot};

use crate::dns_relay::{RELAY, RELAY_THREAD, Relay};
use crate::dnsperf::{self, Pace};
use crate::ns::{ChildGuard, Netns, ScratchDir};
use crate::procfs;
use crate::scenario::{self, Meter, Params, Run, Scenario, Snap};
use crate::target::Target;

const UPSTREAM: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::LOCALHOST, 5300);
const SLUICE_DNS: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::LOCALHOST, 5301);
const DNSDIST: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::LOCALHOST, 5302);
const ZONE: &str = "bench.test";
const NAMES: usize = 1000;
/// The fixed rate of the latency run, queries/s.
const FIXED_RATE: u32 = 10_000;
/// The sluice DNS proxy's thread (and its runtime's blocking threads): its CPU is the proxy's.
const SLUICE_THREAD: &str = "sluice-dns";

/// DNS figures beside the run's main ones.
#[derive(Debug, Clone, Copy, Serialize)]
pub(crate) struct DnsFigures {
    /// Full speed: queries answered, and lost (unanswered within 1 s: overload drops).
    pub(crate) completed: u64,
    pub(crate) lost: u64,
    /// Fixed rate: the rate, answers (NOERROR), lost, and answered with another rcode.
    pub(crate) fixed_rate: u32,
    pub(crate) fixed_answered: u64,
    pub(crate) fixed_lost: u64,
    pub(crate) fixed_failed: u64,
}

/// nsd, authoritative for the zone, for the whole benchmark (killed on drop, and on Ctrl-C).
#[derive(Debug)]
pub(crate) struct Upstream {
    dir: PathBuf,
    nsd: ChildGuard,
}

impl Upstream {
    /// Writes the zone, the query list and nsd's configuration under
    /// `scratch`, starts nsd in the namespace and waits until it answers.
    pub(crate) fn start(ns: &Netns, scratch: &ScratchDir) -> Result<Upstream> {
        let dir = scratch.path.join("dns");
        std::fs::create_dir_all(&dir)?;
        write_zone(&dir)?;
        let conf = dir.join("nsd.conf");
        std::fs::write(&conf, nsd_conf(&dir))?;
        let log = std::fs::File::create(dir.join("nsd.err"))?;
        let child = ns
            .command(&["nsd", "-d", "-c", &conf.to_string_lossy()])
            .process_group(0)
            .stdin(std::process::Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting nsd")?;
        let mut up = Upstream { dir, nsd: ChildGuard::new_group(child) };
        let log = |up: &Upstream| std::fs::read_to_string(up.dir.join("nsd.err")).unwrap_or_default();
        wait_answers(ns, UPSTREAM.into(), || match up.nsd.child.try_wait() {
            Ok(Some(st)) => Err(anyhow!("nsd exited ({st}): {}", log(&up))),
            _ => Ok(()),
        })
        .context("nsd")?;
        Ok(up)
    }

    fn ticks(&self) -> u64 {
        procfs::tree_ticks(self.nsd.pid())
    }

    fn queries(&self) -> PathBuf {
        self.dir.join("queries")
    }
}

/// The zone file (one A record per name) and dnsperf's query list.
fn write_zone(dir: &std::path::Path) -> Result<()> {
    let mut zone =
        format!("$ORIGIN {ZONE}.\n$TTL 300\n@ IN SOA ns admin 1 3600 600 86400 60\n@ IN NS ns\nns IN A 127.0.0.1\n");
    let mut queries = String::new();
    for i in 1..=NAMES {
        zone.push_str(&format!("n{i} IN A 10.{}.{}.1\n", i / 250, i % 250));
        queries.push_str(&format!("n{i}.{ZONE} A\n"));
    }
    std::fs::write(dir.join(format!("{ZONE}.zone")), zone)?;
    std::fs::write(dir.join("queries"), queries)?;
    Ok(())
}

/// One server process, as root without chroot (all files in the scratch directory).
fn nsd_conf(dir: &std::path::Path) -> String {
    let d = dir.to_string_lossy();
    format!(
        "server:
  ip-address: {ip}@{port}
  server-count: 1
  zonesdir: \"{d}\"
  zonelistfile: \"{d}/zone.list\"
  xfrdfile: \"{d}/xfrd.state\"
  pidfile: \"{d}/nsd.pid\"
  database: \"\"
  username: \"\"
  chroot: \"\"
  logfile: \"{d}/nsd.log\"
  verbosity: 0
remote-control:
  control-enable: no
zone:
  name: {ZONE}
  zonefile: {ZONE}.zone
",
        ip = UPSTREAM.ip(),
        port = UPSTREAM.port()
    )
}

/// Waits (at most 5 s) until `server` answers a query for a zone name;
/// `alive` says why to stop early (the server exited).
fn wait_answers(ns: &Netns, server: SocketAddr, mut alive: impl FnMut() -> Result<()>) -> Result<()> {
    let until = Instant::now() + Duration::from_secs(5);
    loop {
        alive()?;
        match ns.within(move || query(server))? {
            Ok(()) => return Ok(()),
            Err(e) if Instant::now() > until => return Err(e.context(format!("{server} does not answer"))),
            Err(_) => std::thread::sleep(Duration::from_millis(100)),
        }
    }
}

/// One A query over UDP for the zone's first name: NOERROR with an answer?
fn query(server: SocketAddr) -> Result<()> {
    let mut q = Message::query();
    q.metadata.recursion_desired = true;
    q.add_query(Query::query(Name::from_ascii(format!("n1.{ZONE}."))?, RecordType::A));
    let socket = std::net::UdpSocket::bind((Ipv4Addr::LOCALHOST, 0))?;
    socket.set_read_timeout(Some(Duration::from_millis(500)))?;
    socket.send_to(&q.to_vec()?, server)?;
    let mut buf = [0u8; 1500];
    let n = socket.recv(&mut buf)?;
    let reply = Message::from_vec(&buf[..n])?;
    if reply.metadata.response_code != ResponseCode::NoError || reply.answers.is_empty() {
        bail!("answered {} with {} records", reply.metadata.response_code, reply.answers.len());
    }
    Ok(())
}

enum Proxy {
    None,
    Sluice(SluiceDns),
    Dnsdist(ChildGuard),
    Relay(Relay),
}

/// sluice's DNS proxy on its own thread; stopped on drop.
struct SluiceDns {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<JoinHandle<Result<Result<(), sluice_dnsproxy::DnsError>>>>,
}

impl Drop for SluiceDns {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        // Bounded: a proxy that does not stop is left behind rather than hanging the benchmark.
        let until = Instant::now() + Duration::from_secs(5);
        while self.thread.as_ref().is_some_and(|t| !t.is_finished()) && Instant::now() < until {
            std::thread::sleep(Duration::from_millis(10));
        }
        if let Some(t) = self.thread.take().filter(|t| t.is_finished()) {
            let _ = t.join();
        }
    }
}

/// A DNS target set up in the namespace; stopped on drop.
pub(crate) struct DnsUp<'a> {
    pub(crate) target: Target,
    upstream: &'a Upstream,
    proxy: Proxy,
}

impl std::fmt::Debug for DnsUp<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DnsUp").field("target", &self.target).finish_non_exhaustive()
    }
}

impl<'a> DnsUp<'a> {
    /// Starts `target` in front of `upstream` and checks that it answers.
    pub(crate) fn start(ns: &Netns, target: Target, upstream: &'a Upstream) -> Result<DnsUp<'a>> {
        let proxy = match target {
            Target::SluiceDns => Proxy::Sluice(start_sluice(ns)?),
            Target::Dnsdist => Proxy::Dnsdist(start_dnsdist(ns, upstream)?),
            Target::DnsRelay => Proxy::Relay(Relay::start(ns, UPSTREAM.into())?),
            _ => Proxy::None,
        };
        let mut up = DnsUp { target, upstream, proxy };
        let server = up.addr();
        wait_answers(ns, server, || up.exited()).with_context(|| target.name().to_owned())?;
        Ok(up)
    }

    /// Why the target's process or thread is gone, if it is.
    fn exited(&mut self) -> Result<()> {
        match &mut self.proxy {
            Proxy::Sluice(s) if s.thread.as_ref().is_some_and(|t| t.is_finished()) => {
                bail!("the sluice DNS thread ended")
            }
            Proxy::Relay(r) if r.ended() => bail!("the relay's threads ended"),
            Proxy::Dnsdist(c) => match c.child.try_wait()? {
                Some(st) => {
                    let log = std::fs::read_to_string(self.upstream.dir.join("dnsdist.log")).unwrap_or_default();
                    bail!("dnsdist exited ({st}): {}", log.trim())
                }
                None => Ok(()),
            },
            _ => Ok(()),
        }
    }

    fn addr(&self) -> SocketAddr {
        match self.target {
            Target::SluiceDns => SLUICE_DNS.into(),
            Target::Dnsdist => DNSDIST.into(),
            Target::DnsRelay => RELAY.into(),
            _ => UPSTREAM.into(),
        }
    }
}

impl Meter for DnsUp<'_> {
    fn proxy_ticks(&self) -> u64 {
        match &self.proxy {
            Proxy::None => 0,
            Proxy::Sluice(_) => procfs::task_ticks(SLUICE_THREAD),
            Proxy::Dnsdist(c) => procfs::tree_ticks(c.pid()),
            Proxy::Relay(_) => procfs::task_ticks(RELAY_THREAD),
        }
    }

    fn outside_ticks(&self) -> u64 {
        let dnsdist = if let Proxy::Dnsdist(_) = self.proxy { self.proxy_ticks() } else { 0 };
        dnsdist + self.upstream.ticks() + procfs::waited_children_ticks()
    }

    /// dnsperf's CPU, counted once it has exited (each measured window ends when it does).
    fn generator_ticks(&self) -> u64 {
        procfs::waited_children_ticks()
    }

    fn sink_ticks(&self) -> u64 {
        self.upstream.ticks()
    }
}

/// The DNS proxy as the daemon runs it: a tokio current-thread runtime on
/// its own thread, `serve` on a UDP socket and a TCP listener, an empty
/// (ALLOW_ANY) policy, learning into a name table.
fn start_sluice(ns: &Netns) -> Result<SluiceDns> {
    let (ready_tx, ready_rx) = std::sync::mpsc::channel::<std::io::Result<()>>();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let thread = ns.spawn(SLUICE_THREAD, move || {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().thread_name(SLUICE_THREAD).build();
        let runtime = match runtime {
            Ok(r) => r,
            Err(e) => {
                let _ = ready_tx.send(Err(e));
                return Ok(());
            }
        };
        runtime.block_on(async move {
            let sockets = async {
                Ok::<_, std::io::Error>((
                    tokio::net::UdpSocket::bind(SLUICE_DNS).await?,
                    tokio::net::TcpListener::bind(SLUICE_DNS).await?,
                ))
            };
            let (udp, tcp) = match sockets.await {
                Ok(s) => s,
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                    return Ok(());
                }
            };
            let _ = ready_tx.send(Ok(()));
            let config = sluice_dnsproxy::Config { upstreams: vec![UPSTREAM.into()], ..Default::default() };
            let shared = sluice_dnsproxy::Shared {
                policy: Arc::new(ArcSwap::from_pointee(Snapshot::empty())),
                names: Arc::new(NameTable::new(100_000)),
            };
            let shutdown = async {
                let _ = stopped.await;
            };
            sluice_dnsproxy::serve(config, shared, vec![udp], vec![tcp], shutdown).await
        })
    })?;
    let ready = ready_rx.recv_timeout(Duration::from_secs(5)).context("the sluice DNS thread did not start");
    let dns = SluiceDns { stop: Some(stop), thread: Some(thread) };
    ready?.context("binding sluice's DNS sockets")?;
    Ok(dns)
}

/// dnsdist as a plain forwarder: no packet cache, one backend (nsd), health
/// checks once a minute (they are queries to the upstream too).
fn start_dnsdist(ns: &Netns, upstream: &Upstream) -> Result<ChildGuard> {
    let conf = upstream.dir.join("dnsdist.conf");
    std::fs::write(
        &conf,
        format!(
            "setSecurityPollSuffix(\"\")\nsetLocal(\"{DNSDIST}\")\nsetACL({{\"127.0.0.0/8\"}})\n\
             newServer({{address=\"{UPSTREAM}\", checkName=\"{ZONE}.\", checkInterval=60}})\n"
        ),
    )?;
    let log = std::fs::File::create(upstream.dir.join("dnsdist.log"))?;
    let child = ns
        .command(&["dnsdist", "--supervised", "--disable-syslog", "-C", &conf.to_string_lossy()])
        .stdin(std::process::Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
        .context("starting dnsdist")?;
    Ok(ChildGuard::new(child))
}

/// One round of DNS scenario `s` (`dns` or `dns-tcp`) against `up`: full
/// speed, then the fixed rate.
pub(crate) fn dns(ns: &Netns, up: &DnsUp<'_>, s: Scenario, round: usize, p: &Params) -> Result<Run> {
    let (dir, queries, server) = (&up.upstream.dir, up.upstream.queries(), up.addr());
    let tcp = s == Scenario::DnsTcp;
    let run = |pace, secs| dnsperf::run(ns, dir, server, &queries, tcp, pace, secs);
    scenario::settle(up);
    if !p.warmup.is_zero() {
        run(Pace::Max, p.warmup.as_secs_f64().max(0.2))?;
    }
    let secs = p.duration.as_secs_f64();
    let a = Snap::take(up);
    let max = run(Pace::Max, secs)?;
    let (cpu, window) = a.cpu(&Snap::take(up));
    let fixed = run(Pace::Fixed(FIXED_RATE), secs)?;
    let mut r = scenario::run(up.target, round, s, max.qps, cpu);
    r.cost = scenario::cost(cpu.proxy, window, max.completed as f64, 1e6);
    let pct = |q: f64| scenario::percentile(&fixed.latencies_us, q);
    (r.p50_us, r.p99_us, r.p999_us) = (pct(0.50), pct(0.99), pct(0.999));
    r.errors = fixed.lost + fixed.failed;
    r.dns = Some(DnsFigures {
        completed: max.completed,
        lost: max.lost,
        fixed_rate: FIXED_RATE,
        fixed_answered: fixed.latencies_us.len() as u64,
        fixed_lost: fixed.lost,
        fixed_failed: fixed.failed,
    });
    Ok(r)
}
