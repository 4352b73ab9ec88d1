//! The dedicated LISTEN connection: turns NOTIFYs from capture and dispatch into wake-ups.

use futures::StreamExt;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use tokio_postgres::{AsyncMessage, NoTls};

use super::Wakers;
use crate::queue::topics::TOPIC_CHANNEL;
use crate::queue::{DELIVERY_CHANNEL, EVENT_CHANNEL};

pub async fn run(
    url: String,
    wakers: Arc<Wakers>,
    mut shutdown: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    loop {
        if let Err(e) = listen_once(&url, &wakers, &mut shutdown).await {
            tracing::warn!(error = %e, "LISTEN connection lost; reconnecting");
        }
        if *shutdown.borrow() {
            return Ok(());
        }
        // Whatever was notified meanwhile is picked up by a full round.
        wakers.wake_all();
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            _ = shutdown.changed() => return Ok(()),
        }
    }
}

async fn listen_once(
    url: &str,
    wakers: &Wakers,
    shutdown: &mut watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let (client, mut conn) = tokio_postgres::connect(url, NoTls).await?;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let driver = tokio::spawn(async move {
        let mut stream = futures::stream::poll_fn(move |cx| conn.poll_message(cx));
        while let Some(m) = stream.next().await {
            match m {
                Ok(AsyncMessage::Notification(n)) => {
                    if tx
                        .send((n.channel().to_string(), n.payload().to_string()))
                        .is_err()
                    {
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
    // Whatever was notified before LISTEN took effect is picked up by a full round.
    wakers.wake_all();
    loop {
        tokio::select! {
            m = rx.recv() => {
                let Some((channel, topic)) = m else { break };
                if channel == TOPIC_CHANNEL {
                    wakers.topics_changed.notify_one();
                } else if let Some(w) = wakers.get(&topic) {
                    if channel == EVENT_CHANNEL {
                        w.events.notify_one();
                    } else {
                        w.deliveries.notify_one();
                    }
                }
            }
            _ = shutdown.changed() => return Ok(()),
        }
    }
    match driver.await {
        Ok(Err(e)) => Err(e.into()),
        _ => anyhow::bail!("LISTEN connection closed"),
    }
}
