//! OpenTelemetry (feature `otel`): spans, trace context carried in every
//! message, and metrics, per the OpenTelemetry messaging semantic conventions.
//!
//! polybus uses the OpenTelemetry API only. The application installs an SDK
//! and its exporters, and sets the global tracer provider, meter provider and
//! text-map propagator **before** it connects: a [`Bus`](crate::Bus) takes its
//! tracer and meter when it is made. Without an SDK every call is a no-op, and
//! with the feature off no OpenTelemetry code is compiled.
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

use std::sync::Arc;
use std::time::Instant;

use opentelemetry::metrics::{Counter, Histogram, Meter, UpDownCounter};
use opentelemetry::propagation::{Extractor, Injector};
use opentelemetry::trace::{Link, SpanBuilder, SpanKind, Status, TraceContextExt, Tracer};
use opentelemetry::{Context, InstrumentationScope, KeyValue, global};

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use opentelemetry::metrics::ObservableGauge;

use crate::backend::{DepthProbe, Endpoint, Settlement, Wire, lock};
use crate::error::{Error, Kind, PublishError};
use crate::message::{Headers, Message};
use crate::names::{CORRELATION_ID, PRIVATE_GROUP_PREFIX, REPLY_PREFIX};
use crate::publisher::Receipt;

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
        Kind::InvalidInput => "invalid_input",
        Kind::PayloadTooLarge => "payload_too_large",
        Kind::Connection => "connection",
        Kind::Authentication => "authentication",
        Kind::Timeout => "timeout",
        Kind::Refused => "refused",
        Kind::Decode => "decode",
        Kind::Encode => "encode",
        Kind::Closed => "closed",
        Kind::Unsupported => "unsupported",
        Kind::CircuitOpen => "circuit_open",
        _ => "_OTHER",
    }
}

/// A bus's tracer, instruments and broker, made once in [`Bus::new`](crate::Bus::new).
pub(crate) struct Instruments {
    tracer: global::BoxedTracer,
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
    /// The subscriptions whose group depth the gauge reads.
    depths: Arc<Mutex<Vec<Watched>>>,
    next_watch: AtomicU64,
    /// The depth gauge; its callback reads `depths` while the bus lives.
    _depth_gauge: ObservableGauge<u64>,
}

/// A subscription the depth gauge reads.
struct Watched {
    id: u64,
    attributes: Vec<KeyValue>,
    probe: DepthProbe,
}

/// Reports one subscription's group depth until dropped (with its stream).
pub(crate) struct DepthWatch {
    depths: Arc<Mutex<Vec<Watched>>>,
    id: u64,
}

impl Drop for DepthWatch {
    fn drop(&mut self) {
        lock(&self.depths).retain(|w| w.id != self.id);
    }
}

/// The `polybus.group.depth` gauge of a bus: each watched subscription's
/// probe, read at collection.
fn depth_gauge(meter: &Meter, depths: &Arc<Mutex<Vec<Watched>>>) -> ObservableGauge<u64> {
    // The SDK keeps a callback for as long as its provider lives, even after
    // the instrument is dropped: held weakly, a dropped bus's observes nothing.
    let depths = Arc::downgrade(depths);
    meter
        .u64_observable_gauge(metric::GROUP_DEPTH)
        .with_unit("{message}")
        .with_description("Messages waiting for a group (per partition on Kafka), as last known.")
        .with_callback(move |observer| {
            let Some(depths) = depths.upgrade() else {
                return;
            };
            for w in lock(&depths).iter() {
                for depth in (w.probe)() {
                    match &depth.partition {
                        None => observer.observe(depth.messages, &w.attributes),
                        Some((topic, partition)) => {
                            let mut attributes = w.attributes.clone();
                            attributes.push(KeyValue::new(
                                "messaging.destination.name",
                                topic.as_str().to_owned(),
                            ));
                            attributes.push(KeyValue::new(
                                "messaging.destination.partition.id",
                                partition.to_string(),
                            ));
                            observer.observe(depth.messages, &attributes);
                        }
                    }
                }
            }
        })
        .build()
}

/// A counter of rare events, made when one happens: the global meter then is
/// the application's, whenever it installed it.
fn rare_counter(name: &'static str, what: &'static str) -> Counter<u64> {
    global::meter_with_scope(scope())
        .u64_counter(name)
        .with_unit("{event}")
        .with_description(what)
        .build()
}

/// See [`record_reconnect`](crate::backend::record_reconnect).
pub(crate) fn record_reconnect(endpoint: &Endpoint) {
    rare_counter(
        metric::RECONNECTS,
        "Connections or channels to the broker opened again after a loss.",
    )
    .add(1, &common_attributes(endpoint));
}

/// A circuit breaker moved to `state` (`open`, `half_open`, `closed`).
pub(crate) fn record_breaker_transition(state: &'static str) {
    rare_counter(
        metric::BREAKER_TRANSITIONS,
        "Circuit-breaker state changes.",
    )
    .add(1, &[KeyValue::new("polybus.circuit_breaker.state", state)]);
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

fn scope() -> InstrumentationScope {
    InstrumentationScope::builder(SCOPE)
        .with_version(env!("CARGO_PKG_VERSION"))
        .build()
}

impl Instruments {
    pub(crate) fn new(endpoint: Endpoint) -> Arc<Self> {
        let meter: Meter = global::meter_with_scope(scope());
        let common = common_attributes(&endpoint);
        let depths = Arc::new(Mutex::new(Vec::new()));
        let duration = |name: &'static str, what: &'static str| {
            meter
                .f64_histogram(name)
                .with_unit("s")
                .with_description(what)
                .with_boundaries(DURATION_BUCKETS.to_vec())
                .build()
        };
        Arc::new(Instruments {
            tracer: global::tracer_with_scope(scope()),
            sent: meter
                .u64_counter(metric::SENT)
                .with_unit("{message}")
                .with_description("Number of messages producer attempted to send to the broker.")
                .build(),
            consumed: meter
                .u64_counter(metric::CONSUMED)
                .with_unit("{message}")
                .with_description("Number of messages that were delivered to the application.")
                .build(),
            operation_duration: duration(
                metric::OPERATION_DURATION,
                "Duration of messaging operation initiated by a producer or consumer client.",
            ),
            process_duration: duration(
                metric::PROCESS_DURATION,
                "Duration of processing operation.",
            ),
            redeliveries: meter
                .u64_counter(metric::REDELIVERIES)
                .with_unit("{message}")
                .with_description("Deliveries handed out again after an earlier attempt.")
                .build(),
            dead_letters: meter
                .u64_counter(metric::DEAD_LETTERS)
                .with_unit("{message}")
                .with_description("Messages moved to a dead-letter topic.")
                .build(),
            deliveries_in_flight: meter
                .i64_up_down_counter(metric::DELIVERIES_IN_FLIGHT)
                .with_unit("{message}")
                .with_description("Deliveries handed out and not yet settled.")
                .build(),
            publishes_in_flight: meter
                .i64_up_down_counter(metric::PUBLISHES_IN_FLIGHT)
                .with_unit("{message}")
                .with_description("Messages published and not yet answered by the broker.")
                .build(),
            _depth_gauge: depth_gauge(&meter, &depths),
            depths,
            next_watch: AtomicU64::new(0),
            common,
            endpoint,
        })
    }

    /// Report `group`'s depth through `probe` until the returned watch drops.
    pub(crate) fn watch_depth(&self, group: &str, probe: DepthProbe) -> DepthWatch {
        let id = self.next_watch.fetch_add(1, Ordering::Relaxed);
        let mut attributes = self.common.clone();
        attributes.push(KeyValue::new(
            "messaging.consumer.group.name",
            group.to_owned(),
        ));
        lock(&self.depths).push(Watched {
            id,
            attributes,
            probe,
        });
        DepthWatch {
            depths: self.depths.clone(),
            id,
        }
    }

    /// The destination of `topic`: on RabbitMQ `{exchange}:{routing key}`; a
    /// request-reply topic (`reply.<id>`, one per requester) is temporary.
    fn destination(&self, topic: &str) -> Destination {
        let name = match &self.endpoint.exchange {
            Some(exchange) => format!("{exchange}:{topic}"),
            None => topic.to_owned(),
        };
        let temporary = topic.split('.').next() == Some(REPLY_PREFIX);
        Destination { name, temporary }
    }

    /// The attributes every span and metric of `operation` on `destination`
    /// carries. A temporary destination's name is left out, as the
    /// conventions ask: it would make every metric's cardinality unbounded.
    fn attributes(&self, operation: &'static str, destination: &Destination) -> Vec<KeyValue> {
        let mut attributes = Vec::with_capacity(self.common.len() + 4);
        attributes.extend(self.common.iter().cloned());
        attributes.push(KeyValue::new("messaging.operation.name", operation));
        if destination.temporary {
            attributes.push(KeyValue::new("messaging.destination.temporary", true));
        } else {
            attributes.push(KeyValue::new(
                "messaging.destination.name",
                destination.name.clone(),
            ));
        }
        attributes
    }

    fn is_rabbitmq(&self) -> bool {
        self.endpoint.system == "rabbitmq"
    }

    fn is_kafka(&self) -> bool {
        self.endpoint.system == "kafka"
    }

    /// Start the `send` span of `messages` to `topic`, and give each message
    /// without a creation context the span's.
    pub(crate) fn start_send(
        self: &Arc<Self>,
        topic: &str,
        messages: &mut [Message],
        batch: bool,
    ) -> SendOp {
        let destination = self.destination(topic);
        let mut attributes = self.attributes("send", &destination);
        attributes.push(KeyValue::new("messaging.operation.type", "send"));
        let metric_attributes = attributes.clone();
        if self.is_rabbitmq() {
            attributes.push(KeyValue::new(
                "messaging.rabbitmq.destination.routing_key",
                topic.to_owned(),
            ));
        }
        if batch {
            attributes.push(KeyValue::new(
                "messaging.batch.message_count",
                messages.len() as i64,
            ));
        } else if let Some(m) = messages.first() {
            attributes.extend(message_attributes(m));
        }
        let links: Vec<Link> = messages
            .iter()
            .map(|m| creation_context(m.headers()))
            .filter(|cx| cx.span().span_context().is_valid())
            .map(|cx| Link::with_context(cx.span().span_context().clone()))
            .collect();
        let builder = SpanBuilder::from_name(format!("send {}", destination.in_span_name()))
            .with_kind(SpanKind::Producer)
            .with_attributes(attributes)
            .with_links(links);
        let span = self.tracer.build_with_context(builder, &Context::current());
        let cx = Context::current().with_span(span);
        for m in messages.iter_mut() {
            if !creation_context(m.headers())
                .span()
                .span_context()
                .is_valid()
            {
                global::get_text_map_propagator(|p| {
                    p.inject_context(&cx, &mut HeaderInjector(m.headers_mut()))
                });
            }
        }
        let count = messages.len() as i64;
        self.publishes_in_flight.add(count, &metric_attributes);
        SendOp {
            instruments: self.clone(),
            cx,
            start: Instant::now(),
            metric_attributes,
            count,
            finished: false,
        }
    }

    /// Start the `process` span of `delivery`'s message, handed out now.
    pub(crate) fn start_process(
        self: &Arc<Self>,
        group: &Arc<str>,
        message: &Message,
        topic: &str,
        attempt: u32,
        wire: &Wire,
        batched: bool,
    ) -> Process {
        let destination = self.destination(topic);
        let mut metric_attributes = self.attributes("process", &destination);
        let group = KeyValue::new("messaging.consumer.group.name", group.to_string());
        // A private subscription's generated group is one per subscriber: on
        // its spans, but not a metric's dimension.
        let private = group.value.as_str().starts_with(PRIVATE_GROUP_PREFIX);
        if !private {
            metric_attributes.push(group.clone());
        }
        let mut attributes = metric_attributes.clone();
        if private {
            attributes.push(group);
        }
        attributes.push(KeyValue::new("messaging.operation.type", "process"));
        attributes.push(KeyValue::new("polybus.attempt", i64::from(attempt)));
        attributes.extend(message_attributes(message));
        if self.is_kafka() {
            if let Some(partition) = wire.partition {
                attributes.push(KeyValue::new(
                    "messaging.destination.partition.id",
                    partition.to_string(),
                ));
            }
            if let Some(offset) = wire.offset {
                attributes.push(KeyValue::new("messaging.kafka.offset", offset));
            }
            if let Some(key) = message.key() {
                attributes.push(KeyValue::new("messaging.kafka.message.key", key.to_owned()));
            }
        }
        if self.is_rabbitmq() {
            attributes.push(KeyValue::new(
                "messaging.rabbitmq.destination.routing_key",
                topic.to_owned(),
            ));
            if let Some(tag) = wire.delivery_tag {
                attributes.push(KeyValue::new(
                    "messaging.rabbitmq.message.delivery_tag",
                    tag as i64,
                ));
            }
        }
        let creation = creation_context(message.headers());
        let creation_span = creation.span().span_context().clone();
        let mut links = Vec::new();
        let parent = if creation_span.is_valid() {
            links.push(Link::with_context(creation_span));
            // The first delivery of a message handed out alone is a direct
            // consequence of its send: a child, so one trace holds both.
            if attempt == 1 && !batched {
                creation
            } else {
                Context::new()
            }
        } else {
            // A foreign message without context: a root span.
            Context::new()
        };
        let builder = SpanBuilder::from_name(format!("process {}", destination.in_span_name()))
            .with_kind(SpanKind::Consumer)
            .with_attributes(attributes)
            .with_links(links);
        let span = self.tracer.build_with_context(builder, &parent);
        let cx = parent.with_span(span);
        self.consumed.add(1, &metric_attributes);
        if attempt > 1 {
            self.redeliveries.add(1, &metric_attributes);
        }
        self.deliveries_in_flight.add(1, &metric_attributes);
        Process {
            instruments: self.clone(),
            cx,
            start: Instant::now(),
            destination,
            metric_attributes,
        }
    }
}

/// Where an operation goes, as telemetry names it.
struct Destination {
    name: String,
    /// A request-reply topic: named `(temporary)` in span names, and left out
    /// of attributes.
    temporary: bool,
}

impl Destination {
    /// How span names say it: low-cardinality, as the conventions ask.
    fn in_span_name(&self) -> &str {
        if self.temporary {
            "(temporary)"
        } else {
            &self.name
        }
    }
}

/// The attributes of a single message, on `send` and `process` spans.
fn message_attributes(m: &Message) -> Vec<KeyValue> {
    let mut out = vec![
        KeyValue::new("messaging.message.id", m.id().to_owned()),
        KeyValue::new("messaging.message.body.size", m.payload().len() as i64),
    ];
    if let Some(conversation) = m.header(CORRELATION_ID) {
        out.push(KeyValue::new(
            "messaging.message.conversation_id",
            conversation.to_owned(),
        ));
    }
    out
}

/// The creation context a message carries in its headers, through the
/// application's propagator; empty if it carries none.
fn creation_context(headers: &Headers) -> Context {
    global::get_text_map_propagator(|p| {
        p.extract_with_context(&Context::new(), &HeaderReader(headers))
    })
}

struct HeaderInjector<'a>(&'a mut Headers);

impl Injector for HeaderInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        self.0.insert(key.to_owned(), value);
    }
}

struct HeaderReader<'a>(&'a Headers);

impl Extractor for HeaderReader<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        // Header names are case-sensitive in polybus; propagators use lowercase.
        self.0.get(key).map(String::as_str)
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(String::as_str).collect()
    }
}

/// A `send` in flight: ended by [`finish`](SendOp::finish).
pub(crate) struct SendOp {
    instruments: Arc<Instruments>,
    cx: Context,
    start: Instant,
    metric_attributes: Vec<KeyValue>,
    count: i64,
    /// Whether the broker's answers were recorded; if not when dropped, the
    /// publish future was dropped first (see `Drop`).
    finished: bool,
}

/// A publish future dropped before the broker answered (a caller's time-out):
/// the outcome is unknown, so the messages are not counted as sent, but the
/// span ends, saying so, and they are no longer in flight.
impl Drop for SendOp {
    fn drop(&mut self) {
        if self.finished {
            return;
        }
        let i = &*self.instruments;
        i.publishes_in_flight
            .add(-self.count, &self.metric_attributes);
        let span = self.cx.span();
        span.set_attribute(KeyValue::new("error.type", "cancelled"));
        span.set_status(Status::error("dropped before the broker answered"));
        span.end();
    }
}

impl SendOp {
    /// End the span with the broker's answers: one per message.
    pub(crate) fn finish<'r>(
        mut self,
        results: impl IntoIterator<Item = &'r Result<Receipt, PublishError>>,
    ) {
        self.finished = true;
        let i = &*self.instruments;
        let mut first_error: Option<&Error> = None;
        for r in results {
            match r {
                Ok(_) => i.sent.add(1, &self.metric_attributes),
                Err(e) => {
                    let mut attributes = self.metric_attributes.clone();
                    attributes.push(KeyValue::new("error.type", error_type(e.kind())));
                    i.sent.add(1, &attributes);
                    first_error.get_or_insert(e.error());
                }
            }
        }
        i.publishes_in_flight
            .add(-self.count, &self.metric_attributes);
        let mut attributes = std::mem::take(&mut self.metric_attributes);
        if let Some(e) = first_error {
            attributes.push(KeyValue::new("error.type", error_type(e.kind())));
            let span = self.cx.span();
            span.set_attribute(KeyValue::new("error.type", error_type(e.kind())));
            span.set_status(Status::error(e.to_string()));
        }
        i.operation_duration
            .record(self.start.elapsed().as_secs_f64(), &attributes);
        self.cx.span().end();
    }
}

/// A delivery's `process` span, from hand-out to settlement.
pub(crate) struct Process {
    instruments: Arc<Instruments>,
    cx: Context,
    start: Instant,
    destination: Destination,
    metric_attributes: Vec<KeyValue>,
}

/// What a settlement is called: `messaging.operation.name`.
fn settle_name(settlement: &Settlement) -> &'static str {
    match settlement {
        Settlement::Ack => "ack",
        Settlement::Retry { .. } => "nack",
        Settlement::DeadLetter(_) => "dead_letter",
    }
}

impl Process {
    /// The context of the `process` span, for the caller's own spans.
    pub(crate) fn context(&self) -> &Context {
        &self.cx
    }

    /// Start the settlement's span, as a child of the `process` span.
    pub(crate) fn start_settle(self, settlement: &Settlement) -> Settle {
        let name = settle_name(settlement);
        let i = &*self.instruments;
        let mut attributes = i.attributes(name, &self.destination);
        attributes.push(KeyValue::new("messaging.operation.type", "settle"));
        attributes.extend(
            self.metric_attributes
                .iter()
                .filter(|kv| kv.key.as_str() == "messaging.consumer.group.name")
                .cloned(),
        );
        let metric_attributes = attributes.clone();
        if let Settlement::DeadLetter(why) = settlement {
            attributes.push(KeyValue::new(
                "polybus.dead_letter.reason",
                why.reason.clone(),
            ));
        }
        let builder = SpanBuilder::from_name(format!("{name} {}", self.destination.in_span_name()))
            .with_kind(SpanKind::Client)
            .with_attributes(attributes);
        let span = i.tracer.build_with_context(builder, &self.cx);
        Settle {
            cx: self.cx.with_span(span),
            start: Instant::now(),
            name,
            metric_attributes,
            process: Some(self),
        }
    }

    /// End the `process` span; `failure` is its `error.type`, if processing failed.
    fn end(self, failure: Option<&'static str>) {
        let i = &*self.instruments;
        let mut attributes = self.metric_attributes;
        i.deliveries_in_flight.add(-1, &attributes);
        let span = self.cx.span();
        if let Some(failure) = failure {
            span.set_attribute(KeyValue::new("error.type", failure));
            span.set_status(Status::error(failure));
            attributes.push(KeyValue::new("error.type", failure));
        }
        i.process_duration
            .record(self.start.elapsed().as_secs_f64(), &attributes);
        span.end();
    }
}

/// A settlement in flight: its span and the `process` span it ends.
pub(crate) struct Settle {
    cx: Context,
    start: Instant,
    name: &'static str,
    metric_attributes: Vec<KeyValue>,
    /// Taken when the spans end, by `finish` or, if the settlement's future
    /// is dropped first, by `Drop`.
    process: Option<Process>,
}

/// A settlement whose future was dropped before the broker answered (a
/// caller's time-out): its span ends as cancelled, and the `process` span
/// with it, so nothing stays in flight.
impl Drop for Settle {
    fn drop(&mut self) {
        self.end(None, true);
    }
}

impl Settle {
    /// End the settlement's span with the broker's answer (`None`: not known,
    /// the settlement was left to run after a dropped delivery), then the
    /// `process` span.
    pub(crate) fn finish(mut self, outcome: Option<&crate::Result<()>>) {
        self.end(outcome, false);
    }

    fn end(&mut self, outcome: Option<&crate::Result<()>>, cancelled: bool) {
        let Some(process) = self.process.take() else {
            return;
        };
        let i = &*process.instruments;
        let span = self.cx.span();
        let mut attributes = std::mem::take(&mut self.metric_attributes);
        let error = match outcome {
            Some(Err(e)) => Some((error_type(e.kind()), e.to_string())),
            None if cancelled => Some(("cancelled", "dropped before the broker answered".into())),
            _ => None,
        };
        match error {
            Some((kind, message)) => {
                span.set_attribute(KeyValue::new("error.type", kind));
                span.set_status(Status::error(message));
                attributes.push(KeyValue::new("error.type", kind));
            }
            None if outcome.is_some() && self.name == "dead_letter" => {
                i.dead_letters.add(1, &attributes)
            }
            None => {}
        }
        i.operation_duration
            .record(self.start.elapsed().as_secs_f64(), &attributes);
        span.end();
        let failure = match (self.name, outcome.is_none()) {
            (_, true) if cancelled => Some("cancelled"),
            (_, true) => Some("dropped"),
            ("ack", false) => None,
            (name, false) => Some(name),
        };
        process.end(failure);
    }
}
