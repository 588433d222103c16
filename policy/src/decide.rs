//! `decide()`: the verdict for one connection (DESIGN.md, "Verdict semantics").
//!
//! 1. A destination in a deny range is refused in every mode.
//! 2. With a sniffed name (TLS SNI, HTTP Host), that name is matched against
//!    ServiceEntry hosts and the port — unless DNS knows the destination IP
//!    under other names only: then the name is a lie (domain fronting, Host
//!    spoofing) and is not a match.
//! 3. Without one, the names DNS learned for the IP (any of them), or a
//!    ServiceEntry `addresses` range, are matched against hosts and port.
//! 4. Match → allowed as that ServiceEntry. No match → ALLOW_ANY: Passthrough;
//!    REGISTRY_ONLY: BlackHole, or Passthrough marked would-deny in dry-run.
//!
//! Deciding never waits for anything; the caller sniffs first only when
//! [`Snapshot::sniff_useful`] says a name could change the outcome.

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use ipnet::IpNet;

use crate::host::{HostPattern, Hostname};
use crate::model::{Enforcement, Mode};
use crate::names::{AliveNames, NameTable};
use crate::snapshot::{HostRef, Snapshot};
use crate::time::Timestamp;

/// Where a sniffed name came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SniffSource {
    TlsSni,
    HttpHost,
}

impl fmt::Display for SniffSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            SniffSource::TlsSni => "TLS SNI",
            SniffSource::HttpHost => "HTTP Host",
        })
    }
}

/// A name the client itself sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sniffed {
    pub name: Hostname,
    pub via: SniffSource,
}

/// The facts about one connection that a verdict rests on.
#[derive(Debug, Clone)]
pub struct Connection {
    /// The client's address.
    pub source: IpAddr,
    /// The original destination the client dialed.
    pub destination: SocketAddr,
    pub sniffed: Option<Sniffed>,
}

/// Istio's cluster for the connection: the `destination_service_name` label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cluster {
    ServiceEntry(HostRef),
    Passthrough,
    BlackHole,
}

/// Why the verdict is what it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reason {
    /// The destination is in a deny range.
    DenyRange(IpNet),
    /// The client's own name (SNI / Host) matched a ServiceEntry host.
    SniffedName(SniffSource),
    /// A name DNS gave for the destination IP matched a ServiceEntry host.
    DnsName(Hostname),
    /// The destination IP is in a ServiceEntry's `addresses`.
    Address(IpNet),
    /// The client's name is not one DNS gave for this IP.
    NameContradictsDns(SniffSource),
    /// Nothing registered covers the destination and port.
    NotRegistered,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    pub allow: bool,
    pub cluster: Cluster,
    pub reason: Reason,
    /// The best known destination name (the `destination_service` label).
    pub name: Option<Hostname>,
    /// The source's workload (the `source_workload` label).
    pub workload: Option<Arc<str>>,
    /// Dry-run: allowed, but enforcement would have refused it.
    pub would_deny: bool,
    pub mode: Mode,
}

impl Snapshot {
    /// Whether a sniffed name could change the verdict for this destination:
    /// it is not in a deny range, and some ServiceEntry serves HTTP or TLS on
    /// its port (a constant-time bit test). When false, the forwarder must
    /// not wait for client bytes (server-first protocols such as SMTP, MySQL).
    pub fn sniff_useful(&self, destination: SocketAddr) -> bool {
        self.deny_range(destination.ip()).is_none() && self.is_name_port(destination.port())
    }
}

/// Decides one connection. Reads the name table (and renews the names it
/// relied on: use keeps them alive), never blocks, never allocates unless a
/// name is returned.
pub fn decide(snapshot: &Snapshot, names: &NameTable, conn: &Connection, now: Timestamp) -> Verdict {
    let settings = snapshot.settings();
    let dst = conn.destination;
    let workload = snapshot.workload(conn.source).cloned();
    let verdict = |allow, cluster, reason, name| Verdict {
        allow,
        cluster,
        reason,
        name,
        workload: workload.clone(),
        would_deny: false,
        mode: settings.mode,
    };

    if let Some(net) = snapshot.deny_range(dst.ip()) {
        let name =
            conn.sniffed.as_ref().map(|s| s.name.clone()).or_else(|| names.names(dst.ip(), now).into_iter().next());
        return refuse(settings.enforcement, verdict(false, Cluster::BlackHole, Reason::DenyRange(net), name));
    }

    let (outcome, dns_first) =
        names.with_names_renewing(dst.ip(), now, settings.dns.grace, |known| classify(snapshot, conn, known));
    let sniffed_name = || conn.sniffed.as_ref().map(|s| s.name.clone());
    let reason = match outcome {
        NameOutcome::Matched(r, reason) => {
            return verdict(true, Cluster::ServiceEntry(r), reason, sniffed_name().or(dns_first));
        }
        NameOutcome::Contradicted(via) => Reason::NameContradictsDns(via),
        NameOutcome::Unmatched => match snapshot.match_address(dst.ip(), dst.port()) {
            // No name matched, but the address range is registered.
            Some((entry, net)) => {
                let r = HostRef { entry, host: 0 };
                let name = sniffed_name().or(dns_first).or_else(|| first_exact(snapshot, r));
                return verdict(true, Cluster::ServiceEntry(r), Reason::Address(net), name);
            }
            None => Reason::NotRegistered,
        },
    };
    let name = sniffed_name().or(dns_first);
    match settings.mode {
        Mode::AllowAny => verdict(true, Cluster::Passthrough, reason, name),
        Mode::RegistryOnly => refuse(settings.enforcement, verdict(false, Cluster::BlackHole, reason, name)),
    }
}

enum NameOutcome {
    Matched(HostRef, Reason),
    Contradicted(SniffSource),
    Unmatched,
}

/// Rules 2 and 3 over the names DNS gave for the destination. Also returns
/// the first such name (the label for an unmatched connection). A name the
/// client sent counts only on a port where some ServiceEntry serves HTTP or
/// TLS: elsewhere the connection is opaque TCP, judged by what DNS said (the
/// name only labels it).
fn classify(snapshot: &Snapshot, conn: &Connection, known: AliveNames<'_>) -> (NameOutcome, Option<Hostname>) {
    let port = conn.destination.port();
    let mut first: Option<Hostname> = None;
    match conn.sniffed.as_ref().filter(|_| snapshot.is_name_port(port)) {
        Some(s) => {
            // An IP DNS never named cannot contradict the client.
            let mut vouched = true;
            for n in known {
                if first.is_none() {
                    first = Some(n.clone());
                    vouched = false;
                }
                if n == &s.name {
                    vouched = true;
                    break;
                }
            }
            if !vouched {
                return (NameOutcome::Contradicted(s.via), first);
            }
            match snapshot.match_name(&s.name, port) {
                Some(r) => (NameOutcome::Matched(r, Reason::SniffedName(s.via)), first),
                None => (NameOutcome::Unmatched, first),
            }
        }
        None => {
            for n in known {
                if let Some(r) = snapshot.match_name(n, port) {
                    return (NameOutcome::Matched(r, Reason::DnsName(n.clone())), Some(n.clone()));
                }
                first.get_or_insert_with(|| n.clone());
            }
            (NameOutcome::Unmatched, first)
        }
    }
}

fn first_exact(snapshot: &Snapshot, r: HostRef) -> Option<Hostname> {
    snapshot.entry(r).hosts.iter().find_map(|h| match h {
        HostPattern::Exact(n) => Some(n.clone()),
        HostPattern::Wildcard(_) => None,
    })
}

/// Dry-run turns a refusal into a Passthrough marked would-deny.
fn refuse(enforcement: Enforcement, v: Verdict) -> Verdict {
    match enforcement {
        Enforcement::Enforce => v,
        Enforcement::DryRun => Verdict { allow: true, cluster: Cluster::Passthrough, would_deny: true, ..v },
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Reason::DenyRange(net) => write!(f, "destination is in deny range {net}"),
            Reason::SniffedName(via) => write!(f, "{via} name matches a registered host"),
            Reason::DnsName(n) => {
                write!(f, "DNS resolved {n} to this address, and {n} is registered")
            }
            Reason::Address(net) => {
                write!(f, "destination is in the registered address range {net}")
            }
            Reason::NameContradictsDns(via) => {
                write!(f, "the {via} name is not one DNS gave for this address (domain fronting or Host spoofing)")
            }
            Reason::NotRegistered => f.write_str("not registered"),
        }
    }
}

#[cfg(test)]
mod tests;
