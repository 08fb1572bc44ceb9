//! The depth gauge, and the counters of rare events (reconnects, breaker
//! transitions).

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use opentelemetry::metrics::{Counter, Meter, ObservableGauge};
use opentelemetry::{KeyValue, global};

use super::{Instruments, common_attributes, metric, scope};
use crate::backend::{DepthProbe, Endpoint, lock};

/// A subscription the depth gauge reads.
pub(super) struct Watched {
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

impl Instruments {
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
}

/// The `polybus.group.depth` gauge of a bus: each watched subscription's
/// probe, read at collection.
pub(super) fn gauge(meter: &Meter, depths: &Arc<Mutex<Vec<Watched>>>) -> ObservableGauge<u64> {
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
        "Connections to the broker opened again after a loss.",
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
