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
use crate::dead_letters::DeadLetters;
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
    #[cfg(feature = "otel")]
    telemetry: Arc<crate::telemetry::Instruments>,
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
                #[cfg(feature = "otel")]
                telemetry: crate::telemetry::Instruments::new(backend.endpoint()),
                backend: Box::new(backend),
                gate: Gate::default(),
            }),
        }
    }

    /// Publish; see [`Publisher::publish`].
    pub fn publish<'a>(&'a self, topic: &'a str, message: Message) -> PublishFuture<'a> {
        self.publish_marked(topic, message, None)
    }

    /// Publish with one library header set after the caller's are stripped
    /// (a redriven message's [`REDRIVEN_AT`](crate::header::REDRIVEN_AT)).
    pub(crate) fn publish_marked<'a>(
        &'a self,
        topic: &'a str,
        message: Message,
        mark: Option<(&'static str, String)>,
    ) -> PublishFuture<'a> {
        let inner = &*self.inner;
        let guard = match inner.gate.enter("publish", inner.name) {
            Ok(guard) => guard,
            Err(e) => return PublishFuture::ready(Err(PublishError::not_delivered(e, message))),
        };
        let prepared = prepare_publish(topic, message, inner.max_payload).map(|mut message| {
            if let Some((name, value)) = mark {
                message.headers_mut().insert(name.into(), value);
            }
            message
        });
        match prepared {
            #[cfg(not(feature = "otel"))]
            Ok(message) => inner.backend.publish(topic, message).guarded(guard),
            #[cfg(feature = "otel")]
            Ok(message) => inner.publish_traced(topic, message, guard),
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
        #[cfg(feature = "otel")]
        let send =
            (!accepted.is_empty()).then(|| inner.telemetry.start_send(topic, &mut accepted, true));
        let outcomes = inner.backend.publish_batch(topic, accepted).await;
        #[cfg(feature = "otel")]
        if let Some(send) = send {
            send.finish(&outcomes);
        }
        let mut outcomes = outcomes.into_iter();
        results
            .into_iter()
            .map(|r| match r {
                Some(refused) => refused,
                // The messages went to the backend; without its answer there is
                // nothing to hand back, so a short answer is a backend bug.
                None => outcomes.next().unwrap_or_else(|| {
                    panic!(
                        "the {} backend answered a batch with fewer results than messages",
                        inner.name
                    )
                }),
            })
            .collect()
    }

    /// Subscribe; see [`Subscriber::subscribe`].
    pub async fn subscribe(&self, subscription: Subscription) -> Result<DeliveryStream> {
        let inner = &*self.inner;
        let checked = validate_for(&subscription, inner.name, &inner.capabilities)?;
        let _guard = inner.gate.enter("subscribe", inner.name)?;
        #[cfg(feature = "otel")]
        let group: Arc<str> = checked.group.as_str().into();
        let source = inner.backend.subscribe(checked).await?;
        #[cfg(feature = "otel")]
        let depth = source
            .depth_probe()
            .map(|probe| inner.telemetry.watch_depth(&group, probe));
        let stream = DeliveryStream::new(source);
        #[cfg(feature = "otel")]
        let stream = stream.traced(crate::telemetry::StreamTelemetry::new(
            inner.telemetry.clone(),
            group,
            depth,
        ));
        Ok(stream)
    }

    /// The dead letters of durable group `group`, to count, list, redrive and
    /// purge; see [`DeadLetters`]. Fails only on an invalid group name.
    pub fn dead_letters(&self, group: &str) -> Result<DeadLetters> {
        DeadLetters::new(self.clone(), group)
    }

    /// See [`Backend::backlog`].
    pub(crate) async fn backlog(&self, group: &str, topic: &str) -> Result<u64> {
        let inner = &*self.inner;
        let _guard = inner.gate.enter("count", inner.name)?;
        inner.backend.backlog(group, topic).await
    }

    /// The backend's short name: `memory`, `amqp`, `kafka`.
    pub fn backend(&self) -> &'static str {
        self.inner.name
    }

    /// What the backend offers beyond the contract.
    pub fn capabilities(&self) -> Capabilities {
        self.inner.capabilities.clone()
    }

    /// Close the publishing side; see [`Publisher::close`]: new publishes and
    /// subscriptions are refused, publishes already started are waited for,
    /// then the backend flushes. Open subscriptions keep running until closed.
    ///
    /// A pending publish future made before `close` counts as started until it
    /// is awaited or dropped: awaiting `close` on the task that holds such a
    /// future, before awaiting the future, never returns. (A publish the backend
    /// finished at once, as the in-memory broker does, is not waited for.)
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

#[cfg(feature = "otel")]
impl Inner {
    /// A publish within its `send` span. A backend that answered at once (the
    /// in-memory broker) is answered at once, so the future is not counted in
    /// the gate (see [`BackendFuture::guarded`](crate::backend::BackendFuture)).
    fn publish_traced<'a>(
        &'a self,
        topic: &'a str,
        message: Message,
        guard: crate::backend::gate::InFlightGuard<'a>,
    ) -> PublishFuture<'a> {
        let mut one = [message];
        let send = self.telemetry.start_send(topic, &mut one, false);
        let [message] = one;
        match self.backend.publish(topic, message).into_ready() {
            Ok(result) => {
                send.finish([&result]);
                PublishFuture::ready(result)
            }
            Err(publishing) => PublishFuture::boxed(async move {
                let result = publishing.await;
                send.finish([&result]);
                result
            })
            .guarded(guard),
        }
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

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;
    use crate::backend::{DeliverySource, ValidSubscription, lock};
    use crate::{Kind, header};

    /// Records what reaches it; a publish to `slow` waits for `release`.
    #[derive(Debug, Default)]
    struct Recorder {
        seen: Mutex<Vec<(String, Message)>>,
        batches: Mutex<Vec<usize>>,
        release: tokio::sync::Notify,
    }

    #[async_trait]
    impl Backend for Arc<Recorder> {
        fn name(&self) -> &'static str {
            "test"
        }

        fn capabilities(&self) -> Capabilities {
            Capabilities::new().with_max_payload(8)
        }

        fn publish<'a>(&'a self, topic: &'a str, message: Message) -> PublishFuture<'a> {
            lock(&self.seen).push((topic.to_owned(), message));
            if topic == "slow" {
                return PublishFuture::boxed(async move {
                    self.release.notified().await;
                    Ok(Receipt::default())
                });
            }
            PublishFuture::ready(Ok(Receipt::default()))
        }

        async fn publish_batch(
            &self,
            topic: &str,
            messages: Vec<Message>,
        ) -> Vec<Result<Receipt, PublishError>> {
            lock(&self.batches).push(messages.len());
            let mut out = Vec::new();
            for m in messages {
                out.push(self.publish(topic, m).await);
            }
            out
        }

        async fn subscribe(&self, _: ValidSubscription) -> Result<Box<dyn DeliverySource>> {
            Err(Error::new(Kind::Unsupported, "not in this test"))
        }
    }

    fn bus() -> (Bus, Arc<Recorder>) {
        let recorder = Arc::new(Recorder::default());
        (Bus::new(recorder.clone()), recorder)
    }

    #[tokio::test]
    async fn c1_c12_checks_run_before_the_backend_sees_a_publish() {
        let (bus, recorder) = bus();
        for (topic, message, kind) in [
            ("user..created", Message::new("x"), Kind::InvalidInput),
            ("polybus.retry.g", Message::new("x"), Kind::InvalidInput),
            (
                "user.created",
                Message::new("123456789"),
                Kind::PayloadTooLarge,
            ),
            (
                "user.created",
                Message::new("x").with_id(""),
                Kind::InvalidInput,
            ),
            (
                "user.created",
                Message::new("x").with_header("", "v"),
                Kind::InvalidInput,
            ),
        ] {
            let id = message.id().to_owned();
            let e = bus.publish(topic, message).await.unwrap_err();
            assert_eq!(e.kind(), kind, "{topic}: {e}");
            assert!(!e.may_have_been_delivered());
            assert_eq!(e.message().id(), id, "the message comes back");
        }
        assert!(lock(&recorder.seen).is_empty(), "the backend saw nothing");
        let forged = Message::new("x").with_header(header::ATTEMPT, "9");
        bus.publish("user.created", forged).await.unwrap();
        let seen = lock(&recorder.seen);
        assert_eq!(seen.len(), 1);
        assert_eq!(
            seen[0].1.header(header::ATTEMPT),
            None,
            "library headers stripped"
        );
    }

    #[tokio::test]
    async fn c12_a_batch_sends_what_passes_and_answers_every_message_in_order() {
        let (bus, recorder) = bus();
        let batch = vec![
            Message::new("ok").with_id("a"),
            Message::new("123456789").with_id("b"),
            Message::new("ok").with_id("c"),
        ];
        let results = bus.publish_batch("user.created", batch).await;
        assert!(results[0].is_ok() && results[2].is_ok());
        let e = results[1].as_ref().unwrap_err();
        assert!(e.error().is_payload_too_large() && e.message().id() == "b");
        assert_eq!(
            *lock(&recorder.batches),
            [2],
            "one batch of the two that passed"
        );
    }

    #[tokio::test]
    async fn c10_a_closed_bus_refuses_work_and_hands_messages_back() {
        let (bus, recorder) = bus();
        bus.close().await.unwrap();
        let e = bus
            .publish("user.created", Message::new("x").with_id("m"))
            .await
            .unwrap_err();
        assert!(e.error().is_closed() && e.message().id() == "m");
        assert_eq!(
            e.error().to_string(),
            "cannot publish: the test bus is closed"
        );
        let results = bus
            .publish_batch("user.created", vec![Message::new("1"), Message::new("2")])
            .await;
        assert!(
            results
                .iter()
                .all(|r| r.as_ref().unwrap_err().error().is_closed())
        );
        let e = bus
            .subscribe(Subscription::new("user.*"))
            .await
            .unwrap_err();
        assert!(e.is_closed(), "{e}");
        assert!(lock(&recorder.seen).is_empty() && lock(&recorder.batches).is_empty());
    }

    #[tokio::test]
    async fn c10_a_finished_publish_not_yet_awaited_does_not_hold_close() {
        let (bus, _) = bus();
        let done = bus.publish("user.created", Message::new("x"));
        bus.close().await.unwrap();
        done.await.unwrap();
    }

    #[tokio::test]
    async fn c10_close_waits_for_publishes_in_flight() {
        let (bus, recorder) = bus();
        let publishing = tokio::spawn({
            let bus = bus.clone();
            async move { bus.publish("slow", Message::new("x")).await.map(|_| ()) }
        });
        while lock(&recorder.seen).is_empty() {
            tokio::task::yield_now().await;
        }
        let mut closing = tokio::spawn({
            let bus = bus.clone();
            async move { bus.close().await }
        });
        // Nothing can finish the close but the publish in flight.
        for _ in 0..100 {
            tokio::task::yield_now().await;
        }
        assert!(
            !closing.is_finished(),
            "close returned before the publish resolved"
        );
        recorder.release.notify_one();
        publishing.await.unwrap().unwrap();
        (&mut closing).await.unwrap().unwrap();
    }
}
