//! The topic registry delivery and the API share: the configured topics and those created
//! in the store, read from the queue once and again only after a change (capture NOTIFYs
//! `fhir_cdc_topic`; the LISTEN connection calls [`TopicRegistry::invalidate`], also after it
//! reconnects, so a change missed while it was down is still seen). Capture keeps its own
//! list in stream order, because a topic written into the store applies from its place in
//! the WAL on.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::Mutex;

use crate::config::Config;
use crate::fhir::topic::{Shape, Topic};
use crate::queue::{self, QueueError};

/// Longest a cached list is trusted without a NOTIFY (covers a lost notification).
const MAX_AGE: Duration = Duration::from_secs(30);

pub struct TopicRegistry {
    configured: Vec<Topic>,
    pool: deadpool_postgres::Pool,
    stale: AtomicBool,
    cache: Mutex<Option<(Instant, Arc<Vec<Topic>>)>>,
}

impl TopicRegistry {
    pub fn new(cfg: &Config, pool: deadpool_postgres::Pool) -> Self {
        TopicRegistry {
            configured: cfg.topics.iter().map(|t| t.topic.clone()).collect(),
            pool,
            stale: AtomicBool::new(true),
            cache: Mutex::new(None),
        }
    }

    /// A store topic appeared, changed or went: the next read goes to the queue.
    pub(crate) fn invalidate(&self) {
        self.stale.store(true, Ordering::SeqCst);
    }

    /// Configured topics, then store topics whose url no configured topic has.
    pub(crate) async fn all(&self) -> Result<Arc<Vec<Topic>>, QueueError> {
        let mut cache = self.cache.lock().await;
        if !self.stale.swap(false, Ordering::SeqCst) {
            if let Some((_, list)) = cache.as_ref().filter(|(at, _)| at.elapsed() < MAX_AGE) {
                return Ok(list.clone());
            }
        }
        let list = match self.read().await {
            Ok(l) => Arc::new(l),
            Err(e) => {
                self.stale.store(true, Ordering::SeqCst);
                return Err(e);
            }
        };
        *cache = Some((Instant::now(), list.clone()));
        Ok(list)
    }

    async fn read(&self) -> Result<Vec<Topic>, QueueError> {
        let c = self.pool.get().await?;
        let mut topics = self.configured.clone();
        for (_, t) in queue::store_topics::load_store(&**c).await? {
            if !topics.iter().any(|x| x.url == t.url) {
                topics.push(t);
            }
        }
        Ok(topics)
    }

    /// The notificationShapes of a topic (empty when unknown or unreadable).
    pub(crate) async fn shapes(&self, url: &str) -> Vec<Shape> {
        match self.all().await {
            Ok(list) => list
                .iter()
                .find(|t| t.url == url)
                .map(|t| t.shapes.clone())
                .unwrap_or_default(),
            Err(e) => {
                tracing::warn!(topic = %url, error = %e, "topics unreadable; notification without shapes");
                Vec::new()
            }
        }
    }
}
