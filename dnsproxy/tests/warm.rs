//! Keeping registered names warm: hosts of `resolution: DNS` ServiceEntries
//! are in the table without any client asking, are refreshed at their TTL,
//! and a policy reload adds new ones.
#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;

use common::{Background, Upstream, config, names, shared, snapshot, wait_for};
use sluice_dnsproxy::{registered_hosts, warm};

fn entry(name: &str, host: &str, resolution: &str) -> String {
    format!(
        "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {{name: {name}}}\nspec:\n  \
         hosts: [\"{host}\"]\n  ports: [{{number: 443, name: https, protocol: HTTPS}}]\n  resolution: {resolution}\n"
    )
}

fn policy(extra: &[(&str, &str, &str)]) -> String {
    let mut docs = vec![
        entry("api", "api.sluice.test", "DNS"),
        entry("www", "www.sluice.test", "DNS_ROUND_ROBIN"),
        entry("short", "short.sluice.test", "DNS"),
        entry("wild", "*.wild.sluice.test", "NONE"),
        entry("static", "mx.sluice.test", "NONE"),
    ];
    docs.extend(extra.iter().map(|(n, h, r)| entry(n, h, r)));
    docs.join("---\n")
}

#[test]
fn registered_hosts_are_dns_resolved_exact_hosts() {
    let hosts: Vec<String> = registered_hosts(&snapshot(&policy(&[]))).iter().map(ToString::to_string).collect();
    assert_eq!(hosts, ["api.sluice.test", "short.sluice.test", "www.sluice.test"]);
}

#[test]
fn registered_hosts_are_resolved_refreshed_and_follow_reloads() {
    let up = Upstream::start();
    let sh = shared(Some(&policy(&[])));
    let s = sh.clone();
    let upstream = up.addr;
    let _warmer = Background::spawn(move |shutdown| warm(config(vec![upstream]), s, shutdown));

    wait_for("api", || names(&sh.names, "192.0.2.10") == ["api.sluice.test"]);
    wait_for("api AAAA", || names(&sh.names, "2001:db8::10") == ["api.sluice.test"]);
    wait_for("the www chain", || names(&sh.names, "198.51.100.7").len() == 3);
    wait_for("short", || names(&sh.names, "192.0.2.60") == ["short.sluice.test"]);
    assert!(names(&sh.names, "192.0.2.50").is_empty(), "wildcards are not resolved");

    // short.sluice.test has a 2 s TTL: it is asked again within a few seconds.
    let asked = up.seen();
    wait_for("a refresh", || up.seen() > asked);

    sh.policy.store(Arc::new(snapshot(&policy(&[("one", "one.sluice.test", "DNS")]))));
    wait_for("the reloaded entry", || names(&sh.names, "203.0.113.99") == ["one.sluice.test"]);
}

/// How often this process's thread named `name` has gone to sleep and
/// been woken (`voluntary_ctxt_switches`).
fn thread_wakes(name: &str) -> u64 {
    for task in std::fs::read_dir("/proc/self/task").unwrap().flatten() {
        let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
        if comm.trim() == name {
            let status = std::fs::read_to_string(task.path().join("status")).unwrap();
            let line = status.lines().find(|l| l.starts_with("voluntary_ctxt_switches:")).unwrap();
            return line.split_whitespace().nth(1).unwrap().parse().unwrap();
        }
    }
    panic!("no thread {name}");
}

/// More hosts due than lookups allowed at once, against an upstream that
/// never answers: the warmer waits for a lookup to end, it does not spin.
#[test]
fn a_backlog_of_hosts_does_not_spin_the_warmer() {
    let silent = std::net::UdpSocket::bind("127.0.0.1:0").unwrap(); // reads nothing, answers nothing
    let hosts: Vec<(String, String, &str)> =
        (0..40).map(|i| (format!("h{i}"), format!("h{i}.sluice.test"), "DNS")).collect();
    let extra: Vec<(&str, &str, &str)> = hosts.iter().map(|(n, h, r)| (n.as_str(), h.as_str(), *r)).collect();
    let sh = shared(Some(&policy(&extra)));
    let cfg = sluice_dnsproxy::Config {
        timeout: std::time::Duration::from_secs(2),
        ..config(vec![silent.local_addr().unwrap()])
    };
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let warmer = std::thread::Builder::new()
        .name("warm-backlog".into())
        .spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            rt.block_on(warm(cfg, sh, async move {
                let _ = stopped.await;
            }))
        })
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(300));
    let before = thread_wakes("warm-backlog");
    std::thread::sleep(std::time::Duration::from_millis(1500));
    let woken = thread_wakes("warm-backlog") - before;
    let _ = stop.send(());
    warmer.join().unwrap().unwrap();
    // Polling for the backlog, it woke every millisecond (~1,500 times), each time walking every host.
    assert!(woken < 100, "the warmer woke {woken} times in 1.5 s");
}
