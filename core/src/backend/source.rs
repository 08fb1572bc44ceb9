//! [`DeliverySource`]: what a backend's subscription feeds its stream from.

use std::task::{Context, Poll};
use std::time::Duration;

use async_trait::async_trait;

use crate::delivery::Delivery;
use crate::error::Result;

/// The backend's half of a subscription's stream.
#[async_trait]
pub trait DeliverySource: Send + 'static {
    /// The next delivery, as [`Stream::poll_next`](futures::Stream::poll_next).
    /// Never yields more than the prefetch unsettled deliveries at once (C6).
    fn poll_next(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Delivery>>>;

    /// Stop fetching, wait up to `grace` for unsettled deliveries to be settled,
    /// then give the rest back to the broker for redelivery (C10).
    async fn close(&mut self, grace: Duration) -> Result<()>;
}
