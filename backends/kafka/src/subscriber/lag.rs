//! Each assigned partition's lag, for telemetry (`polybus.group.depth`, read
//! only with the core's `otel` feature): its high watermark, asked of the
//! broker every [`LAG_PERIOD`], less the offset this member last committed
//! there (before its first commit, where it would commit now: its lowest
//! unsettled record). It is asked only once telemetry first reads the lag, so
//! without a metrics SDK nothing is asked. librdkafka's own statistics are no substitute: they know the high
//! watermark of the member's last fetch only, which stops moving while the
//! member is paused at its prefetch.

use std::sync::Weak;
use std::time::Duration;

use polybus_core::backend::{Depth, lock};

use super::{Phase, Shared};

/// How often the lag is asked of the broker.
const LAG_PERIOD: Duration = Duration::from_secs(2);

/// How long one partition's watermarks may take.
const WATERMARK_TIMEOUT: Duration = Duration::from_secs(1);

/// Keep `Shared::lags` current while the subscription lives.
pub(super) async fn refresh(shared: Weak<Shared>) {
    let mut tick = tokio::time::interval(LAG_PERIOD);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(s) = shared.upgrade() else { return };
        let parts: Vec<_> = {
            let state = s.lock();
            if matches!(state.phase, Phase::Stopping | Phase::Stopped) {
                return;
            }
            state
                .parts
                .iter()
                .map(|(tp, part)| {
                    let from = match part.committed.0 {
                        committed if committed >= 0 => committed,
                        _ => part.position().0,
                    };
                    (tp.clone(), from)
                })
                .filter(|(_, from)| *from >= 0)
                .collect()
        };
        let connector = s.connector.clone();
        drop(s);
        let asked = tokio::task::spawn_blocking(move || {
            let client = rdkafka::producer::Producer::client(&connector.producer);
            parts
                .into_iter()
                .filter_map(|((topic, partition), from)| {
                    let (_, high) = client
                        .fetch_watermarks(topic.as_str(), partition, WATERMARK_TIMEOUT)
                        .ok()?;
                    let lag = u64::try_from(high - from).unwrap_or(0);
                    Some(Depth::partition(topic, partition, lag))
                })
                .collect::<Vec<_>>()
        });
        let Ok(lags) = asked.await else { return };
        match shared.upgrade() {
            Some(s) => *lock(&s.lags) = lags,
            None => return,
        }
    }
}
