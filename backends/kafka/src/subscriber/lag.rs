//! Each assigned partition's lag, for telemetry (`polybus.group.depth`, read
//! only with the core's `otel` feature): its high watermark, asked of the
//! broker every [`LAG_PERIOD`], less the offset this member last committed
//! there (before its first commit, where it would commit now: its lowest
//! unsettled record). It is asked only once telemetry first reads the lag, so
//! without a metrics SDK nothing is asked. librdkafka's own statistics are no substitute: they know the high
//! watermark of the member's last fetch only, which stops moving while the
//! member is paused at its prefetch.

use std::sync::{Arc, Weak};
use std::time::Duration;

use polybus_core::backend::{Depth, lock};
use polybus_core::names::retry_store;
use polybus_core::{Error, Kind, Result};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaResult;
use rdkafka::{Offset, TopicPartitionList};

use crate::connection::{Connector, config_error, kafka_error};

use super::{Phase, Shared};

/// How often the lag is asked of the broker.
const LAG_PERIOD: Duration = Duration::from_secs(2);

/// How long one partition's watermarks may take.
const WATERMARK_TIMEOUT: Duration = Duration::from_secs(1);

/// Keep `Shared::lags` current while the subscription lives.
pub(super) async fn refresh(shared: Weak<Shared>) {
    let mut tick = tokio::time::interval(LAG_PERIOD);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(s) = shared.upgrade() else { return };
        let parts: Vec<_> = {
            let state = s.lock();
            if matches!(state.phase, Phase::Stopping | Phase::Stopped) {
                return;
            }
            state
                .parts
                .iter()
                .map(|(tp, part)| {
                    let from = match part.committed.0 {
                        committed if committed >= 0 => committed,
                        _ => part.position().0,
                    };
                    (tp.clone(), from)
                })
                .filter(|(_, from)| *from >= 0)
                .collect()
        };
        let connector = s.connector.clone();
        drop(s);
        let asked = tokio::task::spawn_blocking(move || {
            let client = rdkafka::producer::Producer::client(&connector.producer);
            parts
                .into_iter()
                .filter_map(|((topic, partition), from)| {
                    let (_, high) = client
                        .fetch_watermarks(topic.as_str(), partition, WATERMARK_TIMEOUT)
                        .ok()?;
                    let lag = u64::try_from(high - from).unwrap_or(0);
                    Some(Depth::partition(topic, partition, lag))
                })
                .collect::<Vec<_>>()
        });
        let Ok(lags) = asked.await else { return };
        match shared.upgrade() {
            Some(s) => *lock(&s.lags) = lags,
            None => return,
        }
    }
}

/// What waits for durable group `group` in `topic`, asked now: for each
/// partition of `topic` and of the group's retry topic (where its nacked
/// deliveries wait for their delay, and where a subscription closed past its
/// grace copies what it still held), the high watermark less the group's
/// committed offset there, or less the low watermark where the group has
/// committed none (the library's own topics are read from their start). A
/// topic that does not exist holds none. Asked by a consumer configured with
/// the group's id, which reads the committed offsets without joining the group.
pub(crate) async fn backlog(connector: &Arc<Connector>, group: &str, topic: &str) -> Result<u64> {
    let options = &connector.options;
    let consumer: BaseConsumer = Connector::config(
        options,
        &[
            ("group.id", group.to_owned()),
            ("enable.auto.commit", "false".into()),
            ("allow.auto.create.topics", "false".into()),
        ],
    )
    .create()
    .map_err(|e| config_error(e, options))?;
    let topics = [topic.to_owned(), retry_store(group)];
    let timeout = options.connect_timeout;
    let what = format!("cannot count the messages of group `{group}` in `{topic}`");
    tokio::task::spawn_blocking(move || {
        topics.iter().try_fold(0, |total, topic| {
            Ok(total + lag(&consumer, topic, timeout).map_err(|e| kafka_error(what.clone(), e))?)
        })
    })
    .await
    .map_err(|e| {
        Error::new(
            Kind::Other,
            format!("counting a group's backlog panicked: {e}"),
        )
    })?
}

/// What `consumer`'s group has not committed in `topic`; see [`backlog`].
fn lag(consumer: &BaseConsumer, topic: &str, timeout: Duration) -> KafkaResult<u64> {
    let metadata = consumer.fetch_metadata(Some(topic), timeout)?;
    let Some(found) = metadata.topics().iter().find(|t| t.name() == topic) else {
        return Ok(0);
    };
    if found.error().is_some() || found.partitions().is_empty() {
        // Unknown topic: nothing was ever stored there.
        return Ok(0);
    }
    let mut asked = TopicPartitionList::new();
    for p in found.partitions() {
        asked.add_partition(topic, p.id());
    }
    let committed = consumer.committed_offsets(asked, timeout)?;
    let mut total = 0u64;
    for p in found.partitions() {
        let (low, high) = consumer.fetch_watermarks(topic, p.id(), timeout)?;
        let from = match committed.find_partition(topic, p.id()).map(|e| e.offset()) {
            Some(Offset::Offset(o)) if o >= low => o,
            _ => low,
        };
        total += u64::try_from(high - from).unwrap_or(0);
    }
    Ok(total)
}
