//! Medians, spreads, ratios, the terminal tables and the target checks.

use std::fmt::Write;

use crate::scenario::{Idle, Run, Scenario};
use crate::target::Target;

#[derive(Debug, Clone, Copy)]
struct Spread {
    median: f64,
    min: f64,
    max: f64,
}

fn spread(mut v: Vec<f64>) -> Option<Spread> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    let median = if n % 2 == 1 { v[n / 2] } else { (v[n / 2 - 1] + v[n / 2]) / 2.0 };
    Some(Spread { median, min: v[0], max: v[n - 1] })
}

fn of<'a>(runs: &'a [Run], t: Target, s: Scenario) -> impl Iterator<Item = &'a Run> + 'a {
    runs.iter().filter(move |r| r.target == t && r.scenario == s)
}

fn median_of(runs: &[Run], t: Target, s: Scenario, f: impl Fn(&Run) -> Option<f64>) -> Option<f64> {
    spread(of(runs, t, s).filter_map(f).collect()).map(|x| x.median)
}

fn value(runs: &[Run], t: Target, s: Scenario) -> Option<f64> {
    median_of(runs, t, s, |r| Some(r.value))
}

fn ratio(runs: &[Run], t: Target, s: Scenario, base: Target) -> Option<f64> {
    Some(value(runs, t, s)? / value(runs, base, s)?)
}

fn opt(v: Option<f64>, prec: usize) -> String {
    v.map_or_else(|| "-".into(), |x| format!("{x:.prec$}"))
}

/// The scenario tables.
pub(crate) fn tables(runs: &[Run], targets: &[Target]) -> String {
    let mut o = String::new();
    for s in Scenario::ALL {
        let rounds = targets.iter().map(|t| of(runs, *t, s).count()).max().unwrap_or(0);
        if rounds == 0 {
            continue;
        }
        let _ = writeln!(o, "\n{} — {} (median of {rounds} [min – max]); CPU in cores", s.title(), s.unit());
        let lat = match s {
            Scenario::Short => "  p50 µs  p99 µs",
            Scenario::Keepalive => "  p50 µs  p99 µs p99.9 µs  +p99 µs",
            _ => "",
        };
        let _ = writeln!(
            o,
            "{:<20} {:>9}  {:<19} {:>7} {:>8}{lat}  {:>5} {:>5} {:>5} {:>5}  {:>9}  {:>6}",
            "target",
            "median",
            "[min – max]",
            "×direct",
            "×haproxy",
            "proxy",
            "gen",
            "sink",
            "other",
            "per-core",
            "errors"
        );
        let prec = if matches!(s, Scenario::Short | Scenario::Keepalive) { 0 } else { 2 };
        for &t in targets {
            let Some(sp) = spread(of(runs, t, s).map(|r| r.value).collect()) else { continue };
            let cpu = |f: fn(&Run) -> f64| median_of(runs, t, s, |r| Some(f(r)));
            let proxy = cpu(|r| r.cpu.proxy).filter(|_| t != Target::Direct);
            let per_core = proxy.filter(|p| *p > 0.0).map(|p| sp.median / p);
            let p50 = median_of(runs, t, s, |r| r.p50_us);
            let p99 = median_of(runs, t, s, |r| r.p99_us);
            let lat = match s {
                Scenario::Short => format!("  {:>6} {:>7}", opt(p50, 0), opt(p99, 0)),
                Scenario::Keepalive => {
                    let p999 = median_of(runs, t, s, |r| r.p999_us);
                    let added = added_p99(runs, t).filter(|_| t != Target::Direct);
                    format!("  {:>6} {:>7} {:>8} {:>8}", opt(p50, 1), opt(p99, 1), opt(p999, 1), opt(added, 1))
                }
                _ => String::new(),
            };
            let errors: u64 = of(runs, t, s).map(|r| r.errors).sum();
            let _ = writeln!(
                o,
                "{:<20} {:>9.prec$}  {:<19} {:>7} {:>8}{lat}  {:>5} {:>5} {:>5} {:>5}  {:>9}  {:>6}",
                t.label(),
                sp.median,
                format!("[{:.prec$} – {:.prec$}]", sp.min, sp.max),
                opt(ratio(runs, t, s, Target::Direct), 2),
                opt(ratio(runs, t, s, Target::Haproxy), 2),
                opt(proxy, 2),
                opt(cpu(|r| r.cpu.generator), 2),
                opt(cpu(|r| r.cpu.sink), 2),
                opt(cpu(|r| r.cpu.other), 2),
                opt(per_core, prec),
                errors,
            );
        }
    }
    let mut bypassed: Vec<String> = runs
        .iter()
        .filter(|r| r.target != Target::Direct && r.redirected < r.connections)
        .map(|r| format!("{} {:?} round {}: {}/{}", r.target.name(), r.scenario, r.round, r.redirected, r.connections))
        .collect();
    bypassed.dedup();
    if !bypassed.is_empty() {
        let _ = writeln!(o, "\nWARNING: connections not redirected to the proxy: {}", bypassed.join("; "));
    }
    o
}

/// Keepalive: median p99 round trip through `t` less direct's, µs.
fn added_p99(runs: &[Run], t: Target) -> Option<f64> {
    let p99 = |t| median_of(runs, t, Scenario::Keepalive, |r| r.p99_us);
    Some(p99(t)? - p99(Target::Direct)?)
}

/// Per-connection figures of the idle scenario.
fn idle_row(idle: &[Idle], t: Target) -> Option<(usize, usize, f64, Option<f64>, f64)> {
    let mine: Vec<&Idle> = idle.iter().filter(|i| i.target == t).collect();
    let n = mine.first()?.conns as f64;
    let iowq_fwd = mine.iter().map(|i| i.iowq_forwarder).max()?;
    let iowq_all = mine.iter().map(|i| i.iowq_total).max()?;
    let rss = spread(mine.iter().map(|i| i.rss_kib as f64 / n).collect())?.median;
    let foreign = spread(mine.iter().filter_map(|i| i.foreign_rss_kib).map(|k| k as f64 / n).collect());
    let fds = spread(mine.iter().map(|i| i.proxy_fds as f64 / n).collect())?.median;
    Some((iowq_fwd, iowq_all, rss, foreign.map(|s| s.median), fds))
}

pub(crate) fn idle_table(idle: &[Idle], targets: &[Target]) -> String {
    let mut o = String::new();
    let Some(first) = idle.first() else { return o };
    let base = idle_row(idle, Target::Direct).map(|r| r.2);
    let _ = writeln!(o, "\nidle — {} connections held open (medians; max for io-wq)", first.conns);
    let _ = writeln!(
        o,
        "{:<20} {:>15} {:>13} {:>13} {:>14}",
        "target", "io-wq fwd/all", "RSS KiB/conn", "proxy KiB/c", "proxy fds/conn"
    );
    for &t in targets {
        let Some((fwd, all, rss, foreign, fds)) = idle_row(idle, t) else { continue };
        // The forwarder runs in this process: its share is the growth beyond the direct run's.
        let proxy = match (t.is_sluice(), foreign, base) {
            (true, _, Some(b)) => Some(rss - b),
            (_, Some(f), _) => Some(f),
            _ => None,
        };
        let iowq = if t.is_sluice() { format!("{fwd}/{all}") } else { format!("-/{all}") };
        let _ = writeln!(o, "{:<20} {:>15} {:>13.1} {:>13} {:>14.1}", t.label(), iowq, rss, opt(proxy, 1), fds);
    }
    o
}

/// The targets, for each sluice target present.
pub(crate) fn checks(runs: &[Run], idle: &[Idle], targets: &[Target]) -> String {
    let mut o = String::from("\ntargets\n");
    let line = |o: &mut String, what: &str, got: Option<f64>, want: f64| {
        let verdict = match got {
            None => "n/a",
            Some(g) if g >= want => "MET",
            Some(_) => "MISSED",
        };
        let _ = writeln!(o, "  {what:<50} {:>6}  {verdict}", opt(got, 2));
    };
    if targets.contains(&Target::Haproxy) {
        let got = ratio(runs, Target::Haproxy, Scenario::Bulk1, Target::Direct);
        let _ = writeln!(o, "  {:<50} {:>6}  (reference: about 0.63)", "haproxy 1-stream × direct", opt(got, 2));
    }
    for &t in targets.iter().filter(|t| **t != Target::Direct) {
        let Some(added) = added_p99(runs, t) else { continue };
        let verdict = if added <= 30.0 { "MET" } else { "MISSED" };
        let what = format!("{} keepalive p99 added ≤ 30 µs", t.label());
        let _ = writeln!(o, "  {what:<50} {added:>6.1}  {verdict}");
    }
    for &t in targets.iter().filter(|t| t.is_sluice()) {
        let n = t.name();
        line(&mut o, &format!("{n} 1-stream ≥ 0.85 × direct"), ratio(runs, t, Scenario::Bulk1, Target::Direct), 0.85);
        for (s, what) in [(Scenario::Bulk1, "1-stream"), (Scenario::Bulk4, "4-stream"), (Scenario::Short, "conn/s")] {
            line(&mut o, &format!("{n} {what} ≥ 1.0 × haproxy"), ratio(runs, t, s, Target::Haproxy), 1.0);
        }
        if t == Target::SluiceUring
            && let Some((fwd, _, _, _, _)) = idle_row(idle, t)
        {
            let verdict = if fwd == 0 { "MET" } else { "MISSED" };
            let conns = idle.first().map_or(0, |i| i.conns);
            let _ = writeln!(o, "  {:<50} {:>6}  {verdict}", format!("{n} io-wq threads with {conns} idle = 0"), fwd);
        }
    }
    o
}
