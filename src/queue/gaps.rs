//! Capture gaps accepted with `--resync-from-now`, kept so `$status` can tell each
//! subscription that existed then that events may be missing.

use chrono::{DateTime, Utc};
use tokio_postgres::GenericClient;

use super::{lsn_text, Result};

/// Records a gap: changes after `checkpoint` and before `resumed_at` (an LSN's text) were
/// never read, for `reason`.
pub(crate) async fn record<C: GenericClient>(
    c: &C,
    slot: &str,
    checkpoint: u64,
    resumed_at: &str,
    reason: &str,
) -> Result<()> {
    c.execute(
        "INSERT INTO fhir_cdc.capture_gap (slot, lost_after, resumed_at, reason)
         VALUES ($1, $2::text::pg_lsn, $3::text::pg_lsn, $4)",
        &[&slot, &lsn_text(checkpoint), &resumed_at, &reason],
    )
    .await?;
    Ok(())
}

/// One recorded gap.
#[derive(Debug, Clone)]
pub(crate) struct Gap {
    pub(crate) at: DateTime<Utc>,
    pub(crate) message: String,
}

/// The most recent gaps (newest first), as the text of a status `error`.
pub(crate) async fn recent<C: GenericClient>(c: &C) -> Result<Vec<Gap>> {
    let rows = c
        .query(
            "SELECT at, slot, lost_after::text, resumed_at::text, reason
             FROM fhir_cdc.capture_gap ORDER BY id DESC LIMIT 20",
            &[],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| {
            let at: DateTime<Utc> = r.get(0);
            Gap {
                at,
                message: format!(
                    "events may be missing: capture of slot {} resumed from now at {} after the slot was lost ({}); store changes committed after WAL position {} and before {} were not captured",
                    r.get::<_, String>(1),
                    at.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
                    r.get::<_, String>(4),
                    r.get::<_, String>(2),
                    r.get::<_, String>(3),
                ),
            }
        })
        .collect())
}

/// The gaps that happened while a subscription created at `created_at` existed.
pub(crate) fn affecting(gaps: &[Gap], created_at: DateTime<Utc>) -> Vec<String> {
    gaps.iter()
        .filter(|g| g.at > created_at)
        .map(|g| g.message.clone())
        .collect()
}
