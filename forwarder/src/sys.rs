//! Every socket and pipe system call the forwarder makes outside monoio, in
//! one place. The only `unsafe` of the crate is here: monoio's streams expose
//! a raw fd but not `AsFd`, so we borrow it for the duration of a call while
//! the stream (its owner) is alive.
//!
//! Kernel minimums: `splice(2)` between a TCP socket and a pipe (2.6.17),
//! `SO_ORIGINAL_DST` (netfilter NAT), `IP6T_SO_ORIGINAL_DST` (3.7),
//! `IP_TRANSPARENT` (2.6.28, needs CAP_NET_ADMIN), `SO_MARK` (2.6.25, needs
//! CAP_NET_ADMIN), `F_SETPIPE_SZ` (2.6.35).
#![allow(unsafe_code)]

use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd};

use nix::errno::Errno;
use nix::fcntl::{FcntlArg, OFlag, SpliceFFlags};
use nix::sys::socket::{Shutdown, getsockopt, sockopt};

/// Borrows the fd of something that owns it, for one call.
fn borrow<S: AsRawFd>(s: &S) -> BorrowedFd<'_> {
    // SAFETY: `s` owns the fd and outlives the returned borrow (same lifetime).
    unsafe { BorrowedFd::borrow_raw(s.as_raw_fd()) }
}

fn io_err(e: Errno) -> io::Error {
    io::Error::from_raw_os_error(e as i32)
}

/// The destination the client dialed before nftables REDIRECT rewrote it
/// (conntrack's original tuple). Fails with ENOENT when the connection was
/// not NATed at all — nobody redirected it.
pub(crate) fn original_dst<S: AsRawFd>(stream: &S, v6: bool) -> io::Result<SocketAddr> {
    let fd = borrow(stream);
    if v6 {
        let sa = getsockopt(&fd, sockopt::Ip6tOriginalDst).map_err(io_err)?;
        let ip = Ipv6Addr::from(sa.sin6_addr.s6_addr);
        Ok(SocketAddr::V6(SocketAddrV6::new(ip, u16::from_be(sa.sin6_port), 0, sa.sin6_scope_id)))
    } else {
        let sa = getsockopt(&fd, sockopt::OriginalDst).map_err(io_err)?;
        let ip = Ipv4Addr::from(u32::from_be(sa.sin_addr.s_addr));
        Ok(SocketAddr::V4(SocketAddrV4::new(ip, u16::from_be(sa.sin_port))))
    }
}

/// A socket option view of a monoio stream (linger, errors, keepalive).
pub(crate) fn with_sock<S: AsRawFd, R>(stream: &S, f: impl FnOnce(socket2::SockRef<'_>) -> R) -> R {
    let fd = borrow(stream);
    f(socket2::SockRef::from(&fd))
}

/// An accepted socket made non-blocking and close-on-exec (io_uring's
/// accept, as monoio issues it, sets neither flag).
/// `splice(2)`'s `SPLICE_F_NONBLOCK` only covers the pipe: the socket must
/// be non-blocking itself, or a splice waits for data with the worker stuck.
/// `ioctl`s (`FIONBIO`, `FIOCLEX`) rather than socket2's `fcntl`
/// get-then-set pairs: this runs once per connection accepted on io_uring.
pub(crate) fn prepare_accepted<S: AsRawFd>(stream: &S) -> io::Result<()> {
    let on: nix::libc::c_int = 1;
    // SAFETY: FIONBIO reads one c_int through the pointer, which outlives the
    // call; the fd is owned by `stream`, alive for the call.
    let r = unsafe { nix::libc::ioctl(stream.as_raw_fd(), nix::libc::FIONBIO, &on) };
    if r == -1 {
        return Err(io::Error::last_os_error());
    }
    // Close-on-exec too (io_uring's accept sets neither flag): a child sluice
    // starts while connections are open (`nft` at exit) must not hold them open.
    // SAFETY: FIOCLEX takes no argument; the fd is owned by `stream`, alive for the call.
    let r = unsafe { nix::libc::ioctl(stream.as_raw_fd(), nix::libc::FIOCLEX) };
    if r == -1 { Err(io::Error::last_os_error()) } else { Ok(()) }
}

/// Make the next close send a RST instead of a FIN (SO_LINGER 0).
pub(crate) fn reset_on_close<S: AsRawFd>(stream: &S) {
    let _ = with_sock(stream, |s| s.set_linger(Some(std::time::Duration::ZERO)));
}

/// EMFILE, ENFILE, ENOBUFS, ENOMEM: the process or the node is short of
/// descriptors or memory; retrying at once would spin, so callers back off.
pub(crate) fn is_resource_exhaustion(e: &io::Error) -> bool {
    use nix::libc::{EMFILE, ENFILE, ENOBUFS, ENOMEM};
    matches!(e.raw_os_error(), Some(EMFILE | ENFILE | ENOBUFS | ENOMEM))
}

/// Opening an upstream connection failed for want of something of this
/// node's own: descriptors, memory ([`is_resource_exhaustion`]), or a local
/// port (`EADDRNOTAVAIL`: every ephemeral port to that destination in use).
pub(crate) fn is_local_shortage(e: &io::Error) -> bool {
    is_resource_exhaustion(e) || e.raw_os_error() == Some(nix::libc::EADDRNOTAVAIL)
}

/// Accept errors that concern one connection, after which the next accept
/// may succeed at once: it was aborted or reset while queued, a signal, a
/// firewall rule (`EPERM`), or one of the network errors Linux passes on
/// from the new socket (accept(2)). Any other error would come back at once
/// again (on epoll the listener stays ready): callers back off.
pub(crate) fn is_per_connection_accept_error(e: &io::Error) -> bool {
    use nix::libc::{
        ECONNABORTED, ECONNRESET, EHOSTDOWN, EHOSTUNREACH, EINTR, ENETDOWN, ENETUNREACH, ENONET, ENOPROTOOPT,
        EOPNOTSUPP, EPERM, EPROTO, ETIMEDOUT,
    };
    matches!(
        e.raw_os_error(),
        Some(
            ECONNABORTED
                | ECONNRESET
                | EINTR
                | EPERM
                | EPROTO
                | ENOPROTOOPT
                | ENETDOWN
                | ENETUNREACH
                | EHOSTDOWN
                | EHOSTUNREACH
                | ENONET
                | EOPNOTSUPP
                | ETIMEDOUT
        )
    )
}

/// Reads what the socket holds now, without waiting (`WouldBlock` when
/// nothing): for reads whose readiness the runtime already waited for.
pub(crate) fn recv_now<S: AsRawFd>(stream: &S, buf: &mut [u8]) -> io::Result<usize> {
    nix::sys::socket::recv(stream.as_raw_fd(), buf, nix::sys::socket::MsgFlags::MSG_DONTWAIT).map_err(io_err)
}

/// `SIOCATMARK`: asm-generic's number, which most architectures use
/// (powerpc's own header gives the same; s390 has none of its own); alpha,
/// mips, sparc and parisc have their own, and there [`at_urgent_mark`] says no.
const SIOCATMARK: Option<nix::libc::Ioctl> = if cfg!(any(
    target_arch = "x86_64",
    target_arch = "x86",
    target_arch = "aarch64",
    target_arch = "arm",
    target_arch = "riscv64",
    target_arch = "loongarch64",
    target_arch = "powerpc64",
    target_arch = "powerpc",
    target_arch = "s390x"
)) {
    Some(0x8905)
} else {
    None
};

/// Whether the next byte to read from `stream` is TCP urgent data
/// (`SIOCATMARK`): `splice(2)` stops there.
pub(crate) fn at_urgent_mark<S: AsRawFd>(stream: &S) -> bool {
    let Some(request) = SIOCATMARK else { return false };
    let mut at: nix::libc::c_int = 0;
    // SAFETY: SIOCATMARK writes one c_int through the pointer, which outlives
    // the call; the fd is owned by `stream`, alive for the call.
    let r = unsafe { nix::libc::ioctl(stream.as_raw_fd(), request, &mut at) };
    r == 0 && at != 0
}

/// Sends one byte as TCP urgent data, without waiting.
pub(crate) fn send_urgent<S: AsRawFd>(stream: &S, byte: u8) -> io::Result<usize> {
    use nix::sys::socket::MsgFlags;
    let flags = MsgFlags::MSG_OOB | MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_NOSIGNAL;
    nix::sys::socket::send(stream.as_raw_fd(), &[byte], flags).map_err(io_err)
}

pub(crate) fn shutdown<S: AsRawFd>(stream: &S, how: Shutdown) -> io::Result<()> {
    match nix::sys::socket::shutdown(stream.as_raw_fd(), how) {
        Ok(()) | Err(Errno::ENOTCONN) => Ok(()),
        Err(e) => Err(io_err(e)),
    }
}

/// A non-blocking pipe: the buffer `splice(2)` moves bytes through.
#[derive(Debug)]
pub(crate) struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
    /// Its capacity in bytes, as the kernel set it.
    size: usize,
}

/// A new pipe's capacity when nobody resizes it.
const PIPE_DEFAULT: usize = 65_536;

impl Pipe {
    /// `size` is a hint (rounded to pages by the kernel); failure to resize
    /// (e.g. over `/proc/sys/fs/pipe-max-size`) keeps the default 64 KiB.
    pub(crate) fn new(size: usize) -> io::Result<Pipe> {
        let (read, write) = nix::unistd::pipe2(OFlag::O_NONBLOCK | OFlag::O_CLOEXEC).map_err(io_err)?;
        let mut pipe = Pipe { read, write, size: PIPE_DEFAULT };
        if size != PIPE_DEFAULT {
            let _ = pipe.resize(size);
        }
        Ok(pipe)
    }

    /// Bytes it holds when full.
    pub(crate) fn size(&self) -> usize {
        self.size
    }

    /// Sets the capacity (`F_SETPIPE_SZ`; never below the bytes it holds).
    /// Over `/proc/sys/fs/pipe-max-size` without CAP_SYS_RESOURCE, or over
    /// the user's pipe pages, it fails and the pipe keeps its size.
    pub(crate) fn resize(&mut self, size: usize) -> io::Result<()> {
        let want = FcntlArg::F_SETPIPE_SZ(size.try_into().unwrap_or(i32::MAX));
        let got = nix::fcntl::fcntl(&self.write, want).map_err(io_err)?;
        self.size = usize::try_from(got).unwrap_or(self.size);
        Ok(())
    }

    /// Moves up to `len` bytes from the socket into the pipe. `Ok(0)` is EOF.
    pub(crate) fn fill<S: AsRawFd>(&self, from: &S, len: usize) -> io::Result<usize> {
        splice(borrow(from), &self.write, len)
    }

    /// Moves up to `len` bytes from the pipe into the socket.
    pub(crate) fn drain<S: AsRawFd>(&self, to: &S, len: usize) -> io::Result<usize> {
        splice(&self.read, borrow(to), len)
    }
}

fn splice<A: std::os::fd::AsFd, B: std::os::fd::AsFd>(from: A, to: B, len: usize) -> io::Result<usize> {
    let flags = SpliceFFlags::SPLICE_F_NONBLOCK | SpliceFFlags::SPLICE_F_MOVE;
    loop {
        match nix::fcntl::splice(&from, None, &to, None, len, flags) {
            Err(Errno::EINTR) => continue,
            r => return r.map_err(io_err),
        }
    }
}
