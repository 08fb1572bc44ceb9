//! [`Subscription`]: what to receive, in which group, how many at a time, and what
//! happens to failures.

use std::time::Duration;

use crate::error::{Error, Result};
use crate::retry::RetryPolicy;
use crate::topic::{Pattern, Topic};

/// The longest group name accepted.
pub const MAX_GROUP_LEN: usize = 200;
/// The largest prefetch accepted (AMQP's `basic.qos` carries a u16).
pub const MAX_PREFETCH: u32 = 65_535;
/// The prefix of every group's default dead-letter topic.
pub const DEAD_LETTER_PREFIX: &str = "polybus.dead-letter";
/// The name under which private subscriptions (those without a group) keep their
/// dead letters, together: read them with `Subscription::dead_letters_of(PRIVATE_DEAD_LETTERS)`.
pub const PRIVATE_DEAD_LETTERS: &str = "polybus-private";

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
        }
    }

    /// A subscription to the dead letters of `group`: its dead-letter topic, read by
    /// a durable group of the same name, which keeps dead letters from the moment
    /// `group` first subscribed, while nobody reads. Dead letters of private
    /// subscriptions are under [`PRIVATE_DEAD_LETTERS`].
    pub fn dead_letters_of(group: &str) -> Self {
        let topic = format!("{DEAD_LETTER_PREFIX}.{group}");
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

    /// Check every option and resolve the defaults. Backends call this first in
    /// `subscribe`, so bad input fails the same way everywhere, before any I/O.
    /// `private_group` names the group of a subscription that has none.
    pub fn validate(&self, private_group: impl FnOnce() -> String) -> Result<ValidSubscription> {
        if self.patterns.is_empty() {
            return Err(Error::invalid_input(
                "a subscription needs at least one pattern",
            ));
        }
        let patterns = self
            .patterns
            .iter()
            .map(|p| Pattern::new(p))
            .collect::<Result<Vec<_>>>()?;
        if self.prefetch == 0 || self.prefetch > MAX_PREFETCH {
            return Err(Error::invalid_input(format!(
                "invalid prefetch {}: it must be between 1 and {MAX_PREFETCH}",
                self.prefetch
            )));
        }
        let (group, durable) = match &self.group {
            Some(g) => {
                validate_group(g)?;
                (g.clone(), true)
            }
            None => (private_group(), false),
        };
        let dead_letter_topic = match (&self.dead_letter_topic, durable) {
            (Some(t), _) => Topic::new(t)?,
            (None, true) => Topic::new(&format!("{DEAD_LETTER_PREFIX}.{group}"))?,
            (None, false) => Topic::new(&format!("{DEAD_LETTER_PREFIX}.{PRIVATE_DEAD_LETTERS}"))?,
        };
        Ok(ValidSubscription {
            patterns,
            group,
            durable,
            prefetch: self.prefetch,
            retry: self.retry.clone(),
            dead_letter_topic,
            start: self.start,
        })
    }
}

impl Subscription {
    /// What backends call first in `subscribe`: [`validate`](Self::validate) with
    /// the standard private group name (`polybus.private.<uuid>`), and a typed
    /// [`Unsupported`](crate::Kind::Unsupported) error for a start the backend
    /// cannot honour, named after `backend`.
    pub fn validate_for(
        &self,
        backend: &str,
        capabilities: &crate::Capabilities,
    ) -> Result<ValidSubscription> {
        let sub = self.validate(|| format!("polybus.private.{}", uuid::Uuid::now_v7().simple()))?;
        if sub.start == StartFrom::Earliest && !capabilities.has(crate::Capability::Replay) {
            return Err(Error::new(
                crate::Kind::Unsupported,
                format!(
                    "the {backend} backend keeps no history before a group exists, so a group \
                     cannot start from the earliest message (capability `replay`)"
                ),
            ));
        }
        Ok(sub)
    }
}

/// Check a group name: 1 to 200 bytes of letters, digits, `.`, `_` and `-`, so it
/// is a valid AMQP queue name, Kafka group id and topic word sequence everywhere.
/// Names starting with `polybus` are the library's, except the dead-letter groups
/// (`polybus.dead-letter.…`, up to the topic length limit) that readers join.
pub fn validate_group(group: &str) -> Result<()> {
    let dead_letters = group.starts_with(&format!("{DEAD_LETTER_PREFIX}."));
    let limit = if dead_letters {
        crate::topic::MAX_TOPIC_LEN
    } else {
        MAX_GROUP_LEN
    };
    if group.is_empty() || group.len() > limit {
        return Err(Error::invalid_input(format!(
            "invalid group `{group}`: it must be 1 to {limit} bytes"
        )));
    }
    if group.starts_with(crate::topic::RESERVED_WORD) && !dead_letters {
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

/// A checked [`Subscription`] with its defaults resolved; what backends work from.
#[derive(Debug, Clone)]
pub struct ValidSubscription {
    /// The patterns, parsed.
    pub patterns: Vec<Pattern>,
    /// The group: the caller's, or a private one.
    pub group: String,
    /// Whether the group outlives its members (named groups do).
    pub durable: bool,
    /// The most unsettled deliveries at once.
    pub prefetch: u32,
    /// The retry policy.
    pub retry: RetryPolicy,
    /// Where dead letters go.
    pub dead_letter_topic: Topic,
    /// Where a new group starts.
    pub start: StartFrom,
}

impl ValidSubscription {
    /// Whether `topic` matches any of the patterns.
    pub fn matches(&self, topic: &str) -> bool {
        self.patterns.iter().any(|p| p.matches(topic))
    }
}

/// Default grace period for [`DeliveryStream::close`](crate::DeliveryStream::close).
pub const DEFAULT_CLOSE_GRACE: Duration = Duration::from_secs(30);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_options_are_typed_errors() {
        let v = |s: Subscription| s.validate(|| "p".into()).unwrap_err();
        assert!(v(Subscription::new("a..b")).is_invalid_input());
        assert!(
            v(Subscription::new("a").prefetch(0))
                .to_string()
                .contains("prefetch 0")
        );
        assert!(v(Subscription::new("a").prefetch(70_000)).is_invalid_input());
        assert!(
            v(Subscription::new("a").group("has space"))
                .to_string()
                .contains("`has space`")
        );
        assert!(v(Subscription::new("a").group("")).is_invalid_input());
        assert!(v(Subscription::new("a").group("a..b")).is_invalid_input());
        assert!(v(Subscription::new("a").dead_letter_topic("x.*")).is_invalid_input());
        assert!(v(Subscription::new("a").group("polybus-private")).is_invalid_input());
        assert!(v(Subscription::new("a").group("polybus.x")).is_invalid_input());
    }

    #[test]
    fn defaults_resolve() {
        let s = Subscription::new("user.*")
            .group("billing")
            .validate(|| "p".into())
            .unwrap();
        assert!(s.durable);
        assert_eq!(s.dead_letter_topic.as_str(), "polybus.dead-letter.billing");
        let s = Subscription::new("user.*")
            .validate(|| "private-1".into())
            .unwrap();
        assert!(!s.durable);
        assert_eq!(s.group, "private-1");
        assert!(s.matches("user.created") && !s.matches("order.created"));
    }
}
