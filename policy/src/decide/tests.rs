//! One test per rule of DESIGN.md's verdict semantics.

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::time::Duration;

use super::*;
use crate::load::{SourceFile, load_sources};
use crate::names::Retention;

const T0: Timestamp = Timestamp::from_unix_millis(1_700_000_000_000);
const KEEP: Retention = Retention { min_ttl: Duration::from_secs(5), grace: Duration::from_secs(600) };

const ENTRIES: &str = r#"
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: payment-apis}
spec:
  hosts: [api.stripe.example, hooks.slack.example]
  ports: [{number: 443, name: https, protocol: TLS}]
  resolution: DNS
---
apiVersion: networking.istio.io/v1alpha3
kind: ServiceEntry
metadata: {name: httpbin-ext}
spec:
  hosts: [httpbin.org]
  ports: [{number: 80, name: http, protocol: HTTP}]
  resolution: DNS
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: object-storage}
spec:
  hosts: ["*.s3.example"]
  ports: [{number: 443, name: tls, protocol: TLS}]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: eu-storage}
spec:
  hosts: ["*.eu.s3.example"]
  ports: [{number: 443, name: tls, protocol: TLS}]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: search}
spec:
  hosts: [search.vendor.example]
  ports: [{number: 9300, name: transport, protocol: TCP}]
  resolution: DNS
---
apiVersion: networking.istio.io/v1beta1
kind: ServiceEntry
metadata: {name: reporting-db}
spec:
  hosts: [reporting-db.internal.example]
  addresses: [198.18.40.0/24, "2001:db8:40::/48"]
  ports: [{number: 5432, name: postgres, protocol: TCP}]
  resolution: STATIC
"#;

fn snapshot(mode: &str, enforcement: &str) -> Snapshot {
    let own = format!(
        "apiVersion: sluice.dev/v1alpha1\nkind: EgressPolicy\nmetadata: {{name: t}}\nspec:\n  outboundTrafficPolicy: {{mode: {mode}}}\n  enforcement: {enforcement}\n  denyRanges: [169.254.169.254/32, 'fd00:ec2::254/128']\n  workloads:\n  - name: billing\n    sources: [198.18.20.0/24]\n"
    );
    let files = [
        SourceFile { path: Path::new("entries.yaml").into(), bytes: ENTRIES.as_bytes().to_vec() },
        SourceFile { path: Path::new("own.yaml").into(), bytes: own.into_bytes() },
    ];
    let set = load_sources(&files).unwrap_or_else(|e| panic!("{e}"));
    Snapshot::compile(&set)
}

fn registry_only() -> Snapshot {
    snapshot("REGISTRY_ONLY", "enforce")
}

fn host(s: &str) -> Hostname {
    Hostname::parse(s).unwrap_or_else(|e| panic!("{e}"))
}

fn sock(s: &str) -> SocketAddr {
    s.parse().unwrap_or_else(|e| panic!("{s}: {e}"))
}

fn conn(dst: &str, sniffed: Option<(&str, SniffSource)>) -> Connection {
    Connection {
        source: "198.18.20.7".parse().unwrap_or(IpAddr::from([0, 0, 0, 0])),
        destination: sock(dst),
        sniffed: sniffed.map(|(n, via)| Sniffed { name: host(n), via }),
    }
}

fn table(pairs: &[(&str, &str)]) -> NameTable {
    let t = NameTable::new(1000);
    for (ip, name) in pairs {
        let ip = ip.parse().unwrap_or_else(|e| panic!("{ip}: {e}"));
        t.record(ip, &host(name), Duration::from_secs(30), T0, KEEP);
    }
    t
}

fn se_host(s: &Snapshot, v: &Verdict) -> String {
    match v.cluster {
        Cluster::ServiceEntry(r) => s.host(r).to_string(),
        other => format!("{other:?}"),
    }
}

const SNI: SniffSource = SniffSource::TlsSni;

#[test]
fn rule1_deny_range_is_refused_in_every_mode_even_when_registered() {
    let names = table(&[("169.254.169.254", "api.stripe.example")]);
    for mode in ["ALLOW_ANY", "REGISTRY_ONLY"] {
        let s = snapshot(mode, "enforce");
        let v = decide(&s, &names, &conn("169.254.169.254:443", Some(("api.stripe.example", SNI))), T0);
        assert!(!v.allow, "{mode}");
        assert_eq!(v.cluster, Cluster::BlackHole);
        assert_eq!(v.reason, Reason::DenyRange("169.254.169.254/32".parse().unwrap_or_else(|e| panic!("{e}"))));
        let v6 = decide(&s, &names, &conn("[fd00:ec2::254]:80", None), T0);
        assert!(!v6.allow, "IPv6 deny range, {mode}");
    }
    let dry = decide(&snapshot("REGISTRY_ONLY", "dry-run"), &names, &conn("169.254.169.254:80", None), T0);
    assert!(dry.allow && dry.would_deny, "dry-run never refuses but marks it");
}

#[test]
fn rule2_sni_matches_exact_host_on_its_port_only() {
    let s = registry_only();
    let names = table(&[]);
    let v = decide(&s, &names, &conn("198.18.9.1:443", Some(("API.Stripe.example", SNI))), T0);
    assert!(v.allow);
    assert_eq!(se_host(&s, &v), "api.stripe.example");
    assert_eq!(v.reason, Reason::SniffedName(SNI));
    assert_eq!(v.name, Some(host("api.stripe.example")));
    let other_port = decide(&s, &names, &conn("198.18.9.1:8443", Some(("api.stripe.example", SNI))), T0);
    assert!(!other_port.allow);
    assert_eq!(other_port.reason, Reason::NotRegistered);
}

#[test]
fn rule2_wildcards_match_subdomains_most_specific_first() {
    let s = registry_only();
    let names = table(&[]);
    let v = decide(&s, &names, &conn("198.18.9.2:443", Some(("bucket.s3.example", SNI))), T0);
    assert_eq!(se_host(&s, &v), "*.s3.example");
    let eu = decide(&s, &names, &conn("198.18.9.2:443", Some(("bucket.eu.s3.example", SNI))), T0);
    assert_eq!(se_host(&s, &eu), "*.eu.s3.example");
    let apex = decide(&s, &names, &conn("198.18.9.2:443", Some(("s3.example", SNI))), T0);
    assert!(!apex.allow, "a wildcard does not cover its own apex");
    let lookalike = decide(&s, &names, &conn("198.18.9.2:443", Some(("evils3.example", SNI))), T0);
    assert!(!lookalike.allow, "a suffix match must end at a label boundary");
}

#[test]
fn rule2_http_host_matches_like_sni() {
    let s = registry_only();
    let v = decide(&s, &table(&[]), &conn("198.18.9.3:80", Some(("httpbin.org", SniffSource::HttpHost))), T0);
    assert!(v.allow);
    assert_eq!(se_host(&s, &v), "httpbin.org");
    assert_eq!(v.reason, Reason::SniffedName(SniffSource::HttpHost));
}

#[test]
fn rule2_a_name_dns_did_not_give_for_the_ip_is_a_lie() {
    let s = registry_only();
    let names = table(&[("198.18.66.6", "exfil.evil.example")]);
    let v = decide(&s, &names, &conn("198.18.66.6:443", Some(("api.stripe.example", SNI))), T0);
    assert!(!v.allow, "domain fronting to a registered name is refused");
    assert_eq!(v.cluster, Cluster::BlackHole);
    assert_eq!(v.reason, Reason::NameContradictsDns(SNI));
    assert_eq!(v.name, Some(host("api.stripe.example")), "the label names what the client claimed");

    let allow_any = snapshot("ALLOW_ANY", "enforce");
    let pass = decide(&allow_any, &names, &conn("198.18.66.6:443", Some(("api.stripe.example", SNI))), T0);
    assert_eq!(
        (pass.allow, pass.cluster),
        (true, Cluster::Passthrough),
        "ALLOW_ANY passes it, but not as the ServiceEntry"
    );
}

#[test]
fn rule2_a_shared_cdn_ip_that_dns_gave_for_the_name_matches() {
    let s = registry_only();
    let names = table(&[("198.18.7.7", "cdn-edge.example"), ("198.18.7.7", "api.stripe.example")]);
    let v = decide(&s, &names, &conn("198.18.7.7:443", Some(("api.stripe.example", SNI))), T0);
    assert!(v.allow);
    assert_eq!(se_host(&s, &v), "api.stripe.example");
}

#[test]
fn rule3_opaque_tcp_matches_any_dns_name_of_the_ip() {
    let s = registry_only();
    let names = table(&[("198.18.30.1", "edge-17.cdn.example"), ("198.18.30.1", "search.vendor.example")]);
    let v = decide(&s, &names, &conn("198.18.30.1:9300", None), T0);
    assert!(v.allow);
    assert_eq!(se_host(&s, &v), "search.vendor.example");
    assert_eq!(v.reason, Reason::DnsName(host("search.vendor.example")));
    assert_eq!(v.name, Some(host("search.vendor.example")));
    let wrong_port = decide(&s, &names, &conn("198.18.30.1:9200", None), T0);
    assert!(!wrong_port.allow);
}

/// On a port where no ServiceEntry serves HTTP or TLS, a name the client
/// sends (read only to choose between a 502 and a reset) vouches for
/// nothing: the connection is opaque TCP, judged by what DNS said; the name
/// only labels it.
#[test]
fn rule3_a_name_sent_on_an_opaque_port_vouches_for_nothing() {
    let s = registry_only();
    let names = table(&[]);
    let v = decide(&s, &names, &conn("198.18.30.9:9300", Some(("search.vendor.example", SNI))), T0);
    assert!(!v.allow, "{v:?}");
    assert_eq!(v.name, Some(host("search.vendor.example")));
    let known = table(&[("198.18.30.9", "search.vendor.example")]);
    let v = decide(&s, &known, &conn("198.18.30.9:9300", Some(("other.example", SNI))), T0);
    assert!(v.allow, "DNS named it: {v:?}");
    assert_eq!(v.reason, Reason::DnsName(host("search.vendor.example")));
}

#[test]
fn rule3_opaque_tcp_matches_addresses_ranges_v4_and_v6() {
    let s = registry_only();
    let names = table(&[]);
    let v = decide(&s, &names, &conn("198.18.40.10:5432", None), T0);
    assert!(v.allow);
    assert_eq!(se_host(&s, &v), "reporting-db.internal.example");
    assert_eq!(v.reason, Reason::Address("198.18.40.0/24".parse().unwrap_or_else(|e| panic!("{e}"))));
    assert!(decide(&s, &names, &conn("[2001:db8:40::9]:5432", None), T0).allow);
    assert!(!decide(&s, &names, &conn("198.18.40.10:5433", None), T0).allow, "port must match too");
    assert!(!decide(&s, &names, &conn("198.18.41.10:5432", None), T0).allow);
}

#[test]
fn rule4_allow_any_passes_unregistered_labelled_with_the_best_name() {
    let s = snapshot("ALLOW_ANY", "enforce");
    let names = table(&[("198.18.50.5", "unlisted.example")]);
    let v = decide(&s, &names, &conn("198.18.50.5:443", None), T0);
    assert_eq!((v.allow, v.cluster, v.would_deny), (true, Cluster::Passthrough, false));
    assert_eq!(v.reason, Reason::NotRegistered);
    assert_eq!(v.name, Some(host("unlisted.example")));
    let bare = decide(&s, &names, &conn("198.18.50.6:443", None), T0);
    assert_eq!(bare.name, None, "no name known: the label falls back to the IP");
}

#[test]
fn rule4_registry_only_blackholes_and_dry_run_marks_would_deny() {
    let names = table(&[("198.18.50.5", "unlisted.example")]);
    let v = decide(&registry_only(), &names, &conn("198.18.50.5:443", None), T0);
    assert_eq!((v.allow, v.cluster), (false, Cluster::BlackHole));
    assert_eq!(v.name, Some(host("unlisted.example")));
    let dry = decide(&snapshot("REGISTRY_ONLY", "dry-run"), &names, &conn("198.18.50.5:443", None), T0);
    assert_eq!((dry.allow, dry.cluster, dry.would_deny), (true, Cluster::Passthrough, true));
    assert_eq!(dry.reason, Reason::NotRegistered);
}

#[test]
fn rule6_names_expire_after_ttl_plus_grace_but_use_keeps_them() {
    let s = registry_only();
    let names = table(&[("198.18.30.2", "search.vendor.example")]); // 30s TTL + 600s grace
    let c = conn("198.18.30.2:9300", None);
    let later = |secs| T0.plus(Duration::from_secs(secs));
    assert!(decide(&s, &names, &c, later(600)).allow, "used at 600s: renewed to 1200s");
    assert!(decide(&s, &names, &c, later(1100)).allow, "kept alive by use past TTL + grace");
    assert!(!decide(&s, &names, &c, later(1701)).allow, "unused for longer than grace: gone");
}

#[test]
fn the_verdict_names_the_source_workload() {
    let s = registry_only();
    let v = decide(&s, &table(&[]), &conn("198.18.40.10:5432", None), T0);
    assert_eq!(v.workload.as_deref(), Some("billing"));
    let other = Connection {
        source: "198.18.99.1".parse().unwrap_or(IpAddr::from([0, 0, 0, 0])),
        ..conn("198.18.40.10:5432", None)
    };
    assert_eq!(decide(&s, &table(&[]), &other, T0).workload, None);
}

#[test]
fn sniffing_is_useful_only_where_a_name_can_change_the_verdict() {
    let s = registry_only();
    assert!(s.sniff_useful(sock("198.18.9.1:443")));
    assert!(s.sniff_useful(sock("198.18.9.1:80")));
    assert!(!s.sniff_useful(sock("198.18.9.1:25")), "SMTP is server-first: never wait");
    assert!(!s.sniff_useful(sock("198.18.40.10:5432")), "opaque TCP port");
    assert!(!s.sniff_useful(sock("169.254.169.254:443")), "deny range: verdict already known");
}
