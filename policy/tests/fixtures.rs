//! Every fixture in `tests/fixtures/` (copied from the shared fixtures): the
//! good ones load; each bad one is rejected with `file:line:column` and a
//! message that says what is wrong.

use std::path::{Path, PathBuf};

use sluice_policy::model::{Enforcement, Mode};
use sluice_policy::{LoadErrors, Severity, load_paths};

fn fixtures(sub: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(sub)
}

#[test]
fn istio_and_sluice_fixtures_load() {
    let set = load_paths(&[fixtures("istio"), fixtures("sluice")]).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(set.files.len(), 6);
    let names: Vec<&str> = set.entries.iter().map(|e| e.name.as_str()).collect();
    assert_eq!(
        names,
        ["httpbin-ext", "search-cluster", "reporting-db", "payment-apis", "object-storage", "docs-mirror"]
    );
    assert_eq!(set.settings.mode, Mode::RegistryOnly);
    assert_eq!(set.settings.enforcement, Enforcement::Enforce);
    assert_eq!(set.settings.deny_ranges.len(), 2);
    assert_eq!(set.settings.workloads.len(), 2);
    assert_eq!(set.ignored.len(), 1);
    assert_eq!(set.ignored[0].kind, "DestinationRule");
    assert!(set.warnings.is_empty(), "{:?}", set.warnings);
}

/// (file, line, column, what the message must say)
const BAD: &[(&str, u64, u64, &str)] = &[
    ("bare-star-host.yaml", 7, 5, r#"bare "*" matches every host"#),
    ("billion-laughs.yaml", 6, 14, "too large or too complex"),
    ("binary-garbage.yaml", 1, 1, "not UTF-8"),
    ("cidr-with-dns-resolution.yaml", 9, 5, "allowed only with resolution NONE or STATIC, not DNS"),
    ("duplicate-key.yaml", 8, 3, "duplicate mapping key `hosts`"),
    ("none-with-endpoints.yaml", 14, 5, "no endpoints should be provided for resolution type NONE"),
    ("port-out-of-range.yaml", 9, 13, "port number 70000 must be in the range 1..65535"),
    ("truncated.yaml", 7, 5, "unclosed quote"),
    ("two-egress-policies.yaml", 9, 1, "a second EgressPolicy"),
    ("unknown-field-in-own-kind.yaml", 8, 3, "unknown field `enforcment`"),
    ("wrong-type.yaml", 6, 10, "expected a list"),
];

fn errors_of(path: &Path) -> LoadErrors {
    match load_paths(&[path]) {
        Ok(_) => panic!("{} was accepted", path.display()),
        Err(e) => e,
    }
}

#[test]
fn each_bad_fixture_is_rejected_at_its_line_and_column() {
    for (file, line, column, says) in BAD {
        let path = fixtures("bad").join(file);
        let errors = errors_of(&path);
        let first = &errors.0[0];
        assert_eq!(first.severity, Severity::Error);
        assert_eq!(&*first.file, path.as_path());
        assert_eq!((first.line, first.column), (*line, *column), "{first}");
        assert!(first.message.contains(says), "{file}: {first}");
        let rendered = first.to_string();
        assert!(rendered.starts_with(&format!("{}:{line}:{column}: ", path.display())), "{rendered}");
    }
}

#[test]
fn every_bad_fixture_is_covered_here() {
    let on_disk = std::fs::read_dir(fixtures("bad")).map(|rd| rd.count()).unwrap_or(0);
    assert_eq!(on_disk, BAD.len(), "a new bad fixture needs its expected error in BAD");
}

#[test]
fn one_run_reports_every_file_with_problems() {
    let errors = errors_of(&fixtures("bad"));
    let mut files: Vec<_> = errors.0.iter().map(|d| d.file.clone()).collect();
    files.dedup();
    assert_eq!(files.len(), BAD.len(), "{errors}");
}

#[test]
fn a_bad_file_beside_good_ones_fails_the_whole_set() {
    let errors = match load_paths(&[fixtures("istio"), fixtures("bad").join("port-out-of-range.yaml")]) {
        Ok(_) => panic!("accepted"),
        Err(e) => e,
    };
    assert_eq!(errors.0.len(), 1, "{errors}");
}

/// Symlinks back up the tree (`again -> .`) and a second link to a file are
/// read once: not the one EgressPolicy read again as "a second EgressPolicy"
/// (the set refused), nor directories walked link after link.
#[test]
fn a_directory_reached_twice_through_symlinks_is_read_once() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let copy = |name: &str| {
        let from = fixtures("sluice").join(name);
        std::fs::copy(&from, dir.path().join(name)).unwrap_or_else(|e| panic!("{}: {e}", from.display()));
    };
    copy("registry-only.yaml");
    for (link, to) in [("again", "."), ("again2", "."), ("same.yaml", "registry-only.yaml")] {
        std::os::unix::fs::symlink(to, dir.path().join(link)).unwrap_or_else(|e| panic!("{e}"));
    }
    let set = load_paths(&[dir.path()]).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(set.files.len(), 1, "{:?}", set.files);
    assert_eq!(set.settings.mode, Mode::RegistryOnly);
}
