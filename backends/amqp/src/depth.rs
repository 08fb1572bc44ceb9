//! What waits for a group: RabbitMQ answers a passive `queue.declare` with the
//! queue's count of ready messages. Asked on demand ([`backlog`], the count of
//! a dead-letter store) and, for telemetry (`polybus.group.depth`, read only with
//! the core's `otel` feature), every two seconds while a subscription lives.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use lapin::Channel;
use lapin::options::QueueDeclareOptions;
use lapin::types::FieldTable;
use polybus_core::{Error, Kind, Result};

use crate::connection::{Connector, map_err};
use crate::subscriber::{CLOSE_RPC_TIMEOUT, Shared};

/// How often the group's depth is asked of the broker, while telemetry reads it.
const DEPTH_PERIOD: Duration = Duration::from_secs(2);

/// Keep `depth` at the group queue's count of ready messages while the
/// subscription lives: RabbitMQ answers a passive `queue.declare` with it.
pub(crate) async fn refresh(shared: Weak<Shared>, depth: Arc<AtomicU64>) {
    let mut channel: Option<Channel> = None;
    let mut tick = tokio::time::interval(DEPTH_PERIOD);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(s) = shared.upgrade() else { break };
        if s.closing.load(Ordering::Acquire) || s.gone.load(Ordering::Acquire) {
            break;
        }
        if channel.as_ref().is_none_or(|c| !c.status().connected()) {
            let deadline = Connector::deadline_in(CLOSE_RPC_TIMEOUT);
            channel = match s.connector.live(deadline).await {
                Ok(live) => live.conn.create_channel().await.ok(),
                Err(_) => None,
            };
        }
        let Some(ch) = &channel else { continue };
        let passive = QueueDeclareOptions {
            passive: true,
            ..QueueDeclareOptions::default()
        };
        let asked = ch.queue_declare(s.sub.group.as_str().into(), passive, FieldTable::default());
        match tokio::time::timeout(CLOSE_RPC_TIMEOUT, asked).await {
            Ok(Ok(queue)) => depth.store(u64::from(queue.message_count()), Ordering::Relaxed),
            // A failed declare closes the channel: open another next time.
            _ => channel = None,
        }
    }
    if let Some(ch) = channel {
        let _ = tokio::time::timeout(CLOSE_RPC_TIMEOUT, ch.close(200, "done".into())).await;
    }
}

/// The ready messages of group `group`'s queue, asked now on a channel of its
/// own; a queue that does not exist holds none. Messages held unsettled by a
/// consumer, or waiting in a retry queue, are not counted.
pub(crate) async fn backlog(connector: &Connector, group: &str) -> Result<u64> {
    let timeout = connector.options.connect_timeout;
    let deadline = Connector::deadline_in(timeout);
    let live = connector.live(deadline).await?;
    let what = format!("cannot count the messages of group `{group}`");
    let asked = async {
        let ch = live
            .conn
            .create_channel()
            .await
            .map_err(|e| map_err(e, &what))?;
        let passive = QueueDeclareOptions {
            passive: true,
            ..QueueDeclareOptions::default()
        };
        match ch
            .queue_declare(group.into(), passive, FieldTable::default())
            .await
        {
            Ok(queue) => {
                let _ = ch.close(200, "done".into()).await;
                Ok(u64::from(queue.message_count()))
            }
            // NOT_FOUND closes the channel: nothing to close.
            Err(e) if not_found(&e) => Ok(0),
            Err(e) => Err(map_err(e, &what)),
        }
    };
    match tokio::time::timeout(timeout, asked).await {
        Ok(counted) => counted,
        Err(_) => Err(Error::new(
            Kind::Timeout,
            format!("{what}: the broker did not answer within {timeout:?}"),
        )),
    }
}

fn not_found(e: &lapin::Error) -> bool {
    use lapin::protocol::{AMQPErrorKind, AMQPSoftError};
    matches!(e.kind(), lapin::ErrorKind::ProtocolError(p)
        if matches!(p.kind(), AMQPErrorKind::Soft(AMQPSoftError::NOTFOUND)))
}
