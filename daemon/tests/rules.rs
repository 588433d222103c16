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
