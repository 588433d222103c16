//! A client's query and an upstream's answer through what the DNS proxy does
//! with them (`sluice_dnsproxy::fuzz::run`: parse, policy gate, local
//! replies, answer matching, learning into a small name table with
//! evictions, truncation). None of it may panic or hang on any input. The
//! input layout is `run`'s.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use sluice_dnsproxy::Shared;

fuzz_target!(|data: &[u8]| {
    static SHARED: OnceLock<Shared> = OnceLock::new();
    sluice_dnsproxy::fuzz::run(data, SHARED.get_or_init(sluice_dnsproxy::fuzz::shared));
});
