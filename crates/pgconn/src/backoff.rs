//! Retry delays: exponential with jitter, so many processes retrying after the same outage
//! do not reconnect in lockstep.

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};
use std::time::Duration;

/// Delays from `base` doubling up to `max`; each delay is drawn from [d/2, d].
#[derive(Debug, Clone)]
pub struct Backoff {
    base: Duration,
    max: Duration,
    current: Duration,
}

impl Backoff {
    pub fn new(base: Duration, max: Duration) -> Backoff {
        Backoff { base, max, current: base }
    }

    /// The delay before the next attempt (grows with every call).
    pub fn next_delay(&mut self) -> Duration {
        let d = self.current;
        self.current = (self.current * 2).min(self.max);
        let half = d / 2;
        half + half.mul_f64(unit_random())
    }

    /// After a success: the next failure starts from `base` again.
    pub fn reset(&mut self) {
        self.current = self.base;
    }
}

/// A number in [0, 1): `RandomState` is randomly keyed per instance, which is all the
/// randomness jitter needs (no RNG dependency).
fn unit_random() -> f64 {
    let mut h = RandomState::new().build_hasher();
    h.write_u64(0x9e37_79b9_7f4a_7c15);
    (h.finish() >> 11) as f64 / (1u64 << 53) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_to_max_with_jitter_and_resets() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_millis(800));
        let delays: Vec<Duration> = (0..6).map(|_| b.next_delay()).collect();
        for (d, ceiling) in delays.iter().zip([100u64, 200, 400, 800, 800, 800]) {
            assert!(
                *d >= Duration::from_millis(ceiling / 2) && *d <= Duration::from_millis(ceiling),
                "{d:?} vs {ceiling}"
            );
        }
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(100));
        let distinct: std::collections::HashSet<u128> = (0..20).map(|_| (unit_random() * 1e9) as u128).collect();
        assert!(distinct.len() > 15, "jitter must vary");
    }
}
