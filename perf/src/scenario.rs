//! The TCP scenarios, each measured between two snapshots taken after a
//! warm-up: bulk throughput, short-connection rate, keep-alive round-trip
//! latency, idle connections. The DNS and reload scenarios are in `dns.rs`
//! and `reload.rs`.

use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use anyhow::Result;
use serde::Serialize;

use crate::dns::DnsFigures;
use crate::load::{Gen, Load, Sink};
use crate::ns::Netns;
use crate::procfs::{self, TICKS_PER_SEC};
use crate::reload::ReloadFigures;
use crate::target::{Target, Up};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub(crate) enum Scenario {
    #[serde(rename = "bulk-1")]
    Bulk1,
    #[serde(rename = "bulk-4")]
    Bulk4,
    #[serde(rename = "short")]
    Short,
    #[serde(rename = "keepalive")]
    Keepalive,
    #[serde(rename = "idle")]
    Idle,
    #[serde(rename = "dns")]
    Dns,
    #[serde(rename = "dns-tcp")]
    DnsTcp,
    #[serde(rename = "reload")]
    Reload,
}

/// The TCP targets' peers (the best of them is the ratio's reference).
const TCP_PEERS: &[Target] = &[Target::Haproxy, Target::Nginx];

impl Scenario {
    pub(crate) const ALL: [Scenario; 8] = [
        Scenario::Bulk1,
        Scenario::Bulk4,
        Scenario::Short,
        Scenario::Keepalive,
        Scenario::Idle,
        Scenario::Dns,
        Scenario::DnsTcp,
        Scenario::Reload,
    ];

    pub(crate) fn parse(s: &str) -> Option<Scenario> {
        Scenario::ALL.into_iter().find(|x| x.name() == s)
    }

    pub(crate) fn name(self) -> &'static str {
        match self {
            Scenario::Bulk1 => "bulk-1",
            Scenario::Bulk4 => "bulk-4",
            Scenario::Short => "short",
            Scenario::Keepalive => "keepalive",
            Scenario::Idle => "idle",
            Scenario::Dns => "dns",
            Scenario::DnsTcp => "dns-tcp",
            Scenario::Reload => "reload",
        }
    }

    /// A DNS scenario (dnsperf against the DNS targets).
    pub(crate) fn is_dns(self) -> bool {
        matches!(self, Scenario::Dns | Scenario::DnsTcp)
    }

    /// Whether this scenario measures `t`: DNS targets only for the DNS
    /// scenarios (all but the UDP-only relay for `dns-tcp`), the in-process
    /// forwarder only for `reload`, the bare TCP relay only for the bulk
    /// ones, every TCP target for the rest.
    pub(crate) fn runs_on(self, t: Target) -> bool {
        match self {
            Scenario::Dns => t.is_dns(),
            Scenario::DnsTcp => t.is_dns() && t != Target::DnsRelay,
            Scenario::Reload => t.is_sluice(),
            // A thread per direction: a floor for streams, not a proxy for thousands of connections.
            Scenario::Bulk1 | Scenario::Bulk4 => !t.is_dns(),
            _ => !t.is_dns() && t != Target::TcpRelay,
        }
    }

    /// The target every other one is compared with (`×direct`).
    pub(crate) fn baseline(self) -> Option<Target> {
        match self {
            Scenario::Dns | Scenario::DnsTcp => Some(Target::DnsDirect),
            Scenario::Reload => None,
            _ => Some(Target::Direct),
        }
    }

    /// The other proxies: `×peer` is the ratio to the best of them.
    pub(crate) fn peers(self) -> &'static [Target] {
        match self {
            Scenario::Dns | Scenario::DnsTcp => &[Target::Dnsdist],
            Scenario::Reload => &[],
            _ => TCP_PEERS,
        }
    }

    pub(crate) fn title(self) -> &'static str {
        match self {
            Scenario::Bulk1 => "bulk, 1 stream",
            Scenario::Bulk4 => "bulk, 4 streams",
            Scenario::Short => "short connections (connect, 64 B each way, close)",
            Scenario::Keepalive => "keepalive (1 connection, 64 B ping-pong)",
            Scenario::Idle => "idle connections held open",
            Scenario::Dns => "DNS forwarding (dnsperf, UDP, 1000-name zone on nsd)",
            Scenario::DnsTcp => "DNS forwarding over TCP (dnsperf -m tcp, 8 connections, 1000-name zone on nsd)",
            Scenario::Reload => "policy reload under short-connection load (REGISTRY_ONLY)",
        }
    }

    pub(crate) fn unit(self) -> &'static str {
        match self {
            Scenario::Bulk1 | Scenario::Bulk4 => "Gbit/s",
            Scenario::Short | Scenario::Reload => "conn/s",
            Scenario::Keepalive => "round trips/s",
            Scenario::Idle => "proxy KiB/conn",
            Scenario::Dns | Scenario::DnsTcp => "queries/s",
        }
    }

    /// What one unit of proxy CPU cost is counted per (`Run::cost`).
    pub(crate) fn cost_unit(self) -> &'static str {
        match self {
            Scenario::Bulk1 | Scenario::Bulk4 => "CPU-s/GB",
            Scenario::Short | Scenario::Reload => "CPU-µs/conn",
            Scenario::Keepalive => "CPU-µs/round trip",
            Scenario::Idle => "-",
            Scenario::Dns | Scenario::DnsTcp => "CPU-µs/query",
        }
    }
}

#[derive(Debug, Clone, Copy, Serialize)]
pub(crate) struct Params {
    pub(crate) warmup: Duration,
    pub(crate) duration: Duration,
    pub(crate) clients: usize,
    pub(crate) idle_conns: usize,
    pub(crate) hold: Duration,
    /// Forwarder workers and HAProxy threads.
    pub(crate) workers: usize,
    /// Pipe size per direction per connection (forwarder `pipe_size`, HAProxy `tune.pipesize`).
    pub(crate) pipe_size: usize,
    /// What sluice grows a bulk transfer's pipe to (forwarder `pipe_max_size`).
    pub(crate) pipe_max_size: usize,
}

/// CPU used during the measured window, in cores (CPU-seconds per second).
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub(crate) struct Cpu {
    /// The load generator's thread.
    pub(crate) generator: f64,
    /// The sink's thread.
    pub(crate) sink: f64,
    /// The proxy: sluice-fwd-* threads, or the HAProxy process.
    pub(crate) proxy: f64,
    /// Everything else on the machine (other processes, ksoftirqd): noise.
    pub(crate) other: f64,
}

/// One measured run.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Run {
    pub(crate) target: Target,
    pub(crate) round: usize,
    pub(crate) scenario: Scenario,
    /// Gbit/s (bulk), connections/s (short) or round trips/s (keepalive).
    pub(crate) value: f64,
    /// Latency percentiles (short: a whole connection; keepalive: one round trip), µs.
    pub(crate) p50_us: Option<f64>,
    pub(crate) p99_us: Option<f64>,
    pub(crate) p999_us: Option<f64>,
    /// The proxy's CPU per unit of work: see [`Scenario::cost_unit`].
    pub(crate) cost: Option<f64>,
    pub(crate) errors: u64,
    /// Connections the client made, and how many of them the redirect rule sent to the proxy.
    pub(crate) connections: u64,
    pub(crate) redirected: u64,
    pub(crate) cpu: Cpu,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) reload: Option<ReloadFigures>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) dns: Option<DnsFigures>,
}

/// Where a run's CPU time goes: the proxy, and what of it runs outside this process.
pub(crate) trait Meter {
    /// CPU time (clock ticks, user + system) the proxy has used so far.
    fn proxy_ticks(&self) -> u64;
    /// Ticks of the run's other processes (a foreign proxy, the DNS
    /// upstream, dnsperf): with this process's own, the part of the
    /// machine's busy time that is not noise.
    fn outside_ticks(&self) -> u64;
    /// The load generator's ticks.
    fn generator_ticks(&self) -> u64 {
        procfs::task_ticks("perf-gen")
    }
    /// The sink's (or upstream's) ticks.
    fn sink_ticks(&self) -> u64 {
        procfs::task_ticks("perf-sink")
    }
}

/// The proxy's CPU per unit of work: `cores` over `secs` spread over
/// `count` units, times `scale` (1e6 for µs; 1e9 for seconds per GB of bytes).
pub(crate) fn cost(proxy_cores: f64, secs: f64, count: f64, scale: f64) -> Option<f64> {
    (count > 0.0 && proxy_cores > 0.0).then(|| proxy_cores * secs / count * scale)
}

pub(crate) struct Snap {
    t: Instant,
    generator: u64,
    sink: u64,
    proxy: u64,
    ours: u64,
    busy: u64,
}

impl Snap {
    pub(crate) fn take(m: &impl Meter) -> Snap {
        Snap {
            t: Instant::now(),
            generator: m.generator_ticks(),
            sink: m.sink_ticks(),
            proxy: m.proxy_ticks(),
            ours: procfs::self_ticks() + m.outside_ticks(),
            busy: procfs::machine_busy(),
        }
    }

    /// CPU in cores between this snapshot and `later`, and the seconds between them.
    pub(crate) fn cpu(&self, later: &Snap) -> (Cpu, f64) {
        let secs = later.t.duration_since(self.t).as_secs_f64();
        let cores = |a: u64, b: u64| b.saturating_sub(a) as f64 / TICKS_PER_SEC / secs;
        let cpu = Cpu {
            generator: cores(self.generator, later.generator),
            sink: cores(self.sink, later.sink),
            proxy: cores(self.proxy, later.proxy),
            other: (cores(self.busy, later.busy) - cores(self.ours, later.ours)).max(0.0),
        };
        (cpu, secs)
    }
}

/// Seconds left, for the whole benchmark, to wait for a quiet machine.
static SETTLE_BUDGET_MS: AtomicU64 = AtomicU64::new(90_000);

/// Waits (at most 10 s, and 90 s over the whole benchmark) until the rest of
/// the machine uses under 0.25 cores: on a shared 2-core machine background
/// load moves the numbers more than anything measured here.
pub(crate) fn settle(m: &impl Meter) {
    let started = Instant::now();
    loop {
        let a = Snap::take(m);
        std::thread::sleep(Duration::from_millis(250));
        let (cpu, _) = a.cpu(&Snap::take(m));
        let waited = started.elapsed().as_millis() as u64;
        if cpu.other < 0.25 || waited > 10_000 || waited > SETTLE_BUDGET_MS.load(Relaxed) {
            let _ = SETTLE_BUDGET_MS.fetch_update(Relaxed, Relaxed, |b| Some(b.saturating_sub(waited)));
            return;
        }
    }
}

/// A run with its main figure; the scenario fills in the rest.
pub(crate) fn run(target: Target, round: usize, scenario: Scenario, value: f64, cpu: Cpu) -> Run {
    Run {
        target,
        round,
        scenario,
        value,
        p50_us: None,
        p99_us: None,
        p999_us: None,
        cost: None,
        errors: 0,
        connections: 0,
        redirected: 0,
        cpu,
        reload: None,
        dns: None,
    }
}

pub(crate) fn bulk(ns: &Netns, up: &Up<'_>, sink: &Sink, round: usize, streams: usize, p: &Params) -> Result<Run> {
    settle(up);
    let redirected = ns.redirected();
    let generator = Gen::start(ns, Load::Bulk { streams }, p.warmup + p.duration + Duration::from_secs(5))?;
    generator.wait_ready(streams as u64, Duration::from_secs(3))?;
    std::thread::sleep(p.warmup);
    let (a, bytes_a) = (Snap::take(up), sink.stats.bulk_bytes.load(Relaxed));
    std::thread::sleep(p.duration);
    let (b, bytes_b) = (Snap::take(up), sink.stats.bulk_bytes.load(Relaxed));
    let ctl = generator.ctl.clone();
    generator.finish(Duration::from_secs(5))?;
    let (cpu, secs) = a.cpu(&b);
    let gbits = (bytes_b - bytes_a) as f64 * 8.0 / secs / 1e9;
    let scenario = if streams == 1 { Scenario::Bulk1 } else { Scenario::Bulk4 };
    let mut r = run(up.target, round, scenario, gbits, cpu);
    r.cost = cost(cpu.proxy, secs, (bytes_b - bytes_a) as f64, 1e9);
    r.errors = ctl.errors.load(Relaxed);
    r.connections = streams as u64;
    r.redirected = ns.redirected().saturating_sub(redirected);
    Ok(r)
}

pub(crate) fn short(ns: &Netns, up: &Up<'_>, round: usize, p: &Params) -> Result<Run> {
    settle(up);
    let redirected = ns.redirected();
    let load = Load::Short { clients: p.clients };
    let generator = Gen::start(ns, load, p.warmup + p.duration + Duration::from_secs(5))?;
    let ctl = generator.ctl.clone();
    let (samples, rate, cpu) = measure(up, generator, p)?;
    let mut r = run(up.target, round, Scenario::Short, rate, cpu);
    r.cost = cost(cpu.proxy, 1.0, rate, 1e6);
    let pct = |q: f64| percentile(&samples, q).map(f64::from);
    (r.p50_us, r.p99_us) = (pct(0.50), pct(0.99));
    r.errors = ctl.errors.load(Relaxed);
    r.connections = ctl.done.load(Relaxed) + r.errors;
    r.redirected = ns.redirected().saturating_sub(redirected);
    Ok(r)
}

/// Warm-up, then one measured window: the generator's sorted latency
/// samples, the completions per second inside the window, and the CPU spent.
fn measure(up: &Up<'_>, generator: Gen, p: &Params) -> Result<(Vec<u32>, f64, Cpu)> {
    std::thread::sleep(p.warmup);
    let ctl = generator.ctl.clone();
    let (a, done_a) = (Snap::take(up), ctl.done.load(Relaxed));
    ctl.measuring.store(true, Relaxed);
    std::thread::sleep(p.duration);
    ctl.measuring.store(false, Relaxed);
    let (b, done_b) = (Snap::take(up), ctl.done.load(Relaxed));
    let mut samples = generator.finish(Duration::from_secs(5))?;
    samples.sort_unstable();
    let (cpu, secs) = a.cpu(&b);
    Ok((samples, (done_b - done_a) as f64 / secs, cpu))
}

/// The `q` quantile of sorted samples (nearest rank).
pub(crate) fn percentile<T: Copy>(sorted: &[T], q: f64) -> Option<T> {
    sorted.get(((sorted.len() as f64 - 1.0) * q).round() as usize).copied()
}

/// One connection kept open through the target, 64 bytes each way in a loop:
/// round trips per second and their latency percentiles.
pub(crate) fn keepalive(ns: &Netns, up: &Up<'_>, round: usize, p: &Params) -> Result<Run> {
    settle(up);
    let redirected = ns.redirected();
    let generator = Gen::start(ns, Load::Keepalive, p.warmup + p.duration + Duration::from_secs(5))?;
    generator.wait_ready(1, Duration::from_secs(3))?;
    let ctl = generator.ctl.clone();
    let (samples, rate, cpu) = measure(up, generator, p)?;
    let mut r = run(up.target, round, Scenario::Keepalive, rate, cpu);
    r.cost = cost(cpu.proxy, 1.0, rate, 1e6);
    let pct = |q: f64| percentile(&samples, q).map(|ns| f64::from(ns) / 1000.0);
    (r.p50_us, r.p99_us, r.p999_us) = (pct(0.50), pct(0.99), pct(0.999));
    r.errors = ctl.errors.load(Relaxed);
    r.connections = ctl.ready.load(Relaxed);
    r.redirected = ns.redirected().saturating_sub(redirected);
    Ok(r)
}
