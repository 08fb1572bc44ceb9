//! Coalesced acks: the settlements of one subscription channel, sent to the
//! broker as few `basic.ack` frames as the delivery tags allow.
//!
//! RabbitMQ numbers the deliveries of a channel 1, 2, 3 … and `basic.ack` with
//! `multiple = true` settles every outstanding tag up to the one named. So a
//! run of acked tags with nothing unsettled before it goes out as one frame;
//! an acked tag behind one still being handled cannot be covered that way
//! (it would settle the unhandled one too) and goes out alone.
//!
//! What `ack` returning `Ok` means here: the ack is recorded on the channel and
//! reaches the broker when the first of these comes (the flush bound):
//! - `batch` acks are waiting (at most half the prefetch, so the broker never
//!   stops delivering for want of them),
//! - the subscription has nothing more to hand out (its stream is polled and
//!   no delivery is buffered) while half its prefetch is held at the broker
//!   (delivered and not settled on the wire): the broker is then close to
//!   stopping for want of acks; below that, sending at once only spends frames
//!   (measured in a sustained stream: about 9 acks a frame instead of 100),
//! - `flush` has passed since the oldest waiting ack,
//! - a requeue of another delivery is sent (acks before it go first, so the
//!   frames keep the order the settlements were made in),
//! - the subscription closes or is dropped.
//!
//! An ack still waiting when the connection is lost never reaches the broker,
//! which then delivers the message again: at-least-once, the same as an ack
//! frame lost on the wire. With `ack_batch=1` every ack is sent when made.
//!
//! Frames are queued on the connection under this module's lock, by lapin's
//! `Channel` calls, whose first poll queues the frame: the order they are queued
//! in is the order the broker sees.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use futures::FutureExt;
use lapin::Channel;
use lapin::options::{BasicAckOptions, BasicNackOptions};
use tokio::sync::Notify;

/// Where a delivery tag above the settled frontier stands.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Tag {
    /// Delivered, not settled yet.
    Open,
    /// Acked by the caller, the frame not sent.
    Acked,
    /// Its frame is sent (an ack on its own, or a requeue), or the tag was never
    /// ours: a later `multiple` ack may pass over it.
    Sent,
}

/// The tags of one channel.
#[derive(Debug, Default)]
struct Tags {
    /// Every tag up to this one is settled on the wire.
    frontier: u64,
    /// Tags `frontier + 1 ..`, in order.
    above: VecDeque<Tag>,
    /// How many of `above` are `Acked`.
    waiting: usize,
    /// How many of `above` are `Open` or `Acked`: unsettled as the broker sees it.
    held: usize,
}

/// A frame the coalescer decided to send.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Frame {
    Ack { tag: u64, multiple: bool },
}

impl Tags {
    fn delivered(&mut self, tag: u64) {
        // Tags of a channel are consecutive; should one be skipped, it is not
        // ours to settle, and must not hold up those after it.
        while self.frontier + (self.above.len() as u64) + 1 < tag {
            self.above.push_back(Tag::Sent);
        }
        if tag > self.frontier + self.above.len() as u64 {
            self.above.push_back(Tag::Open);
            self.held += 1;
        }
    }

    fn slot(&mut self, tag: u64) -> Option<&mut Tag> {
        let index = tag.checked_sub(self.frontier + 1)?;
        self.above.get_mut(usize::try_from(index).ok()?)
    }

    /// Record an ack; false if the tag is not an open delivery of this channel.
    fn ack(&mut self, tag: u64) -> bool {
        match self.slot(tag) {
            Some(t @ Tag::Open) => {
                *t = Tag::Acked;
                self.waiting += 1;
                true
            }
            _ => false,
        }
    }

    /// Mark `tag` as sent by someone else (a requeue); false if it was not open.
    fn sent(&mut self, tag: u64) -> bool {
        match self.slot(tag) {
            Some(t @ Tag::Open) => {
                *t = Tag::Sent;
                self.held -= 1;
                true
            }
            _ => false,
        }
    }

    /// The frames that send every waiting ack: one `multiple` ack for the run
    /// at the front (up to its last acked tag), one ack for each acked tag
    /// behind an open one.
    fn flush(&mut self, out: &mut Vec<Frame>) {
        if self.waiting > 0 {
            let run = self
                .above
                .iter()
                .position(|t| *t == Tag::Open)
                .unwrap_or(self.above.len());
            let acked_in_run = self.above.iter().take(run).filter(|t| **t == Tag::Acked);
            let count = acked_in_run.clone().count();
            if let Some(last) = self.above.iter().take(run).rposition(|t| *t == Tag::Acked) {
                out.push(Frame::Ack {
                    tag: self.frontier + 1 + last as u64,
                    multiple: count > 1,
                });
            }
            for (i, t) in self.above.iter_mut().enumerate() {
                if *t == Tag::Acked {
                    if i > run {
                        out.push(Frame::Ack {
                            tag: self.frontier + 1 + i as u64,
                            multiple: false,
                        });
                    }
                    *t = Tag::Sent;
                }
            }
            self.held -= self.waiting;
            self.waiting = 0;
        }
        while self.above.front() == Some(&Tag::Sent) {
            self.above.pop_front();
            self.frontier += 1;
        }
    }
}

/// The coalescer of one subscription channel.
pub(crate) struct AckBatch {
    channel: Channel,
    tags: Mutex<Tags>,
    /// `Tags::waiting`, readable without the lock (the stream checks it on
    /// every quiet poll).
    waiting: AtomicUsize,
    /// Flush when this many acks wait.
    batch: usize,
    /// A quiet stream flushes when this many deliveries are held at the broker.
    quiet_flush: usize,
    /// Wakes the timer when the first ack starts waiting.
    timer: Notify,
}

impl AckBatch {
    /// The coalescer of `channel`, flushing at `batch` waiting acks (at most
    /// half of `prefetch`) or `flush` after the first, whichever comes first.
    pub(crate) fn new(channel: Channel, batch: usize, prefetch: u32, flush: Duration) -> Arc<Self> {
        let batch = batch.min((prefetch as usize).div_ceil(2)).max(1);
        let acks = Arc::new(AckBatch {
            channel,
            tags: Mutex::new(Tags::default()),
            waiting: AtomicUsize::new(0),
            batch,
            quiet_flush: (prefetch as usize).div_ceil(2),
            timer: Notify::new(),
        });
        if batch > 1 {
            tokio::spawn(timer(Arc::downgrade(&acks), flush));
        }
        acks
    }

    /// Whether the channel is open, so its deliveries can still be settled.
    pub(crate) fn usable(&self) -> bool {
        self.channel.status().connected()
    }

    /// Note a delivery, in the order the channel delivered them.
    pub(crate) fn delivered(&self, tag: u64) {
        self.lock().delivered(tag);
    }

    /// Record the ack of `tag`, sending it now if the batch is full. False if
    /// the channel is gone (the broker delivers the message again).
    pub(crate) fn ack(&self, tag: u64) -> bool {
        if !self.usable() {
            return false;
        }
        let mut frames = Vec::new();
        {
            let mut tags = self.lock();
            if !tags.ack(tag) {
                return false;
            }
            if tags.waiting >= self.batch {
                tags.flush(&mut frames);
                self.send(&frames);
            }
            self.waiting.store(tags.waiting, Ordering::Release);
            if tags.waiting == 1 {
                self.timer.notify_one();
            }
        }
        true
    }

    /// Hand `tag` back to the broker to deliver again, after sending the acks
    /// made before it.
    pub(crate) fn requeue(&self, tag: u64) {
        let mut frames = Vec::new();
        let mut tags = self.lock();
        tags.flush(&mut frames);
        self.send(&frames);
        if tags.sent(tag) {
            let requeue = BasicNackOptions {
                multiple: false,
                requeue: true,
            };
            queued(self.channel.basic_nack(tag, requeue).now_or_never());
        }
        frames.clear();
        tags.flush(&mut frames);
        debug_assert!(frames.is_empty());
        self.waiting.store(0, Ordering::Release);
    }

    /// Send every waiting ack now.
    pub(crate) fn flush(&self) {
        self.flush_if(0);
    }

    /// The stream has nothing more to hand out: send the waiting acks if the
    /// broker holds half the prefetch unsettled (see the module's docs).
    pub(crate) fn quiet(&self) {
        self.flush_if(self.quiet_flush);
    }

    fn flush_if(&self, held: usize) {
        if self.waiting.load(Ordering::Acquire) == 0 {
            return;
        }
        let mut frames = Vec::new();
        let mut tags = self.lock();
        if tags.held < held {
            return;
        }
        tags.flush(&mut frames);
        self.send(&frames);
        self.waiting.store(0, Ordering::Release);
    }

    /// Queue `frames` on the connection, in order; called under the lock.
    fn send(&self, frames: &[Frame]) {
        for frame in frames {
            match *frame {
                Frame::Ack { tag, multiple } => queued(
                    self.channel
                        .basic_ack(tag, BasicAckOptions { multiple })
                        .now_or_never(),
                ),
            }
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Tags> {
        // A panic under this lock leaves the tags as they were before the call.
        self.tags.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// lapin queues the frame on the call's first poll and then waits for it to be
/// written; only a channel already closed fails at once, and then the broker
/// delivers the message again.
fn queued(first_poll: Option<lapin::Result<()>>) {
    if let Some(Err(e)) = first_poll {
        tracing::debug!(error = %e, "amqp settlement not sent; the broker redelivers");
    }
}

/// Flush `flush` after an ack starts waiting, for as long as the coalescer lives.
async fn timer(acks: Weak<AckBatch>, flush: Duration) {
    // Woken now and then while idle, to notice that the coalescer is gone.
    const IDLE: Duration = Duration::from_secs(5);
    while let Some(strong) = acks.upgrade() {
        if !strong.usable() {
            return;
        }
        let woken = tokio::time::timeout(IDLE, strong.timer.notified())
            .await
            .is_ok();
        drop(strong);
        if woken {
            tokio::time::sleep(flush).await;
            if let Some(strong) = acks.upgrade() {
                strong.flush();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frames(tags: &mut Tags) -> Vec<Frame> {
        let mut out = Vec::new();
        tags.flush(&mut out);
        out
    }

    fn ack(tag: u64, multiple: bool) -> Frame {
        Frame::Ack { tag, multiple }
    }

    #[test]
    fn a_run_of_contiguous_acks_is_one_multiple_frame() {
        let mut tags = Tags::default();
        (1..=50).for_each(|t| tags.delivered(t));
        (1..=50).for_each(|t| assert!(tags.ack(t)));
        assert_eq!(tags.held, 50);
        assert_eq!(frames(&mut tags), [ack(50, true)]);
        assert_eq!((tags.frontier, tags.held), (50, 0));
        assert!(tags.above.is_empty());
        assert!(frames(&mut tags).is_empty());
    }

    #[test]
    fn an_ack_behind_an_open_tag_goes_alone_and_never_covers_it() {
        let mut tags = Tags::default();
        (1..=6).for_each(|t| tags.delivered(t));
        for t in [4, 6, 2, 1] {
            assert!(tags.ack(t));
        }
        assert_eq!(
            frames(&mut tags),
            [ack(2, true), ack(4, false), ack(6, false)]
        );
        assert_eq!((tags.frontier, tags.held), (2, 2));
        // 3 and 5 are still open: a later run passes over 4 and 6, already sent.
        assert!(tags.ack(5));
        assert!(tags.ack(3));
        assert_eq!(frames(&mut tags), [ack(5, true)]);
        assert_eq!(tags.frontier, 6);
    }

    #[test]
    fn a_single_ack_is_not_multiple_and_twice_is_refused() {
        let mut tags = Tags::default();
        tags.delivered(1);
        tags.delivered(2);
        assert!(tags.ack(2));
        assert!(!tags.ack(2));
        assert!(!tags.ack(7));
        assert_eq!(frames(&mut tags), [ack(2, false)]);
        assert!(tags.ack(1));
        assert_eq!(frames(&mut tags), [ack(1, false)]);
        assert!(!tags.ack(1));
        assert_eq!(tags.frontier, 2);
    }

    #[test]
    fn a_requeued_tag_is_passed_over_not_acked() {
        let mut tags = Tags::default();
        (1..=4).for_each(|t| tags.delivered(t));
        assert!(tags.ack(1));
        assert!(tags.sent(2));
        assert!(tags.ack(3));
        assert!(tags.ack(4));
        // 2 was requeued, so it is not outstanding: a multiple ack of 4 covers 1, 3 and 4.
        assert_eq!(frames(&mut tags), [ack(4, true)]);
        assert_eq!((tags.frontier, tags.held), (4, 0));
    }

    #[test]
    fn skipped_tags_do_not_hold_up_the_run() {
        let mut tags = Tags::default();
        tags.delivered(1);
        tags.delivered(4);
        assert!(tags.ack(1));
        assert!(tags.ack(4));
        assert_eq!(frames(&mut tags), [ack(4, true)]);
        assert_eq!(tags.frontier, 4);
    }
}
