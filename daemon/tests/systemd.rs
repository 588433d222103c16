//! The shipped systemd unit: `systemd-analyze verify` accepts it and
//! `systemd-analyze security --offline=yes` rates it "OK" or better; the
//! example configuration and policy load.
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::process::Command;

fn repo(p: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(p)
}

/// The unit with ExecStart pointing at the binary under test.
fn unit_under_test(dir: &Path) -> std::path::PathBuf {
    let text = std::fs::read_to_string(repo("systemd/sluice.service")).unwrap();
    let path = dir.join("sluice.service");
    std::fs::write(&path, text.replace("/usr/local/bin/sluice", env!("CARGO_BIN_EXE_sluice"))).unwrap();
    path
}

#[test]
fn the_unit_verifies_and_its_exposure_is_ok() {
    if Command::new("systemd-analyze").arg("--version").output().is_err() {
        panic!("systemd-analyze is needed (package systemd)");
    }
    let dir = tempfile::tempdir().unwrap();
    let unit = unit_under_test(dir.path());
    let out = Command::new("systemd-analyze").arg("verify").arg(&unit).output().unwrap();
    assert!(out.status.success() && out.stderr.is_empty(), "{}", String::from_utf8_lossy(&out.stderr));
    let out = Command::new("systemd-analyze").args(["security", "--offline=yes"]).arg(&unit).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text.lines().find(|l| l.contains("Overall exposure level")).unwrap_or_else(|| panic!("{text}"));
    let score: f64 =
        line.split(':').nth(1).and_then(|s| s.split_whitespace().next()).and_then(|s| s.parse().ok()).unwrap();
    assert!(score < 5.0, "exposure {score} is worse than OK: {line}");
}

#[test]
fn the_example_policy_directory_is_valid() {
    let out = Command::new(env!("CARGO_BIN_EXE_sluice"))
        .arg("check")
        .arg(repo("systemd/etc/sluice/policy.d"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}
