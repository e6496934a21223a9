//! A fixed-size log-linear latency histogram in nanoseconds: 128 linear sub-buckets per power
//! of two, so every reported quantile is within 0.8% of the true value; the maximum is exact.
//!
//! Each socket task owns its own histograms (no sharing on the hot path); they are merged once
//! at the end.

use std::fmt;

use serde::Serialize;

/// Sub-buckets per power of two (2^SUB_BITS).
const SUB_BITS: u32 = 7;
const SUB: usize = 1 << SUB_BITS;
/// Values at or above 2^MAX_EXP ns (about 18 minutes) are clamped into the last bucket.
const MAX_EXP: u32 = 40;
const BUCKETS: usize = (MAX_EXP - SUB_BITS + 1) as usize * SUB;

/// See the module documentation. The buckets are allocated on the first record, so a socket
/// that never records anything costs no bucket memory.
#[derive(Debug, Clone, Default)]
pub(crate) struct Histogram {
    counts: Vec<u64>,
    total: u64,
    max: u64,
}

fn index(value: u64) -> usize {
    if value < SUB as u64 {
        return value as usize;
    }
    let exp = 63 - value.leading_zeros();
    if exp >= MAX_EXP {
        return BUCKETS - 1;
    }
    let mantissa = (value >> (exp - SUB_BITS)) as usize & (SUB - 1);
    (exp - SUB_BITS + 1) as usize * SUB + mantissa
}

/// The smallest value that lands in bucket `index`.
fn lower_bound(index: usize) -> u64 {
    if index < SUB {
        return index as u64;
    }
    let exp = (index / SUB) as u32 + SUB_BITS - 1;
    let mantissa = (index % SUB) as u64;
    (1u64 << exp) | (mantissa << (exp - SUB_BITS))
}

/// Quantiles of one histogram, in microseconds.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub(crate) struct Summary {
    /// Values recorded.
    pub(crate) count: u64,
    pub(crate) p50_us: f64,
    pub(crate) p99_us: f64,
    pub(crate) p999_us: f64,
    pub(crate) max_us: f64,
}

impl fmt::Display for Summary {
    /// `p50 0.123 ms  p99 0.456 ms  p99.9 0.789 ms  max 1.234 ms`, for the human summaries.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ms = |us: f64| us / 1000.0;
        write!(
            f,
            "p50 {:.3} ms  p99 {:.3} ms  p99.9 {:.3} ms  max {:.3} ms",
            ms(self.p50_us),
            ms(self.p99_us),
            ms(self.p999_us),
            ms(self.max_us)
        )
    }
}

impl Histogram {
    /// Records one value in nanoseconds.
    #[inline]
    pub(crate) fn record(&mut self, nanos: u64) {
        if self.counts.is_empty() {
            self.counts = vec![0; BUCKETS];
        }
        self.counts[index(nanos)] += 1;
        self.total += 1;
        self.max = self.max.max(nanos);
    }

    /// Adds every value of `other`.
    pub(crate) fn merge(&mut self, other: &Histogram) {
        if other.counts.is_empty() {
            return;
        }
        if self.counts.is_empty() {
            self.counts = vec![0; BUCKETS];
        }
        for (mine, theirs) in self.counts.iter_mut().zip(other.counts.iter()) {
            *mine += theirs;
        }
        self.total += other.total;
        self.max = self.max.max(other.max);
    }

    /// The value at quantile `q` (0..=1), as the lower bound of its bucket, in nanoseconds.
    pub(crate) fn quantile(&self, q: f64) -> u64 {
        if self.total == 0 {
            return 0;
        }
        let rank = ((q * self.total as f64).ceil() as u64).clamp(1, self.total);
        let mut seen = 0;
        for (i, &count) in self.counts.iter().enumerate() {
            seen += count;
            if seen >= rank {
                return lower_bound(i).min(self.max);
            }
        }
        self.max
    }

    /// p50, p99, p99.9 and max in microseconds.
    pub(crate) fn summary(&self) -> Summary {
        let us = |nanos: u64| nanos as f64 / 1000.0;
        Summary {
            count: self.total,
            p50_us: us(self.quantile(0.5)),
            p99_us: us(self.quantile(0.99)),
            p999_us: us(self.quantile(0.999)),
            max_us: us(self.max),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_round_trip_within_precision() {
        for value in [0, 1, 127, 128, 129, 1000, 65_432, 1_000_000, 123_456_789, 1 << 39] {
            let low = lower_bound(index(value));
            assert!(low <= value, "{value}: {low}");
            assert!(
                (value - low) as f64 <= value as f64 / SUB as f64,
                "{value}: {low}"
            );
        }
        assert_eq!(index(u64::MAX), BUCKETS - 1);
    }

    #[test]
    fn quantiles_of_a_uniform_range() {
        let mut h = Histogram::default();
        for v in 1..=10_000u64 {
            h.record(v * 1000);
        }
        let p50 = h.quantile(0.5) as f64;
        assert!((p50 - 5_000_000.0).abs() / 5_000_000.0 < 0.01, "{p50}");
        let p99 = h.quantile(0.99) as f64;
        assert!((p99 - 9_900_000.0).abs() / 9_900_000.0 < 0.01, "{p99}");
        assert_eq!(h.summary().max_us, 10_000.0);
        let mut other = Histogram::default();
        other.record(20_000_000);
        h.merge(&other);
        assert_eq!(h.summary().count, 10_001);
        assert_eq!(h.summary().max_us, 20_000.0);
    }

    #[test]
    fn empty_is_zero() {
        assert_eq!(Histogram::default().summary().p99_us, 0.0);
    }
}
