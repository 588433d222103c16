//! The seed post's three options, end to end: the real `sluice run
//! --intercept` in a "node" namespace, a "pod" namespace routed through it,
//! a "world" namespace with a real HTTP server and a real authoritative DNS
//! server (dnsmasq), real `curl`, real nftables. Both the local process and
//! the pod resolve `httpbin.org` through the node's intercepted DNS.
#![allow(clippy::unwrap_used)]

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

struct Ns(String);

fn sh(cmd: &str) -> (bool, String) {
    let out = Command::new("sh").arg("-c").arg(cmd).output().unwrap();
    (out.status.success(), format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
}

impl Ns {
    fn new(tag: &str) -> Ns {
        let name = format!("sl-{tag}-{}", std::process::id());
        assert!(sh(&format!("ip netns add {name}")).0);
        let ns = Ns(name);
        ns.ok("ip link set lo up");
        ns
    }

    fn exec(&self, cmd: &str) -> (bool, String) {
        sh(&format!("ip netns exec {} sh -c '{}'", self.0, cmd.replace('\'', "'\\''")))
    }

    fn ok(&self, cmd: &str) -> String {
        let (ok, out) = self.exec(cmd);
        assert!(ok, "{cmd}: {out}");
        out
    }
}

impl Ns {
    /// `ip netns exec` bind-mounts /etc/netns/NAME/resolv.conf over /etc/resolv.conf.
    fn resolver(&self, nameserver: &str) {
        let dir = Path::new("/etc/netns").join(&self.0);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("resolv.conf"), format!("nameserver {nameserver}\n")).unwrap();
    }
}

impl Drop for Ns {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(Path::new("/etc/netns").join(&self.0));
        let _ = sh(&format!("ip netns del {}", self.0));
    }
}

struct Daemon(Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start(node: &Ns, policy: &Path) -> Daemon {
    let mut child = Command::new("ip")
        .args([
            "netns",
            "exec",
            &node.0,
            env!("CARGO_BIN_EXE_sluice"),
            "run",
            "--intercept",
            "--log-json",
            "--workers",
            "2",
            "--policy",
        ])
        .arg(policy)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Keep reading its log for the whole test (a closed pipe would fail its writes).
    let (tx, rx) = std::sync::mpsc::channel();
    let stderr = child.stderr.take().unwrap();
    let daemon = Daemon(child);
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            eprintln!("sluice: {line}");
            let _ = tx.send(line);
        }
    });
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        match rx.recv_timeout(Duration::from_millis(200)) {
            Ok(line) if line.contains("sluice is ready") => return daemon,
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => break,
            _ => {}
        }
    }
    panic!("sluice did not become ready");
}

/// The value of the series of `metric` whose labels include all of `labels`.
fn metric(node: &Ns, metric: &str, labels: &[(&str, &str)]) -> f64 {
    let text = node.ok("curl -s 127.0.0.1:15090/metrics");
    text.lines()
        .filter(|l| l.starts_with(&format!("{metric}{{")))
        .filter(|l| labels.iter().all(|(k, v)| l.contains(&format!("{k}=\"{v}\""))))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

fn wait_generation(node: &Ns, generation: u64) {
    for _ in 0..100 {
        let p = node.ok("curl -s 127.0.0.1:15090/debug/policy");
        if p.contains(&format!("\"generation\":{generation}")) {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("policy generation {generation} never came");
}

const REGISTRY_ONLY: &str = "apiVersion: sluice.dev/v1alpha1\nkind: EgressPolicy\nmetadata: {name: node}\nspec:\n  outboundTrafficPolicy: {mode: REGISTRY_ONLY}\n  workloads:\n  - name: pod\n    sources: [198.18.1.0/24]\n";
const HTTPBIN_EXT: &str = include_str!("../../policy/tests/fixtures/istio/httpbin-ext.yaml");

#[test]
fn the_three_options_of_the_seed_from_a_process_and_from_a_pod() {
    let (pod, node, world) = (Ns::new("pod"), Ns::new("node"), Ns::new("world"));
    assert!(
        sh(&format!(
            "ip link add name sl-p{0} netns {1} type veth peer name sl-n{0} netns {2}",
            std::process::id() % 10000,
            pod.0,
            node.0
        ))
        .0
    );
    let (p_if, n_if) = (format!("sl-p{}", std::process::id() % 10000), format!("sl-n{}", std::process::id() % 10000));
    assert!(
        sh(&format!(
            "ip link add name sl-w{0} netns {1} type veth peer name sl-x{0} netns {2}",
            std::process::id() % 10000,
            world.0,
            node.0
        ))
        .0
    );
    let (w_if, x_if) = (format!("sl-w{}", std::process::id() % 10000), format!("sl-x{}", std::process::id() % 10000));
    pod.ok(&format!(
        "ip link set {p_if} up && ip addr add 198.18.1.10/24 dev {p_if} && ip route add default via 198.18.1.1"
    ));
    node.ok(&format!("ip link set {n_if} up && ip addr add 198.18.1.1/24 dev {n_if}"));
    node.ok(&format!("ip link set {x_if} up && ip addr add 198.18.2.1/24 dev {x_if}"));
    node.ok("sysctl -qw net.ipv4.ip_forward=1");
    world.ok(&format!(
        "ip link set {w_if} up && ip addr add 198.18.2.20/24 dev {w_if} && ip addr add 198.18.2.53/24 dev {w_if} && ip route add default via 198.18.2.1"
    ));
    // The world's authoritative DNS: httpbin.org and an unregistered name share the server's IP (a CDN).
    let dns = Command::new("ip")
        .args([
            "netns",
            "exec",
            &world.0,
            "dnsmasq",
            "--keep-in-foreground",
            "--no-resolv",
            "--no-hosts",
            "--bind-interfaces",
        ])
        .args(["--listen-address=198.18.2.53", "--local=/httpbin.org/", "--local=/example.com/"])
        .args(["--host-record=httpbin.org,198.18.2.20", "--host-record=exfil.example.com,198.18.2.20"])
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let _dns = Daemon(dns);
    node.resolver("198.18.2.53");
    pod.resolver("198.18.2.53");
    let site = tempfile::tempdir().unwrap();
    std::fs::write(site.path().join("uuid"), "{\"uuid\": \"9f1c\"}\n").unwrap();
    // A large file for the long transfers: 24 MiB of pseudo-random bytes.
    let mut big = vec![0u8; 24 << 20];
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    for b in big.iter_mut() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *b = x as u8;
    }
    std::fs::write(site.path().join("big"), &big).unwrap();
    let want = sh(&format!("sha256sum {}", site.path().join("big").display())).1.split(' ').next().unwrap().to_owned();
    let server = Command::new("ip")
        .args(["netns", "exec", &world.0, "python3", "-m", "http.server", "80", "--bind", "198.18.2.20", "--directory"])
        .arg(site.path())
        .stderr(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let _server = Daemon(server);
    for _ in 0..50 {
        if world.exec("curl -s -m 1 http://198.18.2.20/uuid").0 {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }

    let policy = tempfile::tempdir().unwrap();
    let sluice = start(&node, policy.path());
    let curl =
        |ns: &Ns, host: &str| ns.exec(&format!("curl -s -m 5 -o - -w \"\\n%{{http_code}}\" http://{host}/uuid")).1;

    // 1. ALLOW_ANY: everything passes, as PassthroughCluster.
    for ns in [&node, &pod] {
        let out = curl(ns, "httpbin.org");
        assert!(out.ends_with("\n200") && out.contains("9f1c"), "{}: {out}", ns.0);
    }
    let pass = [("destination_service_name", "PassthroughCluster"), ("destination_service", "httpbin.org")];
    assert_eq!(metric(&node, "istio_tcp_connections_opened_total", &pass), 2.0, "named from what DNS answered");
    let names = node.ok("curl -s 127.0.0.1:15090/debug/names?name=httpbin.org");
    assert!(names.contains("198.18.2.20"), "{names}");
    let answer = pod.ok("dig +short +time=2 +tries=1 exfil.example.com");
    assert_eq!(answer.trim(), "198.18.2.20", "the pod's DNS goes through sluice too");

    // A long download in flight while the mode flips to REGISTRY_ONLY: it keeps its verdict and completes intact.
    let download = |ns: &Ns, out: &str| {
        Command::new("ip")
            .args(["netns", "exec", &ns.0, "sh", "-c"])
            .arg(format!("curl -s -m 30 --limit-rate 12M -o {out} http://httpbin.org/big && sha256sum {out}"))
            .output()
            .unwrap()
    };
    let first_out = site.path().join("during-reload").display().to_string();
    let during_reload = std::thread::scope(|scope| {
        let job = scope.spawn(|| download(&node, &first_out));
        std::thread::sleep(Duration::from_millis(500));

        // 2. REGISTRY_ONLY without a ServiceEntry: 502, BlackHoleCluster, with source and destination.
        std::fs::write(policy.path().join("node.yaml"), REGISTRY_ONLY).unwrap();
        wait_generation(&node, 2);
        for ns in [&node, &pod] {
            let out = curl(ns, "httpbin.org");
            assert!(out.ends_with("\n502") && out.contains("httpbin.org"), "{}: {out}", ns.0);
        }
        job.join().unwrap()
    });
    assert!(
        String::from_utf8_lossy(&during_reload.stdout).starts_with(&want),
        "the transfer across the reload arrived intact"
    );
    let bh = [
        ("destination_service_name", "BlackHoleCluster"),
        ("destination_service", "httpbin.org"),
        ("response_code", "502"),
    ];
    assert_eq!(metric(&node, "istio_requests_total", &bh), 2.0);
    assert_eq!(
        metric(&node, "istio_requests_total", &[bh[0], bh[1], ("source_workload", "pod")]),
        1.0,
        "the pod's attempt names its workload"
    );

    // 3. REGISTRY_ONLY with the seed's httpbin-ext ServiceEntry, added while running.
    std::fs::write(policy.path().join("httpbin-ext.yaml"), HTTPBIN_EXT).unwrap();
    wait_generation(&node, 3);
    for ns in [&node, &pod] {
        let out = curl(ns, "httpbin.org");
        assert!(out.ends_with("\n200"), "{}: {out}", ns.0);
        let other = curl(ns, "exfil.example.com");
        assert!(other.ends_with("\n502"), "an unregistered host is still refused: {other}");
    }
    let se = [("destination_service_name", "httpbin.org"), ("destination_service", "httpbin.org")];
    assert_eq!(metric(&node, "istio_tcp_connections_opened_total", &se), 2.0);

    // SIGTERM drains: a download in flight completes intact, then sluice exits 0 and its rules are gone.
    let mut sluice = sluice;
    let last_out = site.path().join("during-drain").display().to_string();
    let (drained, status) = std::thread::scope(|scope| {
        let job = scope.spawn(|| download(&pod, &last_out));
        std::thread::sleep(Duration::from_millis(500));
        assert!(sh(&format!("kill -TERM {}", sluice.0.id())).0);
        let out = job.join().unwrap();
        (out, sluice.0.wait().unwrap())
    });
    assert!(String::from_utf8_lossy(&drained.stdout).starts_with(&want), "the transfer across SIGTERM arrived intact");
    assert_eq!(status.code(), Some(0));
    assert_eq!(node.ok("nft list ruleset").trim(), "", "--intercept removes its rules at exit");
}
