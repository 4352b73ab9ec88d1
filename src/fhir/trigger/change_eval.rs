//! One change as the triggers and canFilterBy plans see it: its versions (partial or
//! complete), the values of each parameter computed once, each criteria key decided once.

use serde_json::Value;
use std::sync::{Arc, Mutex};

use super::{evaluate_trigger, Trigger, Undecided};
use crate::fhir::criteria_key::CriteriaKey;
use crate::fhir::fhirpath::Prepared;
use crate::fhir::fields::Fields;
use crate::fhir::search::direct::RawDoc;
use crate::fhir::search::path::{Plan, Shape, Shapes};
use crate::fhir::search::registry::{ParamType, SearchParam};
use crate::fhir::search::value::{extract, Values};
use crate::fhir::search::{Criterion, Searcher};

/// One change made ready for evaluation by every topic that wants it: the resource is
/// converted for the FHIRPath engine once, and a search parameter's values are computed
/// once whatever number of topics ask for them.
pub struct ChangeEval<'a> {
    pub(crate) searcher: &'a Searcher,
    pub(crate) previous: Option<Arc<Value>>,
    pub(crate) current: Option<Arc<Value>>,
    /// The versions' `resourceType` when the caller knows it (capture: the row's): plans
    /// check their branches' roots against it, a dozen times per change with 20 topics,
    /// instead of looking it up in the JSON each time.
    resource_type: Option<&'a str>,
    /// Focus: the current version (the previous one for a delete); `%previous`/`%current`
    /// bound. Made on first use: parameters with a plain-path plan never need the engine.
    main: std::sync::OnceLock<Prepared>,
    /// Focus: the previous version, when there is also a current one.
    prev: std::sync::OnceLock<Prepared>,
    /// Values computed so far, per side: a handful of parameters, found by definition (or
    /// by expression, for the same one defined twice).
    cache: [Mutex<Computed>; 2],
    /// Parses the complete versions when `previous` and `current` hold only the members
    /// plans read ([`Fields`]); the engine is never given a partial resource.
    reparse: Option<&'a Reparse<'a>>,
    complete: std::sync::OnceLock<Versions>,
    /// The members `fields` keeps as text, per side (previous, current): canFilterBy walks
    /// read them without a `Value` ([`crate::fhir::search::direct`]).
    raw: Option<Raw<'a>>,
    /// Triggers decided so far, by their criteria: topics sharing criteria (commonly, a
    /// status or a code) evaluate them once per change.
    decided: Mutex<smallvec::SmallVec<[(CriteriaKey, Decision); 4]>>,
}

/// The text members of both versions, and which members they are.
struct Raw<'a> {
    fields: &'a Fields,
    docs: [Option<&'a RawDoc<'a>>; 2],
}

/// A trigger's criteria on one change.
type Decision = Result<bool, Undecided>;

/// A side's values computed so far, with the definition each came from.
type Computed = Vec<(Arc<SearchParam>, Arc<Values>)>;

/// The previous and current version of a change.
pub(crate) type Versions = (Option<Arc<Value>>, Option<Arc<Value>>);

/// How the complete versions of a partially parsed change are had.
pub(crate) type Reparse<'a> = dyn Fn() -> Versions + Sync + 'a;

impl<'a> ChangeEval<'a> {
    pub fn new(searcher: &'a Searcher, previous: Option<&Value>, current: Option<&Value>) -> Self {
        let arc = |v: &Value| Arc::new(v.clone());
        Self::from_arcs(searcher, previous.map(arc), current.map(arc))
    }

    /// Without copying the resources (capture already holds them behind an `Arc`).
    pub fn from_arcs(
        searcher: &'a Searcher,
        previous: Option<Arc<Value>>,
        current: Option<Arc<Value>>,
    ) -> Self {
        ChangeEval {
            searcher,
            previous,
            current,
            resource_type: None,
            main: std::sync::OnceLock::new(),
            prev: std::sync::OnceLock::new(),
            cache: Default::default(),
            reparse: None,
            complete: std::sync::OnceLock::new(),
            raw: None,
            decided: Mutex::default(),
        }
    }

    /// The trigger's criteria on this change, evaluated once per criteria key.
    pub(crate) async fn decide(&self, t: &Trigger) -> Decision {
        let known = self.decided.lock().ok().and_then(|d| {
            d.iter()
                .find(|(k, _)| k.same(&t.key))
                .map(|(_, r)| r.clone())
        });
        if let Some(r) = known {
            return r;
        }
        let r = evaluate_trigger(t, self).await;
        if let Ok(mut d) = self.decided.lock() {
            d.push((t.key.clone(), r.clone()));
        }
        r
    }

    /// Both versions are `resource_type` resources (their `resourceType`).
    pub(crate) fn typed(mut self, resource_type: &'a str) -> Self {
        self.resource_type = Some(resource_type);
        self
    }

    /// `previous` and `current` are partial: `reparse` gives the complete versions, parsed
    /// the first time the FHIRPath engine needs them.
    pub(crate) fn partial(mut self, reparse: &'a Reparse<'a>) -> Self {
        self.reparse = Some(reparse);
        self
    }

    /// The versions' members that `fields` keeps as text (previous, current).
    pub(crate) fn raw(
        mut self,
        fields: &'a Fields,
        previous: Option<&'a RawDoc<'a>>,
        current: Option<&'a RawDoc<'a>>,
    ) -> Self {
        self.raw = Some(Raw {
            fields,
            docs: [previous, current],
        });
        self
    }

    /// The versions the engine evaluates: complete ones.
    fn engine_versions(&self) -> (Option<&Arc<Value>>, Option<&Arc<Value>>) {
        match self.reparse {
            None => (self.previous.as_ref(), self.current.as_ref()),
            Some(f) => {
                let (p, c) = self.complete.get_or_init(f);
                (p.as_ref(), c.as_ref())
            }
        }
    }

    /// Whether the previous side has a focus of its own (both versions exist).
    fn has_prev_focus(&self) -> bool {
        self.previous.is_some() && self.current.is_some()
    }

    pub(crate) fn ctx(&self, previous_side: bool) -> &Prepared {
        let fp = &self.searcher.fp;
        if previous_side && self.has_prev_focus() {
            return self.prev.get_or_init(|| {
                let (previous, current) = self.engine_versions();
                fp.prepare_arcs(previous, previous, current)
            });
        }
        self.main.get_or_init(|| {
            let (previous, current) = self.engine_versions();
            fp.prepare_arcs(None, previous, current)
        })
    }

    /// The walk `plan` has on this change's members kept as text, when every member it
    /// reads was kept so (else the partial `Value`s hold them).
    fn direct<'p>(&self, plan: &'p Plan) -> Option<Shapes<'p>> {
        let raw = self.raw.as_ref()?;
        let shapes = plan.shapes(self.resource_type?)?;
        shapes
            .iter()
            .all(|s| s.reads(|k| raw.fields.keeps_raw(k)))
            .then_some(shapes)
    }

    /// A side's values of a parameter whose walk reads members kept as text: from that
    /// text, else (a repeated name, a body serde read) from the complete version.
    fn direct_values(
        &self,
        previous_side: bool,
        plan: &Plan,
        shapes: &[Shape<'_>],
        kind: ParamType,
    ) -> Values {
        if let Some(v) = self
            .raw_focus(previous_side)
            .and_then(|doc| doc.values(shapes, kind))
        {
            return v;
        }
        let items = self
            .complete_focus(previous_side)
            .map(|focus| plan.select_as(focus, self.resource_type))
            .unwrap_or_default();
        extract(kind, items)
    }

    /// [`ChangeEval::focus`]'s version as its members kept as text.
    fn raw_focus(&self, previous_side: bool) -> Option<&'a RawDoc<'a>> {
        let [previous, current] = self.raw.as_ref()?.docs;
        if previous_side && self.has_prev_focus() {
            return previous;
        }
        if self.current.is_some() {
            current
        } else {
            previous
        }
    }

    /// [`ChangeEval::focus`]'s version complete.
    fn complete_focus(&self, previous_side: bool) -> Option<&Value> {
        let (previous, current) = self.engine_versions();
        if previous_side && self.has_prev_focus() {
            return previous.map(|v| &**v);
        }
        current.or(previous).map(|v| &**v)
    }

    /// The JSON a side's focus is: the previous version on the previous side (when both
    /// exist), else the current one, else the previous one (a delete).
    fn focus(&self, previous_side: bool) -> Option<&Value> {
        if previous_side && self.has_prev_focus() {
            return self.previous.as_deref();
        }
        self.current.as_deref().or(self.previous.as_deref())
    }

    /// Values of `param` on the previous or the current version, computed once.
    pub(crate) async fn values(
        &self,
        previous_side: bool,
        param: &Arc<SearchParam>,
    ) -> Result<Arc<Values>, String> {
        let slot = &self.cache[usize::from(previous_side)];
        let cached = slot.lock().ok().and_then(|m| {
            m.iter()
                .find(|(p, _)| Arc::ptr_eq(p, param) || p.expression == param.expression)
                .map(|(_, v)| v.clone())
        });
        if let Some(v) = cached {
            return Ok(v);
        }
        let v = Arc::new(match (&param.plan, self.focus(previous_side)) {
            (Some(plan), Some(focus)) => match self.direct(plan) {
                Some(shapes) => self.direct_values(previous_side, plan, &shapes, param.kind),
                None => {
                    let ty = self
                        .resource_type
                        .or_else(|| focus.get("resourceType").and_then(Value::as_str));
                    extract(param.kind, plan.select_as(focus, ty))
                }
            },
            _ => self.searcher.values(self.ctx(previous_side), param).await?,
        });
        if let Ok(mut m) = slot.lock() {
            m.push((param.clone(), v.clone()));
        }
        Ok(v)
    }

    pub(crate) async fn matches(
        &self,
        previous_side: bool,
        criteria: &[Criterion],
    ) -> Result<bool, String> {
        for c in criteria {
            let v = self.values(previous_side, &c.param).await?;
            if !crate::fhir::search::value::matches(&v, c.modifier.as_deref(), &c.value) {
                return Ok(false);
            }
        }
        Ok(true)
    }
}
