//! [`CircuitBreaker`]: stop calling something that keeps failing, and try it again
//! after a while. [`Guarded`] puts one in front of a publisher; the same breaker
//! can guard a handler through [`CircuitBreaker::acquire`].

use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use tokio::time::Instant;

use crate::{Error, Kind, Message, PublishError, PublishFuture, Publisher, Result};

/// Where a breaker stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakerState {
    /// Calls go through; consecutive failures are counted.
    Closed,
    /// Calls fail fast until the recovery time-out has passed.
    Open,
    /// One trial call goes through; its outcome closes or re-opens the breaker.
    HalfOpen,
}

#[derive(Debug)]
enum State {
    Closed { failures: u32 },
    Open { until: Instant },
    HalfOpen { trial_running: bool },
}

/// Opens after `failure_threshold` consecutive failures (default 5), fails fast
/// with a [`Kind::CircuitOpen`] error while open, lets one trial through after
/// `recovery_timeout` (default 30 s), and closes again when the trial succeeds.
/// Cheap to clone; clones share one state.
///
/// ```
/// # async fn demo() -> Result<(), polybus_core::Error> {
/// use polybus_core::middleware::CircuitBreaker;
///
/// let breaker = CircuitBreaker::new();
/// let permit = breaker.acquire()?; // fails fast while open
/// match downstream().await {
///     Ok(()) => permit.success(),
///     Err(_) => permit.failure(),
/// }
/// # Ok(()) }
/// # async fn downstream() -> Result<(), ()> { Ok(()) }
/// ```
#[derive(Clone)]
pub struct CircuitBreaker {
    state: Arc<Mutex<State>>,
    failure_threshold: u32,
    recovery_timeout: Duration,
}

impl Default for CircuitBreaker {
    fn default() -> Self {
        Self::new()
    }
}

impl CircuitBreaker {
    /// A closed breaker: 5 consecutive failures open it, for 30 s.
    pub fn new() -> Self {
        CircuitBreaker {
            state: Arc::new(Mutex::new(State::Closed { failures: 0 })),
            failure_threshold: 5,
            recovery_timeout: Duration::from_secs(30),
        }
    }

    /// How many consecutive failures open the breaker (at least 1).
    pub fn failure_threshold(mut self, failures: u32) -> Self {
        self.failure_threshold = failures.max(1);
        self
    }

    /// How long the breaker stays open before it lets a trial through.
    pub fn recovery_timeout(mut self, timeout: Duration) -> Self {
        self.recovery_timeout = timeout;
        self
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Where the breaker stands now (an open breaker whose time is up reads as
    /// half-open).
    pub fn state(&self) -> BreakerState {
        match *self.lock() {
            State::Closed { .. } => BreakerState::Closed,
            State::Open { until } if Instant::now() >= until => BreakerState::HalfOpen,
            State::Open { .. } => BreakerState::Open,
            State::HalfOpen { .. } => BreakerState::HalfOpen,
        }
    }

    /// Ask to make a call. While open (or while a half-open trial runs) this is a
    /// [`Kind::CircuitOpen`] error; otherwise report the call's outcome on the
    /// permit. A permit dropped without an outcome counts as neither.
    pub fn acquire(&self) -> Result<Permit> {
        let mut state = self.lock();
        match &mut *state {
            State::Closed { .. } => {}
            State::Open { until } => {
                let now = Instant::now();
                if now < *until {
                    return Err(Error::new(
                        Kind::CircuitOpen,
                        format!("circuit open: failing fast for another {:?}", *until - now),
                    ));
                }
                *state = State::HalfOpen {
                    trial_running: true,
                };
                #[cfg(feature = "otel")]
                crate::telemetry::record_breaker_transition("half_open");
                return Ok(self.permit(true));
            }
            State::HalfOpen { trial_running } => {
                if *trial_running {
                    return Err(Error::new(
                        Kind::CircuitOpen,
                        "circuit half-open: a trial call is running",
                    ));
                }
                *trial_running = true;
                return Ok(self.permit(true));
            }
        }
        Ok(self.permit(false))
    }

    fn permit(&self, trial: bool) -> Permit {
        Permit {
            breaker: self.clone(),
            trial,
            done: false,
        }
    }

    fn record(&self, trial: bool, success: bool) {
        let mut state = self.lock();
        let next = match (&*state, success) {
            // A call made before the breaker opened says nothing about now: only
            // the trial decides an open or half-open breaker.
            (State::Open { .. } | State::HalfOpen { .. }, true) if !trial => return,
            (_, true) => State::Closed { failures: 0 },
            (State::Closed { failures }, false) => {
                let failures = failures + 1;
                if failures >= self.failure_threshold {
                    tracing::warn!(failures, "circuit breaker opens");
                    self.open_state()
                } else {
                    State::Closed { failures }
                }
            }
            // A failed trial re-opens; a late failure of a call made before the
            // breaker opened leaves it open.
            (State::HalfOpen { .. }, false) if trial => self.open_state(),
            (State::HalfOpen { .. }, false) | (State::Open { .. }, false) => return,
        };
        #[cfg(feature = "otel")]
        if std::mem::discriminant(&*state) != std::mem::discriminant(&next) {
            crate::telemetry::record_breaker_transition(match next {
                State::Closed { .. } => "closed",
                State::Open { .. } => "open",
                State::HalfOpen { .. } => "half_open",
            });
        }
        *state = next;
    }

    fn open_state(&self) -> State {
        State::Open {
            // Duration::MAX means "stay open": far in the future, not "now".
            until: crate::retry::deadline_after(self.recovery_timeout),
        }
    }

    fn release_trial(&self) {
        let mut state = self.lock();
        if let State::HalfOpen { trial_running } = &mut *state {
            *trial_running = false;
        }
    }
}

impl fmt::Debug for CircuitBreaker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CircuitBreaker")
            .field("state", &self.state())
            .field("failure_threshold", &self.failure_threshold)
            .field("recovery_timeout", &self.recovery_timeout)
            .finish()
    }
}

/// Leave to make one call; report its outcome.
#[must_use = "report the outcome with success() or failure()"]
pub struct Permit {
    breaker: CircuitBreaker,
    trial: bool,
    done: bool,
}

impl Permit {
    /// The call succeeded: the breaker closes (or stays closed).
    pub fn success(mut self) {
        self.done = true;
        self.breaker.record(self.trial, true);
    }

    /// The call failed: counted towards opening (or re-opens a half-open breaker).
    pub fn failure(mut self) {
        self.done = true;
        self.breaker.record(self.trial, false);
    }
}

impl fmt::Debug for Permit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Permit")
            .field("trial", &self.trial)
            .finish()
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        if !self.done && self.trial {
            self.breaker.release_trial();
        }
    }
}

/// A publisher behind a [`CircuitBreaker`]. Failures that are the caller's
/// (invalid input, oversize payloads) or the publisher's own closing do not count.
#[derive(Debug, Clone)]
pub struct Guarded<P> {
    inner: P,
    breaker: CircuitBreaker,
}

impl<P> Guarded<P> {
    /// Wrap `inner`.
    pub fn new(inner: P, breaker: CircuitBreaker) -> Self {
        Guarded { inner, breaker }
    }

    /// The breaker, to read its state or share it.
    pub fn breaker(&self) -> &CircuitBreaker {
        &self.breaker
    }
}

#[async_trait]
impl<P: Publisher> Publisher for Guarded<P> {
    fn publish<'a>(&'a self, topic: &'a str, message: Message) -> PublishFuture<'a> {
        PublishFuture::boxed(async move {
            let permit = match self.breaker.acquire() {
                Ok(p) => p,
                Err(e) => return Err(PublishError::not_delivered(e, message)),
            };
            let result = self.inner.publish(topic, message).await;
            match &result {
                Ok(_) => permit.success(),
                Err(e) if e.error().is_invalid_input() || e.error().is_closed() => drop(permit),
                Err(_) => permit.failure(),
            }
            result
        })
    }

    async fn close(&self) -> Result<()> {
        self.inner.close().await
    }
}
