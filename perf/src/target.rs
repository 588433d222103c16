//! What the client's connections go through: nothing (direct), the sluice
//! forwarder in this process (io_uring or epoll driver), HAProxy in
//! transparent mode with splice forced, or nginx's stream proxy as a plain
//! port-forward. Each proxy gets the same nftables REDIRECT rule (nginx: the
//! same rule with one listening port per sink port); the client always dials
//! the sink's real address. The DNS targets are started by `dns.rs`.

use std::os::unix::process::CommandExt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use arc_swap::ArcSwap;
use serde::Serialize;
use sluice_forwarder::{Config, ConnOutcome, ConnReport, Driver, Handle, Intercept, Listen, Shared};
use sluice_policy::{NameTable, Snapshot};

use crate::idle::FD_SLACK;
use crate::load;
use crate::ns::{ChildGuard, HAPROXY_UID, MARK, Netns, PORT_BULK, PORT_HOLD, SINK_IP, ScratchDir};
use crate::procfs;
use crate::scenario::{Meter, Params};
use crate::tcp_relay::{TCP_RELAY_THREAD, TcpRelay};

/// HAProxy's listening port inside the namespace.
const HAPROXY_PORT: u16 = 15001;
/// nginx listens on sink port + this (one `server` per sink port: it cannot
/// read the original destination of a REDIRECTed connection).
const NGINX_PORT_OFFSET: u16 = 10100;
/// nginx's stream module, as Debian's `libnginx-mod-stream` installs it.
const NGINX_STREAM_MODULE: &str = "/usr/lib/nginx/modules/ngx_stream_module.so";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub(crate) enum Target {
    #[serde(rename = "direct")]
    Direct,
    #[serde(rename = "sluice-uring")]
    SluiceUring,
    #[serde(rename = "sluice-epoll")]
    SluiceEpoll,
    #[serde(rename = "haproxy")]
    Haproxy,
    #[serde(rename = "nginx")]
    Nginx,
    /// A bare splicing relay in this process (`tcp_relay.rs`), bulk scenarios only: the floor.
    #[serde(rename = "tcp-relay")]
    TcpRelay,
    /// dnsperf straight to the authoritative upstream (nsd).
    #[serde(rename = "dns-direct")]
    DnsDirect,
    /// sluice's DNS proxy in this process, on its own tokio current-thread runtime.
    #[serde(rename = "sluice-dns")]
    SluiceDns,
    /// dnsdist, no packet cache: the reference forwarder.
    #[serde(rename = "dnsdist")]
    Dnsdist,
    /// A bare UDP relay in this process (`dns_relay.rs`): the floor any forwarder pays here.
    #[serde(rename = "dns-relay")]
    DnsRelay,
}

impl Target {
    pub(crate) const ALL: [Target; 10] = [
        Target::Direct,
        Target::SluiceUring,
        Target::SluiceEpoll,
        Target::Haproxy,
        Target::Nginx,
        Target::TcpRelay,
        Target::DnsDirect,
        Target::SluiceDns,
        Target::Dnsdist,
        Target::DnsRelay,
    ];

    pub(crate) fn name(self) -> &'static str {
        match self {
            Target::Direct => "direct",
            Target::SluiceUring => "sluice-uring",
            Target::SluiceEpoll => "sluice-epoll",
            Target::Haproxy => "haproxy",
            Target::Nginx => "nginx",
            Target::TcpRelay => "tcp-relay",
            Target::DnsDirect => "dns-direct",
            Target::SluiceDns => "sluice-dns",
            Target::Dnsdist => "dnsdist",
            Target::DnsRelay => "dns-relay",
        }
    }

    /// The name in the tables: says what kind of proxying it is when that is not transparent.
    pub(crate) fn label(self) -> &'static str {
        match self {
            Target::Nginx => "nginx (port-forward)",
            t => t.name(),
        }
    }

    pub(crate) fn parse(s: &str) -> Option<Target> {
        Target::ALL.into_iter().find(|t| t.name() == s)
    }

    pub(crate) fn is_sluice(self) -> bool {
        matches!(self, Target::SluiceUring | Target::SluiceEpoll)
    }

    /// A proxy running as its own process(es) (measured from outside, not re-executed for idle).
    pub(crate) fn is_foreign(self) -> bool {
        matches!(self, Target::Haproxy | Target::Nginx | Target::Dnsdist)
    }

    /// A DNS target (the DNS scenarios), not a TCP one.
    pub(crate) fn is_dns(self) -> bool {
        matches!(self, Target::DnsDirect | Target::SluiceDns | Target::Dnsdist | Target::DnsRelay)
    }

    /// Why this target cannot run on this machine, if it cannot.
    pub(crate) fn unavailable(self) -> Option<String> {
        let missing = |tools: &[&str]| {
            let absent: Vec<&str> = tools.iter().copied().filter(|t| !installed(t)).collect();
            (!absent.is_empty())
                .then(|| format!("{} not installed (apt-get install -y {})", absent.join(", "), absent.join(" ")))
        };
        match self {
            Target::Haproxy => missing(&["haproxy"]),
            Target::Nginx => nginx_unavailable(),
            Target::DnsDirect | Target::SluiceDns | Target::DnsRelay => missing(&["dnsperf", "nsd"]),
            Target::Dnsdist => missing(&["dnsperf", "nsd", "dnsdist"]),
            Target::Direct | Target::SluiceUring | Target::SluiceEpoll | Target::TcpRelay => None,
        }
    }
}

/// Whether `tool` can be started (it is on the PATH).
fn installed(tool: &str) -> bool {
    std::process::Command::new(tool)
        .arg("-h")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok()
}

enum Proxy {
    None,
    Sluice(Sluice),
    Haproxy(ChildGuard),
    /// nginx's master process (its workers are its children).
    Nginx(ChildGuard),
    TcpRelay(TcpRelay),
}

/// A target set up in the namespace; torn down (proxy stopped, rule removed) on drop.
pub(crate) struct Up<'a> {
    pub(crate) target: Target,
    ns: &'a Netns,
    proxy: Proxy,
}

impl std::fmt::Debug for Up<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Up").field("target", &self.target).finish_non_exhaustive()
    }
}

/// The forwarder in this process, with the policy it reads and a count of
/// the connections it refused by policy (BlackHole).
struct Sluice {
    handle: Option<Handle>,
    policy: Arc<ArcSwap<Snapshot>>,
    refused: Arc<AtomicU64>,
}

impl<'a> Up<'a> {
    /// Starts `target` with `p.workers` threads (forwarder workers, HAProxy
    /// `nbthread`), installs the redirect, and checks one echo goes through it.
    pub(crate) fn start(ns: &'a Netns, target: Target, p: &Params, scratch: Option<&ScratchDir>) -> Result<Up<'a>> {
        let (proxy, port) = match target {
            Target::Direct => (Proxy::None, None),
            Target::SluiceUring | Target::SluiceEpoll => {
                let driver = if target == Target::SluiceUring { Driver::Uring } else { Driver::Epoll };
                let s = start_sluice(ns, driver, p)?;
                let port = s.handle.as_ref().context("forwarder handle")?.local_addrs[0].port();
                (Proxy::Sluice(s), Some(port))
            }
            Target::Haproxy => {
                let scratch = scratch.context("haproxy needs a scratch directory")?;
                (Proxy::Haproxy(start_haproxy(ns, p, scratch)?), Some(HAPROXY_PORT))
            }
            Target::Nginx => {
                let scratch = scratch.context("nginx needs a scratch directory")?;
                (Proxy::Nginx(start_nginx(ns, p, scratch)?), Some(0))
            }
            Target::TcpRelay => {
                let relay = TcpRelay::start(ns)?;
                let port = relay.port;
                (Proxy::TcpRelay(relay), Some(port))
            }
            Target::DnsDirect | Target::SluiceDns | Target::Dnsdist | Target::DnsRelay => {
                bail!("{} is a DNS target", target.name())
            }
        };
        let mut up = Up { target, ns, proxy };
        match port {
            Some(_) if target == Target::Nginx => ns.redirect_offset(NGINX_PORT_OFFSET)?,
            Some(p) => ns.redirect_to(p)?,
            None => drop(ns.clear_redirect()),
        }
        let before = ns.redirected();
        up.probe(scratch)?;
        if port.is_some() && ns.redirected() <= before {
            bail!("{}: the probe connection was not redirected", target.name());
        }
        Ok(up)
    }

    fn probe(&mut self, scratch: Option<&ScratchDir>) -> Result<()> {
        let until = Instant::now() + Duration::from_secs(5);
        loop {
            if let Proxy::Haproxy(c) | Proxy::Nginx(c) = &mut self.proxy
                && let Ok(Some(st)) = c.child.try_wait()
            {
                let name = self.target.name();
                let log = scratch.and_then(|s| std::fs::read_to_string(s.path.join(format!("{name}.log"))).ok());
                let log = log.unwrap_or_default();
                bail!("{name} exited ({st}): {log}");
            }
            if let Proxy::TcpRelay(r) = &self.proxy
                && r.ended()
            {
                bail!("tcp-relay: its accepting thread ended");
            }
            match load::probe(self.ns) {
                Ok(()) => return Ok(()),
                Err(e) if Instant::now() > until => return Err(e.context(format!("probing {}", self.target.name()))),
                Err(_) => std::thread::sleep(Duration::from_millis(50)),
            }
        }
    }

    /// The forwarder's policy (sluice targets): a reload stores a new snapshot here.
    pub(crate) fn policy(&self) -> Option<&Arc<ArcSwap<Snapshot>>> {
        match &self.proxy {
            Proxy::Sluice(s) => Some(&s.policy),
            _ => None,
        }
    }

    /// Connections the forwarder has refused by policy so far (sluice targets).
    pub(crate) fn refused_by_policy(&self) -> u64 {
        match &self.proxy {
            Proxy::Sluice(s) => s.refused.load(Relaxed),
            _ => 0,
        }
    }

    /// The proxy's processes when it is not this one (HAProxy; nginx's master and workers).
    pub(crate) fn proxy_pids(&self) -> Vec<u32> {
        match &self.proxy {
            Proxy::Haproxy(c) => vec![c.pid()],
            Proxy::Nginx(c) => procfs::tree(c.pid()),
            Proxy::None | Proxy::Sluice(_) | Proxy::TcpRelay(_) => Vec::new(),
        }
    }
}

impl Drop for Up<'_> {
    fn drop(&mut self) {
        // Let the last connections finish closing through the proxy first.
        std::thread::sleep(Duration::from_millis(300));
        let _ = self.ns.clear_redirect();
        match &mut self.proxy {
            Proxy::Sluice(s) => {
                if let Some(h) = s.handle.take() {
                    h.shutdown(Duration::ZERO);
                }
            }
            Proxy::Haproxy(_) | Proxy::Nginx(_) | Proxy::TcpRelay(_) | Proxy::None => {}
        }
    }
}

impl Meter for Up<'_> {
    fn proxy_ticks(&self) -> u64 {
        match &self.proxy {
            Proxy::None => 0,
            Proxy::Sluice(_) => procfs::task_ticks("sluice-fwd-"),
            Proxy::Haproxy(c) => procfs::pid_ticks(c.pid()),
            Proxy::Nginx(c) => procfs::tree_ticks(c.pid()),
            Proxy::TcpRelay(_) => procfs::task_ticks(TCP_RELAY_THREAD),
        }
    }

    fn outside_ticks(&self) -> u64 {
        if self.target.is_foreign() { self.proxy_ticks() } else { 0 }
    }
}

/// The forwarder with an ALLOW_ANY policy (the reload scenario replaces it).
fn start_sluice(ns: &Netns, driver: Driver, p: &Params) -> Result<Sluice> {
    let config = Config {
        listen: vec![
            Listen { addr: "127.0.0.1:0".parse()?, intercept: Intercept::Redirect },
            Listen { addr: "[::1]:0".parse()?, intercept: Intercept::Redirect },
        ],
        workers: p.workers,
        driver,
        mark: MARK,
        pipe_size: p.pipe_size,
        pipe_max_size: p.pipe_max_size,
        ..Config::default()
    };
    let policy = Arc::new(ArcSwap::from_pointee(Snapshot::empty()));
    let refused = Arc::new(AtomicU64::new(0));
    let counter = refused.clone();
    let shared = Shared {
        policy: policy.clone(),
        names: Arc::new(NameTable::new(1024)),
        report: Arc::new(move |r: &ConnReport| {
            if matches!(r.outcome, ConnOutcome::Refused502 | ConnOutcome::RefusedReset) {
                counter.fetch_add(1, Relaxed);
            }
        }),
    };
    let h = ns.within(move || sluice_forwarder::start(config, shared))?.context("starting the forwarder")?;
    let want = if driver == Driver::Uring { "io_uring" } else { "epoll" };
    if h.drivers.iter().any(|d| *d != want) {
        let got = h.drivers.clone();
        h.shutdown(Duration::ZERO);
        bail!("forwarder drivers {got:?}, wanted {want}");
    }
    Ok(Sluice { handle: Some(h), policy, refused })
}

/// HAProxy in TCP mode, splice forced both ways, forwarding each REDIRECTed
/// connection to its original destination (`server ... 0.0.0.0`: "the same IP
/// address as the one from the client connection", which behind REDIRECT is
/// conntrack's original destination; no port: the same port). It drops to
/// `HAPROXY_UID`, which the redirect rule lets out. Its descriptor limit
/// (2 × `maxconn` + 2 × `maxpipes`, checked at start) must fit the idle
/// connections under this process's `RLIMIT_NOFILE`, which it inherits: a
/// few pipes suffice, they are pooled and only busy connections hold one.
fn start_haproxy(ns: &Netns, p: &Params, scratch: &ScratchDir) -> Result<ChildGuard> {
    let (threads, pipesize) = (p.workers, p.pipe_size);
    let maxconn = p.idle_conns.max(1000) + 16;
    let cfg = format!(
        "global
    nbthread {threads}
    tune.pipesize {pipesize}
    maxconn {maxconn}
    maxpipes 128
    uid {HAPROXY_UID}
    gid {HAPROXY_UID}
defaults
    mode tcp
    timeout connect 5s
    timeout client 60s
    timeout server 60s
    option splice-request
    option splice-response
listen transparent
    bind 127.0.0.1:{HAPROXY_PORT}
    server original 0.0.0.0
"
    );
    let path = scratch.path.join("haproxy.cfg");
    std::fs::write(&path, cfg)?;
    let log = std::fs::File::create(scratch.path.join("haproxy.log"))?;
    let p = path.to_string_lossy();
    let check = ns.exec(&["haproxy", "-c", "-q", "-f", &p]);
    check.context("haproxy -c (is the haproxy package installed? apt-get install -y haproxy)")?;
    let child = ns
        .command(&["haproxy", "-db", "-f", &p])
        .stdin(std::process::Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
        .context("starting haproxy")?;
    Ok(ChildGuard::new(child))
}

/// Why the nginx target cannot run here (no nginx, or no stream module), if it cannot.
fn nginx_unavailable() -> Option<String> {
    const HINT: &str = "apt-get install -y nginx-light libnginx-mod-stream";
    let Ok(out) = std::process::Command::new("nginx").arg("-V").output() else {
        return Some(format!("nginx is not installed ({HINT})"));
    };
    let flags = String::from_utf8_lossy(&out.stderr);
    let static_stream = flags.split_whitespace().any(|f| f == "--with-stream");
    if !static_stream && !std::path::Path::new(NGINX_STREAM_MODULE).exists() {
        return Some(format!("nginx has no stream module ({HINT})"));
    }
    None
}

/// nginx's stream proxy, `worker_processes` = forwarder workers, workers
/// running as `HAPROXY_UID` (the redirect rule lets them out). nginx cannot
/// read a REDIRECTed connection's original destination (`SO_ORIGINAL_DST`),
/// so it is a plain port-forward: sink port P is redirected to
/// P + `NGINX_PORT_OFFSET`, where a `server` forwards to the sink's P.
fn start_nginx(ns: &Netns, p: &Params, scratch: &ScratchDir) -> Result<ChildGuard> {
    let dir = scratch.path.join("nginx");
    std::fs::create_dir_all(&dir)?;
    let d = dir.to_string_lossy();
    let load = if std::path::Path::new(NGINX_STREAM_MODULE).exists() {
        format!("load_module {NGINX_STREAM_MODULE};\n")
    } else {
        String::new()
    };
    let mut servers = String::new();
    for port in PORT_BULK..=PORT_HOLD {
        let listen = port + NGINX_PORT_OFFSET;
        servers.push_str(&format!(
            "    server {{\n        listen 127.0.0.1:{listen} backlog=4096;\n        proxy_pass {SINK_IP}:{port};\n    }}\n"
        ));
    }
    let workers = p.workers;
    // Each proxied connection takes two worker connections (client, upstream),
    // and accept without SO_REUSEPORT may hand one worker all of them.
    let conns = 2 * p.idle_conns.max(1000) + 64;
    let nofile = (conns as u64 + FD_SLACK).min(crate::ns::nofile_limit());
    let cfg = format!(
        "{load}daemon off;
master_process on;
worker_processes {workers};
user nobody nogroup;
pid {d}/nginx.pid;
error_log {d}/error.log warn;
worker_rlimit_nofile {nofile};
events {{
    worker_connections {conns};
    multi_accept on;
}}
stream {{
    access_log off;
    proxy_connect_timeout 5s;
    proxy_timeout 60s;
    tcp_nodelay on;
{servers}}}
"
    );
    let path = dir.join("nginx.conf");
    std::fs::write(&path, cfg)?;
    let c = path.to_string_lossy();
    let check = ns.exec(&["nginx", "-t", "-q", "-p", &d, "-e", &format!("{d}/error.log"), "-c", &c]);
    check.context("nginx -t")?;
    let log = std::fs::File::create(scratch.path.join("nginx.log"))?;
    let child = ns
        .command(&["nginx", "-p", &d, "-e", &format!("{d}/error.log"), "-c", &c])
        .process_group(0)
        .stdin(std::process::Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
        .context("starting nginx")?;
    Ok(ChildGuard::new_group(child))
}
