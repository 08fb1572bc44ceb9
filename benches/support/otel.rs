//! The telemetry variants of the in-memory benches (feature `otel`): which
//! one runs, and the OpenTelemetry SDK some of them install.
//!
//! | label | built with | installed |
//! |---|---|---|
//! | `memory` | no `otel` | nothing: no OpenTelemetry code is compiled |
//! | `memory+otel` | `otel` | nothing: the API's no-op providers |
//! | `memory+otel+sdk` | `otel`, `POLYBUS_BENCH_OTEL_SDK=1` | the SDK sampling every span into a batch processor whose exporter drops them, and a meter provider aggregating every metric |

/// The backend's name in the results, for the variant this run measures.
pub fn label() -> &'static str {
    if !cfg!(feature = "otel") {
        "memory"
    } else if sdk_wanted() {
        "memory+otel+sdk"
    } else {
        "memory+otel"
    }
}

fn sdk_wanted() -> bool {
    std::env::var_os("POLYBUS_BENCH_OTEL_SDK").is_some_and(|v| v == "1")
}

/// Install the SDK if this run asks for it; before any bus is made, since a
/// bus takes its tracer and meter when made.
pub fn install() {
    #[cfg(feature = "otel")]
    if sdk_wanted() {
        use opentelemetry_sdk::metrics::{ManualReader, SdkMeterProvider};
        use opentelemetry_sdk::propagation::TraceContextPropagator;
        use opentelemetry_sdk::trace::{SdkTracerProvider, SpanData, SpanExporter};

        /// An exporter that drops what it gets: the cost measured is the
        /// SDK's and polybus's, not a network's.
        #[derive(Debug)]
        struct Discard;

        impl SpanExporter for Discard {
            async fn export(
                &self,
                batch: Vec<SpanData>,
            ) -> opentelemetry_sdk::error::OTelSdkResult {
                drop(batch);
                Ok(())
            }
        }

        let tracer_provider = SdkTracerProvider::builder()
            .with_batch_exporter(Discard)
            .build();
        opentelemetry::global::set_tracer_provider(tracer_provider);
        opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
        // Never collected: every record is aggregated, as with a real reader.
        let meter_provider = SdkMeterProvider::builder()
            .with_reader(ManualReader::default())
            .build();
        opentelemetry::global::set_meter_provider(meter_provider);
    }
}
