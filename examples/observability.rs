//! Observability: the quickstart's story with polybus's OpenTelemetry spans,
//! trace context and metrics (feature `otel`), wired to the OpenTelemetry SDK
//! with a stdout span exporter and a Prometheus endpoint.
//!
//! ```text
//! cargo run --example observability --features otel
//! ```
//!
//! It prints each span as it ends (the stdout exporter), then the spans of one
//! message as a tree, then serves the metrics on
//! `http://127.0.0.1:9464/metrics` (`POLYBUS_METRICS_ADDR` to change it) until
//! Ctrl-C. polybus depends on the OpenTelemetry API only; the SDK and the
//! exporters are the application's choice, as here.

use std::collections::HashSet;
use std::time::Duration;

use futures::StreamExt;
use opentelemetry::global;
use opentelemetry::trace::{SpanId, TraceId};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::metrics::SdkMeterProvider;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{InMemorySpanExporter, SdkTracerProvider, SpanData};
use polybus::{Message, RetryPolicy, Subscription};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    // 1. The SDK, installed before connecting: a bus takes its tracer and
    //    meter when it is made. The propagator writes and reads `traceparent`.
    let recorded = InMemorySpanExporter::default();
    let resource = Resource::builder().with_service_name("quickstart").build();
    let tracer_provider = SdkTracerProvider::builder()
        .with_resource(resource.clone())
        .with_simple_exporter(opentelemetry_stdout::SpanExporter::default())
        // Kept too, to print one message's spans as a tree at the end.
        .with_simple_exporter(recorded.clone())
        .build();
    global::set_tracer_provider(tracer_provider.clone());
    global::set_text_map_propagator(TraceContextPropagator::new());
    let registry = prometheus::Registry::new();
    let prometheus_exporter = opentelemetry_prometheus::exporter()
        .with_registry(registry.clone())
        .build()?;
    let meter_provider = SdkMeterProvider::builder()
        .with_resource(resource)
        .with_reader(prometheus_exporter)
        .build();
    global::set_meter_provider(meter_provider.clone());

    // 2. The story: a welcome-email group whose mail server refuses Mallory,
    //    and an audit group that sees everything.
    let bus = polybus::connect("memory://").await?;
    let retry = RetryPolicy::exponential(Duration::from_millis(20))
        .max_attempts(3)
        .jitter(false);
    let mut welcome = bus
        .subscribe(
            Subscription::new("user.created")
                .group("welcome-email")
                .retry(retry),
        )
        .await?;
    let mut audit = bus
        .subscribe(Subscription::new("user.#").group("audit"))
        .await?;
    let mut mallory = String::new();
    for name in ["Alice", "Mallory"] {
        let message = Message::new(format!("{{\"name\":\"{name}\"}}")).with_key(name);
        if name == "Mallory" {
            mallory = message.id().to_owned();
        }
        bus.publish("user.created", message).await?;
    }
    for _ in 0..2 {
        let d = audit.next().await.expect("audit is live")?;
        d.ack().await?;
    }
    let mut settled = 0;
    while settled < 2 {
        let d = welcome.next().await.expect("welcome is live")?;
        if d.message().id() == mallory {
            if d.attempt() == 3 {
                settled += 1;
            }
            d.nack_because("smtp 550: mailbox unavailable").await?;
        } else {
            d.ack().await?;
            settled += 1;
        }
    }
    let mut dead_letters = bus
        .subscribe(Subscription::dead_letters_of("welcome-email"))
        .await?;
    let d = dead_letters.next().await.expect("dead letters are kept")?;
    d.ack().await?;

    // 3. Mallory's message as a tree: its trace, and the retries linked to it.
    let spans = recorded.get_finished_spans()?;
    let send = spans
        .iter()
        .find(|s| {
            s.attributes
                .iter()
                .any(|kv| kv.key.as_str() == "messaging.message.id" && kv.value.as_str() == mallory)
        })
        .expect("the send span of Mallory's message");
    println!("\nthe spans of message {mallory}:");
    print_trace(&spans, send.span_context.trace_id());

    // 4. The metrics, in Prometheus's text format, until Ctrl-C.
    let addr = std::env::var("POLYBUS_METRICS_ADDR").unwrap_or_else(|_| "127.0.0.1:9464".into());
    let listener = tokio::net::TcpListener::bind(&addr).await?;
    println!(
        "\nmetrics: http://{}/metrics (Ctrl-C to stop)",
        listener.local_addr()?
    );
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let (conn, _) = accepted?;
                let body = metrics_text(&registry);
                tokio::spawn(serve(conn, body));
            }
            _ = tokio::signal::ctrl_c() => break,
        }
    }
    bus.close().await?;
    tracer_provider.shutdown()?;
    meter_provider.shutdown()?;
    Ok(())
}

/// The spans of `trace` as a tree, each followed by the spans of other
/// traces that link to it (a retry's `process` span is a root of its own).
fn print_trace(spans: &[SpanData], trace: TraceId) {
    let ids: HashSet<SpanId> = spans
        .iter()
        .filter(|s| s.span_context.trace_id() == trace)
        .map(|s| s.span_context.span_id())
        .collect();
    let mut roots: Vec<&SpanData> = spans
        .iter()
        .filter(|s| s.span_context.trace_id() == trace && !ids.contains(&s.parent_span_id))
        .collect();
    roots.sort_by_key(|s| s.start_time);
    for root in roots {
        print_span(spans, root, 1, "");
    }
}

fn print_span(spans: &[SpanData], span: &SpanData, depth: usize, how: &str) {
    let attribute = |key: &str| {
        span.attributes
            .iter()
            .find(|kv| kv.key.as_str() == key)
            .map(|kv| format!(" {key}={}", kv.value))
            .unwrap_or_default()
    };
    let took = span
        .end_time
        .duration_since(span.start_time)
        .unwrap_or_default();
    println!(
        "{:indent$}{how}{} [{:?}] {:.2} ms{}{}{}",
        "",
        span.name,
        span.span_kind,
        took.as_secs_f64() * 1e3,
        attribute("messaging.consumer.group.name"),
        attribute("polybus.attempt"),
        attribute("error.type"),
        indent = depth * 2
    );
    let id = span.span_context.span_id();
    let mut children: Vec<(&SpanData, &str)> = spans
        .iter()
        .filter(|s| {
            s.parent_span_id == id && s.span_context.trace_id() == span.span_context.trace_id()
        })
        .map(|s| (s, ""))
        .chain(
            spans
                .iter()
                .filter(|s| s.links.iter().any(|l| l.span_context.span_id() == id))
                .filter(|s| s.parent_span_id != id)
                .map(|s| (s, "linked: ")),
        )
        .collect();
    children.sort_by_key(|(s, _)| s.start_time);
    for (child, how) in children {
        print_span(spans, child, depth + 1, how);
    }
}

/// The registry's metrics in Prometheus's text exposition format.
fn metrics_text(registry: &prometheus::Registry) -> String {
    use prometheus::Encoder;
    let mut out = Vec::new();
    let encoder = prometheus::TextEncoder::new();
    if let Err(e) = encoder.encode(&registry.gather(), &mut out) {
        return format!("# encoding failed: {e}\n");
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Answer one HTTP/1.1 request: the metrics on `GET /metrics`, 404 otherwise.
/// (An example's scrape endpoint; a service would mount it in its HTTP server.)
async fn serve(mut conn: tokio::net::TcpStream, metrics: String) {
    let mut request = Vec::new();
    let mut buf = [0; 1024];
    while !request.windows(4).any(|w| w == b"\r\n\r\n") && request.len() < 16 * 1024 {
        match conn.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => request.extend_from_slice(&buf[..n]),
        }
    }
    let (status, body) = if request.starts_with(b"GET /metrics ") {
        ("200 OK", metrics)
    } else {
        ("404 Not Found", "not found\n".to_owned())
    };
    let response = format!(
        "HTTP/1.1 {status}\r\ncontent-type: text/plain; version=0.0.4\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = conn.write_all(response.as_bytes()).await;
}
