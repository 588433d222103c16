//! `sluice run`'s configuration: a YAML file (unknown fields are errors),
//! then command-line flags on top, then defaults for what neither says.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context as _, bail};
use serde::Deserialize;
use sluice_forwarder::{Accept, Driver, Intercept};

/// The policy directory used when neither the file nor a flag names one.
pub(crate) const DEFAULT_POLICY_DIR: &str = "/etc/sluice/policy.d";
/// `SO_MARK` on sluice's own upstream sockets; the nftables rules return on it.
pub(crate) const DEFAULT_MARK: u32 = 0x51ce;

/// The config file, as written.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub(crate) struct FileConfig {
    #[serde(default)]
    pub(crate) policy: Vec<PathBuf>,
    #[serde(default)]
    pub(crate) forwarder: FileForwarder,
    #[serde(default)]
    pub(crate) dns: FileDns,
    #[serde(default)]
    pub(crate) admin: FileAdmin,
    #[serde(default)]
    pub(crate) intercept: FileIntercept,
    pub(crate) state_dir: Option<PathBuf>,
    #[serde(default)]
    pub(crate) log: FileLog,
    pub(crate) drain_timeout: Option<String>,
    pub(crate) reload_interval: Option<String>,
    pub(crate) name_table_capacity: Option<usize>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub(crate) struct FileForwarder {
    #[serde(default)]
    pub(crate) listen: Vec<SocketAddr>,
    pub(crate) workers: Option<usize>,
    pub(crate) io_driver: Option<DriverName>,
    /// One listening socket shared by the workers, or one per worker.
    pub(crate) accept: Option<AcceptName>,
    pub(crate) intercept: Option<InterceptName>,
    pub(crate) mark: Option<u32>,
    pub(crate) connect_timeout: Option<String>,
    pub(crate) idle_timeout: Option<String>,
    pub(crate) sniff_timeout: Option<String>,
    pub(crate) max_connections_per_worker: Option<usize>,
    /// Bytes per splice pipe (per direction, only while bytes are in flight).
    pub(crate) pipe_size: Option<usize>,
    /// What a bulk transfer's pipe grows to.
    pub(crate) pipe_max_size: Option<usize>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub(crate) struct FileDns {
    #[serde(default)]
    pub(crate) listen: Vec<SocketAddr>,
    #[serde(default)]
    pub(crate) upstreams: Vec<SocketAddr>,
    pub(crate) timeout: Option<String>,
    pub(crate) max_tcp_connections: Option<usize>,
}

/// `run --intercept`: what the nftables rules leave alone.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub(crate) struct FileIntercept {
    #[serde(default)]
    pub(crate) exclude: Vec<ipnet::IpNet>,
    #[serde(default)]
    pub(crate) exclude_ports: Vec<u16>,
    #[serde(default)]
    pub(crate) drop_udp: bool,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub(crate) struct FileAdmin {
    pub(crate) listen: Option<SocketAddr>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub(crate) struct FileLog {
    pub(crate) format: Option<LogFormat>,
    pub(crate) level: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum DriverName {
    Auto,
    Uring,
    Epoll,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) enum AcceptName {
    Auto,
    Shared,
    PerWorker,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum InterceptName {
    Redirect,
    Tproxy,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum LogFormat {
    #[default]
    Text,
    Json,
}

/// Everything `sluice run` needs, resolved.
#[derive(Debug, Clone)]
pub(crate) struct Config {
    pub(crate) policy: Vec<PathBuf>,
    pub(crate) forwarder: sluice_forwarder::Config,
    pub(crate) dns_listen: Vec<SocketAddr>,
    pub(crate) dns: sluice_dnsproxy::Config,
    pub(crate) admin_listen: SocketAddr,
    pub(crate) state_dir: Option<PathBuf>,
    pub(crate) log_format: LogFormat,
    pub(crate) log_level: String,
    pub(crate) drain_timeout: Duration,
    pub(crate) reload_interval: Duration,
    pub(crate) name_table_capacity: usize,
    /// `--intercept`: the rules sluice installs at start and removes at exit.
    pub(crate) intercept: Option<crate::rules::Rules>,
}

/// Flags of `sluice run` that override the file.
#[derive(Debug, Clone, Default)]
pub(crate) struct Overrides {
    pub(crate) config: Option<PathBuf>,
    pub(crate) policy: Vec<PathBuf>,
    pub(crate) listen: Vec<SocketAddr>,
    pub(crate) dns_listen: Vec<SocketAddr>,
    pub(crate) dns_upstream: Vec<SocketAddr>,
    pub(crate) admin_listen: Option<SocketAddr>,
    pub(crate) workers: Option<usize>,
    pub(crate) io_driver: Option<DriverName>,
    pub(crate) state_dir: Option<PathBuf>,
    pub(crate) log_json: bool,
    pub(crate) intercept: bool,
}

/// The longest duration a setting takes: timers are set as "now + it", and
/// a sum past what the clock can hold would panic the thread that sets it.
const MAX_DURATION: Duration = Duration::from_secs(365 * 86_400);

fn duration(field: &str, v: Option<&str>, default: Duration) -> anyhow::Result<Duration> {
    let Some(s) = v else { return Ok(default) };
    let d = humantime::parse_duration(s).with_context(|| format!("{field}: {s:?} is not a duration (e.g. 30s, 5m)"))?;
    if d > MAX_DURATION {
        bail!("{field}: {s:?} is longer than a year");
    }
    Ok(d)
}

/// A count for which 0 would mean nothing works (not "no limit").
fn at_least_one(field: &str, n: usize) -> anyhow::Result<usize> {
    if n == 0 {
        bail!("{field}: must be at least 1 (0 would refuse everything; it does not mean unlimited)");
    }
    Ok(n)
}

/// `log.level`: a level, or a filter of `target=level` directives. A bare
/// word that is no level would be read as a target name and silence every
/// log line (`warning` for `warn`).
fn log_level(s: &str) -> anyhow::Result<String> {
    let is_level = |w: &str| w.trim().parse::<tracing_subscriber::filter::LevelFilter>().is_ok();
    // Empty directives (a trailing comma) are skipped, as tracing skips them.
    for directive in s.split(',').filter(|d| !d.trim().is_empty()) {
        let level = match directive.rsplit_once('=') {
            Some((_, level)) => level,
            // A span filter alone (`[conn]`): its level is implied, as for a `target=trace`.
            None if directive.trim_start().starts_with('[') => continue,
            None => directive,
        };
        if !is_level(level) {
            bail!(
                "log.level: {s:?}: {:?} is not a level (trace, debug, info, warn, error, off), as in \
                 `info` or `info,sluice_forwarder=debug` (a whole target: `sluice_forwarder=trace`)",
                level.trim()
            );
        }
    }
    // And what tracing itself would refuse (it would otherwise drop the directive quietly).
    tracing_subscriber::EnvFilter::try_new(s).with_context(|| format!("log.level: {s:?}"))?;
    Ok(s.to_owned())
}

/// A duration for which 0 means nothing sensible (every connection or query
/// would fail at once; a re-read interval of 0 would stop the watcher).
fn positive_duration(field: &str, v: Option<&str>, default: Duration) -> anyhow::Result<Duration> {
    let d = duration(field, v, default)?;
    if d.is_zero() {
        bail!("{field}: must be longer than 0");
    }
    Ok(d)
}

pub(crate) fn read_file(path: &Path) -> anyhow::Result<FileConfig> {
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read config {}", path.display()))?;
    let opts = serde_saphyr::options! { with_snippet: false };
    serde_saphyr::from_str_with_options(&text, opts).map_err(|e| {
        let loc = e.location().map(|l| format!(":{}:{}", l.line(), l.column())).unwrap_or_default();
        use serde_saphyr::MessageFormatter;
        let msg = serde_saphyr::UserMessageFormatter.format_message(&e).into_owned();
        anyhow::anyhow!("{}{loc}: {msg}", path.display())
    })
}

/// File, then flags, then defaults.
pub(crate) fn resolve(o: Overrides) -> anyhow::Result<Config> {
    let file = match &o.config {
        Some(p) => read_file(p)?,
        None => FileConfig::default(),
    };
    let f = &file.forwarder;
    let mut listen = if o.listen.is_empty() { f.listen.clone() } else { o.listen.clone() };
    if listen.is_empty() {
        listen = vec!["127.0.0.1:15001".parse()?, "[::1]:15001".parse()?];
    }
    let intercept = match f.intercept {
        Some(InterceptName::Tproxy) => Intercept::Tproxy,
        _ => Intercept::Redirect,
    };
    let driver = match o.io_driver.or(f.io_driver) {
        Some(DriverName::Uring) => Driver::Uring,
        Some(DriverName::Epoll) => Driver::Epoll,
        _ => Driver::Auto,
    };
    let defaults = sluice_forwarder::Config::default();
    let workers = match o.workers.or(f.workers) {
        Some(0) | None => defaults.workers,
        Some(n) if n > 1024 => bail!("--workers {n}: at most 1024"),
        Some(n) => n,
    };
    let forwarder = sluice_forwarder::Config {
        listen: listen.into_iter().map(|addr| sluice_forwarder::Listen { addr, intercept }).collect(),
        workers,
        driver,
        accept: match f.accept {
            Some(AcceptName::Shared) => Accept::Shared,
            Some(AcceptName::PerWorker) => Accept::PerWorker,
            Some(AcceptName::Auto) | None => Accept::Auto,
        },
        mark: f.mark.unwrap_or(DEFAULT_MARK),
        connect_timeout: positive_duration(
            "forwarder.connectTimeout",
            f.connect_timeout.as_deref(),
            defaults.connect_timeout,
        )?,
        idle_timeout: positive_duration("forwarder.idleTimeout", f.idle_timeout.as_deref(), defaults.idle_timeout)?,
        // 0 would sniff nothing: under REGISTRY_ONLY, TLS and HTTP to registered hosts DNS never named refused.
        sniff_timeout: positive_duration("forwarder.sniffTimeout", f.sniff_timeout.as_deref(), defaults.sniff_timeout)?,
        max_connections_per_worker: at_least_one(
            "forwarder.maxConnectionsPerWorker",
            f.max_connections_per_worker.unwrap_or(defaults.max_connections_per_worker),
        )?,
        pipe_size: f.pipe_size.unwrap_or(defaults.pipe_size).clamp(4096, 16 << 20),
        pipe_max_size: f.pipe_max_size.unwrap_or(defaults.pipe_max_size).clamp(4096, 16 << 20),
    };
    let mut forwarder = forwarder;
    let mut dns_listen = if !o.dns_listen.is_empty() {
        o.dns_listen.clone()
    } else if !file.dns.listen.is_empty() {
        file.dns.listen.clone()
    } else {
        vec!["127.0.0.1:15053".parse()?]
    };
    if o.intercept && intercept == Intercept::Tproxy {
        // The rules `--intercept` installs redirect; a TPROXY listener would see
        // every redirected connection addressed to itself and refuse it.
        bail!(
            "--intercept installs REDIRECT rules, but forwarder.intercept is tproxy: \
             drop --intercept and install TPROXY rules yourself (docs/forwarder.md), or use intercept: redirect"
        );
    }
    let intercept = o.intercept.then(|| intercept_rules(&mut forwarder, &mut dns_listen, &file.intercept));
    if intercept.as_ref().is_some_and(|r| !r.spares_sluice()) {
        // Root is not excluded by user (that would exclude every root process): only the mark is left.
        bail!(
            "--intercept with forwarder.mark 0 as root: nothing would keep sluice's own connections and \
             lookups out of its rules (they would come straight back to it); set a mark or run as another user"
        );
    }
    let dns_defaults = sluice_dnsproxy::Config::default();
    let dns = sluice_dnsproxy::Config {
        upstreams: if o.dns_upstream.is_empty() { file.dns.upstreams.clone() } else { o.dns_upstream.clone() },
        listen: dns_listen.clone(),
        mark: forwarder.mark,
        timeout: positive_duration("dns.timeout", file.dns.timeout.as_deref(), dns_defaults.timeout)?,
        max_tcp_connections: at_least_one(
            "dns.maxTcpConnections",
            file.dns.max_tcp_connections.unwrap_or(dns_defaults.max_tcp_connections),
        )?,
        ..dns_defaults
    };
    let mut policy = if o.policy.is_empty() { file.policy.clone() } else { o.policy.clone() };
    if policy.is_empty() && Path::new(DEFAULT_POLICY_DIR).is_dir() {
        policy.push(DEFAULT_POLICY_DIR.into());
    }
    Ok(Config {
        policy,
        forwarder,
        dns_listen,
        dns,
        admin_listen: o.admin_listen.or(file.admin.listen).unwrap_or("127.0.0.1:15090".parse()?),
        state_dir: o.state_dir.clone().or(file.state_dir.clone()),
        log_format: if o.log_json { LogFormat::Json } else { file.log.format.unwrap_or_default() },
        log_level: log_level(file.log.level.as_deref().unwrap_or("info"))?,
        drain_timeout: duration("drainTimeout", file.drain_timeout.as_deref(), Duration::from_secs(30))?,
        reload_interval: positive_duration("reloadInterval", file.reload_interval.as_deref(), Duration::from_secs(60))?,
        name_table_capacity: file.name_table_capacity.unwrap_or(1_000_000).max(1024),
        intercept,
    })
}

/// With interception on, prerouting redirects land on the inbound
/// interface's address: loopback listeners move to the wildcard addresses on
/// the same port, so the listeners and the rules agree.
fn intercept_rules(
    forwarder: &mut sluice_forwarder::Config,
    dns_listen: &mut Vec<SocketAddr>,
    file: &FileIntercept,
) -> crate::rules::Rules {
    let port = forwarder.listen.first().map_or(15001, |l| l.addr.port());
    let dns_port = dns_listen.first().map_or(15053, SocketAddr::port);
    if dns_listen.iter().all(|a| a.ip().is_loopback()) {
        // Wildcards: redirects from pods land on the inbound interface's
        // address, those from local processes on 127.0.0.1/::1; the proxy
        // answers each UDP query from the address it was sent to.
        *dns_listen = ["0.0.0.0", "::"]
            .iter()
            .filter_map(|ip| ip.parse::<std::net::IpAddr>().ok())
            .map(|ip| SocketAddr::new(ip, dns_port))
            .collect();
    }
    if forwarder.listen.iter().all(|l| l.addr.ip().is_loopback()) {
        let intercept = forwarder.listen.first().map_or(Intercept::Redirect, |l| l.intercept);
        forwarder.listen = ["0.0.0.0", "::"]
            .iter()
            .filter_map(|ip| ip.parse::<std::net::IpAddr>().ok())
            .map(|ip| sluice_forwarder::Listen { addr: SocketAddr::new(ip, port), intercept })
            .collect();
    }
    // sluice's own user is excluded, unless it is root (that would exclude every root process).
    let uid = nix::unistd::getuid().as_raw();
    crate::rules::Rules {
        forwarder_port: port,
        dns_port: Some(dns_port),
        mark: forwarder.mark,
        uid: (uid != 0).then_some(uid),
        exclude: file.exclude.clone(),
        exclude_ports: file.exclude_ports.clone(),
        drop_udp: file.drop_udp,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(text: &str) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let p = dir.path().join("sluice.yaml");
        std::fs::write(&p, text).unwrap_or_else(|e| panic!("{e}"));
        (dir, p)
    }

    #[test]
    fn defaults_without_a_file() {
        let c = resolve(Overrides::default()).unwrap_or_else(|e| panic!("{e}"));
        let addrs: Vec<String> = c.forwarder.listen.iter().map(|l| l.addr.to_string()).collect();
        assert_eq!(addrs, ["127.0.0.1:15001", "[::1]:15001"]);
        assert_eq!(c.admin_listen.to_string(), "127.0.0.1:15090");
        assert_eq!(c.dns_listen[0].to_string(), "127.0.0.1:15053");
        assert_eq!(c.forwarder.mark, DEFAULT_MARK);
    }

    #[test]
    fn intercept_moves_loopback_listeners_to_the_wildcard_on_the_same_port() {
        let (_d, p) = write("intercept:\n  exclude: [10.96.0.0/12]\n  dropUdp: true\n");
        let c = resolve(Overrides { config: Some(p), intercept: true, ..Overrides::default() })
            .unwrap_or_else(|e| panic!("{e}"));
        let addrs: Vec<String> = c.forwarder.listen.iter().map(|l| l.addr.to_string()).collect();
        assert_eq!(addrs, ["0.0.0.0:15001", "[::]:15001"]);
        let dns: Vec<String> = c.dns_listen.iter().map(ToString::to_string).collect();
        assert_eq!(dns, ["0.0.0.0:15053", "[::]:15053"]);
        let rules = c.intercept.unwrap_or_else(|| panic!("rules"));
        assert_eq!((rules.forwarder_port, rules.drop_udp, rules.exclude.len()), (15001, true, 1));
    }

    #[test]
    fn the_shipped_example_config_is_valid() {
        let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../systemd/etc/sluice/sluice.yaml");
        let o = Overrides { config: Some(p), intercept: true, ..Overrides::default() };
        let c = resolve(o).unwrap_or_else(|e| panic!("{e:#}"));
        assert_eq!(c.intercept.map(|r| r.exclude_ports), Some(vec![22]));
    }

    #[test]
    fn flags_override_the_file() {
        let (_d, p) = write(
            "forwarder:\n  listen: ['127.0.0.1:9']\n  workers: 3\n  idleTimeout: 2m\n  pipeSize: 131072\n  pipeMaxSize: 999999999\n  accept: perWorker\nadmin: {listen: '127.0.0.1:8'}\n",
        );
        let o = Overrides { config: Some(p), workers: Some(1), ..Overrides::default() };
        let c = resolve(o).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(c.forwarder.workers, 1);
        assert_eq!(c.forwarder.listen[0].addr.to_string(), "127.0.0.1:9");
        assert_eq!(c.forwarder.idle_timeout, Duration::from_secs(120));
        // Pipe sizes are read, and held to their bounds (16 MiB at most).
        assert_eq!((c.forwarder.pipe_size, c.forwarder.pipe_max_size), (131_072, 16 << 20));
        assert_eq!(c.forwarder.accept, sluice_forwarder::Accept::PerWorker);
        assert_eq!(c.admin_listen.to_string(), "127.0.0.1:8");
    }

    #[test]
    fn unknown_fields_and_bad_values_are_clear_errors() {
        let (_d, p) = write("forwarder:\n  listn: ['127.0.0.1:9']\n");
        let e = resolve(Overrides { config: Some(p.clone()), ..Overrides::default() }).err().map(|e| e.to_string());
        assert!(
            e.as_deref().is_some_and(|e| e.contains("sluice.yaml:2:3") && e.contains("unknown field `listn`")),
            "{e:?}"
        );
        let (_d3, p3) = write("forwarder: {intercept: tproxy}\n");
        let e = resolve(Overrides { config: Some(p3.clone()), intercept: true, ..Overrides::default() }).err();
        assert!(e.is_some_and(|e| e.to_string().contains("forwarder.intercept is tproxy")));
        assert!(resolve(Overrides { config: Some(p3), ..Overrides::default() }).is_ok(), "tproxy alone is fine");
        let (_d4, p4) = write("forwarder: {idleTimeout: 500000000000y}\n");
        let e = resolve(Overrides { config: Some(p4), ..Overrides::default() }).err().map(|e| e.to_string());
        assert!(e.as_deref().is_some_and(|e| e.contains("forwarder.idleTimeout") && e.contains("longer than a year")));
        let (_d5, p5) = write("forwarder: {mark: 0}\n");
        let e = resolve(Overrides { config: Some(p5), intercept: true, ..Overrides::default() }).err();
        if nix::unistd::getuid().is_root() {
            assert!(e.is_some_and(|e| e.to_string().contains("forwarder.mark 0 as root")));
        } else {
            assert!(e.is_none(), "sluice's user is excluded instead");
        }
        for zero in [
            "reloadInterval: 0s",
            "dns: {timeout: 0ms}",
            "forwarder: {connectTimeout: 0s}",
            "forwarder: {sniffTimeout: 0s}",
        ] {
            let (_d, p) = write(&format!("{zero}\n"));
            let e = resolve(Overrides { config: Some(p), ..Overrides::default() }).err().map(|e| e.to_string());
            assert!(e.as_deref().is_some_and(|e| e.contains("must be longer than 0")), "{zero}: {e:?}");
        }
        for (bad, says) in [
            ("forwarder: {maxConnectionsPerWorker: 0}", "must be at least 1"),
            ("dns: {maxTcpConnections: 0}", "must be at least 1"),
            ("log: {level: warning}", "\"warning\" is not a level"),
            ("log: {level: 'info,sluice=verbose'}", "\"verbose\" is not a level"),
        ] {
            let (_d, p) = write(&format!("{bad}\n"));
            let e = resolve(Overrides { config: Some(p), ..Overrides::default() }).err().map(|e| e.to_string());
            assert!(e.as_deref().is_some_and(|e| e.contains(says)), "{bad}: {e:?}");
        }
        for good in
            ["WARN", "info,hyper=warn", "sluice_forwarder=debug,info", "info,", "sluice=4", "[conn]", "x[s]=off"]
        {
            let (_d, p) = write(&format!("log: {{level: '{good}'}}\n"));
            assert!(resolve(Overrides { config: Some(p), ..Overrides::default() }).is_ok(), "{good}");
        }
        let (_d2, p2) = write("drainTimeout: soon\n");
        let e = resolve(Overrides { config: Some(p2), ..Overrides::default() }).err().map(|e| e.to_string());
        assert!(e.as_deref().is_some_and(|e| e.contains("drainTimeout")), "{e:?}");
    }
}
