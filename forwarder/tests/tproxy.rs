//! TPROXY interception: a "pod" namespace routed through the "node" where
//! the forwarder listens with IP_TRANSPARENT, to a server in a "world"
//! namespace. The destination is the accepted socket's local address.
#![allow(clippy::unwrap_used)]

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::Duration;

use common::{DRIVERS, Fwd, Netns, run};
use sluice_forwarder::{ConnOutcome, Intercept, Listen};

/// Links `a` and `b` with a veth pair named after them.
fn link(a: &Netns, a_if: &str, b: &Netns, b_if: &str) {
    run(&format!("ip link add name {a_if} netns {} type veth peer name {b_if} netns {}", a.name, b.name));
    a.exec(&format!("ip link set {a_if} up"));
    b.exec(&format!("ip link set {b_if} up"));
}

#[test]
fn tproxy_destination_is_the_local_address_v4_and_v6() {
    for driver in DRIVERS {
        let (pod, node, world) = (Netns::new(), Netns::new(), Netns::new());
        let (p, w) = (pod.n, world.n);
        link(&pod, "pod0", &node, "node0");
        link(&node, "node1", &world, "world0");
        pod.exec(&format!(
            "ip addr add 198.18.{p}.10/24 dev pod0 && ip -6 addr add 2001:db8:{p}::10/64 dev pod0 nodad"
        ));
        node.exec(&format!(
            "ip addr add 198.18.{p}.254/24 dev node0 && ip -6 addr add 2001:db8:{p}::fe/64 dev node0 nodad"
        ));
        node.exec(&format!(
            "ip addr add 198.18.{w}.254/24 dev node1 && ip -6 addr add 2001:db8:{w}::fe/64 dev node1 nodad"
        ));
        world.exec(&format!(
            "ip addr add 198.18.{w}.20/24 dev world0 && ip -6 addr add 2001:db8:{w}::20/64 dev world0 nodad"
        ));
        pod.exec(&format!("ip route add default via 198.18.{p}.254 && ip -6 route add default via 2001:db8:{p}::fe"));
        world.exec(&format!("ip route add default via 198.18.{w}.254 && ip -6 route add default via 2001:db8:{w}::fe"));
        node.exec("sysctl -qw net.ipv4.conf.all.rp_filter=0 net.ipv4.conf.default.rp_filter=0");
        node.exec("ip rule add fwmark 1 lookup 100 && ip route add local 0.0.0.0/0 dev lo table 100");
        node.exec("ip -6 rule add fwmark 1 lookup 100 && ip -6 route add local ::/0 dev lo table 100");

        let fwd = Fwd::start(&node, driver, "", |c| {
            c.listen = vec![
                Listen { addr: "0.0.0.0:0".parse().unwrap(), intercept: Intercept::Tproxy },
                Listen { addr: "[::]:0".parse().unwrap(), intercept: Intercept::Tproxy },
            ];
        });
        let h = fwd.handle.as_ref().unwrap();
        let (p4, p6) = (h.local_addrs[0].port(), h.local_addrs[1].port());
        // The ruleset docs/forwarder.md gives operators ("TPROXY rules"), with the pods' interface and ports.
        node.nft(&format!(
            "table inet sluice_tproxy {{
  chain prerouting {{
    type filter hook prerouting priority mangle; policy accept;
    iifname != \"node0\" return
    meta l4proto != tcp return
    fib daddr type local return
    meta nfproto ipv4 meta l4proto tcp tproxy ip to :{p4} meta mark set 1 accept
    meta nfproto ipv6 meta l4proto tcp tproxy ip6 to :{p6} meta mark set 1 accept
  }}
}}"
        ));

        // The third: a real destination on the listener's own port (not sluice, not refused).
        for dst in [format!("198.18.{w}.20:9000"), format!("[2001:db8:{w}::20]:9000"), format!("198.18.{w}.20:{p4}")] {
            let dst: SocketAddr = dst.parse().unwrap();
            let l = world.within(move || TcpListener::bind(dst).unwrap());
            let echo = std::thread::spawn(move || {
                let (mut s, peer) = l.accept().unwrap();
                let mut buf = [0u8; 5];
                s.read_exact(&mut buf).unwrap();
                s.write_all(&buf).unwrap();
                peer
            });
            let got = pod.within(move || {
                let mut c = TcpStream::connect(dst).unwrap();
                c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
                c.write_all(b"hello").unwrap();
                let mut buf = [0u8; 5];
                c.read_exact(&mut buf).unwrap();
                buf
            });
            assert_eq!(&got, b"hello", "{driver:?} {dst}");
            // Spliced by sluice: the destination sees the node's address, not the pod's (routed).
            let upstream_peer = echo.join().unwrap();
            let node_side: std::net::IpAddr =
                if dst.is_ipv4() { format!("198.18.{w}.254") } else { format!("2001:db8:{w}::fe") }.parse().unwrap();
            assert_eq!(upstream_peer.ip(), node_side, "{driver:?} {dst}");
        }
        let reports = fwd.wait_reports(3);
        let dsts: Vec<_> = reports.iter().map(|r| r.destination.map(|d| d.port())).collect();
        assert_eq!(dsts, [Some(9000), Some(9000), Some(p4)], "{driver:?}");
        assert!(reports.iter().all(|r| matches!(r.outcome, ConnOutcome::Spliced(_))));

        // The forwarder's own port, reached directly from the pod: not intercepted, refused.
        let own = SocketAddr::new(format!("198.18.{p}.254").parse().unwrap(), p4);
        let direct = pod.within(move || {
            let mut c = TcpStream::connect(own).unwrap();
            c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            let _ = c.write_all(b"x");
            let mut b = [0u8; 1];
            c.read(&mut b).map_err(|e| e.kind())
        });
        assert!(matches!(direct, Err(std::io::ErrorKind::ConnectionReset) | Ok(0)), "{direct:?}");
        assert_eq!(fwd.wait_reports(4)[3].outcome, ConnOutcome::NotIntercepted);
    }
}
