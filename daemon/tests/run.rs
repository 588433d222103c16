//! `sluice run`, black-box: the real binary on port 0, its bound addresses
//! read from its JSON log, its admin API, hot reload, signals, exit codes.
#![allow(clippy::unwrap_used)]

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

const REGISTRY_ONLY: &str = "apiVersion: sluice.dev/v1alpha1\nkind: EgressPolicy\nmetadata: {name: node}\nspec:\n  outboundTrafficPolicy: {mode: REGISTRY_ONLY}\n";
const HTTPBIN: &str = "apiVersion: networking.istio.io/v1alpha3\nkind: ServiceEntry\nmetadata: {name: httpbin-ext}\nspec:\n  hosts: [httpbin.org]\n  ports: [{number: 80, name: http, protocol: HTTP}]\n  resolution: DNS\n";

/// A running `sluice run`, killed on drop.
struct Sluice {
    child: Child,
    admin: SocketAddr,
    forwarder: Vec<SocketAddr>,
    dns: Option<SocketAddr>,
    lines: mpsc::Receiver<String>,
}

impl Sluice {
    fn start(policy_dir: &Path, extra: &[&str]) -> Sluice {
        Sluice::start_under(&[], policy_dir, extra)
    }

    /// Started through `wrapper` (a command that execs the rest: `setpriv …`).
    fn start_under(wrapper: &[&str], policy_dir: &Path, extra: &[&str]) -> Sluice {
        let (program, wrapper_args) = match wrapper.split_first() {
            Some((program, args)) => (*program, args),
            None => (env!("CARGO_BIN_EXE_sluice"), &[][..]),
        };
        let mut child = Command::new(program)
            .args(wrapper_args)
            .args(if wrapper.is_empty() { None } else { Some(env!("CARGO_BIN_EXE_sluice")) })
            .args(["run", "--log-json", "--listen", "127.0.0.1:0", "--workers", "2"])
            .args(if extra.contains(&"--admin-listen") { &[][..] } else { &["--admin-listen", "127.0.0.1:0"][..] })
            // DNS on port 0, and (unless the test gives one) an upstream where
            // nothing listens: no query leaves the machine.
            .args(["--dns-listen", "127.0.0.1:0"])
            .args(if extra.contains(&"--dns-upstream") { &[][..] } else { &["--dns-upstream", "127.0.0.1:9"][..] })
            .arg("--policy")
            .arg(policy_dir)
            .args(extra)
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let (tx, lines) = mpsc::channel();
        let stderr = child.stderr.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let (mut admin, mut forwarder, mut dns) = (None, Vec::new(), None);
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            let line = match lines.recv_timeout(Duration::from_millis(200)) {
                Ok(line) => line,
                Err(mpsc::RecvTimeoutError::Timeout) => continue,
                Err(mpsc::RecvTimeoutError::Disconnected) => break, // it exited
            };
            let v: serde_json::Value = serde_json::from_str(&line).unwrap_or_default();
            let fields = &v["fields"];
            match fields["message"].as_str() {
                Some(m) if m.starts_with("admin API listening") => {
                    admin = fields["addr"].as_str().and_then(|a| a.parse().ok())
                }
                Some("forwarder listening") => {
                    forwarder.extend(fields["addr"].as_str().and_then(|a| a.parse::<SocketAddr>().ok()))
                }
                Some("DNS proxy listening (UDP and TCP)") => dns = fields["addr"].as_str().and_then(|a| a.parse().ok()),
                Some("sluice is ready") if admin.is_some() => {
                    return Sluice { child, admin: admin.unwrap(), forwarder, dns, lines };
                }
                Some("sluice is ready") => break,
                _ => {}
            }
        }
        let _ = child.kill();
        let _ = child.wait();
        panic!("sluice did not become ready");
    }

    fn get(&self, path: &str) -> (u16, String) {
        http_get(self.admin, path)
    }

    fn metric(&self, series: &str) -> Option<f64> {
        let (_, text) = self.get("/metrics");
        text.lines()
            .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
            .and_then(|l| l.rsplit(' ').next()?.parse().ok())
    }

    fn policy(&self) -> serde_json::Value {
        serde_json::from_str(&self.get("/debug/policy").1).unwrap()
    }

    /// Polls `/debug/policy` until `f` holds (bounded).
    fn wait_policy(&self, what: &str, f: impl Fn(&serde_json::Value) -> bool) -> serde_json::Value {
        for _ in 0..100 {
            let p = self.policy();
            if f(&p) {
                return p;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("timed out waiting for {what}: {}", self.policy());
    }

    fn signal(&self, sig: &str) {
        Command::new("kill").args([&format!("-{sig}"), &self.child.id().to_string()]).status().unwrap();
    }

    fn wait_exit(&mut self) -> Option<i32> {
        for _ in 0..100 {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status.code();
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        None
    }
}

impl Drop for Sluice {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    write!(s, "GET {path} HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n").unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).unwrap();
    let status = resp.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    let body = resp.split_once("\r\n\r\n").map(|(_, b)| b.to_owned()).unwrap_or_default();
    (status, body)
}

#[test]
fn admin_api_reports_health_policy_and_metrics() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("httpbin.yaml"), HTTPBIN).unwrap();
    let sluice = Sluice::start(dir.path(), &[]);
    assert_eq!(sluice.get("/healthz"), (200, "ok\n".into()));
    assert_eq!(sluice.get("/readyz").0, 200);
    let p = sluice.policy();
    assert_eq!(p["generation"], 1);
    assert_eq!(p["mode"], "ALLOW_ANY");
    assert_eq!(p["entries"][0]["hosts"][0], "httpbin.org");
    assert_eq!(sluice.metric("sluice_policy_generation"), Some(1.0));
    let names: serde_json::Value = serde_json::from_str(&sluice.get("/debug/names?name=httpbin.org").1).unwrap();
    assert_eq!(names["entries"].as_array().map(Vec::len), Some(0));
    assert_eq!(sluice.forwarder.len(), 1);
}

#[test]
fn hot_reload_applies_good_policy_and_keeps_it_through_a_broken_file() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("httpbin.yaml"), HTTPBIN).unwrap();
    let sluice = Sluice::start(dir.path(), &[]);
    // Every reload result has its series from the start (at 0: a series
    // born at 1 shows no increase to an alert).
    assert_eq!(sluice.metric("sluice_policy_reloads_total{result=\"error\"}"), Some(0.0));
    assert_eq!(sluice.metric("sluice_policy_rejected"), Some(0.0));
    // The mode flips when an EgressPolicy appears in the watched directory.
    std::fs::write(dir.path().join("node.yaml"), REGISTRY_ONLY).unwrap();
    let p = sluice.wait_policy("REGISTRY_ONLY", |p| p["mode"] == "REGISTRY_ONLY");
    assert_eq!(p["generation"], 2);
    // A broken file: logged, counted, and the last good policy stays.
    std::fs::write(
        dir.path().join("broken.yaml"),
        "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nspec:\n  hosts: ['*']\n",
    )
    .unwrap();
    let p = sluice.wait_policy("the reload error", |p| p["lastReloadError"].is_string());
    assert!(p["lastReloadError"].as_str().unwrap().contains("broken.yaml:4:11: invalid host"), "{p}");
    assert_eq!((p["generation"].as_u64(), p["mode"].as_str()), (Some(2), Some("REGISTRY_ONLY")));
    assert!(sluice.metric("sluice_policy_reloads_total{result=\"error\"}").unwrap_or(0.0) >= 1.0);
    assert_eq!(sluice.metric("sluice_policy_rejected"), Some(1.0), "while the bad file stays");
    // Fixing it recovers, through an editor-style write-and-rename.
    std::fs::write(
        dir.path().join(".broken.yaml.tmp"),
        HTTPBIN.replace("httpbin-ext", "httpbin-2").replace("httpbin.org", "postman-echo.com"),
    )
    .unwrap();
    std::fs::rename(dir.path().join(".broken.yaml.tmp"), dir.path().join("broken.yaml")).unwrap();
    let p = sluice.wait_policy("recovery", |p| p["generation"] == 3);
    assert!(p["lastReloadError"].is_null());
    assert_eq!(sluice.metric("sluice_policy_rejected"), Some(0.0));
    assert_eq!(p["entries"].as_array().map(Vec::len), Some(2));
}

/// The watch follows the policy directory at its path: swapped for another
/// by renames (a rename-swap deploy, git-sync), or removed and made again,
/// later edits in the directory now there still apply at once (the periodic
/// re-read is a minute away). And watching afresh after each reload
/// raises no reload of its own.
#[test]
fn the_watch_follows_a_policy_directory_swapped_or_made_again() {
    let root = tempfile::tempdir().unwrap();
    let pol = root.path().join("pol");
    // A directory made whole elsewhere, then renamed to `pol`.
    let make = |name: &str, registry_only: bool| {
        let dir = root.path().join(name);
        std::fs::create_dir(&dir).unwrap();
        std::fs::write(dir.join("httpbin.yaml"), HTTPBIN).unwrap();
        if registry_only {
            std::fs::write(dir.join("node.yaml"), REGISTRY_ONLY).unwrap();
        }
        dir
    };
    std::fs::rename(make("first", false), &pol).unwrap();
    let sluice = Sluice::start(&pol, &[]);
    std::fs::rename(&pol, root.path().join("old")).unwrap();
    std::fs::rename(make("second", true), &pol).unwrap();
    sluice.wait_policy("the swapped-in directory", |p| p["mode"] == "REGISTRY_ONLY");
    std::fs::remove_file(pol.join("node.yaml")).unwrap();
    sluice.wait_policy("an edit in the swapped-in directory", |p| p["mode"] == "ALLOW_ANY");
    std::fs::remove_dir_all(&pol).unwrap();
    std::thread::sleep(Duration::from_millis(500)); // seen gone: the last good policy stays
    std::fs::rename(make("third", true), &pol).unwrap();
    sluice.wait_policy("the directory made again", |p| p["mode"] == "REGISTRY_ONLY");
    std::fs::remove_file(pol.join("node.yaml")).unwrap();
    sluice.wait_policy("an edit in the directory made again", |p| p["mode"] == "ALLOW_ANY");
    // Removed and made again at once (the new directory may get the old one's inode number).
    std::fs::remove_dir_all(&pol).unwrap();
    std::fs::rename(make("fourth", true), &pol).unwrap();
    sluice.wait_policy("the directory made again at once", |p| p["mode"] == "REGISTRY_ONLY");
    std::fs::remove_file(pol.join("node.yaml")).unwrap();
    let p = sluice.wait_policy("an edit in the directory made again at once", |p| p["mode"] == "ALLOW_ANY");
    let generation = p["generation"].as_u64();
    let reloads = |s: &Sluice| {
        ["success", "error", "unchanged"]
            .map(|r| s.metric(&format!("sluice_policy_reloads_total{{result=\"{r}\"}}")).unwrap_or(0.0))
            .iter()
            .sum::<f64>()
    };
    let before = reloads(&sluice);
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(reloads(&sluice), before, "nothing changed, nothing re-read");
    assert_eq!(sluice.policy()["generation"].as_u64(), generation);
}

#[test]
fn sighup_rereads_and_sigterm_stops_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let mut sluice = Sluice::start(dir.path(), &[]);
    let before = sluice.metric("sluice_policy_reloads_total{result=\"unchanged\"}").unwrap_or(0.0);
    sluice.signal("HUP");
    let mut after = before;
    for _ in 0..50 {
        after = sluice.metric("sluice_policy_reloads_total{result=\"unchanged\"}").unwrap_or(0.0);
        if after > before {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(after, before + 1.0);
    sluice.signal("TERM");
    assert_eq!(sluice.wait_exit(), Some(0));
    let logged: Vec<String> = sluice.lines.try_iter().collect();
    assert!(logged.iter().any(|l| l.contains("stopping: draining connections")), "{logged:#?}");
}

/// `sluice run …` expected to exit on its own: killed after 20 s (exit 124)
/// if it does not, and then on ports of its own, so that a regression fails
/// the test instead of hanging it.
fn sluice_run(args: &[&str]) -> std::process::Output {
    Command::new("timeout")
        .arg("20")
        .arg(env!("CARGO_BIN_EXE_sluice"))
        .args(["run", "--admin-listen", "127.0.0.1:0", "--listen", "127.0.0.1:0", "--dns-listen", "127.0.0.1:0"])
        .args(args)
        .output()
        .unwrap()
}

#[test]
fn bad_config_or_policy_exits_64_with_a_clear_message() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("bad.yaml"), "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nspec:\n  hosts: [a.example]\n  ports: [{number: 0, name: x}]\n").unwrap();
    let out = sluice_run(&["--policy", dir.path().to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(64));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("bad.yaml:5:20: port number 0 must be in the range 1..65535"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let cfg = dir.path().join("sluice.yaml");
    std::fs::write(&cfg, "forwarder:\n  lisen: []\n").unwrap();
    let out = sluice_run(&["--config", cfg.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown field `lisen`"));
    let out = sluice_run(&["--io-driver", "kqueue"]);
    assert_eq!(out.status.code(), Some(64));
}

/// Whoever reads the log may go away (a closed pipe, a restarted journald):
/// sluice keeps running and drops the lines.
#[test]
fn a_closed_log_pipe_does_not_stop_sluice() {
    let dir = tempfile::tempdir().unwrap();
    let mut child = common::Proc(
        Command::new(env!("CARGO_BIN_EXE_sluice"))
            .args(["run", "--log-json", "--admin-listen", "127.0.0.1:0", "--listen", "127.0.0.1:0"])
            .args(["--workers", "1", "--dns-listen", "127.0.0.1:0", "--dns-upstream", "127.0.0.1:9", "--policy"])
            .arg(dir.path())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let (tx, rx) = mpsc::channel();
    let stderr = child.0.stderr.take().unwrap();
    // The reader takes lines until sluice is ready, then goes away (and the pipe with it).
    std::thread::spawn(move || {
        let mut admin = None;
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let v: serde_json::Value = serde_json::from_str(&line).unwrap_or_default();
            match v["fields"]["message"].as_str() {
                Some(m) if m.starts_with("admin API listening") => {
                    admin = v["fields"]["addr"].as_str().map(str::to_owned)
                }
                Some("sluice is ready") => break,
                _ => {}
            }
        }
        let _ = tx.send(admin);
    });
    let admin: SocketAddr =
        rx.recv_timeout(Duration::from_secs(20)).unwrap().expect("the admin address, then ready").parse().unwrap();
    let reloads = || {
        let (_, text) = http_get(admin, "/metrics");
        let series = "sluice_policy_reloads_total{result=\"unchanged\"} ";
        text.lines().find_map(|l| l.strip_prefix(series)?.parse::<f64>().ok()).unwrap_or(0.0)
    };
    for n in 1..=3 {
        // Each re-read logs a line into the closed pipe.
        Command::new("kill").args(["-HUP", &child.0.id().to_string()]).status().unwrap();
        let reread = (0..250).any(|_| {
            std::thread::sleep(Duration::from_millis(20));
            reloads() >= f64::from(n)
        });
        assert!(reread, "re-read {n} did not happen");
    }
    assert!(child.0.try_wait().unwrap().is_none(), "sluice died when its log pipe closed");
}

/// Without CAP_NET_ADMIN (and CAP_NET_RAW), upstream sockets cannot carry the mark: sluice
/// says so and runs unmarked — the DNS proxy too, which answers (here
/// SERVFAIL, its upstream refusing) instead of failing behind a "ready".
#[test]
fn without_the_mark_capability_dns_still_answers() {
    let dir = tempfile::tempdir().unwrap();
    // CAP_NET_RAW also allows SO_MARK (Linux 5.17): both go.
    let caps = "-net_admin,-net_raw";
    let without = ["setpriv", "--bounding-set", caps, "--inh-caps", caps, "--"];
    let sluice = Sluice::start_under(&without, dir.path(), &[]);
    let dns = sluice.dns.unwrap();
    let out = Command::new("dig")
        .args([&format!("@{}", dns.ip()), "-p", &dns.port().to_string(), "+time=2", "+tries=1", "a.example"])
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&out.stdout);
    assert!(out.contains("status: SERVFAIL"), "{out}");
    let status = std::fs::read_to_string(format!("/proc/{}/status", sluice.child.id())).unwrap();
    let eff = status.lines().find_map(|l| l.strip_prefix("CapEff:")).unwrap().trim();
    let (cap_net_admin, cap_net_raw) = (1 << 12, 1 << 13);
    let eff = u64::from_str_radix(eff, 16).unwrap();
    assert_eq!(eff & (cap_net_admin | cap_net_raw), 0, "the test runs sluice without them");
    assert_eq!(sluice.get("/readyz").0, 200);
}

/// Resident KiB of `pid`.
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status.lines().find_map(|l| l.strip_prefix("VmRSS:")).unwrap().trim().trim_end_matches(" kB").parse().unwrap()
}

/// Sends `count` A queries to `server`, each for a name of its own under
/// `domain` (so that none joins another in flight: each is an upstream
/// query), 100 at a time, each window waiting (≤ 1 s) for its answers;
/// returns how many were answered NOERROR with a record (an answer from the
/// upstream, not a SERVFAIL).
fn query_load(server: SocketAddr, domain: &str, count: usize) -> usize {
    let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    socket.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
    let query = |n: usize| {
        let mut query = (n as u16).to_be_bytes().to_vec();
        query.extend_from_slice(&[1, 0, 0, 1, 0, 0, 0, 0, 0, 0]);
        for label in format!("q{n}.{domain}").split('.') {
            query.push(label.len() as u8);
            query.extend_from_slice(label.as_bytes());
        }
        query.extend_from_slice(&[0, 0, 1, 0, 1]);
        query
    };
    let (mut answered, mut buf) = (0, [0u8; 512]);
    let until = Instant::now() + Duration::from_secs(60);
    for window in 0..count / 100 {
        for i in 0..100 {
            socket.send_to(&query(window * 100 + i), server).unwrap();
        }
        for _ in 0..100 {
            match socket.recv(&mut buf) {
                Ok(n) if n > 12 && buf[3] & 0x0f == 0 && buf[6..8] != [0, 0] => answered += 1,
                Ok(_) => {}
                Err(_) => break,
            }
        }
        assert!(Instant::now() < until, "the load took over 60 s");
    }
    answered
}

#[test]
fn memory_stays_flat_under_dns_load_when_nobody_scrapes_the_metrics() {
    // A real upstream: dnsmasq, authoritative for one name.
    let (_dnsmasq, upstream) = dnsmasq("load.test", "198.18.0.7");
    let dir = tempfile::tempdir().unwrap();
    let sluice = Sluice::start(dir.path(), &["--dns-upstream", &upstream]);
    let dns = sluice.dns.unwrap();
    let up = (0..50).any(|_| {
        let all = query_load(dns, "load.test", 100) == 100;
        if !all {
            std::thread::sleep(Duration::from_millis(100));
        }
        all
    });
    assert!(up, "dnsmasq never answered through sluice");

    // Every answer records the upstream's latency in a histogram; unscraped,
    // the samples must still be folded into their buckets, not kept one by
    // one (~18 B each: ~900 KiB per 50,000 answers, in every stretch). The
    // allocator may still step up now and then, so one flat stretch of four
    // is what is asked.
    let mut total = query_load(dns, "load.test", 200_000);
    std::thread::sleep(Duration::from_millis(1500));
    let (mut before, mut growths) = (rss_kib(sluice.child.id()), Vec::new());
    for _ in 0..4 {
        let answered = query_load(dns, "load.test", 50_000);
        assert!(answered > 47_500, "only {answered} of 50,000 answered");
        total += answered;
        std::thread::sleep(Duration::from_millis(1500));
        let after = rss_kib(sluice.child.id());
        growths.push(after.saturating_sub(before));
        before = after;
    }
    eprintln!("resident memory growth over four stretches of 50,000 answers: {growths:?} KiB");
    assert!(growths.iter().any(|g| *g < 300), "sluice grew in every stretch: {growths:?} KiB");
    // The samples were there to fold: one per answer, none spared.
    let samples = format!("sluice_dns_upstream_duration_seconds_count{{upstream=\"{upstream}\",transport=\"udp\"}}");
    let samples = sluice.metric(&samples).unwrap_or(0.0);
    assert!(samples >= total as f64, "{samples} latency samples for {total} answers");
}

/// dnsmasq on a free loopback port, answering `ip` for `domain` and every
/// name under it. The port is found free, then freed for dnsmasq: another
/// test may take it in between, and dnsmasq then exits at once; it is
/// started again on another.
fn dnsmasq(domain: &str, ip: &str) -> (common::Proc, String) {
    dnsmasq_answering(&[format!("--address=/{domain}/{ip}")])
}

/// dnsmasq on a free loopback port (as [`dnsmasq`]), answering as `records` say.
fn dnsmasq_answering(records: &[String]) -> (common::Proc, String) {
    for _ in 0..5 {
        let probe = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let port = probe.local_addr().unwrap().port();
        drop(probe);
        let mut proc = common::Proc(
            Command::new("dnsmasq")
                .args(["--keep-in-foreground", "--no-resolv", "--no-hosts", "--bind-interfaces"])
                .args(["--listen-address=127.0.0.1", &format!("--port={port}"), "--pid-file="])
                .args(records)
                .stderr(Stdio::null())
                .spawn()
                .unwrap(),
        );
        std::thread::sleep(Duration::from_millis(200));
        if proc.0.try_wait().unwrap().is_none() {
            return (proc, format!("127.0.0.1:{port}"));
        }
    }
    panic!("dnsmasq did not start (five ports taken in turn?)");
}

#[test]
fn names_learned_before_a_restart_are_known_after_it() {
    let (_dnsmasq, upstream) = dnsmasq("kept.test", "198.18.0.9");
    let (policy, state) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    std::fs::write(policy.path().join("policy.yaml"), REGISTRY_ONLY).unwrap();
    // Not there yet: sluice makes it.
    let state_path = state.path().join("sluice");
    let state_dir = state_path.to_str().unwrap();
    let mut first = Sluice::start(policy.path(), &["--dns-upstream", &upstream, "--state-dir", state_dir]);
    let dns = first.dns.unwrap();
    let learned = (0..50).any(|_| {
        let answered = query_load(dns, "kept.test", 100) > 0;
        if !answered {
            std::thread::sleep(Duration::from_millis(100));
        }
        answered
    });
    assert!(learned, "dnsmasq never answered through sluice");
    let known = |s: &Sluice| s.get("/debug/names?ip=198.18.0.9").1;
    assert!(known(&first).contains("kept.test"), "{}", known(&first));
    first.signal("TERM");
    assert_eq!(first.wait_exit(), Some(0));
    let saved = std::fs::read_to_string(state_path.join("names.jsonl")).unwrap();
    assert!(saved.contains("kept.test") && saved.contains("198.18.0.9"), "saved at exit: {saved}");

    // Started again with an upstream that does not answer: the name can only come from the file.
    let second = Sluice::start(policy.path(), &["--state-dir", state_dir]);
    assert!(known(&second).contains("kept.test"), "not restored: {}", known(&second));
    assert_eq!(second.metric("sluice_dns_ips_tracked"), Some(1.0));
}

/// A full name table (the smallest capacity, 1,024 IPs) that a client keeps
/// filling with made-up names, each on its own IP: the name of a registered
/// host, resolved first and not used since, is the oldest entry, yet stays.
#[test]
fn made_up_names_do_not_push_a_registered_name_out_of_a_full_table() {
    const JUNK: u32 = 1_500;
    let dir = tempfile::tempdir().unwrap();
    let hosts = dir.path().join("hosts");
    let mut lines = String::from("198.18.0.9 api.svc.test\n");
    for k in 0..JUNK {
        lines += &format!("198.19.{}.{} j{k}.evil.test\n", k / 250, k % 250 + 1);
    }
    std::fs::write(&hosts, lines).unwrap();
    let (_dnsmasq, upstream) = dnsmasq_answering(&[format!("--addn-hosts={}", hosts.display())]);
    let policy = dir.path().join("policy");
    std::fs::create_dir(&policy).unwrap();
    std::fs::write(policy.join("node.yaml"), REGISTRY_ONLY).unwrap();
    let api = "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {name: api}\nspec:\n  hosts: [api.svc.test]\n  ports: [{number: 443, name: tls, protocol: TLS}]\n";
    std::fs::write(policy.join("api.yaml"), api).unwrap();
    let config = dir.path().join("sluice.yaml");
    std::fs::write(&config, "nameTableCapacity: 1024\n").unwrap();
    let sluice = Sluice::start(&policy, &["--dns-upstream", &upstream, "--config", config.to_str().unwrap()]);
    let dns = sluice.dns.unwrap();
    let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    socket.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let ask = |id: u16, name: &str| {
        let mut query = id.to_be_bytes().to_vec();
        query.extend_from_slice(&[1, 0, 0, 1, 0, 0, 0, 0, 0, 0]);
        for label in name.split('.') {
            query.push(label.len() as u8);
            query.extend_from_slice(label.as_bytes());
        }
        query.extend_from_slice(&[0, 0, 1, 0, 1]);
        socket.send_to(&query, dns).unwrap();
    };
    let mut buf = [0u8; 512];
    let mut answered =
        |n: usize| (0..n).filter(|_| matches!(socket.recv(&mut buf), Ok(len) if len > 12 && buf[7] > 0)).count();
    let known = |ip: &str| sluice.get(&format!("/debug/names?ip={ip}")).1;
    ask(0, "api.svc.test");
    assert_eq!(answered(1), 1, "no answer for api.svc.test");
    assert!(known("198.18.0.9").contains("api.svc.test"), "{}", known("198.18.0.9"));
    // Windows of 100 queries; each name once.
    for window in 0..JUNK / 100 {
        for k in window * 100..(window + 1) * 100 {
            ask(k as u16 + 1, &format!("j{k}.evil.test"));
        }
        assert_eq!(answered(100), 100, "answers missing in window {window}");
    }
    // Eviction runs on a thread of its own: within a moment the table is back under its capacity.
    let deadline = Instant::now() + Duration::from_secs(5);
    while sluice.metric("sluice_dns_ips_tracked").unwrap() > 1024.0 {
        assert!(Instant::now() < deadline, "{:?} IPs in a table of 1,024", sluice.metric("sluice_dns_ips_tracked"));
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(!known("198.19.0.1").contains("j0.evil.test"), "the table was never full: nothing went");
    assert!(known("198.18.0.9").contains("api.svc.test"), "the registered name went: {}", known("198.18.0.9"));
}

/// A policy file that went bad while sluice ran (the reload refused it)
/// does not stop the next start when there is a state directory: the last
/// policy in force, kept there, is put in force again, and the error shown.
#[test]
fn a_restart_with_a_broken_policy_file_starts_on_the_last_good_policy() {
    let (policy, state) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    std::fs::write(policy.path().join("node.yaml"), REGISTRY_ONLY).unwrap();
    std::fs::write(policy.path().join("httpbin.yaml"), HTTPBIN).unwrap();
    let state_dir = state.path().to_str().unwrap();
    let mut first = Sluice::start(policy.path(), &["--state-dir", state_dir]);
    assert_eq!(first.policy()["mode"], "REGISTRY_ONLY");
    let broken = "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nspec:\n  hosts: ['*']\n";
    std::fs::write(policy.path().join("broken.yaml"), broken).unwrap();
    first.wait_policy("the reload error", |p| p["lastReloadError"].is_string());
    first.signal("TERM");
    assert_eq!(first.wait_exit(), Some(0));

    let second = Sluice::start(policy.path(), &["--state-dir", state_dir]);
    let p = second.policy();
    assert_eq!((p["mode"].as_str(), p["entries"].as_array().map(Vec::len)), (Some("REGISTRY_ONLY"), Some(1)), "{p}");
    assert!(p["lastReloadError"].as_str().is_some_and(|e| e.contains("broken.yaml:4:11: invalid host")), "{p}");
    assert_eq!(second.metric("sluice_policy_reloads_total{result=\"error\"}"), Some(1.0));
    assert_eq!(second.metric("sluice_policy_rejected"), Some(1.0));
    // Mended, the files on disk take over.
    std::fs::remove_file(policy.path().join("broken.yaml")).unwrap();
    let p = second.wait_policy("the mended files", |p| p["generation"] == 2);
    assert!(p["lastReloadError"].is_null(), "{p}");
    assert_eq!(second.metric("sluice_policy_rejected"), Some(0.0));
}

/// The debug endpoints (the node's DNS history, its policy) answer loopback
/// clients only, also when the admin API listens on every address so a
/// Prometheus elsewhere can scrape `/metrics`.
#[test]
fn debug_endpoints_answer_loopback_clients_only() {
    let ns = common::Ns::new("admin");
    ns.ok("ip addr add 198.18.99.1/32 dev lo");
    let dir = tempfile::tempdir().unwrap();
    let sluice = Sluice::start_under(&["ip", "netns", "exec", &ns.0], dir.path(), &["--admin-listen", "0.0.0.0:0"]);
    let port = sluice.admin.port();
    let status =
        |host: &str, path: &str| ns.ok(&format!("curl -s -o /dev/null -w %{{http_code}} 'http://{host}:{port}{path}'"));
    assert_eq!(status("198.18.99.1", "/metrics"), "200");
    assert_eq!(status("198.18.99.1", "/debug/policy"), "403");
    assert_eq!(status("198.18.99.1", "/debug/names?ip=192.0.2.1"), "403");
    assert_eq!(status("127.0.0.1", "/debug/policy"), "200");
}
