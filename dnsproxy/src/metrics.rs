//! The DNS proxy's metrics: names in one place, label values from bounded
//! sets, handles registered once per label set (DESIGN.md, "Metrics").
//!
//! No recorder is installed here; the daemon installs the Prometheus one and
//! should give [`UPSTREAM_DURATION`] the buckets in [`UPSTREAM_BUCKETS`].

use std::cell::RefCell;
use std::collections::HashMap;

use hickory_proto::op::ResponseCode;
use hickory_proto::rr::RecordType;
use metrics::Counter;

/// Queries answered: `qtype`, `rcode`, `action` (`forwarded`, `blocked`, `failed`).
pub const REQUESTS: &str = "sluice_dns_requests_total";
/// Time from sending a query upstream to a matching answer: `upstream`, `transport`.
pub const UPSTREAM_DURATION: &str = "sluice_dns_upstream_duration_seconds";
/// Upstream attempts that failed: `upstream`, `reason` (`timeout`, `io`,
/// `refused`, `mismatch`: an answer that is not the query's, or one that
/// answers no query in flight: late, duplicate, or over UDP forged).
pub const UPSTREAM_FAILURES: &str = "sluice_dns_upstream_failures_total";
/// 1 while an upstream answers, 0 while it is down (its last 3 attempts
/// failed; queries skip it but for a probe every 500 ms): `upstream`,
/// `transport`.
pub const UPSTREAM_UP: &str = "sluice_dns_upstream_up";
/// NOERROR upstream answers hickory could not parse, so nothing was learned
/// from them (they are relayed as they came): `transport`. Only NOERROR
/// answers are parsed, to learn from.
pub const UNPARSED_ANSWERS: &str = "sluice_dns_unparsed_answers_total";
/// UDP queries that asked what a query in flight upstream asked (the same
/// question and options), and were answered with its answer instead of
/// being sent upstream again.
pub const JOINED_QUERIES: &str = "sluice_dns_joined_queries_total";
/// Client connections open for DNS over TCP (at most `maxTcpConnections`).
pub const TCP_CONNECTIONS: &str = "sluice_dns_tcp_connections";
/// IPs in the name table.
pub const IPS_TRACKED: &str = "sluice_dns_ips_tracked";
/// (IP, name) pairs in the name table, read at each scrape (expired pairs
/// count until the next purge, which every save makes).
pub const NAMES_TRACKED: &str = "sluice_dns_names_tracked";
/// Pre-resolutions of registered hosts: `result` (`ok`, `error`).
pub const WARM_LOOKUPS: &str = "sluice_dns_warm_lookups_total";
/// Name table saves: `result` (`ok`, `error`).
pub const SAVES: &str = "sluice_dns_name_table_saves_total";

/// Histogram buckets for [`UPSTREAM_DURATION`] (seconds): 50 µs to 5 s.
pub const UPSTREAM_BUCKETS: &[f64] =
    &[0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0];

/// What the proxy did with a query.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Action {
    /// Sent upstream; the upstream's answer went back.
    Forwarded,
    /// Answered NXDOMAIN by policy (`dns.blockUnregistered`).
    Blocked,
    /// Answered locally with an error: malformed, over the in-flight cap, or
    /// every upstream failed.
    Failed,
}

impl Action {
    pub fn label(self) -> &'static str {
        match self {
            Action::Forwarded => "forwarded",
            Action::Blocked => "blocked",
            Action::Failed => "failed",
        }
    }
}

/// The `qtype` label: common types by name, the rest `other`.
pub fn qtype_label(t: RecordType) -> &'static str {
    match t {
        RecordType::A => "A",
        RecordType::AAAA => "AAAA",
        RecordType::CNAME => "CNAME",
        RecordType::HTTPS => "HTTPS",
        RecordType::SVCB => "SVCB",
        RecordType::MX => "MX",
        RecordType::TXT => "TXT",
        RecordType::PTR => "PTR",
        RecordType::SRV => "SRV",
        RecordType::NS => "NS",
        RecordType::SOA => "SOA",
        RecordType::ANY => "ANY",
        RecordType::DS => "DS",
        RecordType::DNSKEY => "DNSKEY",
        _ => "other",
    }
}

/// The `rcode` label: the six codes a resolver gives, the rest `other`.
pub fn rcode_label(r: ResponseCode) -> &'static str {
    match r {
        ResponseCode::NoError => "NOERROR",
        ResponseCode::FormErr => "FORMERR",
        ResponseCode::ServFail => "SERVFAIL",
        ResponseCode::NXDomain => "NXDOMAIN",
        ResponseCode::NotImp => "NOTIMP",
        ResponseCode::Refused => "REFUSED",
        _ => "other",
    }
}

type Key = (&'static str, &'static str, Action);

thread_local! {
    /// Keys from bounded label sets, not a client's: the fast hash (SipHash
    /// over the two labels cost ~320 instructions per query, callgrind).
    static REQUEST_COUNTERS: RefCell<crate::FastMap<Key, Counter>> =
        RefCell::new(HashMap::default());
}

/// Sets the name table's gauges (IPs, and (IP, name) pairs): for the
/// exporter to call when it is scraped, not per answer (`len` sums a counter
/// per CPU).
pub fn table_gauges(names: &sluice_policy::NameTable) {
    metrics::gauge!(IPS_TRACKED).set(names.len() as f64);
    metrics::gauge!(NAMES_TRACKED).set(names.pair_count() as f64);
}

/// Counts one answered query (a cached handle per label set and thread).
pub(crate) fn request(qtype: RecordType, rcode: ResponseCode, action: Action) {
    let key = (qtype_label(qtype), rcode_label(rcode), action);
    REQUEST_COUNTERS.with(|cache| {
        let mut cache = cache.borrow_mut();
        let counter = cache.entry(key).or_insert_with(
            || metrics::counter!(REQUESTS, "qtype" => key.0, "rcode" => key.1, "action" => key.2.label()),
        );
        counter.increment(1);
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_are_bounded() {
        assert_eq!(qtype_label(RecordType::Unknown(65_280)), "other");
        assert_eq!(qtype_label(RecordType::AAAA), "AAAA");
        assert_eq!(rcode_label(ResponseCode::Unknown(3_000)), "other");
        assert_eq!(rcode_label(ResponseCode::NXDomain), "NXDOMAIN");
        assert!(UPSTREAM_BUCKETS.windows(2).all(|w| w[0] < w[1]));
    }
}
