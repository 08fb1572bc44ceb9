//! The two traits every backend implements, [`Publisher`] and [`Subscriber`], and
//! [`Bus`], the cheap-to-clone handle services pass around.

use std::collections::BTreeSet;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use async_trait::async_trait;
use futures::FutureExt;
use futures::future::{BoxFuture, Either, Ready};

use crate::delivery::DeliveryStream;
use crate::error::{Error, Kind, PublishError, Result};
use crate::message::Message;
use crate::subscription::Subscription;
use crate::topic::Topic;

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

/// Counts a publisher's operations in flight, so `close` can wait for them
/// (C10); for backends.
#[derive(Debug, Default)]
pub struct InFlight {
    count: std::sync::atomic::AtomicUsize,
    idle: tokio::sync::Notify,
}

/// One operation in flight, until dropped.
#[derive(Debug)]
pub struct InFlightGuard<'a>(&'a InFlight);

impl InFlight {
    /// Count an operation until the guard is dropped.
    pub fn enter(&self) -> InFlightGuard<'_> {
        self.count.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        InFlightGuard(self)
    }

    /// Wait until no operation is in flight.
    pub async fn idle(&self) {
        loop {
            let idle = self.idle.notified();
            tokio::pin!(idle);
            idle.as_mut().enable();
            if self.count.load(std::sync::atomic::Ordering::Acquire) == 0 {
                return;
            }
            idle.await;
        }
    }
}

impl Drop for InFlightGuard<'_> {
    fn drop(&mut self) {
        if self
            .0
            .count
            .fetch_sub(1, std::sync::atomic::Ordering::AcqRel)
            == 1
        {
            self.0.idle.notify_waiters();
        }
    }
}

/// The future a backend returns for one publish or settlement.
///
/// A named type rather than an `async fn`, so that a backend that never waits
/// (the in-memory broker) answers at once without allocating a future for every
/// message; a backend that does I/O wraps its `async` block with
/// [`BackendFuture::boxed`].
///
/// A backend may do the work when called rather than when polled (the in-memory
/// broker enqueues at once): dropping the future does not undo an operation
/// that has started, and its outcome is then unknown, as with a time-out.
#[must_use = "the outcome is lost unless the future is awaited"]
pub struct BackendFuture<'a, T>(Either<Ready<T>, BoxFuture<'a, T>>);

/// What [`Publisher::publish`] returns: the [`Receipt`] once the broker has
/// taken the message, or the message back inside the error.
pub type PublishFuture<'a> = BackendFuture<'a, Result<Receipt, PublishError>>;

impl<'a, T> BackendFuture<'a, T> {
    /// An operation still to be done by `future`, which is boxed.
    pub fn boxed(future: impl Future<Output = T> + Send + 'a) -> Self {
        BackendFuture(Either::Right(Box::pin(future)))
    }

    /// An operation already done.
    pub fn ready(output: T) -> Self {
        BackendFuture(Either::Left(futures::future::ready(output)))
    }
}

impl<T> Future for BackendFuture<'_, T> {
    type Output = T;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<T> {
        self.0.poll_unpin(cx)
    }
}

impl<T> fmt::Debug for BackendFuture<'_, T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = match self.0 {
            Either::Left(_) => "ready",
            Either::Right(_) => "boxed",
        };
        f.debug_tuple("BackendFuture")
            .field(&format_args!("{state}"))
            .finish()
    }
}

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
    /// with a [`Closed`](Kind::Closed) error (C10).
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

/// What a backend offers beyond the contract. Conformance cases that need one run
/// only where the backend claims it, and are reported as skipped elsewhere.
#[non_exhaustive]
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Capability {
    /// Messages published while no durable group exists can be read later
    /// ([`StartFrom::Earliest`](crate::StartFrom::Earliest)).
    Replay,
    /// Accepted messages and pending retries survive a broker restart.
    SurvivesRestart,
    /// Runs in process under `tokio::time::pause()`, so delays can be tested
    /// without waiting.
    VirtualTime,
    /// Within a group, each message goes to any member with room, so a member at
    /// its prefetch never holds up the others. Kafka lacks it: a partition
    /// belongs to one member at a time, and its messages wait for that member.
    MessageBalancing,
}

impl fmt::Display for Capability {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Capability::Replay => "replay",
            Capability::SurvivesRestart => "survives-restart",
            Capability::VirtualTime => "virtual-time",
            Capability::MessageBalancing => "message-balancing",
        })
    }
}

/// The capabilities of a backend, and its limits.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Capabilities {
    set: BTreeSet<Capability>,
    max_payload: Option<usize>,
}

impl Capabilities {
    /// No capabilities, no stated payload limit.
    pub fn new() -> Self {
        Self::default()
    }

    /// Add a capability.
    pub fn with(mut self, capability: Capability) -> Self {
        self.set.insert(capability);
        self
    }

    /// State the largest payload the backend accepts.
    pub fn with_max_payload(mut self, bytes: usize) -> Self {
        self.max_payload = Some(bytes);
        self
    }

    /// Whether the backend claims `capability`.
    pub fn has(&self, capability: Capability) -> bool {
        self.set.contains(&capability)
    }

    /// The largest payload accepted, if the backend knows it.
    pub fn max_payload(&self) -> Option<usize> {
        self.max_payload
    }

    /// All claimed capabilities.
    pub fn iter(&self) -> impl Iterator<Item = Capability> + '_ {
        self.set.iter().copied()
    }
}

/// A backend: a publisher and a subscriber that can say what it offers.
pub trait Backend: Publisher + Subscriber + fmt::Debug + 'static {
    /// What this backend offers beyond the contract.
    fn capabilities(&self) -> Capabilities;
}

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
    inner: Arc<dyn Backend>,
}

impl Bus {
    /// Wrap a backend.
    pub fn new(backend: impl Backend) -> Self {
        Bus {
            inner: Arc::new(backend),
        }
    }

    /// Publish; see [`Publisher::publish`].
    // `(*self.inner)` calls the backend directly; `self.inner.publish` would go
    // through the `Arc<P>` forwarding impl first.
    pub fn publish<'a>(&'a self, topic: &'a str, message: Message) -> PublishFuture<'a> {
        (*self.inner).publish(topic, message)
    }

    /// Publish several, pipelined; see [`Publisher::publish_batch`].
    pub async fn publish_batch(
        &self,
        topic: &str,
        messages: Vec<Message>,
    ) -> Vec<Result<Receipt, PublishError>> {
        (*self.inner).publish_batch(topic, messages).await
    }

    /// Subscribe; see [`Subscriber::subscribe`].
    pub async fn subscribe(&self, subscription: Subscription) -> Result<DeliveryStream> {
        (*self.inner).subscribe(subscription).await
    }

    /// What the backend offers beyond the contract.
    pub fn capabilities(&self) -> Capabilities {
        self.inner.capabilities()
    }

    /// Close the publishing side; see [`Publisher::close`].
    pub async fn close(&self) -> Result<()> {
        (*self.inner).close().await
    }

    /// The backend, as a publisher trait object (for middleware).
    pub fn as_publisher(&self) -> Arc<dyn Publisher> {
        self.inner.clone()
    }

    /// The backend, as a subscriber trait object.
    pub fn as_subscriber(&self) -> Arc<dyn Subscriber> {
        self.inner.clone()
    }
}

impl fmt::Debug for Bus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("Bus").field(&self.inner).finish()
    }
}

#[async_trait]
impl Publisher for Bus {
    fn publish<'a>(&'a self, topic: &'a str, message: Message) -> PublishFuture<'a> {
        (*self.inner).publish(topic, message)
    }

    async fn publish_batch(
        &self,
        topic: &str,
        messages: Vec<Message>,
    ) -> Vec<Result<Receipt, PublishError>> {
        (*self.inner).publish_batch(topic, messages).await
    }

    async fn close(&self) -> Result<()> {
        (*self.inner).close().await
    }
}

#[async_trait]
impl Subscriber for Bus {
    async fn subscribe(&self, subscription: Subscription) -> Result<DeliveryStream> {
        (*self.inner).subscribe(subscription).await
    }
}

/// The checks every backend makes before a publish does any I/O: a valid topic
/// (C1), a payload within `max_payload` (C12), and no caller-set library headers.
/// On failure the message comes back in the error. Allocates nothing.
pub fn prepare_publish(
    topic: &str,
    mut message: Message,
    max_payload: usize,
) -> Result<Message, PublishError> {
    if let Err(e) = Topic::validate(topic) {
        return Err(PublishError::not_delivered(e, message));
    }
    if Topic::is_reserved(topic) {
        let e = Error::invalid_input(format!(
            "topic `{topic}` is reserved: topics starting with `polybus.` are the library's"
        ));
        return Err(PublishError::not_delivered(e, message));
    }
    if let Err(e) = check_metadata(&message) {
        return Err(PublishError::not_delivered(e, message));
    }
    let len = message.payload().len();
    if len > max_payload {
        let e = Error::new(
            Kind::PayloadTooLarge,
            format!(
                "payload of message {} is {len} bytes, the limit is {max_payload}",
                message.id()
            ),
        );
        return Err(PublishError::not_delivered(e, message));
    }
    message.strip_library_headers();
    Ok(message)
}

/// The longest id, content type and header name: AMQP carries them as short
/// strings, so every backend keeps the same limit.
pub const MAX_SHORT_STRING: usize = 255;

fn check_metadata(message: &Message) -> Result<()> {
    let too_long = |what: &str, value: &str| {
        Error::invalid_input(format!(
            "{what} `{}…` of message {} is {} bytes, the limit is {MAX_SHORT_STRING}",
            &value[..value.floor_char_boundary(32)],
            message
                .id()
                .get(..message.id().floor_char_boundary(64))
                .unwrap_or(""),
            value.len()
        ))
    };
    if message.id().is_empty() {
        return Err(Error::invalid_input("a message id cannot be empty"));
    }
    if message.id().len() > MAX_SHORT_STRING {
        return Err(too_long("id", message.id()));
    }
    if let Some(ct) = message.content_type()
        && ct.len() > MAX_SHORT_STRING
    {
        return Err(too_long("content type", ct));
    }
    for name in message.headers().keys() {
        if name.is_empty() {
            return Err(Error::invalid_input(format!(
                "message {} has a header with an empty name",
                message.id()
            )));
        }
        if name.len() > MAX_SHORT_STRING {
            return Err(too_long("header name", name));
        }
    }
    Ok(())
}

// Object safety, checked at compile time.
const _: fn(&dyn Publisher, &dyn Subscriber, &dyn Backend) = |_, _, _| {};
