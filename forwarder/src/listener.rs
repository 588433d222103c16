//! Listening sockets: per address either one socket every worker accepts
//! from, or one per worker with `SO_REUSEPORT` so the kernel spreads
//! connections across workers (see [`Accept`](crate::Accept)).

use std::io;
use std::net::SocketAddr;

use socket2::{Domain, Protocol, Socket, Type};

use crate::{Intercept, Listen};

/// What both sockets of a spliced connection need: `TCP_NODELAY`, so that
/// spliced bytes go on as they come instead of waiting for the peer to
/// acknowledge the last ones (an answer written in two pieces waited out the
/// client's delayed ACK, ~40 ms per exchange on a keep-alive connection);
/// urgent data in line, so that the splice loop sees a lone urgent byte and
/// can pass it on (`splice::Link::cross_urgent_mark`). Set on the listener
/// (inherited by accepted sockets) and on each upstream socket.
pub(crate) fn spliced_options(socket: &Socket) -> io::Result<()> {
    socket.set_tcp_nodelay(true)?;
    socket.set_out_of_band_inline(true)
}

/// Binds one listener. For port 0 the first worker's bind picks the port
/// and the others reuse it (`SO_REUSEPORT` on the same address).
pub(crate) fn bind(listen: &Listen, addr: SocketAddr) -> io::Result<std::net::TcpListener> {
    let domain = if addr.is_ipv6() { Domain::IPV6 } else { Domain::IPV4 };
    let socket = Socket::new(domain, Type::STREAM.nonblocking().cloexec(), Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    if addr.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    if listen.intercept == Intercept::Tproxy {
        // Accept connections addressed to any IP (nftables tproxy); needs CAP_NET_ADMIN.
        if addr.is_ipv6() { socket.set_ip_transparent_v6(true) } else { socket.set_ip_transparent_v4(true) }
            .map_err(|e| io::Error::new(e.kind(), format!("IP_TRANSPARENT on {addr} (needs CAP_NET_ADMIN): {e}")))?;
    }
    // Accepted sockets inherit them: no call per connection.
    spliced_options(&socket)?;
    socket.bind(&addr.into()).map_err(|e| io::Error::new(e.kind(), format!("bind {addr}: {e}")))?;
    socket.listen(4096)?;
    Ok(socket.into())
}
