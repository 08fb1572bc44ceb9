//! [`Timeout`]: a deadline on every publish.

use std::time::Duration;

use async_trait::async_trait;

use crate::{Error, Kind, Message, PublishError, PublishFuture, Publisher, Result};

/// Fails a publish that takes longer than its limit with a [`Kind::Timeout`]
/// error. The broker may still take the message after the deadline, so the error
/// says it may have been delivered.
#[derive(Debug, Clone)]
pub struct Timeout<P> {
    inner: P,
    limit: Duration,
}

impl<P> Timeout<P> {
    /// Wrap `inner`.
    pub fn new(inner: P, limit: Duration) -> Self {
        Timeout { inner, limit }
    }
}

#[async_trait]
impl<P: Publisher> Publisher for Timeout<P> {
    fn publish<'a>(&'a self, topic: &'a str, message: Message) -> PublishFuture<'a> {
        PublishFuture::boxed(async move {
            // The inner publish owns its message; keep a copy (the payload is shared,
            // not copied) to hand back if the deadline passes.
            let copy = message.clone();
            match tokio::time::timeout(self.limit, self.inner.publish(topic, message)).await {
                Ok(result) => result,
                Err(_) => Err(PublishError::maybe_delivered(
                    Error::new(
                        Kind::Timeout,
                        format!("publish to `{topic}` took longer than {:?}", self.limit),
                    ),
                    copy,
                )),
            }
        })
    }

    async fn close(&self) -> Result<()> {
        self.inner.close().await
    }
}
