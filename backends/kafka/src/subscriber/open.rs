//! The subscribe path: make the topics, join the group, wait for the first
//! assignment.

use std::collections::HashSet;
use std::sync::Arc;

use polybus_core::{Error, Kind, Result, Topic, ValidSubscription};
use rdkafka::consumer::{BaseConsumer, Consumer};
use tokio::sync::oneshot;

use super::driver::drive;
use super::pattern::regex;
use super::rebalance::SubContext;
use super::source::KafkaSource;
use super::{RETRY_PREFIX, Shared};
use crate::connection::{Connector, kafka_error};

/// Open a subscription: make its topics, join its group, and return once the
/// group has assigned this member its partitions (C3).
pub(crate) async fn open(connector: Arc<Connector>, sub: ValidSubscription) -> Result<KafkaSource> {
    // Literal topics, the dead-letter store and the retry topic exist before the
    // group joins, so the first assignment already covers them.
    for p in sub.patterns.iter().filter(|p| p.is_literal()) {
        connector.ensure_topic(p.as_str()).await?;
    }
    connector
        .ensure_topic(sub.dead_letter_topic.as_str())
        .await?;
    let retry_topic = sub.durable.then(|| format!("{RETRY_PREFIX}.{}", sub.group));
    if let Some(t) = &retry_topic {
        Topic::new(t).map_err(|e| {
            Error::invalid_input(format!(
                "group `{}` is too long for its retry topic: {e}",
                sub.group
            ))
        })?;
        connector.ensure_topic(t).await?;
    }
    let probe = connector.producer.clone();
    let timeout = connector.options.connect_timeout;
    let metadata = tokio::task::spawn_blocking(move || {
        rdkafka::producer::Producer::client(&probe).fetch_metadata(None, timeout)
    })
    .await
    .map_err(|e| Error::new(Kind::Other, format!("metadata lookup panicked: {e}")))?
    .map_err(|e| kafka_error("cannot list topics".into(), e))?;
    let known: HashSet<String> = metadata
        .topics()
        .iter()
        .map(|t| t.name().to_owned())
        .filter(|t| sub.matches(t))
        .collect();
    let retry_partitions = retry_topic.as_ref().map_or(0, |r| {
        metadata
            .topics()
            .iter()
            .find(|t| t.name() == r)
            .map_or(connector.options.partitions, |t| {
                t.partitions().len() as i32
            })
    });
    // With no topic to join for yet, librdkafka does not join the group until a
    // matching topic appears; such a topic is read from its start, so the
    // subscription is live already.
    let nothing_to_join = known.is_empty() && retry_topic.is_none();
    let mut topics: Vec<String> = sub
        .patterns
        .iter()
        .map(|p| {
            if p.is_literal() {
                p.as_str().to_owned()
            } else {
                regex(p)
            }
        })
        .collect();
    topics.extend(retry_topic.iter().cloned());
    let options = &connector.options;
    let config = Connector::config(
        options,
        &[
            ("group.id", sub.group.clone()),
            ("enable.auto.commit", "false".into()),
            ("enable.auto.offset.store", "false".into()),
            ("auto.offset.reset", "earliest".into()),
            ("allow.auto.create.topics", "false".into()),
            // New topics matching a pattern are found within a second.
            ("topic.metadata.refresh.interval.ms", "1000".into()),
            // Rebalances finish quickly when members heartbeat often.
            ("heartbeat.interval.ms", "500".into()),
            // The assignment strategy stays librdkafka's eager default (range,
            // roundrobin), which splits each topic among the members. The
            // incremental cooperative-sticky strategy balances partition counts
            // across all topics together: tried here, it gave one member every
            // partition of the group's topic and the other only the retry topic.
            //
            // Known librdkafka bug (confluentinc/librdkafka#5573, fixed in 2.16;
            // rdkafka 0.39 bundles 2.12.1): a partition removed, re-added and
            // removed again before its first fetcher stop is acknowledged aborts
            // the process (`rd_kafka_assignment_partition_stopped: Assertion
            // rktp->rktp_started failed`). Seen here only in rebalance storms,
            // when many members of killed test processes expired at once.
            ("session.timeout.ms", "10000".into()),
            ("fetch.wait.max.ms", "100".into()),
        ],
    );
    let shared = Shared::new(connector.clone(), sub, known, retry_partitions);
    let consumer: BaseConsumer<SubContext> = config
        .create_with_context(SubContext {
            shared: shared.clone(),
        })
        .map_err(|e| Error::invalid_input(format!("invalid kafka consumer configuration: {e}")))?;
    let refs: Vec<&str> = topics.iter().map(String::as_str).collect();
    consumer
        .subscribe(&refs)
        .map_err(|e| kafka_error("cannot subscribe".into(), e))?;
    let (done_tx, done_rx) = oneshot::channel();
    let driver_shared = shared.clone();
    std::thread::Builder::new()
        .name(format!("polybus-kafka-{}", shared.sub.group))
        .spawn(move || drive(consumer, driver_shared, done_tx))
        .map_err(|e| {
            Error::new(
                Kind::Other,
                format!("cannot start the consumer thread: {e}"),
            )
        })?;
    let source = KafkaSource {
        shared: shared.clone(),
        done: Some(done_rx),
    };
    let deadline = tokio::time::Instant::now() + options.subscribe_timeout;
    loop {
        let changed = shared.changed.notified();
        tokio::pin!(changed);
        changed.as_mut().enable();
        if nothing_to_join || shared.lock().assigned {
            return Ok(source);
        }
        if tokio::time::timeout_at(deadline, changed).await.is_err() {
            return Err(Error::new(
                Kind::Timeout,
                format!(
                    "group `{}` assigned no partitions within {} ms",
                    shared.sub.group,
                    options.subscribe_timeout.as_millis()
                ),
            ));
        }
    }
}
