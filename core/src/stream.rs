//! [`DeliveryStream`]: the deliveries a subscription yields (C6, C10).

use std::fmt;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use futures::Stream;

use crate::backend::source::DeliverySource;
use crate::delivery::Delivery;
use crate::error::{Error, Result};

/// The deliveries of one subscription, as a [`Stream`].
///
/// Dropping it without [`close`](DeliveryStream::close) is what a crash looks like:
/// every unsettled delivery is redelivered (C9).
pub struct DeliveryStream {
    source: Box<dyn DeliverySource>,
    /// An error met while a batch was being filled, reported by the next call.
    deferred: Option<Error>,
    /// What starts each delivery's `process` (its span and metrics).
    #[cfg(feature = "otel")]
    telemetry: Option<crate::telemetry::StreamTelemetry>,
}

impl DeliveryStream {
    /// Wrap a backend's source; [`Bus::subscribe`](crate::Bus::subscribe) does.
    pub(crate) fn new(source: Box<dyn DeliverySource>) -> Self {
        DeliveryStream {
            source,
            deferred: None,
            #[cfg(feature = "otel")]
            telemetry: None,
        }
    }

    /// Start a `process` for each delivery handed out.
    #[cfg(feature = "otel")]
    pub(crate) fn traced(mut self, telemetry: crate::telemetry::StreamTelemetry) -> Self {
        self.telemetry = Some(telemetry);
        self
    }

    /// Up to `max` deliveries, gathered for at most `timeout`: returns as soon as
    /// `max` have come, or when the time is up with what has come (possibly none).
    /// The prefetch still bounds what is unsettled, so a batch larger than the
    /// prefetch fills only as earlier deliveries are settled. An error met after
    /// some deliveries were gathered is returned by the next call; a stream that
    /// has ended is a [`Closed`](crate::Kind::Closed) error once nothing is left.
    pub async fn next_batch(&mut self, max: usize, timeout: Duration) -> Result<Vec<Delivery>> {
        if let Some(e) = self.deferred.take() {
            return Err(e);
        }
        let mut batch = Vec::with_capacity(max.min(1024));
        let deadline = crate::retry::deadline_after(timeout);
        while batch.len() < max {
            // Batched: each delivery's `process` span links to its creation
            // context rather than being its child.
            let next = futures::future::poll_fn(|cx| self.poll_delivery(cx, true));
            match tokio::time::timeout_at(deadline, next).await {
                Err(_) => break,
                Ok(Some(Ok(d))) => batch.push(d),
                Ok(Some(Err(e))) if batch.is_empty() => return Err(e),
                Ok(Some(Err(e))) => {
                    self.deferred = Some(e);
                    break;
                }
                Ok(None) if batch.is_empty() => {
                    return Err(Error::closed("the subscription has ended"));
                }
                Ok(None) => break,
            }
        }
        Ok(batch)
    }

    /// The next delivery from the source: the one place deliveries are handed
    /// out, so the one place their `process` span starts.
    #[cfg_attr(not(feature = "otel"), allow(unused_variables))]
    fn poll_delivery(
        &mut self,
        cx: &mut Context<'_>,
        batched: bool,
    ) -> Poll<Option<Result<Delivery>>> {
        let mut next = self.source.poll_next(cx);
        // A scheduled message that came early waits out the rest in the
        // group's retry store, unseen (C14).
        while let Poll::Ready(Some(Ok(delivery))) = &next
            && let Some(delay) = delivery.message().not_due_for()
        {
            if let Poll::Ready(Some(Ok(early))) = next {
                early.defer(delay);
            }
            next = self.source.poll_next(cx);
        }
        #[cfg(feature = "otel")]
        if let (Poll::Ready(Some(Ok(delivery))), Some(telemetry)) = (&mut next, &mut self.telemetry)
        {
            delivery.start_process(telemetry, batched);
        }
        next
    }

    /// Stop fetching, let in-flight deliveries be settled for up to `grace`, then
    /// leave the rest to be redelivered.
    pub async fn close(mut self, grace: Duration) -> Result<()> {
        self.source.close(grace).await
    }
}

impl Stream for DeliveryStream {
    type Item = Result<Delivery>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.get_mut().poll_delivery(cx, false)
    }
}

impl fmt::Debug for DeliveryStream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DeliveryStream").finish_non_exhaustive()
    }
}
