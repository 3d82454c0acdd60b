//! Per-key exponential backoff with jitter, capped.
//!
//! After `n` consecutive failures a key waits `min(cap, base × 2^(n-1))`, scaled by a random
//! factor in [0.5, 1.0] so many keys failing together do not retry in lockstep. A success resets
//! the count. (A dozen lines; a crate's iterator-based backoff fits single retry loops, not a
//! table of per-key counters.)

use std::time::Duration;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Backoff {
    pub base: Duration,
    pub cap: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff {
            base: Duration::from_millis(100),
            cap: Duration::from_secs(60),
        }
    }
}

impl Backoff {
    /// The delay before retry number `failures` (≥ 1), before jitter.
    pub fn ceiling(&self, failures: u32) -> Duration {
        let exp = failures.saturating_sub(1).min(30);
        self.base.saturating_mul(1u32 << exp).min(self.cap)
    }

    /// The delay before retry number `failures`, with jitter in [50%, 100%] of the ceiling.
    pub fn delay(&self, failures: u32) -> Duration {
        self.ceiling(failures).mul_f64(0.5 + fastrand::f64() * 0.5)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_exponentially_up_to_the_cap_with_bounded_jitter() {
        let b = Backoff {
            base: Duration::from_millis(100),
            cap: Duration::from_secs(2),
        };
        assert_eq!(b.ceiling(1), Duration::from_millis(100));
        assert_eq!(b.ceiling(2), Duration::from_millis(200));
        assert_eq!(b.ceiling(5), Duration::from_millis(1600));
        assert_eq!(b.ceiling(6), Duration::from_secs(2));
        assert_eq!(b.ceiling(1000), Duration::from_secs(2));
        for n in 1..10 {
            let d = b.delay(n);
            assert!(d <= b.ceiling(n) && d >= b.ceiling(n) / 2, "{n}: {d:?}");
        }
    }
}
