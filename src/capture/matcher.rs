//! Stage 4: topic matching. Evaluates each topic's resourceTrigger on a resource change
//! (type, interaction, queryCriteria, fhirPathCriteria) and, for each match, extracts the
//! topic's canFilterBy values. The resource JSON is parsed once per change, and only for
//! changes some topic wants.

use serde_json::Value;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;

use super::assemble::ResourceChange;
use super::control::Active;
use crate::fhir::fields::Fields;
use crate::fhir::search::direct::RawDoc;
use crate::fhir::search::value::Values;
use crate::fhir::search::value_json::{write_str, write_values};
use crate::fhir::search::Searcher;
use crate::fhir::topic::Interaction;
use crate::fhir::trigger::{ChangeEval, CriteriaKey, FilterParam, Outcome};
use crate::queue::batch::{QueuedEvent, ResourceBody, OWN_FILTERS};
use crate::store::RowChange;

pub struct Matcher {
    searcher: Arc<Searcher>,
    /// The resource types some active topic triggers on, each with the members its topics
    /// read. The matcher runs on the stream's task, which sets it when topics change: a
    /// plain map, no lock.
    wanted: HashMap<String, Arc<Fields>>,
    /// Tables already warned about updates without a previous version.
    warned_no_previous: HashSet<u32>,
    /// `(topic, kind)` of criteria errors already logged: once each, the counter counts all.
    logged_errors: HashSet<(Arc<str>, &'static str)>,
}

/// The canFilterBy values of one change for all the topics it fired: one map by parameter
/// name, as topics naming the same parameter of a resource type get the same values. A
/// topic whose values differ under a name another topic used (its own filterDefinition)
/// keeps its map under `@topic`, keyed by its url. Names and definitions are borrowed from
/// the topics and values shared with the change's cache: nothing is copied per row.
#[derive(Default)]
struct Filters<'t> {
    /// By name.
    shared: BTreeMap<&'t str, Arc<Values>>,
    own: BTreeMap<&'t str, BTreeMap<&'t str, Arc<Values>>>,
    /// The canFilterBy entries whose values are in `shared`: [`Filters::covers`] compares
    /// definitions by pointer first, without a map lookup per entry (those lookups were 7%
    /// of capture's instructions with 20 topics). Inline: a change has a handful.
    sources: smallvec::SmallVec<[&'t FilterParam; 8]>,
    /// The canFilterBy sets whose values went into `shared` whole: a topic with one of
    /// them is covered without comparing its parameters one by one.
    done: smallvec::SmallVec<[&'t CriteriaKey; 4]>,
}

impl<'t> Filters<'t> {
    /// Whether every canFilterBy parameter of `filters` for `resource_type` is already in
    /// `shared`, computed from the same definition: its values would be the same, so they
    /// need not be extracted again (topics commonly share patient, code, …).
    fn covers(&self, filters: &[FilterParam], resource_type: &str) -> bool {
        filters
            .iter()
            .filter(|f| f.resource_type.as_deref() == Some(resource_type))
            .all(|f| {
                self.sources.iter().any(|g| {
                    let p = &g.param;
                    (Arc::ptr_eq(p, &f.param)
                        || (p.expression == f.param.expression && p.kind == f.param.kind))
                        && g.name == f.name
                })
            })
    }

    /// Adds a topic's values; under `@topic` when one differs from a value of the same name.
    fn add(&mut self, a: &'t Active, values: Vec<(&'t str, Arc<Values>)>, resource_type: &str) {
        let clash = values.iter().any(|(k, v)| {
            self.shared
                .get(k)
                .is_some_and(|old| !Arc::ptr_eq(old, v) && old != v)
        });
        if clash {
            self.own.insert(&*a.url, values.into_iter().collect());
            return;
        }
        self.done.push(&a.compiled.filters_key);
        for (name, v) in values {
            let filter = a
                .compiled
                .filters
                .iter()
                .find(|f| f.name == name && f.resource_type.as_deref() == Some(resource_type));
            self.sources.extend(filter);
            self.shared.insert(name, v);
        }
    }

    /// Adds a topic's values unless `shared` already holds them.
    async fn add_topic(&mut self, a: &'t Active, ev: &ChangeEval<'_>, resource_type: &str) {
        let filters = &a.compiled.filters;
        let key = &a.compiled.filters_key;
        if filters.is_empty()
            || self.done.iter().any(|k| k.same(key))
            || self.covers(filters, resource_type)
        {
            return;
        }
        let values = a.compiled.filter_values_shared(ev, resource_type).await;
        self.add(a, values, resource_type);
    }

    /// The event's `filters` JSON, written straight from the values (no `Value` tree, no
    /// serde: `value_json`). Names in order, as the map they were.
    fn into_json(self) -> Option<String> {
        if self.shared.is_empty() && self.own.is_empty() {
            return None;
        }
        let mut out = String::with_capacity(256);
        out.push('{');
        let mut first = true;
        let mut member = |out: &mut String, name: &str| {
            if !std::mem::take(&mut first) {
                out.push(',');
            }
            write_str(name, out);
            out.push(':');
        };
        // `@topic` sorts before every parameter name (`@` is below letters and `_`).
        if !self.own.is_empty() {
            member(&mut out, OWN_FILTERS);
            write_map(
                self.own.iter().map(|(url, m)| (*url, m)),
                &mut out,
                |m, out| write_map(m.iter().map(|(k, v)| (*k, &**v)), out, write_values),
            );
        }
        for (name, v) in &self.shared {
            member(&mut out, name);
            write_values(v, &mut out);
        }
        out.push('}');
        Some(out)
    }
}

/// A JSON object of `entries`, each value written by `value`.
fn write_map<'a, V: ?Sized + 'a>(
    entries: impl Iterator<Item = (&'a str, &'a V)>,
    out: &mut String,
    value: impl Fn(&V, &mut String),
) {
    out.push('{');
    for (i, (k, v)) in entries.enumerate() {
        if i > 0 {
            out.push(',');
        }
        write_str(k, out);
        out.push(':');
        value(v, out);
    }
    out.push('}');
}

/// The two versions of a change as JSON, with only the members `fields` keeps (and, as
/// text, those it keeps raw for canFilterBy walks).
struct Versions<'c> {
    current: Option<Arc<Value>>,
    previous: Option<Arc<Value>>,
    raw: [Option<RawDoc<'c>>; 2],
    fields: Arc<Fields>,
}

impl Matcher {
    pub fn new(searcher: Arc<Searcher>) -> Self {
        Matcher {
            searcher,
            wanted: HashMap::new(),
            warned_no_previous: HashSet::new(),
            logged_errors: HashSet::new(),
        }
    }

    /// The members of each resource type the active topics read; the stream sets it when
    /// topics change.
    pub fn set_wanted(&mut self, types: HashMap<String, Arc<Fields>>) {
        self.wanted = types;
    }

    /// The event `change` makes: one whatever the number of topics that fire (their urls
    /// in `topics`), so the queue write does not grow with the number of topics.
    pub async fn event(
        &mut self,
        topics: &[Active],
        change: &ResourceChange,
    ) -> Option<QueuedEvent> {
        let row = &change.current;
        let wanted: Vec<&Active> = topics
            .iter()
            .filter(|a| a.topic.matches(&row.resource_type, row.interaction))
            .collect();
        if wanted.is_empty() {
            return None;
        }
        self.warn_without_previous(&wanted, change);
        let fields = self
            .wanted
            .get(&*row.resource_type)
            .cloned()
            .unwrap_or_else(|| Arc::new(Fields::all()));
        let v = parse(change, fields)?;
        let searcher = self.searcher.clone();
        // The engine, when an expression without a plan needs it, parses the whole resource.
        let reparse = || complete(change);
        // Built once for every topic that evaluates something on this change.
        let eval = wanted
            .iter()
            .any(|a| a.compiled.has_criteria() || !a.compiled.filters.is_empty())
            .then(|| {
                let [raw_previous, raw_current] = &v.raw;
                let ev = ChangeEval::from_arcs(&searcher, v.previous.clone(), v.current.clone())
                    .typed(&row.resource_type)
                    .raw(&v.fields, raw_previous.as_ref(), raw_current.as_ref());
                if v.fields.is_all() {
                    ev
                } else {
                    ev.partial(&reparse)
                }
            });
        let mut fired = Vec::new();
        let mut filters = Filters::default();
        for a in wanted {
            if !fires(&mut self.logged_errors, a, eval.as_ref(), row).await {
                continue;
            }
            if let Some(ev) = &eval {
                filters.add_topic(a, ev, &row.resource_type).await;
            }
            fired.push(a.url.clone());
        }
        if fired.is_empty() {
            return None;
        }
        // Every event keeps the row (a subscription may turn full-resource before the batch
        // is written); the batch renders and stores it only when one of its topics needs it.
        let resource = v
            .current
            .is_some()
            .then(|| change.current.clone() as Arc<dyn ResourceBody>);
        Some(event(fired, change, resource, filters.into_json()))
    }

    fn warn_without_previous(&mut self, wanted: &[&Active], change: &ResourceChange) {
        if change.previous.is_none()
            && change.current.interaction != Interaction::Create
            && wanted.iter().any(|a| a.compiled.has_criteria())
            && self.warned_no_previous.insert(change.relation_id)
        {
            tracing::warn!(
                table = %change.current.resource_type,
                "an update or delete arrived without its previous version; criteria evaluate the previous state as absent. \
                 Set REPLICA IDENTITY FULL on the table (generic profile) so pgoutput sends it"
            );
        }
    }
}

/// Parses both versions with the members `fields` keeps; `None` (with a log line) when the
/// current one is not a resource.
fn parse(change: &ResourceChange, fields: Arc<Fields>) -> Option<Versions<'_>> {
    let (current, raw_current) = match change.current.parsed(&fields) {
        Ok(Some((v, raw))) => (Some(Arc::new(v)), raw),
        Ok(None) => (None, None),
        Err(e) => {
            metrics::counter!(crate::metrics::BAD_ROWS).increment(1);
            tracing::error!(error = %e, "skipping a change whose resource is not valid JSON");
            return None;
        }
    };
    let (previous, raw_previous) = match change.previous.as_ref().map(|p| p.parsed(&fields)) {
        None | Some(Ok(None)) => (None, None),
        Some(Ok(Some((v, raw)))) => (Some(Arc::new(v)), raw),
        Some(Err(e)) => {
            tracing::warn!(error = %e, "previous version is not valid JSON; evaluated as absent");
            (None, None)
        }
    };
    Some(Versions {
        current,
        previous,
        raw: [raw_previous, raw_current],
        fields,
    })
}

/// Both versions whole, for the FHIRPath engine.
fn complete(change: &ResourceChange) -> (Option<Arc<Value>>, Option<Arc<Value>>) {
    let whole = |r: Option<&RowChange>| r?.resource().ok().flatten().map(Arc::new);
    (
        whole(change.previous.as_ref()),
        whole(Some(&change.current)),
    )
}

/// Whether the topic's trigger fires. Criteria that give no decision are counted per topic,
/// logged once per topic and kind (`logged`; topic and error text, no resource content), and
/// decided by the topic's `on_criteria_error` policy.
async fn fires(
    logged: &mut HashSet<(Arc<str>, &'static str)>,
    a: &Active,
    eval: Option<&ChangeEval<'_>>,
    row: &RowChange,
) -> bool {
    let (true, Some(ev)) = (a.compiled.has_criteria(), eval) else {
        return true;
    };
    match a
        .compiled
        .evaluate(ev, &row.resource_type, row.interaction)
        .await
    {
        Outcome::Fires => true,
        Outcome::DoesNotFire => false,
        Outcome::Error(e) => {
            metrics::counter!(crate::metrics::TRIGGER_ERRORS).increment(1);
            metrics::counter!(crate::metrics::CRITERIA_ERRORS, "topic" => a.url.to_string())
                .increment(1);
            if logged.insert((a.url.clone(), e.kind)) {
                tracing::error!(topic = %a.url, kind = e.kind, error = %e.message,
                    policy = ?a.compiled.on_error, fires = e.fires,
                    "topic criteria could not be evaluated; the topic's on_criteria_error policy decided (logged once per topic and kind)");
            }
            e.fires
        }
    }
}

/// The queue renders a row's body through this only when a batch needs it.
impl ResourceBody for RowChange {
    fn render(&self) -> Option<String> {
        self.resource().ok().flatten().map(|v| v.to_string())
    }
}

fn event(
    topics: Vec<Arc<str>>,
    change: &ResourceChange,
    resource: Option<Arc<dyn ResourceBody>>,
    filters: Option<String>,
) -> QueuedEvent {
    let row = &change.current;
    QueuedEvent {
        topics,
        resource_type: row.resource_type.clone(),
        resource_id: row.id.clone(),
        version_id: row.version_id.clone(),
        interaction: row.interaction,
        resource,
        filters,
        commit_lsn: change.commit.lsn,
        xid: change.commit.xid,
        commit_time: change.commit.time,
    }
}
