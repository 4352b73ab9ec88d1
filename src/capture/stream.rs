//! One replication stream with the stages glued together, and the slot kept moving: events
//! of whole transactions are flushed with the checkpoint; when nothing of ours is waiting,
//! the position of a keepalive or of our own WAL heartbeat message is confirmed too, so WAL
//! the cluster writes elsewhere never piles up behind the slot.

use pgwire_replication::ReplicationClient;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, watch};

use super::control::{ActiveTopics, Role};
use super::error::{CaptureError, Result};
use super::read::{Event, Reader};
use super::{assemble, decode, flush, lag, matcher};
use crate::config::Config;
use crate::fhir::search::Searcher;
use crate::queue::{self, batch::Item};
use crate::store::{setup, StoreProfile};

/// Prefix of our WAL heartbeat messages (`pg_logical_emit_message`).
pub(super) const HEARTBEAT_PREFIX: &str = "fhir_cdc_heartbeat";

/// Least time between two idle confirmations (each writes the checkpoint).
const ADVANCE_EVERY: Duration = Duration::from_secs(1);

/// What one replication event asks of the stream.
enum Step {
    Nothing,
    Flush,
    /// The open store transaction holds a batch worth of items: write them now, into a
    /// queue transaction that its commit will close.
    Chunk,
    /// A position with nothing of ours before it that is not handled.
    Position(u64),
}

pub(super) struct Stream<'a> {
    cfg: &'a Config,
    profile: Arc<dyn StoreProfile>,
    assembler: assemble::Assembler,
    topics: ActiveTopics,
    matcher: matcher::Matcher,
    /// Items of the open store transaction, in stream order.
    txn_items: Vec<Item>,
    pending: flush::Pending,
    /// The highest LSN confirmed to the server (and checkpointed).
    confirmed: u64,
    /// Jobs sent to the queue writer and not yet acknowledged.
    in_flight: usize,
    /// Part of the open store transaction went to the writer as chunks: its commit flushes
    /// at once, closing the queue transaction they are in.
    chunked: bool,
    last_advance: Instant,
    /// When the last batch went to the writer (paces flushes to an idle writer).
    last_flush: Instant,
    /// The store connection the WAL heartbeat is written on; `None` when off.
    heartbeat: Option<tokio_postgres::Client>,
    /// Commit time of the store transaction being read (Postgres-epoch µs).
    open_commit: Option<i64>,
    health: Arc<lag::Health>,
}

impl<'a> Stream<'a> {
    pub(super) fn new(
        cfg: &'a Config,
        profile: &Arc<dyn StoreProfile>,
        topics: ActiveTopics,
        searcher: &Arc<Searcher>,
        checkpoint: u64,
        health: Arc<lag::Health>,
    ) -> Self {
        Stream {
            cfg,
            matcher: matcher::Matcher::new(searcher.clone()),
            profile: profile.clone(),
            assembler: assemble::Assembler::new(checkpoint),
            topics,
            txn_items: Vec::new(),
            pending: flush::Pending::default(),
            confirmed: checkpoint,
            in_flight: 0,
            chunked: false,
            last_advance: Instant::now(),
            last_flush: Instant::now(),
            heartbeat: None,
            open_commit: None,
            health,
        }
    }

    /// Streams until shutdown or an error, with the queue writer beside it on `qc`: a task
    /// of its own, so encoding a batch runs on the other core while the next is matched.
    pub(super) async fn run(
        &mut self,
        mut qc: tokio_postgres::Client,
        repl: ReplicationClient,
        shutdown: &mut watch::Receiver<bool>,
    ) -> Result<()> {
        // One batch written while the next is matched; the writer acknowledges at most a few.
        let (jobs, job_rx) = mpsc::channel(1);
        let (ack_tx, acks) = mpsc::channel(8);
        let slot = self.cfg.source.slot.clone();
        let writer =
            tokio::spawn(async move { flush::writer(&mut qc, &slot, job_rx, ack_tx).await });
        // `jobs` is dropped when the stream returns: the writer finishes what it was sent
        // (what it commits is checkpointed and a restart skips it), then ends.
        self.matcher.set_wanted(self.topics.fields());
        let reader = Reader::spawn(repl, decode::Decoder::new(self.profile.clone()));
        let r = self.stream(reader, shutdown, jobs, acks).await;
        if let Err(e) = writer.await {
            tracing::error!(error = %e, "queue writer task failed");
        }
        r
    }

    async fn stream(
        &mut self,
        mut repl: Reader,
        shutdown: &mut watch::Receiver<bool>,
        jobs: mpsc::Sender<flush::Job>,
        mut acks: mpsc::Receiver<Result<u64>>,
    ) -> Result<()> {
        let src = &self.cfg.source;
        let flush_after = Duration::from_millis(self.cfg.queue.flush_ms);
        let mut sync = interval(src.publication_refresh_secs);
        let mut beat = interval(src.wal_heartbeat_secs.max(1));
        if src.wal_heartbeat_secs > 0 {
            self.heartbeat = queue::connect(&src.url).await.ok();
        }
        // One timer, moved only when the deadline changes: a new one per message costs a
        // timer-wheel registration for every row.
        let timer = tokio::time::sleep(Duration::ZERO);
        tokio::pin!(timer);
        let mut armed = None;
        loop {
            let idle = (self.in_flight == 0).then_some(self.last_flush);
            let deadline = self.pending.deadline(flush_after, idle);
            if deadline != armed {
                if let Some(d) = deadline {
                    timer.as_mut().reset(d);
                }
                armed = deadline;
            }
            tokio::select! {
                ev = repl.recv() => {
                    // The rest of the reader's batch is handled here too, not one event per
                    // turn of this select (which polls every branch, timers included): up
                    // to the first step that writes, so acknowledgements are still read
                    // between two jobs.
                    let mut ev = ev?;
                    loop {
                        match self.handle(ev).await? {
                            Step::Nothing => {}
                            Step::Flush => { self.flush(&jobs, &mut acks).await?; break }
                            Step::Chunk => { self.chunk(&jobs, &mut acks).await?; break }
                            Step::Position(lsn) => { self.advance(&jobs, &mut acks, lsn).await?; break }
                        }
                        match repl.ready() {
                            Some(next) => ev = next,
                            None => break,
                        }
                    }
                }
                ack = acks.recv() => {
                    let lsn = ack.ok_or_else(|| CaptureError::Replication("queue writer stopped".into()))??;
                    self.acked(&repl, lsn);
                }
                _ = &mut timer, if deadline.is_some() => {
                    self.flush(&jobs, &mut acks).await?;
                }
                _ = sync.tick() => sync_publication(self.cfg, self.profile.as_ref()).await,
                _ = beat.tick(), if self.heartbeat.is_some() => self.beat().await,
                _ = shutdown.changed() => {
                    // The writer finishes what it was sent; what it commits is checkpointed,
                    // and a restart skips it.
                    self.flush(&jobs, &mut acks).await?;
                    repl.shutdown().await;
                    return Ok(());
                }
            }
        }
    }

    /// Handles one replication event.
    async fn handle(&mut self, ev: Event) -> Result<Step> {
        match ev {
            Event::Begin {
                final_lsn,
                xid,
                commit_time_micros,
            } => {
                self.open_commit = Some(commit_time_micros);
                self.health.received(commit_time_micros);
                self.assembler.begin(final_lsn, xid, commit_time_micros)
            }
            Event::Row(row) => {
                if let Some(change) = self.assembler.row(*row)? {
                    self.change(change).await?;
                    if self.txn_items.len() >= self.cfg.queue.batch_events {
                        return Ok(Step::Chunk);
                    }
                }
            }
            Event::Commit { end_lsn } => {
                let items = std::mem::take(&mut self.txn_items);
                self.open_commit = None;
                if self.assembler.commit()?.is_some() {
                    let batch = self.cfg.queue.batch_events;
                    let full = self.pending.commit(items, end_lsn, batch);
                    // Otherwise the flush deadline decides (see `Pending::deadline`).
                    if full || std::mem::take(&mut self.chunked) {
                        return Ok(Step::Flush);
                    }
                } else if self.pending.is_empty() {
                    // Nothing of this transaction is for us, and nothing waits.
                    self.health.queued(None);
                }
            }
            Event::Position(lsn) => return Ok(Step::Position(lsn)),
        }
        Ok(Step::Nothing)
    }

    /// One resource change: completed from the store when the profile needs it, then control
    /// rows update the topics and resource changes are matched.
    async fn change(&mut self, mut change: assemble::ResourceChange) -> Result<()> {
        // `[source] tenants`: other tenants' changes are not ours to read further.
        if let Some(tenants) = &self.cfg.source.tenants {
            let tenant = change.current.tenant.as_deref().unwrap_or_default();
            if !tenants.iter().any(|t| t == tenant) {
                return Ok(());
            }
        }
        if self.profile.completes() {
            let (current, previous) = (Arc::make_mut(&mut change.current), &mut change.previous);
            match self.profile.complete(current, previous).await {
                // A row whose resource the store no longer knows (HAPI: no hfj_resource
                // row for its res_id) has no logical id to notify about.
                Ok(()) if current.key.is_some() => {
                    metrics::counter!(crate::metrics::BAD_ROWS).increment(1);
                    tracing::error!(resource_type = %current.resource_type, "a version row whose resource is not in the store; skipped");
                    return Ok(());
                }
                Ok(()) => crate::store::settle(current, previous),
                // Retrying reads the stream again from the checkpoint: nothing is lost.
                Err(e) if e.kind() == crate::error::ErrorKind::Retryable => return Err(e.into()),
                Err(e) => {
                    metrics::counter!(crate::metrics::BAD_ROWS).increment(1);
                    tracing::error!(resource = %current.reference(), error = %e, "previous version not read; the change is matched without it");
                }
            }
        }
        let role = self.topics.classify(&change, self.cfg);
        if matches!(
            change.current.resource_type.as_str(),
            "Subscription" | "SubscriptionTopic" | "Basic"
        ) {
            // Topics may have changed: the matcher parses what they now read.
            self.matcher.set_wanted(self.topics.fields());
        }
        match role {
            Role::Control(item) => self.txn_items.extend(item),
            Role::Resource(item) => {
                self.txn_items.extend(item);
                let event = self.matcher.event(&self.topics.active, &change).await;
                self.txn_items.extend(event.map(Item::Event));
            }
        }
        Ok(())
    }

    /// Hands the waiting batch to the writer (waiting while it is busy: the slot is then
    /// read no faster than the queue is written).
    async fn flush(
        &mut self,
        jobs: &mpsc::Sender<flush::Job>,
        acks: &mut mpsc::Receiver<Result<u64>>,
    ) -> Result<()> {
        match self.pending.take() {
            Some(job) => {
                self.last_flush = Instant::now();
                self.send(job, jobs, acks).await
            }
            None => Ok(()),
        }
    }

    /// Hands what waits and the open transaction's items so far to the writer, which keeps
    /// them in an open queue transaction (waiting while it is busy, so at most a few chunks
    /// are in memory whatever the store transaction's size).
    async fn chunk(
        &mut self,
        jobs: &mpsc::Sender<flush::Job>,
        acks: &mut mpsc::Receiver<Result<u64>>,
    ) -> Result<()> {
        let mut items = self.pending.take_items();
        items.append(&mut std::mem::take(&mut self.txn_items));
        self.chunked = true;
        metrics::counter!(crate::metrics::CHUNKS).increment(1);
        hand_over(flush::Job::Chunk(items), jobs, acks).await
    }

    async fn send(
        &mut self,
        job: flush::Job,
        jobs: &mpsc::Sender<flush::Job>,
        acks: &mut mpsc::Receiver<Result<u64>>,
    ) -> Result<()> {
        hand_over(job, jobs, acks).await?;
        self.in_flight += 1;
        Ok(())
    }

    /// A job is committed: only now may the server forget the WAL up to `lsn`.
    fn acked(&mut self, repl: &Reader, lsn: u64) {
        repl.applied(lsn);
        self.confirmed = self.confirmed.max(lsn);
        self.last_advance = Instant::now();
        self.in_flight = self.in_flight.saturating_sub(1);
        if self.in_flight == 0 && self.pending.is_empty() {
            self.health.queued(self.open_commit);
        }
    }

    /// Confirms `lsn` when nothing of ours before it is open or waiting: every store commit
    /// up to it is queued or has nothing for us. The checkpoint moves first, so the slot is
    /// never confirmed past it (invariant 2).
    async fn advance(
        &mut self,
        jobs: &mpsc::Sender<flush::Job>,
        acks: &mut mpsc::Receiver<Result<u64>>,
        lsn: u64,
    ) -> Result<()> {
        let idle = self.assembler.is_idle()
            && self.pending.is_empty()
            && self.txn_items.is_empty()
            && self.in_flight == 0;
        if !idle || lsn <= self.confirmed || self.last_advance.elapsed() < ADVANCE_EVERY {
            return Ok(());
        }
        self.send(flush::Job::Advance(lsn), jobs, acks).await?;
        metrics::gauge!(crate::metrics::CHECKPOINT_LSN).set(lsn as f64);
        tracing::trace!(lsn = %queue::lsn_text(lsn), "idle position sent to be confirmed");
        Ok(())
    }

    /// Writes our WAL heartbeat; turned off with one log line when the user may not.
    async fn beat(&mut self) {
        let Some(c) = &self.heartbeat else { return };
        if let Err(e) = setup::emit_heartbeat(c, HEARTBEAT_PREFIX).await {
            tracing::warn!(error = %e, "WAL heartbeat (pg_logical_emit_message) failed; turned off. On a quiet store database the slot then advances only on keepalives");
            self.heartbeat = None;
        }
    }
}

async fn hand_over(
    job: flush::Job,
    jobs: &mpsc::Sender<flush::Job>,
    acks: &mut mpsc::Receiver<Result<u64>>,
) -> Result<()> {
    if jobs.send(job).await.is_err() {
        // The writer stopped: its error is in the acknowledgements.
        return match acks.try_recv() {
            Ok(Err(e)) => Err(e),
            _ => Err(CaptureError::Replication("queue writer stopped".into())),
        };
    }
    Ok(())
}

fn interval(secs: u64) -> tokio::time::Interval {
    let every = Duration::from_secs(secs.max(1));
    let mut i = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    i.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    i
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
