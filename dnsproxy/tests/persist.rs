//! Restarts: the name table is saved periodically and at shutdown, and
//! restored at start, so names learned before a restart still judge the
//! connections made after it.
#![allow(clippy::unwrap_used)]

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use common::{Background, Proxy, Upstream, dig, names, shared, wait_for};
use sluice_dnsproxy::{DnsError, persist};
use sluice_policy::{NameTable, Timestamp};

fn run_persist(names: Arc<NameTable>, path: PathBuf, interval: Duration) -> Background<Result<(), DnsError>> {
    Background::spawn(move |shutdown| persist(names, path, interval, shutdown))
}

fn file_has(path: &Path, needle: &str) -> bool {
    std::fs::read_to_string(path).is_ok_and(|s| s.contains(needle))
}

#[test]
fn the_name_table_survives_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("names.jsonl");
    let up = Upstream::start();
    let first = shared(None);
    let proxy = Proxy::to(up.addr, first.clone());
    let saver = run_persist(first.names.clone(), path.clone(), Duration::from_secs(1));

    dig(proxy.addr, &["www.sluice.test", "A"]);
    dig(proxy.addr, &["many.sluice.test", "A", "+bufsize=4096"]);
    // Saved periodically while running...
    wait_for("a periodic save", || file_has(&path, "www.sluice.test"));
    // ...and at shutdown, with what was learned since.
    dig(proxy.addr, &["one.sluice.test", "A"]);
    saver.stop().unwrap();
    proxy.stop().unwrap();
    assert!(file_has(&path, "one.sluice.test"));

    let second = Arc::new(NameTable::new(10_000));
    let saver = run_persist(second.clone(), path.clone(), Duration::from_secs(60));
    wait_for("the restore", || !second.is_empty());
    assert_eq!(names(&second, "198.51.100.7"), ["a1.cdn.sluice.test", "edge.cdn.sluice.test", "www.sluice.test"]);
    assert_eq!(names(&second, "203.0.113.99"), ["one.sluice.test"]);
    for i in 1..=40 {
        assert_eq!(names(&second, &format!("198.18.0.{i}")), ["many.sluice.test"]);
    }
    saver.stop().unwrap();
}

#[test]
fn a_corrupt_file_starts_empty_and_is_replaced() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("names.jsonl");
    std::fs::write(&path, b"\x00\xffnot json\n{\"ip\": 1}\n").unwrap();
    let table = Arc::new(NameTable::new(100));
    let saver = run_persist(table.clone(), path.clone(), Duration::from_secs(60));
    table.record(
        "192.0.2.1".parse().unwrap(),
        &"after.example".parse().unwrap(),
        Duration::from_secs(60),
        Timestamp::now(),
        sluice_policy::Retention { min_ttl: Duration::ZERO, grace: Duration::ZERO },
    );
    saver.stop().unwrap();
    let restored = NameTable::new(100);
    sluice_dnsproxy::restore(&restored, &path).unwrap();
    assert_eq!(names(&restored, "192.0.2.1"), ["after.example"]);
}

#[test]
fn a_final_save_that_fails_is_an_error() {
    let table = Arc::new(NameTable::new(100));
    let saver = run_persist(table, PathBuf::from("/nonexistent-dir/names.jsonl"), Duration::from_secs(60));
    assert!(matches!(saver.stop(), Err(DnsError::Persist { .. })));
}
