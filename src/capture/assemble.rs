//! Stage 2: row events → resource changes of store transactions. Knows the transaction
//! boundaries, skips transactions queued before a restart (end LSN at or below the
//! checkpoint), and pairs each update or delete with the version it replaces: a prior
//! version the profile found earlier in the same transaction (a history row), else the old
//! tuple under REPLICA IDENTITY FULL. Never guessed.

use chrono::{DateTime, TimeZone, Utc};
use std::collections::HashMap;
use std::sync::Arc;

use super::decode::RowEvent;
use super::error::{CaptureError, Result};
use crate::fhir::topic::Interaction;
use crate::store::{Decoded, RowChange};

/// Seconds between the Unix epoch and the Postgres epoch (2000-01-01).
const PG_EPOCH_OFFSET_SECS: i64 = 946_684_800;

pub(crate) fn pg_time(micros: i64) -> DateTime<Utc> {
    Utc.timestamp_micros(micros + PG_EPOCH_OFFSET_SECS * 1_000_000)
        .single()
        .unwrap_or_else(Utc::now)
}

/// The store commit a change belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Commit {
    pub lsn: u64,
    pub xid: u32,
    pub time: DateTime<Utc>,
}

/// A resource change with the version it replaces and its commit.
#[derive(Debug, Clone)]
pub struct ResourceChange {
    pub relation_id: u32,
    /// Shared with the event that carries its body to the queue writer (no copy per row).
    pub current: Arc<RowChange>,
    pub previous: Option<RowChange>,
    pub commit: Commit,
}

struct Open {
    commit: Commit,
    /// Queued before the crash: its end LSN is at or below the checkpoint.
    skip: bool,
    /// Prior versions seen in this transaction, by `(type, id)`.
    prior: HashMap<(String, String), RowChange>,
}

pub struct Assembler {
    checkpoint: u64,
    open: Option<Open>,
}

impl Assembler {
    /// `checkpoint`: the end LSN of the last queued store commit (0 when none).
    pub fn new(checkpoint: u64) -> Self {
        Assembler {
            checkpoint,
            open: None,
        }
    }

    pub fn begin(&mut self, final_lsn: u64, xid: u32, commit_time_micros: i64) {
        self.open = Some(Open {
            commit: Commit {
                lsn: final_lsn,
                xid,
                time: pg_time(commit_time_micros),
            },
            skip: final_lsn < self.checkpoint,
            prior: HashMap::new(),
        });
    }

    /// The resource change a row makes, if any. Rows that are not resources are counted and
    /// logged by reference, never stopping the stream (invariant 5).
    pub fn row(&mut self, mut ev: RowEvent) -> Result<Option<ResourceChange>> {
        let Some(open) = self.open.as_mut() else {
            return Err(CaptureError::Protocol(
                "row change outside a transaction".into(),
            ));
        };
        if open.skip {
            return Ok(None);
        }
        let decoded = std::mem::replace(&mut ev.decoded, Ok(Decoded::Skip));
        let current = match decoded {
            Ok(Decoded::Change(c)) => c,
            Ok(Decoded::PriorVersion(v)) => {
                open.prior
                    .insert((v.resource_type.clone(), v.id.clone()), v);
                return Ok(None);
            }
            Ok(Decoded::Skip) => return Ok(None),
            Err(e) => {
                metrics::counter!(crate::metrics::BAD_ROWS).increment(1);
                tracing::error!(error = %e, "skipping a row that is not a resource");
                return Ok(None);
            }
        };
        let previous = match current.interaction {
            Interaction::Create => None,
            _ => match open
                .prior
                .remove(&(current.resource_type.clone(), current.id.clone()))
            {
                Some(v) => Some(v),
                None => full_old_tuple(&ev),
            },
        };
        Ok(Some(ResourceChange {
            relation_id: ev.relation_id,
            current: Arc::new(current),
            previous,
            commit: open.commit,
        }))
    }

    /// No transaction is open.
    pub(crate) fn is_idle(&self) -> bool {
        self.open.is_none()
    }

    /// Ends the open transaction; its commit, or `None` when it was skipped.
    pub fn commit(&mut self) -> Result<Option<Commit>> {
        let Some(open) = self.open.take() else {
            return Err(CaptureError::Protocol("commit without begin".into()));
        };
        if open.skip {
            metrics::counter!(crate::metrics::SKIPPED_TRANSACTIONS).increment(1);
            return Ok(None);
        }
        Ok(Some(open.commit))
    }
}

/// The old tuple as the previous version, when it is complete (REPLICA IDENTITY FULL; a
/// key-only old tuple has NULLs in the other columns).
fn full_old_tuple(ev: &RowEvent) -> Option<RowChange> {
    let old = ev.old.as_ref()?;
    if old.columns.iter().any(|c| c.is_null() && !c.is_unchanged()) {
        return None;
    }
    ev.table.version(old).ok()
}

#[cfg(test)]
mod tests {
    use super::super::decode::{recorded, Decoder};
    use super::*;
    use crate::store::aidbox::Aidbox;
    use bytes::Buf;
    use std::sync::Arc;

    /// Drives the recorded stream through both stages; returns the changes of each
    /// committed (not skipped) transaction.
    fn replay(checkpoint: u64) -> Vec<Vec<ResourceChange>> {
        let mut d = Decoder::new(Arc::new(Aidbox::new("public", None)));
        let mut a = Assembler::new(checkpoint);
        let mut out = Vec::new();
        let mut txn = Vec::new();
        for m in recorded::aidbox_stream() {
            match m[0] {
                b'B' => {
                    let mut b = &m[1..];
                    let (lsn, time, xid) = (b.get_u64(), b.get_i64(), b.get_u32());
                    a.begin(lsn, xid, time);
                }
                b'C' => {
                    if a.commit().unwrap().is_some() {
                        out.push(std::mem::take(&mut txn));
                    }
                    txn.clear();
                }
                _ => {
                    if let Some(r) = d.decode(m).unwrap() {
                        txn.extend(a.row(r).unwrap());
                    }
                }
            }
        }
        out
    }

    #[test]
    fn transactions_pair_updates_and_deletes_with_their_history_rows() {
        let txns = replay(0);
        // The rolled-back transaction never reaches the stream.
        assert_eq!(txns.len(), 4);
        let (create, update, pair, delete) = (&txns[0], &txns[1], &txns[2], &txns[3]);
        assert_eq!(create.len(), 1);
        assert_eq!(create[0].current.interaction, Interaction::Create);
        assert!(create[0].previous.is_none());

        assert_eq!(
            update.len(),
            1,
            "the history row is not a change of its own"
        );
        let u = &update[0];
        assert_eq!(u.current.interaction, Interaction::Update);
        let prev = u.previous.as_ref().expect("previous version from history");
        assert_eq!(prev.resource().unwrap().unwrap()["status"], "planned");
        assert_eq!(
            u.current.resource().unwrap().unwrap()["status"],
            "in-progress"
        );
        assert_eq!(prev.version_id, create[0].current.version_id);

        let refs: Vec<String> = pair.iter().map(|c| c.current.reference()).collect();
        assert_eq!(refs, vec!["Encounter/e3", "Encounter/e4"]);
        assert_eq!(
            pair[0].commit, pair[1].commit,
            "one transaction, one commit"
        );

        let d = &delete[0];
        assert_eq!(d.current.interaction, Interaction::Delete);
        let prev = d.previous.as_ref().expect("deleted version from history");
        assert_eq!(prev.resource().unwrap().unwrap()["status"], "in-progress");
        // Commits are in stream order.
        assert!(create[0].commit.lsn < u.commit.lsn && u.commit.lsn < d.commit.lsn);
    }

    #[test]
    fn transactions_at_or_below_the_checkpoint_are_skipped() {
        let all = replay(0);
        // A checkpoint just past the update's commit: only later transactions come out.
        let after_update = all[2][0].commit.lsn;
        let rest = replay(after_update);
        assert_eq!(rest.len(), 2);
        assert_eq!(rest[0][0].current.reference(), "Encounter/e3");
    }

    #[test]
    fn rows_outside_a_transaction_are_refused() {
        let mut a = Assembler::new(0);
        assert!(matches!(a.commit(), Err(CaptureError::Protocol(_))));
    }
}
