//! The dedicated LISTEN connection: turns NOTIFYs from capture and dispatch into wake-ups.

use futures::StreamExt;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use tokio_postgres::AsyncMessage;

use super::{DeliveryError, Wakers};
use crate::error::{supervise, Backoff};
use crate::queue::store_topics::TOPIC_CHANNEL;
use crate::queue::{DELIVERY_CHANNEL, EVENT_CHANNEL};

pub(super) async fn run(
    url: String,
    wakers: Arc<Wakers>,
    shutdown: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let backoff = Backoff {
        initial: Duration::from_secs(1),
        max: Duration::from_secs(5),
        ..Backoff::default()
    };
    supervise("listen", backoff, shutdown.clone(), || {
        listen_once(&url, &wakers, shutdown.clone())
    })
    .await
    .map_err(|e| anyhow::Error::new(crate::error::Fatal::from("listen", &e)))
}

async fn listen_once(
    url: &str,
    wakers: &Wakers,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(), DeliveryError> {
    let (client, mut conn) = crate::db::connect_driven(url)
        .await
        .map_err(crate::queue::QueueError::from)?;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let driver = tokio::spawn(async move {
        let mut stream = futures::stream::poll_fn(move |cx| conn.poll_message(cx));
        while let Some(m) = stream.next().await {
            match m {
                Ok(AsyncMessage::Notification(n)) => {
                    let note = (n.channel().to_string(), n.payload().to_string());
                    if tx.send(note).is_err() {
                        break;
                    }
                }
                Ok(_) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    });
    client
        .batch_execute(&format!(
            "LISTEN {EVENT_CHANNEL}; LISTEN {DELIVERY_CHANNEL}; LISTEN {TOPIC_CHANNEL}"
        ))
        .await?;
    // Whatever was notified before LISTEN took effect (or while it was down) is picked up
    // by a full round.
    wakers.wake_all();
    loop {
        tokio::select! {
            m = rx.recv() => {
                let Some((channel, topic)) = m else { break };
                route(wakers, &channel, &topic);
            }
            _ = shutdown.changed() => return Ok(()),
        }
    }
    match driver.await {
        Ok(Err(e)) => Err(e.into()),
        _ => Err(DeliveryError::ListenClosed),
    }
}

fn route(wakers: &Wakers, channel: &str, topic: &str) {
    if channel == TOPIC_CHANNEL {
        wakers.topic_changed();
    } else if let Some(w) = wakers.get(topic) {
        if channel == EVENT_CHANNEL {
            w.events.notify_one();
        } else {
            w.deliveries.notify_one();
        }
    }
}
