//! The hickory-server request handler that answers every query that comes
//! over TCP (the `tcp` loop calls it; UDP has its own, see `udp`): block or forward, learn from
//! the answer, then reply. The policy gate and the blocked answer's SOA are
//! shared with the UDP path.
//!
//! Order matters: the name table is updated before the reply is handed to
//! the connection, so an app that connects the instant it reads the answer is
//! judged with the names that answer carried.

use std::sync::Arc;
use std::time::SystemTime;

use hickory_proto::op::{Edns, Header, HeaderCounts, Message, Metadata, OpCode, ResponseCode};
use hickory_proto::rr::{Name, Record, RecordType};
use hickory_server::net::runtime::Time;
use hickory_server::server::{Request, RequestHandler, ResponseHandler, ResponseInfo};
use hickory_server::zone_handler::MessageResponseBuilder;
use metrics::Counter;
use sluice_policy::model::{Enforcement, Mode};
use sluice_policy::{Hostname, Retention, Snapshot, Timestamp};
use tokio::sync::Semaphore;

use crate::Shared;
use crate::learn::learn;
use crate::metrics::{self as m, Action};
use crate::upstream::Upstreams;

/// The UDP payload size the proxy advertises in answers it makes itself.
pub(crate) const LOCAL_PAYLOAD: u16 = 1232;

/// What the policy says about a query name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Gate {
    Forward,
    /// NXDOMAIN: REGISTRY_ONLY with `dns.blockUnregistered`, and no
    /// ServiceEntry host covers the name.
    Block,
}

/// Zone transfers (AXFR, IXFR) are refused here, on both transports: the
/// proxy relays one answer per query, and a transfer is a stream of them —
/// relayed, it would end after its first message, silently cut short.
pub(crate) fn is_transfer(qtype: RecordType) -> bool {
    matches!(qtype, RecordType::AXFR | RecordType::IXFR)
}

/// Decides whether a query for `name` may go upstream. Names that are not
/// valid host names (the root, escaped bytes) cannot be registered, so they
/// are blocked too when blocking is on. Dry-run never blocks.
pub(crate) fn gate(snapshot: &Snapshot, name: &Name) -> Gate {
    let settings = snapshot.settings();
    if settings.mode != Mode::RegistryOnly
        || !settings.dns.block_unregistered
        || settings.enforcement == Enforcement::DryRun
    {
        return Gate::Forward;
    }
    match Hostname::parse(&name.to_string()) {
        Ok(host) if snapshot.covers_name(&host) => Gate::Forward,
        _ => Gate::Block,
    }
}

#[derive(Debug)]
pub(crate) struct Proxy {
    shared: Shared,
    upstreams: Upstreams,
    in_flight: Arc<Semaphore>,
    unparsed: Counter,
}

impl Proxy {
    pub(crate) fn new(shared: Shared, upstreams: Upstreams, max_in_flight: usize) -> Self {
        Proxy {
            shared,
            upstreams,
            in_flight: Arc::new(Semaphore::new(max_in_flight.max(1))),
            unparsed: metrics::counter!(m::UNPARSED_ANSWERS, "transport" => "tcp"),
        }
    }
}

pub(crate) fn now() -> Timestamp {
    Timestamp::from_system(SystemTime::now())
}

/// What to report when even the reply could not be sent.
fn unsent(request: &Request, rcode: ResponseCode) -> ResponseInfo {
    let mut metadata = Metadata::response_from_request(&request.metadata);
    metadata.response_code = rcode;
    ResponseInfo::from(Header { metadata, counts: HeaderCounts::default() })
}

/// How long clients may cache a blocked name's NXDOMAIN (the SOA's TTL and
/// minimum, RFC 2308): without an SOA they would not cache it at all.
const BLOCKED_NEGATIVE_TTL: u32 = 60;

/// The SOA that makes a blocked NXDOMAIN cacheable: owned by the query name,
/// served by "sluice.invalid" (a name that cannot exist, RFC 6761).
pub(crate) fn blocked_soa(owner: Name) -> Option<Record> {
    let mname = Name::from_ascii("blocked.sluice.invalid.").ok()?;
    let rname = Name::from_ascii("hostmaster.sluice.invalid.").ok()?;
    let soa = hickory_proto::rr::rdata::SOA::new(mname, rname, 1, 3600, 600, 86400, BLOCKED_NEGATIVE_TTL);
    Some(Record::from_rdata(owner, BLOCKED_NEGATIVE_TTL, hickory_proto::rr::RData::SOA(soa)))
}

/// A reply made here (blocked, malformed, failed): the client's question,
/// no records (but an SOA for a blocked NXDOMAIN), and EDNS if the client used it.
async fn local_reply<R: ResponseHandler>(request: &Request, mut response: R, rcode: ResponseCode) -> ResponseInfo {
    let mut metadata = Metadata::response_from_request(&request.metadata);
    metadata.response_code = rcode;
    metadata.recursion_available = true;
    let edns = request.edns.as_ref().map(|theirs| {
        let mut ours = Edns::new();
        ours.set_max_payload(LOCAL_PAYLOAD).set_dnssec_ok(theirs.flags().dnssec_ok);
        ours
    });
    let owner = request.queries.queries().first().map(|q| Name::from(q.name().clone()));
    let soa = if rcode == ResponseCode::NXDomain { owner.and_then(blocked_soa) } else { None };
    let builder = MessageResponseBuilder::new(&request.queries, edns.as_ref());
    let reply = builder.build(metadata, None.iter(), None.iter(), soa.iter(), None.iter());
    match response.send_response(reply).await {
        Ok(info) => info,
        Err(error) => {
            tracing::debug!(%error, "could not send a DNS reply");
            unsent(request, rcode)
        }
    }
}

#[async_trait::async_trait]
impl RequestHandler for Proxy {
    async fn handle_request<R: ResponseHandler, T: Time>(&self, request: &Request, response: R) -> ResponseInfo {
        let query = match request.queries.queries() {
            [q] if request.metadata.op_code == OpCode::Query => q,
            [q] => {
                m::request(q.query_type(), ResponseCode::NotImp, Action::Failed);
                return local_reply(request, response, ResponseCode::NotImp).await;
            }
            _ => {
                m::request(RecordType::Unknown(0), ResponseCode::FormErr, Action::Failed);
                return local_reply(request, response, ResponseCode::FormErr).await;
            }
        };
        let qtype = query.query_type();
        if is_transfer(qtype) {
            m::request(qtype, ResponseCode::Refused, Action::Blocked);
            return local_reply(request, response, ResponseCode::Refused).await;
        }
        let (gate, keep) = {
            let snapshot = self.shared.policy.load();
            (gate(&snapshot, &Name::from(query.name())), Retention::from(&snapshot.settings().dns))
        };
        if gate == Gate::Block {
            m::request(qtype, ResponseCode::NXDomain, Action::Blocked);
            return local_reply(request, response, ResponseCode::NXDomain).await;
        }
        let Ok(permit) = self.in_flight.try_acquire() else {
            tracing::debug!("in-flight cap reached: SERVFAIL");
            m::request(qtype, ResponseCode::ServFail, Action::Failed);
            return local_reply(request, response, ResponseCode::ServFail).await;
        };
        let exchanged = self.upstreams.exchange(request.as_slice(), request.queries.as_bytes()).await;
        drop(permit);
        let answer = match exchanged.map(|bytes| Message::from_vec(&bytes)) {
            Ok(Ok(answer)) => answer,
            Ok(Err(error)) => {
                // A TCP reply is hickory's encoding of a parsed answer: the
                // bytes cannot go back as they came, as they do over UDP.
                tracing::debug!(%error, "unparseable upstream answer: SERVFAIL");
                self.unparsed.increment(1);
                m::request(qtype, ResponseCode::ServFail, Action::Failed);
                return local_reply(request, response, ResponseCode::ServFail).await;
            }
            Err(error) => {
                tracing::debug!(%error, "every upstream failed: SERVFAIL");
                m::request(qtype, ResponseCode::ServFail, Action::Failed);
                return local_reply(request, response, ResponseCode::ServFail).await;
            }
        };
        if answer.metadata.response_code == ResponseCode::NoError {
            learn(&self.shared.names, &Name::from(query.name()), &answer.answers, now(), keep);
        }
        m::request(qtype, answer.metadata.response_code, Action::Forwarded);
        relay(request, response, answer).await
    }
}

/// Sends the upstream's answer back: its header flags, records, TTLs and
/// EDNS as they came; the question is the client's own bytes. Re-encoding
/// may change name compression, and TC is set if it no longer fits.
async fn relay<R: ResponseHandler>(request: &Request, mut response: R, mut answer: Message) -> ResponseInfo {
    let signature = answer.signature.take();
    let rcode = answer.metadata.response_code;
    let mut reply = MessageResponseBuilder::new(&request.queries, answer.edns.as_ref()).build(
        answer.metadata,
        &answer.answers,
        &answer.authorities,
        std::iter::empty::<&Record>(),
        &answer.additionals,
    );
    if let Some(signature) = signature {
        reply.set_signature(signature);
    }
    match response.send_response(reply).await {
        Ok(info) => info,
        Err(error) => {
            tracing::debug!(%error, "could not send a DNS reply");
            unsent(request, rcode)
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use std::str::FromStr;

    use sluice_policy::{SourceFile, load_sources};

    use super::*;

    fn snapshot(yaml: &str) -> Snapshot {
        let file = SourceFile { path: std::path::Path::new("test.yaml").into(), bytes: yaml.as_bytes().to_vec() };
        let set = load_sources(&[file]).unwrap();
        Snapshot::compile(&set)
    }

    fn gate_for(snap: &Snapshot, name: &str) -> Gate {
        gate(snap, &Name::from_str(name).unwrap())
    }

    const ENTRIES: &str = "\
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: api}
spec:
  hosts: [api.example.com]
  ports: [{number: 443, name: https, protocol: HTTPS}]
  resolution: DNS
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: svc}
spec:
  hosts: [\"*.svc.example.net\"]
  ports: [{number: 443, name: https, protocol: HTTPS}]
  resolution: NONE
";

    fn policy(mode: &str, block: bool, enforcement: &str) -> String {
        format!(
            "{ENTRIES}---\napiVersion: sluice.dev/v1alpha1\nkind: EgressPolicy\nmetadata: {{name: node}}\n\
             spec:\n  outboundTrafficPolicy: {{mode: {mode}}}\n  enforcement: {enforcement}\n  dns: {{blockUnregistered: {block}}}\n"
        )
    }

    #[test]
    fn blocks_only_unregistered_names_in_registry_only_with_block_on() {
        let snap = snapshot(&policy("REGISTRY_ONLY", true, "enforce"));
        assert_eq!(gate_for(&snap, "api.example.com."), Gate::Forward);
        assert_eq!(gate_for(&snap, "API.Example.Com."), Gate::Forward);
        assert_eq!(gate_for(&snap, "a.svc.example.net."), Gate::Forward);
        assert_eq!(gate_for(&snap, "a.b.svc.example.net."), Gate::Forward);
        assert_eq!(gate_for(&snap, "svc.example.net."), Gate::Block);
        assert_eq!(gate_for(&snap, "evil.example.org."), Gate::Block);
        assert_eq!(gate_for(&snap, "."), Gate::Block);

        for (mode, block, enforcement) in
            [("ALLOW_ANY", true, "enforce"), ("REGISTRY_ONLY", false, "enforce"), ("REGISTRY_ONLY", true, "dry-run")]
        {
            let snap = snapshot(&policy(mode, block, enforcement));
            assert_eq!(gate_for(&snap, "evil.example.org."), Gate::Forward, "{mode} {block} {enforcement}");
        }
    }
}
