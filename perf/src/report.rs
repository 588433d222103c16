//! The result tables of every scenario (see `table.rs` for how one reads)
//! and the target checks.

use std::fmt::Write;

use crate::idle::Idle;
use crate::reload::RELOADS;
use crate::scenario::{Run, Scenario};
use crate::table::{Agg, Better, Row, Table};
use crate::target::Target;

fn of<'a>(runs: &'a [Run], t: Target, s: Scenario) -> impl Iterator<Item = &'a Run> + 'a {
    runs.iter().filter(move |r| r.target == t && r.scenario == s)
}

/// Every scenario's table, in the order the scenarios are listed.
pub(crate) fn tables(runs: &[Run], idle: &[Idle], targets: &[Target]) -> Vec<Table> {
    Scenario::ALL
        .into_iter()
        .filter_map(|s| if s == Scenario::Idle { idle_table(idle, targets) } else { run_table(runs, targets, s) })
        .collect()
}

/// The columns of one scenario's table: the targets measured in it.
fn columns(targets: &[Target], has: impl Fn(Target) -> bool) -> Vec<Target> {
    targets.iter().copied().filter(|t| has(*t)).collect()
}

/// Reads one figure from a run (None: the run does not have it).
type Figure = fn(&Run) -> Option<f64>;

/// Builds rows for one scenario's columns: each target's values over rounds.
struct Rows<'a> {
    runs: &'a [Run],
    cols: &'a [Target],
    s: Scenario,
}

impl Rows<'_> {
    fn row(&self, label: &str, better: Better, agg: Agg, prec: usize, f: impl Fn(&Run) -> Option<f64>) -> Row {
        let values = self.cols.iter().map(|t| of(self.runs, *t, self.s).filter_map(&f).collect()).collect();
        Row::new(label, better, agg, prec, values)
    }
}

fn run_table(runs: &[Run], targets: &[Target], s: Scenario) -> Option<Table> {
    let cols = columns(targets, |t| of(runs, t, s).next().is_some());
    let rounds = cols.iter().map(|t| of(runs, *t, s).count()).max()?;
    let rows = Rows { runs, cols: &cols, s };
    let bulk = matches!(s, Scenario::Bulk1 | Scenario::Bulk4);
    let main = rows.row(s.unit(), Better::Higher, Agg::Median, if bulk { 2 } else { 0 }, |r| Some(r.value));
    let mut table =
        Table { scenario: s, title: title(s, rounds), targets: cols.clone(), rows: vec![main.with_spread()] };
    latency_rows(&mut table, &rows);
    table.rows.push(rows.row(s.cost_unit(), Better::Lower, Agg::Median, if bulk { 2 } else { 1 }, |r| r.cost));
    table.rows.extend(extra_rows(&rows));
    cpu_rows(&mut table, &rows);
    let errors = if s.is_dns() { "lost + failed at 10k q/s (all rounds)" } else { "errors (all rounds)" };
    table.rows.push(rows.row(errors, Better::Neither, Agg::Sum, 0, |r| Some(r.errors as f64)));
    Some(table.with_ratios())
}

/// Latency percentiles, and for keep-alive and DNS what each adds over direct.
fn latency_rows(table: &mut Table, rows: &Rows<'_>) {
    let s = rows.s;
    let percentiles: &[(&str, Figure)] = match s {
        Scenario::Short | Scenario::Reload => &[("p50 µs", |r| r.p50_us), ("p99 µs", |r| r.p99_us)],
        Scenario::Keepalive | Scenario::Dns | Scenario::DnsTcp => {
            &[("p50 µs", |r| r.p50_us), ("p99 µs", |r| r.p99_us), ("p99.9 µs", |r| r.p999_us)]
        }
        _ => &[],
    };
    let (prec, at) = match s {
        Scenario::Keepalive => (1, ""),
        Scenario::Dns | Scenario::DnsTcp => (0, " at 10k q/s"),
        _ => (0, ""),
    };
    for (label, f) in percentiles {
        table.rows.push(rows.row(&format!("{label}{at}"), Better::Lower, Agg::Median, prec, f));
    }
    if s == Scenario::Keepalive || s.is_dns() {
        for (label, _) in percentiles {
            let base = s.baseline().map_or("baseline", Target::name);
            let added = table.added_row(&format!("{label}{at}"), &format!("+{label} over {base}"));
            table.rows.extend(added);
        }
    }
}

/// Where the CPU went, in cores (the baseline has no proxy).
fn cpu_rows(table: &mut Table, rows: &Rows<'_>) {
    let (load, sink) = if rows.s.is_dns() { ("dnsperf", "nsd") } else { ("generator", "sink") };
    let cpu: [(&str, Figure); 4] = [
        ("proxy", |r| (Some(r.target) != r.scenario.baseline()).then_some(r.cpu.proxy)),
        (load, |r| Some(r.cpu.generator)),
        (sink, |r| Some(r.cpu.sink)),
        ("other", |r| Some(r.cpu.other)),
    ];
    for (who, f) in cpu {
        table.rows.push(rows.row(&format!("CPU cores: {who}"), Better::Neither, Agg::Median, 2, f));
    }
}

fn title(s: Scenario, rounds: usize) -> String {
    let peers: Vec<&str> = s.peers().iter().map(|t| t.name()).collect();
    let peers =
        if peers.is_empty() { String::new() } else { format!("; ×best peer: to the best of {}", peers.join(", ")) };
    format!("{} — median of {rounds} round(s); ↑ higher is better, ↓ lower{peers}", s.title())
}

/// Figures only one scenario has.
fn extra_rows(rows: &Rows<'_>) -> Vec<Row> {
    let (n, sum) = (Better::Neither, Agg::Sum);
    match rows.s {
        Scenario::Dns | Scenario::DnsTcp => {
            vec![rows.row("lost at full speed (all rounds)", n, sum, 0, |r| Some(r.dns?.lost as f64))]
        }
        Scenario::Reload => {
            let f = |r: &Run| r.reload;
            let failed = |r: &Run| f(r).map(|x| x.failures);
            vec![
                rows.row("conn/s without reloads", Better::Higher, Agg::Median, 0, |r| Some(f(r)?.without_conn_s)),
                rows.row("during ÷ without", n, Agg::Median, 2, |r| Some(r.value / f(r)?.without_conn_s)),
                rows.row(&format!("reloads (of {RELOADS} a round)"), n, Agg::Median, 0, |r| Some(f(r)?.reloads as f64)),
                rows.row("reload ms, median", Better::Lower, Agg::Median, 2, |r| Some(f(r)?.reload_ms_median)),
                rows.row("reload ms, max", n, Agg::Max, 2, |r| Some(f(r)?.reload_ms_max)),
                rows.row("completed during reloads (all rounds)", n, sum, 0, |r| Some(f(r)?.completed as f64)),
                rows.row("  refused", n, sum, 0, |r| Some(failed(r)?.refused as f64)),
                rows.row("  reset", n, sum, 0, |r| Some(failed(r)?.reset as f64)),
                rows.row("  wrong echo", n, sum, 0, |r| Some(failed(r)?.wrong_echo as f64)),
                rows.row("  timed out or other", n, sum, 0, |r| Some((failed(r)?.timed_out + failed(r)?.other) as f64)),
                rows.row("  BlackHoled by sluice", n, sum, 0, |r| Some(f(r)?.blackholed as f64)),
            ]
        }
        _ => Vec::new(),
    }
}

fn idle_table(idle: &[Idle], targets: &[Target]) -> Option<Table> {
    let cols = columns(targets, |t| idle.iter().any(|i| i.target == t));
    let first = idle.first()?;
    let vals = |f: &dyn Fn(&Idle) -> Option<f64>| -> Vec<Vec<f64>> {
        cols.iter().map(|t| idle.iter().filter(|i| i.target == *t).filter_map(f).collect()).collect()
    };
    let per_conn = |v: Option<i64>, i: &Idle| v.map(|v| v as f64 / i.conns as f64);
    let count = |v: Option<usize>| v.map(|v| v as f64);
    let (n, max) = (Better::Neither, Agg::Max);
    let rows = vec![
        Row::new("proxy RSS KiB/conn", Better::Lower, Agg::Median, 2, vals(&|i| per_conn(i.proxy_rss_kib, i)))
            .with_spread(),
        Row::new("proxy fds/conn", n, Agg::Median, 2, vals(&|i| per_conn(i.proxy_fds, i))),
        Row::new("io-wq threads, proxy (max)", n, max, 0, vals(&|i| count(i.iowq_proxy))),
        Row::new("io-wq threads, forwarder rings (max)", n, max, 0, vals(&|i| count(i.iowq_forwarder))),
        Row::new("new kernel threads, machine", n, Agg::Median, 0, vals(&|i| Some(i.kthreads_new as f64))),
    ];
    let rounds = cols.iter().map(|t| idle.iter().filter(|i| i.target == *t).count()).max().unwrap_or(0);
    let title = format!("{} {}", first.conns, title(Scenario::Idle, rounds));
    Some(Table { scenario: Scenario::Idle, title, targets: cols, rows }.with_ratios())
}

fn median(runs: &[Run], t: Target, s: Scenario, f: impl Fn(&Run) -> Option<f64>) -> Option<f64> {
    let mut v: Vec<f64> = of(runs, t, s).filter_map(f).collect();
    v.sort_by(f64::total_cmp);
    let n = v.len();
    (n > 0).then(|| if n % 2 == 1 { v[n / 2] } else { (v[n / 2 - 1] + v[n / 2]) / 2.0 })
}

fn ratio(runs: &[Run], t: Target, s: Scenario, base: Target) -> Option<f64> {
    let value = |t| median(runs, t, s, |r| Some(r.value));
    Some(value(t)? / value(base)?)
}

/// Keepalive: median p99 round trip through `t` less direct's, µs.
fn added_p99(runs: &[Run], t: Target) -> Option<f64> {
    let p99 = |t| median(runs, t, Scenario::Keepalive, |r| r.p99_us);
    Some(p99(t)? - p99(Target::Direct)?)
}

/// Proxied runs in which the redirect rule did not see every connection.
pub(crate) fn bypassed(runs: &[Run], idle: &[Idle]) -> String {
    let proxied = |t: Target| t != Target::Direct && !t.is_dns();
    let runs = runs
        .iter()
        .filter(|r| proxied(r.target) && r.redirected < r.connections)
        .map(|r| (r.target, r.scenario.name(), r.round, r.redirected, r.connections));
    let idle = idle
        .iter()
        .filter(|i| proxied(i.target) && i.redirected < i.conns as u64)
        .map(|i| (i.target, Scenario::Idle.name(), i.round, i.redirected, i.conns as u64));
    let mut bypassed: Vec<String> = runs
        .chain(idle)
        .map(|(t, s, round, redirected, of)| format!("{} {s} round {}: {redirected}/{of}", t.name(), round + 1))
        .collect();
    bypassed.dedup();
    if bypassed.is_empty() {
        return String::new();
    }
    format!("\nWARNING: connections not redirected to the proxy: {}\n", bypassed.join("; "))
}

fn verdict(met: bool) -> &'static str {
    if met { "MET" } else { "MISSED" }
}

/// The targets, for each sluice target present.
pub(crate) fn checks(runs: &[Run], idle: &[Idle], targets: &[Target]) -> String {
    let mut o = String::new();
    // Only targets whose scenarios ran.
    let line = |o: &mut String, what: &str, got: Option<f64>, want: f64| {
        if let Some(g) = got {
            let _ = writeln!(o, "  {what:<55} {g:>6.2}  {}", verdict(g >= want));
        }
    };
    if let Some(got) = ratio(runs, Target::Haproxy, Scenario::Bulk1, Target::Direct) {
        let _ = writeln!(o, "  {:<55} {got:>6.2}  (reference: about 0.63)", "haproxy 1-stream × direct");
    }
    // Not a target: what a relay that does nothing but splice reaches, in the same run.
    if let Some(got) = ratio(runs, Target::TcpRelay, Scenario::Bulk1, Target::Direct) {
        let _ = writeln!(o, "  {:<55} {got:>6.2}", "(floor: tcp-relay 1-stream × direct)");
    }
    for &t in targets.iter().filter(|t| **t != Target::Direct) {
        let Some(added) = added_p99(runs, t) else { continue };
        let what = format!("{} keepalive p99 added ≤ 30 µs", t.label());
        let _ = writeln!(o, "  {what:<55} {added:>6.1}  {}", verdict(added <= 30.0));
    }
    for &t in targets.iter().filter(|t| t.is_sluice()) {
        let n = t.name();
        line(&mut o, &format!("{n} 1-stream ≥ 0.85 × direct"), ratio(runs, t, Scenario::Bulk1, Target::Direct), 0.85);
        for (s, what) in [(Scenario::Bulk1, "1-stream"), (Scenario::Bulk4, "4-stream"), (Scenario::Short, "conn/s")] {
            line(&mut o, &format!("{n} {what} ≥ 1.0 × haproxy"), ratio(runs, t, s, Target::Haproxy), 1.0);
        }
        let fwd = idle.iter().filter(|i| i.target == t).filter_map(|i| i.iowq_forwarder).max();
        if let (Target::SluiceUring, Some(fwd), Some(i)) = (t, fwd, idle.first()) {
            let what = format!("{n} io-wq threads with {} idle = 0", i.conns);
            let _ = writeln!(o, "  {what:<55} {fwd:>6}  {}", verdict(fwd == 0));
        }
        let reloads: Vec<&Run> = of(runs, t, Scenario::Reload).collect();
        if !reloads.is_empty() {
            let failed: u64 = reloads.iter().filter_map(|r| r.reload).map(|f| f.failures.total()).sum();
            let what = format!("{n} connections failed during {} reloads = 0", reloads.len() * RELOADS);
            let _ = writeln!(o, "  {what:<55} {failed:>6}  {}", verdict(failed == 0));
        }
    }
    let cost = |t, s| median(runs, t, s, |r| r.cost);
    let best_peer_cost =
        [Target::Haproxy, Target::Nginx].into_iter().filter_map(|p| cost(p, Scenario::Short)).reduce(f64::min);
    for &t in targets.iter().filter(|t| t.is_sluice()) {
        if let (Some(ours), Some(best)) = (cost(t, Scenario::Short), best_peer_cost) {
            let what = format!("{} CPU-µs/conn ≤ 0.7 × best peer's", t.name());
            let _ = writeln!(o, "  {what:<55} {:>6.2}  {}", ours / best, verdict(ours <= 0.7 * best));
        }
    }
    if targets.contains(&Target::SluiceDns) {
        let (us, them) = (Target::SluiceDns, Target::Dnsdist);
        line(&mut o, "sluice-dns queries/s ≥ 1.0 × dnsdist", ratio(runs, us, Scenario::Dns, them), 1.0);
        if let (Some(ours), Some(theirs)) = (cost(us, Scenario::Dns), cost(them, Scenario::Dns)) {
            let what = "sluice-dns CPU-µs/query < dnsdist's";
            let _ = writeln!(o, "  {what:<55} {:>6.2}  {}", ours / theirs, verdict(ours < theirs));
        }
        let p50 = |t| median(runs, t, Scenario::Dns, |r| r.p50_us);
        if let (Some(ours), Some(direct)) = (p50(us), p50(Target::DnsDirect)) {
            let what = "sluice-dns p50 added at 10k q/s ≤ 40 µs";
            let _ = writeln!(o, "  {what:<55} {:>6.1}  {}", ours - direct, verdict(ours - direct <= 40.0));
        }
        // Not a target: what a relay that does nothing else adds, in the same run.
        if let (Some(floor), Some(direct)) = (p50(Target::DnsRelay), p50(Target::DnsDirect)) {
            let what = "(floor: dns-relay p50 added at 10k q/s, µs)";
            let _ = writeln!(o, "  {what:<55} {:>6.1}", floor - direct);
        }
    }
    if o.is_empty() { o } else { format!("\ntargets\n{o}") }
}
