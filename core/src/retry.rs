//! [`RetryPolicy`]: how long a nacked message waits before it is delivered again,
//! and after how many attempts it is dead-lettered instead (clauses C7, C8).

use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};

/// Exponential backoff with optional jitter, a maximum delay and a maximum number of
/// attempts. A value, not a loop: backends and the handler runtime ask it for the
/// delay after a given attempt.
///
/// ```
/// use std::time::Duration;
/// use polybus_core::RetryPolicy;
///
/// let policy = RetryPolicy::exponential(Duration::from_millis(100))
///     .max_delay(Duration::from_secs(10))
///     .max_attempts(5)
///     .jitter(false);
/// assert_eq!(policy.delay_after(1), Duration::from_millis(100));
/// assert_eq!(policy.delay_after(3), Duration::from_millis(400));
/// assert!(!policy.is_exhausted(4));
/// assert!(policy.is_exhausted(5));
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct RetryPolicy {
    // Delays are kept within [MIN_DELAY, MAX_DELAY].
    min_delay: Duration,
    max_delay: Duration,
    factor: f32,
    jitter: bool,
    max_attempts: u32,
}

/// The shortest delay any policy waits: redelivery never spins (C8).
pub const MIN_DELAY: Duration = Duration::from_millis(10);
/// The longest delay any policy waits (brokers hold a retry at most this long).
pub const MAX_DELAY: Duration = Duration::from_secs(7 * 24 * 3600);

/// The instant `after` from now, on tokio's clock, saturating instead of
/// overflowing: `Duration::MAX` means "as long as it takes" (a century).
pub fn deadline_after(after: Duration) -> tokio::time::Instant {
    let now = tokio::time::Instant::now();
    now.checked_add(after)
        .unwrap_or(now + Duration::from_secs(100 * 365 * 24 * 3600))
}

impl Default for RetryPolicy {
    /// 5 attempts; waits of 1 s, 2 s, 4 s, 8 s, each with up to 100% jitter,
    /// capped at 60 s.
    fn default() -> Self {
        RetryPolicy {
            min_delay: Duration::from_secs(1),
            max_delay: Duration::from_secs(60),
            factor: 2.0,
            jitter: true,
            max_attempts: 5,
        }
    }
}

impl RetryPolicy {
    /// Delays that start at `first` and double, with jitter, up to 60 s, for 5
    /// attempts.
    pub fn exponential(first: Duration) -> Self {
        let default = RetryPolicy::default();
        RetryPolicy {
            min_delay: first,
            max_delay: default.max_delay.max(first),
            ..default
        }
    }

    /// The same delay before every redelivery, without jitter.
    pub fn fixed(delay: Duration) -> Self {
        RetryPolicy {
            min_delay: delay,
            max_delay: delay,
            factor: 1.0,
            jitter: false,
            ..RetryPolicy::default()
        }
    }

    /// No redelivery: the first `nack` dead-letters.
    pub fn never() -> Self {
        RetryPolicy {
            max_attempts: 1,
            ..RetryPolicy::default()
        }
    }

    /// The growth factor between delays (at least 1).
    pub fn factor(mut self, factor: f32) -> Self {
        self.factor = factor.max(1.0);
        self
    }

    /// The longest delay, jitter included.
    pub fn max_delay(mut self, max: Duration) -> Self {
        self.max_delay = max.max(self.min_delay);
        self
    }

    /// How many deliveries a message gets before it is dead-lettered (at least 1).
    pub fn max_attempts(mut self, attempts: u32) -> Self {
        self.max_attempts = attempts.max(1);
        self
    }

    /// Add up to 100% random jitter to each delay, so a crowd of failures does not
    /// come back at the same instant.
    pub fn jitter(mut self, on: bool) -> Self {
        self.jitter = on;
        self
    }

    /// The configured maximum number of attempts.
    pub fn attempts(&self) -> u32 {
        self.max_attempts
    }

    /// The first delay, the shortest this policy ever waits.
    pub fn first_delay(&self) -> Duration {
        self.min_delay
    }

    /// The longest this policy ever waits.
    pub fn longest_delay(&self) -> Duration {
        self.max_delay
    }

    /// Whether a message that just failed its `attempt`-th delivery has used all
    /// its attempts, and is to be dead-lettered.
    pub fn is_exhausted(&self, attempt: u32) -> bool {
        attempt >= self.max_attempts
    }

    /// How long to wait before redelivering a message whose `attempt`-th
    /// delivery (1-based) failed.
    pub fn delay_after(&self, attempt: u32) -> Duration {
        let mut builder = ExponentialBuilder::default()
            .with_min_delay(self.min_delay)
            .with_max_delay(self.max_delay)
            .with_factor(self.factor)
            .without_max_times();
        if self.jitter {
            builder = builder.with_jitter();
        }
        let n = attempt.max(1) as usize;
        let delay = builder.build().nth(n - 1).unwrap_or(self.max_delay);
        // backon computes in f32; round away its nanosecond noise.
        let delay = Duration::from_micros((delay.as_nanos() as f64 / 1000.0).round() as u64);
        delay
            .min(self.max_delay)
            .max(self.min_delay)
            .clamp(MIN_DELAY, MAX_DELAY)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_grow_and_cap() {
        let p = RetryPolicy::exponential(Duration::from_millis(100))
            .max_delay(Duration::from_millis(500))
            .jitter(false);
        let got: Vec<u128> = (1..=5).map(|a| p.delay_after(a).as_millis()).collect();
        assert_eq!(got, [100, 200, 400, 500, 500]);
    }

    #[test]
    fn jitter_stays_between_base_and_cap() {
        let p =
            RetryPolicy::exponential(Duration::from_millis(100)).max_delay(Duration::from_secs(1));
        for _ in 0..200 {
            let d = p.delay_after(2);
            assert!(
                d >= Duration::from_millis(200) && d < Duration::from_millis(400),
                "{d:?}"
            );
        }
    }

    #[test]
    fn delays_never_spin_nor_overflow() {
        assert_eq!(RetryPolicy::fixed(Duration::ZERO).delay_after(1), MIN_DELAY);
        assert_eq!(RetryPolicy::fixed(Duration::MAX).delay_after(3), MAX_DELAY);
        assert_eq!(
            RetryPolicy::exponential(Duration::MAX).delay_after(9),
            MAX_DELAY
        );
    }

    #[test]
    fn never_dead_letters_on_first_failure() {
        assert!(RetryPolicy::never().is_exhausted(1));
        assert!(RetryPolicy::default().max_attempts(0).is_exhausted(1));
    }
}
