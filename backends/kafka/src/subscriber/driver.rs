//! The driver thread of a subscription.

use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::consumer::BaseConsumer;
use rdkafka::error::KafkaError;
use tokio::sync::oneshot;

use super::rebalance::SubContext;
use super::{Phase, Shared};

/// The driver thread: poll, chores, and on stop, leave the group (the
/// revocation commits what is settled).
pub(super) fn drive(
    consumer: BaseConsumer<SubContext>,
    shared: Arc<Shared>,
    done: oneshot::Sender<()>,
) {
    // Shared with the periodic commits, each on a thread of its own (`flow`).
    let consumer = Arc::new(consumer);
    let mut last_commit = Instant::now();
    let mut wait = Duration::from_millis(100);
    loop {
        match consumer.poll(wait) {
            Some(Ok(record)) => shared.on_record(&record),
            Some(Err(e)) => log_consumer_error(&e),
            None => {}
        }
        match shared.chores(&consumer, &mut last_commit) {
            Some(w) => wait = w,
            None => break,
        }
    }
    // Dropping the consumer closes it: the revocation callback commits, and the
    // member leaves the group, so the others rebalance at once.
    shared.await_commit();
    drop(consumer);
    shared.lock().phase = Phase::Stopped;
    shared.changed.notify_waiters();
    let _ = done.send(());
}

fn log_consumer_error(e: &KafkaError) {
    // librdkafka reconnects by itself (C11); these are reports, not ends.
    tracing::debug!(error = %e, "kafka consumer reported an error");
}
