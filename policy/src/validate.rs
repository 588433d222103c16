//! Raw documents → validated policy, with Istio's own ServiceEntry rules
//! (pkg/config/validation in istio/istio) and sluice's rules for its own kind.
//! Every problem is collected; nothing stops at the first one.

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::time::Duration;

use ipnet::IpNet;
use serde_saphyr::{Location as Loc, Spanned};

use crate::diag::{Diagnostic, DocPlace};
use crate::host::{HostError, HostPattern, Hostname};
use crate::model::{DnsSettings, EgressSettings, Endpoint, Origin, Port, Protocol, Resolution, ServiceEntry, Workload};
use crate::raw::{self, EgressPolicySpec, Location, ServiceEntrySpec};

/// Collects problems for one document.
pub(crate) struct Checker<'a> {
    pub(crate) place: &'a DocPlace,
    pub(crate) problems: Vec<Diagnostic>,
}

impl Checker<'_> {
    pub(crate) fn error(&mut self, loc: Loc, message: impl Into<String>, field: impl Into<String>) {
        self.problems.push(self.place.at(loc, message, field));
    }

    pub(crate) fn warn(&mut self, loc: Loc, message: impl Into<String>, field: impl Into<String>) {
        self.problems.push(self.place.warn(loc, message, field));
    }
}

/// An IP (taken as a /32 or /128) or a CIDR. The bool says it was a CIDR.
pub(crate) fn parse_ip_or_cidr(s: &str) -> Result<(IpNet, bool), String> {
    let s = s.trim();
    if s.contains('/') {
        let net: IpNet = s.parse().map_err(|_| format!("{s:?} is not a valid CIDR block"))?;
        Ok((net.trunc(), true))
    } else {
        let ip: IpAddr = s.parse().map_err(|_| format!("{s:?} is not a valid IP address"))?;
        Ok((IpNet::from(ip), false))
    }
}

/// DNS-1123 label: lower-case alphanumerics and '-', 1..63, alphanumeric at both ends.
fn is_dns1123_label(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && b.iter().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
        && b[0] != b'-'
        && b[b.len() - 1] != b'-'
}

fn port_in_range(n: u32) -> Option<u16> {
    u16::try_from(n).ok().filter(|p| *p != 0)
}

pub(crate) fn service_entry(
    ck: &mut Checker<'_>,
    name: String,
    namespace: Option<String>,
    origin: Origin,
    spec: Spanned<ServiceEntrySpec>,
) -> Option<ServiceEntry> {
    let before = ck.problems.iter().filter(|d| d.severity == crate::Severity::Error).count();
    let at = spec.referenced;
    let spec = spec.value;
    let resolution = spec.resolution.as_ref().map_or(Resolution::None, |r| r.value);
    let resolution_loc = spec.resolution.as_ref().map_or(at, |r| r.referenced);

    let hosts = check_hosts(ck, at, spec.hosts.as_deref().unwrap_or_default(), resolution, spec.endpoints.is_empty());
    let addresses = check_addresses(ck, &spec.addresses, resolution, resolution_loc);
    let checked = check_ports(ck, &spec.ports);
    if spec.ports.is_empty() {
        ck.warn(at, "service entry has no ports: it matches no connection", "spec.ports");
    }

    if resolution != Resolution::None && hosts.len() > 1 {
        for (i, p) in &checked {
            if !p.protocol.is_http() && !p.protocol.is_tls() {
                let loc = spec.ports[*i].referenced;
                ck.error(loc, "multiple hosts provided with non-HTTP, non-TLS ports", format!("spec.ports[{i}]"));
            }
        }
    }
    if resolution == Resolution::DynamicDns {
        for (i, p) in &checked {
            if !matches!(p.protocol, Protocol::Http | Protocol::Tls | Protocol::Grpc | Protocol::Http2) {
                let loc = spec.ports[*i].referenced;
                ck.error(
                    loc,
                    "only HTTP, TLS, GRPC and HTTP2 ports are supported with resolution DYNAMIC_DNS",
                    format!("spec.ports[{i}]"),
                );
            }
        }
    }
    let ports: Vec<Port> = checked.into_iter().map(|(_, p)| p).collect();
    let endpoints = check_endpoints(ck, &spec.endpoints, resolution, &ports);
    let workload_selector = check_selector(ck, &spec, resolution);
    let export_to = check_export_to(ck, &spec.export_to);
    if export_to == ["~"] {
        // Istio's "visible in no namespace": an entry switched off. Registered node-wide, it would
        // open what its author closed.
        ck.warn(at, "exportTo ['~'] exports this entry to no namespace: it registers nothing", "spec.exportTo");
        return None;
    }

    let errors_now = ck.problems.iter().filter(|d| d.severity == crate::Severity::Error).count();
    (errors_now == before).then(|| ServiceEntry {
        name,
        namespace,
        origin,
        hosts,
        addresses,
        ports,
        location: spec.location.map_or(Location::MeshExternal, |l| l.value),
        resolution,
        endpoints,
        export_to,
        workload_selector,
    })
}

fn check_hosts(
    ck: &mut Checker<'_>,
    spec_at: Loc,
    raw: &[Spanned<String>],
    resolution: Resolution,
    no_endpoints: bool,
) -> Vec<HostPattern> {
    if raw.is_empty() {
        ck.error(spec_at, "service entry must have at least one host", "spec.hosts");
    }
    let mut hosts = Vec::with_capacity(raw.len());
    for (i, h) in raw.iter().enumerate() {
        let field = format!("spec.hosts[{i}]");
        match HostPattern::parse(&h.value) {
            // A warning, not an error, for now: sets that had one loaded before (it matched
            // nothing), and their saved copy, must still load after an upgrade.
            Err(e @ (HostError::IpAddress(_) | HostError::NumericTld(_))) => {
                ck.warn(h.referenced, format!("host ignored, it matches nothing: {e} (Istio refuses it)"), field);
            }
            Err(e) => ck.error(h.referenced, format!("invalid host {:?}: {e}", h.value), field),
            Ok(p) => {
                let dns = matches!(resolution, Resolution::Dns | Resolution::DnsRoundRobin);
                if dns && no_endpoints && p.is_wildcard() {
                    ck.error(
                        h.referenced,
                        format!(
                            "wildcard host {p} needs endpoints with resolution {}: there is no name to resolve",
                            resolution_name(resolution)
                        ),
                        field,
                    );
                } else if resolution == Resolution::DynamicDns && !p.is_wildcard() {
                    ck.error(h.referenced, "host must be a wildcard with resolution DYNAMIC_DNS", field);
                } else {
                    hosts.push(p);
                }
            }
        }
    }
    hosts
}

fn check_addresses(ck: &mut Checker<'_>, raw: &[Spanned<String>], resolution: Resolution, res_at: Loc) -> Vec<IpNet> {
    let mut out = Vec::with_capacity(raw.len());
    for (i, a) in raw.iter().enumerate() {
        let field = format!("spec.addresses[{i}]");
        match parse_ip_or_cidr(&a.value) {
            Err(e) => ck.error(a.referenced, e, field),
            Ok(_) if resolution == Resolution::DynamicDns => {
                ck.error(a.referenced, "addresses cannot be set with resolution DYNAMIC_DNS", field)
            }
            Ok((net, true)) if !matches!(resolution, Resolution::None | Resolution::Static) => {
                ck.error(
                    a.referenced,
                    format!("CIDR address {net} is allowed only with resolution NONE or STATIC, not {} (resolution set at line {})", resolution_name(resolution), res_at.line() + ck.place.line_offset),
                    field,
                );
            }
            Ok((net, _)) => out.push(net),
        }
    }
    out
}

/// The ports with a valid number, each with its index in `spec.ports`.
fn check_ports(ck: &mut Checker<'_>, raw: &[Spanned<raw::RawPort>]) -> Vec<(usize, Port)> {
    let mut out = Vec::with_capacity(raw.len());
    let mut names = BTreeSet::new();
    let mut numbers = BTreeSet::new();
    for (i, p) in raw.iter().enumerate() {
        let field = |f: &str| format!("spec.ports[{i}].{f}");
        let number = port_in_range(p.value.number.value);
        if number.is_none() {
            let msg = format!("port number {} must be in the range 1..65535", p.value.number.value);
            ck.error(p.value.number.referenced, msg, field("number"));
        }
        if let Some(n) = number
            && !numbers.insert(n)
        {
            ck.error(
                p.value.number.referenced,
                format!("port {n} is already defined in this service entry"),
                field("number"),
            );
        }
        let name = match &p.value.name {
            None => {
                ck.error(p.referenced, "port name is required", field("name"));
                String::new()
            }
            Some(n) if !is_dns1123_label(&n.value) => {
                let msg = format!("invalid port name {:?}: must be a DNS-1123 label (a-z, 0-9, '-')", n.value);
                ck.error(n.referenced, msg, field("name"));
                String::new()
            }
            Some(n) => {
                if !names.insert(n.value.clone()) {
                    ck.error(n.referenced, format!("port name {:?} is already defined", n.value), field("name"));
                }
                n.value.clone()
            }
        };
        let protocol = match &p.value.protocol {
            None => Protocol::Unspecified,
            Some(s) => Protocol::parse(&s.value).unwrap_or_else(|| {
                let msg = format!(
                    "unsupported protocol {:?} (one of HTTP, HTTPS, HTTP2, GRPC, GRPC-Web, HTTP_PROXY, TLS, TCP, UDP, Mongo, Redis, MySQL)",
                    s.value
                );
                ck.error(s.referenced, msg, field("protocol"));
                Protocol::Unspecified
            }),
        };
        let target_port = match &p.value.target_port {
            None => None,
            Some(t) if t.value == 0 => None,
            Some(t) => port_in_range(t.value).or_else(|| {
                let msg = format!("targetPort {} must be in the range 1..65535", t.value);
                ck.error(t.referenced, msg, field("targetPort"));
                None
            }),
        };
        if let Some(number) = number {
            out.push((i, Port { number, name, protocol, target_port }));
        }
    }
    out
}

fn check_endpoints(
    ck: &mut Checker<'_>,
    raw: &[Spanned<raw::RawEndpoint>],
    resolution: Resolution,
    ports: &[Port],
) -> Vec<Endpoint> {
    match resolution {
        Resolution::None | Resolution::DynamicDns if !raw.is_empty() => {
            let msg = format!("no endpoints should be provided for resolution type {}", resolution_name(resolution));
            ck.error(raw[0].referenced, msg, "spec.endpoints");
            return Vec::new();
        }
        Resolution::DnsRoundRobin if raw.len() > 1 => {
            ck.error(
                raw[1].referenced,
                "there must be at most 1 endpoint for resolution DNS_ROUND_ROBIN",
                "spec.endpoints",
            );
        }
        _ => {}
    }
    let mut out = Vec::with_capacity(raw.len());
    for (i, ep) in raw.iter().enumerate() {
        let field = format!("spec.endpoints[{i}]");
        let address = ep.value.address.as_ref().map(|a| a.value.trim()).unwrap_or_default();
        let at = ep.value.address.as_ref().map_or(ep.referenced, |a| a.referenced);
        let is_ip = address.parse::<IpAddr>().is_ok();
        let is_unix = address.starts_with("unix://");
        match resolution {
            Resolution::Static if address.is_empty() && ep.value.network.is_none() => {
                ck.error(at, "endpoint address is required", format!("{field}.address"))
            }
            Resolution::Static if !address.is_empty() && !is_ip && !is_unix => ck.error(
                at,
                format!("endpoint address {address:?} is not an IP address (resolution STATIC)"),
                format!("{field}.address"),
            ),
            Resolution::Dns | Resolution::DnsRoundRobin if !is_ip && Hostname::parse(address).is_err() => ck.error(
                at,
                format!("endpoint address {address:?} is not a valid FQDN or an IP address"),
                format!("{field}.address"),
            ),
            _ => {}
        }
        let mut ep_ports = Vec::new();
        for (pname, pnum) in &ep.value.ports {
            if !ports.iter().any(|p| &p.name == pname) {
                ck.error(
                    pnum.referenced,
                    format!("endpoint port {pname:?} is not defined by the service entry"),
                    format!("{field}.ports.{pname}"),
                );
            }
            match port_in_range(pnum.value) {
                Some(n) => ep_ports.push((pname.clone(), n)),
                None => ck.error(
                    pnum.referenced,
                    format!("endpoint port {} must be in the range 1..65535", pnum.value),
                    format!("{field}.ports.{pname}"),
                ),
            }
        }
        let _ = &ep.value.labels;
        out.push(Endpoint { address: address.to_owned(), ports: ep_ports });
    }
    out
}

fn check_selector(
    ck: &mut Checker<'_>,
    spec: &ServiceEntrySpec,
    resolution: Resolution,
) -> Option<Vec<(String, String)>> {
    let sel = spec.workload_selector.as_ref()?;
    if !spec.endpoints.is_empty() {
        ck.error(
            sel.referenced,
            "only one of workloadSelector or endpoints is allowed in a service entry",
            "spec.workloadSelector",
        );
    }
    if resolution == Resolution::None {
        ck.warn(sel.referenced, "workloadSelector should not be set when resolution is NONE", "spec.workloadSelector");
    }
    for (k, v) in &sel.value.labels {
        if k.is_empty() {
            ck.error(sel.referenced, "empty key is not supported in selector", "spec.workloadSelector.labels");
        }
        if k.contains('*') || v.contains('*') {
            ck.error(
                sel.referenced,
                format!("wildcard is not supported in selector: {k:?}: {v:?}"),
                "spec.workloadSelector.labels",
            );
        }
    }
    Some(sel.value.labels.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
}

fn check_export_to(ck: &mut Checker<'_>, raw: &[Spanned<String>]) -> Vec<String> {
    let mut seen = BTreeSet::new();
    for (i, e) in raw.iter().enumerate() {
        let v = e.value.as_str();
        let field = format!("spec.exportTo[{i}]");
        if !(v == "." || v == "*" || v == "~" || is_dns1123_label(v)) {
            ck.error(e.referenced, format!("exportTo entry {v:?} must be '.', '*', '~' or a namespace name"), field);
        } else if !seen.insert(v) {
            ck.error(e.referenced, format!("duplicate exportTo entry {v:?}"), field);
        }
    }
    if seen.len() > 1 && (seen.contains("*") || seen.contains("~")) {
        ck.error(raw[0].referenced, "'*' and '~' cannot be combined with other exportTo entries", "spec.exportTo");
    }
    raw.iter().map(|e| e.value.clone()).collect()
}

fn resolution_name(r: Resolution) -> &'static str {
    match r {
        Resolution::None => "NONE",
        Resolution::Static => "STATIC",
        Resolution::Dns => "DNS",
        Resolution::DnsRoundRobin => "DNS_ROUND_ROBIN",
        Resolution::DynamicDns => "DYNAMIC_DNS",
    }
}

/// A Go/Kubernetes-style duration: `5s`, `10m`, `1h30m`, `500ms`.
fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s.trim()).map_err(|e| format!("invalid duration {s:?}: {e} (e.g. 30s, 10m, 1h30m)"))
}

pub(crate) fn egress_policy(
    ck: &mut Checker<'_>,
    name: Option<String>,
    origin: Origin,
    spec: Option<Spanned<EgressPolicySpec>>,
) -> EgressSettings {
    let mut out = EgressSettings { origin: Some(origin), name, ..EgressSettings::default() };
    let Some(spec) = spec else { return out };
    let spec = spec.value;
    if let Some(mode) = spec.outbound_traffic_policy.and_then(|o| o.mode) {
        out.mode = mode.value;
        out.mode_set = true;
    }
    if let Some(e) = spec.enforcement {
        out.enforcement = e.value;
    }
    for (i, r) in spec.deny_ranges.iter().enumerate() {
        match parse_ip_or_cidr(&r.value) {
            Ok((net, _)) => out.deny_ranges.push(net),
            Err(e) => ck.error(r.referenced, e, format!("spec.denyRanges[{i}]")),
        }
    }
    if let Some(dns) = spec.dns {
        out.dns = dns_settings(ck, dns);
    }
    let mut names = BTreeSet::new();
    for (i, w) in spec.workloads.iter().enumerate() {
        let field = format!("spec.workloads[{i}]");
        let wname = w.value.name.value.trim();
        if wname.is_empty() {
            ck.error(w.value.name.referenced, "workload name must not be empty", format!("{field}.name"));
        } else if !names.insert(wname.to_owned()) {
            ck.error(w.value.name.referenced, format!("workload {wname:?} is defined twice"), format!("{field}.name"));
        }
        let mut sources = Vec::new();
        for (j, s) in w.value.sources.iter().enumerate() {
            match parse_ip_or_cidr(&s.value) {
                Ok((net, _)) => sources.push(net),
                Err(e) => ck.error(s.referenced, e, format!("{field}.sources[{j}]")),
            }
        }
        if w.value.sources.is_empty() {
            ck.error(w.referenced, format!("workload {wname:?} has no sources"), format!("{field}.sources"));
        }
        out.workloads.push(Workload { name: wname.into(), sources });
    }
    out
}

/// (Whether `blockUnregistered` has any effect depends on the mode, which a
/// Sidecar may give: the loader warns once the policy set's mode is known.)
fn dns_settings(ck: &mut Checker<'_>, dns: raw::DnsSpec) -> DnsSettings {
    let mut out = DnsSettings::default();
    if let Some(b) = dns.block_unregistered {
        out.block_unregistered = b;
    }
    for (raw, slot, field) in
        [(dns.min_ttl, &mut out.min_ttl, "spec.dns.minTtl"), (dns.grace, &mut out.grace, "spec.dns.grace")]
    {
        if let Some(s) = raw {
            match parse_duration(&s.value) {
                Ok(d) => *slot = d,
                Err(e) => ck.error(s.referenced, e, field),
            }
        }
    }
    out
}
