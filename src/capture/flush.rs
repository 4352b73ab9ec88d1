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

    /// Writes the batch and the checkpoint; returns the LSN to confirm, if anything was
    /// waiting. The caller confirms it only after this returned.
    pub async fn flush(
        &mut self,
        qc: &mut tokio_postgres::Client,
        slot: &str,
    ) -> Result<Option<u64>> {
        let Some(end) = self.end else {
            return Ok(None);
        };
        let t = Instant::now();
        let n = batch::write(qc, slot, &self.items, end).await?;
        metrics::counter!(crate::metrics::EVENTS_QUEUED).increment(n as u64);
        metrics::histogram!(crate::metrics::BATCH_WRITE_SECONDS).record(t.elapsed().as_secs_f64());
        metrics::gauge!(crate::metrics::CHECKPOINT_LSN).set(end as f64);
        tracing::debug!(events = n, lsn = %queue::lsn_text(end), "queued batch");
        *self = Pending::default();
        Ok(Some(end))
    }
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
