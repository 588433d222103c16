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
