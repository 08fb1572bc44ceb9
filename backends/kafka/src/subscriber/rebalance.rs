//! The rebalance callback: where assigned partitions start, and what revoked
//! ones leave behind.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use polybus_core::backend::TopicExt;
use polybus_core::{Message, Topic, header};
use rdkafka::ClientContext;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use rdkafka::types::RDKafkaRespErr;

use super::offsets::{self, Prior};
use super::open::GroupView;
use super::partitions::Part;
use super::{REBALANCE_CALL_TIMEOUT, Shared, Tp, millis_from_now};
use crate::mapping;

/// How many times an assignment asks for the group's committed offsets before
/// it gives up and reads from the start. Blocking, in the rebalance callback:
/// at most 3 × `REBALANCE_CALL_TIMEOUT` plus 0.6 s.
const OFFSET_READS: u32 = 3;

/// The consumer's context: routes librdkafka's rebalance callback to [`Shared`].
pub(crate) struct SubContext {
    pub(super) shared: Arc<Shared>,
}

impl ClientContext for SubContext {
    /// librdkafka's statistics, decoded only while the member awaits its first
    /// assignment: what its group handler waits for (`open::GroupView`).
    fn stats_raw(&self, raw: &[u8]) {
        if self.shared.lock().assigned {
            return;
        }
        // Only the group handler's part: the rest of the document (brokers,
        // topics, partitions) is neither decoded nor held to rdkafka's schema.
        #[derive(serde::Deserialize)]
        struct Stats {
            cgrp: Option<rdkafka::statistics::ConsumerGroup>,
        }
        if let Ok(Stats { cgrp: Some(group) }) = serde_json::from_slice(raw) {
            self.shared.lock().group_view = Some(GroupView::from(&group));
        }
    }
}

impl ConsumerContext for SubContext {
    fn rebalance(
        &self,
        consumer: &BaseConsumer<Self>,
        err: RDKafkaRespErr,
        tpl: &mut TopicPartitionList,
    ) {
        match err {
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS => {
                self.shared.assign(consumer, tpl)
            }
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS => {
                self.shared.revoke(consumer, tpl)
            }
            other => {
                tracing::warn!(error = ?other, "rebalance failed; leaving the assignment");
                self.shared.revoke(consumer, tpl);
            }
        }
    }
}

impl Shared {
    /// The rebalance callback's assignment: resolve where each partition starts,
    /// commit the starts the group did not have yet (so a new group's "now" is
    /// kept while no member runs), then assign.
    fn assign(&self, consumer: &BaseConsumer<SubContext>, offered: &TopicPartitionList) {
        let (committed, group_is_new, read) = match self.committed_offsets(consumer, offered) {
            Some(committed) => {
                let new = self.group_is_new(&committed);
                (committed, new, true)
            }
            // Not knowing where a durable group was must not make it new: a new
            // group starts (and commits) at the end, which would skip its backlog
            // for good. Read every partition from its start instead (duplicates,
            // but at least once: C2, C9), and commit nothing, so the offsets
            // that could not be read stay as they were. A private group needs no
            // offsets to know it is new (it has not been assigned before).
            None => {
                let private_and_new = self.retry_topic.is_none() && self.group_is_new(offered);
                (offered.clone(), private_and_new, false)
            }
        };
        let mut starts = self.starts(consumer, offered, &committed, group_is_new);
        if !read && self.retry_topic.is_some() {
            starts.fresh = TopicPartitionList::new();
        }
        take_over(consumer, &starts);
        self.record_assignment(starts.parts);
    }

    /// The group's committed offsets of the `offered` partitions and of the
    /// retry topic's, asked up to [`OFFSET_READS`] times; `None` if every read
    /// failed.
    fn committed_offsets(
        &self,
        consumer: &BaseConsumer<SubContext>,
        offered: &TopicPartitionList,
    ) -> Option<TopicPartitionList> {
        // Ask for the retry topic's offsets too: a durable group commits them at
        // its very first assignment, so their absence means the group is new.
        let mut asked = offered.clone();
        if let Some(t) = &self.retry_topic {
            for p in 0..self.retry_partitions {
                if asked.find_partition(t, p).is_none() {
                    asked.add_partition(t, p);
                }
            }
        }
        for attempt in 1..=OFFSET_READS {
            // A partition answered with an error reads as "none committed", which
            // would make a durable group new: a failed read, too.
            let read = consumer
                .committed_offsets(asked.clone(), REBALANCE_CALL_TIMEOUT)
                .and_then(
                    |c| match c.elements().iter().find_map(|e| e.error().err()) {
                        Some(e) => Err(e),
                        None => Ok(c),
                    },
                );
            match read {
                Ok(c) => return Some(c),
                Err(e) if attempt < OFFSET_READS => {
                    tracing::info!(error = %e, attempt, "reading committed offsets failed; asking again");
                    std::thread::sleep(Duration::from_millis(200) * attempt);
                }
                Err(e) => tracing::warn!(
                    error = %e,
                    group = %self.sub.group,
                    "reading committed offsets failed {OFFSET_READS} times; reading the assigned partitions from their start (messages may come again)"
                ),
            }
        }
        None
    }

    /// Whether the group has never run: a durable group has no committed offset
    /// on its retry topic yet; a private one has not been assigned before.
    fn group_is_new(&self, committed: &TopicPartitionList) -> bool {
        match &self.retry_topic {
            Some(t) => {
                offsets::none_committed(committed.elements_for_topic(t).iter().map(|e| e.offset()))
            }
            None => !self.lock().assigned,
        }
    }

    /// Where each offered partition starts, from `committed`.
    fn starts(
        &self,
        consumer: &BaseConsumer<SubContext>,
        offered: &TopicPartitionList,
        committed: &TopicPartitionList,
        group_is_new: bool,
    ) -> Starts {
        let mut starts = Starts {
            assignment: TopicPartitionList::new(),
            fresh: TopicPartitionList::new(),
            parts: Vec::new(),
        };
        for elem in committed.elements() {
            if offered
                .find_partition(elem.topic(), elem.partition())
                .is_none()
            {
                continue;
            }
            let (topic, partition) = (elem.topic().to_owned(), elem.partition());
            match offsets::resume_at(elem.offset(), elem.metadata()) {
                Some((start, prior)) => starts.add(topic, partition, start, prior),
                None => {
                    let start = self.fresh_start(consumer, &topic, partition, group_is_new);
                    starts.add_fresh(topic, partition, start);
                }
            }
        }
        starts
    }

    /// Where a partition the group has no offset for starts: at one of its
    /// watermarks (see `offsets::reads_from_start`).
    fn fresh_start(
        &self,
        consumer: &BaseConsumer<SubContext>,
        topic: &str,
        partition: i32,
        group_is_new: bool,
    ) -> i64 {
        let watermarks = consumer
            .fetch_watermarks(topic, partition, REBALANCE_CALL_TIMEOUT)
            .ok();
        let from_start =
            offsets::reads_from_start(self.sub.start, group_is_new, topic, &self.known);
        offsets::fresh_start(watermarks, from_start)
    }

    /// Start the bookkeeping of newly assigned partitions, each in a new epoch.
    fn record_assignment(&self, parts: Vec<((String, i32), i64, Option<Prior>)>) {
        let mut state = self.lock();
        for ((topic, partition), start, prior) in parts {
            let tp: Tp = (state.topics.topic(&topic), partition);
            let epoch = state.next_epoch;
            state.next_epoch += 1;
            state.paused.remove(&tp);
            state.parts.insert(
                tp,
                Part {
                    epoch,
                    next: start,
                    unsettled: BTreeMap::new(),
                    prior,
                    committed: (start, String::new()),
                },
            );
        }
        state.assigned = true;
        drop(state);
        self.changed.notify_waiters();
    }

    /// Deliveries still handed out when their partitions go (a rebalance, a
    /// close past its grace, a dropped stream) count as an attempt, as on
    /// RabbitMQ: a durable group copies them to its retry topic with the attempt
    /// raised and commits past them, so a crash loop reaches the dead-letter
    /// topic (C8). Blocking, in the driver thread; bounded by the prefetch.
    fn hand_back(&self, gone: &HashSet<Tp>, lost: bool) {
        let Some(retry_topic) = self.retry_topic.as_deref() else {
            return; // a private group ends with its subscription
        };
        if lost {
            return; // the group has moved on: the new owner reads them again
        }
        let handed: Vec<(Tp, i64, Arc<Message>, Topic, u32)> = {
            let state = self.lock();
            gone.iter()
                .filter_map(|tp| state.parts.get(tp).map(|p| (tp, p)))
                .flat_map(|(tp, part)| {
                    part.unsettled.iter().filter_map(move |(offset, slot)| {
                        let (m, t, a) = slot.handed.as_ref()?;
                        Some((tp.clone(), *offset, m.clone(), t.clone(), *a))
                    })
                })
                .collect()
        };
        if handed.is_empty() {
            return;
        }
        let now = millis_from_now(Duration::ZERO).to_string();
        let sends: Vec<_> = handed
            .iter()
            .map(|(_, _, message, topic, attempt)| {
                let extra = [
                    (header::ATTEMPT, attempt.saturating_add(1).to_string()),
                    (header::TOPIC, topic.as_str().to_owned()),
                    (mapping::DUE_MS, now.clone()),
                ];
                self.connector.send_now(retry_topic, message, &extra)
            })
            .collect();
        let reports = futures::executor::block_on(futures::future::join_all(
            sends.into_iter().map(|s| async move {
                match s {
                    Ok(future) => matches!(future.await, Ok(Ok(_))),
                    Err(_) => false,
                }
            }),
        ));
        let mut state = self.lock();
        for ((tp, offset, ..), moved) in handed.iter().zip(reports) {
            if moved && let Some(part) = state.parts.get_mut(tp) {
                part.unsettled.remove(offset);
            }
        }
    }

    /// The rebalance callback's revocation: commit what is settled (C9), then
    /// forget the partitions, so their deliveries fail to settle.
    fn revoke(&self, consumer: &BaseConsumer<SubContext>, revoked: &TopicPartitionList) {
        let gone: HashSet<Tp> = revoked
            .elements()
            .iter()
            .map(|e| (Topic::from_broker(e.topic()), e.partition()))
            .collect();
        self.hand_back(&gone, consumer.assignment_lost());
        // A periodic commit still in flight must not land after this one.
        self.await_commit();
        let mut state = self.lock();
        let positions = Self::positions(&mut state, Some(&gone));
        for tp in &gone {
            state.parts.remove(tp);
            state.paused.remove(tp);
        }
        state.ready.drop_partitions(&gone);
        state.held.retain(|p| !gone.contains(&p.record.tp));
        drop(state);
        if positions.count() > 0
            && !consumer.assignment_lost()
            && let Err(e) = consumer.commit(&positions, CommitMode::Sync)
        {
            tracing::warn!(error = %e, "committing offsets of revoked partitions failed; they are read again from the last commit");
        }
        let unassigned = if cooperative(consumer) {
            consumer.incremental_unassign(revoked)
        } else {
            consumer.unassign()
        };
        if let Err(e) = unassigned {
            tracing::warn!(error = %e, "unassigning partitions failed");
        }
        self.changed.notify_waiters();
    }
}

fn cooperative(consumer: &BaseConsumer<SubContext>) -> bool {
    matches!(
        consumer.rebalance_protocol(),
        rdkafka::consumer::RebalanceProtocol::Cooperative
    )
}

/// Where an assignment's partitions start.
struct Starts {
    /// Every partition, at its start.
    assignment: TopicPartitionList,
    /// The partitions without a committed offset, at the start chosen for them.
    fresh: TopicPartitionList,
    /// Each partition, its start, and what its last owner recorded.
    parts: Vec<((String, i32), i64, Option<Prior>)>,
}

impl Starts {
    /// Assign `topic`'s `partition` from `start`.
    fn add(&mut self, topic: String, partition: i32, start: i64, prior: Option<Prior>) {
        let _ = self
            .assignment
            .add_partition_offset(&topic, partition, Offset::Offset(start));
        self.parts.push(((topic, partition), start, prior));
    }

    /// Assign `topic`'s `partition` from `start`, a start to commit, too.
    fn add_fresh(&mut self, topic: String, partition: i32, start: i64) {
        let _ = self
            .fresh
            .add_partition_offset(&topic, partition, Offset::Offset(start));
        self.add(topic, partition, start, None);
    }
}

/// Commit the fresh starts, assign, and resume the assigned partitions.
fn take_over(consumer: &BaseConsumer<SubContext>, starts: &Starts) {
    let Starts {
        assignment, fresh, ..
    } = starts;
    if fresh.count() > 0
        && let Err(e) = consumer.commit(fresh, CommitMode::Sync)
    {
        tracing::warn!(error = %e, "committing a new group's starting offsets failed");
    }
    let assigned = if cooperative(consumer) {
        consumer.incremental_assign(assignment)
    } else {
        consumer.assign(assignment)
    };
    if let Err(e) = assigned {
        tracing::warn!(error = %e, "assigning partitions failed");
    }
    // librdkafka keeps a partition's pause across a revocation and a new
    // assignment (librdkafka#1849), but the flow control (`flow.rs`) starts each
    // assigned partition unpaused: resume them, or a partition paused for
    // want of room before a rebalance (a broker restart) stays paused for
    // good. `chores` pauses again if there is still no room.
    if assignment.count() > 0
        && let Err(e) = consumer.resume(assignment)
    {
        tracing::warn!(error = %e, "resuming newly assigned partitions failed");
    }
}
