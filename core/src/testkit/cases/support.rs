//! Helpers shared by the cases.

use crate::Message;

pub(super) fn ids(messages: &[Message]) -> Vec<String> {
    messages.iter().map(|m| m.id().to_owned()).collect()
}

pub(super) fn payloads(messages: &[Message]) -> Vec<String> {
    messages
        .iter()
        .map(|m| String::from_utf8_lossy(m.payload()).into_owned())
        .collect()
}

/// `items` in order, for comparing as a set where the contract promises no order.
pub(super) fn sorted(mut items: Vec<String>) -> Vec<String> {
    items.sort();
    items
}

/// Wait for `consuming` (a sign that a runtime, which subscribes inside its own
/// task, has started to consume) and return its output; fails the case if the
/// runtime `run` ends first. No deadline of its own: subscribing takes as long as
/// the backend needs (on Kafka, a group's partition assignment) and is bounded by
/// the backend's own subscribe time-out, after which `run` ends with the error
/// reported here. A case's patience for what it expects starts after this.
pub(super) async fn until_consuming<R: std::fmt::Debug, T>(
    run: &mut tokio::task::JoinHandle<R>,
    consuming: impl std::future::Future<Output = T>,
) -> T {
    tokio::select! {
        out = consuming => out,
        ended = run => panic!("the runtime ended before it consumed: {ended:?}"),
    }
}
