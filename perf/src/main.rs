//! sluice-perf: the forwarder (transparent, REDIRECT) against direct
//! connections, HAProxy and nginx — throughput, connection rate, keep-alive
//! latency, idle cost, policy reloads under load — and the DNS proxy against
//! direct and dnsdist, targets alternating in one run. Everything happens
//! inside a network namespace this process creates and removes (also on
//! Ctrl-C). Needs root (namespaces, nftables, SO_MARK).

mod chart;
mod child;
mod dns;
mod dns_relay;
mod dnsperf;
mod idle;
mod load;
mod ns;
mod procfs;
mod reload;
mod report;
mod scenario;
mod suite;
mod table;
mod target;
mod tcp_relay;

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, Result, bail};
use bpaf::{OptionParser, Parser, construct, long};
use serde::Serialize;

use crate::dns::Upstream;
use crate::idle::Idle;
use crate::load::Sink;
use crate::ns::{Netns, ScratchDir};
use crate::scenario::{Params, Run, Scenario};
use crate::suite::Suite;
use crate::table::Table;
use crate::target::Target;

/// Idle connections held by default, and with `--quick`.
const IDLE_CONNS: usize = 10_000;
const IDLE_CONNS_QUICK: usize = 2_000;

#[derive(Debug, Clone)]
struct Opts {
    quick: bool,
    rounds: usize,
    duration: f64,
    warmup: f64,
    clients: usize,
    idle_conns: Option<usize>,
    workers: usize,
    pipe_size: usize,
    pipe_max_size: usize,
    targets: String,
    scenarios: String,
    out: PathBuf,
}

fn opts() -> OptionParser<Opts> {
    let quick = long("quick")
        .help("Short run (about 2 minutes): 1 round, 1 s per run, 2,000 idle connections held 1 s")
        .switch();
    let rounds = long("rounds").help("Runs per target, alternating targets (1-20)").argument::<usize>("N").fallback(3);
    let duration = long("duration").help("Measured seconds per run (0.2-30)").argument::<f64>("SECS").fallback(3.0);
    let warmup = long("warmup").help("Seconds of load before measuring (0-5)").argument::<f64>("SECS").fallback(0.5);
    let clients = long("clients").help("Concurrent short-connection clients (1-64)").argument::<usize>("N").fallback(4);
    let idle_conns =
        long("idle-conns").help("Idle connections to hold (1-25000; default 10000)").argument::<usize>("N");
    let idle_conns = idle_conns.optional();
    let workers = long("workers").help("Forwarder workers and HAProxy threads (default: CPUs)").argument::<usize>("N");
    let workers = workers.fallback(std::thread::available_parallelism().map_or(2, |n| n.get()));
    let pipe_size = long("pipe-size")
        .help("Pipe bytes per direction per connection: forwarder pipe_size, HAProxy tune.pipesize")
        .argument::<usize>("BYTES")
        .fallback(65536);
    let pipe_max_size = long("pipe-max-size")
        .help("What sluice grows a bulk transfer's pipe to (forwarder pipe_max_size; ≤ pipe-size: never grows)")
        .argument::<usize>("BYTES")
        .fallback(sluice_forwarder::Config::default().pipe_max_size);
    let all_scenarios: Vec<&str> = Scenario::ALL.iter().map(|s| s.name()).collect();
    let scenarios = long("scenarios")
        .help("Comma-separated: bulk-1, bulk-4, short, keepalive, idle, dns, dns-tcp, reload (default: all)")
        .argument::<String>("LIST")
        .fallback(all_scenarios.join(","));
    let all_targets: Vec<&str> = Target::ALL.iter().map(|t| t.name()).collect();
    let targets = long("targets")
        .help("Comma-separated: direct, sluice-uring, sluice-epoll, haproxy, nginx (a port-forward), dns-direct, sluice-dns, dnsdist (default: all)")
        .argument::<String>("LIST")
        .fallback(all_targets.join(","));
    let out = long("out")
        .help("Directory for the results: a folder per run with run.json and one SVG chart per scenario")
        .argument::<PathBuf>("DIR")
        .fallback("perf-results".into());
    construct!(Opts {
        quick,
        rounds,
        duration,
        warmup,
        clients,
        idle_conns,
        workers,
        pipe_size,
        pipe_max_size,
        targets,
        scenarios,
        out
    })
    .to_options()
    .descr(
        "End-to-end benchmark: sluice's forwarder vs direct, HAProxy and nginx; its DNS proxy vs dnsdist (needs root)",
    )
}

#[derive(Debug, Serialize)]
struct Machine {
    cpu: String,
    cpus: usize,
    kernel: String,
    haproxy: String,
    nginx: String,
    dnsdist: String,
    nsd: String,
    dnsperf: String,
}

#[derive(Debug, Serialize)]
struct Output<'a> {
    machine: &'a Machine,
    command: String,
    rounds: usize,
    params: Params,
    seconds: f64,
    skipped: &'a [String],
    tables: &'a [Table],
    runs: &'a [Run],
    idle: &'a [Idle],
}

/// The line of `tool flag`'s output (stdout or stderr) that says "version",
/// else its first line, or "not installed".
fn version(tool: &str, flag: &str) -> String {
    let Ok(o) = std::process::Command::new(tool).arg(flag).output() else { return format!("{tool} not installed") };
    let text = [o.stdout, o.stderr].concat();
    let text = String::from_utf8_lossy(&text);
    let line = text.lines().find(|l| l.to_lowercase().contains("version")).or_else(|| text.lines().next());
    line.unwrap_or("").trim().to_owned()
}

fn machine() -> Machine {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model =
        cpuinfo.lines().find_map(|l| l.strip_prefix("model name")).map(|m| m.trim_start_matches([' ', '\t', ':']));
    Machine {
        cpu: model.unwrap_or("?").to_owned(),
        cpus: std::thread::available_parallelism().map_or(0, |n| n.get()),
        kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim().to_owned(),
        haproxy: version("haproxy", "-v"),
        nginx: version("nginx", "-v"),
        dnsdist: version("dnsdist", "--version"),
        nsd: version("nsd", "-v"),
        dnsperf: format!("dnsperf {}", version("dnsperf", "-h").replace("Version ", "")),
    }
}

/// How often the metrics' histogram samples are folded into buckets (the daemon's `UPKEEP_EVERY`).
const METRICS_UPKEEP_EVERY: Duration = Duration::from_secs(1);

/// Installs the Prometheus recorder the daemon installs (`daemon/src/run.rs`:
/// the same histogram buckets), and its upkeep on a thread of its own, so that
/// the in-process forwarder and DNS proxy pay for their metrics as they do in
/// the daemon: without a recorder every counter and histogram is a no-op.
/// The upkeep thread's name matches no target's, so its CPU (~1 run a second)
/// is not counted as the proxy's.
fn install_metrics() -> Result<()> {
    let prometheus = metrics_exporter_prometheus::PrometheusBuilder::new()
        .set_buckets_for_metric(
            metrics_exporter_prometheus::Matcher::Full(sluice_dnsproxy::metrics::UPSTREAM_DURATION.into()),
            sluice_dnsproxy::metrics::UPSTREAM_BUCKETS,
        )
        .context("histogram buckets")?
        .install_recorder()
        .context("installing the metrics recorder")?;
    std::thread::Builder::new()
        .name("perf-metrics-upkeep".into())
        .spawn(move || {
            loop {
                std::thread::sleep(METRICS_UPKEEP_EVERY);
                prometheus.run_upkeep();
            }
        })
        .context("starting the metrics upkeep thread")?;
    Ok(())
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let res = install_metrics().and_then(|()| match args.first().map(String::as_str) {
        Some(child::FLAG) => child::main(&args[1..]),
        _ => bench(opts().run()),
    });
    match res {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("sluice-perf: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// A comma-separated list of names, each parsed by `parse`.
fn list<T>(s: &str, what: &str, parse: impl Fn(&str) -> Option<T>) -> Result<Vec<T>> {
    s.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|name| parse(name).with_context(|| format!("unknown {what} {name:?}")))
        .collect()
}

/// The rounds and the run's parameters; `idle` says the idle scenario runs
/// (then a connection count that does not fit the descriptor limit is
/// lowered to what does, and says so).
fn params(o: &Opts, idle: bool) -> (usize, Params) {
    let (rounds, secs, hold) = if o.quick { (1, 1.0, 1.0) } else { (o.rounds.clamp(1, 20), o.duration, 2.0) };
    let mut conns = o.idle_conns.unwrap_or(if o.quick { IDLE_CONNS_QUICK } else { IDLE_CONNS });
    // Capped even when the idle scenario does not run: HAProxy's maxconn
    // follows it, and HAProxy refuses to start above the descriptor limit.
    if conns > idle::max_conns() && idle {
        eprintln!(
            "note: {conns} idle connections need {} descriptors in the proxy's process and in this one, \
             RLIMIT_NOFILE is {} (raising the hard limit needs CAP_SYS_RESOURCE): holding {} instead",
            2 * conns as u64 + idle::FD_SLACK,
            ns::nofile_limit(),
            idle::max_conns()
        );
    }
    conns = conns.min(idle::max_conns());
    let p = Params {
        warmup: Duration::from_secs_f64(o.warmup.clamp(0.0, 5.0)),
        duration: Duration::from_secs_f64(secs.clamp(0.2, 30.0)),
        clients: o.clients.clamp(1, 64),
        idle_conns: conns.clamp(1, 25_000),
        hold: Duration::from_secs_f64(hold),
        workers: o.workers.clamp(1, 64),
        pipe_size: o.pipe_size.clamp(4096, 1 << 20),
        pipe_max_size: o.pipe_max_size.clamp(4096, 16 << 20),
    };
    (rounds, p)
}

fn bench(o: Opts) -> Result<()> {
    ns::install_signal_cleanup()?;
    ns::raise_nofile();
    if !nix::unistd::geteuid().is_root() {
        bail!("needs root: it creates a network namespace, nftables rules and marked sockets");
    }
    let mut targets = list(&o.targets, "target", Target::parse)?;
    let selected = list(&o.scenarios, "scenario", Scenario::parse)?;
    let scenarios: Vec<Scenario> = Scenario::ALL.into_iter().filter(|s| selected.contains(s)).collect();
    targets.retain(|t| scenarios.iter().any(|s| s.runs_on(*t)));
    let mut skipped = Vec::new();
    targets.retain(|t| match t.unavailable() {
        Some(why) => {
            skipped.push(format!("{}: {why}", t.name()));
            false
        }
        None => true,
    });
    for s in &skipped {
        eprintln!("skipping {s}");
    }
    let (rounds, p) = params(&o, scenarios.contains(&Scenario::Idle));
    let m = machine();
    println!("machine: {} × {}, kernel {}", m.cpus, m.cpu, m.kernel);
    println!("peers: {}; {}; {}; {}; {}", m.haproxy, m.nginx, m.dnsdist, m.nsd, m.dnsperf);
    let (warm, secs) = (p.warmup.as_secs_f64(), p.duration.as_secs_f64());
    println!("params: {rounds} round(s) alternating targets, {secs:.1} s measured after {warm:.1} s warm-up,");
    println!(
        "        {} short-connection clients, {} idle connections held {:.0} s, {} proxy workers, pipe {} B (sluice grows bulk pipes to {} B)",
        p.clients,
        p.idle_conns,
        p.hold.as_secs_f64(),
        p.workers,
        p.pipe_size,
        p.pipe_max_size
    );

    let started = Instant::now();
    let scratch = ScratchDir::new()?;
    let netns = Netns::new()?;
    let sink = Sink::start(&netns)?;
    let upstream = start_upstream(&netns, &scratch, &mut targets, &mut skipped);
    let suite = Suite { ns: &netns, sink: &sink, scratch: &scratch, upstream: upstream.as_ref(), scenarios, p };
    let results = suite.run(&mut targets, rounds);
    drop(upstream);
    drop(sink);
    drop(netns);
    skipped.extend(results.skipped);
    let seconds = started.elapsed().as_secs_f64();
    eprintln!("done in {seconds:.0} s");

    let tables = report::tables(&results.runs, &results.idle, &targets);
    for t in &tables {
        print!("{}", t.render());
    }
    print!("{}", report::bypassed(&results.runs, &results.idle));
    print!("{}", report::checks(&results.runs, &results.idle, &targets));
    for s in &skipped {
        println!("skipped {s}");
    }
    let command = std::env::args().collect::<Vec<_>>().join(" ");
    let out = Output {
        machine: &m,
        command,
        rounds,
        params: p,
        seconds,
        skipped: &skipped,
        tables: &tables,
        runs: &results.runs,
        idle: &results.idle,
    };
    let dir = write_results(&o.out, &out)?;
    println!("\nresults: {}", dir.display());
    Ok(())
}

/// nsd for the DNS targets; if it cannot start, they are skipped (and say why).
fn start_upstream(
    ns: &Netns,
    scratch: &ScratchDir,
    targets: &mut Vec<Target>,
    skipped: &mut Vec<String>,
) -> Option<Upstream> {
    if !targets.iter().any(|t| t.is_dns()) {
        return None;
    }
    match Upstream::start(ns, scratch) {
        Ok(u) => Some(u),
        Err(e) => {
            for t in targets.iter().filter(|t| t.is_dns()) {
                skipped.push(format!("{}: the nsd upstream did not start: {e:#}", t.name()));
            }
            targets.retain(|t| !t.is_dns());
            None
        }
    }
}

/// Writes `<out>/<UTC time>/run.json` and one `<scenario>.svg` per table; returns the folder.
fn write_results(out: &Path, o: &Output<'_>) -> Result<PathBuf> {
    let stamp = humantime::format_rfc3339_seconds(SystemTime::now()).to_string().replace(':', "-");
    let dir = out.join(stamp);
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let json = dir.join("run.json");
    std::fs::write(&json, serde_json::to_vec_pretty(o)?).with_context(|| format!("writing {}", json.display()))?;
    for t in o.tables {
        let svg = dir.join(format!("{}.svg", t.scenario.name()));
        chart::write(t, &svg).with_context(|| format!("writing {}", svg.display()))?;
    }
    Ok(dir)
}
