//! Istio-compatible connection metrics (DESIGN.md, "Metrics").
//!
//! Handles are registered once per label set and cached per worker thread
//! (an increment is then a few ns, not the ~100 ns of a labelled
//! `counter!`). Label values are bounded: at most [`MAX_DESTINATIONS`]
//! distinct `destination_service` values per process; past that, new names
//! fold into `other`.
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
use std::sync::{Arc, LazyLock, Mutex, OnceLock};

use metrics::{Counter, Label};
use sluice_policy::{Cluster, HostPattern, Hostname, Snapshot, Verdict};

use crate::conn::{ConnReport, Outcome};
use crate::splice::End;

pub const TCP_OPENED: &str = "istio_tcp_connections_opened_total";
pub const TCP_CLOSED: &str = "istio_tcp_connections_closed_total";
pub const TCP_SENT_BYTES: &str = "istio_tcp_sent_bytes_total";
pub const TCP_RECEIVED_BYTES: &str = "istio_tcp_received_bytes_total";
pub const REQUESTS: &str = "istio_requests_total";
/// Connections refused before any verdict: `reason` = `not_intercepted`.
pub const NOT_INTERCEPTED: &str = "sluice_forwarder_not_intercepted_total";

pub const PASSTHROUGH: &str = "PassthroughCluster";
pub const BLACKHOLE: &str = "BlackHoleCluster";
/// Distinct `destination_service` values kept before folding into `other`.
pub const MAX_DESTINATIONS: usize = 2_000;

/// One connection's label set.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Labels {
    workload: Arc<str>,
    service: Arc<str>,
    service_name: Arc<str>,
    port: u16,
    flags: &'static str,
}

/// The counters an open connection bumps: opened once, bytes as they move.
#[derive(Debug, Clone)]
struct Live {
    opened: Counter,
    sent: Counter,
    received: Counter,
}

/// Byte counters of one connection, bumped by the splice loop per chunk.
#[derive(Debug, Clone)]
pub struct Meter {
    /// Client → upstream (Istio's `received`: the request side).
    pub(crate) upstream: Counter,
    /// Upstream → client (Istio's `sent`: the response side).
    pub(crate) client: Counter,
}

thread_local! {
    static LIVE: RefCell<HashMap<Labels, Live>> = RefCell::new(HashMap::new());
    static CLOSED: RefCell<HashMap<Labels, Counter>> = RefCell::new(HashMap::new());
}

/// The name itself if it may have its own series, else `other`. At most
/// [`MAX_DESTINATIONS`] names per process; each worker remembers the names it
/// has seen admitted, so the shared set's lock is taken once per name per
/// worker, not per connection.
fn admit(name: Arc<str>) -> Arc<str> {
    static SEEN: OnceLock<Mutex<HashSet<Arc<str>>>> = OnceLock::new();
    thread_local! {
        static LOCAL: RefCell<HashSet<Arc<str>>> = RefCell::new(HashSet::new());
    }
    if LOCAL.with(|l| l.borrow().contains(&name)) {
        return name;
    }
    let seen = SEEN.get_or_init(|| Mutex::new(HashSet::new()));
    let Ok(mut seen) = seen.lock() else { return fixed(&OTHER) };
    if !seen.contains(&name) {
        if seen.len() >= MAX_DESTINATIONS {
            return fixed(&OTHER);
        }
        seen.insert(name.clone());
    }
    LOCAL.with(|l| l.borrow_mut().insert(name.clone()));
    name
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
    let service_name = match verdict.cluster {
        Cluster::ServiceEntry(r) => match snapshot.host(r) {
            HostPattern::Exact(host) => admit(host.shared()),
            wildcard => admit(Arc::from(wildcard.to_string())),
        },
        Cluster::Passthrough => fixed(&PASSTHROUGH_NAME),
        Cluster::BlackHole => fixed(&BLACKHOLE_NAME),
    };
    let service = verdict.name.as_ref().map_or_else(|| Arc::from(dst_ip.to_string()), Hostname::shared);
    Labels {
        workload: verdict.workload.clone().unwrap_or_else(|| fixed(&UNKNOWN)),
        service: admit(service),
        service_name,
        port: dst_port,
        flags,
    }
}

fn label_list(l: &Labels, protocol: &'static str) -> Vec<Label> {
    vec![
        Label::new("reporter", "source"),
        Label::new("source_workload", l.workload.to_string()),
        Label::new("destination_service", l.service.to_string()),
        Label::new("destination_service_name", l.service_name.to_string()),
        Label::new("destination_port", l.port.to_string()),
        Label::new("request_protocol", protocol),
        Label::new("response_flags", l.flags),
    ]
}

/// A connection was judged and is about to be forwarded or refused; returns
/// the byte counters its splice loop bumps.
pub(crate) fn opened(verdict: &Verdict, snapshot: &Snapshot, dst: std::net::SocketAddr) -> Meter {
    let l = labels(verdict, snapshot, dst.port(), dst.ip(), "-");
    LIVE.with(|cache| {
        let mut cache = cache.borrow_mut();
        let h = cache.entry(l).or_insert_with_key(|l| {
            let ls = label_list(l, "tcp");
            Live {
                opened: metrics::counter!(TCP_OPENED, ls.clone()),
                sent: metrics::counter!(TCP_SENT_BYTES, ls.clone()),
                received: metrics::counter!(TCP_RECEIVED_BYTES, ls),
            }
        });
        h.opened.increment(1);
        Meter { upstream: h.received.clone(), client: h.sent.clone() }
    })
}

/// A connection ended: closed, with its response flags.
pub(crate) fn closed(r: &ConnReport) {
    let (Some(verdict), Some(snapshot), Some(dst)) = (&r.verdict, &r.snapshot, r.destination) else {
        metrics::counter!(NOT_INTERCEPTED).increment(1);
        return;
    };
    let l = labels(verdict, snapshot, dst.port(), dst.ip(), response_flags(r.outcome));
    if r.outcome == Outcome::Refused502 {
        let mut ls = label_list(&l, "http");
        ls.push(Label::new("response_code", "502"));
        metrics::counter!(REQUESTS, ls).increment(1);
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
    fn destination_names_past_the_cap_fold_into_other() {
        for i in 0..MAX_DESTINATIONS {
            let name: Arc<str> = Arc::from(format!("n{i}.example"));
            assert_eq!(admit(name.clone()), name);
        }
        assert_eq!(&*admit(Arc::from("one-too-many.example")), "other");
        assert_eq!(&*admit(Arc::from("n7.example")), "n7.example", "admitted names keep their series");
    }
}
