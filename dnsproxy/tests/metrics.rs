//! Metrics, scraped as Prometheus text: requests by qtype, rcode and action;
//! upstream latency histogram with the crate's buckets; upstream failures;
//! upstreams up or down; the name table gauges; open DNS-over-TCP
//! connections.
#![allow(clippy::unwrap_used)]

mod common;

use std::sync::OnceLock;

use common::{Background, Proxy, Upstream, config, dig, shared};
use hickory_proto::rr::RecordType;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use sluice_dnsproxy::metrics as m;

fn prometheus() -> &'static PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE.get_or_init(|| {
        let recorder = PrometheusBuilder::new()
            .set_buckets_for_metric(Matcher::Full(m::UPSTREAM_DURATION.into()), m::UPSTREAM_BUCKETS)
            .unwrap()
            .build_recorder();
        let handle = recorder.handle();
        metrics::set_global_recorder(recorder).unwrap();
        handle
    })
}

/// The sum of the series of `metric` whose labels include all of `labels`.
fn series(metric: &str, labels: &[(&str, &str)]) -> f64 {
    let text = prometheus().render();
    text.lines()
        .filter(|l| l.starts_with(&format!("{metric}{{")) || l.starts_with(&format!("{metric} ")))
        .filter(|l| labels.iter().all(|(k, v)| l.contains(&format!("{k}=\"{v}\""))))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

const BLOCKING: &str = "\
apiVersion: sluice.dev/v1alpha1
kind: EgressPolicy
metadata: {name: node}
spec:
  outboundTrafficPolicy: {mode: REGISTRY_ONLY}
  dns: {blockUnregistered: true}
";

#[test]
fn requests_latency_failures_and_table_size_are_exported() {
    prometheus();
    let up = Upstream::start();
    let proxy = Proxy::to(up.addr, shared(None));
    dig(proxy.addr, &["api.sluice.test", "A"]);
    dig(proxy.addr, &["api.sluice.test", "A"]);
    dig(proxy.addr, &["missing.sluice.test", "AAAA"]);
    dig(proxy.addr, &["many.sluice.test", "A", "+bufsize=4096"]);

    let forwarded = [("action", "forwarded"), ("qtype", "A"), ("rcode", "NOERROR")];
    assert_eq!(series(m::REQUESTS, &forwarded), 3.0);
    assert_eq!(series(m::REQUESTS, &[("action", "forwarded"), ("qtype", "AAAA"), ("rcode", "NXDOMAIN")]), 1.0);
    let upstream = up.addr.to_string();
    let count = format!("{}_count", m::UPSTREAM_DURATION);
    assert_eq!(series(&count, &[("upstream", &upstream), ("transport", "udp")]), 4.0);
    let bucket = format!("{}_bucket", m::UPSTREAM_DURATION);
    assert!(
        prometheus()
            .render()
            .contains(&format!("{bucket}{{upstream=\"{upstream}\",transport=\"udp\",le=\"0.00005\"}}"))
    );
    // Set when the exporter is scraped (the daemon's /metrics does this).
    m::table_gauges(&proxy.shared.names);
    assert_eq!(series(m::IPS_TRACKED, &[]), 41.0);

    let blocking = Proxy::to(up.addr, shared(Some(BLOCKING)));
    dig(blocking.addr, &["evil.example", "TXT"]);
    assert_eq!(series(m::REQUESTS, &[("action", "blocked"), ("qtype", "TXT"), ("rcode", "NXDOMAIN")]), 1.0);

    let dead = std::net::UdpSocket::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let failing = Proxy::start(config(vec![dead]), shared(None));
    dig(failing.addr, &["api.sluice.test", "A"]);
    assert_eq!(series(m::REQUESTS, &[("action", "failed"), ("rcode", "SERVFAIL")]), 1.0);
    // A lone upstream gets two tries: both refused, both counted.
    assert_eq!(series(m::UPSTREAM_FAILURES, &[("upstream", &dead.to_string())]), 2.0);
    // Up until its third failed attempt in a row; down (skipped) after it.
    let dead_udp = [("upstream", &*dead.to_string()), ("transport", "udp")];
    assert_eq!(series(m::UPSTREAM_UP, &dead_udp), 1.0);
    assert_eq!(series(m::UPSTREAM_UP, &[("upstream", &upstream), ("transport", "udp")]), 1.0);
    dig(failing.addr, &["api.sluice.test", "A"]);
    assert_eq!(series(m::UPSTREAM_UP, &dead_udp), 0.0);

    // Queries that asked what a query in flight asked, answered with its answer.
    let (_hold, quiet) = common::silent();
    let waiting = Proxy::start(config(vec![quiet]), shared(None));
    let _clients: Vec<std::net::UdpSocket> = (0..3)
        .map(|id| {
            let s = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
            s.send_to(&common::query(id, "api.sluice.test.", RecordType::A, None), waiting.addr).unwrap();
            s
        })
        .collect();
    common::wait_for("two queries joined the first", || series(m::JOINED_QUERIES, &[]) == 2.0);

    let dir = tempfile::tempdir().unwrap();
    let names = proxy.shared.names.clone();
    let path = dir.path().join("names.jsonl");
    let saver = Background::spawn(move |shutdown| {
        sluice_dnsproxy::persist(names, path, std::time::Duration::from_secs(60), shutdown)
    });
    saver.stop().unwrap();
    assert_eq!(series(m::NAMES_TRACKED, &[]), 41.0);
    assert_eq!(series(m::SAVES, &[("result", "ok")]), 1.0);

    // Open DNS-over-TCP connections: up while one is open, down when it closes.
    let tcp = std::net::TcpStream::connect(proxy.addr).unwrap();
    common::wait_for("one open TCP connection", || series(m::TCP_CONNECTIONS, &[]) == 1.0);
    drop(tcp);
    common::wait_for("no open TCP connection", || series(m::TCP_CONNECTIONS, &[]) == 0.0);
}
