//! The compiled policy: what the hot path reads on every connection.
//!
//! Host lookups are hash probes: one for the exact name, then one per
//! parent suffix for `*.suffix` wildcards (most specific first), so the cost
//! grows with the labels of the name, not with the number of ServiceEntries.
//! Address ranges, deny ranges and workload sources are prefix tries.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;

use ipnet::IpNet;
use prefix_trie::joint::map::JointPrefixMap;
use smallvec::SmallVec;

use crate::host::{HostPattern, Hostname};
use crate::model::{EgressSettings, PolicySet, ServiceEntry};

type FastMap<K, V> = HashMap<K, V, foldhash::fast::RandomState>;

/// Which host of which ServiceEntry matched.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostRef {
    pub entry: u32,
    pub host: u32,
}

/// A host of an entry and that entry's ports, inline so a match needs no
/// further pointer chasing into the entry.
#[derive(Debug, Clone)]
struct Target {
    r: HostRef,
    ports: SmallVec<[u16; 4]>,
}

type Targets = SmallVec<[Target; 1]>;

/// An immutable, compiled policy. Built once per reload, shared by `Arc`.
#[derive(Debug)]
pub struct Snapshot {
    entries: Vec<ServiceEntry>,
    exact: FastMap<Hostname, Targets>,
    wildcard: FastMap<Box<str>, Targets>,
    addresses: JointPrefixMap<IpNet, Vec<u32>>,
    deny: JointPrefixMap<IpNet, ()>,
    workloads: JointPrefixMap<IpNet, Arc<str>>,
    /// Ports where some ServiceEntry speaks HTTP or TLS: one bit per port.
    name_ports: Box<[u64; 1024]>,
    /// Ports some ServiceEntry declares, whatever its protocol.
    entry_ports: Box<[u64; 1024]>,
    settings: EgressSettings,
}

impl Snapshot {
    pub fn compile(set: &PolicySet) -> Snapshot {
        let mut snap = Snapshot {
            entries: set.entries.clone(),
            exact: FastMap::default(),
            wildcard: FastMap::default(),
            addresses: JointPrefixMap::new(),
            deny: JointPrefixMap::new(),
            workloads: JointPrefixMap::new(),
            name_ports: Box::new([0; 1024]),
            entry_ports: Box::new([0; 1024]),
            settings: set.settings.clone(),
        };
        for (e, entry) in set.entries.iter().enumerate() {
            let e = e as u32;
            let ports: SmallVec<[u16; 4]> = entry.ports.iter().map(|p| p.number).collect();
            for (h, host) in entry.hosts.iter().enumerate() {
                let t = Target { r: HostRef { entry: e, host: h as u32 }, ports: ports.clone() };
                match host {
                    HostPattern::Exact(name) => snap.exact.entry(name.clone()).or_default().push(t),
                    HostPattern::Wildcard(suffix) => snap.wildcard.entry(suffix.as_str().into()).or_default().push(t),
                }
            }
            for p in &entry.ports {
                set_bit(&mut snap.entry_ports, p.number);
                if p.protocol.is_http() || p.protocol.is_tls() {
                    set_bit(&mut snap.name_ports, p.number);
                }
            }
            for net in &entry.addresses {
                match snap.addresses.get_mut(net) {
                    Some(list) => list.push(e),
                    None => {
                        snap.addresses.insert(*net, vec![e]);
                    }
                }
            }
        }
        for net in &set.settings.deny_ranges {
            snap.deny.insert(*net, ());
        }
        for w in &set.settings.workloads {
            for net in &w.sources {
                snap.workloads.insert(*net, w.name.clone());
            }
        }
        snap
    }

    /// A snapshot with no entries and default settings (ALLOW_ANY).
    pub fn empty() -> Snapshot {
        let set = PolicySet {
            entries: Vec::new(),
            settings: EgressSettings::default(),
            ignored: Vec::new(),
            files: Vec::new(),
            warnings: Vec::new(),
        };
        Snapshot::compile(&set)
    }

    pub fn settings(&self) -> &EgressSettings {
        &self.settings
    }

    pub fn entries(&self) -> &[ServiceEntry] {
        &self.entries
    }

    pub fn entry(&self, r: HostRef) -> &ServiceEntry {
        &self.entries[r.entry as usize]
    }

    pub fn host(&self, r: HostRef) -> &HostPattern {
        &self.entry(r).hosts[r.host as usize]
    }

    fn has_port(&self, entry: u32, port: u16) -> bool {
        self.entries[entry as usize].ports.iter().any(|p| p.number == port)
    }

    /// The ServiceEntry host that covers `name` on `port`: exact hosts
    /// first, then the most specific wildcard; ties go to the entry loaded first.
    pub fn match_name(&self, name: &Hostname, port: u16) -> Option<HostRef> {
        let on_port = |ts: &Targets| ts.iter().find(|t| t.ports.contains(&port)).map(|t| t.r);
        if let Some(r) = self.exact.get(name).and_then(on_port) {
            return Some(r);
        }
        if self.wildcard.is_empty() {
            return None;
        }
        let s = name.as_str();
        let mut rest = s;
        while let Some((_, parent)) = rest.split_once('.') {
            if let Some(r) = self.wildcard.get(parent).and_then(on_port) {
                return Some(r);
            }
            rest = parent;
        }
        None
    }

    /// Whether a name is covered by any ServiceEntry host, on any port
    /// (what the DNS proxy asks before answering NXDOMAIN).
    pub fn covers_name(&self, name: &Hostname) -> bool {
        if self.exact.contains_key(name) {
            return true;
        }
        let mut rest = name.as_str();
        while let Some((_, parent)) = rest.split_once('.') {
            if self.wildcard.contains_key(parent) {
                return true;
            }
            rest = parent;
        }
        false
    }

    /// The first ServiceEntry whose `addresses` contain `ip` and that
    /// declares `port`, and the range that matched.
    pub fn match_address(&self, ip: IpAddr, port: u16) -> Option<(u32, IpNet)> {
        if self.addresses.is_empty() {
            return None;
        }
        // `cover` yields the shortest prefix first: keep the last (most specific) one with the port.
        let mut found = None;
        for (net, entries) in self.addresses.cover(&IpNet::from(ip)) {
            if let Some(e) = entries.iter().copied().find(|e| self.has_port(*e, port)) {
                found = Some((e, net));
            }
        }
        found
    }

    /// The deny range containing `ip`, if any.
    pub fn deny_range(&self, ip: IpAddr) -> Option<IpNet> {
        self.deny.get_lpm(&IpNet::from(ip)).map(|(net, _)| net)
    }

    /// The workload (source_workload label) a source address belongs to.
    pub fn workload(&self, source: IpAddr) -> Option<&Arc<str>> {
        self.workloads.get_lpm(&IpNet::from(source)).map(|(_, w)| w)
    }

    /// Whether some ServiceEntry serves HTTP or TLS on `port`.
    pub fn is_name_port(&self, port: u16) -> bool {
        bit(&self.name_ports, port)
    }

    /// Whether some ServiceEntry declares `port` (any protocol).
    pub fn serves_port(&self, port: u16) -> bool {
        bit(&self.entry_ports, port)
    }
}

fn set_bit(bits: &mut [u64; 1024], port: u16) {
    bits[usize::from(port / 64)] |= 1 << (port % 64);
}

fn bit(bits: &[u64; 1024], port: u16) -> bool {
    bits[usize::from(port / 64)] & (1 << (port % 64)) != 0
}
