//! Attribute sets, made once per topic (and group) rather than per message,
//! and the trace context in message headers.

use std::sync::Arc;

use opentelemetry::propagation::{Extractor, Injector};
use opentelemetry::{Context, KeyValue, global};

use super::Instruments;
use crate::backend::lock;
use crate::message::{Headers, Message};
use crate::names::{CORRELATION_ID, PRIVATE_GROUP_PREFIX, REPLY_PREFIX};

/// How many topics' attribute sets a bus (or a subscription) keeps; past that,
/// sets are made for each operation (a pattern over unbounded topic names).
pub(super) const MAX_CACHED: usize = 1024;

/// Where an operation goes, as telemetry names it.
pub(super) struct Destination {
    pub(super) name: String,
    /// A request-reply topic (`reply.<id>`, one per requester): `(temporary)`
    /// in span names, and left out of attributes.
    pub(super) temporary: bool,
}

impl Destination {
    /// How span names say it: low-cardinality, as the conventions ask.
    pub(super) fn in_span_name(&self) -> &str {
        if self.temporary {
            "(temporary)"
        } else {
            &self.name
        }
    }
}

/// A topic's send attributes: the metrics' (also the span's first ones).
pub(super) struct SendSets {
    pub(super) destination: Destination,
    pub(super) metric: Vec<KeyValue>,
}

/// A topic's attributes within one subscription: the process metrics' and
/// each settlement's.
pub(crate) struct ProcessSets {
    pub(super) destination: Destination,
    /// `messaging.consumer.group.name`; in metrics unless `private`.
    pub(super) group: KeyValue,
    /// A private subscription's generated group: one per subscriber, so on
    /// spans but not a metric's dimension.
    pub(super) private: bool,
    pub(super) process: Vec<KeyValue>,
    ack: Vec<KeyValue>,
    nack: Vec<KeyValue>,
    dead_letter: Vec<KeyValue>,
}

impl ProcessSets {
    /// The metric attributes of settlement `name` (`ack`, `nack`, `dead_letter`).
    pub(super) fn settle(&self, name: &str) -> &[KeyValue] {
        match name {
            "ack" => &self.ack,
            "nack" => &self.nack,
            _ => &self.dead_letter,
        }
    }
}

impl Instruments {
    /// The destination of `topic`: on RabbitMQ `{exchange}:{routing key}`.
    fn destination(&self, topic: &str) -> Destination {
        let name = match &self.endpoint.exchange {
            Some(exchange) => format!("{exchange}:{topic}"),
            None => topic.to_owned(),
        };
        let temporary = topic.split('.').next() == Some(REPLY_PREFIX);
        Destination { name, temporary }
    }

    /// What every span and metric of `operation` on `destination` carries. A
    /// temporary destination's name is left out, as the conventions ask: it
    /// would make every metric's cardinality unbounded.
    fn attributes(&self, operation: &'static str, destination: &Destination) -> Vec<KeyValue> {
        let mut attributes = Vec::with_capacity(self.common.len() + 5);
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

    /// `topic`'s send attributes, made on its first send.
    pub(super) fn send_sets(&self, topic: &str) -> Arc<SendSets> {
        if let Some(sets) = lock(&self.send_sets).get(topic) {
            return sets.clone();
        }
        let destination = self.destination(topic);
        let mut metric = self.attributes("send", &destination);
        metric.push(KeyValue::new("messaging.operation.type", "send"));
        let temporary = destination.temporary;
        let sets = Arc::new(SendSets {
            destination,
            metric,
        });
        let mut cache = lock(&self.send_sets);
        // Reply topics are one per requester: never kept.
        if !temporary && cache.len() < MAX_CACHED {
            cache.insert(topic.into(), sets.clone());
        }
        sets
    }

    /// `topic`'s attributes for a subscription of `group`.
    pub(super) fn process_sets(&self, group: &str, topic: &str) -> ProcessSets {
        let destination = self.destination(topic);
        let group = KeyValue::new("messaging.consumer.group.name", group.to_owned());
        let private = group.value.as_str().starts_with(PRIVATE_GROUP_PREFIX);
        let with_group = |mut attributes: Vec<KeyValue>| {
            if !private {
                attributes.push(group.clone());
            }
            attributes
        };
        let settle = |name| {
            let mut attributes = self.attributes(name, &destination);
            attributes.push(KeyValue::new("messaging.operation.type", "settle"));
            with_group(attributes)
        };
        ProcessSets {
            process: with_group(self.attributes("process", &destination)),
            ack: settle("ack"),
            nack: settle("nack"),
            dead_letter: settle("dead_letter"),
            destination,
            group,
            private,
        }
    }
}

/// The attributes of a single message, on `send` and `process` spans.
pub(super) fn message_attributes(m: &Message) -> Vec<KeyValue> {
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
pub(super) fn creation_context(headers: &Headers) -> Context {
    global::get_text_map_propagator(|p| {
        p.extract_with_context(&Context::new(), &HeaderReader(headers))
    })
}

/// Write `cx` into `headers`, through the application's propagator.
pub(super) fn inject(cx: &Context, headers: &mut Headers) {
    global::get_text_map_propagator(|p| p.inject_context(cx, &mut HeaderInjector(headers)));
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
