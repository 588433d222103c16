//! Keeping registered names warm.
//!
//! Apps that bypass the proxy (their own resolver, DNS over HTTPS) still
//! connect to registered hosts; so the proxy resolves every exact host of a
//! ServiceEntry with `resolution: DNS` (or `DNS_ROUND_ROBIN`) itself, and
//! again when its answer's TTL runs out, and records the answers like any
//! other. Lookups go through hickory-resolver, to the same upstreams as the
//! proxy, on sockets carrying the same `SO_MARK`.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use hickory_resolver::Resolver;
use hickory_resolver::config::{NameServerConfig, ResolveHosts, ResolverConfig, ResolverOpts};
use hickory_resolver::net::runtime::iocompat::AsyncIoTokioAsStd;
use hickory_resolver::net::runtime::{RuntimeProvider, TokioHandle, TokioTime};
use hickory_resolver::proto::rr::{Name, RecordType};
use sluice_policy::model::Resolution;
use sluice_policy::{HostPattern, Hostname, Retention, Snapshot, Timestamp};
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::learn::learn;
use crate::metrics as m;
use crate::{Config, DnsError, Shared, sys};

/// How often the warmer looks for a new policy snapshot.
const POLICY_POLL: Duration = Duration::from_secs(1);
/// After a failed lookup, try again this much later.
const RETRY: Duration = Duration::from_secs(30);
/// Refreshes are never closer than this, whatever the TTL.
const MIN_REFRESH: Duration = Duration::from_secs(1);
/// Nor further apart than this.
const MAX_REFRESH: Duration = Duration::from_secs(3_600);
/// Lookups running at once.
const CONCURRENCY: usize = 16;

/// The hosts the warmer keeps resolved: exact hosts of ServiceEntries whose
/// resolution is DNS or DNS_ROUND_ROBIN (wildcards cannot be resolved).
pub fn registered_hosts(snapshot: &Snapshot) -> Vec<Hostname> {
    let mut hosts: Vec<Hostname> = snapshot
        .entries()
        .iter()
        .filter(|e| matches!(e.resolution, Resolution::Dns | Resolution::DnsRoundRobin))
        .flat_map(|e| e.hosts.iter())
        .filter_map(|h| match h {
            HostPattern::Exact(name) => Some(name.clone()),
            HostPattern::Wildcard(_) => None,
        })
        .collect();
    hosts.sort();
    hosts.dedup();
    hosts
}

/// hickory-resolver's tokio runtime, with marked upstream sockets.
#[derive(Clone, Default)]
struct Marked {
    handle: TokioHandle,
    mark: u32,
    timeout: Duration,
}

type Boxed<T> = Pin<Box<dyn Send + Future<Output = Result<T, io::Error>>>>;

impl RuntimeProvider for Marked {
    type Handle = TokioHandle;
    type Timer = TokioTime;
    type Udp = tokio::net::UdpSocket;
    type Tcp = AsyncIoTokioAsStd<tokio::net::TcpStream>;

    fn create_handle(&self) -> TokioHandle {
        self.handle.clone()
    }

    fn connect_tcp(&self, server: SocketAddr, bind: Option<SocketAddr>, timeout: Option<Duration>) -> Boxed<Self::Tcp> {
        let (mark, timeout) = (self.mark, timeout.unwrap_or(self.timeout));
        Box::pin(async move { sys::tcp_connect(server, bind, mark, timeout).await.map(AsyncIoTokioAsStd) })
    }

    fn bind_udp(&self, local: SocketAddr, _server: SocketAddr) -> Boxed<Self::Udp> {
        let mark = self.mark;
        Box::pin(async move { sys::udp_bound(local, mark) })
    }
}

fn resolver(upstreams: &[SocketAddr], config: &Config) -> Result<Resolver<Marked>, DnsError> {
    let servers = upstreams
        .iter()
        .map(|addr| {
            let mut ns = NameServerConfig::udp_and_tcp(addr.ip());
            for conn in &mut ns.connections {
                conn.port = addr.port();
            }
            ns
        })
        .collect();
    let mut opts = ResolverOpts::default();
    opts.timeout = config.timeout;
    opts.attempts = 1;
    opts.ndots = 0;
    opts.use_hosts_file = ResolveHosts::Never;
    opts.preserve_intermediates = true;
    let provider = Marked { handle: TokioHandle::default(), mark: config.mark, timeout: config.timeout };
    let mut builder = Resolver::builder_with_config(ResolverConfig::from_parts(None, vec![], servers), provider);
    *builder.options_mut() = opts;
    builder.build().map_err(|e| DnsError::ResolvConf { path: config.resolv_conf.clone(), source: Box::new(e) })
}

/// Resolves `host` (A and AAAA), records the answers, and says when to look again.
async fn refresh(resolver: Resolver<Marked>, shared: Shared, host: Hostname) -> (Hostname, Duration) {
    let Ok(name) = Name::from_ascii(format!("{host}.")) else { return (host, MAX_REFRESH) };
    let mut next: Option<Duration> = None;
    for rtype in [RecordType::A, RecordType::AAAA] {
        match resolver.lookup(name.clone(), rtype).await {
            Ok(lookup) => {
                let keep = Retention::from(&shared.policy.load().settings().dns);
                let now = Timestamp::now();
                let learned = learn(&shared.names, &name, lookup.answers(), now, keep);
                if learned.ips > 0 {
                    let ttl = lookup.valid_until().saturating_duration_since(std::time::Instant::now());
                    next = Some(next.map_or(ttl, |n| n.min(ttl)));
                }
                metrics::counter!(m::WARM_LOOKUPS, "result" => "ok").increment(1);
            }
            Err(error) => {
                // NODATA (no AAAA) is the common case here, not worth a log line.
                tracing::debug!(%host, ?rtype, %error, "pre-resolution failed");
                metrics::counter!(m::WARM_LOOKUPS, "result" => "error").increment(1);
            }
        }
    }
    (host, next.map_or(RETRY, |ttl| ttl.clamp(MIN_REFRESH, MAX_REFRESH)))
}

/// Keeps every [registered host](registered_hosts) of the current policy
/// resolved until `shutdown` completes. Picks up policy reloads within a
/// second. Upstreams are chosen as [`serve`](crate::serve) chooses them
/// (give `config.listen` the proxy's addresses so it never asks itself).
pub async fn warm(config: Config, shared: Shared, shutdown: impl Future<Output = ()>) -> Result<(), DnsError> {
    let upstreams = crate::resolve_upstreams(&config, &config.listen)?;
    let resolver = resolver(&upstreams, &config)?;
    let mut due: HashMap<Hostname, Instant> = HashMap::new();
    let mut running: JoinSet<(Hostname, Duration)> = JoinSet::new();
    let mut seen: Option<Arc<Snapshot>> = None;
    tokio::pin!(shutdown);
    loop {
        let current = shared.policy.load_full();
        if seen.as_ref().is_none_or(|s| !Arc::ptr_eq(s, &current)) {
            let hosts = registered_hosts(&current);
            due.retain(|h, _| hosts.binary_search(h).is_ok()); // sorted
            for host in hosts {
                due.entry(host).or_insert_with(Instant::now);
            }
            seen = Some(current);
        }
        let now = Instant::now();
        // The longest overdue first: when lookups cannot keep up (a slow
        // upstream, many short TTLs), every host still takes its turn (the
        // map's order, the same every time, kept the ones at its end waiting).
        let mut ready: Vec<(Instant, &Hostname)> =
            due.iter().filter(|(_, at)| **at <= now).map(|(h, at)| (*at, h)).collect();
        ready.sort_unstable();
        let ready: Vec<Hostname> =
            ready.into_iter().take(CONCURRENCY.saturating_sub(running.len())).map(|(_, h)| h.clone()).collect();
        for host in ready {
            // In flight: not due again until its result sets the next time.
            due.insert(host.clone(), now + MAX_REFRESH);
            running.spawn(refresh(resolver.clone(), shared.clone(), host));
        }
        // With every lookup slot taken, hosts already due wait for a lookup to
        // end (`join_next`): waking for them would only find the slots full
        // again, every millisecond, walking every host each time.
        let wake = if running.len() >= CONCURRENCY {
            now + POLICY_POLL
        } else {
            due.values().min().copied().unwrap_or(now + POLICY_POLL).min(now + POLICY_POLL)
        };
        tokio::select! {
            () = &mut shutdown => return Ok(()),
            Some(done) = running.join_next(), if !running.is_empty() => {
                if let Ok((host, after)) = done
                    && let Some(at) = due.get_mut(&host)
                {
                    *at = Instant::now() + after;
                }
            }
            () = tokio::time::sleep_until(wake.max(now)) => {}
        }
    }
}
