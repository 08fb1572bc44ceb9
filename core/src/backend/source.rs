//! [`DeliverySource`]: what a backend's subscription feeds its stream from.

use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use async_trait::async_trait;

use crate::delivery::Delivery;
use crate::error::Result;
use crate::topic::Topic;

/// The backend's half of a subscription's stream.
#[async_trait]
pub trait DeliverySource: Send + 'static {
    /// The next delivery, as [`Stream::poll_next`](futures::Stream::poll_next).
    /// Never yields more than the prefetch unsettled deliveries at once (C6).
    fn poll_next(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Delivery>>>;

    /// Stop fetching, wait up to `grace` for unsettled deliveries to be settled,
    /// then give the rest back to the broker for redelivery (C10).
    async fn close(&mut self, grace: Duration) -> Result<()>;

    /// How to read what waits for this subscription's group, for the
    /// `polybus.group.depth` gauge (feature `otel`). Asked once, when the
    /// subscription opens, and only with the feature; the probe is then read
    /// from the metrics' collection, on any thread, so it must answer from
    /// what the backend already knows, without I/O. `None` (the default) where
    /// the backend cannot know.
    fn depth_probe(&self) -> Option<DepthProbe> {
        None
    }
}

/// Reads what waits for a group; see [`DeliverySource::depth_probe`].
pub type DepthProbe = Arc<dyn Fn() -> Vec<Depth> + Send + Sync>;

/// Messages waiting for a group: not yet handed out (retries waiting for
/// their delay included), as the backend last knew.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Depth {
    /// A partition's lag (Kafka), or `None` for the whole group's queue.
    pub partition: Option<(Topic, i32)>,
    /// How many messages.
    pub messages: u64,
}

impl Depth {
    /// The whole group's queue holds `messages`.
    pub fn group(messages: u64) -> Self {
        Depth {
            partition: None,
            messages,
        }
    }

    /// Partition `partition` of `topic` lags by `messages`.
    pub fn partition(topic: Topic, partition: i32, messages: u64) -> Self {
        Depth {
            partition: Some((topic, partition)),
            messages,
        }
    }
}
