//! OpenTelemetry (feature `otel`): spans, trace context carried in every
//! message, and metrics, per the OpenTelemetry messaging semantic conventions.
//!
//! polybus uses the OpenTelemetry API only. The application installs an SDK
//! and its exporters, and sets the global tracer provider, meter provider and
//! text-map propagator **before** it connects: a [`Bus`](crate::Bus) takes its
//! tracer and meter when it is made, and asks the tracer then whether it makes
//! spans of its own; if it does not (no SDK), the bus builds no span and
//! touches no header. With the feature off no OpenTelemetry code is compiled.
//!
//! The instrumentation sits in the core, where the contract's checks run, so
//! every backend (ours or a third party's) gets the same spans and metrics; a
//! backend only says where its broker is ([`Backend::endpoint`]) and what each
//! delivery's wire position is ([`DeliveryExt::with_wire`]).
//!
//! # Spans
//!
//! | span | kind | from – to | parent | links |
//! |---|---|---|---|---|
//! | `send {destination}` | producer | a publish or a batch publish, to the broker's answer | the caller's current context | creation contexts the messages already carried |
//! | `process {destination}` | consumer | a delivery handed out (by the stream or to a handler), to its settlement | the message's creation context, for the first delivery of a message handed out alone; none otherwise | the creation context |
//! | `ack` / `nack` / `dead_letter {destination}` | client | one settlement, to the broker's answer | the `process` span | – |
//!
//! A message published without a trace context gets the `send` span's: the
//! propagator (W3C `traceparent` / `tracestate` with the SDK's
//! `TraceContextPropagator`) writes it into the message's headers, where every
//! redelivery and dead letter keeps it, and where other OpenTelemetry clients
//! find it. A message that already carries one (a forwarded message) keeps it,
//! and the `send` span links to it. Prefetched deliveries get no span until
//! they are handed out. Retries (attempt 2 and later) and deliveries taken with
//! [`next_batch`](crate::DeliveryStream::next_batch) get a root `process` span
//! linked to the creation context, as the conventions advise: their processing
//! is not a direct consequence of the send alone. The handler runtime runs each
//! handler inside its delivery's `process` span; elsewhere,
//! [`Delivery::otel_context`](crate::Delivery::otel_context) is the parent for
//! the caller's own spans.
//!
//! # Attributes
//!
//! | attribute | on | value |
//! |---|---|---|
//! | `messaging.system` | all | `rabbitmq`, `kafka`, `polybus_memory` |
//! | `messaging.operation.name` | all | `send`, `process`, `ack`, `nack`, `dead_letter` |
//! | `messaging.operation.type` | all | `send`, `process`, `settle` |
//! | `messaging.destination.name` | all | the topic; on RabbitMQ `{exchange}:{topic}` (the topic is the routing key) |
//! | `messaging.consumer.group.name` | process, settle | the group (a private subscription's generated group) |
//! | `messaging.message.id` | send (single), process | the message id |
//! | `messaging.message.conversation_id` | send (single), process | the request-reply `correlation-id` header |
//! | `messaging.message.body.size` | send (single), process | payload bytes |
//! | `messaging.batch.message_count` | send (batch) | messages in the batch |
//! | `messaging.destination.partition.id`, `messaging.kafka.offset`, `messaging.kafka.message.key` | process (Kafka) | where the record is |
//! | `messaging.rabbitmq.destination.routing_key`, `messaging.rabbitmq.message.delivery_tag` | send, process (RabbitMQ) | the topic; the channel's delivery tag |
//! | `server.address`, `server.port` | all | the broker's host and port from the URL |
//! | `error.type` | failed operations | the error's [`Kind`] in snake case (`connection`, `timeout`, …); on `process`: `nack`, `dead_letter`, `dropped` (the delivery was dropped unsettled) or `cancelled` (the settlement's future was dropped before the broker answered, as on a send or settlement span) |
//! | `polybus.attempt` | process | which delivery of the message to its group, from 1 |
//! | `polybus.dead_letter.reason` | dead_letter | the reason given |
//!
//! # Metrics
//!
//! | metric | instrument | unit | counts |
//! |---|---|---|---|
//! | `messaging.client.sent.messages` | counter | `{message}` | messages the broker answered for, with `error.type` if it refused |
//! | `messaging.client.consumed.messages` | counter | `{message}` | deliveries handed out |
//! | `messaging.client.operation.duration` | histogram | `s` | each send (single or batch) and settlement |
//! | `messaging.process.duration` | histogram | `s` | from hand-out to settlement |
//! | `polybus.redeliveries` | counter | `{message}` | deliveries handed out again (attempt 2 and later) |
//! | `polybus.dead_letters` | counter | `{message}` | dead letters the broker took |
//! | `polybus.deliveries.in_flight` | up-down counter | `{message}` | handed out, not yet settled, per destination and group |
//! | `polybus.publishes.in_flight` | up-down counter | `{message}` | published, not yet answered |
//! | `polybus.group.depth` | gauge | `{message}` | what waits for a group, as last known: the in-memory group's queue, RabbitMQ's ready count (a passive `queue.declare` every 2 s), or each assigned Kafka partition's high watermark (asked of the broker every 2 s) less the offset the member last committed (before its first commit, its lowest unsettled record), with `messaging.destination.name` and `messaging.destination.partition.id` |
//! | `polybus.reconnects` | counter | `{event}` | connections to the broker opened again after a loss (RabbitMQ; librdkafka reconnects on its own, unseen) |
//! | `polybus.circuit_breaker.transitions` | counter | `{event}` | circuit-breaker state changes, by `polybus.circuit_breaker.state` (`open`, `half_open`, `closed`) |
//!
//! The operation metrics carry `messaging.system`, `messaging.operation.name`,
//! `messaging.destination.name` and, where known, `server.address`,
//! `server.port` and `messaging.consumer.group.name`; the depth gauge the
//! system, server and group; reconnects the system and server; breaker
//! transitions the state alone. A request-reply topic (`reply.<id>`) is
//! temporary: `(temporary)` in span names, `messaging.destination.temporary`
//! instead of its name. A private subscription's generated group is on its
//! spans, not in metrics. Durations use the conventions' bucket boundaries
//! (5 ms to 10 s). The depth refreshers start at the first collection.
//!
//! [`Backend::endpoint`]: crate::backend::Backend::endpoint
//! [`DeliveryExt::with_wire`]: crate::backend::DeliveryExt::with_wire

mod attributes;
mod depth;
mod spans;

use std::collections::HashMap;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};

use opentelemetry::metrics::{Counter, Histogram, Meter, ObservableGauge, UpDownCounter};
use opentelemetry::trace::{
    Span, SpanBuilder, SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState,
    Tracer,
};
use opentelemetry::{Context, InstrumentationScope, KeyValue, global};

use crate::backend::Endpoint;
use crate::error::Kind;

pub(crate) use depth::{record_breaker_transition, record_reconnect};
pub(crate) use spans::{Process, StreamTelemetry};

/// The instrumentation scope of every span and metric: `polybus`.
pub const SCOPE: &str = "polybus";

/// The metric names, as the conventions and polybus name them.
pub mod metric {
    /// `messaging.client.sent.messages`
    pub const SENT: &str = "messaging.client.sent.messages";
    /// `messaging.client.consumed.messages`
    pub const CONSUMED: &str = "messaging.client.consumed.messages";
    /// `messaging.client.operation.duration`
    pub const OPERATION_DURATION: &str = "messaging.client.operation.duration";
    /// `messaging.process.duration`
    pub const PROCESS_DURATION: &str = "messaging.process.duration";
    /// `polybus.redeliveries`
    pub const REDELIVERIES: &str = "polybus.redeliveries";
    /// `polybus.dead_letters`
    pub const DEAD_LETTERS: &str = "polybus.dead_letters";
    /// `polybus.deliveries.in_flight`
    pub const DELIVERIES_IN_FLIGHT: &str = "polybus.deliveries.in_flight";
    /// `polybus.publishes.in_flight`
    pub const PUBLISHES_IN_FLIGHT: &str = "polybus.publishes.in_flight";
    /// `polybus.group.depth`
    pub const GROUP_DEPTH: &str = "polybus.group.depth";
    /// `polybus.reconnects`
    pub const RECONNECTS: &str = "polybus.reconnects";
    /// `polybus.circuit_breaker.transitions`
    pub const BREAKER_TRANSITIONS: &str = "polybus.circuit_breaker.transitions";
}

/// The conventions' advice for duration histograms, in seconds.
const DURATION_BUCKETS: [f64; 14] = [
    0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
];

/// `error.type` for an error: its kind, in snake case.
pub(crate) fn error_type(kind: Kind) -> &'static str {
    match kind {
        // The conventions' name for an error of no known type.
        Kind::Other => "_OTHER",
        known => known.name(),
    }
}

/// A bus's tracer, instruments and broker, made once in [`Bus::new`](crate::Bus::new).
pub(crate) struct Instruments {
    tracer: global::BoxedTracer,
    /// Whether `tracer` makes spans (an SDK is installed); if not, no span is
    /// built and no header touched.
    tracing: bool,
    endpoint: Endpoint,
    /// `messaging.system` and the server, on every span and metric.
    common: Vec<KeyValue>,
    sent: Counter<u64>,
    consumed: Counter<u64>,
    operation_duration: Histogram<f64>,
    process_duration: Histogram<f64>,
    redeliveries: Counter<u64>,
    dead_letters: Counter<u64>,
    deliveries_in_flight: UpDownCounter<i64>,
    publishes_in_flight: UpDownCounter<i64>,
    /// Each topic's send attributes, made once (see `attributes`).
    send_sets: Mutex<HashMap<Box<str>, Arc<attributes::SendSets>>>,
    /// The subscriptions whose group depth the gauge reads.
    depths: Arc<Mutex<Vec<depth::Watched>>>,
    next_watch: AtomicU64,
    /// The depth gauge; its callback reads `depths` while the bus lives.
    _depth_gauge: ObservableGauge<u64>,
}

fn scope() -> InstrumentationScope {
    InstrumentationScope::builder(SCOPE)
        .with_version(env!("CARGO_PKG_VERSION"))
        .build()
}

/// Whether `tracer` makes spans of its own. Asked with a child of a remote,
/// unsampled parent: the API's no-op tracer hands the parent's context back,
/// an SDK makes a new span id (and, sampling on the parent's decision as its
/// default sampler does, neither records nor exports it).
fn makes_spans(tracer: &global::BoxedTracer) -> bool {
    let parent = SpanContext::new(
        TraceId::from(1u128),
        SpanId::from(1u64),
        TraceFlags::NOT_SAMPLED,
        true,
        TraceState::NONE,
    );
    let cx = Context::new().with_remote_span_context(parent);
    let probe = tracer.build_with_context(SpanBuilder::from_name("polybus.probe"), &cx);
    let own = probe.span_context().span_id() != SpanId::from(1u64);
    if probe.is_recording() {
        // A sampler that ignores its parent recorded the probe: never ended,
        // it is never exported (one small span kept per bus made).
        std::mem::forget(probe);
    }
    own
}

fn common_attributes(endpoint: &Endpoint) -> Vec<KeyValue> {
    let mut common = vec![KeyValue::new("messaging.system", endpoint.system)];
    if let Some(address) = &endpoint.address {
        common.push(KeyValue::new("server.address", address.clone()));
    }
    if let Some(port) = endpoint.port {
        common.push(KeyValue::new("server.port", i64::from(port)));
    }
    common
}

impl Instruments {
    pub(crate) fn new(endpoint: Endpoint) -> Arc<Self> {
        let meter: Meter = global::meter_with_scope(scope());
        let tracer = global::tracer_with_scope(scope());
        let depths = Arc::new(Mutex::new(Vec::new()));
        let counter = |name: &'static str, what: &'static str| {
            meter
                .u64_counter(name)
                .with_unit("{message}")
                .with_description(what)
                .build()
        };
        let duration = |name: &'static str, what: &'static str| {
            meter
                .f64_histogram(name)
                .with_unit("s")
                .with_description(what)
                .with_boundaries(DURATION_BUCKETS.to_vec())
                .build()
        };
        let in_flight = |name: &'static str, what: &'static str| {
            meter
                .i64_up_down_counter(name)
                .with_unit("{message}")
                .with_description(what)
                .build()
        };
        Arc::new(Instruments {
            tracing: makes_spans(&tracer),
            tracer,
            sent: counter(
                metric::SENT,
                "Number of messages producer attempted to send to the broker.",
            ),
            consumed: counter(
                metric::CONSUMED,
                "Number of messages that were delivered to the application.",
            ),
            operation_duration: duration(
                metric::OPERATION_DURATION,
                "Duration of messaging operation initiated by a producer or consumer client.",
            ),
            process_duration: duration(
                metric::PROCESS_DURATION,
                "Duration of processing operation.",
            ),
            redeliveries: counter(
                metric::REDELIVERIES,
                "Deliveries handed out again after an earlier attempt.",
            ),
            dead_letters: counter(
                metric::DEAD_LETTERS,
                "Messages moved to a dead-letter topic.",
            ),
            deliveries_in_flight: in_flight(
                metric::DELIVERIES_IN_FLIGHT,
                "Deliveries handed out and not yet settled.",
            ),
            publishes_in_flight: in_flight(
                metric::PUBLISHES_IN_FLIGHT,
                "Messages published and not yet answered by the broker.",
            ),
            send_sets: Mutex::new(HashMap::new()),
            _depth_gauge: depth::gauge(&meter, &depths),
            depths,
            next_watch: AtomicU64::new(0),
            common: common_attributes(&endpoint),
            endpoint,
        })
    }

    fn is_rabbitmq(&self) -> bool {
        self.endpoint.system == "rabbitmq"
    }

    fn is_kafka(&self) -> bool {
        self.endpoint.system == "kafka"
    }
}
