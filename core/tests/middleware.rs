//! Publisher middleware under paused time: delays and recovery time-outs are
//! checked exactly, without waiting.
//!
//! `Script` is a publisher that fails in a scripted way: the middleware's logic is
//! the unit here, and no broker can be told to fail "twice, then succeed". The
//! middleware over a real bus is in the facade's tests.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use polybus_core::middleware::{BreakerState, CircuitBreaker, PublisherExt};
use polybus_core::{
    Error, Kind, Message, PublishError, PublishFuture, Publisher, Receipt, Result, RetryPolicy,
    async_trait,
};
use tokio::time::Instant;

#[derive(Clone, Copy, Debug)]
enum Step {
    Ok,
    /// Failed; the broker certainly does not have it.
    Lost,
    /// Failed after sending; the broker may have it.
    Unsure,
    Invalid,
    Hang,
}

#[derive(Default)]
struct Script {
    steps: Mutex<VecDeque<Step>>,
    calls: AtomicU32,
}

impl Script {
    fn new(steps: &[Step]) -> Self {
        Script {
            steps: Mutex::new(steps.iter().copied().collect()),
            calls: AtomicU32::new(0),
        }
    }
}

#[async_trait]
impl Publisher for Script {
    fn publish<'a>(&'a self, _topic: &'a str, message: Message) -> PublishFuture<'a> {
        PublishFuture::boxed(async move {
            self.calls.fetch_add(1, Ordering::SeqCst);
            let step = self.steps.lock().unwrap().pop_front().unwrap_or(Step::Ok);
            let conn = || Error::new(Kind::Connection, "connection reset");
            match step {
                Step::Ok => Ok(Receipt::default()),
                Step::Lost => Err(PublishError::not_delivered(conn(), message)),
                Step::Unsure => Err(PublishError::maybe_delivered(conn(), message)),
                Step::Invalid => Err(PublishError::not_delivered(
                    Error::invalid_input("bad"),
                    message,
                )),
                Step::Hang => std::future::pending().await,
            }
        })
    }

    async fn close(&self) -> Result<()> {
        Ok(())
    }
}

fn policy() -> RetryPolicy {
    RetryPolicy::exponential(Duration::from_millis(100))
        .max_attempts(4)
        .jitter(false)
}

#[tokio::test(start_paused = true)]
async fn retry_repeats_certain_failures_with_the_policys_delays() {
    let p = Script::new(&[Step::Lost, Step::Lost, Step::Ok]).with_retry(policy());
    let started = Instant::now();
    p.publish("t", Message::new("m")).await.unwrap();
    // Waited 100 ms, then 200 ms.
    assert_eq!(started.elapsed(), Duration::from_millis(300));
}

#[tokio::test(start_paused = true)]
async fn retry_gives_up_after_max_attempts_and_hands_the_message_back() {
    let script = Script::new(&[Step::Lost; 10]);
    let p = (&script).with_retry(policy());
    let m = Message::new("m");
    let e = p.publish("t", m.clone()).await.unwrap_err();
    assert_eq!(e.kind(), Kind::Connection);
    assert_eq!(e.into_message(), m);
    assert_eq!(script.calls.load(Ordering::SeqCst), 4);
}

#[tokio::test(start_paused = true)]
async fn retry_never_repeats_what_may_have_been_delivered_unless_told() {
    let script = Script::new(&[Step::Unsure, Step::Ok]);
    let e = (&script)
        .with_retry(policy())
        .publish("t", Message::new("m"))
        .await
        .unwrap_err();
    assert!(e.may_have_been_delivered());
    assert_eq!(script.calls.load(Ordering::SeqCst), 1);

    let script = Script::new(&[Step::Unsure, Step::Ok]);
    (&script)
        .with_retry(policy())
        .retry_maybe_delivered(true)
        .publish("t", Message::new("m"))
        .await
        .unwrap();
    assert_eq!(script.calls.load(Ordering::SeqCst), 2);
}

#[tokio::test(start_paused = true)]
async fn retry_never_repeats_invalid_input() {
    let script = Script::new(&[Step::Invalid, Step::Ok]);
    let e = (&script)
        .with_retry(policy())
        .publish("t", Message::new("m"))
        .await
        .unwrap_err();
    assert_eq!(e.kind(), Kind::InvalidInput);
    assert_eq!(script.calls.load(Ordering::SeqCst), 1);
}

#[tokio::test(start_paused = true)]
async fn timeout_bounds_a_hung_publish_and_returns_the_message() {
    let p = Script::new(&[Step::Hang]).with_timeout(Duration::from_secs(2));
    let m = Message::new("m").with_key("k");
    let started = Instant::now();
    let e = p.publish("t", m.clone()).await.unwrap_err();
    assert_eq!(e.kind(), Kind::Timeout);
    assert!(e.may_have_been_delivered(), "the broker may take it late");
    assert_eq!(e.into_message(), m);
    assert_eq!(started.elapsed(), Duration::from_secs(2));
}

#[tokio::test(start_paused = true)]
async fn timeout_inside_retry_retries_each_hung_attempt_when_allowed() {
    let script = Script::new(&[Step::Hang, Step::Hang, Step::Ok]);
    (&script)
        .with_timeout(Duration::from_secs(1))
        .with_retry(policy())
        .retry_maybe_delivered(true)
        .publish("t", Message::new("m"))
        .await
        .unwrap();
    assert_eq!(script.calls.load(Ordering::SeqCst), 3);
}

#[tokio::test(start_paused = true)]
async fn breaker_opens_after_five_failures_half_opens_after_30s_and_closes_on_success() {
    let script = Script::new(&[Step::Lost; 5]);
    let p = (&script).with_circuit_breaker(CircuitBreaker::new());
    for _ in 0..5 {
        assert_eq!(
            p.publish("t", Message::new("m")).await.unwrap_err().kind(),
            Kind::Connection
        );
    }
    assert_eq!(p.breaker().state(), BreakerState::Open);

    // Open: fails fast, without calling the publisher, and hands the message back.
    let m = Message::new("fast");
    let e = p.publish("t", m.clone()).await.unwrap_err();
    assert_eq!(e.kind(), Kind::CircuitOpen);
    assert!(!e.may_have_been_delivered());
    assert_eq!(e.into_message(), m);
    assert_eq!(script.calls.load(Ordering::SeqCst), 5);

    tokio::time::advance(Duration::from_secs(29)).await;
    assert_eq!(p.breaker().state(), BreakerState::Open);
    tokio::time::advance(Duration::from_secs(1)).await;
    assert_eq!(p.breaker().state(), BreakerState::HalfOpen);

    // The trial succeeds (the script has run out of failures): closed again.
    p.publish("t", Message::new("trial")).await.unwrap();
    assert_eq!(p.breaker().state(), BreakerState::Closed);
    assert_eq!(script.calls.load(Ordering::SeqCst), 6);
}

#[tokio::test(start_paused = true)]
async fn a_failed_trial_reopens_and_only_one_trial_runs_at_a_time() {
    let breaker = CircuitBreaker::new()
        .failure_threshold(2)
        .recovery_timeout(Duration::from_secs(10));
    for _ in 0..2 {
        breaker.acquire().unwrap().failure();
    }
    assert_eq!(breaker.state(), BreakerState::Open);
    tokio::time::advance(Duration::from_secs(10)).await;

    let trial = breaker.acquire().unwrap();
    let second = breaker.acquire().unwrap_err();
    assert_eq!(second.kind(), Kind::CircuitOpen);
    trial.failure();
    assert_eq!(breaker.state(), BreakerState::Open);

    // A trial dropped without an outcome frees the slot for the next one.
    tokio::time::advance(Duration::from_secs(10)).await;
    drop(breaker.acquire().unwrap());
    breaker.acquire().unwrap().success();
    assert_eq!(breaker.state(), BreakerState::Closed);
}

#[tokio::test(start_paused = true)]
async fn invalid_input_does_not_count_towards_opening() {
    let script = Script::new(&[Step::Invalid; 10]);
    let p = (&script).with_circuit_breaker(CircuitBreaker::new().failure_threshold(2));
    for _ in 0..10 {
        let _ = p.publish("t", Message::new("m")).await;
    }
    assert_eq!(p.breaker().state(), BreakerState::Closed);
}

#[tokio::test(start_paused = true)]
async fn a_success_resets_the_count_of_consecutive_failures() {
    let breaker = CircuitBreaker::new().failure_threshold(3);
    breaker.acquire().unwrap().failure();
    breaker.acquire().unwrap().failure();
    breaker.acquire().unwrap().success();
    breaker.acquire().unwrap().failure();
    breaker.acquire().unwrap().failure();
    assert_eq!(breaker.state(), BreakerState::Closed);
}

#[tokio::test(start_paused = true)]
async fn a_stale_success_does_not_close_an_open_breaker() {
    let breaker = CircuitBreaker::new().failure_threshold(2);
    // Three calls start while closed; two fail and open it; the third succeeds late.
    let (a, b, late) = (
        breaker.acquire().unwrap(),
        breaker.acquire().unwrap(),
        breaker.acquire().unwrap(),
    );
    a.failure();
    b.failure();
    assert_eq!(breaker.state(), BreakerState::Open);
    late.success();
    assert_eq!(
        breaker.state(),
        BreakerState::Open,
        "only a trial may close it"
    );
}

#[tokio::test(start_paused = true)]
async fn an_endless_recovery_time_keeps_the_breaker_open() {
    let breaker = CircuitBreaker::new()
        .failure_threshold(1)
        .recovery_timeout(Duration::MAX);
    breaker.acquire().unwrap().failure();
    tokio::time::advance(Duration::from_secs(365 * 24 * 3600)).await;
    assert_eq!(breaker.acquire().unwrap_err().kind(), Kind::CircuitOpen);
}
