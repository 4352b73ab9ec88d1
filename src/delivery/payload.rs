//! Payload content for notifications and `$events`: the event as a notification carries it,
//! with the resource body when the payload is full-resource, and the resources the topic's
//! notificationShape adds (include / revInclude), read from the store.

use serde_json::{json, Value};
use std::sync::Arc;

use crate::capture::profile::{pg_timestamptz_to_fhir, Body, RowChange};
use crate::capture::setup::ident;
use crate::config::{Config, ProfileKind};
use crate::fhir::notification::Event;
use crate::fhir::search::value::Values;
use crate::fhir::search::Searcher;
use crate::fhir::subscription::Content;
use crate::fhir::topic::{Interaction, Shape};
use crate::queue::subscriptions::Pending;

/// Most resources one revInclude adds to a notification.
const REV_INCLUDE_LIMIT: i64 = 50;

#[derive(Clone)]
pub struct Payloads {
    cfg: Arc<Config>,
    store: deadpool_postgres::Pool,
    searcher: Arc<Searcher>,
}

impl Payloads {
    pub fn new(cfg: Arc<Config>, searcher: Arc<Searcher>) -> anyhow::Result<Self> {
        let store = crate::queue::pool(&cfg.source.url, 4)?;
        Ok(Payloads {
            cfg,
            store,
            searcher,
        })
    }

    /// The event as a notification carries it. `shapes` are the topic's notificationShapes.
    pub async fn event(&self, content: Content, shapes: &[Shape], p: &Pending) -> Event {
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
        let related = match (&resource, content) {
            (Some(r), Content::FullResource) => self.related(shapes, r).await,
            _ => Vec::new(),
        };
        Event {
            event_number: p.event_number,
            resource_type: p.resource_type.clone(),
            resource_id: p.resource_id.clone(),
            interaction: p.interaction,
            timestamp: p.commit_time,
            resource,
            related,
        }
    }

    /// What the notificationShapes for this focus add: `include` follows the focus's
    /// reference parameters, `revInclude` finds resources whose parameter refers to it.
    async fn related(&self, shapes: &[Shape], focus: &Value) -> Vec<Value> {
        let ty = focus["resourceType"].as_str().unwrap_or_default();
        let id = focus["id"].as_str().unwrap_or_default();
        let mut out: Vec<Value> = Vec::new();
        let add = |r: Value, out: &mut Vec<Value>| {
            let same = |x: &Value| x["resourceType"] == r["resourceType"] && x["id"] == r["id"];
            let is_focus = r["resourceType"] == ty && r["id"] == id;
            if !is_focus && !out.iter().any(same) {
                out.push(r);
            }
        };
        for shape in shapes.iter().filter(|s| s.resource_type == ty) {
            for inc in &shape.include {
                let spec = inc.split('&').next().unwrap_or(inc);
                let mut parts = spec.split(':');
                let (Some(src), Some(code)) = (parts.next(), parts.next()) else {
                    continue;
                };
                let target = parts.next();
                if src != ty {
                    continue;
                }
                let Some(param) = self.searcher.registry.get(src, code) else {
                    tracing::warn!(include = %inc, "notificationShape include names no known search parameter");
                    continue;
                };
                let prepared = self.searcher.fp.prepare(focus, None, Some(focus));
                let Ok(Values::Reference(refs)) = self.searcher.values(&prepared, &param).await
                else {
                    continue;
                };
                for r in refs {
                    let Some((rt, rid)) = r.split_once('/') else {
                        continue;
                    };
                    if target.is_some_and(|t| t != rt) {
                        continue;
                    }
                    if let Some(res) = self.read_store(rt, rid).await {
                        add(res, &mut out);
                    }
                }
            }
            for rev in &shape.rev_include {
                let spec = rev.split('&').next().unwrap_or(rev);
                let mut parts = spec.split(':');
                let (Some(src), Some(code)) = (parts.next(), parts.next()) else {
                    continue;
                };
                for res in self.referring(src, code, &format!("{ty}/{id}")).await {
                    add(res, &mut out);
                }
            }
        }
        out
    }

    /// Resources of `src` whose search parameter `code` refers to `reference`, for stores
    /// whose JSON holds FHIR references (`{"reference": "Type/id"}`) at a plain path.
    async fn referring(&self, src: &str, code: &str, reference: &str) -> Vec<Value> {
        if self.cfg.source.profile != ProfileKind::Aidbox {
            return Vec::new();
        }
        let Some(param) = self.searcher.registry.get(src, code) else {
            tracing::warn!(rev_include = %format!("{src}:{code}"), "notificationShape revInclude names no known search parameter");
            return Vec::new();
        };
        // The element the parameter reads: `Observation.encounter` → `encounter`.
        let path = param
            .expression
            .split('|')
            .next()
            .unwrap_or("")
            .trim()
            .trim_start_matches('(')
            .strip_prefix(&format!("{src}."))
            .map(|p| p.split(['.', '(', ' ']).next().unwrap_or(""))
            .unwrap_or("");
        if path.is_empty() || !path.chars().all(|c| c.is_ascii_alphanumeric()) {
            tracing::debug!(rev_include = %format!("{src}:{code}"), "revInclude path not simple; skipped");
            return Vec::new();
        }
        let one = json!({ path: {"reference": reference} });
        let many = json!({ path: [{"reference": reference}] });
        let Ok(c) = self.store.get().await else {
            return Vec::new();
        };
        let sql = format!(
            "SELECT id, resource::text, txid::text, ts::text FROM {}.{}
             WHERE resource @> $1 OR resource @> $2 ORDER BY ts DESC LIMIT {REV_INCLUDE_LIMIT}",
            ident(&self.cfg.source.schema),
            ident(&src.to_ascii_lowercase())
        );
        let Ok(rows) = c.query(&sql, &[&one, &many]).await else {
            return Vec::new();
        };
        rows.iter()
            .filter_map(|row| as_resource(src, row.get(0), row.get(1), row.get(2), row.get(3)))
            .collect()
    }

    async fn read_store(&self, resource_type: &str, id: &str) -> Option<Value> {
        if self.cfg.source.profile != ProfileKind::Aidbox
            || !crate::fhir::resource_types::is_resource_type(resource_type)
        {
            return None;
        }
        let c = self.store.get().await.ok()?;
        let sql = format!(
            "SELECT id, resource::text, txid::text, ts::text FROM {}.{} WHERE id = $1",
            ident(&self.cfg.source.schema),
            ident(&resource_type.to_ascii_lowercase())
        );
        let row = c.query_opt(&sql, &[&id]).await.ok()??;
        as_resource(
            resource_type,
            row.get(0),
            row.get(1),
            row.get(2),
            row.get(3),
        )
    }
}

/// An Aidbox row as a FHIR resource (id, type and meta from the columns).
fn as_resource(
    resource_type: &str,
    id: String,
    body: Option<String>,
    txid: Option<String>,
    ts: Option<String>,
) -> Option<Value> {
    let change = RowChange {
        resource_type: resource_type.to_string(),
        id,
        version_id: txid,
        last_updated: ts.map(|s| pg_timestamptz_to_fhir(&s)),
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
