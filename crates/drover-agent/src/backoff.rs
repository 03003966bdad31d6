//! Reconnect backoff: pure code, time and randomness are inputs (design decision 7).
//!
//! As `docs/protocol.md` asks: after a lost connection wait a random time between 0 and the
//! current backoff ("full jitter"), start the backoff at 1 s, double it after every failed
//! attempt up to 5 minutes, and reset it after a connection that stayed up for a minute.

use std::time::Duration;

/// The shape of the backoff.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BackoffPolicy {
    /// The ceiling of the first wait.
    pub base: Duration,
    /// The largest ceiling.
    pub cap: Duration,
    /// A connection that stayed up at least this long resets the backoff to `base`.
    pub reset_after: Duration,
}

impl Default for BackoffPolicy {
    fn default() -> Self {
        BackoffPolicy {
            base: Duration::from_secs(1),
            cap: Duration::from_secs(300),
            reset_after: Duration::from_secs(60),
        }
    }
}

/// The reconnect state: how many attempts in a row have failed.
#[derive(Debug, Clone)]
pub struct Backoff {
    policy: BackoffPolicy,
    failures: u32,
}

impl Backoff {
    pub fn new(policy: BackoffPolicy) -> Self {
        Backoff { policy, failures: 0 }
    }

    /// The ceiling of the next wait: `base × 2^failures`, at most `cap`.
    pub fn ceiling(&self) -> Duration {
        let factor = 1u32.checked_shl(self.failures.min(31)).unwrap_or(u32::MAX);
        self.policy.base.saturating_mul(factor).min(self.policy.cap)
    }

    /// A connection attempt failed, or an established connection was lost after
    /// `connected_for`. `jitter` is a random number in `[0, 1]`; the answer is how long to wait
    /// before the next attempt: `jitter × ceiling`.
    pub fn next_delay(&mut self, connected_for: Option<Duration>, jitter: f64) -> Duration {
        if connected_for.is_some_and(|up| up >= self.policy.reset_after) {
            self.failures = 0;
        }
        let ceiling = self.ceiling();
        self.failures = self.failures.saturating_add(1).min(32);
        let jitter = if jitter.is_nan() { 1.0 } else { jitter.clamp(0.0, 1.0) };
        ceiling.mul_f64(jitter)
    }

    /// How many attempts in a row have failed.
    pub fn failures(&self) -> u32 {
        self.failures
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secs(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    #[test]
    fn doubles_from_base_up_to_cap() {
        let mut b = Backoff::new(BackoffPolicy::default());
        let ceilings: Vec<u64> = (0..12).map(|_| b.next_delay(None, 1.0).as_secs()).collect();
        assert_eq!(ceilings, [1, 2, 4, 8, 16, 32, 64, 128, 256, 300, 300, 300]);
        // Many more failures never overflow and stay at the cap.
        for _ in 0..100 {
            assert_eq!(b.next_delay(None, 1.0), secs(300));
        }
    }

    #[test]
    fn full_jitter_scales_between_zero_and_ceiling() {
        let mut b = Backoff::new(BackoffPolicy::default());
        for _ in 0..4 {
            b.next_delay(None, 1.0);
        }
        // Ceiling is now 16 s.
        assert_eq!(b.clone().next_delay(None, 0.0), Duration::ZERO);
        assert_eq!(b.clone().next_delay(None, 0.5), secs(8));
        assert_eq!(b.clone().next_delay(None, 0.25), secs(4));
        // Out-of-range and NaN randomness is clamped, never a longer wait than the ceiling.
        assert_eq!(b.clone().next_delay(None, 7.0), secs(16));
        assert_eq!(b.clone().next_delay(None, -1.0), Duration::ZERO);
        assert_eq!(b.clone().next_delay(None, f64::NAN), secs(16));
    }

    #[test]
    fn a_connection_that_stayed_up_resets_a_short_one_does_not() {
        let mut b = Backoff::new(BackoffPolicy::default());
        for _ in 0..6 {
            b.next_delay(None, 1.0);
        }
        assert_eq!(b.ceiling(), secs(64));
        // Up for 59 s: a flapping link keeps growing the backoff.
        assert_eq!(b.next_delay(Some(secs(59)), 1.0), secs(64));
        assert_eq!(b.ceiling(), secs(128));
        // Up for a minute: start again at the base.
        assert_eq!(b.next_delay(Some(secs(60)), 1.0), secs(1));
        assert_eq!(b.failures(), 1);
        assert_eq!(b.next_delay(None, 1.0), secs(2));
    }

    #[test]
    fn custom_policy() {
        let p = BackoffPolicy {
            base: Duration::from_millis(100),
            cap: Duration::from_millis(250),
            reset_after: Duration::from_secs(1),
        };
        let mut b = Backoff::new(p);
        let d: Vec<u128> = (0..4).map(|_| b.next_delay(None, 1.0).as_millis()).collect();
        assert_eq!(d, [100, 200, 250, 250]);
    }
}
