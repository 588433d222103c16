//! Raw serde types: the YAML documents exactly as users write them.
//!
//! Istio kinds tolerate unknown fields (Istio may add fields later; users
//! copy resources out of live clusters with `status` and managed fields).
//! sluice's own `EgressPolicy` denies unknown fields: a typo there must not
//! silently weaken a node's policy. Values that need a location in an error
//! are `Spanned`.

use std::collections::BTreeMap;

use serde::Deserialize;
use serde::de::IgnoredAny;
use serde_saphyr::Spanned;

/// The fields every Kubernetes-style document shares; read first to learn
/// which typed document to parse the rest as.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct Envelope {
    pub(crate) api_version: Option<Spanned<String>>,
    pub(crate) kind: Option<Spanned<String>>,
    #[serde(default)]
    pub(crate) metadata: Metadata,
}

#[derive(Debug, Default, Deserialize)]
pub(crate) struct Metadata {
    pub(crate) name: Option<String>,
    pub(crate) namespace: Option<String>,
}

/// An Istio document; only `spec` matters here, everything else is tolerated.
#[derive(Debug, Deserialize)]
pub(crate) struct IstioDoc<S> {
    pub(crate) spec: Option<Spanned<S>>,
}

/// sluice's own document: nothing but the four Kubernetes fields.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub(crate) struct OwnDoc<S> {
    #[serde(rename = "apiVersion")]
    pub(crate) _api_version: IgnoredAny,
    #[serde(rename = "kind")]
    pub(crate) _kind: IgnoredAny,
    #[serde(rename = "metadata", default)]
    pub(crate) _metadata: Option<IgnoredAny>,
    pub(crate) spec: Option<Spanned<S>>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct ServiceEntrySpec {
    pub(crate) hosts: Option<Vec<Spanned<String>>>,
    #[serde(default)]
    pub(crate) addresses: Vec<Spanned<String>>,
    #[serde(default)]
    pub(crate) ports: Vec<Spanned<RawPort>>,
    pub(crate) location: Option<Spanned<Location>>,
    pub(crate) resolution: Option<Spanned<Resolution>>,
    #[serde(default)]
    pub(crate) endpoints: Vec<Spanned<RawEndpoint>>,
    pub(crate) workload_selector: Option<Spanned<RawSelector>>,
    #[serde(default)]
    pub(crate) export_to: Vec<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct RawPort {
    pub(crate) number: Spanned<u32>,
    pub(crate) name: Option<Spanned<String>>,
    pub(crate) protocol: Option<Spanned<String>>,
    pub(crate) target_port: Option<Spanned<u32>>,
}

#[derive(Debug, Deserialize)]
pub(crate) struct RawEndpoint {
    pub(crate) address: Option<Spanned<String>>,
    #[serde(default)]
    pub(crate) ports: BTreeMap<String, Spanned<u32>>,
    #[serde(default)]
    pub(crate) labels: BTreeMap<String, String>,
    pub(crate) network: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
pub(crate) struct RawSelector {
    #[serde(default)]
    pub(crate) labels: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Location {
    MeshExternal,
    MeshInternal,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Resolution {
    None,
    Static,
    Dns,
    DnsRoundRobin,
    DynamicDns,
}

/// Istio `Sidecar`: only its namespace-wide `outboundTrafficPolicy` is policy here.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct SidecarSpec {
    pub(crate) outbound_traffic_policy: Option<SidecarOutbound>,
    pub(crate) workload_selector: Option<IgnoredAny>,
}

#[derive(Debug, Deserialize)]
pub(crate) struct SidecarOutbound {
    pub(crate) mode: Option<Spanned<Mode>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, serde::Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Mode {
    /// Unregistered destinations pass (PassthroughCluster).
    #[default]
    AllowAny,
    /// Unregistered destinations are refused (BlackHoleCluster).
    RegistryOnly,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Enforcement {
    /// Refuse what the policy refuses.
    #[default]
    Enforce,
    /// Count and log what would be refused, never refuse.
    DryRun,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub(crate) struct EgressPolicySpec {
    pub(crate) outbound_traffic_policy: Option<OwnOutbound>,
    pub(crate) enforcement: Option<Spanned<Enforcement>>,
    #[serde(default)]
    pub(crate) deny_ranges: Vec<Spanned<String>>,
    pub(crate) dns: Option<DnsSpec>,
    #[serde(default)]
    pub(crate) workloads: Vec<Spanned<WorkloadSpec>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct OwnOutbound {
    pub(crate) mode: Option<Spanned<Mode>>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub(crate) struct DnsSpec {
    pub(crate) block_unregistered: Option<bool>,
    pub(crate) min_ttl: Option<Spanned<String>>,
    pub(crate) grace: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct WorkloadSpec {
    pub(crate) name: Spanned<String>,
    pub(crate) sources: Vec<Spanned<String>>,
}
