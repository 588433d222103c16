//! The run itself: rounds of every target in turn (A B C … A B C …), each
//! target started once per round and measured in every scenario that
//! applies to it, with a progress bar on stderr. A target that fails is
//! dropped from the rest of the run and listed as skipped, with why.

use std::time::Duration;

use anyhow::{Context, Result};
use indicatif::{ProgressBar, ProgressStyle};

use crate::child::ProxyChild;
use crate::dns::{self, DnsUp, Upstream};
use crate::idle::{self, Idle};
use crate::load::Sink;
use crate::ns::{Netns, ScratchDir};
use crate::reload;
use crate::scenario::{self, Params, Run, Scenario};
use crate::target::{Target, Up};

/// Everything a round needs, set up once for the whole run.
#[derive(Debug)]
pub(crate) struct Suite<'a> {
    pub(crate) ns: &'a Netns,
    pub(crate) sink: &'a Sink,
    pub(crate) scratch: &'a ScratchDir,
    /// nsd, when a DNS target runs.
    pub(crate) upstream: Option<&'a Upstream>,
    /// In the order they run (`Scenario::ALL`'s).
    pub(crate) scenarios: Vec<Scenario>,
    pub(crate) p: Params,
}

/// What the run measured, and the targets that did not run, with why.
#[derive(Debug, Default)]
pub(crate) struct Results {
    pub(crate) runs: Vec<Run>,
    pub(crate) idle: Vec<Idle>,
    pub(crate) skipped: Vec<String>,
}

impl Suite<'_> {
    fn steps(&self, t: Target) -> u64 {
        self.scenarios.iter().filter(|s| s.runs_on(t)).count() as u64
    }

    /// `rounds` rounds over `targets`; those that fail are removed from it.
    pub(crate) fn run(&self, targets: &mut Vec<Target>, rounds: usize) -> Results {
        let total: u64 = targets.iter().map(|t| self.steps(*t)).sum::<u64>() * rounds as u64;
        let progress = ProgressBar::new(total);
        let style = ProgressStyle::with_template("{spinner} {elapsed_precise} [{bar:30}] {pos}/{len} {wide_msg}");
        progress.set_style(style.unwrap_or_else(|_| ProgressStyle::default_bar()));
        progress.enable_steady_tick(Duration::from_millis(200));
        let mut out = Results::default();
        let mut failed: Vec<Target> = Vec::new();
        for round in 0..rounds {
            for &t in targets.iter().filter(|t| self.steps(**t) > 0) {
                if failed.contains(&t) {
                    continue;
                }
                let before = progress.position();
                match self.one_target(&progress, t, round, rounds) {
                    Ok((runs, idle)) => {
                        let line = summary(t, round, &runs, idle.as_ref());
                        progress.suspend(|| eprintln!("{line}"));
                        out.runs.extend(runs);
                        out.idle.extend(idle);
                    }
                    Err(e) => {
                        progress.suspend(|| eprintln!("  {} failed, dropped from this run: {e:#}", t.name()));
                        out.skipped.push(format!("{}: failed: {e:#}", t.name()));
                        failed.push(t);
                        // Its unfinished steps, this round and the next ones, will not run.
                        let left = self.steps(t) * (rounds - round) as u64 - (progress.position() - before);
                        progress.dec_length(left);
                    }
                }
            }
        }
        progress.finish_and_clear();
        targets.retain(|t| !failed.contains(t));
        out
    }

    fn one_target(&self, pb: &ProgressBar, t: Target, round: usize, rounds: usize) -> Result<(Vec<Run>, Option<Idle>)> {
        let step = |s: Scenario| {
            pb.set_message(format!("round {}/{rounds} · {} · {}", round + 1, t.label(), s.name()));
        };
        if t.is_dns() {
            let upstream = self.upstream.context("no DNS upstream (nsd)")?;
            let up = DnsUp::start(self.ns, t, upstream)?;
            let mut runs = Vec::new();
            for &s in self.scenarios.iter().filter(|s| s.runs_on(t)) {
                step(s);
                runs.push(dns::dns(self.ns, &up, s, round, &self.p)?);
                pb.inc(1);
            }
            return Ok((runs, None));
        }
        let wants = |s: Scenario| self.scenarios.contains(&s) && s.runs_on(t);
        let mut idle = None;
        // The in-process forwarder is measured idle in a process of its own, before this one starts it.
        if wants(Scenario::Idle) && t.is_sluice() {
            step(Scenario::Idle);
            let proxy = ProxyChild::start(self.ns, t, &self.p)?;
            idle = Some(idle::idle(self.ns, t, &[proxy.pid()], round, &self.p)?);
            pb.inc(1);
        }
        let up = Up::start(self.ns, t, &self.p, Some(self.scratch))?;
        if wants(Scenario::Idle) && !t.is_sluice() {
            step(Scenario::Idle);
            idle = Some(idle::idle(self.ns, t, &up.proxy_pids(), round, &self.p)?);
            pb.inc(1);
        }
        let mut runs = Vec::new();
        for &s in self.scenarios.iter().filter(|s| s.runs_on(t) && **s != Scenario::Idle) {
            step(s);
            runs.push(self.tcp_scenario(&up, s, round)?);
            pb.inc(1);
        }
        Ok((runs, idle))
    }

    fn tcp_scenario(&self, up: &Up<'_>, s: Scenario, round: usize) -> Result<Run> {
        let (ns, p) = (self.ns, &self.p);
        match s {
            Scenario::Bulk1 => scenario::bulk(ns, up, self.sink, round, 1, p),
            Scenario::Bulk4 => scenario::bulk(ns, up, self.sink, round, 4, p),
            Scenario::Short => scenario::short(ns, up, round, p),
            Scenario::Keepalive => scenario::keepalive(ns, up, round, p),
            Scenario::Reload => reload::reload(ns, up, self.scratch, round, p),
            Scenario::Idle | Scenario::Dns | Scenario::DnsTcp => unreachable!("{} is not a TCP scenario", s.name()),
        }
    }
}

/// One line per target and round: its main figures.
fn summary(t: Target, round: usize, runs: &[Run], idle: Option<&Idle>) -> String {
    let mut vals: Vec<String> =
        runs.iter().map(|r| format!("{} {:.2} {}", r.scenario.name(), r.value, r.scenario.unit())).collect();
    if let Some(i) = idle {
        let kib = i.proxy_rss_kib.map_or_else(|| "-".into(), |k| format!("{:.1}", k as f64 / i.conns as f64));
        vals.push(format!("idle {} conns {kib} KiB/conn", i.conns));
    }
    format!("round {} {:<13} {}", round + 1, t.name(), vals.join("  "))
}
