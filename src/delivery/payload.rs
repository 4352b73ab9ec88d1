//! Payload content for notifications and `$events`: the event as a notification carries it,
//! with the resource body when the payload is full-resource.

use std::sync::Arc;

use crate::capture::profile::{pg_timestamptz_to_fhir, Body, RowChange};
use crate::capture::setup::ident;
use crate::config::{Config, ProfileKind};
use crate::fhir::notification::Event;
use crate::fhir::subscription::Content;
use crate::fhir::topic::Interaction;
use crate::queue::subscriptions::Pending;

#[derive(Clone)]
pub struct Payloads {
    cfg: Arc<Config>,
    store: deadpool_postgres::Pool,
}

impl Payloads {
    pub fn new(cfg: Arc<Config>) -> anyhow::Result<Self> {
        let store = crate::queue::pool(&cfg.source.url, 4)?;
        Ok(Payloads { cfg, store })
    }

    pub async fn event(&self, content: Content, p: &Pending) -> Event {
        let mut resource = p.resource.clone();
        if resource.is_none()
            && content == Content::FullResource
            && p.interaction != Interaction::Delete
        {
            // The body was not queued (no full-resource subscription existed when the event
            // was): read the store. It may be a later version than the event's; the
            // reference is exact.
            resource = self.read_store(&p.resource_type, &p.resource_id).await;
        }
        Event {
            event_number: p.event_number,
            resource_type: p.resource_type.clone(),
            resource_id: p.resource_id.clone(),
            interaction: p.interaction,
            timestamp: p.commit_time,
            resource,
        }
    }

    async fn read_store(&self, resource_type: &str, id: &str) -> Option<serde_json::Value> {
        if self.cfg.source.profile != ProfileKind::Aidbox {
            return None;
        }
        let c = self.store.get().await.ok()?;
        let sql = format!(
            "SELECT resource::text, txid::text, ts::text FROM {}.{} WHERE id = $1",
            ident(&self.cfg.source.schema),
            ident(&resource_type.to_ascii_lowercase())
        );
        let row = c.query_opt(&sql, &[&id]).await.ok()??;
        let body: Option<String> = row.get(0);
        let change = RowChange {
            resource_type: resource_type.to_string(),
            id: id.to_string(),
            version_id: row.get(1),
            last_updated: row
                .get::<_, Option<String>>(2)
                .map(|s| pg_timestamptz_to_fhir(&s)),
            interaction: Interaction::Update,
            body: body.map(|b| Body::Text(b.into())).unwrap_or(Body::Absent),
        };
        match change.resource() {
            Ok(r) => r,
            Err(e) => {
                tracing::error!(error = %e, "store read for a full-resource payload failed");
                None
            }
        }
    }
}
