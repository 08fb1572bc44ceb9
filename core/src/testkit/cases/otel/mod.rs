//! The cases of **telemetry** (feature `otel`): spans, trace context and
//! metrics as the OpenTelemetry messaging semantic conventions name them, the
//! same on every backend. They record with the SDK's in-memory exporters
//! ([`crate::testkit::otel`]); where polybus-core is built without feature
//! `otel-testkit` each case is reported skipped, by name.

use crate::testkit::{CaseResult, Ctx};

#[cfg(not(feature = "otel-testkit"))]
fn off(ctx: Ctx) -> CaseResult {
    drop(ctx);
    Err(crate::testkit::CaseError::Skip(
        "polybus-core built without feature `otel-testkit`".into(),
    ))
}

/// A case that needs the SDK: its body with the feature, a skip without.
macro_rules! otel_case {
    ($(#[$doc:meta])* $name:ident, $module:ident::$body:ident) => {
        $(#[$doc])*
        pub async fn $name(ctx: Ctx) -> CaseResult {
            #[cfg(feature = "otel-testkit")]
            return $module::$body(ctx).await;
            #[cfg(not(feature = "otel-testkit"))]
            return off(ctx);
        }
    };
}

otel_case!(
    /// One message's `send`, `process` and `ack` spans form one trace: the
    /// process span is the send span's child and links to it, the ack span is
    /// the process span's child; names, kinds and attributes as the conventions
    /// list them; the message carries `traceparent`.
    otel_send_process_ack_are_one_trace,
    traces::send_process_ack_are_one_trace
);

otel_case!(
    /// A batch publish is one `send` span with `messaging.batch.message_count`;
    /// each message of a batch taken with `next_batch` gets a root `process`
    /// span linked to it.
    otel_a_batch_is_one_send_span_and_its_deliveries_link_to_it,
    traces::batch_links
);

otel_case!(
    /// A redelivered message keeps its creation context: the retry's `process`
    /// span (attempt 2) links to the original `send` span; the `nack` span and
    /// the failed first `process` span say so.
    otel_a_redelivery_keeps_the_creation_context,
    traces::redelivery_keeps_context
);

otel_case!(
    /// A dead letter carries its creation context: its `process` span in the
    /// dead-letter group belongs to the original trace; the `dead_letter` span
    /// carries the reason.
    otel_a_dead_letter_carries_the_creation_context,
    traces::dead_letter_keeps_context
);

otel_case!(
    /// A settlement that fails has its `error.type` on the settlement span and
    /// in the operation-duration metric.
    otel_a_failed_settlement_has_its_error_type,
    metrics::failed_settlement
);

otel_case!(
    /// The metrics count every message once, with the conventions' names, units
    /// and attributes: sent, consumed, operation and process durations,
    /// redeliveries, dead letters, deliveries in flight back to zero.
    otel_metrics_count_each_message_once,
    metrics::metrics_count_once
);

otel_case!(
    /// `polybus.group.depth` reports what waits for a group while it waits
    /// (memory and RabbitMQ: the group's queue; Kafka: each partition's lag
    /// behind the committed offset), and falls to zero once all is acked;
    /// deliveries fetched ahead have no `process` span until handed out.
    otel_group_depth_follows_what_waits,
    metrics::group_depth
);

#[cfg(feature = "otel-testkit")]
mod metrics;
#[cfg(feature = "otel-testkit")]
mod traces;
