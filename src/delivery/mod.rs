//! Delivery: per topic, a send loop (a subscription's events after its cursor →
//! notifications over its channel, one subscription per send task at a time) and
//! housekeeping (subscription ends, retention, gauges). There is no dispatch step: a
//! subscription's matches are computed when it is sent. Wakes on LISTEN/NOTIFY; timers only
//! cover retries and a missed notification.

mod ctx;
pub(crate) mod destinations;
pub mod journal;
mod lease;
mod listen;
mod marks;
mod notify;
mod outcome;
pub mod payload;
pub(crate) mod policy;
mod send;
mod window;
mod worker;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{watch, Notify};

use crate::channel::Channels;
use crate::config::Config;
use crate::error::{supervise, Backoff, Classify, ErrorKind};
use crate::queue::{self, retention, QueueError};
use crate::topic_registry::TopicRegistry;

/// Delivery's one error type: everything that stops a worker is the queue going away.
#[derive(Debug, thiserror::Error)]
pub(crate) enum DeliveryError {
    #[error(transparent)]
    Queue(#[from] QueueError),
    #[error("LISTEN connection closed")]
    ListenClosed,
}

impl From<tokio_postgres::Error> for DeliveryError {
    fn from(e: tokio_postgres::Error) -> Self {
        DeliveryError::Queue(QueueError::Db(e))
    }
}

impl Classify for DeliveryError {
    fn kind(&self) -> ErrorKind {
        match self {
            DeliveryError::Queue(e) => e.kind(),
            DeliveryError::ListenClosed => ErrorKind::Retryable,
        }
    }

    fn remedy(&self) -> Option<String> {
        match self {
            DeliveryError::Queue(e) => e.remedy(),
            DeliveryError::ListenClosed => None,
        }
    }
}

/// Wake-ups of one topic's send loop: capture queued events, or a subscription has new
/// work (created, changed, requeued).
#[derive(Clone, Default)]
pub(crate) struct TopicWakers {
    pub(crate) events: Arc<Notify>,
    pub(crate) deliveries: Arc<Notify>,
}

/// Per-topic wake-ups fed by the LISTEN connection; topics come and go at run time.
pub(crate) struct Wakers {
    topics: Mutex<HashMap<String, TopicWakers>>,
    /// A store topic appeared, changed or went.
    pub(crate) topics_changed: Notify,
    registry: Arc<TopicRegistry>,
}

impl Wakers {
    fn new(registry: Arc<TopicRegistry>) -> Self {
        Wakers {
            topics: Mutex::default(),
            topics_changed: Notify::new(),
            registry,
        }
    }

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

    fn topic_changed(&self) {
        self.registry.invalidate();
        self.topics_changed.notify_one();
    }

    fn wake_all(&self) {
        if let Ok(m) = self.topics.lock() {
            for w in m.values() {
                w.events.notify_one();
                w.deliveries.notify_one();
            }
        }
        self.topic_changed();
    }
}

/// Runs the send loop and housekeeping of every topic (configured, and created in the store)
/// until `shutdown` flips.
pub async fn run(
    cfg: Arc<Config>,
    payloads: payload::Payloads,
    channels: Channels,
    registry: Arc<TopicRegistry>,
    journal: Arc<journal::Journal>,
    mut shutdown: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let mut client = queue::connect(cfg.queue_url()).await?;
    queue::migrate::run(&mut client).await?;
    for task in ["send", "housekeeping", "listen"] {
        queue::fatal::clear(&client, task).await?;
    }
    let sealed = queue::sealed::seal_existing(&client).await?;
    if sealed > 0 {
        tracing::info!(
            subscriptions = sealed,
            "sealed the endpoint secrets written before the [security] key was configured"
        );
    }
    if !cfg.destinations.is_empty() || has_config_rows(&client).await? {
        let topics = registry.all().await?;
        destinations::sync(&client, &cfg, &topics, payloads.search_registry()).await?;
    }
    drop(client);
    let wakers = Arc::new(Wakers::new(registry.clone()));
    let ctx = Arc::new(ctx::Ctx {
        cfg: cfg.clone(),
        policy: policy::SendPolicy::from(&cfg.delivery),
        payloads,
        channels,
        topics: registry.clone(),
        base_url: cfg.api.base_url(),
        format: cfg.source.fhir_version.into(),
        pool: queue::pool(cfg.queue_url(), cfg.delivery.pool_size)?,
        journal,
    });
    let mut tasks = tokio::task::JoinSet::new();
    tasks.spawn(listen::run(
        cfg.queue_url().to_string(),
        wakers.clone(),
        shutdown.clone(),
    ));
    loop {
        match registry.all().await {
            Ok(topics) => {
                for t in topics.iter() {
                    start_topic(&cfg, &ctx, &wakers, &t.url, &mut tasks, &shutdown);
                }
            }
            Err(e) => tracing::warn!(error = %e, "cannot read topics; retrying"),
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

/// Whether destinations were configured before (they may have been removed since).
async fn has_config_rows(c: &tokio_postgres::Client) -> Result<bool, tokio_postgres::Error> {
    c.query_one(
        "SELECT EXISTS (SELECT 1 FROM fhir_cdc.subscription WHERE origin = 'config' AND status <> 'off')",
        &[],
    )
    .await
    .map(|r| r.get(0))
}

/// Starts the send loop and housekeeping of a topic seen for the first time.
fn start_topic(
    cfg: &Arc<Config>,
    ctx: &Arc<ctx::Ctx>,
    wakers: &Wakers,
    url: &str,
    tasks: &mut tokio::task::JoinSet<anyhow::Result<()>>,
    shutdown: &watch::Receiver<bool>,
) {
    let (w, new) = wakers.entry(url);
    if !new {
        return;
    }
    tracing::info!(topic = %url, "delivering topic");
    tasks.spawn(housekeeping(cfg.clone(), url.to_string(), shutdown.clone()));
    tasks.spawn(worker::worker(
        ctx.clone(),
        url.to_string(),
        w.clone(),
        shutdown.clone(),
    ));
    // Catch up on whatever was queued while no delivery ran.
    w.events.notify_one();
    w.deliveries.notify_one();
}

async fn housekeeping(
    cfg: Arc<Config>,
    topic: String,
    shutdown: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let backoff = Backoff {
        initial: Duration::from_secs(1),
        ..Backoff::default()
    };
    supervise("housekeeping", backoff, shutdown.clone(), || {
        run_housekeeping(&cfg, &topic, shutdown.clone())
    })
    .await
    .map_err(|e| {
        let mut f = crate::error::Fatal::from("housekeeping", &e);
        f.error = format!("topic {topic}: {}", f.error);
        anyhow::Error::new(f)
    })
}

/// Every 2 s: subscriptions whose end passed turn off; every 10 s the dead-letter gauge;
/// every minute retention.
async fn run_housekeeping(
    cfg: &Config,
    topic: &str,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(), DeliveryError> {
    let c = queue::connect(cfg.queue_url()).await?;
    let mut last_retention = Instant::now() - Duration::from_secs(3600);
    let mut last_gauge = Instant::now() - Duration::from_secs(3600);
    loop {
        if *shutdown.borrow() {
            return Ok(());
        }
        for id in queue::subscriptions::expire(&c).await? {
            tracing::info!(subscription = %id, "subscription end reached; turned off");
        }
        if last_gauge.elapsed() > Duration::from_secs(10) {
            last_gauge = Instant::now();
            let dead = crate::queue::dead::count_by_topic(&c, topic).await?;
            metrics::gauge!(crate::metrics::DEAD_LETTERS, "topic" => topic.to_string())
                .set(dead as f64);
        }
        if last_retention.elapsed() > Duration::from_secs(60) {
            last_retention = Instant::now();
            let n = retention::retain(&c, topic, cfg.queue.retention_hours).await?;
            if n > 0 {
                tracing::info!(topic = %topic, events = n, "retention removed delivered events");
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(2)) => {}
            _ = shutdown.changed() => return Ok(()),
        }
    }
}
