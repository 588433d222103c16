//! The scenarios, each measured between two snapshots taken after a warm-up:
//! bulk throughput, short-connection rate, keep-alive round-trip latency, idle
//! connections.

use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use serde::{Deserialize, Serialize};

use crate::load::{Gen, Load, Sink};
use crate::ns::Netns;
use crate::procfs::{self, TICKS_PER_SEC};
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
}

impl Scenario {
    pub(crate) const ALL: [Scenario; 4] = [Scenario::Bulk1, Scenario::Bulk4, Scenario::Short, Scenario::Keepalive];

    pub(crate) fn parse(s: &str) -> Option<Scenario> {
        Scenario::ALL.into_iter().find(|x| x.name() == s)
    }

    pub(crate) fn name(self) -> &'static str {
        match self {
            Scenario::Bulk1 => "bulk-1",
            Scenario::Bulk4 => "bulk-4",
            Scenario::Short => "short",
            Scenario::Keepalive => "keepalive",
        }
    }

    pub(crate) fn title(self) -> &'static str {
        match self {
            Scenario::Bulk1 => "bulk, 1 stream",
            Scenario::Bulk4 => "bulk, 4 streams",
            Scenario::Short => "short connections (connect, 64 B each way, close)",
            Scenario::Keepalive => "keepalive (1 connection, 64 B ping-pong)",
        }
    }

    pub(crate) fn unit(self) -> &'static str {
        match self {
            Scenario::Bulk1 | Scenario::Bulk4 => "Gbit/s",
            Scenario::Short => "conn/s",
            Scenario::Keepalive => "round trips/s",
        }
    }
}

#[derive(Debug, Clone, Copy)]
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
    pub(crate) errors: u64,
    /// Connections the client made, and how many of them the redirect rule sent to the proxy.
    pub(crate) connections: u64,
    pub(crate) redirected: u64,
    pub(crate) cpu: Cpu,
}

struct Snap {
    t: Instant,
    generator: u64,
    sink: u64,
    proxy: u64,
    ours: u64,
    busy: u64,
}

impl Snap {
    fn take(up: &Up<'_>) -> Snap {
        let foreign = if up.target.is_foreign() { up.proxy_ticks() } else { 0 };
        Snap {
            t: Instant::now(),
            generator: procfs::task_ticks("perf-gen"),
            sink: procfs::task_ticks("perf-sink"),
            proxy: up.proxy_ticks(),
            ours: procfs::self_ticks() + foreign,
            busy: procfs::machine_busy(),
        }
    }

    fn cpu(&self, later: &Snap) -> (Cpu, f64) {
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
fn settle(up: &Up<'_>) {
    let started = Instant::now();
    loop {
        let a = Snap::take(up);
        std::thread::sleep(Duration::from_millis(250));
        let (cpu, _) = a.cpu(&Snap::take(up));
        let waited = started.elapsed().as_millis() as u64;
        if cpu.other < 0.25 || waited > 10_000 || waited > SETTLE_BUDGET_MS.load(Relaxed) {
            let _ = SETTLE_BUDGET_MS.fetch_update(Relaxed, Relaxed, |b| Some(b.saturating_sub(waited)));
            return;
        }
    }
}

fn run(up: &Up<'_>, round: usize, scenario: Scenario, value: f64, cpu: Cpu) -> Run {
    Run {
        target: up.target,
        round,
        scenario,
        value,
        p50_us: None,
        p99_us: None,
        p999_us: None,
        errors: 0,
        connections: 0,
        redirected: 0,
        cpu,
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
    let mut r = run(up, round, scenario, gbits, cpu);
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
    let mut r = run(up, round, Scenario::Short, rate, cpu);
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
fn percentile(sorted: &[u32], q: f64) -> Option<u32> {
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
    let mut r = run(up, round, Scenario::Keepalive, rate, cpu);
    let pct = |q: f64| percentile(&samples, q).map(|ns| f64::from(ns) / 1000.0);
    (r.p50_us, r.p99_us, r.p999_us) = (pct(0.50), pct(0.99), pct(0.999));
    r.errors = ctl.errors.load(Relaxed);
    r.connections = ctl.ready.load(Relaxed);
    r.redirected = ns.redirected().saturating_sub(redirected);
    Ok(r)
}

/// Idle connections held open through the target, measured in a fresh
/// process (see `child.rs`) so that heap freed by earlier runs does not hide
/// what they cost.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Idle {
    pub(crate) target: Target,
    pub(crate) round: usize,
    pub(crate) conns: usize,
    /// Growth of the measuring process's RSS (KiB) while holding them: the
    /// generator, plus the forwarder for sluice targets.
    pub(crate) rss_kib: i64,
    /// Growth of HAProxy's RSS (KiB).
    pub(crate) foreign_rss_kib: Option<i64>,
    /// Descriptors the proxy opened for them (sluice: the process's growth
    /// less the generator's one per connection; HAProxy: its own).
    pub(crate) proxy_fds: i64,
    /// io-wq kernel workers in the process, all of them and those serving the forwarder's rings.
    pub(crate) iowq_total: usize,
    pub(crate) iowq_forwarder: usize,
}

pub(crate) fn idle(ns: &Netns, up: &Up<'_>, round: usize, p: &Params) -> Result<Idle> {
    let (rss0, fds0, foreign0) = (procfs::rss_kib("self").unwrap_or(0), procfs::fds("self"), up.foreign_mem());
    let n = p.idle_conns;
    let redirected = ns.redirected();
    let generator = Gen::start(ns, Load::Idle { conns: n }, p.hold + Duration::from_secs(20))?;
    generator.wait_ready(n as u64, Duration::from_secs(10))?;
    if up.target != Target::Direct && ns.redirected() < redirected + n as u64 {
        bail!("only {} of {n} idle connections were redirected", ns.redirected() - redirected);
    }
    std::thread::sleep(p.hold);
    let (iowq_total, iowq_forwarder) = procfs::iowq_workers("sluice-fwd-");
    let (rss1, fds1, foreign1) = (procfs::rss_kib("self").unwrap_or(0), procfs::fds("self"), up.foreign_mem());
    generator.finish(Duration::from_secs(5))?;
    let own_fds = fds1 as i64 - fds0 as i64 - n as i64;
    Ok(Idle {
        target: up.target,
        round,
        conns: n,
        rss_kib: rss1 as i64 - rss0 as i64,
        foreign_rss_kib: foreign0.zip(foreign1).map(|((a, _), (b, _))| b as i64 - a as i64),
        proxy_fds: foreign0.zip(foreign1).map_or(own_fds, |((_, a), (_, b))| b as i64 - a as i64),
        iowq_total,
        iowq_forwarder,
    })
}
