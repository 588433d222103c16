//! Every upstream socket the proxy opens, in one place.
//!
//! Sockets are made with socket2 so that `SO_MARK` is set before the first
//! packet leaves (the node's nftables rules return on that mark instead of
//! redirecting the proxy's own queries back to itself), then handed to tokio.
//! No `unsafe` is needed: socket2 wraps the option safely.
//!
//! Kernel minimums: `SO_MARK` 2.6.25 and CAP_NET_ADMIN (a mark of 0 leaves
//! the option unset and needs no capability).

use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use socket2::{Domain, Protocol, SockAddr, Socket, Type};

fn new_socket(peer: SocketAddr, ty: Type, proto: Protocol, mark: u32) -> io::Result<Socket> {
    let socket = Socket::new(Domain::for_address(peer), ty, Some(proto))?;
    if mark != 0 {
        socket.set_mark(mark)?;
    }
    socket.set_nonblocking(true)?;
    Ok(socket)
}

fn unspecified(like: SocketAddr) -> SocketAddr {
    match like {
        SocketAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
        SocketAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, 0).into(),
    }
}

/// A UDP socket on an ephemeral port, connected to `upstream`: the kernel
/// drops datagrams from anyone else, and an ICMP port-unreachable shows up
/// as `ConnectionRefused` on the next receive (fast failover).
pub(crate) fn udp_connected(upstream: SocketAddr, mark: u32) -> io::Result<tokio::net::UdpSocket> {
    let socket = new_socket(upstream, Type::DGRAM, Protocol::UDP, mark)?;
    socket.bind(&SockAddr::from(unspecified(upstream)))?;
    socket.connect(&SockAddr::from(upstream))?;
    tokio::net::UdpSocket::from_std(socket.into())
}

/// An unconnected UDP socket bound to `local` (for hickory-resolver, which
/// sends with `send_to`).
pub(crate) fn udp_bound(local: SocketAddr, mark: u32) -> io::Result<tokio::net::UdpSocket> {
    let socket = new_socket(local, Type::DGRAM, Protocol::UDP, mark)?;
    socket.bind(&SockAddr::from(local))?;
    tokio::net::UdpSocket::from_std(socket.into())
}

/// A TCP connection to `upstream`, marked before the SYN, within `timeout`.
pub(crate) async fn tcp_connect(
    upstream: SocketAddr,
    bind: Option<SocketAddr>,
    mark: u32,
    timeout: Duration,
) -> io::Result<tokio::net::TcpStream> {
    let socket = new_socket(upstream, Type::STREAM, Protocol::TCP, mark)?;
    socket.set_tcp_nodelay(true)?;
    if let Some(bind) = bind {
        socket.bind(&SockAddr::from(bind))?;
    }
    let socket = tokio::net::TcpSocket::from_std_stream(socket.into());
    match tokio::time::timeout(timeout, socket.connect(upstream)).await {
        Ok(r) => r,
        Err(_) => Err(io::Error::new(io::ErrorKind::TimedOut, "TCP connect to the upstream timed out")),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn is_root() -> bool {
        std::fs::read_to_string("/proc/self/status")
            .map(|s| s.lines().any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(1) == Some("0")))
            .unwrap_or(false)
    }

    #[tokio::test]
    async fn upstream_sockets_carry_the_mark() {
        if !is_root() {
            eprintln!("skipped: SO_MARK needs CAP_NET_ADMIN");
            return;
        }
        let peer = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let udp = udp_connected(peer.local_addr().unwrap(), 0x5_1ce).unwrap();
        assert_eq!(socket2::SockRef::from(&udp).mark().unwrap(), 0x5_1ce);
        let bound = udp_bound("127.0.0.1:0".parse().unwrap(), 7).unwrap();
        assert_eq!(socket2::SockRef::from(&bound).mark().unwrap(), 7);

        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let tcp = tcp_connect(listener.local_addr().unwrap(), None, 0x5_1ce, Duration::from_secs(2)).await.unwrap();
        assert_eq!(socket2::SockRef::from(&tcp).mark().unwrap(), 0x5_1ce);
    }

    #[tokio::test]
    async fn mark_zero_leaves_the_socket_unmarked() {
        let peer = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let udp = udp_connected(peer.local_addr().unwrap(), 0).unwrap();
        assert_eq!(socket2::SockRef::from(&udp).mark().unwrap_or(0), 0);
    }
}
