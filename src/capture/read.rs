//! Stage 1, on a task of its own: reads the slot, decodes pgoutput and the profile's rows
//! ([`super::decode`]) and parses the JSON of resources some topic wants, so that work runs
//! on the other core while the stream matches and queues the changes before them. Parsing
//! was about half of capture's CPU (`BENCH_PERF` in scripts/bench.sh).
//!
//! Order is kept: one task, one FIFO channel. A parse ahead is only a cache: where the
//! reader did not parse (a type no topic wanted when it passed, a profile that completes
//! rows from the store, a body that is not JSON), the matcher parses as before.

use futures::FutureExt;
use pgwire_replication::{Lsn, ReplicationClient, ReplicationEvent};
use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, RwLock};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;

use super::decode::{Decoder, RowEvent};
use super::error::{CaptureError, Result};
use crate::fhir::fields::Fields;

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

/// The resource types some active topic triggers on, each with the members its topics
/// read; shared with the stream, which changes it when topics do.
#[derive(Clone, Default)]
pub struct Wanted(Arc<RwLock<HashMap<String, Arc<Fields>>>>);

impl Wanted {
    pub fn set(&self, types: HashMap<String, Arc<Fields>>) {
        if let Ok(mut w) = self.0.write() {
            *w = types;
        }
    }

    /// The members to parse of a `resource_type` resource; `None` when no topic wants it.
    pub fn get(&self, resource_type: &str) -> Option<Arc<Fields>> {
        self.0.read().ok()?.get(resource_type).cloned()
    }
}

/// What the reader task needs besides the replication client.
pub(crate) struct Setup {
    pub(crate) decoder: Decoder,
    pub(crate) wanted: Wanted,
    /// The checkpoint the stream started at: transactions ending before it are skipped by
    /// the assembler, so they are not parsed.
    pub(crate) checkpoint: u64,
    /// False for profiles that complete rows from the store (the id or body may change).
    pub(crate) parse_ahead: bool,
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
    pub(crate) fn spawn(repl: ReplicationClient, setup: Setup) -> Reader {
        let (tx, events) = mpsc::channel(AHEAD / BATCH);
        let (applied, applied_rx) = watch::channel(0);
        let (stop, stop_rx) = oneshot::channel();
        let task = tokio::spawn(run(repl, setup, tx, applied_rx, stop_rx));
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
    mut setup: Setup,
    tx: mpsc::Sender<Result<Vec<Event>>>,
    mut applied: watch::Receiver<u64>,
    mut stop: oneshot::Receiver<()>,
) {
    let mut skip = false;
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
                let (batch, failed) = take_batch(ev, &mut repl, &mut setup, &mut skip);
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
    setup: &mut Setup,
    skip: &mut bool,
) -> (Vec<Event>, Option<CaptureError>) {
    let mut batch = Vec::new();
    let mut next = Some(first);
    while let Some(ev) = next.take() {
        let converted = match ev {
            Ok(Some(ev)) => convert(ev, setup, skip),
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
    (batch, None)
}

/// One replication event; `None` for what the stream does not need.
fn convert(ev: ReplicationEvent, setup: &mut Setup, skip: &mut bool) -> Result<Option<Event>> {
    Ok(Some(match ev {
        ReplicationEvent::Begin {
            final_lsn,
            xid,
            commit_time_micros,
        } => {
            *skip = final_lsn.0 < setup.checkpoint;
            Event::Begin {
                final_lsn: final_lsn.0,
                xid,
                commit_time_micros,
            }
        }
        ReplicationEvent::XLogData { data, .. } => {
            let Some(mut row) = setup.decoder.decode(data)? else {
                return Ok(None);
            };
            let wanted = row.resource_type().and_then(|t| setup.wanted.get(t));
            if let (true, false, Some(fields)) = (setup.parse_ahead, *skip, wanted) {
                row.parse_ahead(fields);
            }
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
