//! TLS by SNI and dry-run, end to end: the real `sluice run --intercept`, a
//! real TLS server in the "world", real `curl` resolving through sluice.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::{Topology, metric, sh, start, wait_generation};

const PAYMENTS: &str = "apiVersion: sluice.dev/v1alpha1\nkind: EgressPolicy\nmetadata: {name: node}\nspec:\n  outboundTrafficPolicy: {mode: REGISTRY_ONLY}\n---\napiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {name: payment-apis}\nspec:\n  hosts: [api.stripe.example]\n  ports: [{number: 443, name: https, protocol: TLS}]\n  resolution: DNS\n";

const TLS_SERVER: &str = r#"
import http.server, ssl, sys
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
ctx.load_cert_chain(sys.argv[1], sys.argv[2])
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = b"paid\n"
        self.send_response(200); self.send_header("content-length", str(len(body))); self.end_headers(); self.wfile.write(body)
    def log_message(self, *a): pass
s = http.server.HTTPServer(("0.0.0.0", 443), H)
s.socket = ctx.wrap_socket(s.socket, server_side=True)
s.serve_forever()
"#;

#[test]
fn tls_is_judged_by_sni_fronting_is_refused_and_dry_run_only_logs() {
    let t = Topology::new('t', &[("api.stripe.example", "198.18.2.20"), ("evil.example", "198.18.2.21")]);
    let dir = tempfile::tempdir().unwrap();
    let (cert, key, script) = (dir.path().join("c.pem"), dir.path().join("k.pem"), dir.path().join("tls.py"));
    let (ok, out) = sh(&format!(
        "openssl req -x509 -newkey rsa:2048 -nodes -days 1 -subj /CN=api.stripe.example -addext subjectAltName=DNS:api.stripe.example,DNS:evil.example -keyout {} -out {} 2>&1",
        key.display(),
        cert.display()
    ));
    assert!(ok, "{out}");
    std::fs::write(&script, TLS_SERVER).unwrap();
    let args = [script.display().to_string(), cert.display().to_string(), key.display().to_string()];
    let _server = t.world.spawn("python3", &[&args[0], &args[1], &args[2]]);
    for _ in 0..50 {
        if t.world.exec("curl -sk -m 1 https://198.18.2.20/").0 {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let policy = tempfile::tempdir().unwrap();
    std::fs::write(policy.path().join("payments.yaml"), PAYMENTS).unwrap();
    let (_sluice, log) = start(&t.node, policy.path());
    let curl = |extra: &str, url: &str| t.pod.exec(&format!("curl -sk -m 5 {extra} {url}"));

    // Registered by SNI: passes.
    let (ok, body) = curl("", "https://api.stripe.example/");
    assert!(ok && body == "paid\n", "{body}");
    // An unregistered SNI: reset (TLS has no way to say 502).
    assert!(!curl("", "https://evil.example/").0, "an unregistered name is refused");
    // Domain fronting: the registered name in SNI, sent to an IP DNS gave for evil.example.
    let (fronted, _) = curl("--connect-to api.stripe.example:443:198.18.2.21:443", "https://api.stripe.example/");
    assert!(!fronted, "a SNI that DNS contradicts is refused");
    let se = [("destination_service_name", "api.stripe.example"), ("destination_port", "443")];
    assert_eq!(metric(&t.node, "istio_tcp_connections_opened_total", &se), 1.0);
    assert_eq!(
        metric(&t.node, "istio_tcp_connections_opened_total", &[("destination_service_name", "BlackHoleCluster")]),
        2.0
    );
    let verdicts = |v: &str| metric(&t.node, "sluice_forwarder_verdicts_total", &[("verdict", v)]);
    assert_eq!((verdicts("serviceentry"), verdicts("blackhole")), (1.0, 2.0));
    let text = t.node.ok("curl -s 127.0.0.1:15090/metrics");
    assert!(text.contains("sluice_forwarder_verdicts_total{verdict=\"would_deny\"} 0"), "there at 0 from the start");

    // Dry-run: the same attempts pass, and the log says what enforcement would have refused.
    std::fs::write(
        policy.path().join("payments.yaml"),
        PAYMENTS.replace("REGISTRY_ONLY}\n", "REGISTRY_ONLY}\n  enforcement: dry-run\n"),
    )
    .unwrap();
    wait_generation(&t.node, 2);
    let (ok, body) = curl("", "https://evil.example/");
    assert!(ok && body == "paid\n", "dry-run never refuses: {body}");
    // The line is written when the connection ends: wait for it (bounded).
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let mut seen = false;
    while !seen && std::time::Instant::now() < deadline {
        if let Ok(l) = log.recv_timeout(Duration::from_millis(100)) {
            seen = l.contains("dry-run: would refuse") && l.contains("evil.example");
        }
    }
    assert!(seen, "the dry-run refusal was not logged");
    assert_eq!(verdicts("would_deny"), 1.0, "counted apart from passthrough");
    assert_eq!(verdicts("blackhole"), 2.0);
}
