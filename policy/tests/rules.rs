//! Istio's ServiceEntry rules and sluice's own, one case each, through the
//! real loader: the error names the line, column and field.

use std::path::Path;

use sluice_policy::load::split_documents;
use sluice_policy::model::{Mode, Protocol, Resolution};
use sluice_policy::{PolicySet, Severity, SourceFile, load_sources};

fn load(text: &str) -> Result<PolicySet, Vec<String>> {
    let files = [SourceFile { path: Path::new("p.yaml").into(), bytes: text.as_bytes().to_vec() }];
    load_sources(&files).map_err(|e| e.0.iter().map(ToString::to_string).collect())
}

fn se(spec: &str) -> String {
    format!("apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata:\n  name: t\nspec:\n{spec}")
}

#[track_caller]
fn rejects(text: &str, expected: &str) {
    match load(text) {
        Ok(_) => panic!("accepted:\n{text}"),
        Err(errors) => assert!(errors.iter().any(|e| e.contains(expected)), "wanted {expected:?} in {errors:#?}"),
    }
}

#[track_caller]
fn accepts(text: &str) -> PolicySet {
    load(text).unwrap_or_else(|e| panic!("{e:#?}\n{text}"))
}

const TLS443: &str = "  ports: [{number: 443, name: tls, protocol: TLS}]\n";

#[test]
fn hosts_are_required_and_normalised() {
    rejects(&se(TLS443), "p.yaml:6:3: service entry must have at least one host (spec.hosts)");
    let set = accepts(&se(&format!("  hosts: [API.Example.COM., bücher.example]\n{TLS443}")));
    let hosts: Vec<String> = set.entries[0].hosts.iter().map(ToString::to_string).collect();
    assert_eq!(hosts, ["api.example.com", "xn--bcher-kva.example"]);
    rejects(&se(&format!("  hosts: [a.*.example]\n{TLS443}")), "p.yaml:6:11: invalid host");
    // An address is not a host (it would match nothing): Istio refuses it; sluice ignores it, with a warning
    // (a set that had one loaded before, and its saved copy, still load).
    for (host, says) in [
        ("10.1.2.3", "is an IP address, not a host name: list it in spec.addresses"),
        ("'2001:db8::1'", "is an IP address"),
        ("db.internal.42", "ends in an all-numeric label"),
    ] {
        let set = accepts(&se(&format!("  hosts: [{host}, ok.example]\n{TLS443}")));
        let hosts: Vec<String> = set.entries[0].hosts.iter().map(ToString::to_string).collect();
        assert_eq!(hosts, ["ok.example"], "{host}");
        assert!(set.warnings.iter().any(|w| w.message.contains(says)), "{host}: {:?}", set.warnings);
    }
    accepts(&se(&format!("  hosts: [db.42.example, 1.2.3.4.in-addr.arpa]\n{TLS443}")));
}

#[test]
fn dns_resolution_rules() {
    rejects(
        &se(&format!("  hosts: ['*.example.com']\n{TLS443}  resolution: DNS\n")),
        "wildcard host *.example.com needs endpoints with resolution DNS",
    );
    rejects(
        &se(
            "  hosts: [a.example]\n  ports: [{number: 1, name: p}]\n  resolution: DNS_ROUND_ROBIN\n  endpoints: [{address: a.lb.example}, {address: b.lb.example}]\n",
        ),
        "p.yaml:9:40: there must be at most 1 endpoint for resolution DNS_ROUND_ROBIN",
    );
    rejects(
        &se("  hosts: [a.example, b.example]\n  ports: [{number: 5432, name: pg, protocol: TCP}]\n  resolution: DNS\n"),
        "multiple hosts provided with non-HTTP, non-TLS ports (spec.ports[0])",
    );
    // After a port with a bad number, the error still names the port it is about.
    let errors = load(&se(
        "  hosts: [a.example, b.example]\n  ports:\n  - {number: 0, name: x}\n  - {number: 443, name: tls, protocol: TLS}\n  - {number: 5432, name: pg, protocol: TCP}\n  resolution: DNS\n",
    ))
    .err()
    .unwrap_or_default();
    let multiple: Vec<_> = errors.iter().filter(|e| e.contains("multiple hosts")).collect();
    assert_eq!(multiple.len(), 1, "{errors:#?}");
    assert!(multiple[0].starts_with("p.yaml:10:5: ") && multiple[0].ends_with("(spec.ports[2])"), "{errors:#?}");
    rejects(
        &se(&format!("  hosts: [a.example]\n{TLS443}  resolution: DNS\n  endpoints: [{{address: 'bad name'}}]\n")),
        "not a valid FQDN or an IP address",
    );
}

#[test]
fn static_endpoints_are_ip_addresses() {
    rejects(
        &se(&format!("  hosts: [a.example]\n{TLS443}  resolution: STATIC\n  endpoints: [{{address: db.example}}]\n")),
        "endpoint address \"db.example\" is not an IP address (resolution STATIC)",
    );
    let set = accepts(&se(&format!(
        "  hosts: [a.example]\n{TLS443}  resolution: STATIC\n  endpoints: [{{address: 198.18.0.1, ports: {{tls: 8443}}}}, {{address: 'unix:///run/a.sock'}}]\n"
    )));
    assert_eq!(set.entries[0].resolution, Resolution::Static);
    assert_eq!(set.entries[0].endpoints[0].ports, [("tls".to_owned(), 8443)]);
}

#[test]
fn endpoints_and_workload_selector_exclude_each_other() {
    rejects(
        &se(&format!(
            "  hosts: [a.example]\n{TLS443}  resolution: STATIC\n  endpoints: [{{address: 198.18.0.1}}]\n  workloadSelector: {{labels: {{app: x}}}}\n"
        )),
        "only one of workloadSelector or endpoints is allowed",
    );
    rejects(
        &se(&format!(
            "  hosts: [a.example]\n{TLS443}  resolution: STATIC\n  workloadSelector: {{labels: {{app: '*'}}}}\n"
        )),
        "wildcard is not supported in selector",
    );
}

#[test]
fn port_rules() {
    rejects(&se("  hosts: [a.example]\n  ports: [{number: 443}]\n"), "port name is required (spec.ports[0].name)");
    rejects(&se("  hosts: [a.example]\n  ports: [{number: 443, name: Bad_Name}]\n"), "invalid port name");
    rejects(
        &se("  hosts: [a.example]\n  ports: [{number: 443, name: a}, {number: 443, name: b}]\n"),
        "port 443 is already defined",
    );
    rejects(
        &se("  hosts: [a.example]\n  ports: [{number: 443, name: a}, {number: 444, name: a}]\n"),
        "port name \"a\" is already defined",
    );
    rejects(
        &se("  hosts: [a.example]\n  ports: [{number: 0, name: a}]\n"),
        "port number 0 must be in the range 1..65535",
    );
    rejects(&se("  hosts: [a.example]\n  ports: [{number: 80, name: a, targetPort: 65536}]\n"), "targetPort 65536");
    rejects(
        &se("  hosts: [a.example]\n  ports: [{number: 80, name: a, protocol: QUIC}]\n"),
        "unsupported protocol \"QUIC\"",
    );
    rejects(
        &se(
            "  hosts: [a.example]\n  ports: [{number: 80, name: a}]\n  resolution: STATIC\n  endpoints: [{address: 198.18.0.1, ports: {b: 8080}}]\n",
        ),
        "endpoint port \"b\" is not defined by the service entry",
    );
    let set = accepts(&se(
        "  hosts: [a.example]\n  ports: [{number: 80, name: a, protocol: http, targetPort: 8080}, {number: 81, name: b}]\n",
    ));
    let ports = &set.entries[0].ports;
    assert_eq!((ports[0].protocol, ports[0].target_port), (Protocol::Http, Some(8080)));
    assert_eq!(ports[1].protocol, Protocol::Unspecified);
}

#[test]
fn addresses_and_export_to() {
    rejects(
        &se(&format!("  hosts: [a.example]\n  addresses: [300.1.1.1]\n{TLS443}")),
        "\"300.1.1.1\" is not a valid IP address",
    );
    rejects(&se(&format!("  hosts: [a.example]\n  addresses: [198.18.0.0/33]\n{TLS443}")), "not a valid CIDR block");
    let set = accepts(&se(&format!(
        "  hosts: [a.example]\n  addresses: [198.18.0.9, '2001:db8::1']\n{TLS443}  resolution: DNS\n  exportTo: ['.']\n"
    )));
    assert_eq!(set.entries[0].addresses.len(), 2, "single IPs are allowed with DNS, only CIDRs are not");
    let set = accepts(&se(&format!("  hosts: [a.example]\n  addresses: ['2001:db8::/32', 198.18.0.0/15]\n{TLS443}")));
    assert_eq!(set.entries[0].addresses.len(), 2);
    rejects(&se(&format!("  hosts: [a.example]\n{TLS443}  exportTo: ['*', '.']\n")), "cannot be combined");
    rejects(&se(&format!("  hosts: [a.example]\n{TLS443}  exportTo: [Bad!]\n")), "exportTo entry \"Bad!\"");
}

#[test]
fn istio_fields_added_later_are_tolerated_but_not_in_sluice_own_kind() {
    let set = accepts(&se(&format!(
        "  hosts: [a.example]\n{TLS443}  subjectAltNames: [x]\n  someFutureField: {{a: 1}}\nstatus: {{conditions: []}}\n"
    )));
    assert_eq!(set.entries.len(), 1);
    rejects(
        "apiVersion: sluice.dev/v1alpha1\nkind: EgressPolicy\nmetadata: {name: x}\nspec:\n  dns: {minTTL: 5s}\n",
        "p.yaml:5:9: unknown field `minTTL`",
    );
    rejects(
        "apiVersion: sluice.dev/v1alpha1\nkind: EgressPolicy\nspec:\n  dns: {grace: soon}\n",
        "invalid duration \"soon\"",
    );
    rejects(
        "apiVersion: sluice.dev/v1alpha1\nkind: EgressPolicy\nspec:\n  outboundTrafficPolicy: {mode: DENY}\n",
        "unknown variant `DENY`",
    );
    rejects("apiVersion: sluice.dev/v1beta9\nkind: EgressPolicy\nspec: {}\n", "unknown sluice kind");
}

#[test]
fn other_kinds_and_versions() {
    let set = accepts(
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: vs}\nspec: {hosts: [a], http: []}\n---\napiVersion: v1\nkind: ConfigMap\ndata: {a: b}\n",
    );
    assert_eq!(set.ignored.len(), 2);
    rejects(
        "apiVersion: networking.istio.io/v2\nkind: ServiceEntry\nspec: {hosts: [a.example]}\n",
        "unsupported apiVersion",
    );
    rejects("hosts: [a.example]\n", "apiVersion and kind are required");
    rejects("apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {name: x}\n", "spec is required");
}

#[test]
fn a_namespace_wide_sidecar_sets_the_mode_unless_an_egress_policy_does() {
    let sidecar = "apiVersion: networking.istio.io/v1\nkind: Sidecar\nmetadata: {name: default}\nspec:\n  outboundTrafficPolicy: {mode: REGISTRY_ONLY}\n";
    assert_eq!(accepts(sidecar).settings.mode, Mode::RegistryOnly);
    let own =
        "apiVersion: sluice.dev/v1alpha1\nkind: EgressPolicy\nspec:\n  outboundTrafficPolicy: {mode: ALLOW_ANY}\n";
    let both = accepts(&format!("{sidecar}---\n{own}"));
    assert_eq!(both.settings.mode, Mode::AllowAny);
    assert_eq!(both.warnings.len(), 1);
    assert_eq!(both.warnings[0].severity, Severity::Warning);
    // An EgressPolicy that does not say the mode leaves the Sidecar's: a deny
    // range added to a REGISTRY_ONLY node must not open it to everything.
    let silent = "apiVersion: sluice.dev/v1alpha1\nkind: EgressPolicy\nspec:\n  denyRanges: [169.254.169.254/32]\n  dns: {blockUnregistered: true}\n";
    let both = accepts(&format!("{sidecar}---\n{silent}"));
    assert_eq!(both.settings.mode, Mode::RegistryOnly);
    assert!(both.warnings.is_empty(), "blockUnregistered works in the Sidecar's mode: {:?}", both.warnings);
    assert_eq!(accepts(silent).settings.mode, Mode::AllowAny, "nothing says the mode: ALLOW_ANY");
    let warned = &accepts(silent).warnings;
    assert_eq!(warned.len(), 1, "blockUnregistered does nothing in ALLOW_ANY: {warned:?}");
    assert!(warned[0].message.contains("blockUnregistered has no effect"), "{:?}", warned[0]);
}

/// `exportTo: ['~']` is Istio's "visible in no namespace": the entry is off,
/// and sluice (node-wide) registers nothing for it, with a warning.
#[test]
fn an_entry_exported_to_no_namespace_registers_nothing() {
    let set = accepts(&se(&format!("  hosts: [off.example]\n{TLS443}  exportTo: ['~']\n")));
    assert!(set.entries.is_empty(), "{:?}", set.entries);
    assert!(set.warnings.iter().any(|w| w.message.contains("registers nothing")), "{:?}", set.warnings);
    let set = accepts(&se(&format!("  hosts: [on.example]\n{TLS443}  exportTo: ['.']\n")));
    assert_eq!(set.entries.len(), 1, "'.' (its own namespace) is node-wide here");
}

#[test]
fn every_document_of_a_file_is_checked_and_located() {
    let text = format!(
        "# two broken documents and a good one\n{}\n---\n{}\n---\n{}",
        se("  hosts: ['*']\n  ports: [{number: 1, name: a}]"),
        se("  hosts: [ok.example]\n  ports: [{number: 1, name: a}]"),
        se("  hosts: [b.example]\n  ports: [{number: 99999, name: a}]"),
    );
    let errors = load(&text).err().unwrap_or_default();
    assert_eq!(errors.len(), 2, "{errors:#?}");
    assert!(errors[0].starts_with("p.yaml:7:11: invalid host"), "{}", errors[0]);
    assert!(errors[1].starts_with("p.yaml:24:20: port number 99999"), "{}", errors[1]);
}

#[test]
fn empty_files_and_json_are_fine() {
    assert_eq!(accepts("").entries.len(), 0);
    assert_eq!(accepts("# nothing yet\n---\n").entries.len(), 0);
    // A marker with a comment after it starts a document, and holds nothing itself.
    let commented =
        format!("--- # payments\n---\n{}\n--- # end\n", se("  hosts: [c.example]\n  ports: [{number: 1, name: a}]"));
    assert_eq!(accepts(&commented).entries.len(), 1);
    let json = r#"{"apiVersion":"networking.istio.io/v1","kind":"ServiceEntry","metadata":{"name":"j"},"spec":{"hosts":["j.example"],"ports":[{"number":443,"name":"tls","protocol":"TLS"}]}}"#;
    assert_eq!(accepts(json).entries[0].name, "j");
}

#[test]
fn document_splitting_follows_yaml_markers() {
    let text = "%YAML 1.2\n---\na: 1\n...\n# comment\n--- \nb: |\n  --- not a marker, indented\n---\n---\nc: 3\n";
    let docs = split_documents(text);
    let starts: Vec<u64> = docs.iter().map(|d| d.line_offset).collect();
    assert_eq!(starts, [0, 4, 9], "the empty document between two markers is dropped");
    assert!(docs[1].text.contains("not a marker"));
    assert!(docs[2].text.ends_with("c: 3\n"));
    assert!(split_documents("# only a comment\n").is_empty());
}

/// A kind sluice reads, under a group it does not (a typo), and a
/// `kubectl get -o yaml` List are ignored — but with a warning: a policy that
/// silently lost its EgressPolicy would fall back to ALLOW_ANY.
#[test]
fn a_known_kind_in_an_unknown_group_and_a_list_are_ignored_with_a_warning() {
    let text = "apiVersion: sluice.io/v1alpha1\nkind: EgressPolicy\nmetadata: {name: n}\nspec: {}\n---\n\
                apiVersion: v1\nkind: List\nitems: []\n---\n\
                apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: d}\n";
    let set = accepts(text);
    assert_eq!((set.ignored.len(), set.settings.mode), (3, Mode::AllowAny));
    let warnings: Vec<String> = set.warnings.iter().map(ToString::to_string).collect();
    assert_eq!(warnings.len(), 2, "{warnings:#?}");
    assert!(
        warnings[0].starts_with("p.yaml:2:7: warning: EgressPolicy in \"sluice.io/v1alpha1\" is ignored"),
        "{warnings:#?}"
    );
    assert!(warnings[1].contains("a List is ignored"), "{warnings:#?}");
    assert!(set.warnings.iter().all(|w| w.severity == Severity::Warning));
}
