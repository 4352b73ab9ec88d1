//! Stage 5: batch flush. Items of committed store transactions wait here until the batch is
//! big or old enough; then they and the checkpoint (the last commit's end LSN) are written
//! in one queue transaction, and only after that commit is the LSN confirmed to the server.

use std::time::{Duration, Instant};

use super::error::Result;
use crate::queue::{self, batch, batch::Item};

#[derive(Default)]
pub struct Pending {
    items: Vec<Item>,
    events: usize,
    end: Option<u64>,
    since: Option<Instant>,
}

impl Pending {
    /// Adds a committed transaction's items; returns true when the batch should be flushed
    /// now (it holds `batch_events` events or more).
    pub fn commit(&mut self, items: Vec<Item>, end_lsn: u64, batch_events: usize) -> bool {
        self.events += items.iter().filter(|i| matches!(i, Item::Event(_))).count();
        self.items.extend(items);
        self.end = Some(end_lsn);
        self.since.get_or_insert_with(Instant::now);
        self.events >= batch_events
    }

    /// Nothing waits to be written.
    pub fn is_empty(&self) -> bool {
        self.end.is_none()
    }

    /// When the oldest waiting commit must be flushed at the latest.
    pub fn deadline(&self, flush_after: Duration) -> Option<tokio::time::Instant> {
        self.since
            .map(|t| tokio::time::Instant::from_std(t + flush_after))
    }

    /// The waiting batch as a job for the writer; `None` when nothing waits.
    pub fn take(&mut self) -> Option<Job> {
        let end = self.end?;
        let items = std::mem::take(&mut self.items);
        *self = Pending::default();
        Some(Job::Batch { items, end })
    }
}

/// What the queue writer does, in the order the stream sends it.
pub enum Job {
    /// Events of whole store transactions and the checkpoint at the last one's end.
    Batch { items: Vec<Item>, end: u64 },
    /// Nothing of ours is waiting up to this position: move the checkpoint there.
    Advance(u64),
}

/// The queue writer, run beside the stream so decoding and matching go on while a batch is
/// written (Postgres does that work in its own process). Jobs are written one at a time, in
/// order; each one's LSN is acknowledged only after its commit, and the stream confirms it
/// to the server only then (invariant 2). The first error ends the writer after it has been
/// acknowledged; the stream then stops and restarts from the checkpoint.
pub async fn writer(
    qc: &mut tokio_postgres::Client,
    slot: &str,
    mut jobs: tokio::sync::mpsc::Receiver<Job>,
    acks: tokio::sync::mpsc::Sender<Result<u64>>,
) {
    while let Some(job) = jobs.recv().await {
        let r = match job {
            Job::Batch { items, end } => write(qc, slot, &items, end).await,
            Job::Advance(lsn) => batch::advance(qc, slot, lsn)
                .await
                .map(|()| lsn)
                .map_err(Into::into),
        };
        let failed = r.is_err();
        if acks.send(r).await.is_err() || failed {
            return;
        }
    }
}

async fn write(
    qc: &mut tokio_postgres::Client,
    slot: &str,
    items: &[Item],
    end: u64,
) -> Result<u64> {
    let t = Instant::now();
    let n = batch::write(qc, slot, items, end).await?;
    metrics::counter!(crate::metrics::EVENTS_QUEUED).increment(n as u64);
    metrics::histogram!(crate::metrics::BATCH_WRITE_SECONDS).record(t.elapsed().as_secs_f64());
    metrics::gauge!(crate::metrics::CHECKPOINT_LSN).set(end as f64);
    tracing::debug!(events = n, lsn = %queue::lsn_text(end), "queued batch");
    Ok(end)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flush_is_due_by_event_count_and_deadline_starts_at_first_commit() {
        let mut p = Pending::default();
        assert!(p.deadline(Duration::from_millis(20)).is_none());
        let del = || Item::DeleteTopic {
            store_id: "t".into(),
        };
        // Control items do not count towards the batch size.
        assert!(!p.commit(vec![del(), del()], 10, 1));
        assert!(p.deadline(Duration::from_millis(20)).is_some());
        assert_eq!(p.end, Some(10));
        assert!(!p.commit(vec![], 20, 1));
        assert_eq!(
            p.end,
            Some(20),
            "the checkpoint is the last commit's end LSN"
        );
    }
}
