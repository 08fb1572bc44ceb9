//! The subscribe path: make the topics, join the group, wait for the first
//! assignment.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use polybus_core::backend::{ValidSubscription, wait_until};
use polybus_core::names::retry_store;
use polybus_core::{Error, Kind, Result, Topic};
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use tokio::sync::oneshot;

use super::Shared;
use super::config::consumer_config;
use super::driver::drive;
use super::pattern::regex;
use super::rebalance::SubContext;
use super::source::KafkaSource;
use crate::connection::{Connector, config_error, kafka_error};

/// Open a subscription: make its topics, join its group, and return once the
/// group has assigned this member its partitions (C3).
pub(crate) async fn open(connector: Arc<Connector>, sub: ValidSubscription) -> Result<KafkaSource> {
    let retry_topic = make_topics(&connector, &sub).await?;
    let (known, retry_partitions) = survey(&connector, &sub, retry_topic.as_deref()).await?;
    // With no topic to join for yet, librdkafka does not join the group until a
    // matching topic appears; such a topic is read from its start, so the
    // subscription is live already.
    let nothing_to_join = known.is_empty() && retry_topic.is_none();
    let topics = subscribed_topics(&sub, retry_topic);
    let config = consumer_config(&connector.options, &sub.group);
    let subscribe_timeout = connector.options.subscribe_timeout;
    let shared = Shared::new(connector, sub, known, retry_partitions);
    let consumer = join(&config, &shared, &topics)?;
    let done = start_driver(consumer, &shared)?;
    // Made before the wait: dropped on a time-out, it stops the driver.
    let source = KafkaSource {
        shared: shared.clone(),
        done: Some(done),
    };
    if !nothing_to_join {
        await_assignment(&shared, subscribe_timeout).await?;
    }
    Ok(source)
}

/// Make the topics the subscription needs; returns the group's retry topic
/// (durable groups).
async fn make_topics(connector: &Connector, sub: &ValidSubscription) -> Result<Option<String>> {
    // Literal topics, the dead-letter store and the retry topic exist before the
    // group joins, so the first assignment already covers them.
    for p in sub.patterns.iter().filter(|p| p.is_literal()) {
        connector.ensure_topic(p.as_str()).await?;
    }
    connector
        .ensure_topic(sub.dead_letter_topic.as_str())
        .await?;
    let retry_topic = sub.durable.then(|| retry_store(&sub.group));
    if let Some(t) = &retry_topic {
        Topic::new(t).map_err(|e| {
            Error::invalid_input(format!(
                "group `{}` is too long for its retry topic: {e}",
                sub.group
            ))
        })?;
        connector.ensure_topic(t).await?;
    }
    Ok(retry_topic)
}

/// The cluster's topics as the subscription finds them: those it matches now
/// (see `Shared::known`), and how many partitions the retry topic has.
async fn survey(
    connector: &Connector,
    sub: &ValidSubscription,
    retry_topic: Option<&str>,
) -> Result<(HashSet<String>, i32)> {
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
    let retry_partitions = retry_topic.map_or(0, |r| {
        metadata
            .topics()
            .iter()
            .find(|t| t.name() == r)
            .map_or(connector.options.partitions, |t| {
                t.partitions().len() as i32
            })
    });
    Ok((known, retry_partitions))
}

/// What the consumer subscribes to: literal patterns by name, the others as
/// regexes, and the retry topic.
fn subscribed_topics(sub: &ValidSubscription, retry_topic: Option<String>) -> Vec<String> {
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
    topics.extend(retry_topic);
    topics
}

/// Make the consumer, its rebalances routed to `shared`, and subscribe it.
fn join(
    config: &ClientConfig,
    shared: &Arc<Shared>,
    topics: &[String],
) -> Result<BaseConsumer<SubContext>> {
    let consumer: BaseConsumer<SubContext> = config
        .create_with_context(SubContext {
            shared: shared.clone(),
        })
        .map_err(|e| config_error(e, &shared.connector.options))?;
    let refs: Vec<&str> = topics.iter().map(String::as_str).collect();
    consumer
        .subscribe(&refs)
        .map_err(|e| kafka_error("cannot subscribe".into(), e))?;
    Ok(consumer)
}

/// Start the driver thread; the receiver hears when it has left the group.
fn start_driver(
    consumer: BaseConsumer<SubContext>,
    shared: &Arc<Shared>,
) -> Result<oneshot::Receiver<()>> {
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
    Ok(done_rx)
}

/// Wait until the group has assigned this member its partitions, at most
/// `timeout`; past it, the error says what the group coordinator reports.
async fn await_assignment(shared: &Shared, timeout: Duration) -> Result<()> {
    let deadline = polybus_core::retry::deadline_after(timeout);
    if wait_until(&shared.changed, Some(deadline), || shared.lock().assigned).await {
        return Ok(());
    }
    let group = &shared.sub.group;
    let member = match &shared.lock().group_view {
        Some(view) => view.to_string(),
        None => "this member's client has reported no group state yet".to_owned(),
    };
    let reported = describe_group(&shared.connector, group).await;
    Err(Error::new(
        Kind::Timeout,
        format!(
            "group `{group}` assigned no partitions within {} ms; {member}; the coordinator reports {reported}",
            timeout.as_millis()
        ),
    ))
}

/// What librdkafka's group handler of a member waiting for its first
/// assignment last reported (its statistics' `cgrp`), in words.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct GroupView {
    /// The coordinator connection's state (`up` once it is known).
    state: String,
    join_state: String,
    rebalances: i64,
    reason: String,
}

impl From<&rdkafka::statistics::ConsumerGroup> for GroupView {
    fn from(g: &rdkafka::statistics::ConsumerGroup) -> Self {
        GroupView {
            state: g.state.clone(),
            join_state: g.join_state.clone(),
            rebalances: g.rebalance_cnt,
            reason: g.rebalance_reason.clone(),
        }
    }
}

impl std::fmt::Display for GroupView {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let waits = if self.state != "up" {
            "waits for the group's coordinator"
        } else {
            match self.join_state.as_str() {
                "init" => "has not asked to join yet",
                "wait-join" => {
                    "waits for the coordinator to answer its JoinGroup (the group is rebalancing)"
                }
                "wait-metadata" => "waits for the metadata of the topics it joins for",
                "wait-sync" => "waits for its share from the group's leader (SyncGroup)",
                "steady" => "is in the group and was given no partitions",
                "wait-assign-call" => "is taking up an assignment",
                _ => "is giving up partitions (a rebalance)",
            }
        };
        write!(
            f,
            "this member {waits} (librdkafka: coordinator `{}`, join state `{}`, {} rebalance(s)",
            self.state, self.join_state, self.rebalances
        )?;
        if !self.reason.is_empty() {
            write!(f, ", the last: {}", self.reason)?;
        }
        write!(f, ")")
    }
}

/// What the group coordinator says of `group` (DescribeGroups), for an error:
/// a rebalance that never completes shows here as a group stuck in
/// `PreparingRebalance` or `CompletingRebalance`.
async fn describe_group(connector: &Connector, group: &str) -> String {
    let client = connector.producer.clone();
    let (name, timeout) = (group.to_owned(), connector.options.connect_timeout);
    let described = tokio::task::spawn_blocking(move || match rdkafka::producer::Producer::client(
        &client,
    )
    .fetch_group_list(Some(&name), timeout)
    {
        Ok(list) => match list.groups().first() {
            Some(g) => format!(
                "it in state {} with {} member(s), protocol `{}`: its rebalance has not completed",
                g.state(),
                g.members().len(),
                g.protocol()
            ),
            None => "no such group".to_owned(),
        },
        Err(e) => format!("nothing (describing the group failed: {e})"),
    })
    .await;
    described.unwrap_or_else(|e| format!("nothing (describing the group panicked: {e})"))
}

#[cfg(test)]
mod tests {
    use super::GroupView;

    fn view(state: &str, join_state: &str, reason: &str) -> String {
        GroupView {
            state: state.into(),
            join_state: join_state.into(),
            rebalances: 3,
            reason: reason.into(),
        }
        .to_string()
    }

    #[test]
    fn a_waiting_member_says_what_it_waits_for() {
        assert_eq!(
            view("up", "wait-sync", "group rebalanced (memberid x)"),
            "this member waits for its share from the group's leader (SyncGroup) \
             (librdkafka: coordinator `up`, join state `wait-sync`, 3 rebalance(s), \
             the last: group rebalanced (memberid x))"
        );
        assert!(
            view("wait-coord", "init", "")
                .starts_with("this member waits for the group's coordinator")
        );
        assert!(view("up", "wait-join", "").contains("the group is rebalancing"));
    }
}
