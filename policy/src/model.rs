//! Validated policy: what the raw documents mean once every rule has passed.

use std::fmt;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use ipnet::IpNet;

use crate::host::HostPattern;
pub use crate::raw::{Enforcement, Location, Mode, Resolution};

/// Where a document came from, for summaries and `/debug/policy`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin {
    pub file: Arc<Path>,
    pub line: u64,
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.file.display(), self.line)
    }
}

/// An Istio ServiceEntry, validated by Istio's own rules.
#[derive(Debug, Clone)]
pub struct ServiceEntry {
    pub name: String,
    pub namespace: Option<String>,
    pub origin: Origin,
    pub hosts: Vec<HostPattern>,
    pub addresses: Vec<IpNet>,
    pub ports: Vec<Port>,
    pub location: Location,
    pub resolution: Resolution,
    pub endpoints: Vec<Endpoint>,
    pub export_to: Vec<String>,
    pub workload_selector: Option<Vec<(String, String)>>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Port {
    pub number: u16,
    pub name: String,
    pub protocol: Protocol,
    pub target_port: Option<u16>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    pub address: String,
    pub ports: Vec<(String, u16)>,
}

/// Istio port protocols (matched case-insensitively, as Istio does).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Protocol {
    Http,
    Https,
    Http2,
    Grpc,
    GrpcWeb,
    HttpProxy,
    Tls,
    Tcp,
    Udp,
    Mongo,
    Redis,
    Mysql,
    /// No protocol given: Istio sniffs it.
    Unspecified,
}

impl Protocol {
    pub fn parse(s: &str) -> Option<Protocol> {
        Some(match s.to_ascii_lowercase().as_str() {
            "http" => Protocol::Http,
            "https" => Protocol::Https,
            "http2" => Protocol::Http2,
            "grpc" => Protocol::Grpc,
            "grpc-web" => Protocol::GrpcWeb,
            "http_proxy" => Protocol::HttpProxy,
            "tls" => Protocol::Tls,
            "tcp" => Protocol::Tcp,
            "udp" => Protocol::Udp,
            "mongo" => Protocol::Mongo,
            "redis" => Protocol::Redis,
            "mysql" => Protocol::Mysql,
            _ => return None,
        })
    }

    /// The `request_protocol` label Istio reports for this port.
    pub fn label(self) -> &'static str {
        match self {
            Protocol::Http | Protocol::HttpProxy => "http",
            Protocol::Http2 | Protocol::GrpcWeb => "http2",
            Protocol::Grpc => "grpc",
            Protocol::Https | Protocol::Tls => "tls",
            Protocol::Udp => "udp",
            _ => "tcp",
        }
    }

    /// Plain-text HTTP: the first bytes carry a Host header.
    pub fn is_http(self) -> bool {
        matches!(self, Protocol::Http | Protocol::HttpProxy | Protocol::Http2 | Protocol::Grpc | Protocol::GrpcWeb)
    }

    /// TLS: the first bytes carry a ClientHello with SNI.
    pub fn is_tls(self) -> bool {
        matches!(self, Protocol::Https | Protocol::Tls)
    }
}

/// sluice's node-wide settings, from the one `EgressPolicy` (or defaults).
#[derive(Debug, Clone, PartialEq)]
pub struct EgressSettings {
    pub mode: Mode,
    /// Whether the EgressPolicy set the mode itself (else a Sidecar's applies, or ALLOW_ANY).
    pub mode_set: bool,
    pub enforcement: Enforcement,
    pub deny_ranges: Vec<IpNet>,
    pub dns: DnsSettings,
    pub workloads: Vec<Workload>,
    /// The document the settings came from; `None` means built-in defaults.
    pub origin: Option<Origin>,
    pub name: Option<String>,
}

impl Default for EgressSettings {
    fn default() -> Self {
        EgressSettings {
            mode: Mode::AllowAny,
            mode_set: false,
            enforcement: Enforcement::Enforce,
            deny_ranges: Vec::new(),
            dns: DnsSettings::default(),
            workloads: Vec::new(),
            origin: None,
            name: None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DnsSettings {
    /// REGISTRY_ONLY only: NXDOMAIN for names no ServiceEntry covers.
    pub block_unregistered: bool,
    /// Answer TTLs below this are raised to it in the name table.
    pub min_ttl: Duration,
    /// How long a name outlives its TTL; each use renews it.
    pub grace: Duration,
}

impl Default for DnsSettings {
    fn default() -> Self {
        DnsSettings { block_unregistered: false, min_ttl: Duration::from_secs(5), grace: Duration::from_secs(600) }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Workload {
    pub name: Arc<str>,
    pub sources: Vec<IpNet>,
}

/// A document that is valid Kubernetes YAML but not policy for sluice.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IgnoredDoc {
    pub origin: Origin,
    pub api_version: String,
    pub kind: String,
    pub name: Option<String>,
}

/// Everything one load produced: the validated policy and what was skipped.
#[derive(Debug, Clone)]
pub struct PolicySet {
    pub entries: Vec<ServiceEntry>,
    pub settings: EgressSettings,
    pub ignored: Vec<IgnoredDoc>,
    /// Every file that was read, in order.
    pub files: Vec<Arc<Path>>,
    pub warnings: Vec<crate::Diagnostic>,
}
