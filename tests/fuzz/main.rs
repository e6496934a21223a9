//! The live protocol fuzzer: proptest generates sequences of client steps (`auth` with valid,
//! expired, revoked, unknown and edited tokens; `msg` valid, invalid, foreign, oversized,
//! resent; garbage text, binary frames, pings, protocol violations, closes, logouts, new rooms;
//! and corpus or valid frames mutated structurally and byte-wise) and runs each sequence over
//! real sockets against a real `chatoy standalone` process, checking every answer against the
//! model of the connection state machine in `model.rs` and, after each sequence, the
//! invariants that span connections (see `live.rs`).
//!
//! `CHATOY_FUZZ_CASES` sets the number of sequences (default [`DEFAULT_SEQUENCES`]). Failing
//! sequences are kept in `fuzz/regressions/live.txt` and replayed first. See docs/fuzzing.md.

mod actions;
mod live;
mod model;

use std::path::PathBuf;
use std::time::Instant;

use proptest::test_runner::{Config, FileFailurePersistence, TestCaseError, TestRunner};

/// Sequences when `CHATOY_FUZZ_CASES` is unset: well under a minute in the dev profile.
const DEFAULT_SEQUENCES: u32 = 60;

/// The corpus frames, the raw material of mutated steps.
fn corpus() -> Vec<Vec<u8>> {
    let dir = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/fuzz/corpus"));
    let mut paths: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|err| panic!("cannot read the corpus {}: {err}", dir.display()))
        .map(|entry| entry.expect("corpus entry").path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "json"))
        .collect();
    paths.sort();
    assert!(paths.len() >= 50, "the corpus in {} is missing", dir.display());
    paths
        .iter()
        .map(|path| std::fs::read(path).expect("read corpus file"))
        .collect()
}

#[test]
fn live_protocol_fuzz() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    let harness = runtime.block_on(live::Harness::start(corpus()));
    let cases = chatoy_testkit::fuzz::cases(DEFAULT_SEQUENCES);
    let config = Config {
        cases,
        // Each case is a whole sequence on a live server: shrink, but not for ever.
        max_shrink_iters: 200,
        max_shrink_time: 180_000,
        failure_persistence: Some(Box::new(FileFailurePersistence::Direct(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/fuzz/regressions/live.txt"
        )))),
        ..Config::default()
    };
    let started = Instant::now();
    let result = TestRunner::new(config).run(&actions::sequence(), |actions| {
        runtime
            .block_on(harness.run(&actions))
            .map_err(TestCaseError::fail)
    });
    let secs = started.elapsed().as_secs_f64();
    let report = harness.stats.report();
    if let Err(err) = result {
        panic!("live fuzzer failed after {report} ({secs:.1} s): {err}");
    }
    println!("fuzz live_protocol_fuzz: {report}; {secs:.1} s, 0 crashes");
    runtime.block_on(harness.stop());
}
