//! The seed post's three options, end to end: the real `sluice run
//! --intercept` in a "node" namespace, a "pod" namespace routed through it,
//! a "world" namespace with a real HTTP server and a real authoritative DNS
//! server (dnsmasq), real `curl`, real nftables. Both the local process and
//! the pod resolve `httpbin.org` through the node's intercepted DNS.
#![allow(clippy::unwrap_used)]

mod common;

use std::process::Command;
use std::time::Duration;

use common::{Ns, Proc, Topology, metric, sh, start, wait_generation};

const REGISTRY_ONLY: &str = "apiVersion: sluice.dev/v1alpha1\nkind: EgressPolicy\nmetadata: {name: node}\nspec:\n  outboundTrafficPolicy: {mode: REGISTRY_ONLY}\n  workloads:\n  - name: pod\n    sources: [198.18.1.0/24]\n";
const HTTPBIN_EXT: &str = include_str!("../../policy/tests/fixtures/istio/httpbin-ext.yaml");

/// A real HTTP server in `world` on 198.18.2.20:80 serving `dir` (which
/// has a `uuid` file), answering before this returns.
fn serve_site(world: &Ns, dir: &str) -> Proc {
    let server = world.spawn("python3", &["-m", "http.server", "80", "--bind", "198.18.2.20", "--directory", dir]);
    for _ in 0..50 {
        if world.exec("curl -s -m 1 http://198.18.2.20/uuid").0 {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    server
}

#[test]
fn the_three_options_of_the_seed_from_a_process_and_from_a_pod() {
    // httpbin.org and an unregistered name share the server's IP (a CDN).
    let Topology { pod, node, world, .. } =
        &Topology::new('s', &[("httpbin.org", "198.18.2.20"), ("exfil.example.com", "198.18.2.20")]);
    let (pod, node, world) = (pod, node, world);
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
    let dir = site.path().display().to_string();
    let _server = serve_site(world, &dir);

    let policy = tempfile::tempdir().unwrap();
    let (sluice, _log) = start(node, policy.path());
    let curl =
        |ns: &Ns, host: &str| ns.exec(&format!("curl -s -m 5 -o - -w \"\\n%{{http_code}}\" http://{host}/uuid")).1;

    // 1. ALLOW_ANY: everything passes, as PassthroughCluster.
    for ns in [node, pod] {
        let out = curl(ns, "httpbin.org");
        assert!(out.ends_with("\n200") && out.contains("9f1c"), "{}: {out}", ns.0);
    }
    let pass = [("destination_service_name", "PassthroughCluster"), ("destination_service", "httpbin.org")];
    assert_eq!(metric(node, "istio_tcp_connections_opened_total", &pass), 2.0, "named from what DNS answered");
    let names = node.ok("curl -s 127.0.0.1:15090/debug/names?name=httpbin.org");
    assert!(names.contains("198.18.2.20"), "{names}");
    let answer = pod.ok("dig +short +time=2 +tries=1 exfil.example.com");
    assert_eq!(answer.trim(), "198.18.2.20", "the pod's DNS goes through sluice too");

    // A long download in flight while the mode flips to REGISTRY_ONLY: it keeps its verdict and completes intact.
    let download = |ns: &Ns, out: &str| {
        Command::new("ip")
            .args(["netns", "exec", &ns.0, "sh", "-c"])
            .arg(format!("curl -s -m 30 --limit-rate 8M -o {out} http://httpbin.org/big && sha256sum {out}"))
            .output()
            .unwrap()
    };
    // Bytes have arrived: the download's connection is spliced.
    let flowing = |out: &str| {
        let flowing = (0..250).any(|_| {
            std::thread::sleep(Duration::from_millis(20));
            std::fs::metadata(out).is_ok_and(|m| m.len() > 0)
        });
        assert!(flowing, "the download did not start");
    };
    let first_out = site.path().join("during-reload").display().to_string();
    let during_reload = std::thread::scope(|scope| {
        let job = scope.spawn(|| download(node, &first_out));
        flowing(&first_out);

        // 2. REGISTRY_ONLY without a ServiceEntry: 502, BlackHoleCluster, with source and destination.
        std::fs::write(policy.path().join("node.yaml"), REGISTRY_ONLY).unwrap();
        wait_generation(node, 2);
        assert!(!job.is_finished(), "the download was still under way when the reload took effect");
        for ns in [node, pod] {
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
    assert_eq!(metric(node, "istio_requests_total", &bh), 2.0);
    assert_eq!(
        metric(node, "istio_requests_total", &[bh[0], bh[1], ("source_workload", "pod")]),
        1.0,
        "the pod's attempt names its workload"
    );

    // 3. REGISTRY_ONLY with the seed's httpbin-ext ServiceEntry, added while running.
    std::fs::write(policy.path().join("httpbin-ext.yaml"), HTTPBIN_EXT).unwrap();
    wait_generation(node, 3);
    for ns in [node, pod] {
        let out = curl(ns, "httpbin.org");
        assert!(out.ends_with("\n200"), "{}: {out}", ns.0);
        let other = curl(ns, "exfil.example.com");
        assert!(other.ends_with("\n502"), "an unregistered host is still refused: {other}");
    }
    let se = [("destination_service_name", "httpbin.org"), ("destination_service", "httpbin.org")];
    assert_eq!(metric(node, "istio_tcp_connections_opened_total", &se), 2.0);

    // SIGTERM drains: a download in flight completes intact, then sluice exits 0 and its rules are gone.
    // The rules go first: while the download drains, the pod's DNS and new connections go straight out
    // instead of failing, and the DNS proxy still answers whatever reaches it.
    // The check that the rules stay in place (every 5 s) saw them unchanged through all of that traffic.
    let text = node.ok("curl -s 127.0.0.1:15090/metrics");
    assert!(text.lines().any(|l| l == "sluice_intercept_rules_restored_total 0"), "no false alarm");
    let mut sluice: Proc = sluice;
    let last_out = site.path().join("during-drain").display().to_string();
    let (drained, status) = std::thread::scope(|scope| {
        let job = scope.spawn(|| download(pod, &last_out));
        flowing(&last_out);
        assert!(sh(&format!("kill -TERM {}", sluice.0.id())).0);
        let released = (0..50).any(|_| {
            std::thread::sleep(Duration::from_millis(20));
            !node.ok("nft list table inet sluice").contains("redirect")
        });
        assert!(released, "interception ends as the drain begins");
        assert_eq!(pod.ok("dig +short +time=2 +tries=1 httpbin.org").trim(), "198.18.2.20");
        let proxy = node.ok("dig @127.0.0.1 -p 15053 +short +time=2 +tries=1 exfil.example.com");
        assert_eq!(proxy.trim(), "198.18.2.20", "the DNS proxy answers through the drain");
        assert!(curl(pod, "exfil.example.com").ends_with("\n200"), "new connections go straight out");
        assert!(sluice.0.try_wait().unwrap().is_none(), "all of this happened during the drain");
        let out = job.join().unwrap();
        (out, sluice.0.wait().unwrap())
    });
    assert!(
        String::from_utf8_lossy(&drained.stdout).starts_with(&want),
        "the transfer across SIGTERM arrived intact: {drained:?}"
    );
    assert_eq!(status.code(), Some(0));
    assert_eq!(node.ok("nft list ruleset").trim(), "", "--intercept removes its rules at exit");
}

/// Another nftables load that wipes sluice's table (Debian's
/// nftables.service begins with `flush ruleset`) opens a REGISTRY_ONLY node
/// only until sluice's next check: the table is put back, as it was.
#[test]
fn the_interception_rules_come_back_after_a_flush_ruleset() {
    let Topology { pod, node, world, .. } = &Topology::new('f', &[("httpbin.org", "198.18.2.20")]);
    let site = tempfile::tempdir().unwrap();
    std::fs::write(site.path().join("uuid"), "{\"uuid\": \"9f1c\"}\n").unwrap();
    let dir = site.path().display().to_string();
    let _server = serve_site(world, &dir);
    let policy = tempfile::tempdir().unwrap();
    std::fs::write(policy.path().join("node.yaml"), REGISTRY_ONLY).unwrap();
    let (_sluice, log) = start(node, policy.path());
    let code = || pod.exec("curl -s -m 5 -o /dev/null -w %{http_code} http://httpbin.org/uuid").1;
    // Three tries (a failure's details are printed): the point here is what follows.
    let mut first = String::new();
    for _ in 0..3 {
        first = code();
        if first == "502" {
            break;
        }
        eprintln!(
            "first request: {first}; curl -v: {}",
            pod.exec("curl -sv -m 5 -o /dev/null http://httpbin.org/uuid 2>&1").1
        );
        eprintln!("dig: {}", pod.exec("dig +time=2 +tries=1 httpbin.org 2>&1").1);
        for l in log.try_iter() {
            eprintln!("sluice: {l}");
        }
    }
    assert_eq!(first, "502", "refused while the rules are in place");
    let table = || node.exec("nft -s list table inet sluice").1;
    let installed = table();
    let restored = || {
        let text = node.ok("curl -s 127.0.0.1:15090/metrics");
        text.lines().find_map(|l| l.strip_prefix("sluice_intercept_rules_restored_total ")).map(str::to_owned)
    };
    node.ok("nft flush ruleset");
    // (Unless sluice's check, every 5 s, came in between.)
    let during = code();
    assert!(
        during == "200" || restored().as_deref() == Some("1"),
        "with the table gone the pod goes straight out: {during}"
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    while table() != installed {
        assert!(std::time::Instant::now() < deadline, "the table did not come back: {}", table());
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(code(), "502", "refused again");
    assert_eq!(restored().as_deref(), Some("1"), "counted once");
    assert!(log.try_iter().any(|l| l.contains("were removed by someone else")), "the restore was logged");
}
