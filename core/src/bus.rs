//! [`Bus`]: the handle services pass around, and the one place the contract's
//! checks run before any backend sees an operation.
//!
//! Order of what a [`Bus`] does for each call (so a backend cannot skip it):
//!
//! 1. the gate: a closed bus refuses the call with a [`Closed`](crate::Kind::Closed)
//!    error, and an admitted call is counted until it finishes, so `close` waits
//!    for it (C10);
//! 2. the checks: topic (C1), metadata and payload against the backend's
//!    declared limit (C12), the library's headers stripped; or the subscription's
//!    patterns, group, prefetch and start (C1, C2, C6, C12);
//! 3. the backend, with values that passed.

use std::fmt;
use std::sync::Arc;

use async_trait::async_trait;

use crate::backend::Backend;
use crate::backend::checks::prepare_publish;
use crate::backend::gate::Gate;
use crate::backend::valid::validate_for;
use crate::capabilities::Capabilities;
use crate::error::{Error, PublishError, Result};
use crate::message::Message;
use crate::publisher::{PublishFuture, Publisher, Receipt, Subscriber};
use crate::stream::DeliveryStream;
use crate::subscription::Subscription;

/// A connection to a broker, cheap to clone, whatever the backend.
///
/// ```
/// # async fn demo(bus: polybus_core::Bus) -> Result<(), polybus_core::Error> {
/// use polybus_core::{Message, Subscription};
/// use futures::StreamExt;
///
/// let mut sub = bus.subscribe(Subscription::new("user.*").group("audit")).await?;
/// bus.publish("user.created", Message::new("u1")).await?;
/// let delivery = sub.next().await.expect("live subscription")?;
/// delivery.ack().await?;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct Bus {
    inner: Arc<Inner>,
}

struct Inner {
    backend: Box<dyn Backend>,
    name: &'static str,
    // Read once: a backend's capabilities and limit do not change while it runs.
    capabilities: Capabilities,
    max_payload: usize,
    gate: Gate,
}

impl Bus {
    /// Wrap a backend.
    pub fn new(backend: impl Backend) -> Self {
        let capabilities = backend.capabilities();
        Bus {
            inner: Arc::new(Inner {
                name: backend.name(),
                max_payload: capabilities.max_payload().unwrap_or(usize::MAX),
                capabilities,
                backend: Box::new(backend),
                gate: Gate::default(),
            }),
        }
    }

    /// Publish; see [`Publisher::publish`].
    pub fn publish<'a>(&'a self, topic: &'a str, message: Message) -> PublishFuture<'a> {
        let inner = &*self.inner;
        let guard = match inner.gate.enter("publish", inner.name) {
            Ok(guard) => guard,
            Err(e) => return PublishFuture::ready(Err(PublishError::not_delivered(e, message))),
        };
        match prepare_publish(topic, message, inner.max_payload) {
            Ok(message) => inner.backend.publish(topic, message).guarded(guard),
            Err(e) => PublishFuture::ready(Err(e)),
        }
    }

    /// Publish several, pipelined; see [`Publisher::publish_batch`]. Messages
    /// that fail the checks get their error in their place; the rest go to the
    /// backend as one batch.
    pub async fn publish_batch(
        &self,
        topic: &str,
        messages: Vec<Message>,
    ) -> Vec<Result<Receipt, PublishError>> {
        let inner = &*self.inner;
        let _guard = match inner.gate.enter("publish", inner.name) {
            Ok(guard) => guard,
            Err(e) => return refuse_all(&e, messages),
        };
        let mut results: Vec<Option<Result<Receipt, PublishError>>> =
            Vec::with_capacity(messages.len());
        let mut accepted = Vec::with_capacity(messages.len());
        for message in messages {
            match prepare_publish(topic, message, inner.max_payload) {
                Ok(m) => {
                    accepted.push(m);
                    results.push(None);
                }
                Err(e) => results.push(Some(Err(e))),
            }
        }
        let mut outcomes = inner
            .backend
            .publish_batch(topic, accepted)
            .await
            .into_iter();
        results
            .into_iter()
            .map(|r| match r {
                Some(refused) => refused,
                None => outcomes
                    .next()
                    .expect("a backend answers every message of a batch"),
            })
            .collect()
    }

    /// Subscribe; see [`Subscriber::subscribe`].
    pub async fn subscribe(&self, subscription: Subscription) -> Result<DeliveryStream> {
        let inner = &*self.inner;
        let checked = validate_for(&subscription, inner.name, &inner.capabilities)?;
        let _guard = inner.gate.enter("subscribe", inner.name)?;
        Ok(DeliveryStream::new(inner.backend.subscribe(checked).await?))
    }

    /// What the backend offers beyond the contract.
    pub fn capabilities(&self) -> Capabilities {
        self.inner.capabilities.clone()
    }

    /// Close the publishing side; see [`Publisher::close`]: new publishes and
    /// subscriptions are refused, publishes already started are waited for,
    /// then the backend flushes. Open subscriptions keep running until closed.
    pub async fn close(&self) -> Result<()> {
        self.inner.gate.close().await;
        self.inner.backend.close().await
    }

    /// The bus as a publisher trait object (for middleware).
    pub fn as_publisher(&self) -> Arc<dyn Publisher> {
        Arc::new(self.clone())
    }

    /// The bus as a subscriber trait object.
    pub fn as_subscriber(&self) -> Arc<dyn Subscriber> {
        Arc::new(self.clone())
    }
}

/// The answer to every message of a batch on a closed bus.
fn refuse_all(e: &Error, messages: Vec<Message>) -> Vec<Result<Receipt, PublishError>> {
    messages
        .into_iter()
        .map(|m| Err(PublishError::not_delivered(Error::closed(e.to_string()), m)))
        .collect()
}

impl fmt::Debug for Bus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Bus")
            .field("backend", &self.inner.backend)
            .field("closed", &self.inner.gate.is_closed())
            .finish()
    }
}

#[async_trait]
impl Publisher for Bus {
    fn publish<'a>(&'a self, topic: &'a str, message: Message) -> PublishFuture<'a> {
        Bus::publish(self, topic, message)
    }

    async fn publish_batch(
        &self,
        topic: &str,
        messages: Vec<Message>,
    ) -> Vec<Result<Receipt, PublishError>> {
        Bus::publish_batch(self, topic, messages).await
    }

    async fn close(&self) -> Result<()> {
        Bus::close(self).await
    }
}

#[async_trait]
impl Subscriber for Bus {
    async fn subscribe(&self, subscription: Subscription) -> Result<DeliveryStream> {
        Bus::subscribe(self, subscription).await
    }
}
