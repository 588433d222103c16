//! sluice's DNS proxy: the node's queries (redirected here by nftables) go
//! to the real upstream resolvers unchanged, and every answer teaches the
//! [`NameTable`] which IPs belong to which names before the app sees it.
//!
//! Three tasks on the control plane's tokio current-thread runtime:
//! - [`serve`]: UDP on sluice's own batched loop (`udp`: a receiving thread
//!   per socket, queries multiplexed over a few long-lived upstream sockets,
//!   answers relayed byte for byte), TCP on its own capped accept loop
//!   (`tcp`: a connection's queries answered concurrently over a few shared
//!   upstream connections, answers relayed byte for byte too); what both do
//!   with a message is in `handler`: both walk the CNAME chain and learn
//!   before replying, and answer NXDOMAIN for unregistered names when the
//!   policy asks for it (REGISTRY_ONLY + `dns.blockUnregistered`).
//! - [`warm`]: hickory-resolver pre-resolves registered `resolution: DNS`
//!   hosts and refreshes them at their TTL, for apps that bypass the proxy.
//! - [`persist`]: the name table survives restarts (restore, periodic and
//!   final save) so REGISTRY_ONLY does not blackhole connections whose
//!   answers were given before a restart.
//!
//! Never depends on the forwarder: the two planes meet only in
//! `sluice-policy` types (the snapshot and the NameTable).
#![forbid(unsafe_code)]

#[doc(hidden)]
pub mod fuzz;
mod handler;
pub mod learn;
pub mod metrics;
mod persist;
mod share;
mod sys;
mod tcp;
mod udp;
mod upstream;
mod warm;

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use sluice_policy::{NameTable, Snapshot};

/// A map whose keys no client chooses (random IDs, hashes keyed at random,
/// label sets): the fast hash, not SipHash.
pub(crate) type FastMap<K, V> = std::collections::HashMap<K, V, foldhash::fast::RandomState>;

pub use persist::{keep_saved, persist, restore, restore_or_start_empty, save};
pub use upstream::resolve_upstreams;
pub use warm::{registered_hosts, warm};

/// DNS proxy settings, with production defaults.
#[derive(Debug, Clone)]
pub struct Config {
    /// Upstream resolvers, in order of preference. Empty: the nameservers
    /// of [`resolv_conf`](Self::resolv_conf).
    pub upstreams: Vec<SocketAddr>,
    /// Read with hickory-resolver's reader when `upstreams` is empty. If it
    /// lists only systemd-resolved's stub (127.0.0.53), resolved's own
    /// upstream file is read instead (forwarding to the stub would loop).
    pub resolv_conf: PathBuf,
    /// Where the proxy itself answers (besides the sockets handed to
    /// [`serve`]); such addresses are never used as upstreams.
    pub listen: Vec<SocketAddr>,
    /// `SO_MARK` on upstream sockets, so the node's redirect rules let them
    /// out (loop guard). 0 leaves the mark unset.
    pub mark: u32,
    /// How long one upstream gets to answer before the next is tried.
    pub timeout: Duration,
    /// Queries waiting on an upstream at once (per transport, at most
    /// 16,384 whatever this says); past this, SERVFAIL at once. Over UDP one client address
    /// may hold half of them.
    pub max_in_flight: usize,
    /// A client TCP connection with no query in flight and none arriving
    /// this long is closed (and one whose reply waits this long to be
    /// read); so is an upstream TCP connection with no query in flight.
    pub tcp_idle_timeout: Duration,
    /// Client TCP connections open at once; at the cap, accepting pauses.
    pub max_tcp_connections: usize,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            upstreams: Vec::new(),
            resolv_conf: PathBuf::from("/etc/resolv.conf"),
            listen: Vec::new(),
            mark: 0,
            timeout: Duration::from_millis(1_500),
            max_in_flight: 4_096,
            tcp_idle_timeout: Duration::from_secs(10),
            max_tcp_connections: 1_024,
        }
    }
}

/// What the control plane shares with the DNS proxy.
#[derive(Clone)]
pub struct Shared {
    /// The current policy; a reload swaps it.
    pub policy: Arc<ArcSwap<Snapshot>>,
    pub names: Arc<NameTable>,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared").field("names", &self.names.len()).finish_non_exhaustive()
    }
}

/// Why the DNS proxy could not start or stopped.
#[derive(Debug, thiserror::Error)]
pub enum DnsError {
    #[error("no upstream DNS resolvers (none configured, and none usable in resolv.conf)")]
    NoUpstreams,
    #[error("reading {path}: {source}")]
    ResolvConf { path: PathBuf, source: Box<dyn std::error::Error + Send + Sync> },
    #[error("socket: {0}")]
    Socket(#[source] std::io::Error),
    #[error("name table file {path}: {source}")]
    Persist { path: PathBuf, source: std::io::Error },
}

/// Answers DNS on `udp` and `tcp` until `shutdown` completes, then stops
/// accepting and returns. Sockets are bound by the caller (port 0 in tests).
/// [`start`] and [`Started::serve`] in one step.
pub async fn serve(
    config: Config,
    shared: Shared,
    udp: Vec<tokio::net::UdpSocket>,
    tcp: Vec<tokio::net::TcpListener>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), DnsError> {
    start(config, shared, udp, tcp)?.serve(shutdown).await;
    Ok(())
}

/// Sets the proxy up — upstreams resolved, upstream sockets open (with their
/// mark), UDP receiving threads running — so that whatever can fail at
/// start fails here, before the caller reports itself ready. Call from
/// within the control plane's tokio runtime.
pub fn start(
    config: Config,
    shared: Shared,
    udp: Vec<tokio::net::UdpSocket>,
    tcp: Vec<tokio::net::TcpListener>,
) -> Result<Started, DnsError> {
    let mut ours = config.listen.clone();
    ours.extend(udp.iter().filter_map(|s| s.local_addr().ok()));
    ours.extend(tcp.iter().filter_map(|s| s.local_addr().ok()));
    ours.sort_unstable();
    ours.dedup();
    let addrs = resolve_upstreams(&config, &ours)?;
    tracing::info!(upstreams = ?addrs, listen = ?ours, "DNS proxy starting");
    let upstreams = upstream::Upstreams::new(&addrs, config.mark, config.timeout, config.tcp_idle_timeout);
    let udp = udp.into_iter().map(tokio::net::UdpSocket::into_std).collect::<Result<Vec<_>, _>>();
    let udp = udp::UdpProxy::new(&config, shared.clone(), &addrs, udp.map_err(DnsError::Socket)?);
    let udp = Arc::new(udp.map_err(DnsError::Socket)?);
    let receivers = udp.start().map_err(DnsError::Socket)?;
    let proxy = handler::Proxy::new(shared, upstreams, config.max_in_flight);
    let tcp_server = Arc::new(tcp::TcpServer::new(proxy, config.max_tcp_connections, config.tcp_idle_timeout));
    Ok(Started { udp, receivers, tcp_server, tcp })
}

/// A DNS proxy [`start`]ed: UDP is being answered; [`serve`](Self::serve)
/// adds TCP and the UDP timeouts. Dropping it stops the UDP threads.
#[derive(Debug)]
pub struct Started {
    udp: Arc<udp::UdpProxy>,
    receivers: udp::Receivers,
    tcp_server: Arc<tcp::TcpServer>,
    tcp: Vec<tokio::net::TcpListener>,
}

impl Started {
    /// Serves until `shutdown` completes, then stops accepting and returns.
    /// Nothing after [`start`] ends it: socket errors are logged and retried
    /// (receives after a pause, accepts with a backoff).
    pub async fn serve(self, shutdown: impl Future<Output = ()>) {
        let Started { udp, receivers, tcp_server, tcp } = self;
        // Dropped on return: the receiving threads stop, and the sweep task with the set.
        let mut udp_tasks = tokio::task::JoinSet::new();
        udp_tasks.spawn(udp.sweep());
        // On shutdown both transports stop taking queries and finish those
        // in flight, side by side, each within its grace.
        let (fired, stopping) = tokio::sync::oneshot::channel::<()>();
        let shutdown = async move {
            shutdown.await;
            let _ = fired.send(());
        };
        let udp_finish = async {
            if stopping.await.is_ok() {
                receivers.finish_queries(tcp::STOP_GRACE).await;
            }
        };
        tokio::join!(tcp_server.serve(tcp, shutdown), udp_finish);
        drop(receivers);
    }
}
