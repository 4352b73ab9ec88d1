//! Stage 1, on a task of its own: reads the slot and decodes pgoutput and the profile's rows
//! ([`super::decode`]), handing them to the stream in batches. Order is kept: one task, one
//! FIFO channel.
//!
//! The JSON is parsed by the matcher, on the stream's task. It was parsed here, ahead, to
//! use the other core; but the parsed values were then freed on another thread than the
//! one that built them, and the allocator's cross-thread frees cost more CPU than the
//! overlap saved (three interleaved `BENCH_ONLY=capture` pairs: 13–37% less daemon CPU per
//! row without it, at the same drain rate). Postgres uses the other core anyway.

use futures::FutureExt;
use pgwire_replication::{Lsn, ReplicationClient, ReplicationEvent};
use std::collections::VecDeque;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;

use super::decode::{Decoder, RowEvent};
use super::error::{CaptureError, Result};

/// Events the reader hands on, in stream order.
const AHEAD: usize = 512;

/// Events handed on at once when more are already waiting: one channel send and at most one
/// wake-up of the stream per batch rather than per row.
const BATCH: usize = 64;

/// A replication event as the stream needs it.
pub(crate) enum Event {
    Begin {
        final_lsn: u64,
        xid: u32,
        commit_time_micros: i64,
    },
    Row(Box<RowEvent>),
    Commit {
        end_lsn: u64,
    },
    /// A keepalive's or a non-transactional message's position: nothing of a store
    /// transaction is before it that the stream has not seen.
    Position(u64),
}

/// The stream's handle on the reader task.
pub(crate) struct Reader {
    events: mpsc::Receiver<Result<Vec<Event>>>,
    /// The rest of the last batch received.
    ready: VecDeque<Event>,
    applied: watch::Sender<u64>,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<()>,
}

impl Reader {
    pub(crate) fn spawn(repl: ReplicationClient, decoder: Decoder) -> Reader {
        let (tx, events) = mpsc::channel(AHEAD / BATCH);
        let (applied, applied_rx) = watch::channel(0);
        let (stop, stop_rx) = oneshot::channel();
        let task = tokio::spawn(run(repl, decoder, tx, applied_rx, stop_rx));
        Reader {
            events,
            ready: VecDeque::new(),
            applied,
            stop: Some(stop),
            task,
        }
    }

    /// The next event; an error when the stream failed or ended. Cancel-safe (the stream
    /// selects on it): nothing is taken from the channel unless it is returned or kept.
    pub(crate) async fn recv(&mut self) -> Result<Event> {
        loop {
            if let Some(e) = self.ready.pop_front() {
                return Ok(e);
            }
            match self.events.recv().await {
                Some(Ok(batch)) => self.ready.extend(batch),
                Some(Err(e)) => return Err(e),
                None => return Err(CaptureError::Replication("replication stream ended".into())),
            }
        }
    }

    /// The next event of the batch already received, without waiting.
    pub(crate) fn ready(&mut self) -> Option<Event> {
        self.ready.pop_front()
    }

    /// Everything up to `lsn` is queued: the server may forget it.
    pub(crate) fn applied(&self, lsn: u64) {
        self.applied.send_replace(lsn);
    }

    /// Stops reading and closes the replication connection.
    pub(crate) async fn shutdown(mut self) {
        self.events.close();
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let _ = self.task.await;
    }
}

async fn run(
    mut repl: ReplicationClient,
    mut decoder: Decoder,
    tx: mpsc::Sender<Result<Vec<Event>>>,
    mut applied: watch::Receiver<u64>,
    mut stop: oneshot::Receiver<()>,
) {
    loop {
        tokio::select! {
            biased;
            _ = &mut stop => break,
            changed = applied.changed() => {
                if changed.is_ok() {
                    repl.update_applied_lsn(Lsn(*applied.borrow_and_update()));
                }
            }
            ev = repl.recv() => {
                let (batch, failed) = take_batch(ev, &mut repl, &mut decoder);
                if !batch.is_empty() && tx.send(Ok(batch)).await.is_err() {
                    break;
                }
                if let Some(e) = failed {
                    let _ = tx.send(Err(e)).await;
                    break;
                }
            }
        }
    }
    repl.shutdown().await.ok();
}

/// Converts `first` and then the events already waiting (at most [`BATCH`]), without
/// waiting for more: the events, and the error that ended the batch, if one did.
fn take_batch(
    first: pgwire_replication::Result<Option<ReplicationEvent>>,
    repl: &mut ReplicationClient,
    decoder: &mut Decoder,
) -> (Vec<Event>, Option<CaptureError>) {
    let mut batch = Vec::new();
    let mut next = Some(first);
    while let Some(ev) = next.take() {
        let converted = match ev {
            Ok(Some(ev)) => convert(ev, decoder),
            Ok(None) => Err(CaptureError::Replication("replication stream ended".into())),
            Err(e) => Err(CaptureError::Replication(e.to_string())),
        };
        match converted {
            Ok(Some(e)) => batch.push(e),
            Ok(None) => {}
            Err(e) => return (batch, Some(e)),
        }
        if batch.len() < BATCH {
            // `recv` takes from the client's channel: dropping it when nothing is waiting
            // loses nothing (the select above drops it the same way).
            next = repl.recv().now_or_never();
        }
    }
    metrics::counter!(crate::metrics::ROWS).increment(decoder.take_rows());
    (batch, None)
}

/// One replication event; `None` for what the stream does not need.
fn convert(ev: ReplicationEvent, decoder: &mut Decoder) -> Result<Option<Event>> {
    Ok(Some(match ev {
        ReplicationEvent::Begin {
            final_lsn,
            xid,
            commit_time_micros,
        } => Event::Begin {
            final_lsn: final_lsn.0,
            xid,
            commit_time_micros,
        },
        ReplicationEvent::XLogData { data, .. } => {
            let Some(row) = decoder.decode(data)? else {
                return Ok(None);
            };
            Event::Row(Box::new(row))
        }
        ReplicationEvent::Commit { end_lsn, .. } => Event::Commit { end_lsn: end_lsn.0 },
        ReplicationEvent::KeepAlive { wal_end, .. } => Event::Position(wal_end.0),
        ReplicationEvent::Message {
            transactional: false,
            lsn,
            ..
        } => Event::Position(lsn.0),
        ReplicationEvent::Message { .. } => return Ok(None),
        ReplicationEvent::StoppedAt { .. } => {
            return Err(CaptureError::Replication(
                "replication stopped at a stop LSN".into(),
            ))
        }
    }))
}
