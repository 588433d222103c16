//! A real authoritative upstream for the tests: hickory-server with an
//! in-memory zone (parsed from zone-file text) on 127.0.0.1, UDP and TCP on
//! one port. Names under `special.test.` are answered by hand, to carry
//! what the zone cannot: DNSSEC records, the AD flag, EDNS options, silence.

use std::net::SocketAddr;
use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use hickory_proto::op::{Edns, Metadata, ResponseCode};
use hickory_proto::rr::rdata::opt::{EdnsCode, EdnsOption, NSIDPayload};
use hickory_proto::rr::rdata::{A, NULL};
use hickory_proto::rr::{LowerName, Name, RData, Record, RecordType};
use hickory_proto::serialize::txt::Parser;
use hickory_server::net::runtime::{Time, TokioRuntimeProvider};
use hickory_server::server::{Request, RequestHandler, ResponseHandler, ResponseInfo};
use hickory_server::store::in_memory::InMemoryZoneHandler;
use hickory_server::zone_handler::{AxfrPolicy, Catalog, MessageResponseBuilder, ZoneType};

use super::{Background, bind_pair};

/// The test zone. `www` is a CNAME chain, `many` has 40 addresses (more
/// than 512 bytes), `one`/`two`/`three` share an address, `big` needs TCP,
/// `*.wild` is a zone wildcard, `short` has a 2 s TTL.
pub fn zone() -> String {
    let mut z = String::from(
        "$ORIGIN sluice.test.
$TTL 300
@          IN SOA  ns.sluice.test. admin.sluice.test. 1 3600 600 86400 60
@          IN NS   ns.sluice.test.
ns         IN A    127.0.0.1
api        IN A    192.0.2.10
api        IN AAAA 2001:db8::10
www        IN CNAME edge.cdn.sluice.test.
edge.cdn 30 IN CNAME a1.cdn.sluice.test.
a1.cdn  100 IN A    198.51.100.7
a1.cdn  100 IN AAAA 2001:db8::7
one        IN A    203.0.113.99
two        IN A    203.0.113.99
three      IN A    203.0.113.99
*.wild     IN A    192.0.2.50
short    2 IN A    192.0.2.60
mx         IN MX   10 api.sluice.test.
",
    );
    for i in 1..=40 {
        z.push_str(&format!("many IN A 198.18.0.{i}\n"));
    }
    for i in 0..30 {
        z.push_str(&format!("big IN TXT \"{i:02}{}\"\n", "x".repeat(200)));
    }
    z
}

/// The zone's upstream, and how many queries it has seen.
pub struct Upstream {
    pub addr: SocketAddr,
    pub queries: Arc<AtomicUsize>,
    _server: Background<()>,
}

impl Upstream {
    pub fn start() -> Upstream {
        let (udp, tcp) = bind_pair("127.0.0.1");
        let addr = udp.local_addr().unwrap();
        let queries = Arc::new(AtomicUsize::new(0));
        let seen = queries.clone();
        let server = Background::spawn(move |shutdown| async move {
            let origin = Name::from_str("sluice.test.").unwrap();
            let (origin, records) = Parser::new(zone(), None, Some(origin)).parse().unwrap();
            let zone = InMemoryZoneHandler::<TokioRuntimeProvider>::new(
                origin.clone(),
                records,
                ZoneType::Primary,
                AxfrPolicy::Deny,
            )
            .unwrap();
            let mut catalog = Catalog::new();
            catalog.upsert(LowerName::from(&origin), vec![Arc::new(zone)]);
            let handler = TestHandler { catalog, queries: seen };
            let mut server = hickory_server::Server::new(handler);
            server.register_socket(tokio::net::UdpSocket::from_std(udp).unwrap());
            server.register_listener(
                tokio::net::TcpListener::from_std(tcp).unwrap(),
                std::time::Duration::from_secs(5),
                16,
            );
            shutdown.await;
            server.shutdown_gracefully().await.unwrap();
        });
        Upstream { addr, queries, _server: server }
    }

    pub fn seen(&self) -> usize {
        self.queries.load(Ordering::SeqCst)
    }
}

struct TestHandler {
    catalog: Catalog,
    queries: Arc<AtomicUsize>,
}

/// Wire-format RRSIG rdata covering A (algorithm 13, signer special.test.).
fn rrsig_rdata() -> Vec<u8> {
    let mut r = vec![0, 1, 13, 3, 0, 0, 0x0e, 0x10, 0x70, 0, 0, 0, 0x60, 0, 0, 0, 0x30, 0x39];
    r.extend_from_slice(b"\x07special\x04test\x00");
    r.extend((0..64u8).map(|i| i.wrapping_mul(37)));
    r
}

#[async_trait::async_trait]
impl RequestHandler for TestHandler {
    async fn handle_request<R: ResponseHandler, T: Time>(&self, request: &Request, mut response: R) -> ResponseInfo {
        self.queries.fetch_add(1, Ordering::SeqCst);
        let special = LowerName::from(Name::from_str("special.test.").unwrap());
        let Some(q) = request.queries.queries().first().filter(|q| special.zone_of(q.name())) else {
            return self.catalog.handle_request::<R, T>(request, response).await;
        };
        let label = q.name().to_string();
        let mut metadata = Metadata::response_from_request(&request.metadata);
        if label.starts_with("silent.") {
            metadata.response_code = ResponseCode::ServFail;
            return ResponseInfo::from(hickory_proto::op::Header { metadata, counts: Default::default() });
        }
        // signed.special.test: an answer as a validating resolver gives it.
        metadata.recursion_available = true;
        metadata.authentic_data = true;
        let name = Name::from(q.name());
        let answers = vec![
            Record::from_rdata(name.clone(), 1234, RData::A(A::new(192, 0, 2, 77))),
            Record::from_rdata(
                name,
                1234,
                RData::Unknown { code: RecordType::RRSIG, rdata: NULL::with(rrsig_rdata()) },
            ),
        ];
        let mut edns = Edns::new();
        edns.set_max_payload(1232).set_dnssec_ok(request.edns.as_ref().is_some_and(|e| e.flags().dnssec_ok));
        edns.options_mut().insert(EdnsOption::NSID(NSIDPayload::new(b"upstream-1".to_vec()).unwrap()));
        edns.options_mut().insert(EdnsOption::Unknown(u16::from(EdnsCode::Unknown(65_001)), b"sluice".to_vec()));
        let reply = MessageResponseBuilder::new(&request.queries, Some(&edns)).build(metadata, &answers, [], [], []);
        response.send_response(reply).await.unwrap()
    }
}
