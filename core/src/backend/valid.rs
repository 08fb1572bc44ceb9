//! [`ValidSubscription`]: a subscription checked by the core, before any backend
//! sees it (C1 patterns, C2 groups, C6 prefetch, C12 bad input).

use crate::capabilities::{Capabilities, Capability};
use crate::error::{Error, Kind, Result};
use crate::names::{PRIVATE_DEAD_LETTERS, dead_letter_topic, private_group};
use crate::retry::RetryPolicy;
use crate::subscription::{MAX_PREFETCH, Overflow, StartFrom, Subscription, validate_group};
use crate::topic::{Pattern, Topic};

/// A checked [`Subscription`] with its defaults resolved;
/// what [`Backend::subscribe`](crate::backend::Backend::subscribe) receives.
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
    /// The group's bound, if the subscription asked for one: at least 1, and only
    /// where the backend claims [`Capability::BoundedGroups`].
    pub max_depth: Option<usize>,
    /// What a full group does with a publish.
    pub overflow: Overflow,
}

impl ValidSubscription {
    /// Whether `topic` matches any of the patterns.
    pub fn matches(&self, topic: &str) -> bool {
        self.patterns.iter().any(|p| p.matches(topic))
    }
}

/// Check every option of `sub` and resolve the defaults; `private_group` names
/// the group of a subscription that has none.
fn validate(
    sub: &Subscription,
    private_group: impl FnOnce() -> String,
) -> Result<ValidSubscription> {
    if sub.patterns().is_empty() {
        return Err(Error::invalid_input(
            "a subscription needs at least one pattern",
        ));
    }
    let patterns = sub
        .patterns()
        .iter()
        .map(|p| Pattern::new(p))
        .collect::<Result<Vec<_>>>()?;
    let prefetch = sub.prefetch_limit();
    if prefetch == 0 || prefetch > MAX_PREFETCH {
        return Err(Error::invalid_input(format!(
            "invalid prefetch {prefetch}: it must be between 1 and {MAX_PREFETCH}"
        )));
    }
    let max_depth = sub.depth_limit();
    if max_depth == Some(0) {
        return Err(Error::invalid_input(
            "invalid max_depth 0: a bounded group holds at least one message",
        ));
    }
    if max_depth.is_none() && sub.overflow.is_some() {
        return Err(Error::invalid_input(
            "overflow is what a full group does: it needs max_depth, the bound it applies to",
        ));
    }
    let (group, durable) = match sub.group_name() {
        Some(g) => {
            validate_group(g)?;
            (g.to_owned(), true)
        }
        None => (private_group(), false),
    };
    let dead_letter_topic = match (sub.dead_letter_topic_name(), durable) {
        (Some(t), _) => Topic::new(t)?,
        (None, true) => Topic::new(&dead_letter_topic(&group))?,
        (None, false) => Topic::new(&dead_letter_topic(PRIVATE_DEAD_LETTERS))?,
    };
    Ok(ValidSubscription {
        patterns,
        group,
        durable,
        prefetch,
        retry: sub.retry_policy().clone(),
        dead_letter_topic,
        start: sub.start(),
        max_depth,
        overflow: sub.overflow_policy(),
    })
}

/// What [`Bus::subscribe`](crate::Bus::subscribe) checks before the backend is
/// called: every option, the standard private group name
/// (`polybus.private.<uuid>`), and a typed [`Unsupported`](Kind::Unsupported)
/// error for a start the `backend` cannot honour.
pub(crate) fn validate_for(
    sub: &Subscription,
    backend: &str,
    capabilities: &Capabilities,
) -> Result<ValidSubscription> {
    let sub = validate(sub, private_group)?;
    if sub.start == StartFrom::Earliest && !capabilities.has(Capability::Replay) {
        return Err(Error::new(
            Kind::Unsupported,
            format!(
                "the {backend} backend keeps no history before a group exists, so a group \
                 cannot start from the earliest message (capability `replay`)"
            ),
        ));
    }
    if sub.max_depth.is_some() && !capabilities.has(Capability::BoundedGroups) {
        return Err(Error::new(
            Kind::Unsupported,
            format!(
                "the {backend} backend does not bound its groups, so max_depth cannot be \
                 honoured (capability `bounded-groups`)"
            ),
        ));
    }
    Ok(sub)
}

#[cfg(test)]
mod tests {
    use super::*;

    trait Validated {
        fn validated(&self, private: impl FnOnce() -> String) -> Result<ValidSubscription>;
    }

    impl Validated for Subscription {
        fn validated(&self, private: impl FnOnce() -> String) -> Result<ValidSubscription> {
            validate(self, private)
        }
    }

    #[test]
    fn bad_options_are_typed_errors() {
        let v = |s: Subscription| s.validated(|| "p".into()).unwrap_err();
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
            .validated(|| "p".into())
            .unwrap();
        assert!(s.durable);
        assert_eq!(s.dead_letter_topic.as_str(), "polybus.dead-letter.billing");
        let s = Subscription::new("user.*")
            .validated(|| "private-1".into())
            .unwrap();
        assert!(!s.durable);
        assert_eq!(s.group, "private-1");
        assert!(s.matches("user.created") && !s.matches("order.created"));
    }
}
