//! One dnsperf run inside the namespace, bounded in time, and what it
//! printed: its summary (queries/s, completed, lost) and, with `-v`, one
//! line per answer (`> NOERROR n1.bench.test A 0.000218`: rcode, name, type,
//! latency in seconds), from which the latency percentiles come.

use std::net::SocketAddr;
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::ns::{ChildGuard, Netns};

/// dnsperf's simulated clients (source ports), as in `dnsproxy/bench/dnsperf.sh`.
const CLIENTS: &str = "8";
/// Queries in flight at full speed.
const OUTSTANDING: &str = "500";
/// A query unanswered this long is lost (dnsperf's default is 5 s, which
/// would stretch every run by that much at the end).
const QUERY_TIMEOUT: &str = "1";

/// How hard dnsperf pushes.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Pace {
    /// As fast as the target answers (`-q` queries in flight, two threads).
    Max,
    /// This many queries per second, every answer logged (`-Q`, `-v`).
    Fixed(u32),
}

/// What one run reported.
#[derive(Debug, Default)]
pub(crate) struct Report {
    pub(crate) qps: f64,
    pub(crate) completed: u64,
    pub(crate) lost: u64,
    /// Latencies of NOERROR answers, µs, sorted (only with [`Pace::Fixed`]).
    pub(crate) latencies_us: Vec<f64>,
    /// Answers that came back with another rcode.
    pub(crate) failed: u64,
}

/// Runs dnsperf against `server` for `secs`, over UDP or `tcp`, reading
/// the names from `queries`; its output goes to files in `dir`.
pub(crate) fn run(
    ns: &Netns,
    dir: &Path,
    server: SocketAddr,
    queries: &Path,
    tcp: bool,
    pace: Pace,
    secs: f64,
) -> Result<Report> {
    let (ip, port, secs) = (server.ip().to_string(), server.port().to_string(), format!("{secs:.1}"));
    let (q, rate) =
        (queries.to_string_lossy(), if let Pace::Fixed(qps) = pace { qps.to_string() } else { String::new() });
    let mut argv = vec!["dnsperf", "-s", &ip, "-p", &port, "-d", &q, "-l", &secs, "-c", CLIENTS, "-t", QUERY_TIMEOUT];
    if tcp {
        argv.extend(["-m", "tcp"]);
    }
    match pace {
        Pace::Max => argv.extend(["-q", OUTSTANDING, "-T", "2"]),
        Pace::Fixed(_) => argv.extend(["-Q", &rate, "-v"]),
    }
    let (out, err) = (dir.join("dnsperf.out"), dir.join("dnsperf.err"));
    let child = ns
        .command(&argv)
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&out)?)
        .stderr(std::fs::File::create(&err)?)
        .spawn()
        .context("starting dnsperf")?;
    let mut guard = ChildGuard::new(child);
    let until = Instant::now() + Duration::from_secs_f64(secs.parse::<f64>().unwrap_or(0.0) + 15.0);
    let status = loop {
        if let Some(st) = guard.child.try_wait()? {
            break st;
        }
        if Instant::now() > until {
            bail!("dnsperf did not finish in time");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    if !status.success() {
        bail!("dnsperf {status}: {}", std::fs::read_to_string(&err).unwrap_or_default().trim());
    }
    parse(&std::fs::read_to_string(&out)?).with_context(|| format!("reading dnsperf's output {}", out.display()))
}

/// Reads dnsperf's output: the summary, and the per-answer lines if any.
fn parse(text: &str) -> Result<Report> {
    let field = |name: &str| {
        text.lines().find_map(|l| l.trim_start().strip_prefix(name)).and_then(|v| v.split_whitespace().next())
    };
    let number = |name: &str| field(name).and_then(|v| v.parse::<f64>().ok()).with_context(|| format!("no {name:?}"));
    let mut r = Report {
        qps: number("Queries per second:")?,
        completed: number("Queries completed:")? as u64,
        lost: number("Queries lost:")? as u64,
        ..Report::default()
    };
    for line in text.lines().filter_map(|l| l.strip_prefix("> ")) {
        let mut words = line.split_whitespace();
        let rcode = words.next();
        match (rcode, words.last().and_then(|s| s.parse::<f64>().ok())) {
            (Some("NOERROR"), Some(secs)) => r.latencies_us.push(secs * 1e6),
            _ => r.failed += 1,
        }
    }
    r.latencies_us.sort_by(f64::total_cmp);
    Ok(r)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_summary_and_answers() -> Result<()> {
        let text = "[Status] Sending queries (to 127.0.0.1:5300)
> NOERROR n2.bench.test A 0.000078
> NOERROR n1.bench.test A 0.000218
> SERVFAIL n3.bench.test A 0.001000
Statistics:

  Queries sent:         3
  Queries completed:    3 (100.00%)
  Queries lost:         0 (0.00%)

  Queries per second:   999.814035
";
        let r = parse(text)?;
        assert_eq!((r.completed, r.lost, r.failed), (3, 0, 1));
        assert!((r.qps - 999.814035).abs() < 1e-6);
        assert_eq!(r.latencies_us.len(), 2);
        assert!((r.latencies_us[0] - 78.0).abs() < 1e-6);
        Ok(())
    }
}
