//! Reconnect delays: exponential, jittered, capped.
//!
//! The first retry comes fast (a server restart or a dropped connection is
//! usually over in a moment); later ones spread out so that a fleet of
//! mounts does not knock on a recovering server in lockstep.

use std::time::Duration;

pub struct Backoff {
    first: Duration,
    cap: Duration,
    next: Duration,
    /// xorshift state, seeded from [`random_u64`].
    seed: u64,
}

/// A number that differs between processes and calls (std's randomly
/// keyed hasher: jitter needs spread, not secrecy, so no random number
/// crate). The one random source of the mount.
pub fn random_u64() -> u64 {
    use std::hash::BuildHasher;
    std::collections::hash_map::RandomState::new().hash_one(std::time::Instant::now())
}

/// A number in 0..1, from [`random_u64`].
pub fn random_fraction() -> f64 {
    (random_u64() >> 11) as f64 / (1u64 << 53) as f64
}

impl Backoff {
    pub fn new(first: Duration, cap: Duration) -> Backoff {
        // Never 0: xorshift would stay there.
        let seed = random_u64() | 1;
        Backoff {
            first,
            cap,
            next: first,
            seed,
        }
    }

    /// The delay before the next attempt: uniform in [d/2, d], where d
    /// doubles on every call up to the cap.
    pub fn next_delay(&mut self) -> Duration {
        let d = self.next;
        self.next = (self.next * 2).min(self.cap);
        let half = d / 2;
        let spread = half.as_nanos() as u64;
        let jitter = if spread == 0 {
            0
        } else {
            self.random() % (spread + 1)
        };
        half + Duration::from_nanos(jitter)
    }

    /// Back to the fast first retry, after a success.
    pub fn reset(&mut self) {
        self.next = self.first;
    }

    fn random(&mut self) -> u64 {
        let mut x = self.seed;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.seed = x;
        x
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fast_first_then_doubling_up_to_the_cap() {
        let ms = Duration::from_millis;
        let mut b = Backoff::new(ms(100), ms(3000));
        let d: Vec<Duration> = (0..8).map(|_| b.next_delay()).collect();
        assert!(d[0] >= ms(50) && d[0] <= ms(100), "{d:?}");
        assert!(d[1] >= ms(100) && d[1] <= ms(200), "{d:?}");
        for x in &d[5..] {
            assert!(*x >= ms(1500) && *x <= ms(3000), "{d:?}");
        }
        b.reset();
        assert!(b.next_delay() <= ms(100));
    }

    #[test]
    fn jitter_spreads() {
        let ms = Duration::from_millis;
        let mut b = Backoff::new(ms(3000), ms(3000));
        let d: std::collections::HashSet<Duration> = (0..20).map(|_| b.next_delay()).collect();
        assert!(d.len() > 10);
    }
}
