//! Publisher middleware. Each wraps any [`Publisher`] and is one itself, so they
//! compose; build them with [`PublisherExt`].
//!
//! Order matters, innermost first:
//!
//! ```
//! # async fn demo(bus: polybus_core::Bus) -> Result<(), polybus_core::PublishError> {
//! use std::time::Duration;
//! use polybus_core::middleware::{CircuitBreaker, PublisherExt};
//! use polybus_core::{Message, Publisher, RetryPolicy};
//!
//! let publisher = bus
//!     .with_timeout(Duration::from_secs(5))          // bounds each attempt
//!     .with_retry(RetryPolicy::exponential(Duration::from_millis(100)).max_attempts(3))
//!     .with_circuit_breaker(CircuitBreaker::new()); // counts what still fails
//! publisher.publish("user.created", Message::new("u1")).await?;
//! # Ok(()) }
//! ```
//!
//! - the timeout is innermost, so every attempt is bounded;
//! - retry repeats retryable failures with the policy's delays; a time-out is
//!   retried only with `retry_maybe_delivered(true)`, since the broker may have
//!   taken the message after all;
//! - the breaker sees only what failed after all retries, and fails fast while open.
//!
//! A batch through these runs as concurrent single publishes: a retried message
//! can land after a later one of the same key.

mod circuit_breaker;
mod retry;
mod timeout;

pub use circuit_breaker::{BreakerState, CircuitBreaker, Guarded, Permit};
pub use retry::Retry;
pub use timeout::Timeout;

use std::time::Duration;

use crate::{Publisher, RetryPolicy};

/// Builders for the middleware, on every publisher.
pub trait PublisherExt: Publisher + Sized {
    /// Fail each publish that takes longer than `limit`.
    fn with_timeout(self, limit: Duration) -> Timeout<Self> {
        Timeout::new(self, limit)
    }

    /// Retry retryable failures under `policy`.
    fn with_retry(self, policy: RetryPolicy) -> Retry<Self> {
        Retry::new(self, policy)
    }

    /// Fail fast while `breaker` is open.
    fn with_circuit_breaker(self, breaker: CircuitBreaker) -> Guarded<Self> {
        Guarded::new(self, breaker)
    }
}

impl<P: Publisher + Sized> PublisherExt for P {}
