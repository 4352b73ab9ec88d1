//! Stage 5: batch flush. Items of committed store transactions wait here until the batch is
//! big or old enough; then they and the checkpoint (the last commit's end LSN) are written
//! in one queue transaction, and only after that commit is the LSN confirmed to the server.

use std::time::{Duration, Instant};

use super::error::{CaptureError, Result};
use crate::queue::{self, batch, batch::Item};

#[derive(Default)]
pub(crate) struct Pending {
    items: Vec<Item>,
    events: usize,
    end: Option<u64>,
    since: Option<Instant>,
}

impl Pending {
    /// Adds a committed transaction's items; returns true when the batch should be flushed
    /// now (it holds `batch_events` events or more).
    pub(crate) fn commit(&mut self, items: Vec<Item>, end_lsn: u64, batch_events: usize) -> bool {
        self.events += items.iter().filter(|i| matches!(i, Item::Event(_))).count();
        self.items.extend(items);
        self.end = Some(end_lsn);
        self.since.get_or_insert_with(Instant::now);
        self.events >= batch_events
    }

    /// Nothing waits to be written.
    pub(crate) fn is_empty(&self) -> bool {
        self.end.is_none()
    }

    /// When the waiting commits go to the writer, which must be idle (`idle_since_flush`:
    /// when the last batch went to it, `None` while it is busy): at once (latency), but no sooner than `flush_after / 4`
    /// after the last batch, so under a stream of small commits each queue write (and the
    /// dispatch round it wakes) carries several of them; and at the latest `flush_after`
    /// after the oldest one. `None` for a busy writer or when nothing waits: the batch
    /// then grows while the stream reads on, and goes as soon as the writer acknowledges
    /// (or when it holds `batch_events`). Handing a busy writer a second batch made the
    /// stream wait for it with the next one, and stop reading the slot meanwhile: under a
    /// load, a queue commit waits for the WAL the store's writers flush, and the walsender,
    /// blocked on a full socket, slept a third of the time while the slot fell behind
    /// (`/proc/<pid>/schedstat` during bench.sh's 4-writer load).
    pub(crate) fn deadline(
        &self,
        flush_after: Duration,
        idle_since_flush: Option<Instant>,
    ) -> Option<tokio::time::Instant> {
        let since = self.since?;
        let last = idle_since_flush?;
        let at = (since + flush_after).min(since.max(last + flush_after / 4));
        Some(tokio::time::Instant::from_std(at))
    }

    /// The waiting batch as a job for the writer; `None` when nothing waits.
    pub(crate) fn take(&mut self) -> Option<Job> {
        let end = self.end?;
        let items = std::mem::take(&mut self.items);
        *self = Pending::default();
        Some(Job::Batch { items, end })
    }

    /// The waiting items without their checkpoint: they go first into the queue
    /// transaction a large store transaction opens, and commit with it.
    pub(crate) fn take_items(&mut self) -> Vec<Item> {
        let items = std::mem::take(&mut self.items);
        *self = Pending::default();
        items
    }
}

/// What the queue writer does, in the order the stream sends it.
pub(crate) enum Job {
    /// Events of whole store transactions and the checkpoint at the last one's end.
    Batch { items: Vec<Item>, end: u64 },
    /// Part of a large store transaction that is still being read: written into a queue
    /// transaction left open until the `Batch` that ends it, which holds the rest and the
    /// checkpoint at the store commit (so memory stays flat whatever the transaction size,
    /// and a crash before that commit rolls the part back: queued once).
    Chunk(Vec<Item>),
    /// Nothing of ours is waiting up to this position: move the checkpoint there.
    Advance(u64),
}

/// The queue writer, run beside the stream so decoding and matching go on while a batch is
/// written (Postgres does that work in its own process). Jobs are written one at a time, in
/// order; each one's LSN is acknowledged only after its commit, and the stream confirms it
/// to the server only then (invariant 2). The first error ends the writer after it has been
/// acknowledged; the stream then stops and restarts from the checkpoint.
pub(crate) async fn writer(
    qc: &mut tokio_postgres::Client,
    slot: &str,
    mut jobs: tokio::sync::mpsc::Receiver<Job>,
    acks: tokio::sync::mpsc::Sender<Result<u64>>,
) {
    while let Some(job) = jobs.recv().await {
        let r = match job {
            Job::Batch { items, end } => write(qc, slot, &items, end).await,
            Job::Chunk(items) => chunked(qc, slot, items, &mut jobs).await,
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
    if n > 0 {
        crate::failpoints::hit(crate::failpoints::QUEUE_COMMITTED);
    }
    queued(t, n, end);
    Ok(end)
}

/// One queue transaction for a large store transaction: this chunk, the next ones, then
/// the `Batch` that commits it with the checkpoint. When the stream stops before that, the
/// transaction is rolled back (dropped) and a restart reads the store transaction again.
async fn chunked(
    qc: &mut tokio_postgres::Client,
    slot: &str,
    first: Vec<Item>,
    jobs: &mut tokio::sync::mpsc::Receiver<Job>,
) -> Result<u64> {
    let t = Instant::now();
    let mut open = batch::Open::begin(qc).await?;
    open.items(&first).await?;
    drop(first);
    loop {
        match jobs.recv().await {
            Some(Job::Chunk(items)) => open.items(&items).await?,
            Some(Job::Batch { items, end }) => {
                open.items(&items).await?;
                let n = open.commit(slot, end).await?;
                queued(t, n, end);
                return Ok(end);
            }
            // The stream sends no idle position while a store transaction is open.
            Some(Job::Advance(_)) => {
                return Err(CaptureError::Replication(
                    "idle position inside a chunked store transaction".into(),
                ))
            }
            None => {
                return Err(CaptureError::Replication(
                    "stream stopped inside a chunked store transaction; rolled back".into(),
                ))
            }
        }
    }
}

fn queued(t: Instant, n: usize, end: u64) {
    metrics::counter!(crate::metrics::EVENTS_QUEUED).increment(n as u64);
    metrics::histogram!(crate::metrics::BATCH_WRITE_SECONDS).record(t.elapsed().as_secs_f64());
    metrics::gauge!(crate::metrics::CHECKPOINT_LSN).set(end as f64);
    tracing::debug!(events = n, lsn = %queue::lsn_text(end), "queued batch");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flush_is_due_by_event_count_and_deadline_starts_at_first_commit() {
        let mut p = Pending::default();
        let idle = Some(Instant::now());
        assert!(p.deadline(Duration::from_millis(20), idle).is_none());
        let del = || Item::DeleteTopic {
            store_id: "t".into(),
        };
        // Control items do not count towards the batch size.
        assert!(!p.commit(vec![del(), del()], 10, 1));
        assert!(p.deadline(Duration::from_millis(20), idle).is_some());
        assert_eq!(p.end, Some(10));
        assert!(!p.commit(vec![], 20, 1));
        assert_eq!(
            p.end,
            Some(20),
            "the checkpoint is the last commit's end LSN"
        );
    }

    #[test]
    fn an_idle_writer_takes_a_commit_at_once_but_at_most_every_quarter_window_a_busy_one_none() {
        let window = Duration::from_millis(20);
        let mut p = Pending::default();
        let before = Instant::now();
        assert!(!p.commit(vec![], 10, 100));
        let since = p.since.unwrap();
        let at = |d: Option<tokio::time::Instant>| d.unwrap().into_std();
        // Busy writer: no deadline; its acknowledgement re-arms the timer.
        assert!(p.deadline(window, None).is_none());
        // Idle writer, last batch long ago: now (the first commit's time).
        let long_ago = before - Duration::from_secs(1);
        assert_eq!(at(p.deadline(window, Some(long_ago))), since);
        // Idle writer, last batch just now: a quarter window after it.
        let just_now = since;
        assert_eq!(
            at(p.deadline(window, Some(just_now))),
            just_now + window / 4
        );
    }
}
