//! Test scaffolding: a network namespace made (and removed) by the test,
//! real nftables rules in it, and the forwarder started inside it.
#![allow(dead_code, unreachable_pub, clippy::unwrap_used)]

use std::net::{IpAddr, SocketAddr};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use arc_swap::ArcSwap;
use sluice_forwarder::{Config, ConnReport, Driver, Handle, Intercept, Listen, Shared};
use sluice_policy::{NameTable, Snapshot, SourceFile, load_sources};

/// A network namespace that exists for the life of the value.
pub struct Netns {
    pub name: String,
    /// The test-host network inside it: `198.18.N.0/24`, `2001:db8:N::/64`.
    pub n: u8,
}

static COUNTER: AtomicUsize = AtomicUsize::new(0);

pub fn run(cmd: &str) {
    let out = Command::new("sh").arg("-c").arg(cmd).output().unwrap();
    assert!(out.status.success(), "{cmd}: {}", String::from_utf8_lossy(&out.stderr));
}

impl Netns {
    /// A namespace with `lo` up, holding the test hosts 198.18.N.1-9 and
    /// 2001:db8:N::1-9 as local addresses (on `lo`: no dummy module needed).
    pub fn new() -> Netns {
        let k = COUNTER.fetch_add(1, Ordering::Relaxed);
        let n = 100 + ((std::process::id() as usize + k * 7) % 100) as u8;
        let name = format!("sluice-t{}-{k}", std::process::id());
        run(&format!("ip netns add {name}"));
        let ns = Netns { name, n };
        ns.exec("ip link set lo up");
        for h in 1..=9 {
            ns.exec(&format!("ip addr add 198.18.{n}.{h}/32 dev lo"));
            ns.exec(&format!("ip -6 addr add 2001:db8:{n}::{h}/128 dev lo nodad"));
        }
        ns
    }

    pub fn exec(&self, cmd: &str) {
        run(&format!("ip netns exec {} sh -c '{}'", self.name, cmd.replace('\'', "'\\''")));
    }

    /// Caps the namespace's TCP buffers at 256 KiB a socket (they autotune to
    /// 32 MiB by default): a test that needs bytes to stay stuck somewhere, or
    /// bounds what the path can hold, knows how much the kernel takes.
    pub fn small_socket_buffers(&self) {
        self.exec("sysctl -qw net.ipv4.tcp_rmem='4096 65536 262144' net.ipv4.tcp_wmem='4096 16384 262144'");
    }

    pub fn nft(&self, ruleset: &str) {
        let path = std::env::temp_dir().join(format!("{}.nft", self.name));
        std::fs::write(&path, ruleset).unwrap();
        self.exec(&format!("nft -f {}", path.display()));
        let _ = std::fs::remove_file(path);
    }

    pub fn v4(&self, host: u8) -> IpAddr {
        format!("198.18.{}.{host}", self.n).parse().unwrap()
    }

    pub fn v6(&self, host: u8) -> IpAddr {
        format!("2001:db8:{}::{host}", self.n).parse().unwrap()
    }

    /// Runs `f` on a new thread inside the namespace; threads it spawns stay there.
    pub fn spawn<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> std::thread::JoinHandle<T> {
        let path = format!("/var/run/netns/{}", self.name);
        std::thread::spawn(move || {
            let fd = std::fs::File::open(&path).unwrap();
            nix::sched::setns(&fd, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
            f()
        })
    }

    /// Runs `f` inside the namespace and waits for it.
    pub fn within<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        self.spawn(f).join().unwrap()
    }

    /// A server on `dst` and a client connected to it from the namespace
    /// (through the forwarder once [`redirect_to`](Self::redirect_to) is
    /// in place): (client, server).
    pub fn connected(&self, dst: SocketAddr) -> (std::net::TcpStream, std::net::TcpStream) {
        let l = self.within(move || std::net::TcpListener::bind(dst).unwrap());
        let c = self.within(move || std::net::TcpStream::connect(dst).unwrap());
        let (s, _) = l.accept().unwrap();
        (c, s)
    }

    /// A server on `dst` (bound in the namespace before this returns, so a
    /// client can connect at once) running `f` on its listener in a thread.
    pub fn serve<T: Send + 'static>(
        &self,
        dst: SocketAddr,
        f: impl FnOnce(std::net::TcpListener) -> T + Send + 'static,
    ) -> std::thread::JoinHandle<T> {
        let l = self.within(move || std::net::TcpListener::bind(dst).unwrap());
        std::thread::spawn(move || f(l))
    }

    /// REDIRECT every TCP connection to the test hosts (any port) to the
    /// forwarder on `port`, except the forwarder's own (marked) ones.
    pub fn redirect_to(&self, fwd: &Fwd) {
        let (n, mark) = (self.n, MARK);
        let port = fwd.handle.as_ref().map_or(0, |h| h.local_addrs[0].port());
        let port6 = fwd.handle.as_ref().map_or(0, |h| h.local_addrs[1].port());
        self.nft(&format!(
            "table inet sluice_test {{
  chain out {{
    type nat hook output priority -100;
    meta mark {mark} return
    ip daddr 198.18.{n}.0/24 tcp dport != {port} redirect to :{port}
    ip6 daddr 2001:db8:{n}::/64 tcp dport != {port6} redirect to :{port6}
  }}
}}"
        ));
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.name]).status();
    }
}

pub const MARK: u32 = 0x5_1ce;

/// Policy from YAML text (one file).
pub fn policy(yaml: &str) -> Snapshot {
    let files = [SourceFile { path: std::path::Path::new("test.yaml").into(), bytes: yaml.as_bytes().to_vec() }];
    Snapshot::compile(&load_sources(&files).unwrap_or_else(|e| panic!("{e}")))
}

pub const ALLOW_ANY: &str = "";

/// A running forwarder and what it reported.
pub struct Fwd {
    pub handle: Option<Handle>,
    pub reports: Arc<std::sync::Mutex<Vec<ConnReport>>>,
    pub names: Arc<NameTable>,
    pub policy: Arc<ArcSwap<Snapshot>>,
    pub addr: SocketAddr,
}

impl Fwd {
    /// Starts the forwarder inside `ns` on 127.0.0.1:0 and [::1]:0 (REDIRECT).
    pub fn start(ns: &Netns, driver: Driver, yaml: &str, tweak: impl FnOnce(&mut Config)) -> Fwd {
        let mut config = Config {
            listen: vec![
                Listen { addr: "127.0.0.1:0".parse().unwrap(), intercept: Intercept::Redirect },
                Listen { addr: "[::1]:0".parse().unwrap(), intercept: Intercept::Redirect },
            ],
            workers: 2,
            driver,
            mark: MARK,
            ..Config::default()
        };
        tweak(&mut config);
        let workers = config.workers;
        let reports = Arc::new(std::sync::Mutex::new(Vec::new()));
        let names = Arc::new(NameTable::new(10_000));
        let policy = Arc::new(ArcSwap::from_pointee(policy(yaml)));
        let sink = reports.clone();
        let shared = Shared {
            policy: policy.clone(),
            names: names.clone(),
            report: Arc::new(move |r: &ConnReport| sink.lock().unwrap().push(r.clone())),
        };
        let handle = ns.within(move || sluice_forwarder::start(config, shared)).unwrap();
        let addr = handle.local_addrs[0];
        assert_eq!(handle.drivers.len(), workers);
        let expect = match driver {
            Driver::Epoll => "epoll",
            _ => "io_uring",
        };
        assert!(handle.drivers.iter().all(|d| *d == expect), "{:?}", handle.drivers);
        Fwd { handle: Some(handle), reports, names, policy, addr }
    }

    /// Waits until `n` connections have been reported (bounded).
    pub fn wait_reports(&self, n: usize) -> Vec<ConnReport> {
        for _ in 0..500 {
            {
                let r = self.reports.lock().unwrap();
                if r.len() >= n {
                    return r.clone();
                }
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        panic!("only {} of {n} connections reported", self.reports.lock().unwrap().len());
    }
}

impl Drop for Fwd {
    fn drop(&mut self) {
        if let Some(h) = self.handle.take() {
            h.shutdown(Duration::ZERO);
        }
    }
}

/// Both drivers, for every data-plane test.
pub const DRIVERS: [Driver; 2] = [Driver::Uring, Driver::Epoll];

/// Deterministic pseudo-random bytes (xorshift), chunk by chunk.
pub struct Bytes(u64);

impl Bytes {
    pub fn new(seed: u64) -> Bytes {
        Bytes(seed | 1)
    }

    pub fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            let b = self.0.to_le_bytes();
            chunk.copy_from_slice(&b[..chunk.len()]);
        }
    }
}
