//! Not part of the API: the entry points of the cargo-fuzz target in
//! `dnsproxy/fuzz`, also replayed over its seeds by `tests/fuzz_seeds.rs`.
//! What the UDP and TCP paths do with bytes from the network, without
//! sockets: none of it may panic, and what the proxy writes itself must be
//! a DNS message.

use std::net::{IpAddr, Ipv4Addr};
use std::ops::Range;
use std::path::Path;
use std::sync::Arc;

use arc_swap::ArcSwap;
use hickory_proto::op::{Message, ResponseCode};
use metrics::Counter;
use sluice_policy::{NameTable, Snapshot, SourceFile, load_sources};

use crate::Shared;
use crate::handler::{Triage, learn_from, triage};
use crate::udp::truncated_reply;
use crate::upstream::answers;

/// REGISTRY_ONLY with DNS blocking, an exact and a wildcard host: the gate
/// takes both ways.
pub const POLICY: &str = r#"
apiVersion: sluice.dev/v1alpha1
kind: EgressPolicy
metadata:
  name: fuzz
spec:
  outboundTrafficPolicy:
    mode: REGISTRY_ONLY
  dns:
    blockUnregistered: true
    minTtl: 5s
    grace: 1m
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata:
  name: registered
spec:
  hosts:
  - a.example
  ports:
  - number: 443
    name: tls
    protocol: TLS
  resolution: DNS
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata:
  name: registered-wildcard
spec:
  hosts:
  - "*.b.example"
  ports:
  - number: 443
    name: tls
    protocol: TLS
  resolution: NONE
"#;

/// `a.example. A IN` as a question section.
const DEFAULT_QUESTION: &[u8] = b"\x01a\x07example\x00\x00\x01\x00\x01";

/// [`POLICY`] and a name table small enough (64 IPs) that learning evicts.
///
/// # Panics
/// If [`POLICY`] does not load (a bug).
pub fn shared() -> Shared {
    let file = SourceFile { path: Arc::from(Path::new("fuzz.yaml")), bytes: POLICY.as_bytes().to_vec() };
    let set = load_sources(&[file]).unwrap_or_else(|e| panic!("the fuzz policy does not load: {e:?}"));
    Shared { policy: Arc::new(ArcSwap::from_pointee(Snapshot::compile(&set))), names: Arc::new(NameTable::new(64)) }
}

/// One fuzz input. Byte 0 holds flags, bytes 1-2 the query's length (big
/// endian), then come the query and, in the rest, the answer. Flags: bit 0,
/// the answer is made to match the query (its header gets QR and one
/// question, and the query's question is put after it: learning is then
/// reached at once); bit 1, the query datagram was cut short by the receive
/// buffer. A query that is not forwarded is replaced by `a.example. A` for
/// the answer.
pub fn run(data: &[u8], shared: &Shared) {
    let Some((&flags, rest)) = data.split_first() else { return };
    let Some((len, rest)) = rest.split_first_chunk::<2>() else { return };
    let split = usize::from(u16::from_be_bytes(*len)).min(rest.len());
    let (query_bytes, answer_bytes) = rest.split_at(split);
    let (question, max_udp) = match query(query_bytes, flags & 2 != 0, shared) {
        Fate::Forwarded { question, max_udp } => (query_bytes.get(question).unwrap_or(DEFAULT_QUESTION), max_udp),
        _ => (DEFAULT_QUESTION, 512),
    };
    let matched;
    let answer_bytes = if flags & 1 != 0 {
        let mut made = answer_bytes.get(..12).map_or_else(|| vec![0; 12], <[u8]>::to_vec);
        made[2] |= 0x80;
        made[4..6].copy_from_slice(&[0, 1]);
        made.extend_from_slice(question);
        made.extend_from_slice(answer_bytes.get(12..).unwrap_or_default());
        matched = made;
        &matched[..]
    } else {
        answer_bytes
    };
    let _ = answer(question, answer_bytes, max_udp, shared);
    // What was learned is readable (the forwarder's lookups, the admin API's dump).
    let now = sluice_policy::Timestamp::now();
    let _ = shared.names.names(IpAddr::V4(Ipv4Addr::new(198, 18, 0, 1)), now);
    let _ = shared.names.dump(now, 8, |_| true);
}

/// What the proxy does with a client's query.
#[derive(Debug)]
pub enum Fate {
    /// Not worth an answer.
    Dropped,
    /// Answered here: FORMERR, NOTIMP, REFUSED for a zone transfer, NXDOMAIN for a blocked name.
    Answered(Vec<u8>),
    /// Sent upstream: the question's range in the query, and the largest
    /// answer the client takes over UDP.
    Forwarded { question: Range<usize>, max_udp: usize },
}

/// A client's query, through the triage both transports use
/// (`handler::triage`); for one that is forwarded, the SERVFAIL the proxy
/// would answer if no upstream could take it is made too.
///
/// # Panics
/// When a reply made here does not parse as a DNS message (a bug).
pub fn query(bytes: &[u8], truncated: bool, shared: &Shared) -> Fate {
    match triage(bytes, truncated, &shared.policy) {
        Triage::Drop => Fate::Dropped,
        Triage::Reply(reply) => Fate::Answered(checked(reply)),
        Triage::Forward(parsed) => {
            // The SERVFAIL the proxy answers when no upstream can take it.
            checked(parsed.reply(ResponseCode::ServFail));
            Fate::Forwarded { question: 12..parsed.question_end, max_udp: parsed.max_udp }
        }
    }
}

/// An upstream's datagram (`bytes`) for the query whose question is `question`, as
/// `udp::on_answer` takes it: ignored unless it answers that question
/// (`None`); learned from and relayed when it fits in `max_udp`, else
/// relayed truncated (TC set, records dropped). Over TCP the same answer
/// is learned from and relayed whole.
///
/// # Panics
/// When a truncated reply lacks its header or TC bit (a bug).
pub fn answer(question: &[u8], bytes: &[u8], max_udp: usize, shared: &Shared) -> Option<Vec<u8>> {
    let id = bytes.get(..2)?;
    if !answers(id, question, bytes) {
        return None;
    }
    if bytes.len() > max_udp {
        let reply = truncated_reply(bytes, question, max_udp);
        assert!(reply.len() >= 12 && reply[2] & 0x02 != 0, "a truncated reply without its header or TC bit");
        return Some(reply);
    }
    learn_from(shared, bytes, &Counter::noop(), None);
    Some(bytes.to_vec())
}

fn checked(reply: Vec<u8>) -> Vec<u8> {
    if let Err(e) = Message::from_vec(&reply) {
        panic!("a reply made by the proxy does not parse: {e}: {reply:?}");
    }
    reply
}
