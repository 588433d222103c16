//! Every socket operation of the proxy that is not plain tokio, in one place.
//!
//! Upstream sockets are made with socket2 so that `SO_MARK` is set before the
//! first packet leaves (the node's nftables rules return on that mark instead
//! of redirecting the proxy's own queries back to itself), then handed to
//! tokio. The client-facing UDP path receives in batches (`recvmmsg`) with
//! the address each datagram was sent to (`IP_PKTINFO`/`IPV6_PKTINFO`), and
//! answers from that same address, so a socket bound to the wildcard address
//! answers from the address the client asked. All through nix and socket2's
//! safe wrappers: no `unsafe` here.
//!
//! Kernel minimums: `SO_MARK` 2.6.25 and CAP_NET_ADMIN (a mark of 0 leaves
//! the option unset and needs no capability); `recvmmsg` 2.6.33.

use std::io::{self, IoSlice, IoSliceMut};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::AsRawFd;
use std::time::Duration;

use nix::sys::socket::{
    ControlMessage, ControlMessageOwned, MsgFlags, MultiHeaders, SockaddrStorage, recvmmsg, setsockopt, sockopt,
};
use smallvec::SmallVec;
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
pub(crate) fn udp_connected(upstream: SocketAddr, mark: u32) -> io::Result<std::net::UdpSocket> {
    let socket = new_socket(upstream, Type::DGRAM, Protocol::UDP, mark)?;
    socket.bind(&SockAddr::from(unspecified(upstream)))?;
    socket.connect(&SockAddr::from(upstream))?;
    Ok(socket.into())
}

/// An unconnected UDP socket bound to `local` (for hickory-resolver, which
/// sends with `send_to`).
pub(crate) fn udp_bound(local: SocketAddr, mark: u32) -> io::Result<tokio::net::UdpSocket> {
    let socket = new_socket(local, Type::DGRAM, Protocol::UDP, mark)?;
    socket.bind(&SockAddr::from(local))?;
    tokio::net::UdpSocket::from_std(socket.into())
}

/// Where a datagram arrived: the local address the client sent it to and the
/// interface, so that the answer leaves from that address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Arrival {
    pub(crate) ip: IpAddr,
    ifindex: u32,
}

/// Asks the kernel to tell, for every datagram `socket` receives, which
/// local address it was sent to (read by [`Batch::recv`]).
pub(crate) fn want_arrival(socket: &std::net::UdpSocket) -> io::Result<()> {
    let done = if socket.local_addr()?.is_ipv4() {
        setsockopt(socket, sockopt::Ipv4PacketInfo, &true)
    } else {
        // On a dual-stack socket this covers IPv4 too (as v4-mapped addresses).
        setsockopt(socket, sockopt::Ipv6RecvPacketInfo, &true)
    };
    done.map_err(io::Error::from)
}

/// Wakes a thread blocked receiving on `socket` (its receive returns zero
/// datagrams): `shutdown(SHUT_RD)`, which Linux applies to a UDP socket
/// even when it is not connected (and then reports `ENOTCONN`).
pub(crate) fn wake_receiver(socket: &std::net::UdpSocket) {
    let _ = socket2::SockRef::from(socket).shutdown(std::net::Shutdown::Read);
}

/// One received datagram of a [`Batch`].
#[derive(Debug, Clone, Copy)]
pub(crate) struct Datagram {
    /// Its receive slot in the batch.
    slot: usize,
    pub(crate) len: usize,
    pub(crate) from: SocketAddr,
    pub(crate) to: Option<Arrival>,
    /// Longer than the slot: only the first `len` bytes are here.
    pub(crate) truncated: bool,
}

/// Most datagrams one [`Batch::recv`] takes in one system call.
pub(crate) const BATCH: usize = 32;

/// Receive buffers for up to [`BATCH`] datagrams of up to `slot` bytes each,
/// filled by one `recvmmsg` call. Reused: nothing is allocated per receive.
pub(crate) struct Batch {
    headers: MultiHeaders<SockaddrStorage>,
    slot: usize,
    bufs: Box<[u8]>,
    got: SmallVec<[Datagram; BATCH]>,
}

impl std::fmt::Debug for Batch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Batch").field("slot", &self.slot).field("got", &self.got.len()).finish_non_exhaustive()
    }
}

impl Batch {
    pub(crate) fn new(slot: usize) -> Self {
        let cmsg = nix::cmsg_space!(libc::in6_pktinfo);
        Batch {
            headers: MultiHeaders::preallocate(BATCH, Some(cmsg)),
            slot,
            bufs: vec![0; slot * BATCH].into_boxed_slice(),
            got: SmallVec::new(),
        }
    }

    /// Waits (on a blocking socket) for the first datagram on `socket`, then
    /// takes it and whatever else is waiting, at most [`BATCH`] in all
    /// (`MSG_WAITFORONE`). Returns how many were received — zero: the socket
    /// was shut down; [`get`](Self::get) has those with a source address.
    pub(crate) fn recv(&mut self, socket: &impl AsRawFd) -> io::Result<usize> {
        self.got.clear();
        // An array (no Drop), as recvmmsg borrows the slices for as long as the headers.
        let mut chunks = self.bufs.chunks_mut(self.slot);
        let mut slices: [[IoSliceMut<'_>; 1]; BATCH] =
            std::array::from_fn(|_| [IoSliceMut::new(chunks.next().unwrap_or_default())]);
        let received = recvmmsg(
            socket.as_raw_fd(),
            &mut self.headers,
            slices.iter_mut(),
            MsgFlags::MSG_WAITFORONE | MsgFlags::MSG_TRUNC,
            None,
        )
        .map_err(io::Error::from)?;
        let mut count = 0;
        for (slot, msg) in received.enumerate() {
            count += 1;
            let Some(from) = msg.address.as_ref().and_then(socket_addr) else { continue };
            let to = msg.cmsgs().ok().and_then(|mut cmsgs| {
                cmsgs.find_map(|c| match c {
                    ControlMessageOwned::Ipv4PacketInfo(i) => Some(Arrival {
                        ip: IpAddr::V4(Ipv4Addr::from(u32::from_be(i.ipi_addr.s_addr))),
                        ifindex: u32::try_from(i.ipi_ifindex).unwrap_or(0),
                    }),
                    ControlMessageOwned::Ipv6PacketInfo(i) => {
                        Some(Arrival { ip: IpAddr::V6(Ipv6Addr::from(i.ipi6_addr.s6_addr)), ifindex: i.ipi6_ifindex })
                    }
                    _ => None,
                })
            });
            // With MSG_TRUNC, `bytes` is the datagram's real length.
            let truncated = msg.bytes > self.slot || msg.flags.contains(MsgFlags::MSG_TRUNC);
            self.got.push(Datagram { slot, len: msg.bytes.min(self.slot), from, to, truncated });
        }
        Ok(count)
    }

    /// The `i`th datagram with a source address of the last [`recv`](Self::recv)
    /// (each in its own slot: one skipped does not shift the others' bytes).
    pub(crate) fn get(&self, i: usize) -> Option<(&[u8], Datagram)> {
        let d = *self.got.get(i)?;
        let start = d.slot * self.slot;
        Some((self.bufs.get(start..start + d.len)?, d))
    }
}

fn socket_addr(a: &SockaddrStorage) -> Option<SocketAddr> {
    if let Some(v4) = a.as_sockaddr_in() {
        return Some(SocketAddr::V4(SocketAddrV4::from(*v4)));
    }
    a.as_sockaddr_in6().map(|v6| SocketAddr::V6(SocketAddrV6::from(*v6)))
}

/// Sends every message of `msgs` (bytes, and the destination unless the
/// socket is connected) without blocking, with one `sendmmsg` per
/// [`BATCH`], all from `from`: the address the queries arrived on, for a
/// socket bound to a wildcard address. `unsent` hears of each message that
/// could not go (a full socket buffer, an error) with its index and why.
pub(crate) fn send_all(
    socket: &impl AsRawFd,
    msgs: &[(&[u8], Option<SocketAddr>)],
    from: Option<Arrival>,
    mut unsent: impl FnMut(usize, io::Error),
) {
    let mut done = 0;
    while done < msgs.len() {
        match send_many(socket, &msgs[done..], from) {
            Ok(n) => done += n.max(1),
            Err(error) => {
                unsent(done, error);
                done += 1;
            }
        }
    }
}

/// One pass of [`send_all`]: how many went out before a full socket buffer
/// or an error stopped it (the error only when the very first message failed).
fn send_many(socket: &impl AsRawFd, msgs: &[(&[u8], Option<SocketAddr>)], from: Option<Arrival>) -> io::Result<usize> {
    let v4 = match from {
        Some(Arrival { ip: IpAddr::V4(ip), .. }) => Some(libc::in_pktinfo {
            ipi_ifindex: 0,
            ipi_spec_dst: libc::in_addr { s_addr: u32::from(ip).to_be() },
            ipi_addr: libc::in_addr { s_addr: 0 },
        }),
        _ => None,
    };
    let v6 = match from {
        Some(Arrival { ip: IpAddr::V6(ip), ifindex }) => {
            Some(libc::in6_pktinfo { ipi6_addr: libc::in6_addr { s6_addr: ip.octets() }, ipi6_ifindex: ifindex })
        }
        _ => None,
    };
    let mut sent = 0;
    for chunk in msgs.chunks(BATCH) {
        let cmsg: Option<ControlMessage<'_>> =
            v4.as_ref().map(ControlMessage::Ipv4PacketInfo).or_else(|| v6.as_ref().map(ControlMessage::Ipv6PacketInfo));
        // An array (no Drop), as sendmmsg borrows the slices for as long as the headers.
        let iovs: [[IoSlice<'_>; 1]; BATCH] =
            std::array::from_fn(|i| [IoSlice::new(chunk.get(i).map_or(&[][..], |m| m.0))]);
        // Only as many addresses as messages (usually one): a socket address
        // is 128 bytes, and filling BATCH of them cost ~3,700 instructions
        // per query, a fifth of the proxy's user-space work (callgrind).
        let addrs: SmallVec<[Option<SockaddrStorage>; 4]> = chunk.iter().map(|m| m.1.map(storage)).collect();
        let iovs = &iovs[..chunk.len()];
        let done = SEND_HEADERS.with(|cached| {
            let mut cached = cached.borrow_mut();
            let headers = cached[usize::from(cmsg.is_some())].get_or_insert_with(|| {
                // Without a control message there must be no control buffer (an empty one is EINVAL).
                let space = cmsg.is_some().then(|| nix::cmsg_space!(libc::in6_pktinfo));
                MultiHeaders::preallocate(BATCH, space)
            });
            let flags = MsgFlags::MSG_DONTWAIT;
            // sendmmsg sends as many as the shortest of slices, addresses and headers.
            nix::sys::socket::sendmmsg(socket.as_raw_fd(), headers, iovs, &addrs, cmsg.as_slice(), flags)
                .map(|results| results.count())
        });
        match done {
            Ok(n) => {
                sent += n;
                if n < chunk.len() {
                    break;
                }
            }
            Err(e) if sent == 0 => return Err(e.into()),
            Err(_) => break,
        }
    }
    Ok(sent)
}

thread_local! {
    /// sendmmsg's headers for [`BATCH`] datagrams, made once per thread
    /// (each send made them anew: two allocations, four with a control
    /// message; callgrind counted two per send at 2,000 q/s): without a control
    /// message, and with room for one packet-info message. sendmmsg sets
    /// every field it uses on each call.
    static SEND_HEADERS: std::cell::RefCell<[Option<MultiHeaders<SockaddrStorage>>; 2]> =
        const { std::cell::RefCell::new([None, None]) };
}

fn storage(a: SocketAddr) -> SockaddrStorage {
    match a {
        SocketAddr::V4(v4) => SockaddrStorage::from(v4),
        SocketAddr::V6(v6) => SockaddrStorage::from(v6),
    }
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
        // Failed, not skipped (a skip reads as a pass): the suite runs as root.
        assert!(is_root(), "SO_MARK needs CAP_NET_ADMIN: run the tests as root, as the README says");
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
