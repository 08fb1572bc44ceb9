//! The two traits services and middleware see, [`Publisher`] and [`Subscriber`],
//! and what a publish returns. [`Bus`](crate::Bus) implements both; middleware
//! wraps any implementation.

use std::sync::Arc;

use async_trait::async_trait;

use crate::backend::future::BackendFuture;
use crate::error::{PublishError, Result};
use crate::message::Message;
use crate::stream::DeliveryStream;
use crate::subscription::Subscription;

/// What the broker said when it took a message (C4). Fields a backend cannot know
/// are `None`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct Receipt {
    /// The partition the message went to (Kafka).
    pub partition: Option<i32>,
    /// Its offset in that partition (Kafka), or its sequence number (memory).
    pub offset: Option<i64>,
}

impl Receipt {
    /// A receipt with a partition and an offset.
    pub fn at(partition: Option<i32>, offset: Option<i64>) -> Self {
        Receipt { partition, offset }
    }
}

/// What [`Publisher::publish`] returns: the [`Receipt`] once the broker has
/// taken the message, or the message back inside the error.
pub type PublishFuture<'a> = BackendFuture<'a, Result<Receipt, PublishError>>;

/// Publishes messages. Object-safe: `Arc<dyn Publisher>` works.
///
/// ```
/// use polybus_core::{Message, PublishFuture, Publisher, async_trait};
///
/// /// Middleware that stamps every message with the service's name.
/// struct Stamp<P>(P);
///
/// #[async_trait]
/// impl<P: Publisher> Publisher for Stamp<P> {
///     fn publish<'a>(&'a self, topic: &'a str, message: Message) -> PublishFuture<'a> {
///         self.0.publish(topic, message.with_header("service", "billing"))
///     }
///
///     async fn close(&self) -> polybus_core::Result<()> {
///         self.0.close().await
///     }
/// }
/// ```
#[async_trait]
pub trait Publisher: Send + Sync {
    /// Publish `message` to `topic`. Resolves to `Ok` only once the broker has
    /// taken responsibility for it (C4); on failure the message comes back inside
    /// the error. Headers under `polybus-` are dropped: they are the library's.
    /// The publish may start before the future is first polled; see
    /// [`BackendFuture`].
    fn publish<'a>(&'a self, topic: &'a str, message: Message) -> PublishFuture<'a>;

    /// Publish several messages to `topic`, pipelined: all are in flight at once,
    /// and each gets its own result, in order.
    async fn publish_batch(
        &self,
        topic: &str,
        messages: Vec<Message>,
    ) -> Vec<Result<Receipt, PublishError>> {
        futures::future::join_all(messages.into_iter().map(|m| self.publish(topic, m))).await
    }

    /// Stop publishing: wait for outstanding confirms, then refuse new publishes
    /// with a [`Closed`](crate::Kind::Closed) error (C10).
    async fn close(&self) -> Result<()>;
}

// Shared and borrowed publishers are publishers, so middleware can wrap
// `Arc<dyn Publisher>` or `&P`.
macro_rules! forward_publisher {
    ($($ty:ty),*) => {$(
        #[async_trait]
        impl<P: Publisher + ?Sized> Publisher for $ty {
            fn publish<'a>(&'a self, topic: &'a str, message: Message) -> PublishFuture<'a> {
                (**self).publish(topic, message)
            }

            async fn publish_batch(
                &self,
                topic: &str,
                messages: Vec<Message>,
            ) -> Vec<Result<Receipt, PublishError>> {
                (**self).publish_batch(topic, messages).await
            }

            async fn close(&self) -> Result<()> {
                (**self).close().await
            }
        }
    )*};
}
forward_publisher!(&P, Arc<P>);

/// Opens subscriptions. Object-safe: `Arc<dyn Subscriber>` works.
#[async_trait]
pub trait Subscriber: Send + Sync {
    /// Open a subscription. When this returns, the subscription is live: anything
    /// published afterwards reaches it (C3). Invalid options are rejected before
    /// any I/O.
    async fn subscribe(&self, subscription: Subscription) -> Result<DeliveryStream>;
}

// Object safety, checked at compile time.
const _: fn(&dyn Publisher, &dyn Subscriber) = |_, _| {};
