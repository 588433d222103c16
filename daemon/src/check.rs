//! `sluice check`: validate policy files, print a summary or every error;
//! with `--explain`, print the verdict for one connection and why.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context as _, bail};
use sluice_policy::model::{Enforcement, Mode, PolicySet};
use sluice_policy::{
    Cluster, Connection, Hostname, NameTable, Retention, Snapshot, SniffSource, Sniffed, Timestamp, decide, load_paths,
};

use crate::cli::CheckArgs;

pub(crate) fn run(args: &CheckArgs) -> anyhow::Result<ExitCode> {
    if args.explain.is_none() && (args.sni.is_some() || args.host.is_some() || !args.resolved_as.is_empty()) {
        bail!("--sni, --host and --resolved-as describe a connection: use them with --explain DEST:PORT");
    }
    if args.sni.is_some() && args.host.is_some() {
        bail!("give --sni (TLS) or --host (HTTP), not both: a connection carries one");
    }
    // Usage errors first: a bad --explain is reported before any file is read.
    let query = args.explain.as_deref().map(|dest| Query::parse(args, dest)).transpose()?;
    let set = match load_paths(&args.paths) {
        Ok(set) => set,
        Err(errors) => {
            let files: std::collections::BTreeSet<_> = errors.0.iter().map(|d| d.file.clone()).collect();
            eprintln!("{errors}");
            let n = errors.0.len();
            eprintln!(
                "sluice: {n} error{} in {} file{}; the policy was not loaded",
                plural(n),
                files.len(),
                plural(files.len())
            );
            return Ok(ExitCode::from(1));
        }
    };
    for w in &set.warnings {
        eprintln!("{w}");
    }
    match query {
        None => print!("{}", summary(&set)),
        Some(q) => print!("{}", explain(&set, q)),
    }
    Ok(ExitCode::SUCCESS)
}

fn plural(n: usize) -> &'static str {
    if n == 1 { "" } else { "s" }
}

fn mode_name(mode: Mode) -> &'static str {
    match mode {
        Mode::AllowAny => "ALLOW_ANY",
        Mode::RegistryOnly => "REGISTRY_ONLY",
    }
}

fn enforcement_name(e: Enforcement) -> &'static str {
    match e {
        Enforcement::Enforce => "enforce",
        Enforcement::DryRun => "dry-run",
    }
}

/// The summary `sluice check` prints for a valid policy set.
pub(crate) fn summary(set: &PolicySet) -> String {
    let s = &set.settings;
    let hosts: usize = set.entries.iter().map(|e| e.hosts.len()).sum();
    let wildcards: usize = set.entries.iter().flat_map(|e| &e.hosts).filter(|h| h.is_wildcard()).count();
    let mut out = String::new();
    let _ = writeln!(
        out,
        "policy OK: {} file{}, {} ServiceEntr{}, {hosts} host{} ({wildcards} wildcard), {} ignored document{}",
        set.files.len(),
        plural(set.files.len()),
        set.entries.len(),
        if set.entries.len() == 1 { "y" } else { "ies" },
        plural(hosts),
        set.ignored.len(),
        plural(set.ignored.len()),
    );
    let from = match (&s.origin, &s.name) {
        (Some(o), Some(n)) => format!("EgressPolicy {n} at {o}"),
        (Some(o), None) => format!("EgressPolicy at {o}"),
        _ => "built-in default".to_owned(),
    };
    let _ = writeln!(out, "mode: {} ({}), from {from}", mode_name(s.mode), enforcement_name(s.enforcement));
    if !s.deny_ranges.is_empty() {
        let ranges: Vec<String> = s.deny_ranges.iter().map(ToString::to_string).collect();
        let _ = writeln!(out, "deny ranges: {}", ranges.join(", "));
    }
    let _ = writeln!(
        out,
        "dns: blockUnregistered={} minTtl={} grace={}",
        s.dns.block_unregistered,
        humantime::format_duration(s.dns.min_ttl),
        humantime::format_duration(s.dns.grace)
    );
    for w in &s.workloads {
        let sources: Vec<String> = w.sources.iter().map(ToString::to_string).collect();
        let _ = writeln!(out, "workload {}: {}", w.name, sources.join(", "));
    }
    if !set.entries.is_empty() {
        let _ = writeln!(out, "service entries:");
    }
    for e in &set.entries {
        let hosts: Vec<String> = e.hosts.iter().map(ToString::to_string).collect();
        let ports: Vec<String> = e.ports.iter().map(|p| format!("{}/{}", p.number, p.protocol.label())).collect();
        let addrs: Vec<String> = e.addresses.iter().map(ToString::to_string).collect();
        let _ = write!(
            out,
            "  {:<20} {}  ports {}",
            e.name,
            hosts.join(","),
            if ports.is_empty() { "none".into() } else { ports.join(",") }
        );
        if !addrs.is_empty() {
            let _ = write!(out, "  addresses {}", addrs.join(","));
        }
        let _ = writeln!(out, "  ({})", e.origin);
    }
    for i in &set.ignored {
        let name = i.name.as_deref().unwrap_or("-");
        let _ = writeln!(out, "ignored: {} {} {name} ({}): not egress policy", i.api_version, i.kind, i.origin);
    }
    out
}

/// The connection `--explain` describes.
struct Query {
    conn: Connection,
    resolved_as: Vec<Hostname>,
}

impl Query {
    fn parse(args: &CheckArgs, dest: &str) -> anyhow::Result<Query> {
        let destination: SocketAddr = dest.parse().with_context(|| {
            format!("--explain wants IP:PORT (e.g. 198.18.9.1:443 or [2001:db8::1]:443), not {dest:?}; give a name with --resolved-as")
        })?;
        let resolved_as = args
            .resolved_as
            .iter()
            .map(|n| Hostname::parse(n).with_context(|| format!("--resolved-as {n:?}")))
            .collect::<anyhow::Result<Vec<_>>>()?;
        let sniffed = match (&args.sni, &args.host) {
            (Some(n), _) => Some((n, SniffSource::TlsSni)),
            (_, Some(n)) => Some((n, SniffSource::HttpHost)),
            _ => None,
        };
        let sniffed = match sniffed {
            Some((n, via)) => {
                Some(Sniffed { name: Hostname::parse(n).with_context(|| format!("{via} name {n:?}"))?, via })
            }
            None => None,
        };
        let source = args.source.unwrap_or(std::net::IpAddr::from([127, 0, 0, 1]));
        Ok(Query { conn: Connection { source, destination, sniffed }, resolved_as })
    }
}

/// `--explain`: one connection through `decide()`, as the forwarder would see it.
fn explain(set: &PolicySet, q: Query) -> String {
    let snapshot = Snapshot::compile(set);
    let now = Timestamp::now();
    let names = NameTable::new(64);
    let keep = Retention::from(&set.settings.dns);
    let (conn, destination) = (&q.conn, q.conn.destination);
    for name in &q.resolved_as {
        names.record(destination.ip(), name, Duration::from_secs(60), now, keep);
    }
    let v = decide(&snapshot, &names, conn, now);

    let mut out = String::new();
    let verdict = match v.cluster {
        Cluster::ServiceEntry(r) => {
            let e = snapshot.entry(r);
            let host = snapshot.host(r);
            format!("ALLOW as ServiceEntry {} (host {host}, {})", e.name, e.origin)
        }
        Cluster::Passthrough if v.would_deny => {
            "ALLOW as PassthroughCluster (dry-run: enforcement would refuse it)".into()
        }
        Cluster::Passthrough => "ALLOW as PassthroughCluster".into(),
        Cluster::BlackHole => "REFUSE as BlackHoleCluster".into(),
    };
    let _ = writeln!(out, "verdict: {verdict}");
    let name = v.name.as_ref().map_or_else(|| destination.ip().to_string(), ToString::to_string);
    let _ = writeln!(out, "destination: {destination} ({name})");
    let _ = writeln!(out, "why: {}", v.reason);
    let _ = writeln!(
        out,
        "mode: {} ({})",
        mode_name(snapshot.settings().mode),
        enforcement_name(snapshot.settings().enforcement)
    );
    if let Some(w) = &v.workload {
        let _ = writeln!(out, "source workload: {w}");
    }
    if !v.allow {
        let _ = writeln!(out, "effect: an HTTP request gets 502 Bad Gateway; any other connection is reset");
    }
    if conn.sniffed.is_none() && snapshot.sniff_useful(destination) {
        let _ =
            writeln!(out, "note: the forwarder would read the TLS SNI or HTTP Host on this port; try --sni or --host");
    }
    out
}
