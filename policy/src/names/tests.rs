use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use super::*;

const KEEP: Retention = Retention { min_ttl: Duration::from_secs(5), grace: Duration::from_secs(60) };
const T0: Timestamp = Timestamp::from_unix_millis(1_700_000_000_000);

fn ip(last: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(198, 18, 0, last))
}

fn host(s: &str) -> Hostname {
    Hostname::parse(s).unwrap_or_else(|e| panic!("{s}: {e}"))
}

fn at(secs: u64) -> Timestamp {
    T0.plus(Duration::from_secs(secs))
}

#[test]
fn ttl_is_raised_to_min_ttl_and_grace_is_added() {
    let t = NameTable::new(100);
    t.record(ip(1), &host("a.example"), Duration::from_secs(1), T0, KEEP);
    // 1s TTL raised to 5s, plus 60s grace: alive at 64s, gone at 65s.
    assert_eq!(t.names(ip(1), at(64)), vec![host("a.example")]);
    assert!(t.names(ip(1), at(65)).is_empty());
    t.record(ip(2), &host("b.example"), Duration::from_secs(300), T0, KEEP);
    assert_eq!(t.names(ip(2), at(359)), vec![host("b.example")]);
    assert!(t.names(ip(2), at(360)).is_empty());
}

#[test]
fn use_renews_grace_past_ttl() {
    let t = NameTable::new(100);
    t.record(ip(1), &host("a.example"), Duration::from_secs(5), T0, KEEP);
    for minute in 1..=10 {
        t.touch(ip(1), at(minute * 50), KEEP.grace);
    }
    // Last use at 500s: alive until 560s although the TTL ran out at 5s.
    assert_eq!(t.names(ip(1), at(559)), vec![host("a.example")]);
    assert!(t.names(ip(1), at(561)).is_empty());
}

/// A use renews the names alive at that moment only: a name that had died
/// is not brought back by a use of its IP under another name (it would then
/// match its ServiceEntry again, long after DNS stopped giving it).
#[test]
fn a_use_does_not_bring_a_dead_name_back() {
    let t = NameTable::new(100);
    // Recorded together: old.example dies at 65 s, new.example lives to 360 s.
    t.record(ip(1), &host("old.example"), Duration::from_secs(5), T0, KEEP);
    t.record(ip(1), &host("new.example"), Duration::from_secs(300), T0, KEEP);
    t.touch(ip(1), at(100), KEEP.grace);
    assert_eq!(t.names(ip(1), at(101)), vec![host("new.example")]);
    // Dead when DNS gives the IP another name: the use after that renews that one only.
    t.record(ip(2), &host("old.example"), Duration::from_secs(5), T0, KEEP);
    t.record(ip(2), &host("other.example"), Duration::from_secs(5), at(100), KEEP);
    t.touch(ip(2), at(101), KEEP.grace);
    assert_eq!(t.names(ip(2), at(102)), vec![host("other.example")]);
    assert_eq!(t.pair_count(), 3, "the dead name went when its IP's names were copied");
    // While alive, both are renewed by a use.
    t.record(ip(3), &host("a.example"), Duration::from_secs(5), T0, KEEP);
    t.record(ip(3), &host("b.example"), Duration::from_secs(5), T0, KEEP);
    t.touch(ip(3), at(60), KEEP.grace);
    assert_eq!(t.names(ip(3), at(119)).len(), 2);
}

#[test]
fn an_ip_carries_many_names_and_each_expires_on_its_own() {
    let t = NameTable::new(100);
    t.record(ip(1), &host("a.cdn.example"), Duration::from_secs(10), T0, KEEP);
    t.record(ip(1), &host("b.cdn.example"), Duration::from_secs(100), T0, KEEP);
    t.record(ip(1), &host("a.cdn.example"), Duration::from_secs(5), T0, KEEP); // a shorter answer never shortens
    let mut names = t.names(ip(1), at(30));
    names.sort();
    assert_eq!(names, vec![host("a.cdn.example"), host("b.cdn.example")]);
    assert_eq!(t.names(ip(1), at(100)), vec![host("b.cdn.example")]);
}

#[test]
fn names_per_ip_are_capped_replacing_the_soonest_to_expire() {
    let t = NameTable::new(100);
    for i in 0..MAX_NAMES_PER_IP as u64 + 5 {
        t.record(ip(1), &host(&format!("n{i}.example")), Duration::from_secs(100 + i), T0, KEEP);
    }
    let names = t.names(ip(1), T0);
    assert_eq!(names.len(), MAX_NAMES_PER_IP);
    assert!(!names.contains(&host("n0.example")), "the soonest-expiring name is the one replaced");
    assert!(names.contains(&host(&format!("n{}.example", MAX_NAMES_PER_IP + 4))));
}

#[test]
fn the_cap_evicts_expired_first_then_least_recently_used() {
    let t = NameTable::new(10);
    for i in 0..10 {
        t.record(ip(i), &host(&format!("n{i}.example")), Duration::from_secs(3600), at(u64::from(i)), KEEP);
    }
    t.touch(ip(0), at(20), KEEP.grace); // ip 0 is now the most recently used
    t.record(ip(10), &host("n10.example"), Duration::from_secs(3600), at(21), KEEP);
    assert!(t.len() <= 10);
    assert!(!t.names(ip(0), at(21)).is_empty(), "recently used survives");
    assert!(t.names(ip(1), at(21)).is_empty(), "least recently used goes");
    assert!(!t.names(ip(10), at(21)).is_empty(), "the new entry is kept");
    assert_eq!(t.pair_count(), t.name_count(), "the kept count follows the eviction");
}

/// With an evictor elsewhere (a thread), a writer past the capacity does not
/// evict itself (up to a quarter over); the evictor brings the table back under it.
#[test]
fn the_evictor_thread_keeps_the_table_within_its_caps() {
    let t = Arc::new(NameTable::new(1_000));
    // Asked only while evicting: says which thread evicts.
    let evicting_threads = Arc::new(std::sync::Mutex::new(std::collections::BTreeSet::new()));
    let seen = evicting_threads.clone();
    t.set_registered(move |_| {
        seen.lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(std::thread::current().name().unwrap_or("?").to_owned());
        false
    });
    // An evictor thread, as the daemon runs one.
    let table = Arc::downgrade(&t);
    let evictor = std::thread::Builder::new()
        .name("sluice-names-evict".into())
        .spawn(move || {
            while let Some(table) = table.upgrade() {
                if !table.evict_pending(Timestamp::now()) {
                    drop(table);
                    std::thread::park_timeout(Duration::from_millis(100));
                }
            }
        })
        .unwrap_or_else(|e| panic!("{e}"));
    let wake = evictor.thread().clone();
    t.evict_elsewhere(move || wake.unpark());
    let now = Timestamp::now();
    for i in 0..1_200u32 {
        let ip = IpAddr::V4(Ipv4Addr::from(0xc612_0000 + i));
        t.record(ip, &host(&format!("n{i}.example")), Duration::from_secs(3600), now, KEEP);
        assert!(t.len() <= 1_250 + 1, "{} IPs: past the hard cap", t.len());
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while t.len() > 1_000 {
        assert!(std::time::Instant::now() < deadline, "the evictor left {} IPs", t.len());
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(t.pair_count(), t.name_count());
    let threads: Vec<String> =
        evicting_threads.lock().unwrap_or_else(std::sync::PoisonError::into_inner).iter().cloned().collect();
    assert_eq!(threads, ["sluice-names-evict"], "evicted by the writer itself");
}

/// A table that knows names under `svc.example` are registered.
fn registering_svc(capacity: usize) -> NameTable {
    let t = NameTable::new(capacity);
    t.set_registered(|name| name.as_str().ends_with(".svc.example"));
    t
}

/// A pod resolving made-up names (each to its own IP) fills the table: the
/// IPs of registered names, however long unused, go after all the others.
#[test]
fn a_flood_of_unregistered_names_does_not_push_registered_ones_out() {
    let t = registering_svc(10);
    t.record(ip(0), &host("api.svc.example"), Duration::from_secs(3600), T0, KEEP);
    t.record(ip(1), &host("old.example"), Duration::from_secs(3600), T0, KEEP);
    for i in 2..40 {
        t.record(ip(i), &host(&format!("junk{i}.evil.example")), Duration::from_secs(3600), at(u64::from(i)), KEEP);
    }
    assert!(t.len() <= 10);
    assert_eq!(t.names(ip(0), at(40)), vec![host("api.svc.example")], "the registered name stays");
    assert!(t.names(ip(1), at(40)).is_empty(), "an unregistered name as old goes");
    assert!(!t.names(ip(39), at(40)).is_empty(), "the newest stays");
    // Over the name budget (many names per IP) too.
    let t = registering_svc(10);
    t.record(ip(0), &host("api.svc.example"), Duration::from_secs(3600), T0, KEEP);
    for i in 1..12u8 {
        for n in 0..MAX_NAMES_PER_IP {
            let name = host(&format!("n{n}.junk{i}.evil.example"));
            t.record(ip(i), &name, Duration::from_secs(3600), at(u64::from(i)), KEEP);
        }
    }
    assert!(t.name_count() <= 10 * NAMES_PER_IP_BUDGET);
    assert_eq!(t.names(ip(0), at(20)), vec![host("api.svc.example")], "the registered name stays");
}

/// Dozens of made-up names pointed at a registered service's IP, with
/// longer TTLs than its own, do not replace its name there.
#[test]
fn names_piled_on_one_ip_do_not_replace_a_registered_one() {
    let t = registering_svc(100);
    t.record(ip(1), &host("api.svc.example"), Duration::from_secs(10), T0, KEEP);
    for n in 0..2 * MAX_NAMES_PER_IP {
        t.record(ip(1), &host(&format!("n{n}.evil.example")), Duration::from_secs(3600), T0, KEEP);
    }
    let names = t.names(ip(1), T0);
    assert_eq!(names.len(), MAX_NAMES_PER_IP);
    assert!(names.contains(&host("api.svc.example")), "the registered name stays");
    assert!(
        names.contains(&host(&format!("n{}.evil.example", 2 * MAX_NAMES_PER_IP - 1))),
        "the newest other name is in"
    );
    // An IP full of registered names keeps them all against an unregistered
    // name; another registered name replaces the soonest to die of them.
    for n in 0..MAX_NAMES_PER_IP as u64 {
        t.record(ip(2), &host(&format!("r{n}.svc.example")), Duration::from_secs(100 + n), T0, KEEP);
    }
    t.record(ip(2), &host("late.evil.example"), Duration::from_secs(3600), T0, KEEP);
    assert!(!t.names(ip(2), T0).contains(&host("late.evil.example")));
    t.record(ip(2), &host("late.svc.example"), Duration::from_secs(3600), T0, KEEP);
    let names = t.names(ip(2), T0);
    assert!(names.contains(&host("late.svc.example")) && !names.contains(&host("r0.svc.example")));
    assert_eq!(
        (names.len(), t.pair_count(), t.name_count()),
        (MAX_NAMES_PER_IP, 2 * MAX_NAMES_PER_IP, 2 * MAX_NAMES_PER_IP)
    );
}

#[test]
fn many_names_on_many_ips_stay_within_the_name_budget() {
    let t = NameTable::new(100);
    // Every IP gets 32 names: 3,200 pairs would fit the per-IP cap, the budget is 200.
    for i in 0..100u8 {
        for n in 0..32 {
            t.record(ip(i), &host(&format!("n{n}.ip{i}.example")), Duration::from_secs(3600), at(u64::from(i)), KEEP);
        }
        assert!(t.name_count() <= 100 * NAMES_PER_IP_BUDGET, "{} pairs after ip {i}", t.name_count());
        assert_eq!(t.pair_count(), t.name_count(), "the kept count follows evictions (after ip {i})");
    }
    assert_eq!(t.names(ip(99), at(100)).len(), 32, "the newest IP keeps its names");
    assert!(t.names(ip(1), at(100)).is_empty(), "the least recently used IPs went");
    // Two names per IP (the budget's average) fit whole: nothing is evicted below the capacity.
    let t = NameTable::new(100);
    for i in 0..100u8 {
        t.record(ip(i), &host(&format!("ip{i}.example")), Duration::from_secs(3600), at(1), KEEP);
        t.record(ip(i), &host(&format!("alias.ip{i}.example")), Duration::from_secs(3600), at(1), KEEP);
    }
    assert_eq!((t.len(), t.name_count(), t.pair_count()), (100, 200, 200));
}

#[test]
fn purge_removes_only_dead_ips() {
    let t = NameTable::new(100);
    t.record(ip(1), &host("short.example"), Duration::from_secs(1), T0, KEEP);
    t.record(ip(2), &host("long.example"), Duration::from_secs(3600), T0, KEEP);
    assert_eq!(t.purge_expired(at(100)), 1);
    assert_eq!((t.len(), t.pair_count()), (1, 1));
}

#[test]
fn readers_see_stable_names_while_a_writer_inserts() {
    let t = Arc::new(NameTable::new(50_000));
    t.record(ip(1), &host("stable.example"), Duration::from_secs(3600), T0, KEEP);
    let stop = Arc::new(AtomicBool::new(false));
    // The writer starts once every reader runs, so their reads overlap its inserts.
    let started = Arc::new(std::sync::Barrier::new(4));
    let readers: Vec<_> = (0..3)
        .map(|_| {
            let (t, stop, started) = (t.clone(), stop.clone(), started.clone());
            std::thread::spawn(move || {
                started.wait();
                let mut reads = 0u64;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) && reads < 5_000_000 {
                    let seen = t.with_names(ip(1), T0, |mut it| it.any(|n| n.as_str() == "stable.example"));
                    assert!(seen, "a reader lost the stable name during inserts");
                    reads += 1;
                }
                reads
            })
        })
        .collect();
    started.wait();
    for i in 0..100_000u32 {
        let now = T0.plus(Duration::from_millis(u64::from(i)));
        let addr = IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + i));
        t.record(addr, &host("churn.example"), Duration::from_secs(60), now, KEEP);
        if i % 2_000 == 0 {
            t.touch(ip(1), now, KEEP.grace); // the stable IP is in use
        }
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for r in readers {
        assert!(r.join().expect("a reader panicked") > 0);
    }
    assert!(t.len() <= 50_000);
    assert_eq!(t.names(ip(1), T0), vec![host("stable.example")], "the stable IP, being used, survives eviction");
}

/// With this seed (and foldhash's fixed shared seed) the fast hash piles a
/// run of 50,000 consecutive addresses up past papaya's probe limit, and
/// papaya resizes to the same size for ever (memory grows without end).
/// The table's hash must spread them: the run fits, in the time a fill takes.
#[test]
fn a_run_of_consecutive_addresses_fills_the_table_with_any_seed() {
    const SEED_THE_FAST_HASH_PILES_UP: u64 = 6_736_196_181_918_680_967;
    let hasher = Hasher::with_seed(SEED_THE_FAST_HASH_PILES_UP, foldhash::SharedSeed::global_fixed());
    let t = Arc::new(NameTable::with_hasher(50_000, hasher));
    let (done, filled) = std::sync::mpsc::channel();
    let writer = t.clone();
    std::thread::spawn(move || {
        for i in 50_000..100_000u32 {
            let addr = IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + i));
            writer.record(addr, &host("run.example"), Duration::from_secs(60), T0, KEEP);
        }
        let _ = done.send(());
    });
    // A fill takes well under a second, even in a debug build; a hung
    // resize never ends (and its thread goes on until the test process does).
    let fill = filled.recv_timeout(Duration::from_secs(20));
    assert!(fill.is_ok(), "50,000 consecutive addresses did not fit in 20 s: the table is resizing for ever");
    assert_eq!(t.len(), 50_000);
}

#[test]
fn save_and_restore_round_trip_skipping_expired_and_garbage() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let path = dir.path().join("names.jsonl");
    let t = NameTable::new(100);
    t.record(ip(1), &host("a.example"), Duration::from_secs(3600), T0, KEEP);
    t.record(ip(1), &host("b.example"), Duration::from_secs(3600), T0, KEEP);
    t.record("2001:db8::1".parse().unwrap_or(ip(9)), &host("v6.example"), Duration::from_secs(3600), T0, KEEP);
    t.record(ip(2), &host("short.example"), Duration::from_secs(1), T0, KEEP);
    t.touch(ip(2), at(30), Duration::from_secs(120)); // used: alive until 150s
    let saved = t.save(&path, at(10)).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(saved.entries, 4);

    let mut text = std::fs::read_to_string(&path).unwrap_or_default();
    text.push_str("{not json\n{\"ip\":\"198.18.0.7\",\"name\":\"bad name!\",\"expires\":1,\"used_until\":1}\n");
    std::fs::write(&path, text).unwrap_or_else(|e| panic!("{e}"));

    let r = NameTable::new(100);
    let restored = r.restore(&path, at(100)).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(restored, PersistStats { entries: 4, skipped: 2 });
    let mut names = r.names(ip(1), at(100));
    names.sort();
    assert_eq!(names, vec![host("a.example"), host("b.example")]);
    assert_eq!(r.names(ip(2), at(140)), vec![host("short.example")], "the use-renewal survives the restart");
    assert!(r.names(ip(2), at(151)).is_empty());

    let later = NameTable::new(100);
    let stats = later.restore(&path, at(10_000)).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(stats.entries, 0, "everything expired by then");
    assert_eq!(later.restore(&dir.path().join("missing"), T0).ok(), Some(PersistStats::default()));
}

#[test]
fn recording_the_same_answer_again_keeps_one_lease_and_counts_names() {
    let t = NameTable::new(100);
    for second in 0..5 {
        t.record(ip(1), &host("a.example"), Duration::from_secs(30), at(second), KEEP);
    }
    t.record(ip(1), &host("b.example"), Duration::from_secs(30), T0, KEEP);
    t.record(ip(2), &host("a.example"), Duration::from_secs(30), T0, KEEP);
    assert_eq!((t.name_count(), t.pair_count()), (3, 3), "a renewal adds no pair");
    // A re-record that extends the life by more than the slack does move it.
    t.record(ip(1), &host("a.example"), Duration::from_secs(30), at(600), KEEP);
    assert_eq!(t.names(ip(1), at(600 + 90 - 1)).len(), 1, "a.example alive until 600 + 30 + 60");
}

#[test]
fn a_bad_line_skips_only_itself() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let path = dir.path().join("names.jsonl");
    let line = |last: u8, name: &str| {
        let until = at(3_600).unix_millis();
        format!("{{\"ip\":\"198.18.0.{last}\",\"name\":\"{name}\",\"expires\":{until},\"used_until\":0}}\n")
    };
    let mut bytes = line(1, "before.example").into_bytes();
    bytes.extend_from_slice(b"{\"ip\":\"198.18.0.2\",\"name\":\"\xff\xfe\",\"expires\":1,\"used_until\":1}\n");
    bytes.extend_from_slice(b"\xc3\x28 not UTF-8, not JSON\n");
    bytes.extend_from_slice(b"{\"ip\":\"198.18.0.3\"\n");
    bytes.extend_from_slice(line(4, "after.example").as_bytes());
    std::fs::write(&path, bytes).unwrap_or_else(|e| panic!("{e}"));

    let t = NameTable::new(100);
    let stats = t.restore(&path, at(10)).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(stats, PersistStats { entries: 2, skipped: 3 });
    assert_eq!(t.names(ip(1), at(10)), vec![host("before.example")]);
    assert_eq!(t.names(ip(4), at(10)), vec![host("after.example")]);
}

#[test]
fn a_huge_restored_lifetime_is_cut_to_the_horizon() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let path = dir.path().join("names.jsonl");
    let max = u64::MAX;
    let text = format!(
        "{{\"ip\":\"198.18.0.1\",\"name\":\"pinned.example\",\"expires\":{max},\"used_until\":0}}\n\
         {{\"ip\":\"198.18.0.2\",\"name\":\"used.example\",\"expires\":0,\"used_until\":{max}}}\n"
    );
    std::fs::write(&path, text).unwrap_or_else(|e| panic!("{e}"));
    let t = NameTable::new(100);
    assert_eq!(t.restore(&path, T0).ok(), Some(PersistStats { entries: 2, skipped: 0 }));
    let horizon = RESTORE_HORIZON.as_secs();
    for last in [1, 2] {
        assert_eq!(t.names(ip(last), at(horizon - 1)).len(), 1);
        assert!(t.names(ip(last), at(horizon + 1)).is_empty(), "198.18.0.{last}");
    }
    // Using and re-learning them does no arithmetic that overflows.
    t.touch(ip(2), T0, Duration::MAX);
    t.touch(ip(2), T0, Duration::MAX);
    t.record(ip(1), &host("pinned.example"), Duration::MAX, T0, KEEP);
    t.record(ip(1), &host("pinned.example"), Duration::MAX, T0, KEEP);
    assert_eq!(t.names(ip(1), at(horizon + 1)).len(), 1);
}
