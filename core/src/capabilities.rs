//! What a backend offers beyond the contract, and its limits.

use std::collections::BTreeSet;
use std::fmt;

/// What a backend offers beyond the contract. Conformance cases that need one run
/// only where the backend claims it, and are reported as skipped elsewhere.
#[non_exhaustive]
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Capability {
    /// Messages published while no durable group exists can be read later
    /// ([`StartFrom::Earliest`](crate::StartFrom::Earliest)).
    Replay,
    /// Accepted messages and pending retries survive a broker restart.
    SurvivesRestart,
    /// Runs in process under `tokio::time::pause()`, so delays can be tested
    /// without waiting.
    VirtualTime,
    /// Within a group, each message goes to any member with room, so a member at
    /// its prefetch never holds up the others. Kafka lacks it: a partition
    /// belongs to one member at a time, and its messages wait for that member.
    MessageBalancing,
    /// A group can be bounded ([`Subscription::max_depth`](crate::Subscription::max_depth)):
    /// a publish to a full group waits for room or is refused, as its
    /// [`Overflow`](crate::Overflow) says.
    BoundedGroups,
}

impl fmt::Display for Capability {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Capability::Replay => "replay",
            Capability::SurvivesRestart => "survives-restart",
            Capability::VirtualTime => "virtual-time",
            Capability::MessageBalancing => "message-balancing",
            Capability::BoundedGroups => "bounded-groups",
        })
    }
}

/// The capabilities of a backend, and its limits.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Capabilities {
    set: BTreeSet<Capability>,
    max_payload: Option<usize>,
}

impl Capabilities {
    /// No capabilities, no stated payload limit.
    pub fn new() -> Self {
        Self::default()
    }

    /// Add a capability.
    pub fn with(mut self, capability: Capability) -> Self {
        self.set.insert(capability);
        self
    }

    /// State the largest payload the backend accepts.
    pub fn with_max_payload(mut self, bytes: usize) -> Self {
        self.max_payload = Some(bytes);
        self
    }

    /// Whether the backend claims `capability`.
    pub fn has(&self, capability: Capability) -> bool {
        self.set.contains(&capability)
    }

    /// The largest payload accepted, if the backend knows it.
    pub fn max_payload(&self) -> Option<usize> {
        self.max_payload
    }

    /// All claimed capabilities.
    pub fn iter(&self) -> impl Iterator<Item = Capability> + '_ {
        self.set.iter().copied()
    }
}
