//! Blocking at DNS (opt-in): REGISTRY_ONLY with `dns.blockUnregistered`
//! answers NXDOMAIN (never REFUSED) for names no ServiceEntry covers,
//! without asking the upstream; registered names and names under
//! registered wildcards are forwarded; a policy reload applies at once.
#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;

use common::{Proxy, Upstream, dig, flags, kdig, shared, snapshot, status};

const ENTRIES: &str = "\
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: api}
spec:
  hosts: [api.sluice.test]
  ports: [{number: 443, name: https, protocol: HTTPS}]
  resolution: DNS
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: wild}
spec:
  hosts: [\"*.wild.sluice.test\"]
  ports: [{number: 443, name: https, protocol: HTTPS}]
  resolution: NONE
";

fn policy(mode: &str, block: bool) -> String {
    format!(
        "{ENTRIES}---\napiVersion: sluice.dev/v1alpha1\nkind: EgressPolicy\nmetadata: {{name: node}}\n\
         spec:\n  outboundTrafficPolicy: {{mode: {mode}}}\n  dns: {{blockUnregistered: {block}}}\n"
    )
}

#[test]
fn unregistered_names_get_nxdomain_registered_ones_are_forwarded() {
    let up = Upstream::start();
    let proxy = Proxy::to(up.addr, shared(Some(&policy("REGISTRY_ONLY", true))));

    for (name, rtype) in [("api.sluice.test", "A"), ("x.wild.sluice.test", "A"), ("a.b.wild.sluice.test", "A")] {
        let out = dig(proxy.addr, &[name, rtype]);
        assert_eq!(status(&out), "NOERROR", "{name}: {out}");
        assert!(out.contains("ANSWER: 1"), "{name}: {out}");
    }
    let asked = up.seen();
    for (name, rtype) in [
        ("www.sluice.test", "A"),
        ("many.sluice.test", "AAAA"),
        ("exfil-0123abcd.sluice.test", "TXT"),
        ("wild.sluice.test", "A"),                  // the wildcard's own suffix is not covered
        ("api.sluice.test.svc.cluster.local", "A"), // a search-list expansion
    ] {
        let out = dig(proxy.addr, &[name, rtype]);
        assert_eq!(status(&out), "NXDOMAIN", "{name}: {out}");
        // An SOA in the authority section lets clients cache the negative answer (RFC 2308).
        let soa = out.lines().find(|l| !l.starts_with(';') && l.contains("SOA")).unwrap_or_default();
        assert!(soa.contains("blocked.sluice.invalid.") && soa.contains("60"), "{name}: {out}");
        assert_eq!(flags(&out), "qr rd ra", "{name}: {out}");
        assert!(out.contains("QUERY: 1, ANSWER: 0"), "{out}");
    }
    let out = kdig(proxy.addr, &["+tcp", "www.sluice.test", "A"]);
    assert!(out.contains("status: NXDOMAIN") && out.contains("(TCP)"), "{out}");
    assert_eq!(up.seen(), asked, "blocked names must not reach the upstream");
    assert!(proxy.names("198.51.100.7").is_empty());

    // A reload to ALLOW_ANY (or block off) forwards everything again.
    for (mode, block) in [("ALLOW_ANY", true), ("REGISTRY_ONLY", false)] {
        proxy.shared.policy.store(Arc::new(snapshot(&policy(mode, block))));
        let out = dig(proxy.addr, &["www.sluice.test", "A"]);
        assert_eq!(status(&out), "NOERROR", "{mode} {block}: {out}");
    }
}
