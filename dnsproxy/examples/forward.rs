//! The DNS proxy on its own, for benchmarks and manual tries: a tokio
//! current-thread runtime (as in the daemon), an empty policy (ALLOW_ANY),
//! learning into a NameTable, until killed.
//!
//! ```sh
//! cargo run --release -p sluice-dnsproxy --example forward -- 127.0.0.1:5301 127.0.0.1:5300
//! dig @127.0.0.1 -p 5301 example.com
//! ```
//! Without an upstream argument the nameservers of /etc/resolv.conf are used.

use std::net::SocketAddr;
use std::sync::Arc;

use arc_swap::ArcSwap;
use sluice_dnsproxy::{Config, Shared};
use sluice_policy::{NameTable, Snapshot};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let usage = "usage: forward LISTEN_ADDR [UPSTREAM_ADDR...]";
    let listen: SocketAddr = args.next().ok_or(usage)?.parse()?;
    let upstreams = args.map(|a| a.parse()).collect::<Result<Vec<SocketAddr>, _>>()?;
    let config = Config { upstreams, ..Config::default() };
    let shared =
        Shared { policy: Arc::new(ArcSwap::from_pointee(Snapshot::empty())), names: Arc::new(NameTable::new(100_000)) };
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    runtime.block_on(async move {
        let udp = tokio::net::UdpSocket::bind(listen).await?;
        let tcp = tokio::net::TcpListener::bind(listen).await?;
        eprintln!("sluice dnsproxy listening on {listen} (udp, tcp)");
        sluice_dnsproxy::serve(config, shared, vec![udp], vec![tcp], std::future::pending()).await?;
        Ok(())
    })
}
