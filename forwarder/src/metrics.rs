//! Istio-compatible connection metrics (DESIGN.md, "Metrics").
//!
//! Handles are registered once per label set and cached per worker thread
//! (an increment is then a few ns, not the ~100 ns of a labelled
//! `counter!`). Label values are bounded, so that junk (a scan of many
//! addresses or ports, made-up SNI or Host values) cannot grow the series
//! without end, nor crowd out the names that matter:
//! - what the policy names always has its own series: ServiceEntry hosts
//!   (`destination_service_name`, and `destination_service` when it is that
//!   host) and ServiceEntry ports — the policy bounds them;
//! - other names (from DNS, SNI, Host): the first [`MAX_DESTINATIONS`] per
//!   process, addresses (no name known): the first [`MAX_ADDRESSES`], other
//!   ports: the first [`MAX_PORTS`]; past each cap, new values fold into
//!   `other`;
//! - and their pairs (`destination_service` past the policy's hosts, with
//!   `destination_port`): the first [`MAX_PAIRS`]; past it both fold into
//!   `other`, or a client sending made-up Host values to many ports would
//!   make every name-port product a series.
//!
//! Bytes are counted as they move (per spliced chunk), so a long-lived
//! connection shows its traffic while it is open; they carry
//! `response_flags="-"`, and the closed counter carries how it ended.
//!
//! Istio's byte counters are from the server side's point of view:
//! `istio_tcp_received_bytes_total` counts what the client sent (the
//! request), `istio_tcp_sent_bytes_total` what it got back (the response).

use std::cell::RefCell;
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, LazyLock, Mutex};

use metrics::{Counter, Label};
use sluice_policy::{Cluster, HostPattern, Snapshot, Verdict};

use crate::conn::{ConnReport, Outcome};
use crate::splice::End;

pub const TCP_OPENED: &str = "istio_tcp_connections_opened_total";
pub const TCP_CLOSED: &str = "istio_tcp_connections_closed_total";
pub const TCP_SENT_BYTES: &str = "istio_tcp_sent_bytes_total";
pub const TCP_RECEIVED_BYTES: &str = "istio_tcp_received_bytes_total";
pub const REQUESTS: &str = "istio_requests_total";
/// Connections refused before any verdict: not intercepted (addressed to sluice itself).
pub const NOT_INTERCEPTED: &str = "sluice_forwarder_not_intercepted_total";
/// Times a connection found no pipe (out of file descriptors or memory) and waited.
pub const PIPE_SHORTAGES: &str = "sluice_forwarder_pipe_shortages_total";
/// Allowed connections reset because this node could not open their upstream
/// connection (out of descriptors, memory or local ports): sluice's limit,
/// not the destination's (those connections' Istio flag is `UF` still).
pub const LOCAL_CONNECT_FAILURES: &str = "sluice_forwarder_local_connect_failures_total";
/// Connections judged, by `verdict` ([`VERDICTS_BY`]): one series each,
/// there from the start at 0, so an alert on `increase()` sees the first
/// refusal (a per-destination Istio series is born at 1, which `increase()`
/// reads as no increase), and dry-run's would-be refusals can be counted
/// (Istio's labels show them as `PassthroughCluster`).
pub const VERDICTS: &str = "sluice_forwarder_verdicts_total";
/// `serviceentry`: allowed as a ServiceEntry; `passthrough`: ALLOW_ANY;
/// `blackhole`: refused; `would_deny`: let through by dry-run, refused under enforcement.
pub const VERDICTS_BY: [&str; 4] = ["serviceentry", "passthrough", "blackhole", "would_deny"];

pub const PASSTHROUGH: &str = "PassthroughCluster";
pub const BLACKHOLE: &str = "BlackHoleCluster";
/// Distinct names (not a ServiceEntry host) kept as `destination_service`
/// before folding into `other`.
pub const MAX_DESTINATIONS: usize = 2_000;
/// Distinct addresses kept as `destination_service` (no name known).
pub const MAX_ADDRESSES: usize = 256;
/// Distinct ports outside every ServiceEntry kept as `destination_port`.
pub const MAX_PORTS: usize = 64;
/// Distinct (`destination_service`, `destination_port`) pairs kept, where the
/// service is not a ServiceEntry host: room for every kept name and address
/// on a few ports each.
pub const MAX_PAIRS: usize = 8_192;

/// One connection's label set.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Labels {
    workload: Arc<str>,
    service: Arc<str>,
    service_name: Arc<str>,
    /// The port; `None`: `other`.
    port: Option<u16>,
    flags: &'static str,
}

/// The counters an open connection bumps: opened once, bytes as they move.
#[derive(Debug, Clone)]
struct Live {
    opened: Counter,
    sent: Counter,
    received: Counter,
    /// Shared with every open connection of the set (one pointer each).
    labels: Arc<Labels>,
}

/// Byte counters of one connection, bumped by the splice loop per chunk,
/// and its labels (worked out once, when it opened; its close reuses them).
#[derive(Debug, Clone)]
pub struct Meter {
    /// Client → upstream (Istio's `received`: the request side).
    pub(crate) upstream: Counter,
    /// Upstream → client (Istio's `sent`: the response side).
    pub(crate) client: Counter,
    labels: Arc<Labels>,
}

thread_local! {
    static LIVE: RefCell<HashMap<Labels, Live>> = RefCell::new(HashMap::new());
    static CLOSED: RefCell<HashMap<Labels, Counter>> = RefCell::new(HashMap::new());
    static REFUSED_HTTP: RefCell<HashMap<Labels, Counter>> = RefCell::new(HashMap::new());
    static NOT_INTERCEPTED_COUNT: Counter = metrics::counter!(NOT_INTERCEPTED);
    static VERDICT_COUNTS: [Counter; 4] = VERDICTS_BY.map(|v| metrics::counter!(VERDICTS, "verdict" => v));
}

/// Registers the series that must be there before anything happens (at 0).
pub(crate) fn register() {
    for verdict in VERDICTS_BY {
        metrics::counter!(VERDICTS, "verdict" => verdict).increment(0);
    }
    metrics::counter!(LOCAL_CONNECT_FAILURES).increment(0);
}

/// An upstream connection could not be opened for want of a local resource.
pub(crate) fn local_connect_failure() {
    metrics::counter!(LOCAL_CONNECT_FAILURES).increment(1);
}

/// A label value past the policy's own: a name, an address, or a port.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Value {
    Text(Arc<str>),
    Port(u16),
    /// A service and a port (`None`: `other`).
    Pair(Arc<str>, Option<u16>),
}

/// One label's values past the policy's own: admitted up to a cap per process.
struct Bounded {
    cap: usize,
    seen: LazyLock<Mutex<HashSet<Value>>>,
}

static NAMES: Bounded = Bounded::new(MAX_DESTINATIONS);
static ADDRESSES: Bounded = Bounded::new(MAX_ADDRESSES);
static PORTS: Bounded = Bounded::new(MAX_PORTS);
static PAIRS: Bounded = Bounded::new(MAX_PAIRS);

impl Bounded {
    const fn new(cap: usize) -> Bounded {
        Bounded { cap, seen: LazyLock::new(|| Mutex::new(HashSet::new())) }
    }

    /// Whether `value` may have its own series (else it is `other`). Each
    /// worker remembers the values it has seen admitted, so the shared
    /// set's lock is taken once per value per worker, not per connection.
    fn admits(&'static self, value: &Value) -> bool {
        thread_local! {
            static LOCAL: RefCell<HashSet<(usize, Value)>> = RefCell::new(HashSet::new());
        }
        let key = (std::ptr::from_ref(self) as usize, value.clone());
        if LOCAL.with(|l| l.borrow().contains(&key)) {
            return true;
        }
        let Ok(mut seen) = self.seen.lock() else { return false };
        if !seen.contains(value) {
            if seen.len() >= self.cap {
                return false;
            }
            seen.insert(value.clone());
        }
        drop(seen);
        LOCAL.with(|l| l.borrow_mut().insert(key));
        true
    }

    /// `text` itself if it may have its own series, else `other`.
    fn text(&'static self, text: Arc<str>) -> Arc<str> {
        let value = Value::Text(text);
        let admitted = self.admits(&value);
        match value {
            Value::Text(text) if admitted => text,
            _ => fixed(&OTHER),
        }
    }
}

static OTHER: LazyLock<Arc<str>> = LazyLock::new(|| Arc::from("other"));
static UNKNOWN: LazyLock<Arc<str>> = LazyLock::new(|| Arc::from("unknown"));
static PASSTHROUGH_NAME: LazyLock<Arc<str>> = LazyLock::new(|| Arc::from(PASSTHROUGH));
static BLACKHOLE_NAME: LazyLock<Arc<str>> = LazyLock::new(|| Arc::from(BLACKHOLE));

fn fixed(s: &LazyLock<Arc<str>>) -> Arc<str> {
    Arc::clone(s)
}

/// Envoy's response flags, as Istio reports them.
fn response_flags(outcome: Outcome) -> &'static str {
    match outcome {
        Outcome::Spliced(End::Closed) => "-",
        Outcome::Spliced(End::ClientError) | Outcome::ClientFailed => "DC",
        Outcome::Spliced(End::UpstreamError) => "UC",
        Outcome::Spliced(End::Idle) => "SI",
        Outcome::Spliced(End::Internal) => "UO",
        // Not one of Envoy's: sluice stopped, and the drain time was over.
        Outcome::Spliced(End::Shutdown) => "SD",
        Outcome::ConnectFailed => "UF",
        Outcome::Refused502 | Outcome::RefusedReset | Outcome::NotIntercepted => "NR",
    }
}

fn labels(
    verdict: &Verdict,
    snapshot: &Snapshot,
    dst_port: u16,
    dst_ip: std::net::IpAddr,
    flags: &'static str,
) -> Labels {
    // What the policy names always has its own series.
    let (service_name, entry_host) = match verdict.cluster {
        Cluster::ServiceEntry(r) => match snapshot.host(r) {
            HostPattern::Exact(host) => (host.shared(), Some(host)),
            wildcard => (Arc::from(wildcard.to_string()), None),
        },
        Cluster::Passthrough => (fixed(&PASSTHROUGH_NAME), None),
        Cluster::BlackHole => (fixed(&BLACKHOLE_NAME), None),
    };
    let mut port = (snapshot.serves_port(dst_port) || PORTS.admits(&Value::Port(dst_port))).then_some(dst_port);
    let policy_named = verdict.name.is_some() && verdict.name.as_ref() == entry_host;
    let mut service = match &verdict.name {
        Some(name) if policy_named => name.shared(),
        Some(name) => NAMES.text(name.shared()),
        None => ADDRESSES.text(Arc::from(dst_ip.to_string())),
    };
    if !policy_named && !Arc::ptr_eq(&service, &OTHER) && !PAIRS.admits(&Value::Pair(service.clone(), port)) {
        (service, port) = (fixed(&OTHER), None);
    }
    Labels { workload: verdict.workload.clone().unwrap_or_else(|| fixed(&UNKNOWN)), service, service_name, port, flags }
}

fn label_list(l: &Labels, protocol: &'static str) -> Vec<Label> {
    vec![
        Label::new("reporter", "source"),
        Label::new("source_workload", l.workload.to_string()),
        Label::new("destination_service", l.service.to_string()),
        Label::new("destination_service_name", l.service_name.to_string()),
        Label::new("destination_port", l.port.map_or_else(|| "other".to_owned(), |p| p.to_string())),
        Label::new("request_protocol", protocol),
        Label::new("response_flags", l.flags),
    ]
}

/// A connection was judged and is about to be forwarded or refused; returns
/// the byte counters its splice loop bumps.
pub(crate) fn opened(verdict: &Verdict, snapshot: &Snapshot, dst: std::net::SocketAddr) -> Meter {
    let kind = match verdict.cluster {
        Cluster::ServiceEntry(_) => 0,
        Cluster::Passthrough if verdict.would_deny => 3,
        Cluster::Passthrough => 1,
        Cluster::BlackHole => 2,
    };
    VERDICT_COUNTS.with(|c| c[kind].increment(1));
    let l = labels(verdict, snapshot, dst.port(), dst.ip(), "-");
    LIVE.with(|cache| {
        let mut cache = cache.borrow_mut();
        let h = cache.entry(l).or_insert_with_key(|l| {
            let ls = label_list(l, "tcp");
            Live {
                opened: metrics::counter!(TCP_OPENED, ls.clone()),
                sent: metrics::counter!(TCP_SENT_BYTES, ls.clone()),
                received: metrics::counter!(TCP_RECEIVED_BYTES, ls),
                labels: Arc::new(l.clone()),
            }
        });
        h.opened.increment(1);
        Meter { upstream: h.received.clone(), client: h.sent.clone(), labels: Arc::clone(&h.labels) }
    })
}

/// A connection direction found no pipe and waits for one.
pub(crate) fn pipe_shortage() {
    metrics::counter!(PIPE_SHORTAGES).increment(1);
}

/// A connection ended: closed, with its response flags (`meter`: from
/// [`opened`]; none when it was not intercepted, so never judged).
pub(crate) fn closed(r: &ConnReport, meter: Option<&Meter>) {
    let Some(meter) = meter else {
        NOT_INTERCEPTED_COUNT.with(|c| c.increment(1));
        return;
    };
    let l = Labels { flags: response_flags(r.outcome), ..(*meter.labels).clone() };
    if r.outcome == Outcome::Refused502 {
        REFUSED_HTTP.with(|cache| {
            let mut cache = cache.borrow_mut();
            let c = cache.entry(l.clone()).or_insert_with_key(|l| {
                let mut ls = label_list(l, "http");
                ls.push(Label::new("response_code", "502"));
                metrics::counter!(REQUESTS, ls)
            });
            c.increment(1);
        });
    }
    CLOSED.with(|cache| {
        let mut cache = cache.borrow_mut();
        let c = cache.entry(l).or_insert_with_key(|l| metrics::counter!(TCP_CLOSED, label_list(l, "tcp")));
        c.increment(1);
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_past_the_cap_fold_into_other() {
        static TEST: Bounded = Bounded::new(100);
        for i in 0..100 {
            let name: Arc<str> = Arc::from(format!("n{i}.example"));
            assert_eq!(TEST.text(name.clone()), name);
        }
        assert_eq!(&*TEST.text(Arc::from("one-too-many.example")), "other");
        assert_eq!(&*TEST.text(Arc::from("n7.example")), "n7.example", "admitted values keep their series");
        // A value this worker saw admitted to one label is not thereby admitted to another.
        static FULL: Bounded = Bounded::new(0);
        assert_eq!(&*FULL.text(Arc::from("n7.example")), "other", "each label has its own cap");
    }

    /// Names and ports each within their caps, but more pairs of them than
    /// [`MAX_PAIRS`]: past it, a new pair's labels are `other` both; the
    /// pairs kept, and the policy's own hosts, keep theirs.
    #[test]
    fn pairs_past_the_cap_fold_into_other() {
        use sluice_policy::model::Mode;
        use sluice_policy::{Hostname, Reason, SourceFile, load_sources};
        let files = [SourceFile { path: std::path::Path::new("t.yaml").into(), bytes: Vec::new() }];
        let snapshot = Snapshot::compile(&load_sources(&files).unwrap_or_else(|e| panic!("{e}")));
        let ip = std::net::IpAddr::from([198, 18, 0, 1]);
        let labels_of = |name: &str, port: u16| {
            let verdict = Verdict {
                allow: true,
                cluster: Cluster::Passthrough,
                reason: Reason::NotRegistered,
                name: Some(Hostname::parse(name).unwrap_or_else(|e| panic!("{e}"))),
                workload: None,
                would_deny: false,
                mode: Mode::AllowAny,
            };
            let l = labels(&verdict, &snapshot, port, ip, "-");
            (l.service.to_string(), l.port)
        };
        let (names, ports) = (MAX_PAIRS / MAX_PORTS, MAX_PORTS as u16); // within each cap
        for n in 0..names {
            for port in 0..ports {
                let (name, port) = (format!("n{n}.pairs.example"), 41_000 + port);
                assert_eq!(labels_of(&name, port), (name, Some(port)));
            }
        }
        assert_eq!(labels_of("n0.pairs.example", 41_000), ("n0.pairs.example".to_owned(), Some(41_000)), "kept");
        assert_eq!(labels_of("n1.pairs.example", 41_000 + ports - 1).1, Some(41_000 + ports - 1), "kept");
        assert_eq!(labels_of("late.pairs.example", 41_000), ("other".to_owned(), None), "one pair too many");
    }

    #[test]
    fn ports_past_the_cap_fold_into_other() {
        static TEST_PORTS: Bounded = Bounded::new(MAX_PORTS);
        for port in 40_000..40_000 + MAX_PORTS as u16 {
            assert!(TEST_PORTS.admits(&Value::Port(port)));
        }
        assert!(!TEST_PORTS.admits(&Value::Port(50_000)));
        assert!(TEST_PORTS.admits(&Value::Port(40_001)), "admitted ports keep their series");
    }
}
