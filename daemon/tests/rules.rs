//! `sluice rules`, black-box, in a network namespace the test makes:
//! apply is atomic and idempotent, remove leaves no trace.
#![allow(clippy::unwrap_used)]

use std::process::Command;

struct Netns(String);

impl Netns {
    fn new(tag: &str) -> Netns {
        let name = format!("sluice-rules-{tag}-{}", std::process::id());
        assert!(Command::new("ip").args(["netns", "add", &name]).status().unwrap().success());
        Netns(name)
    }

    fn run(&self, program: &str, args: &[&str]) -> (bool, String) {
        let out = Command::new("ip").args(["netns", "exec", &self.0, program]).args(args).output().unwrap();
        let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        (out.status.success(), text)
    }

    fn sluice(&self, args: &[&str]) -> (bool, String) {
        self.run(env!("CARGO_BIN_EXE_sluice"), args)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

#[test]
fn apply_twice_then_remove_twice_leaves_nothing() {
    let ns = Netns::new("idem");
    let args = [
        "rules",
        "apply",
        "--port",
        "15001",
        "--exclude",
        "10.96.0.0/12",
        "--exclude",
        "fd00::/8",
        "--uid",
        "990",
        "--drop-udp",
    ];
    let (ok, first) = ns.sluice(&args);
    assert!(ok, "{first}");
    let (ok, again) = ns.sluice(&args);
    assert!(ok, "apply is idempotent: {again}");
    let (_, listed) = ns.run("nft", &["list", "table", "inet", "sluice"]);
    for chain in ["chain output", "chain prerouting", "chain input", "chain udp_output", "chain udp_forward"] {
        assert_eq!(listed.matches(chain).count(), 1, "{chain} once, not duplicated:\n{listed}");
    }
    assert!(listed.contains("redirect to :15001"), "{listed}");
    assert!(listed.contains("meta mark 0x000051ce return"), "{listed}");
    assert!(ns.sluice(&["rules", "remove"]).0);
    assert!(ns.sluice(&["rules", "remove"]).0, "remove succeeds when already gone");
    assert_eq!(ns.run("nft", &["list", "ruleset"]).1.trim(), "", "no trace left");
}

#[test]
fn print_needs_no_privileges_and_matches_what_apply_installs() {
    let out = Command::new(env!("CARGO_BIN_EXE_sluice")).args(["rules", "print", "--port", "16001"]).output().unwrap();
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("meta l4proto tcp redirect to :16001"));
    let ns = Netns::new("print");
    let path = std::env::temp_dir().join(format!("sluice-rules-{}.nft", std::process::id()));
    std::fs::write(&path, text.as_bytes()).unwrap();
    let (ok, err) = ns.run("nft", &["-c", "-f", path.to_str().unwrap()]);
    let _ = std::fs::remove_file(&path);
    assert!(ok, "nft accepts the printed ruleset: {err}");
}

/// Without nft the rules cannot be applied: a failure (exit 1) that says
/// what to install, not a usage error (64).
#[test]
fn without_nft_apply_fails_with_exit_1_and_says_what_is_missing() {
    let out = Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args(["rules", "apply", "--port", "15001", "--dns-port", "15053"])
        .env("PATH", "/nonexistent")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("install the nftables package"));
}

/// Where a datagram to `dst` port 53, sent by `uid` inside `ns`, lands: at
/// the DNS proxy's port (redirected) or at the destination itself. One
/// python3 process binds both (as root) and sends from a child that takes
/// `uid` first.
fn dns_lands(ns: &Netns, uid: u32, dst: &str) -> String {
    let script = format!(
        r#"
import os, select, socket
proxy = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); proxy.bind(("0.0.0.0", 15053))
upstream = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); upstream.bind(("0.0.0.0", 53))
if os.fork() == 0:
    os.setgid({uid}); os.setuid({uid})
    socket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(b"q", ("{dst}", 53))
    os._exit(0)
os.wait()
ready, _, _ = select.select([proxy, upstream], [], [], 3)
print("proxy" if proxy in ready else "upstream" if upstream in ready else "lost")
"#
    );
    let (ok, out) = ns.run("python3", &["-c", &script]);
    assert!(ok, "{out}");
    out.trim().to_owned()
}

/// The node's DNS goes to the proxy — but not sluice's own lookups (its
/// user, when its sockets carry no mark), which would come straight back
/// to it, nor lookups to an excluded destination ("never intercepted").
#[test]
fn dns_is_redirected_except_from_sluices_own_user_and_to_excluded_destinations() {
    let ns = Netns::new("dns");
    assert!(ns.run("ip", &["link", "set", "lo", "up"]).0);
    assert!(ns.run("ip", &["addr", "add", "198.18.0.53/32", "dev", "lo"]).0);
    let apply = ["rules", "apply", "--mark", "0", "--uid", "990", "--exclude", "198.18.0.0/24"];
    let (ok, err) = ns.sluice(&apply);
    assert!(ok, "{err}");
    assert_eq!(dns_lands(&ns, 991, "127.0.0.1"), "proxy", "another user's lookup is intercepted");
    assert_eq!(dns_lands(&ns, 990, "127.0.0.1"), "upstream", "sluice's own lookup goes out");
    assert_eq!(dns_lands(&ns, 991, "198.18.0.53"), "upstream", "an excluded destination is not intercepted");
}

/// `--mark 0` without `--uid` leaves nothing to keep sluice's own traffic
/// out of its rules: refused as bad usage, nothing applied.
#[test]
fn apply_without_a_mark_or_a_user_is_refused() {
    let ns = Netns::new("guard");
    let out = Command::new("ip")
        .args(["netns", "exec", &ns.0, env!("CARGO_BIN_EXE_sluice"), "rules", "apply", "--mark", "0"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--mark 0 needs --uid"));
    assert_eq!(ns.run("nft", &["list", "ruleset"]).1.trim(), "", "nothing applied");
    assert!(ns.sluice(&["rules", "remove", "--mark", "0"]).0, "remove, given what apply was given, still removes");
}

/// A python3 script running in `ns`, its output read line by line.
struct Script(std::process::Child, std::io::BufReader<std::process::ChildStdout>);

impl Script {
    fn start(ns: &Netns, script: &str) -> Script {
        let mut child = Command::new("ip")
            .args(["netns", "exec", &ns.0, "python3", "-u", "-c", script])
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let out = std::io::BufReader::new(child.stdout.take().unwrap());
        Script(child, out)
    }

    fn line(&mut self) -> String {
        let mut line = String::new();
        std::io::BufRead::read_line(&mut self.1, &mut line).unwrap();
        line.trim().to_owned()
    }
}

impl Drop for Script {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A node (the rules, with the UDP drop) and a pod routed through it, each
/// in a namespace of the test's:
/// - the pod's lookup of a resolver elsewhere goes to the DNS proxy, and the
///   proxy's answer comes back to the pod through the UDP drop (a reply);
/// - the pod's lookup of the node's own address is the node's: sluice is no
///   resolver for whoever reaches the node's addresses (an open resolver on
///   a public interface), and a DNS server on the node keeps its clients;
/// - the node's own lookup, redirected to the proxy, passes the UDP drop
///   (by then its port is the proxy's), and is answered;
/// - the node's other UDP is dropped, but to an excluded port.
#[test]
fn dns_crosses_the_udp_drop_and_the_nodes_own_addresses_are_left_alone() {
    let (node, pod) = (Netns::new("node"), Netns::new("pod"));
    let (vn, vp) = (format!("sn{}", std::process::id()), format!("sp{}", std::process::id()));
    let link = ["link", "add", &vn, "netns", &node.0, "type", "veth", "peer", "name", &vp, "netns", &pod.0];
    assert!(Command::new("ip").args(link).status().unwrap().success());
    for (ns, dev, addr, via) in
        [(&node, &vn, "198.18.1.1/24", "198.18.1.2"), (&pod, &vp, "198.18.1.2/24", "198.18.1.1")]
    {
        for args in [
            vec!["link", "set", "lo", "up"],
            vec!["addr", "add", addr, "dev", dev],
            vec!["link", "set", dev, "up"],
            vec!["route", "add", "default", "via", via],
        ] {
            let (ok, err) = ns.run("ip", &args);
            assert!(ok, "ip {args:?}: {err}");
        }
    }
    let apply = ["rules", "apply", "--uid", "990", "--drop-udp", "--exclude-port", "9998"];
    let (ok, err) = node.sluice(&apply);
    assert!(ok, "{err}");

    // The node: the DNS proxy's port (answers what it gets) and a DNS server of its own.
    let mut servers = Script::start(
        &node,
        r#"
import select, socket
proxy = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); proxy.bind(("0.0.0.0", 15053))
own = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); own.bind(("0.0.0.0", 53))
print("ready")
while True:
    ready, _, _ = select.select([proxy, own], [], [], 10)
    if not ready: break
    for s in ready:
        data, peer = s.recvfrom(512)
        print(("proxy " if s is proxy else "own ") + data.decode())
        s.sendto(b"answer", peer)
"#,
    );
    assert_eq!(servers.line(), "ready");
    let ask = |ns: &Netns, uid: u32, what: &str, dst: &str, port: u16| {
        let script = format!(
            r#"
import os, socket
os.setgid({uid}); os.setuid({uid})
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(2)
try:
    s.sendto(b"{what}", ("{dst}", {port})); print(s.recv(512).decode())
except socket.timeout: print("no answer")
except PermissionError: print("dropped")
"#
        );
        let (ok, out) = ns.run("python3", &["-c", &script]);
        assert!(ok, "{out}");
        out.trim().to_owned()
    };
    assert_eq!(ask(&pod, 0, "pod-elsewhere", "198.18.9.9", 53), "answer", "the pod's lookup is answered");
    assert_eq!(servers.line(), "proxy pod-elsewhere", "by the proxy");
    assert_eq!(ask(&pod, 0, "pod-node", "198.18.1.1", 53), "answer");
    assert_eq!(servers.line(), "own pod-node", "the node's own address: its own DNS server answers");
    assert_eq!(ask(&node, 991, "node", "198.18.9.9", 53), "answer", "the node's lookup passes the UDP drop");
    assert_eq!(servers.line(), "proxy node");

    let mut pod_server = Script::start(
        &pod,
        r#"
import select, socket
ports = {}
for port in (9998, 9999):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(("0.0.0.0", port)); ports[s] = port
print("ready")
ready, _, _ = select.select(list(ports), [], [], 2)
print(" ".join(sorted(str(ports[s]) for s in ready)) or "nothing")
"#,
    );
    assert_eq!(pod_server.line(), "ready");
    assert_eq!(ask(&node, 991, "udp", "198.18.1.2", 9999), "dropped");
    ask(&node, 991, "udp", "198.18.1.2", 9998); // no answer: nobody answers there
    assert_eq!(pod_server.line(), "9998", "other UDP is dropped, but to an excluded port");
}
