//! Delivery: dispatch (events → numbered deliveries, one instance per topic) and send
//! workers (deliveries → notifications, one subscription per worker at a time).
//! Wakes on LISTEN/NOTIFY; timers only cover retries and a missed notification.

mod listen;
pub mod payload;
mod send;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{watch, Notify};

use crate::channel::rest_hook::RestHook;
use crate::config::Config;
use crate::queue::{self, dispatch};

/// Wake-ups of one topic's dispatcher and send workers.
#[derive(Clone, Default)]
pub struct TopicWakers {
    pub events: Arc<Notify>,
    pub deliveries: Arc<Notify>,
}

/// Per-topic wake-ups fed by the LISTEN connection; topics come and go at run time.
#[derive(Default)]
pub struct Wakers {
    topics: Mutex<HashMap<String, TopicWakers>>,
    /// A store topic appeared, changed or went.
    pub topics_changed: Notify,
}

impl Wakers {
    fn get(&self, topic: &str) -> Option<TopicWakers> {
        self.topics.lock().ok()?.get(topic).cloned()
    }

    /// The wakers of `topic`, and whether they are new.
    fn entry(&self, topic: &str) -> (TopicWakers, bool) {
        let mut m = self.topics.lock().unwrap_or_else(|e| e.into_inner());
        match m.get(topic) {
            Some(w) => (w.clone(), false),
            None => {
                let w = TopicWakers::default();
                m.insert(topic.to_string(), w.clone());
                (w, true)
            }
        }
    }

    fn wake_all(&self) {
        if let Ok(m) = self.topics.lock() {
            for w in m.values() {
                w.events.notify_one();
                w.deliveries.notify_one();
            }
        }
        self.topics_changed.notify_one();
    }
}

/// Runs dispatch and send workers for every topic (configured, and created in the store)
/// until `shutdown` flips.
pub async fn run(
    cfg: Arc<Config>,
    searcher: Arc<crate::fhir::search::Searcher>,
    mut shutdown: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let mut client = queue::connect(cfg.queue_url()).await?;
    queue::migrate::run(&mut client).await?;
    let wakers = Arc::new(Wakers::default());
    let ctx = Arc::new(send::Ctx {
        cfg: cfg.clone(),
        payloads: payload::Payloads::new(cfg.clone(), searcher)?,
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
    loop {
        match queue::topics::all(&client, &cfg).await {
            Ok(topics) => {
                for t in topics {
                    let (w, new) = wakers.entry(&t.url);
                    if !new {
                        continue;
                    }
                    let workers = cfg
                        .topics
                        .iter()
                        .find(|c| c.topic.url == t.url)
                        .map(|c| c.workers)
                        .unwrap_or(cfg.delivery.workers)
                        .max(1);
                    tracing::info!(topic = %t.url, workers, "delivering topic");
                    tasks.spawn(dispatcher(
                        cfg.clone(),
                        t.url.clone(),
                        w.events.clone(),
                        shutdown.clone(),
                    ));
                    for _ in 0..workers {
                        tasks.spawn(send::worker(
                            ctx.clone(),
                            t.url.clone(),
                            w.deliveries.clone(),
                            shutdown.clone(),
                        ));
                    }
                    // Catch up on whatever was queued while no delivery ran.
                    w.events.notify_one();
                    w.deliveries.notify_one();
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot read topics; reconnecting");
                if let Ok(c) = queue::connect(cfg.queue_url()).await {
                    client = c;
                }
            }
        }
        tokio::select! {
            _ = wakers.topics_changed.notified() => {}
            // Covers a NOTIFY lost while the LISTEN connection was down.
            _ = tokio::time::sleep(Duration::from_secs(2)) => {}
            _ = shutdown.changed() => break,
        }
    }
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
    let mut last_retention = std::time::Instant::now() - Duration::from_secs(3600);
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
            // Retention runs at most once a minute per topic.
            if last_retention.elapsed() > Duration::from_secs(60) {
                last_retention = std::time::Instant::now();
                match dispatch::retain(c, &topic, cfg.queue.retention_hours).await {
                    Ok(0) => {}
                    Ok(n) => {
                        tracing::info!(topic = %topic, events = n, "retention removed delivered events")
                    }
                    Err(e) => tracing::warn!(topic = %topic, error = %e, "retention failed"),
                }
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
