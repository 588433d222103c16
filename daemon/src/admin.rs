//! The admin HTTP API on its own address: `/metrics` (Prometheus text),
//! `/healthz`, `/readyz`, `/debug/policy`, `/debug/names` (the last two for
//! loopback clients only).

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use axum::Router;
use axum::extract::{ConnectInfo, Query, Request, State};
use axum::http::StatusCode;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Json, Response};
use axum::routing::get;
use metrics_exporter_prometheus::PrometheusHandle;
use serde::Deserialize;
use serde_json::json;
use sluice_policy::model::{Enforcement, Mode};
use sluice_policy::{NameTable, Timestamp};

use crate::reload::PolicyState;

#[derive(Clone)]
pub(crate) struct Admin {
    pub(crate) prometheus: PrometheusHandle,
    pub(crate) policy: Arc<PolicyState>,
    pub(crate) names: Arc<NameTable>,
    pub(crate) ready: Arc<AtomicBool>,
}

/// How often recorded histogram samples are folded into their buckets.
const UPKEEP_EVERY: Duration = Duration::from_secs(1);

/// Folds histogram samples into their buckets every [`UPKEEP_EVERY`]. The
/// exporter keeps each sample (~18 B; one per DNS answer) until that is
/// done, which a scrape also does: on a node nobody scrapes, they piled up
/// for good (3.6 MB per 200,000 answers, measured). The exporter's own HTTP
/// listener would run this; sluice serves `/metrics` from the admin API.
pub(crate) async fn upkeep(prometheus: PrometheusHandle) {
    let mut every = tokio::time::interval(UPKEEP_EVERY);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        every.tick().await;
        prometheus.run_upkeep();
    }
}

/// The routes; serve them with the peer's address
/// (`into_make_service_with_connect_info::<SocketAddr>`).
pub(crate) fn router(admin: Admin) -> Router {
    let debug = Router::new()
        .route("/debug/policy", get(debug_policy))
        .route("/debug/names", get(debug_names))
        .route_layer(middleware::from_fn(loopback_only));
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .merge(debug)
        .with_state(admin)
}

/// The debug endpoints show the node's DNS history and its policy: they
/// answer clients on the node itself only, also when the admin address is a
/// wildcard so that a Prometheus elsewhere can scrape `/metrics`.
async fn loopback_only(ConnectInfo(peer): ConnectInfo<SocketAddr>, request: Request, next: Next) -> Response {
    // An IPv4 client of a dual-stack socket comes as ::ffff:a.b.c.d.
    if peer.ip().to_canonical().is_loopback() {
        next.run(request).await
    } else {
        (StatusCode::FORBIDDEN, "sluice: the /debug endpoints answer loopback clients only\n").into_response()
    }
}

async fn metrics(State(a): State<Admin>) -> impl IntoResponse {
    sluice_dnsproxy::metrics::table_gauges(&a.names);
    ([("content-type", "text/plain; version=0.0.4")], a.prometheus.render())
}

async fn readyz(State(a): State<Admin>) -> impl IntoResponse {
    if a.ready.load(Ordering::Relaxed) {
        (StatusCode::OK, "ready\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "starting\n")
    }
}

async fn debug_policy(State(a): State<Admin>) -> Json<serde_json::Value> {
    let snap = a.policy.snapshot.load();
    let s = snap.settings();
    let entries: Vec<_> = snap
        .entries()
        .iter()
        .map(|e| {
            json!({
                "name": e.name,
                "namespace": e.namespace,
                "hosts": e.hosts.iter().map(ToString::to_string).collect::<Vec<_>>(),
                "addresses": e.addresses.iter().map(ToString::to_string).collect::<Vec<_>>(),
                "ports": e.ports.iter().map(|p| json!({"number": p.number, "name": p.name, "protocol": p.protocol.label()})).collect::<Vec<_>>(),
                "origin": e.origin.to_string(),
            })
        })
        .collect();
    let files: Vec<String> =
        a.policy.files.lock().map(|f| f.iter().map(|p| p.display().to_string()).collect()).unwrap_or_default();
    Json(json!({
        "generation": a.policy.generation.load(Ordering::Relaxed),
        "mode": match s.mode { Mode::AllowAny => "ALLOW_ANY", Mode::RegistryOnly => "REGISTRY_ONLY" },
        "enforcement": match s.enforcement { Enforcement::Enforce => "enforce", Enforcement::DryRun => "dry-run" },
        "denyRanges": s.deny_ranges.iter().map(ToString::to_string).collect::<Vec<_>>(),
        "entries": entries,
        "files": files,
        "lastReloadError": a.policy.last_error.lock().ok().and_then(|e| e.clone()),
    }))
}

#[derive(Debug, Deserialize)]
struct NamesQuery {
    name: Option<String>,
    ip: Option<IpAddr>,
    limit: Option<usize>,
}

/// `?ip=` is one lookup; anything else walks the whole table (up to a
/// million IPs), off the control thread, which also serves DNS over TCP.
async fn debug_names(State(a): State<Admin>, Query(q): Query<NamesQuery>) -> Json<serde_json::Value> {
    let now = Timestamp::now();
    let limit = q.limit.unwrap_or(1000).min(100_000);
    let name = q.name.map(|n| n.trim_end_matches('.').to_ascii_lowercase());
    let wanted =
        move |names: &[sluice_policy::Hostname]| name.as_ref().is_none_or(|n| names.iter().any(|h| h.as_str() == n));
    let rows = match q.ip {
        Some(ip) => {
            let names = a.names.names(ip, now);
            (!names.is_empty() && wanted(&names) && limit > 0).then_some((ip, names)).into_iter().collect()
        }
        None => {
            let table = a.names.clone();
            tokio::task::spawn_blocking(move || table.dump(now, limit, |names| wanted(names))).await.unwrap_or_default()
        }
    };
    let rows: Vec<_> = rows
        .into_iter()
        .map(|(ip, names)| json!({"ip": ip.to_string(), "names": names.iter().map(ToString::to_string).collect::<Vec<_>>()}))
        .collect();
    Json(json!({ "ips": a.names.len(), "entries": rows }))
}
