//! The `reload` scenario: short connections through the in-process
//! forwarder while its policy is reloaded 100 times the way the daemon does
//! it (`daemon/src/reload.rs`): files written to a policy directory, then
//! read, parsed, validated, compiled and stored into the forwarder's
//! `ArcSwap`. The policy is REGISTRY_ONLY with a ServiceEntry for the sink's
//! echo ports, so a torn or empty policy would BlackHole connections; every
//! refused, reset, timed-out or wrongly echoed connection is counted.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde::Serialize;
use sluice_policy::model::Mode;
use sluice_policy::{LoadErrors, Snapshot, load_sources, read_paths};

use crate::load::{self, Failures, Gen, Load};
use crate::ns::{ECHO_PORTS, Netns, PORT_ECHO, PORT_HOLD, SINK_IP, ScratchDir};
use crate::scenario::{self, Params, Run, Scenario, Snap};
use crate::target::Up;

/// Reloads per measured window (the figure).
pub(crate) const RELOADS: usize = 100;

/// Reload figures beside the run's main ones (conn/s during the reloads).
#[derive(Debug, Clone, Copy, Serialize)]
pub(crate) struct ReloadFigures {
    pub(crate) reloads: u64,
    /// One reload (write, read, parse, validate, compile, store), ms.
    pub(crate) reload_ms_median: f64,
    pub(crate) reload_ms_max: f64,
    /// conn/s in the window before, same policy and load, no reloads.
    pub(crate) without_conn_s: f64,
    /// Connections completed during the reloads.
    pub(crate) completed: u64,
    /// Connections that failed during the reloads, by kind: must all be 0.
    pub(crate) failures: Failures,
    /// Connections the forwarder refused by policy (BlackHole) during the reloads.
    pub(crate) blackholed: u64,
}

/// The policy directory the reloads read: an EgressPolicy (REGISTRY_ONLY),
/// the sink's ServiceEntry, and an unrelated ServiceEntry that comes and goes.
struct PolicyDir {
    dir: PathBuf,
}

impl PolicyDir {
    fn new(scratch: &ScratchDir) -> Result<PolicyDir> {
        let dir = scratch.path.join("policy.d");
        std::fs::create_dir_all(&dir)?;
        std::fs::write(dir.join("egress.yaml"), EGRESS)?;
        std::fs::write(dir.join("sink.yaml"), sink_entry())?;
        Ok(PolicyDir { dir })
    }

    /// Generation `n` of the directory: odd ones have an extra ServiceEntry
    /// (named after `n`, so each one differs), even ones do not.
    fn write(&self, n: usize) -> Result<()> {
        let extra = self.dir.join("extra.yaml");
        if n % 2 == 1 {
            std::fs::write(&extra, extra_entry(n))?;
        } else if extra.exists() {
            std::fs::remove_file(&extra)?;
        }
        Ok(())
    }

    /// What the daemon's reload does with the directory: read, load (parse
    /// and validate), compile; any problem is an error.
    fn compile(&self) -> Result<Snapshot> {
        let (files, problems) = read_paths(std::slice::from_ref(&self.dir));
        if !problems.is_empty() {
            bail!("{}", LoadErrors(problems));
        }
        let set = load_sources(&files)?;
        if set.settings.mode != Mode::RegistryOnly {
            bail!("the reload policy is not REGISTRY_ONLY");
        }
        Ok(Snapshot::compile(&set))
    }
}

const EGRESS: &str = "apiVersion: sluice.dev/v1alpha1
kind: EgressPolicy
metadata:
  name: perf
spec:
  outboundTrafficPolicy:
    mode: REGISTRY_ONLY
";

/// The sink's echo ports, registered by address (opaque TCP, no name needed).
fn sink_entry() -> String {
    let ports: String = (0..ECHO_PORTS)
        .map(|i| format!("  - number: {p}\n    name: echo-{p}\n    protocol: TCP\n", p = PORT_ECHO + i))
        .collect();
    format!(
        "apiVersion: networking.istio.io/v1beta1
kind: ServiceEntry
metadata:
  name: perf-sink
spec:
  hosts:
  - sink.perf.test
  addresses:
  - {SINK_IP}/32
  ports:
{ports}  location: MESH_EXTERNAL
  resolution: NONE
"
    )
}

fn extra_entry(n: usize) -> String {
    format!(
        "apiVersion: networking.istio.io/v1beta1
kind: ServiceEntry
metadata:
  name: unrelated-{n}
spec:
  hosts:
  - api{n}.unrelated.example
  ports:
  - number: 443
    name: tls
    protocol: TLS
  location: MESH_EXTERNAL
  resolution: DNS
"
    )
}

/// One round: the REGISTRY_ONLY policy in force (and checked to refuse an
/// unregistered port), short-connection load, a window without reloads,
/// then a window with [`RELOADS`] reloads spread evenly over it.
pub(crate) fn reload(ns: &Netns, up: &Up<'_>, scratch: &ScratchDir, round: usize, p: &Params) -> Result<Run> {
    let policy = up.policy().context("reload needs the in-process forwarder")?;
    let dir = PolicyDir::new(scratch)?;
    dir.write(0)?;
    let before = policy.swap(Arc::new(dir.compile()?));
    check_enforced(ns, up)?;
    scenario::settle(up);
    let redirected = ns.redirected();
    let generator =
        Gen::start(ns, Load::Short { clients: p.clients }, p.warmup + 2 * p.duration + Duration::from_secs(10))?;
    let ctl = generator.ctl.clone();
    std::thread::sleep(p.warmup);
    let (a, done_a) = (Snap::take(up), ctl.done.load(Relaxed));
    std::thread::sleep(p.duration);
    let (b, done_b) = (Snap::take(up), ctl.done.load(Relaxed));
    let (fail0, refused0) = (ctl.failures(), up.refused_by_policy());
    ctl.measuring.store(true, Relaxed);
    let mut took = reload_evenly(&dir, policy, p.duration)?;
    ctl.measuring.store(false, Relaxed);
    let (c, done_c) = (Snap::take(up), ctl.done.load(Relaxed));
    let (failures, blackholed) = (ctl.failures().since(&fail0), up.refused_by_policy() - refused0);
    let mut samples = generator.finish(Duration::from_secs(5))?;
    policy.store(before);
    samples.sort_unstable();
    took.sort_by(f64::total_cmp);
    let ((_, secs_ab), (cpu, secs)) = (a.cpu(&b), b.cpu(&c));
    let rate = (done_c - done_b) as f64 / secs;
    let mut r = scenario::run(up.target, round, Scenario::Reload, rate, cpu);
    r.cost = scenario::cost(cpu.proxy, 1.0, rate, 1e6);
    let pct = |q: f64| scenario::percentile(&samples, q).map(f64::from);
    (r.p50_us, r.p99_us) = (pct(0.50), pct(0.99));
    r.errors = ctl.errors.load(Relaxed);
    r.connections = ctl.done.load(Relaxed) + r.errors;
    r.redirected = ns.redirected().saturating_sub(redirected);
    r.reload = Some(ReloadFigures {
        reloads: took.len() as u64,
        reload_ms_median: scenario::percentile(&took, 0.5).unwrap_or(0.0),
        reload_ms_max: took.last().copied().unwrap_or(0.0),
        without_conn_s: (done_b - done_a) as f64 / secs_ab,
        completed: done_c - done_b,
        failures,
        blackholed,
    });
    Ok(r)
}

/// The policy must be in force: a connection to the hold port, which no
/// ServiceEntry covers, is refused by the forwarder; one to an echo port passes.
fn check_enforced(ns: &Netns, up: &Up<'_>) -> Result<()> {
    let refused = up.refused_by_policy();
    let _ = load::probe_port(ns, PORT_HOLD); // fails either way: refused, or no echo from the hold sink
    let until = Instant::now() + Duration::from_secs(2);
    while up.refused_by_policy() == refused {
        if Instant::now() > until {
            bail!("REGISTRY_ONLY is not in force: a connection to an unregistered port was not refused");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    load::probe(ns).context("a registered port through the REGISTRY_ONLY policy")
}

/// [`RELOADS`] reloads, one every `window / RELOADS`, each writing the next
/// generation of the directory and storing what it compiles to; returns how
/// long each took, ms. Ends at the end of the window.
fn reload_evenly(dir: &PolicyDir, policy: &arc_swap::ArcSwap<Snapshot>, window: Duration) -> Result<Vec<f64>> {
    let start = Instant::now();
    let step = window / RELOADS as u32;
    let mut took = Vec::with_capacity(RELOADS);
    for n in 1..=RELOADS {
        let at = start + step * n as u32 - step / 2;
        std::thread::sleep(at.saturating_duration_since(Instant::now()));
        let t0 = Instant::now();
        dir.write(n)?;
        policy.store(Arc::new(dir.compile().with_context(|| format!("reload {n}"))?));
        took.push(t0.elapsed().as_secs_f64() * 1e3);
    }
    std::thread::sleep((start + window).saturating_duration_since(Instant::now()));
    Ok(took)
}
