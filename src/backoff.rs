//! The one retry schedule: capped exponential backoff with jitter.
//!
//! Every retry of a transient failure (a session restart, a delivery step, a reload attempt) waits
//! by this schedule, so that many daemons, or many tables of one daemon, that failed together do not
//! retry together. Attempt `n` (from 0) waits a random time in `[d/2, d]` where
//! `d = min(first · 2ⁿ, max)` ("equal jitter": never less than half the nominal delay, so a failing
//! server still gets its rest; never more than the cap).
//!
//! [`delay`] is pure (the random unit is an argument) so the schedule is tested exactly; [`Backoff`]
//! carries the attempt count and its own small random generator.

use std::hash::{BuildHasher, Hasher};
use std::time::Duration;

/// The wait before retry number `attempt` (0 = the first retry): `d = min(first · 2^attempt, max)`,
/// scaled into `[d/2, d]` by `unit` (clamped to `[0, 1]`).
pub fn delay(first: Duration, max: Duration, attempt: u32, unit: f64) -> Duration {
    let nominal = first
        .checked_mul(1u32.checked_shl(attempt.min(31)).unwrap_or(u32::MAX))
        .unwrap_or(max)
        .min(max);
    let unit = if unit.is_finite() {
        unit.clamp(0.0, 1.0)
    } else {
        1.0
    };
    nominal.mul_f64(0.5 + 0.5 * unit)
}

/// [`delay`] with a fresh random unit, for a caller that counts attempts itself.
pub fn jittered(first: Duration, max: Duration, attempt: u32) -> Duration {
    Backoff::new(first, max).delay_for(attempt)
}

/// A retry schedule in progress: [`Backoff::next_delay`] gives the next wait, [`Backoff::reset`]
/// starts over after a success.
#[derive(Debug, Clone)]
pub struct Backoff {
    first: Duration,
    max: Duration,
    attempt: u32,
    rng: u64,
}

impl Backoff {
    /// A schedule seeded from the process's random hash keys (no extra dependency needed).
    pub fn new(first: Duration, max: Duration) -> Backoff {
        let seed = std::collections::hash_map::RandomState::new()
            .build_hasher()
            .finish();
        Backoff::with_seed(first, max, seed)
    }

    /// A schedule with a fixed seed, for tests.
    pub fn with_seed(first: Duration, max: Duration, seed: u64) -> Backoff {
        Backoff {
            first,
            max,
            attempt: 0,
            // splitmix64 of the seed: neighbouring seeds give unrelated streams, and xorshift needs a
            // non-zero state.
            rng: {
                let mut z = seed.wrapping_add(0x9E37_79B9_7F4A_7C15);
                z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
                z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
                (z ^ (z >> 31)) | 1
            },
        }
    }

    /// The wait before the next retry; each call moves one attempt further.
    pub fn next_delay(&mut self) -> Duration {
        let d = delay(self.first, self.max, self.attempt, self.unit());
        self.attempt = self.attempt.saturating_add(1);
        d
    }

    /// The wait before retry number `attempt` with the next random unit of this schedule, for a
    /// caller that counts attempts itself (the schedule's own count is left alone).
    pub fn delay_for(&mut self, attempt: u32) -> Duration {
        let unit = self.unit();
        delay(self.first, self.max, attempt, unit)
    }

    /// How many delays were handed out since the start or the last reset.
    pub fn attempts(&self) -> u32 {
        self.attempt
    }

    /// Back to the first delay (after a success, or after a long healthy run).
    pub fn reset(&mut self) {
        self.attempt = 0;
    }

    /// A uniform number in `[0, 1)` (xorshift64*; quality is irrelevant here, spread is enough).
    fn unit(&mut self) -> f64 {
        let mut x = self.rng;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.rng = x;
        (x.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 11) as f64 / (1u64 << 53) as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn doubles_up_to_the_cap_with_half_to_full_jitter() {
        let first = 200 * MS;
        let max = Duration::from_secs(30);
        assert_eq!(delay(first, max, 0, 1.0), 200 * MS);
        assert_eq!(delay(first, max, 0, 0.0), 100 * MS);
        assert_eq!(delay(first, max, 3, 1.0), 1600 * MS);
        assert_eq!(delay(first, max, 20, 1.0), max);
        assert_eq!(delay(first, max, 20, 0.0), max / 2);
        assert_eq!(delay(first, max, u32::MAX, 1.0), max);
        assert_eq!(delay(first, max, 1, f64::NAN), 400 * MS);
    }

    #[test]
    fn backoff_counts_attempts_and_resets() {
        let mut b = Backoff::with_seed(100 * MS, Duration::from_secs(1), 7);
        let waits: Vec<Duration> = (0..6).map(|_| b.next_delay()).collect();
        assert_eq!(b.attempts(), 6);
        for (n, w) in waits.iter().enumerate() {
            let nominal = (100 * MS * (1 << n)).min(Duration::from_secs(1));
            assert!(
                *w >= nominal / 2 && *w <= nominal,
                "{n}: {w:?} vs {nominal:?}"
            );
        }
        b.reset();
        assert!(b.next_delay() <= 100 * MS);
    }

    #[test]
    fn jitter_spreads_retries_apart() {
        let waits: std::collections::BTreeSet<Duration> = (0..20)
            .map(|seed| {
                Backoff::with_seed(Duration::from_secs(1), Duration::from_secs(8), seed)
                    .next_delay()
            })
            .collect();
        assert!(waits.len() > 10, "{waits:?}");
    }

    proptest! {
        #[test]
        fn never_beyond_the_cap_nor_below_half_the_nominal(
            first_ms in 1u64..10_000, max_ms in 1u64..100_000, attempt in 0u32..100, unit in 0.0f64..=1.0
        ) {
            let (first, max) = (Duration::from_millis(first_ms), Duration::from_millis(max_ms));
            let d = delay(first, max, attempt, unit);
            prop_assert!(d <= max);
            let nominal = first.saturating_mul(1u32 << attempt.min(31)).min(max);
            prop_assert!(d >= nominal / 2);
        }
    }
}
