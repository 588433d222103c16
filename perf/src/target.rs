//! What the client's connections go through: nothing (direct), the sluice
//! forwarder in this process (io_uring or epoll driver), or HAProxy in
//! transparent mode with splice forced. Each proxy gets the same nftables
//! REDIRECT rule; the client always dials the sink's real address.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use arc_swap::ArcSwap;
use serde::{Deserialize, Serialize};
use sluice_forwarder::{Config, ConnReport, Driver, Handle, Intercept, Listen, Shared};
use sluice_policy::{NameTable, Snapshot};

use crate::load;
use crate::ns::{ChildGuard, HAPROXY_UID, MARK, Netns, ScratchDir};
use crate::procfs;
use crate::scenario::Params;

/// HAProxy's listening port inside the namespace.
const HAPROXY_PORT: u16 = 15001;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) enum Target {
    #[serde(rename = "direct")]
    Direct,
    #[serde(rename = "sluice-uring")]
    SluiceUring,
    #[serde(rename = "sluice-epoll")]
    SluiceEpoll,
    #[serde(rename = "haproxy")]
    Haproxy,
}

impl Target {
    pub(crate) const ALL: [Target; 4] = [Target::Direct, Target::SluiceUring, Target::SluiceEpoll, Target::Haproxy];

    pub(crate) fn name(self) -> &'static str {
        match self {
            Target::Direct => "direct",
            Target::SluiceUring => "sluice-uring",
            Target::SluiceEpoll => "sluice-epoll",
            Target::Haproxy => "haproxy",
        }
    }

    pub(crate) fn parse(s: &str) -> Option<Target> {
        Target::ALL.into_iter().find(|t| t.name() == s)
    }

    pub(crate) fn is_sluice(self) -> bool {
        matches!(self, Target::SluiceUring | Target::SluiceEpoll)
    }
}

enum Proxy {
    None,
    Sluice(Option<Handle>),
    Haproxy(ChildGuard),
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

impl<'a> Up<'a> {
    /// Starts `target` with `p.workers` threads (forwarder workers, HAProxy
    /// `nbthread`), installs the redirect, and checks one echo goes through it.
    pub(crate) fn start(ns: &'a Netns, target: Target, p: &Params, scratch: Option<&ScratchDir>) -> Result<Up<'a>> {
        let (proxy, port) = match target {
            Target::Direct => (Proxy::None, None),
            Target::SluiceUring | Target::SluiceEpoll => {
                let driver = if target == Target::SluiceUring { Driver::Uring } else { Driver::Epoll };
                let h = start_sluice(ns, driver, p)?;
                let port = h.local_addrs[0].port();
                (Proxy::Sluice(Some(h)), Some(port))
            }
            Target::Haproxy => {
                let scratch = scratch.context("haproxy needs a scratch directory")?;
                (Proxy::Haproxy(start_haproxy(ns, p, scratch)?), Some(HAPROXY_PORT))
            }
        };
        let mut up = Up { target, ns, proxy };
        match port {
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
            if let Proxy::Haproxy(c) = &mut self.proxy
                && let Ok(Some(st)) = c.child.try_wait()
            {
                let log = scratch.and_then(|s| std::fs::read_to_string(s.path.join("haproxy.log")).ok());
                let log = log.unwrap_or_default();
                bail!("haproxy exited ({st}): {log}");
            }
            match load::probe(self.ns) {
                Ok(()) => return Ok(()),
                Err(e) if Instant::now() > until => return Err(e.context(format!("probing {}", self.target.name()))),
                Err(_) => std::thread::sleep(Duration::from_millis(50)),
            }
        }
    }

    /// CPU time (clock ticks, user + system) the proxy has used so far.
    pub(crate) fn proxy_ticks(&self) -> u64 {
        match &self.proxy {
            Proxy::None => 0,
            Proxy::Sluice(_) => procfs::task_ticks("sluice-fwd-"),
            Proxy::Haproxy(c) => procfs::pid_ticks(c.pid()),
        }
    }

    /// Resident memory (KiB) and open descriptors of the proxy process when it is not this one (HAProxy).
    pub(crate) fn foreign_mem(&self) -> Option<(u64, usize)> {
        match &self.proxy {
            Proxy::Haproxy(c) => Some((procfs::rss_kib(&c.pid().to_string())?, procfs::fds(&c.pid().to_string()))),
            _ => None,
        }
    }
}

impl Drop for Up<'_> {
    fn drop(&mut self) {
        // Let the last connections finish closing through the proxy first.
        std::thread::sleep(Duration::from_millis(300));
        let _ = self.ns.clear_redirect();
        match &mut self.proxy {
            Proxy::Sluice(h) => {
                if let Some(h) = h.take() {
                    h.shutdown(Duration::ZERO);
                }
            }
            Proxy::Haproxy(_) | Proxy::None => {}
        }
    }
}

fn start_sluice(ns: &Netns, driver: Driver, p: &Params) -> Result<Handle> {
    let config = Config {
        listen: vec![
            Listen { addr: "127.0.0.1:0".parse()?, intercept: Intercept::Redirect },
            Listen { addr: "[::1]:0".parse()?, intercept: Intercept::Redirect },
        ],
        workers: p.workers,
        driver,
        mark: MARK,
        pipe_size: p.pipe_size,
        ..Config::default()
    };
    let shared = Shared {
        policy: Arc::new(ArcSwap::from_pointee(Snapshot::empty())),
        names: Arc::new(NameTable::new(1024)),
        report: Arc::new(|_: &ConnReport| {}),
    };
    let h = ns.within(move || sluice_forwarder::start(config, shared))?.context("starting the forwarder")?;
    let want = if driver == Driver::Uring { "io_uring" } else { "epoll" };
    if h.drivers.iter().any(|d| *d != want) {
        let got = h.drivers.clone();
        h.shutdown(Duration::ZERO);
        bail!("forwarder drivers {got:?}, wanted {want}");
    }
    Ok(h)
}

/// HAProxy in TCP mode, splice forced both ways, forwarding each REDIRECTed
/// connection to its original destination (`server ... 0.0.0.0`: "the same IP
/// address as the one from the client connection", which behind REDIRECT is
/// conntrack's original destination; no port: the same port). It drops to
/// `HAPROXY_UID`, which the redirect rule lets out.
fn start_haproxy(ns: &Netns, p: &Params, scratch: &ScratchDir) -> Result<ChildGuard> {
    let (threads, pipesize) = (p.workers, p.pipe_size);
    let cfg = format!(
        "global
    nbthread {threads}
    tune.pipesize {pipesize}
    maxconn 5000
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
