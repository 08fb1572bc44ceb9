//! A member's delivery stream and the acker of each of its deliveries.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use polybus_core::backend::{
    DeadLetter, DeliveryExt, DeliverySource, Depth, DepthProbe, MessageExt, SettleFuture,
    Settlement, TaggedAcker, exhausted_dead_letter, wait_until,
};
use polybus_core::{Delivery, Error, Result, RetryPolicy, Topic, async_trait};
use tokio::sync::Notify;
use tokio::time::Sleep;

use crate::broker::Broker;
use crate::group::{Entry, Fetch, Group, Inflight, Slot};

/// What a member's stream and all its deliveries share.
pub(crate) struct Member {
    pub(crate) broker: Arc<Broker>,
    pub(crate) group: Arc<Group>,
    pub(crate) slot: Arc<Slot>,
    pub(crate) retry: RetryPolicy,
    pub(crate) dead_letter_topic: Topic,
    /// Signalled on each settlement while the member is closing.
    pub(crate) settled: Notify,
}

impl Member {
    fn dead_letter(&self, inflight: &Inflight, why: &DeadLetter) {
        let message = inflight.message.dead_lettered(
            inflight.topic.as_str(),
            inflight.attempt,
            why,
            self.group.name(),
        );
        self.store_dead_letter(inflight.message.id(), message);
    }

    /// Dead-letter an entry whose consumers died holding it until its attempts ran out.
    fn dead_letter_exhausted(&self, entry: &Entry) {
        let message = exhausted_dead_letter(
            &entry.message,
            entry.topic.as_str(),
            entry.attempt,
            self.group.name(),
        );
        self.store_dead_letter(entry.message.id(), message);
    }

    fn store_dead_letter(&self, message_id: &str, message: polybus_core::Message) {
        tracing::debug!(
            group = self.group.name(),
            message_id,
            reason = message.header(polybus_core::header::DEAD_LETTER_REASON),
            "dead-lettering"
        );
        let store = self.dead_letter_topic.as_str();
        self.broker
            .dead_letter(store, message, self.dead_letter_topic.clone());
    }

    fn settle(&self, tag: u64, settlement: Settlement) -> Result<()> {
        let settled = self.group.settle(&self.slot, tag, settlement)?;
        if let Some((entry, why)) = settled.dead_letter {
            self.dead_letter(&entry, &why);
        }
        if settled.member_closing {
            self.settled.notify_waiters();
        }
        Ok(())
    }
}

pub(crate) struct MemorySource {
    member: Arc<Member>,
    sleep: Option<Pin<Box<Sleep>>>,
    /// Entries a fetch found past their last attempt, to dead-letter; kept to
    /// reuse its allocation.
    exhausted: Vec<Entry>,
    left: bool,
}

impl MemorySource {
    pub(crate) fn new(member: Arc<Member>) -> Self {
        MemorySource {
            member,
            sleep: None,
            exhausted: Vec::new(),
            left: false,
        }
    }

    fn leave(&mut self) {
        if !self.left {
            self.left = true;
            let m = &self.member;
            let left = m.group.leave(&m.slot);
            for entry in &left.exhausted {
                m.dead_letter_exhausted(entry);
            }
            if left.delete_group {
                m.broker.delete_group(&m.group);
            }
        }
    }
}

#[async_trait]
impl DeliverySource for MemorySource {
    fn poll_next(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Delivery>>> {
        let m = &self.member;
        loop {
            let fetched = m.group.fetch(&m.slot, cx.waker(), &mut self.exhausted);
            for entry in self.exhausted.drain(..) {
                m.dead_letter_exhausted(&entry);
            }
            match fetched {
                Fetch::Delivered(tag, inflight) => {
                    return Poll::Ready(Some(Ok(Delivery::tagged(
                        inflight.message,
                        inflight.topic,
                        inflight.attempt,
                        inflight.redelivered,
                        m.clone(),
                        tag,
                    ))));
                }
                Fetch::Again => {}
                Fetch::Closed => return Poll::Ready(None),
                Fetch::Pending(None) => return Poll::Pending,
                Fetch::Pending(Some(due)) => {
                    let sleep = match &mut self.sleep {
                        Some(s) => {
                            if s.deadline() != due {
                                s.as_mut().reset(due);
                            }
                            s
                        }
                        None => self.sleep.insert(Box::pin(tokio::time::sleep_until(due))),
                    };
                    if sleep.as_mut().poll(cx).is_pending() {
                        return Poll::Pending;
                    }
                    // Due now: loop to promote it.
                }
            }
        }
    }

    async fn close(&mut self, grace: Duration) -> Result<()> {
        let m = self.member.clone();
        m.group.set_closing(&m.slot);
        m.group.give_back(&m.slot);
        // A grace of Duration::MAX means "as long as it takes".
        let deadline = polybus_core::retry::deadline_after(grace);
        if !wait_until(&m.settled, Some(deadline), || {
            m.group.unsettled(&m.slot) == 0
        })
        .await
        {
            tracing::info!(
                group = m.group.name(),
                unsettled = m.group.unsettled(&m.slot),
                "close deadline passed; unsettled deliveries go back for redelivery"
            );
        }
        self.leave();
        Ok(())
    }

    /// The group's waiting messages: ready, and held back for a retry delay.
    fn depth_probe(&self) -> Option<DepthProbe> {
        let group = Arc::downgrade(&self.member.group);
        Some(Arc::new(move || match group.upgrade() {
            Some(group) => {
                let (ready, delayed, _) = group.depth();
                vec![Depth::group((ready + delayed) as u64)]
            }
            None => Vec::new(),
        }))
    }
}

impl Drop for MemorySource {
    fn drop(&mut self) {
        self.leave();
    }
}

// The member settles every delivery it handed out, by tag: a delivery carries
// a clone of the member's `Arc`, not an acker of its own.
impl TaggedAcker for Member {
    fn retry_policy(&self) -> &RetryPolicy {
        &self.retry
    }

    fn settle(&self, tag: u64, settlement: Settlement) -> SettleFuture {
        SettleFuture::ready(Member::settle(self, tag, settlement))
    }

    fn settle_on_drop(&self, tag: u64, settlement: Settlement) {
        // Already handed back if the member left; nothing to do then.
        let _: Result<(), Error> = Member::settle(self, tag, settlement);
    }
}
