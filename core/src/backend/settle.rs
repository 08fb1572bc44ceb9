//! Settlement as backends see it: [`Settlement`], [`Acker`], and the one place
//! that decides when attempts are used up (C7, C8).

use std::sync::Arc;
use std::time::Duration;

use crate::backend::future::BackendFuture;
use crate::error::Result;
use crate::message::Message;
use crate::retry::RetryPolicy;

/// How a delivery is settled. Backends receive this from
/// [`Delivery`](crate::Delivery); the decision between redelivery and
/// dead-lettering after a `nack` is made once, here in the core, from the
/// subscription's [`RetryPolicy`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Settlement {
    /// Done: never delivered to this group again.
    Ack,
    /// Deliver again, with `attempt + 1`, after `delay`.
    Retry {
        /// How long the broker holds the message back first.
        delay: Duration,
    },
    /// Move to the group's dead-letter topic, for the reason given.
    DeadLetter(DeadLetter),
    /// Deliver again after `delay` as the same attempt: a scheduled message
    /// (C14) that reached the group before its time waits out the rest in the
    /// group's retry store. The core settles with this before the delivery is
    /// handed out; it is no nack, and no attempt is used.
    Defer {
        /// How long the broker holds the message back.
        delay: Duration,
    },
}

/// Why a message is dead-lettered: what its dead letter's headers say.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct DeadLetter {
    /// Carried in `polybus-dead-letter-reason`: the caller's reason, or
    /// `gave up after N attempts: <last error>` when the attempts ran out.
    pub reason: String,
    /// Carried in `polybus-last-error`: the error of the last attempt, when the
    /// attempts ran out after failures with a known error.
    pub last_error: Option<String>,
}

impl DeadLetter {
    /// Dead-lettered for `reason`.
    pub fn because(reason: impl Into<String>) -> Self {
        DeadLetter {
            reason: reason.into(),
            last_error: None,
        }
    }
}

/// What [`Acker::settle`] returns.
pub type SettleFuture = BackendFuture<'static, Result<()>>;

/// The backend's half of a delivery: it carries out the settlement.
pub trait Acker: Send + Sync + 'static {
    /// The retry policy of the subscription the delivery came from.
    fn retry_policy(&self) -> &RetryPolicy;

    /// Settle, and report whether the broker took the settlement. A delivery whose
    /// channel or subscription is gone returns a [`Closed`](crate::Kind::Closed) error;
    /// the broker redelivers it. A backend that settles without waiting answers
    /// with [`SettleFuture::ready`]; the settlement may then be done before the
    /// future is polled.
    fn settle(self: Box<Self>, settlement: Settlement) -> SettleFuture;

    /// Settle from `Drop`: must not block. A backend that needs I/O spawns it
    /// with [`spawn_settlement`].
    fn settle_on_drop(self: Box<Self>, settlement: Settlement);
}

/// The backend's half of many deliveries at once, each named by a tag: for a
/// backend that keeps its deliveries in flight in one place (the in-memory
/// broker's member), so a delivery costs no allocation of its own. Built with
/// [`DeliveryExt::tagged`](crate::backend::DeliveryExt::tagged); the same
/// rules as [`Acker`] apply to each tag.
pub trait TaggedAcker: Send + Sync + 'static {
    /// The retry policy of the subscription the deliveries came from.
    fn retry_policy(&self) -> &RetryPolicy;

    /// Settle delivery `tag`; see [`Acker::settle`].
    fn settle(&self, tag: u64, settlement: Settlement) -> SettleFuture;

    /// Settle delivery `tag` from `Drop`; see [`Acker::settle_on_drop`].
    fn settle_on_drop(&self, tag: u64, settlement: Settlement);
}

/// How a delivery reaches its settler: its own [`Acker`], or a tag of a shared
/// [`TaggedAcker`].
pub(crate) enum AckerRef {
    Boxed(Box<dyn Acker>),
    Tagged(Arc<dyn TaggedAcker>, u64),
}

impl AckerRef {
    pub(crate) fn retry_policy(&self) -> &RetryPolicy {
        match self {
            AckerRef::Boxed(a) => a.retry_policy(),
            AckerRef::Tagged(a, _) => a.retry_policy(),
        }
    }

    pub(crate) fn settle(self, settlement: Settlement) -> SettleFuture {
        match self {
            AckerRef::Boxed(a) => a.settle(settlement),
            AckerRef::Tagged(a, tag) => a.settle(tag, settlement),
        }
    }

    pub(crate) fn settle_on_drop(self, settlement: Settlement) {
        match self {
            AckerRef::Boxed(a) => a.settle_on_drop(settlement),
            AckerRef::Tagged(a, tag) => a.settle_on_drop(tag, settlement),
        }
    }

    /// As one [`Acker`], for a wrapper that needs one (this allocates).
    pub(crate) fn into_boxed(self) -> Box<dyn Acker> {
        match self {
            AckerRef::Boxed(a) => a,
            AckerRef::Tagged(acker, tag) => Box::new(OneTag { acker, tag }),
        }
    }
}

/// One tag of a [`TaggedAcker`] as an [`Acker`].
struct OneTag {
    acker: Arc<dyn TaggedAcker>,
    tag: u64,
}

impl Acker for OneTag {
    fn retry_policy(&self) -> &RetryPolicy {
        self.acker.retry_policy()
    }

    fn settle(self: Box<Self>, settlement: Settlement) -> SettleFuture {
        self.acker.settle(self.tag, settlement)
    }

    fn settle_on_drop(self: Box<Self>, settlement: Settlement) {
        self.acker.settle_on_drop(self.tag, settlement)
    }
}

/// What a `nack` of the `attempt`-th delivery amounts to under `policy`.
pub(crate) fn nack_settlement(policy: &RetryPolicy, attempt: u32) -> Settlement {
    if policy.is_exhausted(attempt) {
        Settlement::DeadLetter(DeadLetter::because(gave_up(attempt)))
    } else {
        Settlement::Retry {
            delay: policy.delay_after(attempt),
        }
    }
}

/// The dead-letter reason of a message whose `attempts` deliveries all failed.
fn gave_up(attempts: u32) -> String {
    format!("gave up after {attempts} attempts")
}

/// Whether a message about to be handed out for its `attempt`-th time has used
/// up `policy` already: its earlier deliveries died unsettled (crashes, closes
/// past their grace). Such a message is dead-lettered on receipt with
/// [`exhausted_dead_letter`], never handed out (C8).
pub fn is_exhausted_on_receipt(policy: &RetryPolicy, attempt: u32) -> bool {
    attempt > policy.attempts()
}

/// The dead letter of a message received for its `attempt`-th time after its
/// attempts ran out (see [`is_exhausted_on_receipt`]): `attempt - 1`
/// deliveries were made, and the reason says so.
pub fn exhausted_dead_letter(message: &Message, topic: &str, attempt: u32, group: &str) -> Message {
    let attempts = attempt.saturating_sub(1);
    message.dead_letter_copy(topic, attempts, (&gave_up(attempts), None), group)
}

/// Carry out a settlement from `Drop` (see [`Acker::settle_on_drop`]): spawned
/// on `runtime`, the runtime the subscription was opened on, captured in
/// `subscribe` with `Handle::current()`. One policy for every backend: a delivery
/// dropped outside any runtime (a plain thread) is still settled, and a failure
/// is logged, since nobody is left to be told. Once that runtime has shut down
/// nothing runs: the broker redelivers the message when the connection ends.
pub fn spawn_settlement(
    runtime: &tokio::runtime::Handle,
    settle: impl std::future::Future<Output = Result<()>> + Send + 'static,
) {
    runtime.spawn(async move {
        if let Err(e) = settle.await {
            tracing::debug!(error = %e, "settling a dropped delivery failed; the broker redelivers it");
        }
    });
}
