//! sluice-perf: transparent (REDIRECT) throughput, connection rate and idle
//! cost through the sluice forwarder, against direct connections and against
//! HAProxy (transparent, splice forced), alternating targets in one run.
//! Everything happens inside a network namespace this process creates and
//! removes (also on Ctrl-C). Needs root (namespaces, nftables, SO_MARK).

mod child;
mod load;
mod ns;
mod procfs;
mod report;
mod scenario;
mod target;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use bpaf::{OptionParser, Parser, construct, long};
use serde::Serialize;

use crate::load::Sink;
use crate::ns::{Netns, ScratchDir};
use crate::scenario::{Idle, Params, Run, Scenario};
use crate::target::{Target, Up};

#[derive(Debug, Clone)]
struct Opts {
    quick: bool,
    rounds: usize,
    duration: f64,
    warmup: f64,
    clients: usize,
    idle_conns: usize,
    workers: usize,
    pipe_size: usize,
    targets: String,
    scenarios: String,
    json: Option<PathBuf>,
}

fn opts() -> OptionParser<Opts> {
    let quick = long("quick").help("Short run: 1 round, 1 s per scenario, idle held 1 s").switch();
    let rounds = long("rounds").help("Runs per target, alternating targets (1-20)").argument::<usize>("N").fallback(3);
    let duration = long("duration").help("Measured seconds per bulk/short run (0.2-30)").argument::<f64>("SECS");
    let duration = duration.fallback(3.0);
    let warmup = long("warmup").help("Seconds of load before measuring (0-5)").argument::<f64>("SECS").fallback(0.5);
    let clients = long("clients").help("Concurrent short-connection clients (1-64)").argument::<usize>("N").fallback(4);
    let idle_conns = long("idle-conns").help("Idle connections to hold (0-5000; 0 skips)").argument::<usize>("N");
    let idle_conns = idle_conns.fallback(1000);
    let workers = long("workers").help("Forwarder workers and HAProxy threads (default: CPUs)").argument::<usize>("N");
    let workers = workers.fallback(std::thread::available_parallelism().map_or(2, |n| n.get()));
    let pipe_size = long("pipe-size")
        .help("Pipe bytes per direction per connection: forwarder pipe_size, HAProxy tune.pipesize")
        .argument::<usize>("BYTES")
        .fallback(65536);
    let scenarios = long("scenarios")
        .help("Comma-separated: bulk-1, bulk-4, short, keepalive")
        .argument::<String>("LIST")
        .fallback("bulk-1,bulk-4,short".into());
    let targets = long("targets")
        .help("Comma-separated: direct, sluice-uring, sluice-epoll, haproxy, nginx (nginx: a port-forward)")
        .argument::<String>("LIST")
        .fallback("direct,sluice-uring,sluice-epoll,haproxy,nginx".into());
    let json = long("json").help("Also write every run as JSON to this file").argument::<PathBuf>("FILE").optional();
    construct!(Opts {
        quick,
        rounds,
        duration,
        warmup,
        clients,
        idle_conns,
        workers,
        pipe_size,
        targets,
        scenarios,
        json
    })
    .to_options()
    .descr("Transparent-proxy benchmark: sluice forwarder vs direct vs HAProxy (needs root)")
}

#[derive(Debug, Serialize)]
struct Machine {
    cpu: String,
    cpus: usize,
    kernel: String,
    haproxy: String,
    nginx: String,
}

#[derive(Debug, Serialize)]
struct Output<'a> {
    machine: &'a Machine,
    command: String,
    runs: &'a [Run],
    idle: &'a [Idle],
}

fn machine() -> Machine {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model =
        cpuinfo.lines().find_map(|l| l.strip_prefix("model name")).map(|m| m.trim_start_matches([' ', '\t', ':']));
    let haproxy = std::process::Command::new("haproxy").arg("-v").output().ok();
    let haproxy = haproxy.map(|o| String::from_utf8_lossy(&o.stdout).lines().next().unwrap_or("").to_owned());
    let nginx = std::process::Command::new("nginx").arg("-v").output().ok();
    let nginx = nginx.map(|o| String::from_utf8_lossy(&o.stderr).trim().to_owned());
    Machine {
        cpu: model.unwrap_or("?").to_owned(),
        cpus: std::thread::available_parallelism().map_or(0, |n| n.get()),
        kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim().to_owned(),
        haproxy: haproxy.unwrap_or_else(|| "not installed".into()),
        nginx: nginx.unwrap_or_else(|| "nginx not installed".into()),
    }
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let res = match args.first().map(String::as_str) {
        Some(child::FLAG) => child::main(&args[1..]),
        _ => bench(opts().run()),
    };
    match res {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("sluice-perf: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn bench(o: Opts) -> Result<()> {
    ns::install_signal_cleanup()?;
    ns::raise_nofile();
    if !nix::unistd::geteuid().is_root() {
        bail!("needs root: it creates a network namespace, nftables rules and marked sockets");
    }
    let mut targets = Vec::new();
    for name in o.targets.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        targets.push(Target::parse(name).with_context(|| format!("unknown target {name:?}"))?);
    }
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
    let (rounds, secs, hold) = if o.quick { (1, 1.0, 1.0) } else { (o.rounds.clamp(1, 20), o.duration, 2.0) };
    let p = Params {
        warmup: Duration::from_secs_f64(o.warmup.clamp(0.0, 5.0)),
        duration: Duration::from_secs_f64(secs.clamp(0.2, 30.0)),
        clients: o.clients.clamp(1, 64),
        idle_conns: o.idle_conns.min(5000),
        hold: Duration::from_secs_f64(hold),
        workers: o.workers.clamp(1, 64),
        pipe_size: o.pipe_size.clamp(4096, 1 << 20),
    };
    let mut scenarios = Vec::new();
    for name in o.scenarios.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        scenarios.push(Scenario::parse(name).with_context(|| format!("unknown scenario {name:?}"))?);
    }
    let m = machine();
    println!("machine: {} × {}, kernel {}, {}, {}", m.cpus, m.cpu, m.kernel, m.haproxy, m.nginx);
    let (warm, secs) = (p.warmup.as_secs_f64(), p.duration.as_secs_f64());
    println!("params: {rounds} round(s) alternating targets, {secs:.1} s measured after {warm:.1} s warm-up,");
    println!(
        "        {} short-connection clients, {} idle connections held {:.0} s, {} proxy workers, pipe {} B",
        p.clients,
        p.idle_conns,
        p.hold.as_secs_f64(),
        p.workers,
        p.pipe_size
    );

    let scratch = ScratchDir::new()?;
    let netns = Netns::new()?;
    let sink = Sink::start(&netns)?;
    let started = Instant::now();
    let (mut runs, mut idle) = (Vec::new(), Vec::new());
    let mut failed: Vec<Target> = Vec::new();
    for round in 0..rounds {
        for &t in &targets {
            if failed.contains(&t) {
                continue;
            }
            match one_target(&netns, &sink, &scratch, t, round, &scenarios, &p) {
                Ok((r, i)) => {
                    runs.extend(r);
                    idle.extend(i);
                }
                Err(e) => {
                    eprintln!("  {} failed, dropped from this run: {e:#}", t.name());
                    skipped.push(format!("{}: failed: {e:#}", t.name()));
                    failed.push(t);
                }
            }
        }
    }
    drop(sink);
    drop(netns);
    targets.retain(|t| !failed.contains(t));
    eprintln!("done in {:.0} s", started.elapsed().as_secs_f64());
    print!("{}", report::tables(&runs, &targets));
    print!("{}", report::idle_table(&idle, &targets));
    print!("{}", report::checks(&runs, &idle, &targets));
    for s in &skipped {
        println!("skipped {s}");
    }
    if let Some(path) = o.json {
        let command = std::env::args().collect::<Vec<_>>().join(" ");
        let out = Output { machine: &m, command, runs: &runs, idle: &idle };
        std::fs::write(&path, serde_json::to_vec_pretty(&out)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

fn one_target(
    netns: &Netns,
    sink: &Sink,
    scratch: &ScratchDir,
    t: Target,
    round: usize,
    scenarios: &[Scenario],
    p: &Params,
) -> Result<(Vec<Run>, Option<Idle>)> {
    let mut idle = None;
    if p.idle_conns > 0 && !t.is_foreign() {
        idle = Some(child::run(netns, t, round, p)?);
    }
    let up = Up::start(netns, t, p, Some(scratch))?;
    if p.idle_conns > 0 && t.is_foreign() {
        idle = Some(scenario::idle(netns, &up, round, p)?);
    }
    let mut runs = Vec::new();
    for s in scenarios {
        runs.push(match s {
            Scenario::Bulk1 => scenario::bulk(netns, &up, sink, round, 1, p)?,
            Scenario::Bulk4 => scenario::bulk(netns, &up, sink, round, 4, p)?,
            Scenario::Short => scenario::short(netns, &up, round, p)?,
            Scenario::Keepalive => scenario::keepalive(netns, &up, round, p)?,
        });
    }
    let vals: Vec<String> = runs.iter().map(|r| format!("{:.2} {}", r.value, r.scenario.unit())).collect();
    eprintln!("round {} {:<13} {}", round + 1, t.name(), vals.join("  "));
    Ok((runs, idle))
}
