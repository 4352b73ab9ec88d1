//! Stage 1: pgoutput messages → row events. Keeps the relation cache: each Relation message
//! is shown to the store profile once, which returns the decoder for that table's rows (or
//! none, for tables it does not read).

use bytes::Bytes;
use pg_walstream::{LogicalReplicationMessage, LogicalReplicationParser, TupleData};
use std::collections::HashMap;
use std::sync::Arc;

use super::error::{CaptureError, Result};
use crate::store::{Decoded, RowError, RowOp, StoreProfile, TableDecoder, TableInfo};

/// One row operation of a table the profile reads, decoded by the profile.
#[derive(Debug)]
pub struct RowEvent {
    pub(crate) relation_id: u32,
    pub(crate) table: Arc<dyn TableDecoder>,
    /// The old tuple, kept for a delete or key-changing update the profile could not decode
    /// into a change (see `assemble`). The new tuple is dropped once decoded. Boxed: a
    /// `TupleData` holds its columns inline (~650 bytes), and an event moves several times
    /// on its way to the assembler; copying that for the `None` of every insert was a
    /// tenth of decoding's instructions.
    pub(crate) old: Option<Box<TupleData>>,
    /// What the profile makes of the row.
    pub(crate) decoded: std::result::Result<Decoded, RowError>,
}

pub struct Decoder {
    profile: Arc<dyn StoreProfile>,
    parser: LogicalReplicationParser,
    relations: HashMap<u32, Option<Arc<dyn TableDecoder>>>,
    /// Row changes decoded since [`Self::take_rows`]: counted into the metric once per
    /// batch, as a registry lookup per row showed in the daemon's profile.
    rows: u64,
}

impl Decoder {
    pub fn new(profile: Arc<dyn StoreProfile>) -> Self {
        Decoder {
            profile,
            parser: LogicalReplicationParser::with_protocol_version(1),
            relations: HashMap::new(),
            rows: 0,
        }
    }

    /// The row changes decoded since the last call.
    pub fn take_rows(&mut self) -> u64 {
        std::mem::take(&mut self.rows)
    }

    /// Decodes one message. `None` for messages that are not row changes of a table the
    /// profile reads (Relation, Type, Origin, rows of other tables, …).
    pub fn decode(&mut self, data: Bytes) -> Result<Option<RowEvent>> {
        let msg = self
            .parser
            .parse_wal_message_bytes(data)
            .map_err(|e| CaptureError::Protocol(e.to_string()))?;
        // Borrowed: a message's tuples hold their columns inline, and moving them out copied
        // them (most of decoding's `memcpy`).
        let (relation_id, op, old, new) = match &msg.message {
            LogicalReplicationMessage::Relation {
                relation_id,
                namespace,
                relation_name,
                columns,
                ..
            } => {
                let info = TableInfo {
                    schema: namespace.to_string(),
                    name: relation_name.to_string(),
                    columns: columns.iter().map(|c| c.name.to_string()).collect(),
                    types: columns.iter().map(|c| c.type_id).collect(),
                };
                self.relations
                    .insert(*relation_id, self.profile.table(&info));
                return Ok(None);
            }
            LogicalReplicationMessage::Insert { relation_id, tuple } => {
                (*relation_id, RowOp::Insert, None, Some(tuple))
            }
            LogicalReplicationMessage::Update {
                relation_id,
                old_tuple,
                new_tuple,
                ..
            } => (
                *relation_id,
                RowOp::Update,
                old_tuple.as_ref(),
                Some(new_tuple),
            ),
            LogicalReplicationMessage::Delete {
                relation_id,
                old_tuple,
                ..
            } => (*relation_id, RowOp::Delete, Some(old_tuple), None),
            LogicalReplicationMessage::Truncate { .. } => {
                tracing::warn!(
                    "TRUNCATE of a store table seen; truncations do not produce notifications"
                );
                return Ok(None);
            }
            _ => return Ok(None),
        };
        self.rows += 1;
        let table = match self.relations.get(&relation_id) {
            Some(Some(t)) => t.clone(),
            Some(None) => return Ok(None),
            None => {
                return Err(CaptureError::Protocol(format!(
                    "row change for relation {relation_id} before its description"
                )))
            }
        };
        let decoded = table.decode(op, old, new);
        Ok(Some(RowEvent {
            relation_id,
            table,
            // Its columns are `Bytes`: cloning counts references, it does not copy them.
            old: old.map(|t| Box::new(t.clone())),
            decoded,
        }))
    }
}

/// Recorded pgoutput messages for the tests of this and the next stages.
#[cfg(test)]
pub(crate) mod recorded {
    use bytes::Bytes;

    pub(crate) fn aidbox_stream() -> Vec<Bytes> {
        include_str!("testdata/aidbox_stream.hex")
            .lines()
            .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
            .map(|l| Bytes::from(hex(l.trim())))
            .collect()
    }

    fn hex(s: &str) -> Vec<u8> {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("hex"))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::aidbox::Aidbox;
    use crate::store::Decoded;

    #[test]
    fn recorded_stream_decodes_to_rows_of_the_profile_tables() {
        let mut d = Decoder::new(Arc::new(Aidbox::new("public", None)));
        let mut rows = Vec::new();
        for m in recorded::aidbox_stream() {
            // Begin and Commit are handled by the replication client before this stage.
            if m[0] == b'B' || m[0] == b'C' {
                continue;
            }
            if let Some(r) = d.decode(m).unwrap() {
                rows.push(r);
            }
        }
        let kinds: Vec<String> = rows
            .iter()
            .map(|r| match &r.decoded {
                Ok(Decoded::Change(c)) => format!("{:?} {}", c.interaction, c.reference()),
                Ok(Decoded::PriorVersion(c)) => format!("prior {}", c.reference()),
                other => format!("{other:?}"),
            })
            .collect();
        // create e1; history+update e1; create e3, e4; history+delete e1.
        assert_eq!(
            kinds,
            vec![
                "Create Encounter/e1",
                "prior Encounter/e1",
                "Update Encounter/e1",
                "Create Encounter/e3",
                "Create Encounter/e4",
                "prior Encounter/e1",
                "Delete Encounter/e1",
            ]
        );
        let Ok(Decoded::Change(c)) = &rows[0].decoded else {
            panic!("{:?}", rows[0].decoded)
        };
        let r = c.resource().unwrap().unwrap();
        assert_eq!(r["status"], "planned");
        assert_eq!(r["subject"]["reference"], "Patient/p1");
    }

    #[test]
    fn a_row_before_its_relation_is_a_protocol_error() {
        let mut d = Decoder::new(Arc::new(Aidbox::new("public", None)));
        let insert = recorded::aidbox_stream()
            .into_iter()
            .find(|m| m[0] == b'I')
            .unwrap();
        let e = d.decode(insert).unwrap_err();
        assert!(matches!(e, CaptureError::Protocol(_)), "{e}");
    }

    #[test]
    fn rows_of_tables_the_profile_does_not_read_are_dropped() {
        // A profile whose schema is not the recorded one reads none of its tables.
        let mut d = Decoder::new(Arc::new(Aidbox::new("elsewhere", None)));
        for m in recorded::aidbox_stream() {
            if m[0] == b'B' || m[0] == b'C' {
                continue;
            }
            assert!(d.decode(m).unwrap().is_none());
        }
    }
}
