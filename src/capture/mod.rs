//! Capture, the CDC stage: one logical replication slot in, `fhir_cdc.event` out.
//!
//! The data path, one stage per module, in the order a change flows:
//! 1. [`decode`]: pgoutput messages → row events of the tables the store profile reads;
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
pub mod connect;
pub mod control;
pub mod decode;
pub mod error;
pub mod flush;
pub mod matcher;

use pgwire_replication::{Lsn, ReplicationClient, ReplicationEvent};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

use crate::config::Config;
use crate::error::{supervise, Backoff, Classify};
use crate::fhir::search::Searcher;
use crate::fhir::trigger;
use crate::queue::{self, batch, batch::Item};
use crate::store::{setup, StoreProfile};
use control::{Active, Role, Topics};
use error::{CaptureError, Result};

/// Runs capture until `shutdown` flips, reconnecting with backoff when Postgres goes away
/// and stopping on a fatal error (configuration, an unreadable stream).
///
/// `streaming` is true while the slot is being read: the moment from which every store
/// commit is captured (what `/readyz` reports).
pub async fn run(
    cfg: Arc<Config>,
    profile: Arc<dyn StoreProfile>,
    searcher: Arc<Searcher>,
    streaming: Arc<AtomicBool>,
    shutdown: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    // Configured topics must compile: a typo in a criterion is a configuration error.
    let mut configured = Vec::new();
    for t in &cfg.topics {
        let compiled = trigger::compile(&t.topic, &searcher.registry, &searcher.fp)
            .map_err(|e| anyhow::anyhow!("configuration: {e}"))?;
        configured.push((t.topic.clone(), compiled));
    }
    let configured = &configured;
    let result = supervise("capture", Backoff::default(), shutdown.clone(), || {
        let (cfg, profile, searcher, streaming) = (&cfg, &profile, &searcher, &streaming);
        let mut shutdown = shutdown.clone();
        async move {
            let r = run_once(cfg, profile, configured, searcher, streaming, &mut shutdown).await;
            streaming.store(false, Ordering::SeqCst);
            if r.is_err() {
                metrics::counter!(crate::metrics::CAPTURE_RESTARTS).increment(1);
            }
            r
        }
    })
    .await;
    result.map_err(|e: CaptureError| {
        tracing::error!(error = %e, kind = ?e.kind(), "capture stopped");
        anyhow::anyhow!("capture: {e}")
    })
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
    for (store_id, topic) in queue::topics::load_store(qc).await? {
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
    streaming: &AtomicBool,
    shutdown: &mut watch::Receiver<bool>,
) -> Result<()> {
    let src = &cfg.source;
    let mut qc = queue::connect(cfg.queue_url()).await?;
    queue::migrate::run(&mut qc).await?;
    connect::prepare_store(src, profile.as_ref()).await?;
    if !connect::take_slot_lock(&qc, &src.slot, shutdown).await? {
        return Ok(());
    }
    let checkpoint = batch::checkpoint(&qc, &src.slot).await?.unwrap_or(0);
    let repl = connect::start_replication(src, checkpoint).await?;
    streaming.store(true, Ordering::SeqCst);
    tracing::info!(slot = %src.slot, checkpoint = %queue::lsn_text(checkpoint), "capture streaming");
    let topics = initial_topics(&qc, configured, searcher).await?;
    let mut s = Stream {
        cfg,
        decoder: decode::Decoder::new(profile.clone()),
        assembler: assemble::Assembler::new(checkpoint),
        topics: Topics::new(topics, searcher.clone()),
        matcher: matcher::Matcher::new(searcher.clone()),
        txn_items: Vec::new(),
        pending: flush::Pending::default(),
    };
    s.stream(&mut qc, repl, profile.as_ref(), shutdown).await
}

/// The stages of one stream, glued together.
struct Stream<'a> {
    cfg: &'a Config,
    decoder: decode::Decoder,
    assembler: assemble::Assembler,
    topics: Topics,
    matcher: matcher::Matcher,
    /// Items of the open store transaction, in stream order.
    txn_items: Vec<Item>,
    pending: flush::Pending,
}

impl Stream<'_> {
    async fn stream(
        &mut self,
        qc: &mut tokio_postgres::Client,
        mut repl: ReplicationClient,
        profile: &dyn StoreProfile,
        shutdown: &mut watch::Receiver<bool>,
    ) -> Result<()> {
        let flush_after = Duration::from_millis(self.cfg.queue.flush_ms);
        let every = Duration::from_secs(self.cfg.source.publication_refresh_secs);
        let mut sync = tokio::time::interval(every);
        sync.tick().await;
        loop {
            let deadline = self.pending.deadline(flush_after);
            tokio::select! {
                ev = repl.recv() => {
                    let ev = ev.map_err(|e| CaptureError::Replication(e.to_string()))?
                        .ok_or_else(|| CaptureError::Replication("replication stream ended".into()))?;
                    if self.handle(ev).await? {
                        self.flush(qc, &repl).await?;
                    }
                }
                _ = async { tokio::time::sleep_until(deadline.unwrap_or_else(tokio::time::Instant::now)).await }, if deadline.is_some() => {
                    self.flush(qc, &repl).await?;
                }
                _ = sync.tick() => sync_publication(self.cfg, profile).await,
                _ = shutdown.changed() => {
                    self.flush(qc, &repl).await?;
                    repl.shutdown().await.ok();
                    return Ok(());
                }
            }
        }
    }

    /// Handles one replication event; returns true when the batch should be flushed now.
    async fn handle(&mut self, ev: ReplicationEvent) -> Result<bool> {
        match ev {
            ReplicationEvent::Begin {
                final_lsn,
                xid,
                commit_time_micros,
            } => self.assembler.begin(final_lsn.0, xid, commit_time_micros),
            ReplicationEvent::XLogData { data, .. } => {
                let Some(row) = self.decoder.decode(data)? else {
                    return Ok(false);
                };
                if let Some(change) = self.assembler.row(row)? {
                    self.change(change).await;
                }
            }
            ReplicationEvent::Commit { end_lsn, .. } => {
                let items = std::mem::take(&mut self.txn_items);
                if self.assembler.commit()?.is_some() {
                    let batch = self.cfg.queue.batch_events;
                    return Ok(self.pending.commit(items, end_lsn.0, batch));
                }
            }
            ReplicationEvent::KeepAlive { .. } | ReplicationEvent::Message { .. } => {}
            ReplicationEvent::StoppedAt { .. } => {
                return Err(CaptureError::Replication(
                    "replication stopped at a stop LSN".into(),
                ))
            }
        }
        Ok(false)
    }

    /// One resource change: control rows update the topics; resource changes are matched.
    async fn change(&mut self, change: assemble::ResourceChange) {
        match self.topics.classify(&change, self.cfg) {
            Role::Control(item) => self.txn_items.extend(item),
            Role::Resource(item) => {
                self.txn_items.extend(item);
                let events = self.matcher.events(&self.topics.active, &change).await;
                self.txn_items.extend(events.into_iter().map(Item::Event));
            }
        }
    }

    async fn flush(
        &mut self,
        qc: &mut tokio_postgres::Client,
        repl: &ReplicationClient,
    ) -> Result<()> {
        if let Some(end) = self.pending.flush(qc, &self.cfg.source.slot).await? {
            // Only now, with the events committed, may the server forget this WAL.
            repl.update_applied_lsn(Lsn(end));
        }
        Ok(())
    }
}

/// Adds resource tables created since capture started to the publication. A failure is
/// logged, not fatal: capture of the tables already published goes on.
async fn sync_publication(cfg: &Config, profile: &dyn StoreProfile) {
    let src = &cfg.source;
    let r = async {
        let mut c = queue::connect(&src.url).await?;
        setup::sync_publication(&mut c, profile, &src.publication, src.create_missing).await?;
        Ok::<_, CaptureError>(())
    };
    if let Err(e) = r.await {
        tracing::warn!(publication = %src.publication, error = %e, "publication not brought up to date");
    }
}
