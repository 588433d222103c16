//! The `dns-relay` target: the floor under every DNS forwarder on this
//! machine. A bare UDP relay in this process — one thread reads queries and
//! sends them upstream, one reads answers and sends them back, with blocking
//! `recv_from`/`send_to` and a table of client addresses by query ID —
//! that parses nothing, checks nothing and learns nothing. What it adds to
//! `dns-direct`'s latency is what two more wake-ups and four more syscalls
//! cost here; no forwarder (sluice, dnsdist) can add less, so it shows how
//! much of a proxy's added latency is its own.

use std::io::ErrorKind;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::{Context, Result};

use crate::ns::Netns;

/// Where the relay listens, inside the namespace.
pub(crate) const RELAY: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::LOCALHOST, 5303);
/// Its two threads' names start with this: their CPU is the relay's.
pub(crate) const RELAY_THREAD: &str = "dns-relay";
/// How often a blocked receive looks at the stop flag.
const STOP_POLL: Duration = Duration::from_millis(100);

/// Who asked each relayed query: the client and its own query ID, by the ID
/// the relay gave the query upstream.
type Clients = Mutex<Vec<Option<(SocketAddr, [u8; 2])>>>;

/// The running relay; its threads stop on drop.
pub(crate) struct Relay {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl Relay {
    /// Binds [`RELAY`] and a socket connected to `upstream` in the namespace, and starts both threads.
    pub(crate) fn start(ns: &Netns, upstream: SocketAddr) -> Result<Relay> {
        let (client, up) = ns.within(move || -> std::io::Result<(UdpSocket, UdpSocket)> {
            let client = UdpSocket::bind(RELAY)?;
            let up = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0))?;
            up.connect(upstream)?;
            Ok((client, up))
        })??;
        for s in [&client, &up] {
            s.set_read_timeout(Some(STOP_POLL))?;
        }
        let (client, up) = (Arc::new(client), Arc::new(up));
        let clients: Arc<Clients> = Arc::new(Mutex::new(vec![None; 1 << 16]));
        let stop = Arc::new(AtomicBool::new(false));
        let queries = {
            let (client, up, clients, stop) = (client.clone(), up.clone(), clients.clone(), stop.clone());
            move || {
                let mut next: u16 = 0;
                relay(&client, &stop, |bytes, from| {
                    next = next.wrapping_add(1);
                    let id = [bytes[0], bytes[1]];
                    clients.lock().unwrap_or_else(PoisonError::into_inner)[usize::from(next)] = Some((from, id));
                    bytes[..2].copy_from_slice(&next.to_be_bytes());
                    let _ = up.send(bytes);
                })
            }
        };
        let answers = {
            let stop = stop.clone();
            move || {
                relay(&up, &stop, |bytes, _| {
                    let ours = usize::from(u16::from_be_bytes([bytes[0], bytes[1]]));
                    let Some((to, id)) = clients.lock().unwrap_or_else(PoisonError::into_inner)[ours] else { return };
                    bytes[..2].copy_from_slice(&id);
                    let _ = client.send_to(bytes, to);
                })
            }
        };
        let mut relay = Relay { stop, threads: Vec::new() };
        for (name, work) in [("in", Box::new(queries) as Box<dyn FnOnce() + Send>), ("up", Box::new(answers))] {
            let thread = std::thread::Builder::new().name(format!("{RELAY_THREAD}-{name}")).spawn(work);
            relay.threads.push(thread.context("starting the relay's threads")?);
        }
        Ok(relay)
    }

    /// Whether a thread has ended (only a panic ends one before drop).
    pub(crate) fn ended(&self) -> bool {
        self.threads.iter().any(|t| t.is_finished())
    }
}

/// Reads datagrams of at least a DNS header from `socket` and hands each to `each` until `stop`.
fn relay(socket: &UdpSocket, stop: &AtomicBool, mut each: impl FnMut(&mut [u8], SocketAddr)) {
    let mut buf = [0u8; 4096];
    while !stop.load(Ordering::Relaxed) {
        match socket.recv_from(&mut buf) {
            Ok((n, from)) if n >= 12 => each(&mut buf[..n], from),
            Ok(_) => {}
            // The read timeout, to look at `stop`.
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            // An ICMP error from the upstream, say: read on, without spinning on one that lasts.
            Err(_) => std::thread::sleep(Duration::from_millis(1)),
        }
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}
