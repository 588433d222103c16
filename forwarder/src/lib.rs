//! sluice's data plane: a thread-per-core forwarder on monoio.
//!
//! Each worker thread owns one runtime (io_uring, or epoll when io_uring is
//! unavailable or forced off) and one `SO_REUSEPORT` listener per configured
//! address; the kernel spreads connections across workers. A connection is
//! judged once, at accept time, against the policy snapshot current then
//! ([`sluice_policy::decide`]); allowed ones are spliced to their original
//! destination, refused ones get `502 Bad Gateway` (HTTP) or a reset.
//!
//! Never depends on tokio or the DNS proxy: the two planes meet only in
//! `sluice-policy` types (the snapshot and the NameTable).

mod conn;
mod listener;
pub mod metrics;
pub mod sniff;
pub mod splice;
mod sys;
mod worker;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use sluice_policy::{NameTable, Snapshot};

pub use conn::{ConnReport, Outcome as ConnOutcome};
pub use worker::{Handle, start};

/// How connections reach a listener.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Intercept {
    /// nftables `redirect`: the destination is conntrack's original tuple.
    Redirect,
    /// nftables `tproxy`: the socket's local address is the destination
    /// (listener bound with `IP_TRANSPARENT`).
    Tproxy,
}

/// Which io driver the workers run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Driver {
    /// io_uring when the kernel allows it, else epoll.
    #[default]
    Auto,
    /// io_uring or fail.
    Uring,
    /// epoll (monoio's legacy driver).
    Epoll,
}

/// How the workers share an address's connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Accept {
    /// `Shared` on io_uring, `PerWorker` on epoll.
    #[default]
    Auto,
    /// One listening socket that every worker accepts from: a new connection
    /// goes to a worker that is waiting for one. io_uring's accept waits are
    /// exclusive (one worker woken per connection); monoio's epoll ones are
    /// not, so on epoll every worker would wake for every connection.
    Shared,
    /// A `SO_REUSEPORT` socket per worker: the kernel picks the worker by a
    /// hash of the connection's addresses, busy or not; no socket shared.
    PerWorker,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listen {
    pub addr: SocketAddr,
    pub intercept: Intercept,
}

/// Forwarder settings, with production defaults.
#[derive(Debug, Clone)]
pub struct Config {
    pub listen: Vec<Listen>,
    /// Worker threads (one runtime and one listener per address each).
    pub workers: usize,
    pub driver: Driver,
    pub accept: Accept,
    /// `SO_MARK` on upstream sockets, so the node's redirect rules let them
    /// out (loop guard). 0 leaves the mark unset.
    pub mark: u32,
    pub connect_timeout: Duration,
    /// A connection with no byte moving either way this long is closed.
    pub idle_timeout: Duration,
    /// How long to wait for a client's first bytes when a name could matter.
    pub sniff_timeout: Duration,
    /// Accepting pauses while a worker holds this many connections.
    pub max_connections_per_worker: usize,
    /// Pipe buffer per direction per connection (bounded memory per connection).
    pub pipe_size: usize,
    /// What a bulk transfer's pipe grows to (at most 16 such pipes per
    /// worker); `pipe_size` or less turns growing off.
    pub pipe_max_size: usize,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: Vec::new(),
            workers: std::thread::available_parallelism().map_or(1, |n| n.get()),
            driver: Driver::Auto,
            accept: Accept::Auto,
            mark: 0,
            connect_timeout: Duration::from_secs(5),
            idle_timeout: Duration::from_secs(3600),
            sniff_timeout: Duration::from_millis(500),
            max_connections_per_worker: 16_384,
            pipe_size: 64 * 1024,
            pipe_max_size: 1024 * 1024,
        }
    }
}

/// What the control plane shares with the data plane.
#[derive(Clone)]
pub struct Shared {
    /// The current policy; a reload swaps it, connections keep the one they started with.
    pub policy: Arc<ArcSwap<Snapshot>>,
    pub names: Arc<NameTable>,
    /// Called once per connection when it ends (metrics, logs).
    pub report: Arc<dyn Fn(&ConnReport) + Send + Sync>,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared").field("names", &self.names.len()).finish_non_exhaustive()
    }
}
