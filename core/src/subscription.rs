//! [`Subscription`]: what to receive, in which group, how many at a time, and what
//! happens to failures.

use std::time::Duration;

use crate::error::{Error, Result};
use crate::names::{DEAD_LETTER_PREFIX, RESERVED_WORD};
use crate::retry::RetryPolicy;
use crate::topic::MAX_TOPIC_LEN;

/// The longest group name accepted.
pub const MAX_GROUP_LEN: usize = 200;
/// The largest prefetch accepted (AMQP's `basic.qos` carries a u16).
pub const MAX_PREFETCH: u32 = 65_535;

/// Where a new group starts reading.
#[non_exhaustive]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum StartFrom {
    /// Only messages published after the group was created (C3).
    #[default]
    Latest,
    /// Everything the broker still holds. Needs [`Capability::Replay`](crate::Capability::Replay).
    Earliest,
}

/// What a group at its [`max_depth`](Subscription::max_depth) does with a new
/// publish: the two overflow behaviours of a bounded RabbitMQ queue that lose
/// nothing (`drop-head`, which discards the oldest, is not offered).
#[non_exhaustive]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Overflow {
    /// The publisher waits for room (flow control), up to the backend's publish
    /// timeout; past it the publish fails with a [`Timeout`](crate::Kind::Timeout)
    /// error that hands the message back.
    #[default]
    Block,
    /// The publish fails at once with a [`Refused`](crate::Kind::Refused) error
    /// that hands the message back, as RabbitMQ's `x-overflow: reject-publish`.
    RejectPublish,
}

/// Options of a subscription, built with named setters.
///
/// ```
/// use std::time::Duration;
/// use polybus_core::{RetryPolicy, Subscription};
///
/// let sub = Subscription::new("user.*")
///     .pattern("account.deleted")
///     .group("billing")
///     .prefetch(32)
///     .retry(RetryPolicy::exponential(Duration::from_millis(100)).max_attempts(5));
/// assert_eq!(sub.group_name(), Some("billing"));
/// ```
///
/// Nothing is checked until [`subscribe`](crate::Subscriber::subscribe), which
/// rejects invalid patterns, group names and prefetch with a typed error before any
/// I/O.
#[derive(Debug, Clone)]
pub struct Subscription {
    patterns: Vec<String>,
    group: Option<String>,
    prefetch: u32,
    retry: RetryPolicy,
    dead_letter_topic: Option<String>,
    start: StartFrom,
    max_depth: Option<usize>,
    pub(crate) overflow: Option<Overflow>,
}

impl Subscription {
    /// The default prefetch.
    pub const DEFAULT_PREFETCH: u32 = 64;

    /// A subscription to `pattern` (C1 syntax), in a private group, prefetch 64,
    /// the default retry policy.
    pub fn new(pattern: impl Into<String>) -> Self {
        Subscription {
            patterns: vec![pattern.into()],
            group: None,
            prefetch: Self::DEFAULT_PREFETCH,
            retry: RetryPolicy::default(),
            dead_letter_topic: None,
            start: StartFrom::Latest,
            max_depth: None,
            overflow: None,
        }
    }

    /// A subscription to the dead letters of `group`: its dead-letter topic, read by
    /// a durable group of the same name, which keeps dead letters from the moment
    /// `group` first subscribed, while nobody reads. Dead letters of private
    /// subscriptions are under [`PRIVATE_DEAD_LETTERS`](crate::names::PRIVATE_DEAD_LETTERS).
    pub fn dead_letters_of(group: &str) -> Self {
        let topic = crate::names::dead_letter_topic(group);
        Subscription::new(topic.clone()).group(topic)
    }

    /// Also receive topics matching `pattern`.
    pub fn pattern(mut self, pattern: impl Into<String>) -> Self {
        self.patterns.push(pattern.into());
        self
    }

    /// Join `group`: a durable group whose members compete for its messages (C2).
    pub fn group(mut self, group: impl Into<String>) -> Self {
        self.group = Some(group.into());
        self
    }

    /// Hold at most `n` unsettled deliveries (C6).
    pub fn prefetch(mut self, n: u32) -> Self {
        self.prefetch = n;
        self
    }

    /// How nacked deliveries are retried, and when they are dead-lettered (C7, C8).
    pub fn retry(mut self, policy: RetryPolicy) -> Self {
        self.retry = policy;
        self
    }

    /// Dead-letter to `topic` instead of `polybus.dead-letter.<group>`.
    pub fn dead_letter_topic(mut self, topic: impl Into<String>) -> Self {
        self.dead_letter_topic = Some(topic.into());
        self
    }

    /// Where a new group starts reading.
    pub fn start_from(mut self, start: StartFrom) -> Self {
        self.start = start;
        self
    }

    /// Bound the group: it holds at most `messages` ready messages (delivered but
    /// unsettled ones and pending retries are not counted, as RabbitMQ's
    /// `x-max-length`). A publish to a full group waits or is refused, as
    /// [`overflow`](Self::overflow) says. Declared with the group: a later
    /// subscription that asks for another bound is refused. Needs
    /// [`Capability::BoundedGroups`](crate::Capability::BoundedGroups).
    pub fn max_depth(mut self, messages: usize) -> Self {
        self.max_depth = Some(messages);
        self
    }

    /// What a full group does with a publish; see [`Overflow`]. It applies to
    /// the bound [`max_depth`](Self::max_depth) sets, which it needs.
    pub fn overflow(mut self, overflow: Overflow) -> Self {
        self.overflow = Some(overflow);
        self
    }

    /// The bound asked for, if any.
    pub fn depth_limit(&self) -> Option<usize> {
        self.max_depth
    }

    /// The overflow behaviour asked for.
    pub fn overflow_policy(&self) -> Overflow {
        self.overflow.unwrap_or_default()
    }

    /// The patterns as given.
    pub fn patterns(&self) -> &[String] {
        &self.patterns
    }

    /// The group, if named.
    pub fn group_name(&self) -> Option<&str> {
        self.group.as_deref()
    }

    /// The prefetch.
    pub fn prefetch_limit(&self) -> u32 {
        self.prefetch
    }

    /// The retry policy.
    pub fn retry_policy(&self) -> &RetryPolicy {
        &self.retry
    }

    /// Where a new group starts.
    pub fn start(&self) -> StartFrom {
        self.start
    }

    pub(crate) fn dead_letter_topic_name(&self) -> Option<&str> {
        self.dead_letter_topic.as_deref()
    }
}

/// Check a group name: 1 to 200 bytes of letters, digits, `.`, `_` and `-`, so it
/// is a valid AMQP queue name, Kafka group id and topic word sequence everywhere.
/// Names starting with `polybus` are the library's, except the dead-letter groups
/// (`polybus.dead-letter.…`, up to the topic length limit) that readers join.
pub fn validate_group(group: &str) -> Result<()> {
    let dead_letters = group
        .strip_prefix(DEAD_LETTER_PREFIX)
        .is_some_and(|rest| rest.starts_with('.'));
    let limit = if dead_letters {
        MAX_TOPIC_LEN
    } else {
        MAX_GROUP_LEN
    };
    if group.is_empty() || group.len() > limit {
        return Err(Error::invalid_input(format!(
            "invalid group `{group}`: it must be 1 to {limit} bytes"
        )));
    }
    if group.starts_with(RESERVED_WORD) && !dead_letters {
        return Err(Error::invalid_input(format!(
            "invalid group `{group}`: names starting with `polybus` are the library's"
        )));
    }
    if let Some(c) = group
        .bytes()
        .find(|b| !(b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-')))
    {
        return Err(Error::invalid_input(format!(
            "invalid group `{group}`: `{}` is not allowed; use letters, digits, `.`, `_` and `-`",
            c.escape_ascii()
        )));
    }
    if group.starts_with('.') || group.ends_with('.') || group.contains("..") {
        return Err(Error::invalid_input(format!(
            "invalid group `{group}`: dots separate words, so no leading, trailing or double dots"
        )));
    }
    Ok(())
}

/// Default grace period for [`DeliveryStream::close`](crate::DeliveryStream::close).
pub const DEFAULT_CLOSE_GRACE: Duration = Duration::from_secs(30);
