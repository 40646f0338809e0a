//! One retry schedule for every loop that waits and tries again: the source's
//! reconnects, a sink's flushes, the lake's first answer, a halted pipeline, a reload
//! event for the spine, and the spine sink's jitter.
//!
//! Invariants:
//! - Delays double from `first` and never exceed `max`; [`Backoff::reset`] starts
//!   over (after a success).
//! - With [`Backoff::full_jitter`], each delay is drawn uniformly below the
//!   schedule's, so that many clients that failed together do not retry together.
//! - A schedule holds no clock and sleeps nowhere: the loop decides how to wait (a
//!   `select!` on shutdown, a thread sleep), and shows the delay it got as "retry in".

use std::hash::{BuildHasher, Hasher};
use std::time::Duration;

/// Exponential delays from `first` to `max`.
#[derive(Clone, Debug)]
pub struct Backoff {
    first: Duration,
    max: Duration,
    current: Duration,
    /// xorshift state when delays are jittered; `None` otherwise.
    jitter: Option<u64>,
}

impl Backoff {
    /// A schedule of `first`, `2 × first`, … up to `max`.
    pub fn new(first: Duration, max: Duration) -> Backoff {
        let first = first.min(max);
        Backoff {
            first,
            max,
            current: first,
            jitter: None,
        }
    }

    /// The same schedule, each delay drawn uniformly from `[0, delay)`.
    pub fn full_jitter(mut self) -> Backoff {
        let seed = std::collections::hash_map::RandomState::new()
            .build_hasher()
            .finish();
        self.jitter = Some(seed | 1);
        self
    }

    /// The delay to wait before the next try; the one after is twice as long.
    pub fn next_delay(&mut self) -> Duration {
        let delay = self.current;
        self.current = (self.current * 2).min(self.max);
        match &mut self.jitter {
            None => delay,
            Some(state) => {
                *state ^= *state << 13;
                *state ^= *state >> 7;
                *state ^= *state << 17;
                let nanos = delay.as_nanos().max(1) as u64;
                Duration::from_nanos(*state % nanos)
            }
        }
    }

    /// Starts over from the first delay.
    pub fn reset(&mut self) {
        self.current = self.first;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn delays_double_up_to_the_cap_and_start_over_after_a_reset() {
        let mut backoff = Backoff::new(100 * MS, 1000 * MS);
        let delays: Vec<Duration> = (0..6).map(|_| backoff.next_delay()).collect();
        assert_eq!(
            delays,
            [100 * MS, 200 * MS, 400 * MS, 800 * MS, 1000 * MS, 1000 * MS]
        );
        assert_eq!(backoff.next_delay(), 1000 * MS);
        backoff.reset();
        assert_eq!(backoff.next_delay(), 100 * MS);
    }

    #[test]
    fn jittered_delays_stay_below_the_schedule_and_vary() {
        let mut plain = Backoff::new(100 * MS, 5000 * MS);
        let mut jittered = plain.clone().full_jitter();
        let mut seen = std::collections::BTreeSet::new();
        for _ in 0..40 {
            let cap = plain.next_delay();
            let delay = jittered.next_delay();
            assert!(delay < cap, "{delay:?} is not below {cap:?}");
            seen.insert(delay);
        }
        assert!(seen.len() > 20, "jitter repeats itself: {seen:?}");
    }

    #[test]
    fn a_first_delay_above_the_cap_is_the_cap() {
        let mut backoff = Backoff::new(10 * MS, 5 * MS);
        assert_eq!(backoff.next_delay(), 5 * MS);
        assert_eq!(backoff.next_delay(), 5 * MS);
    }
}
