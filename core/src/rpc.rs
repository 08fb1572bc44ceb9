//! Request-reply over the bus: a [`Requester`] publishes a request with a
//! correlation id and its reply topic, and awaits the reply with a time-out;
//! [`respond`] runs a handler that answers requests.
//!
//! Requests and replies are ordinary messages. The request carries two headers:
//! [`REPLY_TO`], the requester's private reply topic (under [`REPLY_PREFIX`]),
//! and [`CORRELATION_ID`], fresh for each request, which the reply carries back.
//!
//! ```
//! # async fn demo(bus: polybus_core::Bus) -> polybus_core::Result<()> {
//! use std::time::Duration;
//! use polybus_core::rpc::{Requester, respond};
//! use polybus_core::{Message, Subscription};
//!
//! // The responder: answers `price.quote` requests.
//! let server = tokio::spawn(respond(
//!     bus.clone(),
//!     Subscription::new("price.quote").group("pricing"),
//!     |request: Message| async move { Ok(Message::new(format!("42 for {:?}", request.payload()))) },
//! ));
//!
//! let requester = Requester::new(bus.clone()).await?;
//! let reply = requester
//!     .request("price.quote", Message::new("widget"), Duration::from_secs(5))
//!     .await?;
//! # server.abort();
//! # Ok(()) }
//! ```

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::consumer::{Consumer, HandlerError, Stats};
use crate::{Bus, Error, Kind, Message, Result, Subscription};

pub use crate::names::{CORRELATION_ID, REPLY_PREFIX, REPLY_TO};

type Pending = Arc<Mutex<HashMap<String, oneshot::Sender<Message>>>>;

/// Sends requests and awaits their replies. One private reply subscription
/// serves every request of a requester; cheap to share behind an `Arc`.
pub struct Requester {
    bus: Bus,
    reply_topic: String,
    pending: Pending,
    listener: JoinHandle<()>,
}

impl Requester {
    /// Open the requester's reply subscription (live when this returns).
    pub async fn new(bus: Bus) -> Result<Self> {
        let reply_topic = format!("{REPLY_PREFIX}.{}", uuid::Uuid::now_v7().simple());
        let mut replies = bus
            .subscribe(Subscription::new(reply_topic.clone()))
            .await?;
        let pending: Pending = Arc::default();
        let waiting = pending.clone();
        let listener = tokio::spawn(async move {
            while let Some(delivery) = replies.next().await {
                let Ok(delivery) = delivery else { continue };
                let reply = delivery.message().clone();
                if let Err(e) = delivery.ack().await {
                    tracing::debug!(error = %e, "acking a reply failed");
                }
                let Some(id) = reply.header(CORRELATION_ID) else {
                    tracing::warn!("a reply without a correlation id; dropped");
                    continue;
                };
                let waiter = waiting.lock().unwrap_or_else(|p| p.into_inner()).remove(id);
                match waiter {
                    Some(tx) => {
                        let _ = tx.send(reply);
                    }
                    // Its request timed out already.
                    None => tracing::debug!(correlation_id = id, "a late reply; dropped"),
                }
            }
            // The reply stream ended: fail every waiting request now (their
            // senders drop) rather than at their time-outs.
            waiting.lock().unwrap_or_else(|p| p.into_inner()).clear();
        });
        Ok(Requester {
            bus,
            reply_topic,
            pending,
            listener,
        })
    }

    /// The topic replies to this requester go to.
    pub fn reply_topic(&self) -> &str {
        &self.reply_topic
    }

    /// Publish `request` to `topic` and wait up to `timeout` for its reply. No
    /// reply in time, whether the responder is slow or missing, is a
    /// [`Kind::Timeout`] error.
    pub async fn request(
        &self,
        topic: &str,
        request: Message,
        timeout: Duration,
    ) -> Result<Message> {
        // A fresh id per request: two requests may carry the same message id.
        let correlation = uuid::Uuid::now_v7().simple().to_string();
        let request = request
            .with_header(REPLY_TO, self.reply_topic.clone())
            .with_header(CORRELATION_ID, correlation.clone());
        let (tx, rx) = oneshot::channel();
        self.pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(correlation.clone(), tx);
        // Removes the entry however this call ends, cancellation included.
        let _pending = PendingEntry {
            pending: &self.pending,
            id: &correlation,
        };
        self.bus.publish(topic, request).await?;
        match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(reply)) => Ok(reply),
            Ok(Err(_)) => Err(Error::closed("the requester's reply subscription ended")),
            Err(_) => Err(Error::new(
                Kind::Timeout,
                format!(
                    "no reply to request {correlation} on `{topic}` within {timeout:?} \
                     (is a responder subscribed?)"
                ),
            )),
        }
    }
}

struct PendingEntry<'a> {
    pending: &'a Pending,
    id: &'a str,
}

impl Drop for PendingEntry<'_> {
    fn drop(&mut self) {
        self.pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(self.id);
    }
}

impl Drop for Requester {
    fn drop(&mut self) {
        // Dropping the listener drops the reply subscription, which deletes its
        // private group.
        self.listener.abort();
    }
}

/// Answer requests: run `handler` for each request on `subscription` (through
/// the handler [`Consumer`]) and publish its reply to the request's reply topic.
/// A message without a reply topic is dead-lettered as "not a request"; a
/// handler error is settled as the runtime settles it. Runs until the
/// subscription ends.
pub async fn respond<H, Fut>(bus: Bus, subscription: Subscription, handler: H) -> Result<Stats>
where
    H: Fn(Message) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = std::result::Result<Message, HandlerError>> + Send + 'static,
{
    let handler = Arc::new(handler);
    let publisher = bus.clone();
    Consumer::new(bus, subscription)
        .run(move |request: Message| {
            let (handler, publisher) = (handler.clone(), publisher.clone());
            async move {
                let Some(reply_to) = request.header(REPLY_TO).map(str::to_owned) else {
                    return Err(HandlerError::permanent(format!(
                        "message {} is not a request: it has no `{REPLY_TO}` header",
                        request.id()
                    )));
                };
                if reply_to.split('.').next() != Some(REPLY_PREFIX) {
                    return Err(HandlerError::permanent(format!(
                        "request {} asks for a reply on `{reply_to}`, which is not a reply topic",
                        request.id()
                    )));
                }
                let id = request
                    .header(CORRELATION_ID)
                    .unwrap_or(request.id())
                    .to_owned();
                let reply = handler(request).await?.with_header(CORRELATION_ID, id);
                publisher.publish(&reply_to, reply).await.map_err(|e| {
                    // A reply that can never be published is not worth a retry.
                    if e.error().is_invalid_input() {
                        HandlerError::permanent(e.error())
                    } else {
                        HandlerError::retry(e.error())
                    }
                })?;
                Ok(())
            }
        })
        .await
}
