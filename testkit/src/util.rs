//! Small things every test needs: the bound on any wait, random names and uuids, the seed of a
//! randomised test, and polling a condition.

use std::time::{Duration, Instant};

use rand::Rng;

/// How long any single expected event may take before the test fails instead of hanging.
pub const WAIT: Duration = Duration::from_secs(10);

/// Awaits `fut`, failing the test with `what` if it takes longer than `limit`.
pub async fn within<T>(limit: Duration, what: &str, fut: impl std::future::Future<Output = T>) -> T {
    match tokio::time::timeout(limit, fut).await {
        Ok(value) => value,
        Err(_) => panic!("timed out after {limit:?} waiting for {what}"),
    }
}

/// A random lower-case hex string of `len` characters.
pub fn random_hex(len: usize) -> String {
    let mut rng = rand::rng();
    (0..len)
        .map(|_| char::from_digit(rng.random_range(0..16), 16).unwrap_or('0'))
        .collect()
}

/// A fresh v4 uuid in the canonical hyphenated form.
pub fn new_uuid() -> String {
    uuid::Uuid::new_v4().to_string()
}

/// The seed for a randomised test: `CHATOY_E2E_SEED` if set, else random; printed so a failure
/// can be replayed.
pub fn seed(test: &str) -> u64 {
    let seed = std::env::var("CHATOY_E2E_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random);
    println!("{test}: seed {seed} (replay with CHATOY_E2E_SEED={seed})");
    seed
}

/// Polls `done` every 20 ms until it holds, failing the test with `what` after `limit`.
pub async fn wait_until(limit: Duration, what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !done() {
        assert!(
            Instant::now() < deadline,
            "timed out after {limit:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
