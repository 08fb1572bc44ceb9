//! What the telemetry cases read (feature `otel-testkit`): the OpenTelemetry
//! SDK installed once per process as the global tracer provider, meter
//! provider and W3C trace-context propagator, recording into its in-memory
//! exporters.
//!
//! Cases of every backend share one recorder (the providers are global), so
//! each case reads only the spans and data points of its own names.

use std::sync::OnceLock;

use opentelemetry::trace::{SpanId, SpanKind, TraceId};
use opentelemetry::{KeyValue, Value, global};
use opentelemetry_sdk::metrics::data::{AggregatedMetrics, MetricData, ResourceMetrics};
use opentelemetry_sdk::metrics::{InMemoryMetricExporter, PeriodicReader, SdkMeterProvider};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{InMemorySpanExporter, SdkTracerProvider, SpanData};

/// The process's recorder.
pub struct Recorder {
    spans: InMemorySpanExporter,
    metrics: InMemoryMetricExporter,
    meter_provider: SdkMeterProvider,
}

/// The recorder, installed as the global providers on first use. Install it
/// before connecting: a [`Bus`](crate::Bus) takes its tracer and meter when
/// it is made.
pub fn recorder() -> &'static Recorder {
    static RECORDER: OnceLock<Recorder> = OnceLock::new();
    RECORDER.get_or_init(|| {
        let spans = InMemorySpanExporter::default();
        // The simple processor exports each span as it ends: a case reads
        // every span of an operation once the operation has returned.
        let tracer_provider = SdkTracerProvider::builder()
            .with_simple_exporter(spans.clone())
            .build();
        global::set_tracer_provider(tracer_provider);
        global::set_text_map_propagator(TraceContextPropagator::new());
        let metrics = InMemoryMetricExporter::default();
        let meter_provider = SdkMeterProvider::builder()
            .with_reader(PeriodicReader::builder(metrics.clone()).build())
            .build();
        global::set_meter_provider(meter_provider.clone());
        Recorder {
            spans,
            metrics,
            meter_provider,
        }
    })
}

impl Recorder {
    /// Every finished span one of whose attributes contains `name`.
    pub fn spans_of(&self, name: &str) -> Vec<SpanData> {
        let all = self.spans.get_finished_spans().unwrap_or_default();
        all.into_iter()
            .filter(|s| {
                s.attributes
                    .iter()
                    .any(|kv| kv.value.as_str().contains(name))
            })
            .collect()
    }

    /// The metrics as of now (cumulative since the process started).
    pub fn metrics(&self) -> Vec<Point> {
        // A flush exports one snapshot; the newest holds the totals.
        self.meter_provider
            .force_flush()
            .expect("flush the metrics");
        let exported = self.metrics.get_finished_metrics().unwrap_or_default();
        exported.last().map(points).unwrap_or_default()
    }
}

/// One data point of a metric: its attributes and value (a sum's or gauge's
/// value, or a histogram's count).
#[derive(Debug, Clone)]
pub struct Point {
    /// The metric's name.
    pub metric: String,
    /// The metric's unit.
    pub unit: String,
    /// The point's attributes.
    pub attributes: Vec<KeyValue>,
    /// A sum's value, or how many values a histogram recorded.
    pub value: f64,
}

impl Point {
    /// The value of attribute `key`, as text.
    pub fn attribute(&self, key: &str) -> Option<String> {
        attribute(&self.attributes, key)
    }
}

fn points(resource: &ResourceMetrics) -> Vec<Point> {
    let mut out = Vec::new();
    for scope in resource.scope_metrics() {
        for metric in scope.metrics() {
            let mut push = |attributes: Vec<KeyValue>, value: f64| {
                out.push(Point {
                    metric: metric.name().to_owned(),
                    unit: metric.unit().to_owned(),
                    attributes,
                    value,
                })
            };
            match metric.data() {
                AggregatedMetrics::U64(MetricData::Sum(sum)) => {
                    for p in sum.data_points() {
                        push(p.attributes().cloned().collect(), p.value() as f64);
                    }
                }
                AggregatedMetrics::I64(MetricData::Sum(sum)) => {
                    for p in sum.data_points() {
                        push(p.attributes().cloned().collect(), p.value() as f64);
                    }
                }
                AggregatedMetrics::U64(MetricData::Gauge(gauge)) => {
                    for p in gauge.data_points() {
                        push(p.attributes().cloned().collect(), p.value() as f64);
                    }
                }
                AggregatedMetrics::F64(MetricData::Histogram(h)) => {
                    for p in h.data_points() {
                        push(p.attributes().cloned().collect(), p.count() as f64);
                    }
                }
                _ => {}
            }
        }
    }
    out
}

/// The value of attribute `key` among `attributes`, as text.
pub fn attribute(attributes: &[KeyValue], key: &str) -> Option<String> {
    attributes
        .iter()
        .find(|kv| kv.key.as_str() == key)
        .map(|kv| match &kv.value {
            Value::String(s) => s.as_str().to_owned(),
            other => other.to_string(),
        })
}

/// A span, as the cases look at it.
pub trait SpanView {
    /// Its attribute `key`, as text.
    fn attr(&self, key: &str) -> Option<String>;
    /// Its trace.
    fn trace_id(&self) -> TraceId;
    /// Its id.
    fn span_id(&self) -> SpanId;
    /// Whether its kind is `kind`.
    fn is(&self, kind: SpanKind) -> bool;
    /// The span contexts it links to, as (trace, span).
    fn linked(&self) -> Vec<(TraceId, SpanId)>;
}

impl SpanView for SpanData {
    fn attr(&self, key: &str) -> Option<String> {
        attribute(&self.attributes, key)
    }

    fn trace_id(&self) -> TraceId {
        self.span_context.trace_id()
    }

    fn span_id(&self) -> SpanId {
        self.span_context.span_id()
    }

    fn is(&self, kind: SpanKind) -> bool {
        self.span_kind == kind
    }

    fn linked(&self) -> Vec<(TraceId, SpanId)> {
        self.links
            .iter()
            .map(|l| (l.span_context.trace_id(), l.span_context.span_id()))
            .collect()
    }
}
