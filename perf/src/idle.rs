//! The idle scenario: many connections opened through the target and held,
//! measured for what they cost the proxy — resident memory and descriptors
//! per connection, and the kernel threads that appeared (io_uring's io-wq
//! workers in the proxy, and new kernel threads anywhere on the machine).
//! The proxy is always a process of its own (sluice: see `child.rs`), read
//! from `/proc/<pid>`; this process runs the generator and the sink.

use std::time::Duration;

use anyhow::{Result, bail};
use serde::Serialize;

use crate::load::{Gen, Load};
use crate::ns::Netns;
use crate::procfs;
use crate::scenario::Params;
use crate::target::Target;

/// Descriptors a process needs beyond two per idle connection (listeners,
/// rings, the namespace's commands).
pub(crate) const FD_SLACK: u64 = 512;

#[derive(Debug, Clone, Serialize)]
pub(crate) struct Idle {
    pub(crate) target: Target,
    pub(crate) round: usize,
    pub(crate) conns: usize,
    /// Connections the redirect rule sent to the proxy.
    pub(crate) redirected: u64,
    /// Growth of the proxy's resident memory while holding them, KiB (all its processes).
    pub(crate) proxy_rss_kib: Option<i64>,
    /// Descriptors the proxy opened for them.
    pub(crate) proxy_fds: Option<i64>,
    /// io-wq kernel workers in the proxy's processes: all of them, and those
    /// serving the forwarder's rings (`sluice-fwd-*` threads).
    pub(crate) iowq_proxy: Option<usize>,
    pub(crate) iowq_forwarder: Option<usize>,
    /// Kernel threads (kthreadd's children) on the whole machine while
    /// holding, less before opening: kworkers come and go, so a few either
    /// way is noise; thousands would be one per connection.
    pub(crate) kthreads_new: i64,
}

/// The most idle connections this process (the generator's and the sink's
/// ends) and a proxy process (its two) can each hold under `RLIMIT_NOFILE`.
pub(crate) fn max_conns() -> usize {
    (crate::ns::nofile_limit().saturating_sub(FD_SLACK) / 2) as usize
}

/// Resident KiB and open descriptors of `pids`, summed.
fn mem(pids: &[u32]) -> Option<(i64, i64)> {
    let rss = pids.iter().map(|p| procfs::rss_kib(&p.to_string())).sum::<Option<u64>>()?;
    let fds: usize = pids.iter().map(|p| procfs::fds(&p.to_string())).sum();
    Some((rss as i64, fds as i64))
}

/// Opens `p.idle_conns` connections through `target` (whose processes are
/// `proxy`; none for direct), holds them `p.hold`, and measures the proxy.
pub(crate) fn idle(ns: &Netns, target: Target, proxy: &[u32], round: usize, p: &Params) -> Result<Idle> {
    let n = p.idle_conns;
    let proxy = if proxy.is_empty() { None } else { Some(proxy) };
    let before = proxy.and_then(mem);
    let kthreads0 = procfs::kernel_threads();
    let redirected = ns.redirected();
    // Opening takes about 1 s per 5,000 connections through a proxy on 2 cores.
    let opening = Duration::from_secs(10 + n as u64 / 1000);
    let generator = Gen::start(ns, Load::Idle { conns: n }, p.hold + opening + Duration::from_secs(10))?;
    generator.wait_ready(n as u64, opening)?;
    // A few may reuse a conntrack entry and so not pass the rule (they are
    // warned about with the tables); most not passing it means no proxy is measured.
    let passed = ns.redirected().saturating_sub(redirected);
    if proxy.is_some() && passed < n as u64 / 2 {
        bail!("only {passed} of {n} idle connections were redirected");
    }
    std::thread::sleep(p.hold);
    let after = proxy.and_then(mem);
    let iowq = proxy.map(|pids| procfs::iowq_workers(pids, "sluice-fwd-"));
    let kthreads_new = procfs::kernel_threads() as i64 - kthreads0 as i64;
    generator.finish(Duration::from_secs(10))?;
    let grew = before.zip(after).map(|((r0, f0), (r1, f1))| (r1 - r0, f1 - f0));
    Ok(Idle {
        target,
        round,
        conns: n,
        redirected: passed,
        proxy_rss_kib: grew.map(|g| g.0),
        proxy_fds: grew.map(|g| g.1),
        iowq_proxy: iowq.map(|w| w.0),
        iowq_forwarder: iowq.filter(|_| target.is_sluice()).map(|w| w.1),
        kthreads_new,
    })
}
