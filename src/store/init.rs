//! `fhir-cdc init-store`: an empty store of a profile's layout (its tables and the write
//! statements of that server as SQL functions, `fhir_put`/`fhir_delete` among them), for the
//! demo, the tests and trying a profile before pointing it at the real server. Never run
//! against a real store: the server creates its own tables.

use crate::config::ProfileKind;

/// The layout SQL of `profile`; `None` for `generic`, which has no layout of its own.
pub fn layout_sql(profile: ProfileKind) -> Option<&'static str> {
    Some(match profile {
        ProfileKind::Aidbox => include_str!("../../scripts/aidbox-store.sql"),
        ProfileKind::Hapi => include_str!("../../scripts/stores/hapi.sql"),
        ProfileKind::Helios => include_str!("../../scripts/stores/helios.sql"),
        ProfileKind::Medplum => include_str!("../../scripts/stores/medplum.sql"),
        ProfileKind::Generic => return None,
    })
}

/// Creates the layout in the database at `url`, in one transaction: all of it or nothing.
pub async fn run(url: &str, profile: ProfileKind) -> Result<(), super::StoreError> {
    let sql = layout_sql(profile).ok_or_else(|| {
        super::StoreError::Config(
            "the generic profile has no layout of its own: create your tables and name them in [[source.tables]]".into(),
        )
    })?;
    let mut c = crate::db::connect(url)
        .await
        .map_err(|e| super::StoreError::Config(e.to_string()))?;
    let tx = c.transaction().await?;
    tx.batch_execute(sql).await?;
    tx.commit().await?;
    Ok(())
}
