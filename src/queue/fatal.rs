//! The last fatal error of each task, kept in `fhir_cdc.fatal_error` so `fhir-cdc status`
//! says why a process stopped, and what to do, after the process is gone. One row per task,
//! written only when a process stops on such an error.

use chrono::{DateTime, Utc};
use tokio_postgres::GenericClient;

use super::Result;
use crate::error::Fatal;

/// Records why `f.task` stopped (replacing an older record of that task).
pub async fn record<C: GenericClient>(c: &C, f: &Fatal) -> Result<()> {
    c.execute(
        "INSERT INTO fhir_cdc.fatal_error (task, error, remedy) VALUES ($1, $2, $3)
         ON CONFLICT (task) DO UPDATE SET at = now(), error = $2, remedy = $3",
        &[&f.task, &f.error, &f.remedy],
    )
    .await?;
    Ok(())
}

/// The task runs again: its old record goes (a statement that finds no row writes nothing).
pub(crate) async fn clear<C: GenericClient>(c: &C, task: &str) -> Result<()> {
    c.execute("DELETE FROM fhir_cdc.fatal_error WHERE task = $1", &[&task])
        .await?;
    Ok(())
}

/// One recorded stop.
#[derive(Debug, Clone, serde::Serialize)]
pub(crate) struct Stopped {
    pub(crate) task: String,
    pub(crate) at: DateTime<Utc>,
    pub(crate) error: String,
    pub(crate) remedy: Option<String>,
}

/// Every recorded stop, newest first.
pub(crate) async fn all<C: GenericClient>(c: &C) -> Result<Vec<Stopped>> {
    Ok(c.query(
        "SELECT task, at, error, remedy FROM fhir_cdc.fatal_error ORDER BY at DESC",
        &[],
    )
    .await?
    .iter()
    .map(|r| Stopped {
        task: r.get(0),
        at: r.get(1),
        error: r.get(2),
        remedy: r.get(3),
    })
    .collect())
}
