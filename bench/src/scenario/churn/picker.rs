//! Which population socket `churn` replaces next: in turn, or at random.

use crate::cli::Pick;

/// Which socket to replace next.
pub(super) struct Picker {
    pick: Pick,
    next: usize,
    rng: u64,
}

impl Picker {
    pub(super) fn new(pick: Pick, seed: u64) -> Picker {
        Picker {
            pick,
            next: 0,
            rng: seed | 1,
        }
    }

    /// A slot of `0..len` that is not `busy`, if any: in turn, or at random (falling back to
    /// the next free one in turn after a few busy draws).
    pub(super) fn pick(&mut self, len: usize, busy: impl Fn(usize) -> bool) -> Option<usize> {
        if len == 0 {
            return None;
        }
        if self.pick == Pick::Random {
            for _ in 0..8 {
                // xorshift64
                self.rng ^= self.rng << 13;
                self.rng ^= self.rng >> 7;
                self.rng ^= self.rng << 17;
                let slot = (self.rng % len as u64) as usize;
                if !busy(slot) {
                    return Some(slot);
                }
            }
        }
        for _ in 0..len {
            let slot = self.next % len;
            self.next = (slot + 1) % len;
            if !busy(slot) {
                return Some(slot);
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_robin_skips_busy_slots_and_wraps() {
        let mut picker = Picker::new(Pick::RoundRobin, 1);
        let picks: Vec<_> = (0..5).map(|_| picker.pick(3, |i| i == 1)).collect();
        assert_eq!(picks, [Some(0), Some(2), Some(0), Some(2), Some(0)]);
        assert_eq!(picker.pick(3, |_| true), None);
        assert_eq!(picker.pick(0, |_| false), None);
    }

    #[test]
    fn random_picks_stay_in_range_and_avoid_busy_slots() {
        let mut picker = Picker::new(Pick::Random, 42);
        let mut seen = [0u32; 10];
        for _ in 0..1000 {
            let Some(slot) = picker.pick(10, |i| i == 3) else {
                panic!("no slot")
            };
            seen[slot] += 1;
        }
        assert_eq!(seen[3], 0);
        assert!(
            seen.iter().enumerate().all(|(i, &n)| i == 3 || n > 50),
            "{seen:?}"
        );
        assert_eq!(picker.pick(1, |_| false), Some(0));
    }
}
