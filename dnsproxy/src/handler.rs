//! What both transports do with a DNS message — read the query, ask the
//! policy, make a local reply ([`triage`]), learn from the upstream's answer
//! — and the TCP path's answer to one query (`Proxy`; the `tcp` loop calls
//! it, UDP has its own in `udp`).
//!
//! Order matters: the name table is updated before the reply is handed to
//! the connection, so an app that connects the instant it reads the answer is
//! judged with the names that answer carried. Forwarded answers go back as
//! the upstream sent them, on both transports: only a NOERROR answer's
//! question and answer section are parsed (to learn from), so a record type
//! or an EDNS option hickory does not know, or bytes it would reject, reach
//! the client as they came.

use std::sync::Arc;

use arc_swap::ArcSwap;
use hickory_proto::op::{Edns, Message, MessageType, Metadata, OpCode, Query, ResponseCode};
use hickory_proto::rr::{Name, Record, RecordType};
use hickory_proto::serialize::binary::{BinDecodable, BinDecoder};
use metrics::Counter;
use sluice_policy::model::{Enforcement, Mode};
use sluice_policy::{Hostname, Retention, Snapshot, Timestamp};
use tokio::sync::Semaphore;

use crate::Shared;
use crate::learn::learn;
use crate::metrics::{self as m, Action};
use crate::upstream::Upstreams;

/// The UDP payload size the proxy advertises in answers it makes itself.
const LOCAL_PAYLOAD: u16 = 1232;

/// What the policy says about a query name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Gate {
    Forward,
    /// NXDOMAIN: REGISTRY_ONLY with `dns.blockUnregistered`, and no
    /// ServiceEntry host covers the name.
    Block,
}

/// Zone transfers (AXFR, IXFR) are refused here, on both transports: the
/// proxy relays one answer per query, and a transfer is a stream of them —
/// relayed, it would end after its first message, silently cut short.
fn is_transfer(qtype: RecordType) -> bool {
    matches!(qtype, RecordType::AXFR | RecordType::IXFR)
}

/// Decides whether a query for `name` may go upstream. Names that are not
/// valid host names (the root, escaped bytes) cannot be registered, so they
/// are blocked too when blocking is on. Dry-run never blocks.
fn gate(snapshot: &Snapshot, name: &Name) -> Gate {
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

/// How long clients may cache a blocked name's NXDOMAIN (the SOA's TTL and
/// minimum, RFC 2308): without an SOA they would not cache it at all.
const BLOCKED_NEGATIVE_TTL: u32 = 60;

/// The SOA that makes a blocked NXDOMAIN cacheable: owned by the query name,
/// served by "sluice.invalid" (a name that cannot exist, RFC 6761).
fn blocked_soa(owner: Name) -> Option<Record> {
    let mname = Name::from_ascii("blocked.sluice.invalid.").ok()?;
    let rname = Name::from_ascii("hostmaster.sluice.invalid.").ok()?;
    let soa = hickory_proto::rr::rdata::SOA::new(mname, rname, 1, 3600, 600, 86400, BLOCKED_NEGATIVE_TTL);
    Some(Record::from_rdata(owner, BLOCKED_NEGATIVE_TTL, hickory_proto::rr::RData::SOA(soa)))
}

/// The parts of a query the proxy reads; the rest is passed on as it is.
#[derive(Debug)]
pub(crate) struct Parsed {
    pub(crate) meta: Metadata,
    pub(crate) query: Query,
    pub(crate) question_end: usize,
    pub(crate) max_udp: usize,
    pub(crate) edns: Option<Edns>,
}

impl Parsed {
    /// A reply made here to this query, with `rcode`.
    pub(crate) fn reply(&self, rcode: ResponseCode) -> Vec<u8> {
        local_reply(&self.meta, Some(&self.query), self.edns.as_ref(), rcode)
    }
}

/// What becomes of a client's query before any upstream is asked, on
/// either transport.
#[derive(Debug)]
pub(crate) enum Triage {
    /// Not answered: too short to carry an ID, or itself an answer (never
    /// answered, against reflection).
    Drop,
    /// Answered here, and counted: FORMERR, NOTIMP, REFUSED for a zone
    /// transfer, NXDOMAIN for a name the policy blocks.
    Reply(Vec<u8>),
    /// For the upstreams.
    Forward(Parsed),
}

/// Reads a client's query (`truncated`: cut short by the receive buffer)
/// and decides whether it goes upstream, under the current `policy`.
pub(crate) fn triage(bytes: &[u8], truncated: bool, policy: &ArcSwap<Snapshot>) -> Triage {
    let parsed = match parse_query(bytes, truncated) {
        Ok(p) => p,
        Err(Refuse::Drop) => return Triage::Drop,
        Err(Refuse::FormErr(meta)) => {
            m::request(RecordType::Unknown(0), ResponseCode::FormErr, Action::Failed);
            return Triage::Reply(local_reply(&meta, None, None, ResponseCode::FormErr));
        }
        Err(Refuse::NotImp(meta, query)) => {
            m::request(query.query_type(), ResponseCode::NotImp, Action::Failed);
            return Triage::Reply(local_reply(&meta, Some(&query), None, ResponseCode::NotImp));
        }
    };
    let qtype = parsed.query.query_type();
    let rcode = if is_transfer(qtype) {
        ResponseCode::Refused
    } else if gate(&policy.load(), parsed.query.name()) == Gate::Block {
        ResponseCode::NXDomain
    } else {
        return Triage::Forward(parsed);
    };
    m::request(qtype, rcode, Action::Blocked);
    Triage::Reply(parsed.reply(rcode))
}

/// Why a query is answered here instead of forwarded.
#[derive(Debug)]
pub(crate) enum Refuse {
    /// Not worth an answer (too short to carry an ID, or itself an answer).
    Drop,
    /// Malformed, or more than one question.
    FormErr(Metadata),
    /// Not a standard query (NOTIFY, UPDATE...).
    NotImp(Metadata, Query),
}

pub(crate) fn parse_query(bytes: &[u8], truncated: bool) -> Result<Parsed, Refuse> {
    let mut decoder = BinDecoder::new(bytes);
    let header = hickory_proto::op::Header::read(&mut decoder).map_err(|_| Refuse::Drop)?;
    let meta = header.metadata;
    if meta.message_type != MessageType::Query {
        return Err(Refuse::Drop);
    }
    if truncated || header.counts.queries != 1 {
        return Err(Refuse::FormErr(meta));
    }
    let query = Query::read(&mut decoder).map_err(|_| Refuse::FormErr(meta))?;
    if meta.op_code != OpCode::Query {
        return Err(Refuse::NotImp(meta, query));
    }
    let question_end = decoder.index();
    if !plain_name(bytes, question_end - 4) {
        return Err(Refuse::FormErr(meta));
    }
    let edns = client_edns(&mut decoder, &header.counts).map_err(|_| Refuse::FormErr(meta))?;
    // RFC 6891: below 512 means 512; without EDNS, 512.
    let max_udp = edns.as_ref().map_or(512, |e| e.max_payload().max(512));
    Ok(Parsed { meta, query, question_end, max_udp: usize::from(max_udp), edns })
}

/// Whether the question's name (from offset 12 to `name_end`) is labels
/// only. hickory follows a compression pointer there, which can only point
/// back into the header (the question's name is the message's first), so the
/// name it reads is spelled by the ID and counts: no client writes that. The
/// upstream would send the question back written out, and the answer would
/// match none of the bytes the proxy sent (over TCP, a failure against the
/// upstream's health for each such query).
fn plain_name(query: &[u8], name_end: usize) -> bool {
    let mut i = 12;
    while let Some(&len) = query.get(i).filter(|_| i < name_end) {
        if len == 0 {
            return i + 1 == name_end;
        }
        if len > 63 {
            return false;
        }
        i += 1 + usize::from(len);
    }
    false
}

/// The client's OPT record, if any (the additional section of a query).
fn client_edns(
    decoder: &mut BinDecoder<'_>,
    counts: &hickory_proto::op::HeaderCounts,
) -> Result<Option<Edns>, hickory_proto::ProtoError> {
    let records = usize::from(counts.answers) + usize::from(counts.authorities);
    for _ in 0..records {
        Record::read(decoder)?;
    }
    for _ in 0..counts.additionals {
        let record = Record::read(decoder)?;
        if record.record_type() == RecordType::OPT {
            return Ok(Some(Edns::from(&record)));
        }
    }
    Ok(None)
}

/// The RCODE in an answer's header (the four bits; the extension in the OPT
/// record is not needed to tell NOERROR). `answer` has a header.
pub(crate) fn header_rcode(answer: &[u8]) -> ResponseCode {
    ResponseCode::from(0, answer.get(3).map_or(0, |b| b & 0x0f))
}

/// What an upstream's answer (one that [`answers`](crate::upstream::answers)
/// its query) holds for learning.
#[derive(Debug)]
enum Lesson {
    /// Not NOERROR: not parsed at all, nothing to learn.
    Nothing,
    /// The question's name and the answer section.
    Records(Name, Vec<Record>),
    /// A NOERROR answer hickory cannot read: relayed as it came, unlearned.
    Unparsed(hickory_proto::ProtoError),
}

/// Reads what `answer` can teach. Only NOERROR answers are parsed, and only
/// their question and answer section: an error answer, or bytes after the
/// answer section that hickory would reject, never costs the client its
/// answer.
fn lesson(answer: &[u8]) -> Lesson {
    if header_rcode(answer) != ResponseCode::NoError {
        return Lesson::Nothing;
    }
    match parse_answer(answer) {
        Ok(Some((qname, records))) => Lesson::Records(qname, records),
        Ok(None) => Lesson::Nothing,
        Err(error) => Lesson::Unparsed(error),
    }
}

/// The question's name and the answer section of an upstream's answer to
/// an address query (`None` for another type); the authority and additional
/// sections are not needed for learning.
fn parse_answer(bytes: &[u8]) -> Result<Option<(Name, Vec<Record>)>, hickory_proto::ProtoError> {
    let mut decoder = BinDecoder::new(bytes);
    let header = hickory_proto::op::Header::read(&mut decoder)?;
    if header.counts.queries != 1 {
        // `answers` lets only rejections through without their question.
        return Err(hickory_proto::ProtoError::from("a NOERROR answer without exactly one question"));
    }
    let query = Query::read(&mut decoder)?;
    if !matches!(query.query_type(), RecordType::A | RecordType::AAAA | RecordType::ANY) {
        // Only an address query's answer says which addresses a name has: an
        // A record in the answer to another type (TYPE1000, say) teaches
        // nothing, and would give a forger more questions in flight to aim at.
        return Ok(None);
    }
    let qname = query.name;
    let mut records = Vec::with_capacity(usize::from(header.counts.answers));
    for _ in 0..header.counts.answers {
        records.push(Record::read(&mut decoder)?);
    }
    Ok(Some((qname, records)))
}

/// A reply made here: the client's ID and question, `rcode`, no records
/// but the SOA of a blocked name, EDNS if the client used it.
fn local_reply(meta: &Metadata, query: Option<&Query>, edns: Option<&Edns>, rcode: ResponseCode) -> Vec<u8> {
    let mut reply = Message::new(meta.id, MessageType::Response, meta.op_code);
    reply.metadata.recursion_desired = meta.recursion_desired;
    reply.metadata.checking_disabled = meta.checking_disabled;
    reply.metadata.recursion_available = true;
    reply.metadata.response_code = rcode;
    if let Some(q) = query {
        reply.add_query(q.clone());
        if rcode == ResponseCode::NXDomain
            && let Some(soa) = blocked_soa(q.name().clone())
        {
            reply.add_authority(soa);
        }
    }
    if let Some(theirs) = edns {
        let mut ours = Edns::new();
        ours.set_max_payload(LOCAL_PAYLOAD).set_dnssec_ok(theirs.flags().dnssec_ok);
        reply.set_edns(ours);
    }
    reply.to_vec().unwrap_or_else(|_| header_only(meta.id, rcode))
}

/// The last resort reply: a bare header.
fn header_only(id: u16, rcode: ResponseCode) -> Vec<u8> {
    let mut h = vec![0u8; 12];
    h[..2].copy_from_slice(&id.to_be_bytes());
    h[2] = 0x80;
    h[3] = 0x80 | (u16::from(rcode) & 0x0f) as u8;
    h
}

/// Answers learned from in the last [`RECENT_FOR_MS`], by a hash of their
/// bytes but the ID: the same answer again (a popular name that every pod
/// asks for, from an upstream that does not count its TTLs down) would only
/// move the table's expiry times by less than the table skips anyway
/// (`NameTable`'s 1 s slack), so it is not parsed and walked again. Measured
/// on the benchmark's 1,000-name zone (`perf record`, perf/RESULTS.md,
/// session 16): the answer thread's user-space samples 5.3% -> 2.3% of all,
/// the proxy's threads 39.5% -> 36.2%. A fixed array, one per upstream
/// socket's thread: a miss costs one hash of the answer. (Measured with
/// 4,096 slots; 8,192 since, fewer collisions for a larger working set,
/// not measured apart.)
#[derive(Debug)]
pub(crate) struct Recent {
    hasher: foldhash::quality::RandomState,
    /// (hash, when learned: ms since `base`); a slot per hash's low bits.
    slots: Box<[(u64, u64)]>,
    /// A monotonic clock: a wall clock stepped back would stretch the second.
    base: std::time::Instant,
}

const RECENT_SLOTS: usize = 8192;
const RECENT_FOR_MS: u64 = 1_000;

impl Default for Recent {
    fn default() -> Self {
        Recent {
            hasher: foldhash::quality::RandomState::default(),
            slots: vec![(0, 0); RECENT_SLOTS].into(),
            base: std::time::Instant::now(),
        }
    }
}

impl Recent {
    /// The answer's hash, the time now (ms since `base`, from 1: a slot
    /// never written says 0) and its slot.
    fn slot(&mut self, answer: &[u8]) -> (u64, u64, &mut (u64, u64)) {
        let hash = std::hash::BuildHasher::hash_one(&self.hasher, answer.get(2..).unwrap_or_default());
        let now = self.base.elapsed().as_millis() as u64 + RECENT_FOR_MS;
        (hash, now, &mut self.slots[hash as usize % RECENT_SLOTS])
    }
}

/// Records what a forwarded answer teaches (a NOERROR one's A/AAAA along
/// its CNAME chain), before it is relayed; an answer hickory cannot read is
/// relayed unlearned and counted in `unparsed`. With `recent`, an answer
/// learned from in the last second is passed over.
pub(crate) fn learn_from(shared: &Shared, answer: &[u8], unparsed: &Counter, recent: Option<&mut Recent>) {
    if header_rcode(answer) != ResponseCode::NoError {
        return; // teaches nothing (`lesson` says so too): not hashed, not timed
    }
    let mut mark = None;
    if let Some(recent) = recent {
        let (hash, at, slot) = recent.slot(answer);
        if slot.0 == hash && at - slot.1 < RECENT_FOR_MS {
            return;
        }
        mark = Some((hash, at, slot));
    }
    match lesson(answer) {
        Lesson::Nothing => {}
        Lesson::Records(qname, records) => {
            let keep = Retention::from(&shared.policy.load().settings().dns);
            learn(&shared.names, &qname, &records, Timestamp::now(), keep);
            if let Some((hash, at, slot)) = mark {
                *slot = (hash, at);
            }
        }
        Lesson::Unparsed(error) => {
            tracing::debug!(%error, "unparseable upstream answer: relayed as it came, nothing learned");
            unparsed.increment(1);
        }
    }
}

/// The most queries in flight on either transport, whatever the config
/// says: a free random ID is then always quick to find (a quarter of one
/// socket's or connection's at worst).
pub(crate) const MAX_IN_FLIGHT: usize = 16_384;

/// The TCP path's queries: blocked or forwarded (over the upstreams' shared
/// TCP connections, at most `max_in_flight` at once), learned from, answered.
#[derive(Debug)]
pub(crate) struct Proxy {
    shared: Shared,
    upstreams: Upstreams,
    in_flight: Arc<Semaphore>,
    /// Each client address's share of `in_flight`: half.
    by_client: Arc<std::sync::Mutex<crate::share::Shares>>,
    unparsed: Counter,
}

impl Proxy {
    pub(crate) fn new(shared: Shared, upstreams: Upstreams, max_in_flight: usize) -> Self {
        let max_in_flight = max_in_flight.clamp(1, MAX_IN_FLIGHT);
        Proxy {
            shared,
            upstreams,
            in_flight: Arc::new(Semaphore::new(max_in_flight)),
            by_client: Arc::new(std::sync::Mutex::new(crate::share::Shares::of(max_in_flight))),
            unparsed: metrics::counter!(m::UNPARSED_ANSWERS, "transport" => "tcp"),
        }
    }

    /// The reply to one query that came over TCP: the upstream's answer as
    /// it came but for the ID (the client's put back), or one made here.
    /// `None`: not to be answered (too short to be DNS, or itself an
    /// answer: never answered, against reflection). A `client` address
    /// holds at most half of the queries in flight (its TCP connections,
    /// each pipelining, could otherwise hold them all), as over UDP.
    pub(crate) async fn answer(&self, query: &[u8], client: std::net::IpAddr) -> Option<Vec<u8>> {
        let parsed = match triage(query, false, &self.shared.policy) {
            Triage::Drop => return None,
            Triage::Reply(reply) => return Some(reply),
            Triage::Forward(parsed) => parsed,
        };
        let qtype = parsed.query.query_type();
        let servfail = || {
            m::request(qtype, ResponseCode::ServFail, Action::Failed);
            Some(parsed.reply(ResponseCode::ServFail))
        };
        let Ok(permit) = self.in_flight.try_acquire() else {
            tracing::debug!("in-flight cap reached: SERVFAIL");
            return servfail();
        };
        let Some(share) = crate::share::ClientShare::take(&self.by_client, client) else {
            tracing::debug!(%client, "a client's share of the in-flight cap reached: SERVFAIL");
            return servfail();
        };
        let exchanged = self.upstreams.exchange(query, query.get(12..parsed.question_end)?).await;
        drop((permit, share));
        match exchanged {
            Ok(answer) => {
                learn_from(&self.shared, &answer, &self.unparsed, None);
                m::request(qtype, header_rcode(&answer), Action::Forwarded);
                Some(answer)
            }
            Err(error) => {
                tracing::debug!(%error, "every upstream failed: SERVFAIL");
                servfail()
            }
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    #![allow(clippy::unwrap_used)]
    use std::str::FromStr;

    use arc_swap::ArcSwap;
    use hickory_proto::rr::RData;
    use sluice_policy::{NameTable, SourceFile, load_sources};

    use super::*;

    pub(crate) fn query(id: u16, name: &str, edns: Option<u16>) -> Vec<u8> {
        let mut m = Message::query();
        m.metadata.id = id;
        m.metadata.recursion_desired = true;
        m.add_query(Query::query(Name::from_str(name).unwrap(), RecordType::AAAA));
        if let Some(size) = edns {
            let mut e = Edns::new();
            e.set_max_payload(size);
            m.set_edns(e);
        }
        m.to_vec().unwrap()
    }

    /// The upstream's answer to `q` with three AAAA records, its EDNS (if
    /// any) after them.
    pub(crate) fn long_answer(q: &[u8], edns: Option<Edns>) -> Vec<u8> {
        let mut m = Message::from_vec(q).unwrap();
        m.metadata.message_type = MessageType::Response;
        for i in 0..3 {
            let ip = std::net::Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, i);
            m.add_answer(Record::from_rdata(m.queries[0].name().clone(), 60, RData::AAAA(ip.into())));
        }
        m.edns = edns;
        m.to_vec().unwrap()
    }

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

    #[test]
    fn queries_are_read_with_their_payload_size() {
        let p = parse_query(&query(7, "a.example.", Some(4_096)), false).unwrap();
        assert_eq!((p.meta.id, p.max_udp, p.query.query_type()), (7, 4_096, RecordType::AAAA));
        assert_eq!(p.question_end, 12 + 11 + 4);
        assert_eq!(parse_query(&query(7, "a.example.", Some(100)), false).unwrap().max_udp, 512);
        assert_eq!(parse_query(&query(7, "a.example.", None), false).unwrap().max_udp, 512);
        assert!(matches!(
            parse_query(&query(7, "a.example.", None), true),
            Err(Refuse::FormErr(Metadata { id: 7, .. }))
        ));
        let mut answer = query(7, "a.example.", None);
        answer[2] |= 0x80;
        assert!(matches!(parse_query(&answer, false), Err(Refuse::Drop)));
        assert!(matches!(parse_query(&answer[..5], false), Err(Refuse::Drop)));
    }

    #[test]
    fn only_noerror_answers_are_parsed_and_an_unparseable_one_is_still_relayed() {
        let q = query(3, "a.example.", None);
        let answer = long_answer(&q, None);
        assert!(
            matches!(lesson(&answer), Lesson::Records(name, records) if name.to_string() == "a.example." && records.len() == 3)
        );
        // A NOERROR answer whose answer section hickory cannot read.
        let question_end = parse_query(&q, false).unwrap().question_end;
        let mut bad = answer[..question_end].to_vec();
        bad[2] |= 0x80;
        bad[7] = 1;
        bad.extend_from_slice(&[0xc0, 0xff, 0, 28, 0, 1, 0, 0, 0, 60, 0, 16]); // a pointer past the end
        bad.extend_from_slice(&[0; 16]);
        assert!(matches!(lesson(&bad), Lesson::Unparsed(_)));
        // An error answer is not parsed at all: nothing to learn, whatever it holds.
        bad[3] |= 2;
        assert!(matches!(lesson(&bad), Lesson::Nothing));
        assert_eq!(header_rcode(&bad), ResponseCode::ServFail);
    }

    /// Only the answer to an address query (A, AAAA, ANY) is learned from:
    /// AAAA records in the answer to a TXT query teach nothing.
    #[test]
    fn only_address_queries_teach_addresses() {
        let q = query(4, "a.example.", None);
        let question_end = parse_query(&q, false).unwrap().question_end;
        let mut answer = long_answer(&q, None);
        answer[question_end - 3] = 16; // the question's type: TXT, records as before
        assert!(matches!(lesson(&answer), Lesson::Nothing), "nothing to learn");
    }

    /// The same answer again within a second is not learned again (a table
    /// it was not learned into stays empty); another answer, or the same
    /// after a second, is; answers not learned from are not remembered.
    #[test]
    fn the_same_answer_again_within_a_second_is_passed_over() {
        let shared = |names| Shared { policy: Arc::new(ArcSwap::from_pointee(Snapshot::empty())), names };
        let (first, second) = (Arc::new(NameTable::new(64)), Arc::new(NameTable::new(64)));
        let (learned_into_first, fresh) = (shared(first.clone()), shared(second.clone()));
        let ip = "2001:db8::1".parse().unwrap();
        let known = |t: &NameTable| t.names(ip, Timestamp::now()).len();
        let mut recent = Recent::default();
        let answer = long_answer(&query(4, "a.example.", None), None);
        learn_from(&learned_into_first, &answer, &Counter::noop(), Some(&mut recent));
        assert_eq!(known(&first), 1);
        let mut again = answer.clone();
        again[..2].copy_from_slice(&[7, 7]); // another upstream ID: the same answer
        learn_from(&fresh, &again, &Counter::noop(), Some(&mut recent));
        assert_eq!(known(&second), 0, "passed over");
        learn_from(&fresh, &again, &Counter::noop(), None);
        assert_eq!(known(&second), 1, "without `recent`, learned");
        let (third, other) = (Arc::new(NameTable::new(64)), long_answer(&query(4, "b.example.", None), None));
        learn_from(&shared(third.clone()), &other, &Counter::noop(), Some(&mut recent));
        assert_eq!(known(&third), 1, "another answer is learned");
        std::thread::sleep(std::time::Duration::from_millis(1_050));
        let fourth = Arc::new(NameTable::new(64));
        learn_from(&shared(fourth.clone()), &answer, &Counter::noop(), Some(&mut recent));
        assert_eq!(known(&fourth), 1, "a second later, learned again");
    }

    #[test]
    fn local_replies_keep_id_question_and_edns() {
        let q = query(9, "blocked.example.", Some(4_096));
        let p = parse_query(&q, false).unwrap();
        let r =
            Message::from_vec(&local_reply(&p.meta, Some(&p.query), p.edns.as_ref(), ResponseCode::NXDomain)).unwrap();
        assert_eq!(r.metadata.id, 9);
        assert_eq!(r.metadata.response_code, ResponseCode::NXDomain);
        assert!(r.metadata.recursion_desired && r.metadata.recursion_available);
        assert_eq!(r.queries[0].name().to_string(), "blocked.example.");
        assert_eq!(r.authorities.len(), 1, "the SOA that makes it cacheable");
        assert_eq!(r.edns.unwrap().max_payload(), LOCAL_PAYLOAD);
        assert_eq!(header_only(5, ResponseCode::ServFail)[3] & 0x0f, 2);
    }
}
