//! `sluice run`: the runtime layout. N forwarder worker threads (monoio,
//! started by the forwarder), the DNS proxy's UDP receiving threads (one per
//! socket, started by it), and this thread as the control plane: one tokio
//! current-thread runtime with the DNS proxy's TCP side and timeouts, the
//! admin API, the policy watcher and signal handling.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use anyhow::Context as _;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use sluice_forwarder::{ConnReport, Shared};
use sluice_policy::NameTable;
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::{mpsc, watch};

use crate::admin::{self, Admin};
use crate::config::{Config, LogFormat};
use crate::reload::{self, PolicyState};

const NAMES_FILE: &str = "names.jsonl";
/// The files of the last policy in force (`reload::PolicyState::load_initial`).
const POLICY_FILE: &str = "policy.last-good.json";
/// How often the name table is written to the state directory (also at exit).
const SAVE_EVERY: Duration = Duration::from_secs(60);
/// Whether this process installed the nftables rules (and so must remove them).
static RULES_INSTALLED: AtomicBool = AtomicBool::new(false);
/// How often, with `--intercept`, sluice checks that its nftables table is
/// still there as it installed it (and puts it back if not).
const RULES_CHECK: Duration = Duration::from_secs(5);

pub(crate) fn run(mut config: Config) -> anyhow::Result<ExitCode> {
    init_logging(&config);
    let prometheus = PrometheusBuilder::new()
        .set_buckets_for_metric(
            metrics_exporter_prometheus::Matcher::Full(sluice_dnsproxy::metrics::UPSTREAM_DURATION.into()),
            sluice_dnsproxy::metrics::UPSTREAM_BUCKETS,
        )
        .context("histogram buckets")?
        .install_recorder()
        .context("cannot install the metrics recorder")?;
    if config.policy.is_empty() {
        tracing::warn!(
            "no policy paths (and no {}): running on the built-in default, ALLOW_ANY",
            crate::config::DEFAULT_POLICY_DIR
        );
    }
    if let Some(dir) = &config.state_dir {
        // As systemd's StateDirectory= would: a missing directory would fail every save.
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create the state directory {}", dir.display()))?;
    }
    let keep = config.state_dir.as_ref().map(|d| d.join(POLICY_FILE));
    let (state, set) = match PolicyState::load_initial(config.policy.clone(), keep) {
        Ok(x) => x,
        Err(errors) => {
            eprintln!("{errors}");
            eprintln!("sluice: the policy has {} error(s); not starting", errors.0.len());
            return Ok(ExitCode::from(crate::EXIT_USAGE));
        }
    };
    for w in &set.warnings {
        tracing::warn!("{w}");
    }
    tracing::info!(entries = set.entries.len(), mode = ?set.settings.mode, files = set.files.len(), "policy loaded");
    let state = Arc::new(state);

    let names = Arc::new(NameTable::new(config.name_table_capacity));
    // When the table is full, names a ServiceEntry covers go last.
    let policy = state.snapshot.clone();
    names.set_registered(move |name| policy.load().covers_name(name));
    evict_elsewhere(&names);
    let names_path = config.state_dir.as_ref().map(|d| d.join(NAMES_FILE));
    // Before the forwarder starts: its first connections are judged with the names restored.
    if let Some(path) = &names_path {
        sluice_dnsproxy::restore_or_start_empty(&names, path);
    }
    if config.forwarder.mark != 0 && !can_set_mark() {
        tracing::warn!(
            mark = config.forwarder.mark,
            "SO_MARK needs CAP_NET_ADMIN: upstream sockets go unmarked, so interception rules must exclude sluice's user instead"
        );
        config.forwarder.mark = 0;
    }
    // One mark for all of sluice's upstream sockets, whatever was decided above.
    config.dns.mark = config.forwarder.mark;
    let shared = Shared { policy: state.snapshot.clone(), names: names.clone(), report: Arc::new(refusal_log()) };
    let forwarder = sluice_forwarder::start(config.forwarder.clone(), shared).context("cannot start the forwarder")?;
    for (addr, driver) in forwarder.local_addrs.iter().zip(forwarder.drivers.iter().cycle()) {
        tracing::info!(%addr, driver, workers = forwarder.drivers.len(), "forwarder listening");
    }
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().context("control runtime")?;
    let result = rt.block_on(control(&config, state, names, prometheus, forwarder, names_path));
    // Also when the control plane failed after installing them.
    remove_rules(&config);
    result.map(|()| ExitCode::SUCCESS)
}

/// Every [`RULES_CHECK`], puts sluice's table back if it is gone or changed
/// since it was installed ([`crate::rules::restore_if_changed`]); its
/// listing then is the first one that succeeds. Ends (between two checks,
/// or after one: they hold [`RULES_LOCK`]) when the rules are released.
async fn keep_rules(rules: crate::rules::Rules) {
    let mut installed: Option<String> = None;
    let mut tick = tokio::time::interval(RULES_CHECK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let (rules, before) = (rules.clone(), installed.clone());
        let checked = tokio::task::spawn_blocking(move || {
            let released = RULES_LOCK.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            if *released {
                return Ok(None);
            }
            match before {
                // The first listing: the baseline (gone already: put back).
                None => match crate::rules::listed()? {
                    Some(listing) => Ok(Some(listing)),
                    None => crate::rules::restore_if_changed(&rules, &None),
                },
                Some(_) => crate::rules::restore_if_changed(&rules, &before),
            }
        });
        match checked.await {
            Ok(Ok(now)) => installed = now.or(installed),
            Ok(Err(e)) => tracing::error!(error = %format!("{e:#}"), "cannot check or restore the interception rules"),
            Err(e) => tracing::error!(error = %e, "the interception rules check failed"),
        }
    }
}

/// Held while the rules are checked or put back, and set once they are
/// released: a check under way when sluice stops cannot put them back after.
static RULES_LOCK: std::sync::Mutex<bool> = std::sync::Mutex::new(false);

/// The name table's evictor: a thread of its own, woken when a DNS answer
/// passes the table's caps ([`NameTable::evict_elsewhere`]), so that the
/// answer's thread does not walk the table (0.1-0.2 s at a million IPs).
/// It ends within a second of the table's last `Arc`.
fn evict_elsewhere(names: &Arc<NameTable>) {
    let table = Arc::downgrade(names);
    let evictor = std::thread::Builder::new().name("sluice-names-evict".into()).spawn(move || {
        while let Some(table) = table.upgrade() {
            if !table.evict_pending(sluice_policy::Timestamp::now()) {
                drop(table);
                std::thread::park_timeout(Duration::from_secs(1));
            }
        }
    });
    match evictor {
        Ok(evictor) => {
            let wake = evictor.thread().clone();
            names.evict_elsewhere(move || wake.unpark());
        }
        Err(e) => {
            tracing::warn!(error = %e, "cannot start the name table's evictor thread: DNS answers evict themselves")
        }
    }
}

/// Stops intercepting, keeping what drains flowing ([`crate::rules::release`]).
fn release_rules(config: &Config) {
    *RULES_LOCK.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = true;
    if let Some(rules) = &config.intercept
        && RULES_INSTALLED.load(Ordering::Relaxed)
    {
        match crate::rules::release(rules) {
            Ok(()) => tracing::info!("interception stopped: new connections and DNS go straight out"),
            Err(e) => tracing::error!(error = %e, "cannot stop intercepting; the rules stay until the drain ends"),
        }
    }
}

/// Removes the nftables table when this process installed it (once).
fn remove_rules(config: &Config) {
    if config.intercept.is_some() && RULES_INSTALLED.swap(false, Ordering::Relaxed) {
        match crate::rules::remove() {
            Ok(()) => tracing::info!("interception rules removed"),
            Err(e) => tracing::error!(error = %e, "cannot remove the interception rules: run `sluice rules remove`"),
        }
    }
}

/// The control plane: admin API, policy watcher, signals; on SIGTERM/SIGINT
/// (or when the DNS proxy fails) it stops in order: policy watcher, the
/// interception rules, the forwarder's drain, then the DNS proxy and admin API.
async fn control(
    config: &Config,
    state: Arc<PolicyState>,
    names: Arc<NameTable>,
    prometheus: PrometheusHandle,
    forwarder: sluice_forwarder::Handle,
    names_path: Option<std::path::PathBuf>,
) -> anyhow::Result<()> {
    let ready = Arc::new(AtomicBool::new(false));
    let (stop_tx, stop_rx) = watch::channel(false);
    let stopped = |mut rx: watch::Receiver<bool>| async move {
        while !*rx.borrow_and_update() {
            if rx.changed().await.is_err() {
                break;
            }
        }
    };

    // The DNS proxy: bound, its upstreams known, serving — before any rule sends the node's DNS to it.
    let mut udp = Vec::new();
    let mut tcp = Vec::new();
    for addr in &config.dns_listen {
        let u = bind_dns(*addr, false).and_then(|s| tokio::net::UdpSocket::from_std(s.into()));
        udp.push(u.with_context(|| format!("cannot bind DNS (UDP) on {addr}"))?);
        let t = bind_dns(*addr, true).and_then(|s| tokio::net::TcpListener::from_std(s.into()));
        tcp.push(t.with_context(|| format!("cannot bind DNS (TCP) on {addr}"))?);
    }
    let bound: Vec<SocketAddr> = udp.iter().filter_map(|s| s.local_addr().ok()).collect();
    let upstreams = sluice_dnsproxy::resolve_upstreams(&config.dns, &bound).context("DNS proxy")?;
    if upstreams.is_empty() {
        anyhow::bail!("DNS proxy: no usable upstream resolver (give --dns-upstream)");
    }
    for addr in &bound {
        tracing::info!(%addr, ?upstreams, "DNS proxy listening (UDP and TCP)");
    }
    if config.intercept.is_some() {
        // The rules (one inet table) redirect both families to the same ports.
        let forwarder_v6 = config.forwarder.listen.iter().any(|l| l.addr.is_ipv6());
        if !forwarder_v6 || !config.dns_listen.iter().any(SocketAddr::is_ipv6) {
            tracing::warn!(
                "--intercept without an IPv6 listener for the forwarder or the DNS proxy: the rules redirect the \
                 node's IPv6 connections and lookups too, to a port nothing listens on (refused); add [::]:PORT"
            );
        }
        for upstream in upstreams.iter().filter(|u| u.ip().is_loopback()) {
            // Its own lookups are not sluice's: the rules send them back here, and here sends them to it.
            tracing::warn!(
                %upstream,
                "DNS upstream on this node's loopback with --intercept: the resolver there sends its own lookups \
                 out, and the rules bring them back to sluice (a loop: every lookup times out) unless \
                 intercept.exclude covers where it sends them; better give sluice that resolver's upstreams \
                 (--dns-upstream / dns.upstreams)"
            );
        }
    }
    let dns_shared = sluice_dnsproxy::Shared { policy: state.snapshot.clone(), names: names.clone() };
    let dns = sluice_dnsproxy::start(config.dns.clone(), dns_shared.clone(), udp, tcp).context("DNS proxy")?;
    // The DNS proxy and the admin API stop last, after the drain.
    let (end_tx, end_rx) = watch::channel(false);
    let mut dns = tokio::spawn(dns.serve(stopped(end_rx.clone())));
    let warm = tokio::spawn(sluice_dnsproxy::warm(config.dns.clone(), dns_shared, stopped(stop_rx.clone())));
    // Saved every SAVE_EVERY, and once more after the DNS proxy has stopped
    // (it learns through the drain).
    let (dns_done, saver_stop) = tokio::sync::oneshot::channel::<()>();
    let saver = names_path.map(|path| {
        let last = async {
            let _ = saver_stop.await;
        };
        tokio::spawn(sluice_dnsproxy::keep_saved(names.clone(), path, SAVE_EVERY, last))
    });
    // Before the rules go in: a SIGTERM from then on drains and removes them, rather than killing sluice
    // with the table left in place.
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut hup = signal(SignalKind::hangup())?;
    if let Some(rules) = &config.intercept {
        crate::rules::apply(rules).context("--intercept: cannot install the nftables rules")?;
        RULES_INSTALLED.store(true, Ordering::Relaxed);
        tracing::info!(forwarder_port = rules.forwarder_port, dns_port = ?rules.dns_port, "interception rules installed (nft table inet sluice)");
        metrics::counter!(crate::rules::RESTORED).increment(0);
    }
    // Its own task: an nft that is slow (a huge ruleset) or hangs must not hold up signals or the watchdog.
    let keeper = config.intercept.clone().map(|rules| tokio::spawn(keep_rules(rules)));
    let upkeep = tokio::spawn(admin::upkeep(prometheus.clone()));
    let admin = Admin { prometheus, policy: state.clone(), names, ready: ready.clone() };
    let listener = tokio::net::TcpListener::bind(config.admin_listen)
        .await
        .with_context(|| format!("cannot bind the admin API on {}", config.admin_listen))?;
    let admin_addr: SocketAddr = listener.local_addr()?;
    tracing::info!(addr = %admin_addr, "admin API listening (/metrics, /healthz, /readyz, /debug/policy, /debug/names)");
    let admin_stop = stopped(end_rx);
    let server = tokio::spawn(async move {
        let app = admin::router(admin);
        axum::serve(listener, app.into_make_service_with_connect_info::<SocketAddr>())
            .with_graceful_shutdown(admin_stop)
            .await
    });

    let (hup_tx, hup_rx) = mpsc::unbounded_channel();
    let watcher = tokio::spawn(reload::watch(state, config.reload_interval, hup_rx, stop_rx.clone(), |reloading| {
        let msg = if reloading { sd_notify::NotifyState::Reloading } else { sd_notify::NotifyState::Ready };
        let _ = sd_notify::notify(false, &[msg]);
    }));

    // systemd's watchdog: ping only while every forwarder worker's event loop moves.
    let mut watchdog = tokio::time::interval(watchdog_period().unwrap_or(Duration::from_secs(3600)));
    watchdog.tick().await;
    let mut last_beats = forwarder.beats();
    ready.store(true, Ordering::Relaxed);
    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Ready]);
    tracing::info!("sluice is ready");
    let mut failed = None;
    loop {
        tokio::select! {
            _ = term.recv() => break,
            _ = int.recv() => break,
            // The DNS proxy serves until the drain ends; its task ending now
            // is a bug (a panic), and the node's DNS may be redirected here:
            // the daemon stops and exits with it, for systemd to restart.
            ended = &mut dns => {
                let error = match ended {
                    Err(e) => anyhow::anyhow!("task failed: {e}"),
                    Ok(()) => anyhow::anyhow!("stopped on its own"),
                };
                tracing::error!(error = %format!("{error:#}"), "DNS proxy failed: stopping sluice");
                failed = Some(error.context("DNS proxy failed"));
                break;
            }
            _ = hup.recv() => { let _ = hup_tx.send(()); }
            _ = watchdog.tick() => {
                let beats = forwarder.beats();
                let stuck: Vec<usize> = beats.iter().zip(&last_beats).enumerate().filter(|(_, (a, b))| a <= b).map(|(i, _)| i).collect();
                if stuck.is_empty() {
                    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Watchdog]);
                } else {
                    tracing::error!(?stuck, "forwarder workers made no progress: withholding the systemd watchdog ping");
                }
                last_beats = beats;
            }
        }
    }
    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Stopping]);
    ready.store(false, Ordering::Relaxed);
    let _ = stop_tx.send(true);
    let _ = watcher.await;
    let _ = warm.await;
    // Interception ends first: new connections and DNS lookups go straight
    // out, as they will once sluice has exited, instead of being refused for
    // the whole drain; redirected connections keep flowing. (Rules installed
    // by someone else stay: new connections are then refused until sluice
    // is back.)
    if let Some(keeper) = keeper {
        keeper.abort();
    }
    release_rules(config);
    // The DNS proxy keeps answering meanwhile (queries in flight, and all of
    // them where the rules are not sluice's), and stops after the drain.
    tracing::info!(drain = ?config.drain_timeout, "stopping: draining connections");
    let drain = config.drain_timeout;
    if let Err(e) = tokio::task::spawn_blocking(move || forwarder.shutdown(drain)).await {
        tracing::error!(error = %e, "forwarder shutdown failed");
    }
    let _ = end_tx.send(true);
    if failed.is_none()
        && let Err(e) = dns.await
    {
        tracing::error!(error = %e, "DNS proxy task failed");
    }
    drop(dns_done);
    if let Some(saver) = saver {
        match saver.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, "cannot save the name table"),
            Err(e) => tracing::error!(error = %e, "name table saver failed"),
        }
    }
    remove_rules(config);
    let _ = tokio::time::timeout(Duration::from_secs(5), server).await;
    upkeep.abort();
    failed.map_or(Ok(()), Err)
}

/// A DNS socket: non-blocking, `[::]` v6-only so it can sit beside `0.0.0.0`.
/// `SO_REUSEADDR` on the TCP listener only (a restart binds again beside
/// connections still in `TIME_WAIT`): on a UDP socket it would let any
/// local user bind the same port on a more specific address with the same
/// option — and receive the node's redirected DNS instead of sluice.
fn bind_dns(addr: SocketAddr, tcp: bool) -> std::io::Result<socket2::Socket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let domain = if addr.is_ipv6() { Domain::IPV6 } else { Domain::IPV4 };
    let (ty, proto) = if tcp { (Type::STREAM, Protocol::TCP) } else { (Type::DGRAM, Protocol::UDP) };
    let s = Socket::new(domain, ty.nonblocking().cloexec(), Some(proto))?;
    if addr.is_ipv6() {
        s.set_only_v6(true)?;
    }
    s.set_reuse_address(tcp)?;
    s.bind(&addr.into())?;
    if tcp {
        s.listen(1024)?;
    }
    Ok(s)
}

/// Half of systemd's `WATCHDOG_USEC`, when the watchdog is on for us.
fn watchdog_period() -> Option<Duration> {
    let mut usec = 0u64;
    sd_notify::watchdog_enabled(false, &mut usec).then(|| Duration::from_micros(usec / 2)).filter(|d| !d.is_zero())
}

fn can_set_mark() -> bool {
    socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).and_then(|s| s.set_mark(1)).is_ok()
}

fn init_logging(config: &Config) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("SLUICE_LOG")
        // hickory-proto's own logging is kept to warnings: sluice says what it does with DNS in its own lines and metrics.
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(format!("{},hickory_proto=warn", config.log_level)));
    use std::io::IsTerminal;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(|| LossyStderr)
        .with_ansi(std::io::stderr().is_terminal());
    let _ = match config.log_format {
        LogFormat::Json => builder.json().try_init(),
        LogFormat::Text => builder.try_init(),
    };
}

/// stderr that never fails: if whoever reads our log goes away (a closed
/// pipe, a restarted journald), lines are dropped instead of the
/// subscriber reporting the failure with `eprintln!`, which would panic.
struct LossyStderr;

impl std::io::Write for LossyStderr {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let _ = std::io::stderr().write_all(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        let _ = std::io::stderr().flush();
        Ok(())
    }
}

/// One log line per refused connection — source, destination, names, reason —
/// at most [`REFUSALS_PER_SECOND`] a second; the rest are counted and the
/// count is logged with the next line that gets through.
const REFUSALS_PER_SECOND: u64 = 20;

fn refusal_log() -> impl Fn(&ConnReport) + Send + Sync + 'static {
    let window = AtomicU64::new(0);
    let in_window = AtomicU64::new(0);
    let suppressed = AtomicU64::new(0);
    move |r: &ConnReport| {
        let Some(v) = r.verdict.as_ref().filter(|v| !v.allow || v.would_deny) else { return };
        let sec = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_secs());
        if window.swap(sec, Ordering::Relaxed) != sec {
            in_window.store(0, Ordering::Relaxed);
        }
        if in_window.fetch_add(1, Ordering::Relaxed) >= REFUSALS_PER_SECOND {
            suppressed.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let dst = r.destination.map(|d| d.to_string()).unwrap_or_default();
        let name = v.name.as_ref().map(|n| n.to_string()).unwrap_or_default();
        let workload = v.workload.as_deref().unwrap_or("unknown");
        let also = suppressed.swap(0, Ordering::Relaxed);
        if v.would_deny {
            tracing::info!(source = %r.source, destination = %dst, name, workload, reason = %v.reason, suppressed = also, "dry-run: would refuse");
        } else {
            tracing::info!(source = %r.source, destination = %dst, name, workload, reason = %v.reason, suppressed = also, "refused");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Nobody can bind beside sluice's UDP DNS socket on a more specific
    /// address and take the node's DNS (with `SO_REUSEADDR` on both, Linux
    /// lets anyone; the uid is checked only for `SO_REUSEPORT`).
    #[test]
    fn the_udp_dns_socket_cannot_be_shared() {
        let ours =
            bind_dns("0.0.0.0:0".parse().unwrap_or_else(|e| panic!("{e}")), false).unwrap_or_else(|e| panic!("{e}"));
        let port = ours.local_addr().ok().and_then(|a| a.as_socket()).map_or(0, |a| a.port());
        let theirs =
            socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::DGRAM, None).unwrap_or_else(|e| panic!("{e}"));
        theirs.set_reuse_address(true).unwrap_or_else(|e| panic!("{e}"));
        let at: SocketAddr = SocketAddr::from(([127, 0, 0, 1], port));
        let bound = theirs.bind(&at.into());
        assert_eq!(bound.map_err(|e| e.kind()), Err(std::io::ErrorKind::AddrInUse));
    }
}
