//! [`Retry`]: publish again after a retryable failure.

use async_trait::async_trait;

use crate::{Message, PublishFuture, Publisher, Result, RetryPolicy};

/// Retries a publish that failed with a retryable error (a lost connection, a
/// time-out), waiting the policy's delay between attempts, up to its maximum
/// number of attempts.
///
/// What is safe to retry: a failure that says the broker *certainly* did not take
/// the message ([`may_have_been_delivered`] is false) is retried.
/// One that says it *may* have (a lost confirm, a time-out) is not, since a
/// retry could deliver it twice: opt in with
/// [`retry_maybe_delivered`](Retry::retry_maybe_delivered) when consumers
/// deduplicate (by message id, which a retry keeps). Invalid input, oversize
/// payloads and a closed publisher are never retried.
///
/// [`may_have_been_delivered`]: crate::PublishError::may_have_been_delivered
#[derive(Debug, Clone)]
pub struct Retry<P> {
    inner: P,
    policy: RetryPolicy,
    maybe_delivered: bool,
}

impl<P> Retry<P> {
    /// Wrap `inner`.
    pub fn new(inner: P, policy: RetryPolicy) -> Self {
        Retry {
            inner,
            policy,
            maybe_delivered: false,
        }
    }

    /// Also retry failures after which the broker may have the message; only for
    /// consumers that deduplicate.
    pub fn retry_maybe_delivered(mut self, on: bool) -> Self {
        self.maybe_delivered = on;
        self
    }
}

#[async_trait]
impl<P: Publisher> Publisher for Retry<P> {
    fn publish<'a>(&'a self, topic: &'a str, message: Message) -> PublishFuture<'a> {
        PublishFuture::boxed(async move {
            let mut message = message;
            let mut attempt = 1;
            loop {
                let e = match self.inner.publish(topic, message).await {
                    Ok(receipt) => return Ok(receipt),
                    Err(e) => e,
                };
                let retry = e.error().is_retryable()
                    && (self.maybe_delivered || !e.may_have_been_delivered())
                    && !self.policy.is_exhausted(attempt);
                if !retry {
                    return Err(e);
                }
                let delay = self.policy.delay_after(attempt);
                tracing::debug!(topic, attempt, ?delay, error = %e, "publish failed; retrying");
                tokio::time::sleep(delay).await;
                message = e.into_message();
                attempt += 1;
            }
        })
    }

    async fn close(&self) -> Result<()> {
        self.inner.close().await
    }
}
