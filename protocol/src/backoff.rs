//! Capped exponential backoff with equal jitter, for every retry loop: the client guide's
//! reconnects, and the servers' own retries (taking work, pulling from the bus, accepting
//! sockets). Half of each delay is fixed and half random, so peers that failed together do not
//! come back together.

use std::time::Duration;

use rand::Rng;

/// The delays of one retry loop: `first`, doubling up to `max`, each with equal jitter.
#[derive(Debug, Clone)]
pub struct Backoff {
    first: Duration,
    max: Duration,
    attempt: u32,
}

impl Backoff {
    pub fn new(first: Duration, max: Duration) -> Backoff {
        Backoff {
            first,
            max: max.max(first),
            attempt: 0,
        }
    }

    /// The delay before the next attempt: between half and all of `first · 2^attempts`,
    /// capped at `max`.
    pub fn next_delay(&mut self) -> Duration {
        let base = self.first.saturating_mul(1 << self.attempt.min(20)).min(self.max);
        self.attempt = self.attempt.saturating_add(1);
        base / 2 + base.mul_f64(rand::rng().random_range(0.0..0.5))
    }

    /// After a success: the next failure waits `first` again.
    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_with_jitter_up_to_its_cap_and_resets() {
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(1));
        let first = backoff.next_delay();
        assert!(first >= Duration::from_millis(50) && first < Duration::from_millis(100));
        let second = backoff.next_delay();
        assert!(second >= Duration::from_millis(100) && second < Duration::from_millis(200));
        let third = backoff.next_delay();
        assert!(third >= Duration::from_millis(200) && third < Duration::from_millis(400));
        let fourth = backoff.next_delay();
        assert!(fourth >= Duration::from_millis(400) && fourth < Duration::from_millis(800));
        // From the fifth on, 1.6 s is capped at 1 s.
        for _ in 0..40 {
            let late = backoff.next_delay();
            assert!(late >= Duration::from_millis(500) && late < Duration::from_secs(1));
        }
        backoff.reset();
        assert!(backoff.next_delay() < Duration::from_millis(100));
    }
}
