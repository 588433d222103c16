//! Learning from answers: which IPs belong to which names.
//!
//! The answer section is walked from the query name along its CNAME chain;
//! each A/AAAA owned by the chain's last name is recorded under every name
//! of the chain (`www.example.com → cdn.example.net → 192.0.2.1` teaches the
//! table both names for that IP). A name's TTL is the smallest TTL on its
//! way to the address: the mapping is only as fresh as its weakest link.

use std::net::IpAddr;
use std::time::Duration;

use hickory_proto::rr::{Name, RData, Record};
use sluice_policy::{Hostname, NameTable, Retention, Timestamp};

/// Longer chains than this are cut (resolvers give up around 8–16).
pub const MAX_CHAIN: usize = 16;

/// The longest TTL learning believes (seconds; `minTtl` and `grace` come on
/// top): a bogus or hostile huge TTL must not pin a name to an IP in the
/// table for years. A day, like unbound's default `cache-max-ttl`.
pub const MAX_TTL: u32 = 86_400;

/// A record's TTL as learning reads it: one with the top bit set is 0 (RFC
/// 2181 §8: TTLs are 31 bits), and none is longer than [`MAX_TTL`].
fn usable_ttl(ttl: u32) -> u32 {
    if ttl & 0x8000_0000 != 0 { 0 } else { ttl.min(MAX_TTL) }
}

/// The query name and the CNAMEs it leads to, in order, each with the
/// [usable](usable_ttl) TTL of the CNAME record that leaves it (`u32::MAX`
/// for the last).
fn chain<'a>(qname: &'a Name, answers: &'a [Record]) -> Vec<(&'a Name, u32)> {
    let mut links: Vec<(&Name, u32)> = Vec::with_capacity(2);
    let mut current = qname;
    while links.len() < MAX_CHAIN {
        let next = answers.iter().find_map(|r| match &r.data {
            RData::CNAME(target) if &r.name == current => Some((&target.0, usable_ttl(r.ttl))),
            _ => None,
        });
        let Some((target, ttl)) = next else { break };
        links.push((current, ttl));
        if links.iter().any(|(n, _)| *n == target) {
            // A loop: what we have is all there is.
            return links;
        }
        current = target;
    }
    links.push((current, u32::MAX));
    links
}

/// What one answer taught the table.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Learned {
    /// Distinct addresses recorded.
    pub ips: usize,
    /// (IP, name) pairs recorded.
    pub records: usize,
}

/// Records every A/AAAA at the end of `qname`'s CNAME chain in `answers`
/// under every name of the chain. Names that are not valid host names
/// (escaped bytes, root) are skipped.
pub fn learn(table: &NameTable, qname: &Name, answers: &[Record], now: Timestamp, keep: Retention) -> Learned {
    let links = chain(qname, answers);
    let Some(&(end, _)) = links.last() else { return Learned::default() };
    // TTL from each name to the end of the chain: the smallest link after it.
    let mut names: Vec<(Hostname, u32)> = Vec::with_capacity(links.len());
    let mut min_ttl = u32::MAX;
    for (name, ttl) in links.iter().rev() {
        min_ttl = min_ttl.min(*ttl);
        if let Ok(host) = Hostname::parse(&name.to_ascii()) {
            names.push((host, min_ttl));
        }
    }
    let mut learned = Learned::default();
    if names.is_empty() {
        return learned;
    }
    for record in answers.iter().filter(|r| &r.name == end) {
        let ip = match &record.data {
            RData::A(a) => IpAddr::V4(a.0),
            RData::AAAA(a) => IpAddr::V6(a.0),
            _ => continue,
        };
        learned.ips += 1;
        for (host, chain_ttl) in &names {
            let ttl = Duration::from_secs(u64::from(usable_ttl(record.ttl).min(*chain_ttl)));
            table.record(ip, host, ttl, now, keep);
            learned.records += 1;
        }
    }
    learned
}

#[cfg(test)]
mod tests;
