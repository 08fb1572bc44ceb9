//! The operations: `send`, `process` and the settlements, each with its span
//! (when the bus traces) and its metrics.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use opentelemetry::trace::{Link, SpanBuilder, SpanKind, Status, TraceContextExt, Tracer};
use opentelemetry::{Context, KeyValue};

use super::attributes::{
    MAX_CACHED, ProcessSets, SendSets, creation_context, inject, message_attributes,
};
use super::depth::DepthWatch;
use super::{Instruments, error_type};
use crate::backend::{Settlement, Wire};
use crate::error::{Error, PublishError};
use crate::message::Message;
use crate::publisher::Receipt;

impl Instruments {
    /// Start the `send` of `messages` to `topic`: its span, if the bus traces,
    /// whose context each message without one of its own then carries.
    pub(crate) fn start_send(
        self: &Arc<Self>,
        topic: &str,
        messages: &mut [Message],
        batch: bool,
    ) -> SendOp {
        let sets = self.send_sets(topic);
        let cx = self
            .tracing
            .then(|| self.send_span(topic, &sets, messages, batch));
        let count = messages.len() as i64;
        self.publishes_in_flight.add(count, &sets.metric);
        SendOp {
            instruments: self.clone(),
            cx,
            start: Instant::now(),
            sets,
            count,
            finished: false,
        }
    }

    fn send_span(
        &self,
        topic: &str,
        sets: &SendSets,
        messages: &mut [Message],
        batch: bool,
    ) -> Context {
        let mut attributes = sets.metric.clone();
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
        let carried: Vec<Context> = messages
            .iter()
            .map(|m| creation_context(m.headers()))
            .collect();
        let links = carried
            .iter()
            .map(|cx| cx.span().span_context().clone())
            .filter(|span| span.is_valid())
            .map(Link::with_context)
            .collect();
        let name = format!("send {}", sets.destination.in_span_name());
        let builder = SpanBuilder::from_name(name)
            .with_kind(SpanKind::Producer)
            .with_attributes(attributes)
            .with_links(links);
        let span = self.tracer.build_with_context(builder, &Context::current());
        let cx = Context::current().with_span(span);
        for (m, carried) in messages.iter_mut().zip(carried) {
            if !carried.span().span_context().is_valid() {
                inject(&cx, m.headers_mut());
            }
        }
        cx
    }
}

/// A subscription's telemetry: the bus's instruments, its group, each
/// topic's attribute sets, and its depth watch.
pub(crate) struct StreamTelemetry {
    instruments: Arc<Instruments>,
    group: Arc<str>,
    sets: HashMap<Box<str>, Arc<ProcessSets>>,
    _depth: Option<DepthWatch>,
}

impl StreamTelemetry {
    pub(crate) fn new(
        instruments: Arc<Instruments>,
        group: Arc<str>,
        depth: Option<DepthWatch>,
    ) -> Self {
        StreamTelemetry {
            instruments,
            group,
            sets: HashMap::new(),
            _depth: depth,
        }
    }

    /// Start the `process` of `message`, handed out now.
    pub(crate) fn process(
        &mut self,
        message: &Message,
        topic: &str,
        attempt: u32,
        wire: &Wire,
        batched: bool,
    ) -> Process {
        let sets = match self.sets.get(topic) {
            Some(sets) => sets.clone(),
            None => {
                let sets = Arc::new(self.instruments.process_sets(&self.group, topic));
                if self.sets.len() < MAX_CACHED {
                    self.sets.insert(topic.into(), sets.clone());
                }
                sets
            }
        };
        let i = &self.instruments;
        let cx = i.tracing.then(|| {
            let parent = parent_of(message, attempt, batched);
            i.process_span(&sets, message, topic, attempt, wire, parent)
        });
        i.consumed.add(1, &sets.process);
        if attempt > 1 {
            i.redeliveries.add(1, &sets.process);
        }
        i.deliveries_in_flight.add(1, &sets.process);
        Process {
            instruments: i.clone(),
            cx,
            start: Instant::now(),
            sets,
        }
    }
}

/// A `process` span's parent and links: the first delivery of a message
/// handed out alone is a direct consequence of its send, so the creation
/// context is its parent; retries and batched deliveries only link to it; a
/// message without one gets a root span.
fn parent_of(message: &Message, attempt: u32, batched: bool) -> (Context, Vec<Link>) {
    let creation = creation_context(message.headers());
    let span = creation.span().span_context().clone();
    if !span.is_valid() {
        return (Context::new(), Vec::new());
    }
    let links = vec![Link::with_context(span)];
    if attempt == 1 && !batched {
        (creation, links)
    } else {
        (Context::new(), links)
    }
}

impl Instruments {
    fn process_span(
        &self,
        sets: &ProcessSets,
        message: &Message,
        topic: &str,
        attempt: u32,
        wire: &Wire,
        (parent, links): (Context, Vec<Link>),
    ) -> Context {
        let mut attributes = sets.process.clone();
        if sets.private {
            attributes.push(sets.group.clone());
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
        let name = format!("process {}", sets.destination.in_span_name());
        let builder = SpanBuilder::from_name(name)
            .with_kind(SpanKind::Consumer)
            .with_attributes(attributes)
            .with_links(links);
        let span = self.tracer.build_with_context(builder, &parent);
        parent.with_span(span)
    }
}

/// A `send` in flight: ended by [`finish`](SendOp::finish).
pub(crate) struct SendOp {
    instruments: Arc<Instruments>,
    /// The span's context, if the bus traces.
    cx: Option<Context>,
    start: Instant,
    sets: Arc<SendSets>,
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
        i.publishes_in_flight.add(-self.count, &self.sets.metric);
        if let Some(cx) = &self.cx {
            let span = cx.span();
            span.set_attribute(KeyValue::new("error.type", "cancelled"));
            span.set_status(Status::error("dropped before the broker answered"));
            span.end();
        }
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
        let metric = &self.sets.metric;
        let mut first_error: Option<&Error> = None;
        for r in results {
            match r {
                Ok(_) => i.sent.add(1, metric),
                Err(e) => {
                    i.sent.add(1, &with_error(metric, error_type(e.kind())));
                    first_error.get_or_insert(e.error());
                }
            }
        }
        i.publishes_in_flight.add(-self.count, metric);
        let took = self.start.elapsed().as_secs_f64();
        match first_error {
            None => i.operation_duration.record(took, metric),
            Some(e) => {
                let kind = error_type(e.kind());
                i.operation_duration.record(took, &with_error(metric, kind));
                if let Some(cx) = &self.cx {
                    cx.span().set_attribute(KeyValue::new("error.type", kind));
                    cx.span().set_status(Status::error(e.to_string()));
                }
            }
        }
        if let Some(cx) = &self.cx {
            cx.span().end();
        }
    }
}

/// `attributes` and `error.type`: a failure's metric attributes.
fn with_error(attributes: &[KeyValue], kind: &'static str) -> Vec<KeyValue> {
    let mut out = attributes.to_vec();
    out.push(KeyValue::new("error.type", kind));
    out
}

/// A delivery's `process`, from hand-out to settlement.
pub(crate) struct Process {
    instruments: Arc<Instruments>,
    /// The span's context, if the bus traces.
    cx: Option<Context>,
    start: Instant,
    sets: Arc<ProcessSets>,
}

/// What a settlement is called: `messaging.operation.name`.
fn settle_name(settlement: &Settlement) -> &'static str {
    match settlement {
        Settlement::Ack => "ack",
        Settlement::Retry { .. } => "nack",
        Settlement::DeadLetter(_) => "dead_letter",
        // Never within a process span: deferred before the hand-out.
        Settlement::Defer { .. } => "defer",
    }
}

impl Process {
    /// The context of the `process` span, for the caller's own spans; the
    /// current context if the bus does not trace.
    pub(crate) fn context(&self) -> Context {
        match &self.cx {
            Some(cx) => cx.clone(),
            None => Context::current(),
        }
    }

    /// Start the settlement, with its span as a child of the `process` span.
    pub(crate) fn start_settle(self, settlement: &Settlement) -> Settle {
        let name = settle_name(settlement);
        let cx = self.cx.as_ref().map(|parent| {
            let mut attributes = self.sets.settle(name).to_vec();
            if self.sets.private {
                attributes.push(self.sets.group.clone());
            }
            if let Settlement::DeadLetter(why) = settlement {
                attributes.push(KeyValue::new(
                    "polybus.dead_letter.reason",
                    why.reason.clone(),
                ));
            }
            let span_name = format!("{name} {}", self.sets.destination.in_span_name());
            let builder = SpanBuilder::from_name(span_name)
                .with_kind(SpanKind::Client)
                .with_attributes(attributes);
            let span = self.instruments.tracer.build_with_context(builder, parent);
            parent.with_span(span)
        });
        Settle {
            cx,
            start: Instant::now(),
            name,
            process: Some(self),
        }
    }

    /// End the `process`; `failure` is its `error.type`, if processing failed.
    fn end(self, failure: Option<&'static str>) {
        let i = &*self.instruments;
        let metric = &self.sets.process;
        i.deliveries_in_flight.add(-1, metric);
        let took = self.start.elapsed().as_secs_f64();
        match failure {
            None => i.process_duration.record(took, metric),
            Some(failure) => i
                .process_duration
                .record(took, &with_error(metric, failure)),
        }
        if let Some(cx) = &self.cx {
            let span = cx.span();
            if let Some(failure) = failure {
                span.set_attribute(KeyValue::new("error.type", failure));
                span.set_status(Status::error(failure));
            }
            span.end();
        }
    }
}

/// A settlement in flight: its span and the `process` it ends.
pub(crate) struct Settle {
    /// The span's context, if the bus traces.
    cx: Option<Context>,
    start: Instant,
    name: &'static str,
    /// Taken when the operation ends, by `finish` or, if the settlement's
    /// future is dropped first, by `Drop`.
    process: Option<Process>,
}

/// A settlement whose future was dropped before the broker answered (a
/// caller's time-out): it ends as cancelled, and the `process` with it, so
/// nothing stays in flight.
impl Drop for Settle {
    fn drop(&mut self) {
        self.end(None, true);
    }
}

impl Settle {
    /// End the settlement with the broker's answer (`None`: not known, the
    /// settlement was left to run after a dropped delivery), then the `process`.
    pub(crate) fn finish(mut self, outcome: Option<&crate::Result<()>>) {
        self.end(outcome, false);
    }

    fn end(&mut self, outcome: Option<&crate::Result<()>>, cancelled: bool) {
        let Some(process) = self.process.take() else {
            return;
        };
        let i = &*process.instruments;
        let metric = process.sets.settle(self.name);
        let error = match outcome {
            Some(Err(e)) => Some((error_type(e.kind()), e.to_string())),
            None if cancelled => Some(("cancelled", "dropped before the broker answered".into())),
            _ => None,
        };
        let took = self.start.elapsed().as_secs_f64();
        match &error {
            Some((kind, _)) => i.operation_duration.record(took, &with_error(metric, kind)),
            None => {
                i.operation_duration.record(took, metric);
                if outcome.is_some() && self.name == "dead_letter" {
                    i.dead_letters.add(1, metric);
                }
            }
        }
        if let Some(cx) = &self.cx {
            let span = cx.span();
            if let Some((kind, message)) = error {
                span.set_attribute(KeyValue::new("error.type", kind));
                span.set_status(Status::error(message));
            }
            span.end();
        }
        let failure = match (self.name, outcome.is_none()) {
            (_, true) if cancelled => Some("cancelled"),
            (_, true) => Some("dropped"),
            ("ack", false) => None,
            (name, false) => Some(name),
        };
        process.end(failure);
    }
}
