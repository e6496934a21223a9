//! The gateway's limiters: a token bucket, and a bounded map of per-key limiter state that
//! forgets keys whose state is back at rest. Connection admission, registrations, failed logins
//! and a socket's `msg` rate are all built from these two.

use std::borrow::Borrow;
use std::collections::HashMap;
use std::hash::Hash;
use std::time::{Duration, Instant};

/// A token bucket: at most `burst` tokens, refilled at `rate` per second. The rate and burst
/// are the owner's (one configuration for many buckets), so a bucket is 24 bytes.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Bucket {
    tokens: f64,
    at: Instant,
}

impl Bucket {
    pub(crate) fn full(burst: f64, now: Instant) -> Bucket {
        Bucket {
            tokens: burst,
            at: now,
        }
    }

    fn refill(&mut self, rate: f64, burst: f64, now: Instant) {
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.tokens = (self.tokens + elapsed * rate).min(burst);
        self.at = now;
    }

    /// Whether the bucket has refilled completely (then it is the same as a new one).
    fn is_full(&mut self, rate: f64, burst: f64, now: Instant) -> bool {
        self.refill(rate, burst, now);
        self.tokens >= burst
    }

    /// Takes a token, or says how long until one is there.
    pub(crate) fn take(&mut self, rate: f64, burst: f64, now: Instant) -> Result<(), Duration> {
        self.refill(rate, burst, now);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            Ok(())
        } else if rate > 0.0 {
            Err(Duration::from_secs_f64((1.0 - self.tokens) / rate))
        } else {
            Err(Duration::MAX)
        }
    }
}

/// Per-key limiter state, at most `max` keys. State at rest (the same as a fresh entry) is
/// dropped by a prune, which runs at most every `every` while the map has room, and at most
/// once a second once it is full: a flood of new keys must not make every call walk the map.
/// A new key that finds the map full is not tracked (the caller decides what that means).
pub(crate) struct Tracked<K, V> {
    entries: HashMap<K, V>,
    pruned: Instant,
    max: usize,
}

impl<K: Hash + Eq, V> Tracked<K, V> {
    pub(crate) fn new(max: usize) -> Tracked<K, V> {
        Tracked {
            entries: HashMap::new(),
            pruned: Instant::now(),
            max,
        }
    }

    pub(crate) fn get<Q: Hash + Eq + ?Sized>(&self, key: &Q) -> Option<&V>
    where
        K: Borrow<Q>,
    {
        self.entries.get(key)
    }

    pub(crate) fn get_mut(&mut self, key: &K) -> Option<&mut V> {
        self.entries.get_mut(key)
    }

    pub(crate) fn remove(&mut self, key: &K) -> Option<V> {
        self.entries.remove(key)
    }

    /// Drops the entries `at_rest` says are back at rest, if a prune is due.
    pub(crate) fn prune(&mut self, now: Instant, every: Duration, mut at_rest: impl FnMut(&mut V) -> bool) {
        let every = if self.entries.len() >= self.max {
            Duration::from_secs(1)
        } else {
            every
        };
        if now.saturating_duration_since(self.pruned) >= every {
            self.entries.retain(|_, state| !at_rest(state));
            self.pruned = now;
        }
    }

    /// The state of `key`, made with `fresh` if it has none; `None` if it has none and the map
    /// is full.
    pub(crate) fn entry(&mut self, key: K, fresh: impl FnOnce() -> V) -> Option<&mut V> {
        if self.entries.len() >= self.max && !self.entries.contains_key(&key) {
            return None;
        }
        Some(self.entries.entry(key).or_insert_with(fresh))
    }

    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.entries.len()
    }
}

/// A token bucket per key, all with the same rate and burst (rate 0: no limit). Only partly
/// used buckets are kept: a full bucket is the same as none. Past `max` keys, new keys go
/// unchecked (a gateway-wide limit still holds).
pub(crate) struct KeyedBuckets<K> {
    rate: f64,
    burst: f64,
    buckets: parking_lot::Mutex<Tracked<K, Bucket>>,
}

impl<K: Hash + Eq> KeyedBuckets<K> {
    pub(crate) fn new(rate: f64, burst: f64, max: usize) -> KeyedBuckets<K> {
        KeyedBuckets {
            rate,
            burst: burst.max(1.0),
            buckets: parking_lot::Mutex::new(Tracked::new(max)),
        }
    }

    /// Takes a token of `key`'s bucket, or says how long until one is there.
    pub(crate) fn take(&self, key: K) -> Result<(), Duration> {
        if self.rate <= 0.0 {
            return Ok(());
        }
        let (rate, burst, now) = (self.rate, self.burst, Instant::now());
        let mut buckets = self.buckets.lock();
        // A bucket refills completely within burst / rate; after that it can be dropped.
        let refill = Duration::from_secs_f64((burst / rate).min(3600.0));
        buckets.prune(now, refill.max(Duration::from_secs(10)), |bucket| {
            bucket.is_full(rate, burst, now)
        });
        match buckets.entry(key, || Bucket::full(burst, now)) {
            Some(bucket) => bucket.take(rate, burst, now),
            None => Ok(()),
        }
    }

    #[cfg(test)]
    pub(crate) fn tracked(&self) -> usize {
        self.buckets.lock().len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bucket_gives_its_burst_then_its_rate() {
        let start = Instant::now();
        let mut bucket = Bucket::full(3.0, start);
        for _ in 0..3 {
            assert!(bucket.take(2.0, 3.0, start).is_ok());
        }
        let wait = bucket.take(2.0, 3.0, start).unwrap_err();
        assert_eq!(wait, Duration::from_millis(500));
        assert!(bucket.take(2.0, 3.0, start + wait).is_ok());
        assert!(bucket.take(0.0, 3.0, start + wait).is_err());
    }

    #[test]
    fn tracked_map_is_bounded_and_forgets_state_at_rest() {
        let mut map: Tracked<u32, u32> = Tracked::new(2);
        let start = Instant::now();
        *map.entry(1, || 0).unwrap() += 1;
        map.entry(2, || 0).unwrap();
        assert!(map.entry(3, || 0).is_none(), "full: a new key is not tracked");
        assert!(map.entry(1, || 0).is_some(), "full: a known key still is");
        map.prune(start, Duration::from_secs(60), |count| *count == 0);
        assert_eq!(map.len(), 2, "a prune is not due yet");
        map.prune(start + Duration::from_secs(1), Duration::from_secs(60), |count| {
            *count == 0
        });
        assert_eq!(
            map.len(),
            1,
            "full: pruned once a second passed; key 2 was at rest"
        );
        assert_eq!(map.get(&1), Some(&1));
    }

    #[test]
    fn keyed_buckets_limit_each_key_alone() {
        let buckets = KeyedBuckets::new(1.0, 2.0, 10);
        assert!(buckets.take("a").is_ok());
        assert!(buckets.take("a").is_ok());
        assert!(buckets.take("a").is_err());
        assert!(buckets.take("b").is_ok());
        assert_eq!(buckets.tracked(), 2);
        let off = KeyedBuckets::new(0.0, 1.0, 10);
        for _ in 0..10 {
            assert!(off.take("a").is_ok());
        }
    }
}
