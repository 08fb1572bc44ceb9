//! The consumer's configuration, and why each setting.

use rdkafka::config::ClientConfig;

use crate::connection::Connector;
use crate::options::KafkaOptions;

/// The configuration of the consumer of `group`: offsets are stored and
/// committed by the subscription alone, never by librdkafka.
pub(super) fn consumer_config(options: &KafkaOptions, group: &str) -> ClientConfig {
    Connector::config(
        options,
        &[
            ("group.id", group.to_owned()),
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
            // librdkafka's statistics carry its group handler's state (join
            // state, rebalances and why): decoded until the first assignment,
            // so a subscribe that times out says what the member waits for
            // (`open::GroupView`). librdkafka keeps emitting them every second
            // for the consumer's life; polybus ignores them once assigned.
            ("statistics.interval.ms", "1000".into()),
            // See `KafkaOptions::fetch_wait` for the trade-off.
            (
                "fetch.wait.max.ms",
                options.fetch_wait.as_millis().to_string(),
            ),
        ],
    )
}
