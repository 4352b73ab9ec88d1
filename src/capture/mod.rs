//! Capture, the CDC stage: one logical replication slot in, `fhir_cdc.event` out.
//!
//! The data path, one stage per module, in the order a change flows:
//! 1. [`decode`]: pgoutput messages → row events of the tables the store profile reads,
//!    on a task of its own ([`read`]) that reads the slot;
//! 2. [`assemble`]: row events → resource changes of store transactions, each paired with
//!    the version it replaces; transactions already queued before a restart are skipped;
//! 3. [`control`]: Subscription / SubscriptionTopic rows change what is subscribed;
//! 4. [`matcher`]: resource changes → events of the topics that fire;
//! 5. [`flush`]: events of whole transactions + the checkpoint in one queue transaction;
//!    the LSN is confirmed to the server only after that commit.
//!
//! After a crash the stream restarts at the checkpoint and commits at or below it are
//! skipped, so each change is queued once.

pub mod assemble;
pub(crate) mod connect;
pub mod control;
pub mod decode;
pub(crate) mod error;
pub(crate) mod flush;
pub mod lag;
pub mod matcher;
pub mod read;
mod stream;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use tokio::sync::watch;

use crate::config::Config;
use crate::error::{supervise, Backoff};
use crate::fhir::search::Searcher;
use crate::fhir::trigger;
use crate::queue::{self, batch};
use crate::store::StoreProfile;
use control::{Active, ActiveTopics};
use error::{CaptureError, Result};

/// How this capture process was started.
#[derive(Debug, Clone, Copy, Default)]
pub struct Options {
    /// Replace a lost or missing slot with a new one, accepting the gap (logged).
    pub resync_from_now: bool,
}

/// Runs capture until `shutdown` flips, reconnecting with backoff when Postgres goes away
/// and stopping on a fatal error (configuration, an unreadable stream).
///
/// `health.streaming` is true while the slot is being read: the moment from which every
/// store commit is captured (what `/readyz` reports); the stream also keeps `health`'s lag
/// clock, which [`lag::monitor`] reads with the slot.
pub async fn run(
    cfg: Arc<Config>,
    profile: Arc<dyn StoreProfile>,
    searcher: Arc<Searcher>,
    health: Arc<lag::Health>,
    options: Options,
    shutdown: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    // Configured topics must compile: a typo in a criterion is a configuration error.
    let mut configured = Vec::new();
    for t in &cfg.topics {
        let mut compiled = trigger::compile(&t.topic, &searcher.registry, &searcher.fp)
            .map_err(|e| anyhow::anyhow!("configuration: {e}"))?;
        compiled.on_error = t.on_criteria_error;
        configured.push((t.topic.clone(), compiled));
    }
    let configured = &configured;
    let resync = AtomicBool::new(options.resync_from_now);
    let result = supervise("capture", Backoff::default(), shutdown.clone(), || {
        let (cfg, profile, searcher, health) = (&cfg, &profile, &searcher, &health);
        let resync = &resync;
        let mut shutdown = shutdown.clone();
        async move {
            let r = run_once(
                cfg,
                profile,
                configured,
                searcher,
                health,
                resync,
                &mut shutdown,
            )
            .await;
            health.stopped();
            if r.is_err() {
                metrics::counter!(crate::metrics::CAPTURE_RESTARTS).increment(1);
            }
            r
        }
    })
    .await;
    result.map_err(|e: CaptureError| anyhow::Error::new(crate::error::Fatal::from("capture", &e)))
}

/// The search machinery for the store's FHIR version.
pub async fn searcher(cfg: &Config) -> anyhow::Result<Searcher> {
    Ok(Searcher {
        fp: crate::fhir::fhirpath::FhirPath::new(cfg.source.fhir_version).await?,
        registry: Arc::new(crate::fhir::search::registry::Registry::load(
            cfg.source.fhir_version,
        )),
    })
}

/// The topics in force when the stream starts: configured ones, then store topics
/// recorded by an earlier run.
async fn initial_topics(
    qc: &tokio_postgres::Client,
    configured: &[(crate::fhir::topic::Topic, trigger::Compiled)],
    searcher: &Searcher,
) -> Result<Vec<Active>> {
    let mut topics: Vec<Active> = configured
        .iter()
        .map(|(t, c)| Active::new(t.clone(), c.clone(), None))
        .collect();
    for (store_id, topic) in queue::store_topics::load_store(qc).await? {
        if topics.iter().any(|a| a.topic.url == topic.url) {
            continue;
        }
        match trigger::compile(&topic, &searcher.registry, &searcher.fp) {
            Ok(compiled) => topics.push(Active::new(topic, compiled, Some(store_id))),
            Err(e) => {
                tracing::error!(topic = %store_id, error = %e, "stored topic does not compile; skipped")
            }
        }
    }
    Ok(topics)
}

async fn run_once(
    cfg: &Config,
    profile: &Arc<dyn StoreProfile>,
    configured: &[(crate::fhir::topic::Topic, trigger::Compiled)],
    searcher: &Arc<Searcher>,
    health: &Arc<lag::Health>,
    resync: &AtomicBool,
    shutdown: &mut watch::Receiver<bool>,
) -> Result<()> {
    let src = &cfg.source;
    let mut qc = queue::connect(cfg.queue_url()).await?;
    queue::migrate::run(&mut qc).await?;
    if !connect::take_slot_lock(&qc, &src.slot, shutdown).await? {
        return Ok(());
    }
    let checkpoint = batch::checkpoint(&qc, &src.slot).await?.unwrap_or(0);
    let resync_now = resync.load(Ordering::SeqCst);
    if let Some(gap) = connect::prepare_store(src, profile.as_ref(), checkpoint, resync_now).await?
    {
        queue::gaps::record(&qc, &src.slot, checkpoint, &gap.resumed_at, &gap.reason).await?;
    }
    // `--resync-from-now` applies to the slot found at start, not to a later loss.
    resync.store(false, Ordering::SeqCst);
    let repl = connect::start_replication(src, checkpoint).await?;
    health.streaming.store(true, Ordering::SeqCst);
    queue::fatal::clear(&qc, "capture").await?;
    tracing::info!(slot = %src.slot, checkpoint = %queue::lsn_text(checkpoint), "capture streaming");
    let topics = initial_topics(&qc, configured, searcher).await?;
    let mut s = stream::Stream::new(
        cfg,
        profile,
        ActiveTopics::new(topics, searcher.clone()),
        searcher,
        checkpoint,
        health.clone(),
    );
    s.run(qc, repl, shutdown).await
}
