use super::*;

const HELLO: &[u8] = include_bytes!("client_hello_sni.bin");
const HELLO_NO_SNI: &[u8] = include_bytes!("client_hello_no_sni.bin");

fn host(s: &str) -> Option<Hostname> {
    Hostname::parse(s).ok()
}

#[test]
fn tls_client_hello_yields_its_normalised_sni() {
    assert_eq!(sniff(HELLO), Sniff::Tls { name: host("api.stripe.example") });
    assert_eq!(sniff(HELLO).sniffed().map(|s| s.via), Some(SniffSource::TlsSni));
    assert_eq!(sniff(HELLO_NO_SNI), Sniff::Tls { name: None });
}

#[test]
fn a_partial_client_hello_asks_for_more_at_every_cut() {
    for cut in 1..HELLO.len() {
        assert_eq!(sniff(&HELLO[..cut]), Sniff::NeedMore, "cut at {cut}");
    }
}

#[test]
fn http_request_head_yields_host_without_port() {
    let req = b"GET /uuid HTTP/1.1\r\nHost: HttpBin.org:8080\r\nUser-Agent: curl\r\n\r\n";
    assert_eq!(sniff(req), Sniff::Http { name: host("httpbin.org") });
    assert_eq!(sniff(b"GET / HTTP/1.1\r\nhost: a.example\r\n\r\nbody"), Sniff::Http { name: host("a.example") });
    assert_eq!(sniff(b"GET / HTTP/1.0\r\n\r\n"), Sniff::Http { name: None });
    assert_eq!(sniff(b"GET / HTTP/1.1\r\nHost: 198.18.0.1:80\r\n\r\n"), Sniff::Http { name: None });
    assert_eq!(sniff(b"GET / HTTP/1.1\r\nHost: [2001:db8::1]\r\n\r\n"), Sniff::Http { name: None });
    assert!(sniff(b"POST /x HTTP/1.1\r\nHost: a.example\r\n\r\n").is_http());
}

#[test]
fn partial_http_asks_for_more() {
    let req = b"GET /uuid HTTP/1.1\r\nHost: httpbin.org\r\n\r\n";
    for cut in 1..req.len() - 1 {
        assert_eq!(sniff(&req[..cut]), Sniff::NeedMore, "cut at {cut}");
    }
}

#[test]
fn other_protocols_are_opaque_quickly() {
    assert_eq!(sniff(b"\x00\x00\x00\x08\x04\xd2\x16\x2f"), Sniff::Opaque, "postgres SSLRequest");
    assert_eq!(sniff(b"SSH-2.0-OpenSSH_9.2\r\n"), Sniff::Opaque);
    assert_eq!(sniff(b"\x16\x03\x01\x00\x05hello"), Sniff::Opaque, "TLS record header, garbage handshake");
    assert_eq!(sniff(b"get / HTTP/1.1\r\n"), Sniff::Opaque, "methods are upper case");
    assert_eq!(sniff(&[b'A'; 40]), Sniff::Opaque);
    assert_eq!(sniff(b""), Sniff::NeedMore);
}

#[test]
fn an_endless_header_block_is_given_up_at_the_cap() {
    let mut req = b"GET / HTTP/1.1\r\nX-Pad: ".to_vec();
    req.resize(MAX_SNIFF_BYTES, b'a');
    assert_eq!(sniff(&req), Sniff::Opaque);
}

#[test]
fn arbitrary_bytes_never_panic() {
    let mut x: u64 = 0x1234_5678;
    for len in 0..2000usize {
        let mut buf = Vec::with_capacity(len);
        for _ in 0..len {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            buf.push(x as u8);
        }
        if len % 3 == 0 && !buf.is_empty() {
            buf[0] = 0x16; // steer a third of them into the TLS parser
        }
        let _ = sniff(&buf);
        // Mutated real ClientHellos too.
        let mut h = HELLO.to_vec();
        let i = (x as usize) % h.len();
        h[i] ^= (x >> 8) as u8;
        let _ = sniff(&h[..(len % h.len()).max(1)]);
    }
}
