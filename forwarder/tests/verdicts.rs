//! The forwarder applies the policy: ServiceEntries by Host, SNI and DNS
//! name pass (the sniffed bytes arrive first, intact); the rest gets 502
//! (HTTP) or a reset under REGISTRY_ONLY; dry-run passes; a reload does not
//! touch open connections. Metrics are scraped as Prometheus text.
#![allow(clippy::unwrap_used)]

mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use common::{DRIVERS, Fwd, Netns, policy};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use sluice_forwarder::{ConnOutcome, Driver};
use sluice_policy::{Hostname, Retention, Timestamp};

const CLIENT_HELLO: &[u8] = include_bytes!("../src/sniff/client_hello_sni.bin"); // SNI api.stripe.example

fn prometheus() -> &'static PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE.get_or_init(|| {
        let recorder = PrometheusBuilder::new().build_recorder();
        let handle = recorder.handle();
        metrics::set_global_recorder(recorder).unwrap();
        handle
    })
}

/// The value of the one series of `metric` whose labels include all of `labels`.
fn series(metric: &str, labels: &[(&str, &str)]) -> f64 {
    let text = prometheus().render();
    let mut found = 0.0;
    for line in text.lines().filter(|l| l.starts_with(&format!("{metric}{{"))) {
        if labels.iter().all(|(k, v)| line.contains(&format!("{k}=\"{v}\""))) {
            found += line.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
        }
    }
    found
}

// Each test uses its own destination ports: the metrics recorder is shared by the whole binary.
const REGISTRY_ONLY: &str =
    "apiVersion: sluice.dev/v1alpha1\nkind: EgressPolicy\nspec:\n  outboundTrafficPolicy: {mode: REGISTRY_ONLY}\n";

fn entries(port_base: u16) -> String {
    format!(
        "{REGISTRY_ONLY}---
apiVersion: networking.istio.io/v1alpha3
kind: ServiceEntry
metadata: {{name: httpbin-ext}}
spec:
  hosts: [httpbin.test]
  ports: [{{number: {http}, name: http, protocol: HTTP}}]
  resolution: DNS
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: payments}}
spec:
  hosts: [api.stripe.example]
  ports: [{{number: {tls}, name: tls, protocol: TLS}}]
  resolution: DNS
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: search}}
spec:
  hosts: [search.vendor.test]
  ports: [{{number: {tcp}, name: transport, protocol: TCP}}]
  resolution: DNS
",
        http = port_base,
        tls = port_base + 1,
        tcp = port_base + 2,
    )
}

/// A server thread; [`join`](Self::join) ends it once no connection waits
/// to be accepted, and returns what each connection sent (dropping it ends
/// it too).
struct Server {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<Vec<Vec<u8>>>>,
}

impl Server {
    fn join(mut self) -> std::thread::Result<Vec<Vec<u8>>> {
        self.stop.store(true, Ordering::SeqCst);
        self.thread.take().map_or(Ok(Vec::new()), |t| t.join())
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

/// A server on `dst` that records what each connection sent (until EOF or
/// a pause) and answers `reply`. Counts accepted connections. It serves
/// until joined (at most 60 s).
fn server(ns: &Netns, dst: SocketAddr, reply: &'static [u8]) -> (Arc<AtomicUsize>, Server) {
    let accepted = Arc::new(AtomicUsize::new(0));
    let count = accepted.clone();
    let stop = Arc::new(AtomicBool::new(false));
    let stopped = stop.clone();
    let l = ns.within(move || TcpListener::bind(dst).unwrap());
    l.set_nonblocking(true).unwrap();
    let thread = std::thread::spawn(move || {
        let mut got = Vec::new();
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        while std::time::Instant::now() < deadline {
            match l.accept() {
                Ok((mut s, _)) => {
                    count.fetch_add(1, Ordering::SeqCst);
                    s.set_nonblocking(false).unwrap();
                    // Clients half-close once they have sent everything: the reply follows the whole request.
                    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
                    let mut buf = Vec::new();
                    let mut chunk = [0u8; 4096];
                    while let Ok(n) = s.read(&mut chunk) {
                        if n == 0 {
                            break;
                        }
                        buf.extend_from_slice(&chunk[..n]);
                    }
                    let _ = s.write_all(reply);
                    got.push(buf);
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock && stopped.load(Ordering::SeqCst) => break,
                Err(e) if e.kind() == ErrorKind::WouldBlock => std::thread::sleep(Duration::from_millis(10)),
                Err(e) => panic!("{e}"),
            }
        }
        got
    });
    (accepted, Server { stop, thread: Some(thread) })
}

/// Connects to `dst` inside `ns`, sends `bytes` and half-closes, returns the reply (or the error kind).
fn exchange(ns: &Netns, dst: SocketAddr, bytes: &'static [u8]) -> Result<Vec<u8>, ErrorKind> {
    ns.within(move || {
        let mut c = TcpStream::connect(dst).map_err(|e| e.kind())?;
        c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        c.write_all(bytes).map_err(|e| e.kind())?;
        // A refused connection may be reset already: what it does shows in the read.
        let _ = c.shutdown(std::net::Shutdown::Write);
        let mut reply = Vec::new();
        c.read_to_end(&mut reply).map_err(|e| e.kind())?;
        Ok(reply)
    })
}

#[test]
fn registry_only_passes_service_entries_and_refuses_the_rest() {
    prometheus(); // installed before any worker registers a handle
    for (i, driver) in DRIVERS.into_iter().enumerate() {
        let base = 8000 + 10 * i as u16;
        let ns = Netns::new();
        let fwd = Fwd::start(&ns, driver, &entries(base), |_| {});
        ns.redirect_to(&fwd);
        let ip = ns.v4(2);
        let (http, tls, tcp, other) = (
            SocketAddr::new(ip, base),
            SocketAddr::new(ip, base + 1),
            SocketAddr::new(ip, base + 2),
            SocketAddr::new(ip, base + 3),
        );
        let servers =
            [http, tls, tcp, other].map(|a| server(&ns, a, b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"));

        // HTTP by Host: passes, the request arrives whole.
        let req: &'static [u8] = b"GET /uuid HTTP/1.1\r\nHost: httpbin.test\r\n\r\n";
        let reply = exchange(&ns, http, req).unwrap();
        assert!(reply.starts_with(b"HTTP/1.1 200 OK"), "{driver:?}: {}", String::from_utf8_lossy(&reply));
        // An unregistered Host on the same port: 502 naming the host and why.
        let reply = exchange(&ns, http, b"GET / HTTP/1.1\r\nHost: exfil.evil.test\r\n\r\n").unwrap();
        let text = String::from_utf8_lossy(&reply);
        assert!(text.starts_with("HTTP/1.1 502 Bad Gateway\r\n"), "{text}");
        assert!(text.contains("exfil.evil.test") && text.contains("not registered, mode REGISTRY_ONLY"), "{text}");
        // TLS by SNI: passes, and the upstream gets the ClientHello byte for byte.
        let reply = exchange(&ns, tls, CLIENT_HELLO).unwrap();
        assert!(reply.starts_with(b"HTTP/1.1 200"), "{driver:?}");
        // Opaque TCP to a name DNS gave: passes; to an unknown IP: reset.
        let keep = Retention { min_ttl: Duration::from_secs(5), grace: Duration::from_secs(60) };
        let now = Timestamp::now();
        fwd.names.record(ip, &Hostname::parse("search.vendor.test").unwrap(), Duration::from_secs(60), now, keep);
        assert!(exchange(&ns, tcp, b"\x00\x01binary").unwrap().starts_with(b"HTTP/1.1 200"));
        let refused = exchange(&ns, other, b"\x00\x01binary");
        assert!(matches!(refused, Err(ErrorKind::ConnectionReset) | Ok(_)), "{refused:?}");
        assert!(refused.as_ref().map_or(true, Vec::is_empty), "a refused opaque connection gets no bytes");

        let reports = fwd.wait_reports(5);
        let outcomes: Vec<_> = reports.iter().map(|r| r.outcome).collect();
        assert_eq!(outcomes.iter().filter(|o| **o == ConnOutcome::Refused502).count(), 1, "{outcomes:?}");
        assert_eq!(outcomes.iter().filter(|o| **o == ConnOutcome::RefusedReset).count(), 1, "{outcomes:?}");
        drop(fwd);
        let got: Vec<Vec<Vec<u8>>> = servers
            .into_iter()
            .map(|(n, h)| {
                let got = h.join().unwrap();
                assert_eq!(n.load(Ordering::SeqCst), got.len());
                got
            })
            .collect();
        assert_eq!(got[0], vec![req.to_vec()], "only the registered HTTP request reached the server, whole");
        assert_eq!(got[1], vec![CLIENT_HELLO.to_vec()], "the ClientHello read for SNI is forwarded first, intact");
        assert_eq!(got[2].len(), 1);
        assert!(got[3].is_empty(), "nothing reached the unregistered destination");

        let port = base.to_string();
        let bh = [("destination_service_name", "BlackHoleCluster"), ("destination_port", port.as_str())];
        assert_eq!(
            series(
                "istio_requests_total",
                &[bh[0], bh[1], ("response_code", "502"), ("destination_service", "exfil.evil.test")]
            ),
            1.0
        );
        let ok = [
            ("destination_service_name", "httpbin.test"),
            ("destination_service", "httpbin.test"),
            ("destination_port", port.as_str()),
        ];
        assert_eq!(series("istio_tcp_connections_opened_total", &ok), 1.0);
        assert_eq!(series("istio_tcp_connections_closed_total", &ok), 1.0);
        assert_eq!(series("istio_tcp_received_bytes_total", &ok), req.len() as f64, "request bytes");
        assert!(series("istio_tcp_sent_bytes_total", &ok) >= 40.0, "response bytes");
        let other_port = (base + 3).to_string();
        assert_eq!(
            series(
                "istio_tcp_connections_opened_total",
                &[("destination_service_name", "BlackHoleCluster"), ("destination_port", other_port.as_str())]
            ),
            1.0
        );
    }
}

#[test]
fn dry_run_passes_what_enforcement_would_refuse() {
    for (i, driver) in DRIVERS.into_iter().enumerate() {
        let port = 8100 + i as u16;
        let ns = Netns::new();
        let yaml = format!("{REGISTRY_ONLY}  enforcement: dry-run\n");
        let fwd = Fwd::start(&ns, driver, &yaml, |_| {});
        ns.redirect_to(&fwd);
        let dst = SocketAddr::new(ns.v4(3), port);
        let (_, h) = server(&ns, dst, b"pong");
        assert_eq!(exchange(&ns, dst, b"ping").unwrap(), b"pong");
        let r = &fwd.wait_reports(1)[0];
        let v = r.verdict.as_ref().unwrap();
        assert!(v.allow && v.would_deny, "{v:?}");
        drop(fwd);
        assert_eq!(h.join().unwrap(), vec![b"ping".to_vec()]);
    }
}

#[test]
fn a_reload_leaves_open_connections_alone() {
    for driver in DRIVERS {
        let ns = Netns::new();
        let fwd = Fwd::start(&ns, driver, "", |_| {}); // ALLOW_ANY
        ns.redirect_to(&fwd);
        let dst = SocketAddr::new(ns.v4(4), 8200);
        let (c, mut s) = ns.connected(dst);
        // Mode flips to REGISTRY_ONLY while the connection is open.
        fwd.policy.store(Arc::new(policy(REGISTRY_ONLY)));
        (&c).write_all(b"still here").unwrap();
        let mut buf = [0u8; 10];
        s.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"still here", "{driver:?}: the open connection keeps its verdict");
        // A new connection sees the new policy.
        let refused = ns.within(move || {
            let mut c = TcpStream::connect(dst).unwrap();
            c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            let _ = c.write_all(b"x");
            let mut b = [0u8; 1];
            c.read(&mut b).map_err(|e| e.kind())
        });
        assert!(matches!(refused, Err(ErrorKind::ConnectionReset) | Ok(0)), "{refused:?}");
        drop(c);
    }
}

/// A long-lived connection's bytes show in the metrics while it is open.
#[test]
fn bytes_are_counted_while_the_connection_is_open() {
    prometheus();
    for (i, driver) in DRIVERS.into_iter().enumerate() {
        let port = 8300 + i as u16;
        let ns = Netns::new();
        let fwd = Fwd::start(&ns, driver, "", |_| {});
        ns.redirect_to(&fwd);
        let dst = SocketAddr::new(ns.v4(5), port);
        let (c, mut s) = ns.connected(dst);
        (&c).write_all(&[3u8; 100_000]).unwrap();
        let mut got = vec![0u8; 100_000];
        s.read_exact(&mut got).unwrap();
        s.write_all(&[4u8; 7_000]).unwrap();
        let mut back = vec![0u8; 7_000];
        (&c).read_exact(&mut back).unwrap();
        let p = port.to_string();
        let labels = [("destination_port", p.as_str()), ("destination_service_name", "PassthroughCluster")];
        // The forwarder counts right after each splice; the client may read first. Poll, bounded.
        let eventually = |metric: &str, want: f64| {
            let mut v = 0.0;
            for _ in 0..200 {
                v = series(metric, &labels);
                if v == want {
                    break;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            v
        };
        assert_eq!(eventually("istio_tcp_received_bytes_total", 100_000.0), 100_000.0, "{driver:?}: request bytes");
        assert_eq!(eventually("istio_tcp_sent_bytes_total", 7_000.0), 7_000.0, "{driver:?}: response bytes");
        assert_eq!(series("istio_tcp_connections_closed_total", &labels), 0.0, "still open");
        drop((c, s));
    }
}

/// ALLOW_ANY with an HTTP ServiceEntry on `port`, so connections to it are
/// sniffed (for up to 5 s), and the forwarder redirected to: the namespace,
/// the forwarder, and a destination on that port.
fn sniffing(driver: Driver, port: u16) -> (Netns, Fwd, SocketAddr) {
    let ns = Netns::new();
    let allow_any_with_http = entries(port).replace("REGISTRY_ONLY", "ALLOW_ANY");
    let fwd = Fwd::start(&ns, driver, &allow_any_with_http, |c| c.sniff_timeout = Duration::from_secs(5));
    ns.redirect_to(&fwd);
    let dst = SocketAddr::new(ns.v4(7), port);
    (ns, fwd, dst)
}

/// A client that resets while its first bytes are being sniffed is reset in
/// turn: its partial request never reaches the upstream as if it were whole
/// (after a reset, reads return EOF; a FIN to the upstream would look like a
/// complete, short request).
#[test]
fn a_client_reset_while_sniffed_reaches_no_upstream() {
    for driver in DRIVERS {
        let (ns, fwd, dst) = sniffing(driver, 8500);
        let (accepted, server) = server(&ns, dst, b"");
        ns.within(move || {
            let mut c = TcpStream::connect(dst).unwrap();
            c.write_all(b"POST /transfer HTTP/1.1\r\nHost: ht").unwrap();
            std::thread::sleep(Duration::from_millis(300)); // read by the forwarder, which waits for more
            socket2::SockRef::from(&c).set_linger(Some(Duration::ZERO)).unwrap();
        }); // closed with SO_LINGER 0: a reset
        let r = &fwd.wait_reports(1)[0];
        assert_eq!(r.outcome, ConnOutcome::ClientFailed, "{driver:?}");
        std::thread::sleep(Duration::from_millis(300));
        assert_eq!(accepted.load(Ordering::SeqCst), 0, "{driver:?}: nothing was forwarded");
        drop(fwd);
        drop(server);
    }
}

/// A refused POST gets its 502, and the client can finish sending its body:
/// the forwarder reads and drops the rest of the request before closing (a
/// close with unread bytes sends a reset, and a client still sending — curl
/// with a body — then fails with "connection reset" and never reads the 502).
#[test]
fn a_refused_request_with_a_body_still_gets_its_502() {
    for driver in DRIVERS {
        let ns = Netns::new();
        let fwd = Fwd::start(&ns, driver, &entries(8400), |_| {});
        ns.redirect_to(&fwd);
        let dst = SocketAddr::new(ns.v4(8), 8400); // HTTP port, but an unregistered Host
        let (sent, reply) = ns.within(move || {
            let c = TcpStream::connect(dst).unwrap();
            c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            let body = vec![b'x'; 200 << 10];
            let head =
                format!("POST /upload HTTP/1.1\r\nHost: exfil.evil.test\r\ncontent-length: {}\r\n\r\n", body.len());
            let mut w = c.try_clone().unwrap();
            let writer = std::thread::spawn(move || {
                w.write_all(head.as_bytes())?;
                // Slower than the forwarder's answer: the 502 comes while the body is still being sent.
                for chunk in body.chunks(8 << 10) {
                    w.write_all(chunk)?;
                    std::thread::sleep(Duration::from_millis(2));
                }
                w.shutdown(std::net::Shutdown::Write)
            });
            let mut reply = Vec::new();
            let got = (&c).read_to_end(&mut reply).map(|_| reply).map_err(|e| e.kind());
            (writer.join().unwrap().map_err(|e| e.kind()), got)
        });
        let reply = reply.unwrap_or_else(|e| panic!("{driver:?}: {e:?} instead of the 502"));
        assert!(reply.starts_with(b"HTTP/1.1 502 Bad Gateway\r\n"), "{driver:?}: {}", String::from_utf8_lossy(&reply));
        assert_eq!(sent, Ok(()), "{driver:?}: the client could send its whole body");
        assert_eq!(fwd.wait_reports(1)[0].outcome, ConnOutcome::Refused502);
    }
}

/// On a port no HTTP or TLS ServiceEntry serves, a connection is judged by
/// what DNS said of its destination alone (opaque TCP): a Host the client
/// sends to an address DNS never named, read only to choose between a 502
/// and a reset, does not turn the refusal into a pass — though a TCP
/// ServiceEntry on that port names that host.
#[test]
fn a_name_sent_on_an_opaque_port_vouches_for_nothing() {
    for (i, driver) in DRIVERS.into_iter().enumerate() {
        let base = 8700 + 10 * i as u16;
        let ns = Netns::new();
        let fwd = Fwd::start(&ns, driver, &entries(base), |_| {});
        ns.redirect_to(&fwd);
        let dst = SocketAddr::new(ns.v4(9), base + 2); // search.vendor.test's TCP port; no DNS name for the address
        let (accepted, server) = server(&ns, dst, b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok");
        let reply = exchange(&ns, dst, b"GET / HTTP/1.1\r\nHost: search.vendor.test\r\n\r\n").unwrap();
        let text = String::from_utf8_lossy(&reply);
        assert!(text.starts_with("HTTP/1.1 502 Bad Gateway\r\n"), "{driver:?}: {text}");
        assert!(text.contains("search.vendor.test"), "{driver:?}: the 502 names the host asked for: {text}");
        let r = &fwd.wait_reports(1)[0];
        assert_eq!(r.outcome, ConnOutcome::Refused502, "{driver:?}");
        assert!(!r.verdict.as_ref().unwrap().allow, "{driver:?}");
        drop(fwd);
        assert!(server.join().unwrap().is_empty(), "{driver:?}: nothing reached the destination");
        assert_eq!(accepted.load(Ordering::SeqCst), 0);
    }
}

/// A client that trickles its first bytes one at a time (a request head of
/// 1,000 bytes, a byte a millisecond) is given up on after a few dozen
/// reads and judged without a name — not parsed again in full at every
/// byte until the sniff deadline, which cost the worker a parse of the
/// whole buffer per byte (quadratic in the bytes). Its bytes all still
/// arrive.
#[test]
fn a_client_trickling_its_first_bytes_is_not_parsed_at_every_byte() {
    for driver in DRIVERS {
        let (ns, fwd, dst) = sniffing(driver, 8600);
        let (_accepted, server) = server(&ns, dst, b"");
        let mut head = b"GET / HTTP/1.1\r\nHost: httpbin.test\r\nX-Pad: ".to_vec();
        head.resize(996, b'p');
        head.extend_from_slice(b"\r\n\r\n");
        let sent = head.clone();
        ns.within(move || {
            let mut c = TcpStream::connect(dst).unwrap();
            c.set_nodelay(true).unwrap();
            for b in &head {
                c.write_all(&[*b]).unwrap();
                std::thread::sleep(Duration::from_millis(1));
            }
            c.shutdown(std::net::Shutdown::Write).unwrap(); // the server reads to the end
        });
        let r = &fwd.wait_reports(1)[0];
        let v = r.verdict.as_ref().unwrap();
        assert!(v.name.is_none() && !r.http, "{driver:?}: judged without sniffing the head: {v:?}");
        drop(fwd);
        assert_eq!(server.join().unwrap()[0], sent, "{driver:?}: every byte arrived");
    }
}
