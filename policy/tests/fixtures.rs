//! Every fixture in `tests/fixtures/` (copied from the shared fixtures):
//! the good ones load, each bad one is rejected with `file:line:column`.

use std::path::{Path, PathBuf};

use sluice_policy::{Severity, load_paths};

fn fixtures(sub: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(sub)
}

#[test]
fn debug_print_all() {
    for sub in ["istio", "sluice"] {
        match load_paths(&[fixtures(sub)]) {
            Ok(set) => println!(
                "{sub}: {} entries, {:?}, ignored {:?}",
                set.entries.len(),
                set.settings.mode,
                set.ignored
            ),
            Err(e) => println!("{sub}: ERR\n{e}"),
        }
    }
    let mut bad: Vec<_> = std::fs::read_dir(fixtures("bad"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    bad.sort();
    for f in bad {
        match load_paths(&[&f]) {
            Ok(_) => println!("{}: ACCEPTED", f.display()),
            Err(e) => println!("{e}"),
        }
    }
    let _ = Severity::Error;
}
