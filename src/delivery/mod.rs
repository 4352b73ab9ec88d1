//! Delivery: dispatch (events → numbered deliveries, one instance per topic) and send
//! workers (deliveries → notifications, one subscription per worker at a time).
//! Wakes on LISTEN/NOTIFY; timers only cover retries and a missed notification.

mod listen;
pub mod payload;
mod send;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{watch, Notify};

use crate::channel::rest_hook::RestHook;
use crate::config::Config;
use crate::queue::{self, dispatch};

/// Per-topic wake-ups fed by the LISTEN connection.
#[derive(Default)]
pub struct Wakers {
    pub events: HashMap<String, Arc<Notify>>,
    pub deliveries: HashMap<String, Arc<Notify>>,
}

impl Wakers {
    fn for_topics(cfg: &Config) -> Self {
        let mut w = Wakers::default();
        for t in &cfg.topics {
            w.events
                .insert(t.topic.url.clone(), Arc::new(Notify::new()));
            w.deliveries
                .insert(t.topic.url.clone(), Arc::new(Notify::new()));
        }
        w
    }

    fn wake_all(&self) {
        for n in self.events.values().chain(self.deliveries.values()) {
            n.notify_one();
        }
    }
}

/// Runs dispatch and send workers for every configured topic until `shutdown` flips.
pub async fn run(cfg: Arc<Config>, shutdown: watch::Receiver<bool>) -> anyhow::Result<()> {
    {
        let mut c = queue::connect(cfg.queue_url()).await?;
        queue::migrate::run(&mut c).await?;
    }
    let wakers = Arc::new(Wakers::for_topics(&cfg));
    let ctx = Arc::new(send::Ctx {
        cfg: cfg.clone(),
        payloads: payload::Payloads::new(cfg.clone())?,
        channel: RestHook::new(),
        base_url: cfg.api.base_url(),
        format: cfg.source.fhir_version.into(),
    });
    let mut tasks = tokio::task::JoinSet::new();
    tasks.spawn(listen::run(
        cfg.queue_url().to_string(),
        wakers.clone(),
        shutdown.clone(),
    ));
    for t in &cfg.topics {
        let url = t.topic.url.clone();
        tasks.spawn(dispatcher(
            cfg.clone(),
            url.clone(),
            wakers.events[&url].clone(),
            shutdown.clone(),
        ));
        for _ in 0..t.workers {
            tasks.spawn(send::worker(
                ctx.clone(),
                url.clone(),
                wakers.deliveries[&url].clone(),
                shutdown.clone(),
            ));
        }
    }
    // Catch up on whatever was queued while no delivery ran.
    wakers.wake_all();
    while let Some(r) = tasks.join_next().await {
        r??;
    }
    Ok(())
}

async fn dispatcher(
    cfg: Arc<Config>,
    topic: String,
    wake: Arc<Notify>,
    mut shutdown: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let mut client = None;
    loop {
        if *shutdown.borrow() {
            return Ok(());
        }
        if client.is_none() {
            match queue::connect(cfg.queue_url()).await {
                Ok(c) => client = Some(c),
                Err(e) => {
                    tracing::warn!(topic = %topic, error = %e, "dispatch cannot reach the queue")
                }
            }
        }
        if let Some(c) = client.as_mut() {
            match crate::queue::subscriptions::expire(&*c).await {
                Ok(ids) => {
                    for id in ids {
                        tracing::info!(subscription = %id, "subscription end reached; turned off");
                    }
                }
                Err(e) => tracing::warn!(error = %e, "expiring subscriptions failed"),
            }
            loop {
                match dispatch::round(c, &topic, 1000).await {
                    Ok(0) => break,
                    Ok(_) => continue,
                    Err(e) => {
                        tracing::warn!(topic = %topic, error = %e, "dispatch round failed");
                        client = None;
                        break;
                    }
                }
            }
        }
        tokio::select! {
            _ = wake.notified() => {}
            // Covers a NOTIFY lost while the LISTEN connection was down.
            _ = tokio::time::sleep(Duration::from_secs(2)) => {}
            _ = shutdown.changed() => return Ok(()),
        }
    }
}
