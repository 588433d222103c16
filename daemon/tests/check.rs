//! `sluice check`, black-box: the real binary on the shared fixtures
//! (copied into policy/tests/fixtures), exit codes and what it prints.

use std::path::PathBuf;
use std::process::{Command, Output};

fn fixtures(sub: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../policy/tests/fixtures").join(sub)
}

fn sluice(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_sluice")).args(args).output().unwrap_or_else(|e| panic!("cannot run sluice: {e}"))
}

fn check(extra: &[&str]) -> (i32, String, String) {
    let istio = fixtures("istio");
    let own = fixtures("sluice");
    let mut args = vec!["check", istio.to_str().unwrap_or_default(), own.to_str().unwrap_or_default()];
    args.extend_from_slice(extra);
    let out = sluice(&args);
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn valid_fixtures_exit_0_with_a_summary() {
    let (code, stdout, stderr) = check(&[]);
    assert_eq!(code, 0, "{stderr}");
    assert!(
        stdout.starts_with("policy OK: 6 files, 6 ServiceEntries, 7 hosts (2 wildcard), 1 ignored document\n"),
        "{stdout}"
    );
    assert!(stdout.contains("mode: REGISTRY_ONLY (enforce), from EgressPolicy node-default at "), "{stdout}");
    assert!(stdout.contains("deny ranges: 169.254.169.254/32, fd00:ec2::254/128"), "{stdout}");
    assert!(stdout.contains("ignored: networking.istio.io/v1 DestinationRule docs-mirror-tls"), "{stdout}");
    assert!(stderr.is_empty(), "{stderr}");
}

#[test]
fn each_bad_fixture_exits_1_with_file_line_column() {
    let dir = fixtures("bad");
    let mut files: Vec<PathBuf> =
        std::fs::read_dir(&dir).map(|rd| rd.filter_map(|e| e.ok().map(|e| e.path())).collect()).unwrap_or_default();
    files.sort();
    assert_eq!(files.len(), 11);
    for f in files {
        let path = f.to_str().unwrap_or_default();
        let out = sluice(&["check", path]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{path}: {stderr}");
        let first = stderr.lines().next().unwrap_or_default();
        let rest = first.strip_prefix(&format!("{path}:")).unwrap_or_else(|| panic!("{first}"));
        let mut parts = rest.splitn(3, ':');
        let line: u64 = parts.next().and_then(|l| l.parse().ok()).unwrap_or(0);
        let column: u64 = parts.next().and_then(|c| c.parse().ok()).unwrap_or(0);
        assert!(line >= 1 && column >= 1, "{first}");
        assert!(parts.next().is_some_and(|m| m.len() > 5), "{first}");
        assert!(stderr.contains("the policy was not loaded"), "{stderr}");
        assert!(out.stdout.is_empty());
    }
}

#[test]
fn explain_shows_the_verdict_and_why() {
    let (code, out, _) = check(&["--explain", "198.18.9.1:443", "--sni", "api.stripe.example"]);
    assert_eq!(code, 0);
    assert!(out.contains("verdict: ALLOW as ServiceEntry payment-apis (host api.stripe.example"), "{out}");
    assert!(out.contains("why: TLS SNI name matches a registered host"), "{out}");

    let (_, out, _) =
        check(&["--explain", "198.18.9.1:443", "--sni", "api.stripe.example", "--resolved-as", "evil.example"]);
    assert!(out.contains("verdict: REFUSE as BlackHoleCluster"), "{out}");
    assert!(out.contains("domain fronting"), "{out}");

    let (_, out, _) =
        check(&["--explain", "198.18.30.1:9300", "--resolved-as", "search.vendor.example", "--source", "198.18.21.9"]);
    assert!(out.contains("ALLOW as ServiceEntry search-cluster"), "{out}");
    assert!(out.contains("source workload: batch"), "{out}");

    let (_, out, _) = check(&["--explain", "169.254.169.254:80", "--host", "httpbin.org"]);
    assert!(out.contains("REFUSE as BlackHoleCluster") && out.contains("deny range 169.254.169.254/32"), "{out}");
    assert!(out.contains("502 Bad Gateway"), "{out}");

    let (_, out, _) = check(&["--explain", "[2001:db8:40::7]:5432"]);
    assert!(out.contains("ALLOW as ServiceEntry reporting-db") && out.contains("2001:db8:40::/48"), "{out}");
}

#[test]
fn bad_usage_exits_64_with_a_message() {
    for args in [
        &["check"][..],
        &["check", "x.yaml", "--explain", "httpbin.org:80"],
        &["check", "x.yaml", "--sni", "a.example"],
        &["frobnicate"],
    ] {
        let out = sluice(args);
        assert_eq!(out.status.code(), Some(64), "{args:?}");
        assert!(!out.stderr.is_empty(), "{args:?}");
    }
    let (code, _, err) = check(&["--explain", "httpbin.org:80"]);
    assert_eq!(code, 64);
    assert!(err.contains("--explain wants IP:PORT"), "{err}");
    assert_eq!(sluice(&["--version"]).status.code(), Some(0));
    assert_eq!(sluice(&["check", "--help"]).status.code(), Some(0));
}

#[test]
fn a_missing_path_is_an_error_not_an_empty_policy() {
    let out = sluice(&["check", "/nonexistent/policy.d"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/policy.d:1:1: cannot read"));
}

#[test]
fn shell_completions_are_generated() {
    for (style, marker) in
        [("bash", "_bpaf_dynamic_completion"), ("zsh", "#compdef sluice"), ("fish", "_bpaf_dynamic_completion")]
    {
        let out = sluice(&[&format!("--bpaf-complete-style-{style}")]);
        assert!(out.status.success(), "{style}");
        assert!(
            String::from_utf8_lossy(&out.stdout).contains(marker),
            "{style}: {}",
            String::from_utf8_lossy(&out.stdout)
        );
    }
}
