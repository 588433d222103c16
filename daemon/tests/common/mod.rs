//! End-to-end scaffolding: network namespaces made and removed by the test
//! (a "pod" routed through the "node" where sluice runs, and a "world" with
//! real servers and a real authoritative DNS server), the real binary.
#![allow(dead_code, unreachable_pub, clippy::unwrap_used)]

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

pub fn sh(cmd: &str) -> (bool, String) {
    let out = Command::new("sh").arg("-c").arg(cmd).output().unwrap();
    (out.status.success(), format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
}

/// A network namespace, removed on drop (with its /etc/netns resolv.conf).
pub struct Ns(pub String);

impl Ns {
    pub fn new(tag: &str) -> Ns {
        let name = format!("sl-{tag}-{}", std::process::id());
        assert!(sh(&format!("ip netns add {name}")).0);
        let ns = Ns(name);
        ns.ok("ip link set lo up");
        ns
    }

    pub fn exec(&self, cmd: &str) -> (bool, String) {
        sh(&format!("ip netns exec {} sh -c '{}'", self.0, cmd.replace('\'', "'\\''")))
    }

    pub fn ok(&self, cmd: &str) -> String {
        let (ok, out) = self.exec(cmd);
        assert!(ok, "{cmd}: {out}");
        out
    }

    /// `ip netns exec` bind-mounts /etc/netns/NAME/resolv.conf over /etc/resolv.conf.
    pub fn resolver(&self, nameserver: &str) {
        let dir = Path::new("/etc/netns").join(&self.0);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("resolv.conf"), format!("nameserver {nameserver}\n")).unwrap();
    }

    /// Starts a program inside the namespace, killed on drop.
    pub fn spawn(&self, program: &str, args: &[&str]) -> Proc {
        self.spawn_logged(program, args, Stdio::null())
    }

    /// As [`spawn`](Self::spawn), its stderr to `log`.
    pub fn spawn_logged(&self, program: &str, args: &[&str], log: impl Into<Stdio>) -> Proc {
        let child = Command::new("ip")
            .args(["netns", "exec", &self.0, program])
            .args(args)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        Proc(child)
    }
}

impl Drop for Ns {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(Path::new("/etc/netns").join(&self.0));
        let _ = sh(&format!("ip netns del {}", self.0));
    }
}

/// A child process, killed on drop.
pub struct Proc(pub Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// pod (198.18.1.10) → node (198.18.1.1 | 198.18.2.1, forwarding) → world
/// (198.18.2.20-29, DNS on 198.18.2.53 answering `records` authoritatively).
pub struct Topology {
    pub pod: Ns,
    pub node: Ns,
    pub world: Ns,
    _dns: Proc,
}

impl Topology {
    pub fn new(tag: char, records: &[(&str, &str)]) -> Topology {
        let (pod, node, world) =
            (Ns::new(&format!("{tag}pod")), Ns::new(&format!("{tag}node")), Ns::new(&format!("{tag}world")));
        let id = std::process::id() % 10000;
        let link = |a: &Ns, a_if: &str, b: &Ns, b_if: &str| {
            assert!(sh(&format!("ip link add name {a_if} netns {} type veth peer name {b_if} netns {}", a.0, b.0)).0);
        };
        let (p_if, n_if, w_if, x_if) =
            (format!("s{tag}p{id}"), format!("s{tag}n{id}"), format!("s{tag}w{id}"), format!("s{tag}x{id}"));
        link(&pod, &p_if, &node, &n_if);
        link(&world, &w_if, &node, &x_if);
        pod.ok(&format!(
            "ip link set {p_if} up && ip addr add 198.18.1.10/24 dev {p_if} && ip route add default via 198.18.1.1"
        ));
        node.ok(&format!("ip link set {n_if} up && ip addr add 198.18.1.1/24 dev {n_if}"));
        node.ok(&format!("ip link set {x_if} up && ip addr add 198.18.2.1/24 dev {x_if}"));
        node.ok("sysctl -qw net.ipv4.ip_forward=1");
        world.ok(&format!(
            "ip link set {w_if} up && ip route add 198.18.1.0/24 via 198.18.2.1 dev {w_if} 2>/dev/null; true"
        ));
        for h in (20..30).chain([53]) {
            world.ok(&format!("ip addr add 198.18.2.{h}/24 dev {w_if}"));
        }
        world.ok(&format!("ip route replace default via 198.18.2.1 dev {w_if}"));
        let mut args = vec![
            "--keep-in-foreground".to_owned(),
            "--no-resolv".into(),
            "--no-hosts".into(),
            "--bind-interfaces".into(),
            "--listen-address=198.18.2.53".into(),
        ];
        for (name, ip) in records {
            // --local: authoritative for the name (AAAA gets NODATA, not REFUSED).
            args.push(format!("--local=/{name}/"));
            args.push(format!("--host-record={name},{ip}"));
        }
        // No pid file: the default one is shared by every test's dnsmasq. Its log (stderr) is kept for a failure.
        args.push("--pid-file=".into());
        args.push("--log-facility=-".into());
        let log_path = std::env::temp_dir().join(format!("{}-dnsmasq.log", world.0));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let dns = world.spawn_logged("dnsmasq", &args, std::fs::File::create(&log_path).unwrap());
        // Answering before anything asks: a sluice started at once would see
        // its upstream refuse (port unreachable) and mark it down.
        if let Some((name, ip)) = records.first() {
            // (Its error lines, "connection refused" among them, are on stdout too.)
            let answers = || {
                let out = world.exec(&format!("dig +short +time=1 +tries=1 @198.18.2.53 {name}")).1;
                out.lines().any(|l| l.trim() == *ip)
            };
            let deadline = Instant::now() + Duration::from_secs(10);
            while !answers() {
                let log = || std::fs::read_to_string(&log_path).unwrap_or_default();
                assert!(Instant::now() < deadline, "dnsmasq did not answer: {}", log());
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = std::fs::remove_file(&log_path);
        }
        node.resolver("198.18.2.53");
        pod.resolver("198.18.2.53");
        Topology { pod, node, world, _dns: dns }
    }
}

/// `sluice run --intercept` in the node; its JSON log lines arrive on the receiver.
pub fn start(node: &Ns, policy: &Path) -> (Proc, mpsc::Receiver<String>) {
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
        ])
        .arg("--policy")
        .arg(policy)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let daemon = Proc(child);
    // Keep reading its log for the whole test (a closed pipe would fail its writes).
    let (tx, rx) = mpsc::channel();
    let (ready_tx, ready_rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            eprintln!("sluice: {line}");
            if line.contains("sluice is ready") {
                let _ = ready_tx.send(());
            }
            let _ = tx.send(line);
        }
    });
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        match ready_rx.recv_timeout(Duration::from_millis(200)) {
            Ok(()) => return (daemon, rx),
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
            Err(mpsc::RecvTimeoutError::Timeout) => {}
        }
    }
    panic!("sluice did not become ready");
}

/// The sum of the series of `metric` whose labels include all of `labels`.
pub fn metric(node: &Ns, metric: &str, labels: &[(&str, &str)]) -> f64 {
    let text = node.ok("curl -s 127.0.0.1:15090/metrics");
    text.lines()
        .filter(|l| l.starts_with(&format!("{metric}{{")))
        .filter(|l| labels.iter().all(|(k, v)| l.contains(&format!("{k}=\"{v}\""))))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

pub fn wait_generation(node: &Ns, generation: u64) {
    for _ in 0..100 {
        let p = node.ok("curl -s 127.0.0.1:15090/debug/policy");
        if p.contains(&format!("\"generation\":{generation}")) {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("policy generation {generation} never came");
}
