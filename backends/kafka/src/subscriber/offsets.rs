//! The offset arithmetic of a partition, as pure functions: where a newly
//! assigned partition starts, what a commit records, and as which attempt a
//! record the last owner handed out comes back.
//!
//! Only the lowest unsettled offset of a partition is committed (C9), so an
//! out-of-order ack skips nothing. When the record at that offset was handed
//! out, the commit's metadata says so (see [`Prior`]), and the next owner of
//! the partition counts the hand-out as an attempt (C8).

use std::collections::HashSet;

use polybus_core::{StartFrom, Topic};
use rdkafka::topic_partition_list::Offset;

/// The version of the commit metadata format below.
const METADATA_TAG: &str = "polybus1";

/// What an owner of a partition recorded in a commit: the record at `head`
/// (the committed offset) was handed out as attempt `attempt`, and records up
/// to `through` were handed out too.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Prior {
    pub(super) head: i64,
    pub(super) attempt: u32,
    pub(super) through: i64,
}

impl Prior {
    pub(super) fn encode(&self) -> String {
        format!(
            "{METADATA_TAG}:{}:{}:{}",
            self.head, self.attempt, self.through
        )
    }

    pub(super) fn decode(metadata: &str, committed: i64) -> Option<Prior> {
        let mut it = metadata
            .strip_prefix(METADATA_TAG)?
            .strip_prefix(':')?
            .split(':');
        let head = it.next()?.parse().ok()?;
        let attempt = it.next()?.parse().ok()?;
        let through = it.next()?.parse().ok()?;
        // Exactly this version's three fields: a longer or other tag is not ours.
        (head == committed && it.next().is_none()).then_some(Prior {
            head,
            attempt,
            through,
        })
    }
}

/// The offset the group committed, if it committed one (librdkafka reports
/// "none" as `Invalid`).
pub(super) fn committed_offset(offset: Offset) -> Option<i64> {
    match offset {
        Offset::Offset(o) if o >= 0 => Some(o),
        _ => None,
    }
}

/// Whether none of `offsets` was committed: for a durable group's retry
/// topic, whose offsets the group commits at its very first assignment, this
/// means the group is new.
pub(super) fn none_committed(offsets: impl IntoIterator<Item = Offset>) -> bool {
    !offsets.into_iter().any(|o| committed_offset(o).is_some())
}

/// Where a partition with a committed offset resumes: at that offset, with
/// what the last owner recorded there, if the metadata is ours and about that
/// offset. `None` without a committed offset. The watermarks play no part: an
/// offset past the end is left to librdkafka's reset policy.
pub(super) fn resume_at(committed: Offset, metadata: &str) -> Option<(i64, Option<Prior>)> {
    committed_offset(committed).map(|o| (o, Prior::decode(metadata, o)))
}

/// Whether a partition the group has no offset for is read from its start
/// rather than its end.
pub(super) fn reads_from_start(
    start: StartFrom,
    group_is_new: bool,
    topic: &str,
    known: &HashSet<String>,
) -> bool {
    // A new group starts at the end of what it found ("now", C3);
    // a partition an older group has never read appeared after
    // the group began, so all of it is news to the group.
    start == StartFrom::Earliest
        || Topic::is_reserved(topic)
        || !group_is_new
        || !known.contains(topic)
}

/// Where a partition the group has no offset for starts: its low watermark,
/// or its high one (its end) unless `from_start`. Watermarks that could not be
/// read (`None`) count as those of an empty partition at 0.
pub(super) fn fresh_start(watermarks: Option<(i64, i64)>, from_start: bool) -> i64 {
    let (low, high) = watermarks.unwrap_or((0, 0));
    if from_start { low } else { high }
}

/// Where the group resumes a partition, and the metadata to commit with it:
/// the lowest unsettled offset, or `next` (past everything received) when
/// nothing is unsettled. `unsettled` gives each unsettled offset, lowest first,
/// with the attempt it was handed out as (0 while buffered). If the head was
/// handed out, the metadata records it as a [`Prior`], `through` being the
/// highest handed-out offset.
pub(super) fn commit_position(
    next: i64,
    mut unsettled: impl DoubleEndedIterator<Item = (i64, u32)>,
) -> (i64, String) {
    match unsettled.next() {
        Some((head, attempt)) if attempt > 0 => {
            let through = unsettled
                .rev()
                .find(|(_, a)| *a > 0)
                .map_or(head, |(o, _)| o);
            let prior = Prior {
                head,
                attempt,
                through,
            };
            (head, prior.encode())
        }
        Some((head, _)) => (head, String::new()),
        None => (next, String::new()),
    }
}

/// The attempt a received record at `offset` is delivered as, and whether it
/// is a redelivery, given the `attempt` its headers say and what the last
/// owner of its partition recorded: the head counts one more than it was
/// handed out as, the later records it handed out one more than their header.
pub(super) fn counted_attempt(prior: Option<Prior>, offset: i64, attempt: u32) -> (u32, bool) {
    let redelivered = attempt > 1;
    match prior {
        Some(prior) if offset == prior.head => (attempt.max(prior.attempt.saturating_add(1)), true),
        Some(prior) if offset <= prior.through => (attempt.saturating_add(1), true),
        _ => (attempt, redelivered),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commit_metadata_round_trips() {
        let p = Prior {
            head: 7,
            attempt: 2,
            through: 9,
        };
        assert_eq!(Prior::decode(&p.encode(), 7), Some(p));
        assert_eq!(Prior::decode(&p.encode(), 8), None, "stale: another offset");
        assert_eq!(Prior::decode("", 7), None);
        assert_eq!(Prior::decode("something else", 7), None);
    }

    #[test]
    fn attempts_never_overflow() {
        let prior = Prior {
            head: 7,
            attempt: u32::MAX,
            through: 7,
        };
        assert_eq!(counted_attempt(Some(prior), 7, 3).0, u32::MAX);
        let later = Prior { head: 5, ..prior };
        assert_eq!(counted_attempt(Some(later), 7, u32::MAX).0, u32::MAX);
    }

    #[test]
    fn commit_metadata_that_does_not_parse_is_ignored() {
        for metadata in [
            "polybus1",
            "polybus1:7",
            "polybus1:7:2",
            "polybus1:7:x:9",
            "polybus1:7:-1:9",
            "polybus1:seven:2:9",
            "polybus1:7:2:",
            "polybus0:7:2:9",
            // Another version's tag, or more fields than this version writes.
            "polybus10:7:2:9",
            "polybus1x:7:2:9",
            "polybus1:7:2:9:1",
            "7:2:9",
        ] {
            assert_eq!(Prior::decode(metadata, 7), None, "{metadata:?}");
            assert_eq!(resume_at(Offset::Offset(7), metadata), Some((7, None)));
        }
    }

    #[test]
    fn a_committed_offset_is_where_the_partition_resumes() {
        let meta = Prior {
            head: 4,
            attempt: 1,
            through: 6,
        };
        assert_eq!(
            resume_at(Offset::Offset(4), &meta.encode()),
            Some((4, Some(meta)))
        );
        assert_eq!(resume_at(Offset::Offset(0), ""), Some((0, None)));
        // Committed beyond the high watermark (say, of a recreated topic): kept
        // as it is; the watermarks are not consulted.
        assert_eq!(
            resume_at(Offset::Offset(1_000_000), ""),
            Some((1_000_000, None))
        );
        // Metadata about another offset is stale.
        assert_eq!(
            resume_at(Offset::Offset(5), &meta.encode()),
            Some((5, None))
        );
    }

    #[test]
    fn no_committed_offset_means_a_fresh_start() {
        for none in [
            Offset::Invalid,
            Offset::Beginning,
            Offset::End,
            Offset::Stored,
            Offset::Offset(-1),
            Offset::OffsetTail(3),
        ] {
            assert_eq!(committed_offset(none), None, "{none:?}");
            assert_eq!(resume_at(none, "polybus1:0:1:0"), None, "{none:?}");
        }
        assert_eq!(committed_offset(Offset::Offset(0)), Some(0));
    }

    #[test]
    fn a_group_is_new_while_its_retry_topic_has_no_committed_offset() {
        assert!(none_committed([]));
        assert!(none_committed([Offset::Invalid, Offset::Invalid]));
        assert!(!none_committed([Offset::Invalid, Offset::Offset(0)]));
        assert!(!none_committed([Offset::Offset(12)]));
    }

    #[test]
    fn only_a_new_group_on_a_topic_it_knew_starts_at_the_end() {
        let known: HashSet<String> = ["orders".to_owned()].into();
        let from_start = |start, new, topic| reads_from_start(start, new, topic, &known);
        assert!(!from_start(StartFrom::Latest, true, "orders"), "now (C3)");
        assert!(from_start(StartFrom::Earliest, true, "orders"));
        assert!(
            from_start(StartFrom::Latest, false, "orders"),
            "an older group: the partition is new to it"
        );
        assert!(
            from_start(StartFrom::Latest, true, "invoices"),
            "a topic created after subscribing"
        );
        assert!(
            from_start(StartFrom::Latest, true, "polybus.retry.g"),
            "the reserved namespace is always read whole"
        );
    }

    #[test]
    fn a_fresh_start_is_a_watermark() {
        assert_eq!(fresh_start(Some((3, 10)), true), 3);
        assert_eq!(fresh_start(Some((3, 10)), false), 10);
        // An empty partition: both watermarks agree.
        assert_eq!(fresh_start(Some((5, 5)), true), 5);
        assert_eq!(fresh_start(Some((5, 5)), false), 5);
        assert_eq!(fresh_start(Some((0, 0)), false), 0);
        // Watermarks that could not be read.
        assert_eq!(fresh_start(None, true), 0);
        assert_eq!(fresh_start(None, false), 0);
    }

    fn position(next: i64, unsettled: &[(i64, u32)]) -> (i64, String) {
        commit_position(next, unsettled.iter().copied())
    }

    #[test]
    fn with_nothing_unsettled_the_position_is_past_everything_received() {
        assert_eq!(position(0, &[]), (0, String::new()));
        // Contiguous acks of 10, 11 and 12 leave nothing unsettled.
        assert_eq!(position(13, &[]), (13, String::new()));
    }

    #[test]
    fn the_lowest_unsettled_offset_is_committed() {
        // Buffered only: nothing was handed out, so no metadata.
        assert_eq!(position(13, &[(10, 0), (11, 0)]), (10, String::new()));
        // 10 to 12 handed out, 11 acked out of order: 10 is still the position.
        assert_eq!(
            position(13, &[(10, 1), (12, 1)]),
            (10, "polybus1:10:1:12".to_owned())
        );
        // 10 acked out of order: the position moves to 11 only.
        assert_eq!(
            position(13, &[(11, 1), (12, 1)]),
            (11, "polybus1:11:1:12".to_owned())
        );
    }

    #[test]
    fn the_metadata_names_the_head_attempt_and_the_last_handed_out_offset() {
        // The head's attempt is recorded, whatever the others were handed out as.
        assert_eq!(
            position(20, &[(10, 3), (11, 1), (12, 2)]),
            (10, "polybus1:10:3:12".to_owned())
        );
        // Buffered records after the last handed-out one are not covered.
        assert_eq!(
            position(20, &[(10, 1), (11, 1), (12, 0), (13, 0)]),
            (10, "polybus1:10:1:11".to_owned())
        );
        assert_eq!(
            position(20, &[(10, 2), (11, 0)]),
            (10, "polybus1:10:2:10".to_owned())
        );
        // A buffered head: no metadata, even if later records were handed out.
        assert_eq!(position(20, &[(10, 0), (11, 1)]), (10, String::new()));
    }

    #[test]
    fn records_the_last_owner_handed_out_count_an_attempt() {
        let prior = Some(Prior {
            head: 10,
            attempt: 2,
            through: 12,
        });
        // The head: one more than it was handed out as, or its header if higher.
        assert_eq!(counted_attempt(prior, 10, 1), (3, true));
        assert_eq!(counted_attempt(prior, 10, 5), (5, true));
        // Later handed-out records: one more than their header says.
        assert_eq!(counted_attempt(prior, 11, 1), (2, true));
        assert_eq!(counted_attempt(prior, 12, 2), (3, true));
        // Past `through`: as the header says.
        assert_eq!(counted_attempt(prior, 13, 1), (1, false));
        assert_eq!(counted_attempt(prior, 13, 2), (2, true));
        // No prior: as the header says.
        assert_eq!(counted_attempt(None, 10, 1), (1, false));
        assert_eq!(counted_attempt(None, 10, 4), (4, true));
    }

    #[test]
    fn a_crash_after_an_out_of_order_ack_counts_on_the_next_owner() {
        // Handed out 10 and 11 as first attempts, 12 buffered; 11 acked; crash.
        let (at, metadata) = position(13, &[(10, 1), (12, 0)]);
        assert_eq!(at, 10);
        let (start, prior) = resume_at(Offset::Offset(at), &metadata).unwrap();
        assert_eq!(start, 10);
        assert_eq!(counted_attempt(prior, 10, 1), (2, true));
        // 11 was settled, though never committed past: it comes back, as a
        // first attempt, for `through` covers only unsettled hand-outs.
        assert_eq!(counted_attempt(prior, 11, 1), (1, false));
        assert_eq!(counted_attempt(prior, 12, 1), (1, false));
    }
}
