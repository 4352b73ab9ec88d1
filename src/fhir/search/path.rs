//! Search parameter expressions that are plain paths, evaluated on the JSON directly instead
//! of through the FHIRPath engine: `Observation.code`, `Observation.subject.where(resolve()
//! is Patient)`, `(Observation.value as Quantity)`, `Observation.value.ofType(Quantity)`,
//! `Observation.effective`, unions of those. Most official parameters are of this shape, and
//! the engine costs a conversion of the whole resource per change plus an evaluation per
//! parameter; this is a walk over the JSON.
//!
//! Each step is checked against the FHIR model of the version when compiled (choice elements
//! resolve to their `valueQuantity`-style names, backbone members are followed), so a plan
//! exists only for expressions whose meaning is certain; anything else (functions, indexers,
//! `exists()`, extensions by URL, …) has no plan and goes to the engine. Unit tests compare
//! both on the same resources.

use octofhir_fhirschema::embedded::FhirVersion as SchemaVersion;
use octofhir_fhirschema::types::FhirSchemaElement;
use serde_json::Value;

use crate::fhir::model::{Members, ModelIndex};
use crate::fhir::FhirVersion;

/// One compiled alternative of a union.
#[derive(Debug, Clone, PartialEq)]
struct Branch {
    /// The resource type the branch applies to; `None`: any (Resource / DomainResource).
    root: Option<String>,
    steps: Vec<Step>,
    /// The FHIR type of what the branch selects, when the model says one.
    ty: Option<String>,
    /// The element name of the first step (`value` of `valueQuantity`): Aidbox's format
    /// stores choice elements under it.
    top: Option<String>,
    /// `top` is a member a walk may read from the body's text (not one of [`NOT_DIRECT`]),
    /// decided once here rather than per change.
    direct: bool,
}

#[derive(Debug, Clone, PartialEq)]
enum Step {
    /// A member, arrays flattened.
    Field(String),
    /// A choice element: whichever of these keys (each the prefix and a type) is present.
    /// Found by one pass over the object's members with the prefix, not by a lookup per
    /// type (Observation.value[x] has 11).
    Choice { prefix: String, keys: Vec<String> },
    /// References whose target type is this one (`where(resolve() is T)`).
    RefersTo(String),
}

/// A search parameter expression as JSON walks.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan(Vec<Branch>);

impl Plan {
    /// The FHIR type of what a single-branch plan selects (`code`, `decimal`, `Quantity`, …).
    pub(crate) fn single_type(&self) -> Option<&str> {
        match self.0.as_slice() {
            [b] => b.ty.as_deref(),
            _ => None,
        }
    }

    /// The top-level members of the resource the plan reads (in FHIR and in Aidbox's
    /// format); `None` when it reads the resource itself.
    pub fn top_keys(&self) -> Option<Vec<String>> {
        let mut out = Vec::new();
        for b in &self.0 {
            match b.steps.first()? {
                Step::Field(k) => out.push(k.clone()),
                Step::Choice { keys, .. } => out.extend(keys.iter().cloned()),
                Step::RefersTo(_) => return None,
            }
            out.extend(b.top.clone());
        }
        Some(out)
    }

    /// The values the expression selects on `resource`, as the engine would return them
    /// (borrowed: capture reads them once, to extract search values).
    pub(crate) fn select<'v>(&self, resource: &'v Value) -> Vec<&'v Value> {
        self.select_as(
            resource,
            resource.get("resourceType").and_then(Value::as_str),
        )
    }

    /// [`Plan::select`] on a resource whose `resourceType` the caller has read: `ty`.
    pub(crate) fn select_as<'v>(&self, resource: &'v Value, ty: Option<&str>) -> Vec<&'v Value> {
        let mut out = Vec::new();
        for b in &self.0 {
            if b.root.is_some() && b.root.as_deref() != ty {
                continue;
            }
            // Two buffers, swapped at each step; inline for the few items paths select.
            let mut items: Items<'v> = smallvec::smallvec![resource];
            let mut next = Items::new();
            for s in &b.steps {
                step(&items, s, &mut next);
                std::mem::swap(&mut items, &mut next);
                next.clear();
            }
            out.extend(items);
        }
        out
    }
}

/// A plan capture can read on one top-level member's own text, without a `Value` tree (see
/// [`super::direct`]): one branch applies to the type, and it is one of these walks.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum Shape<'p> {
    /// `T.member`, arrays flattened; `reference` when the member is a `Reference`.
    Field { key: &'p str, reference: bool },
    /// `(T.value as Quantity)`: the one typed key `key` of choice element `top`.
    Cast {
        key: &'p str,
        top: &'p str,
        reference: bool,
    },
    /// `T.member.where(resolve() is Target)`.
    RefersTo { key: &'p str, target: &'p str },
    /// `T.value`: every typed key of choice element `top`.
    Choice {
        prefix: &'p str,
        keys: &'p [String],
        top: &'p str,
    },
}

/// Members a shape never reads from the body: `id` and `meta` come from the row's columns,
/// `extension` may be made from Aidbox's first-class extensions, `contained` are resources.
const NOT_DIRECT: [&str; 6] = [
    "id",
    "meta",
    "resourceType",
    "extension",
    "modifierExtension",
    "contained",
];

/// The walks of a plan's branches that apply to a type, in order: the items each selects
/// are the plan's, one branch after the other (`(Observation.value as Quantity) |
/// (Observation.value as SampledData)` is two).
pub(crate) type Shapes<'p> = smallvec::SmallVec<[Shape<'p>; 2]>;

impl Plan {
    /// The walks of this plan on `resource_type` resources, when each applicable branch is
    /// one a member's text answers alone.
    pub(crate) fn shapes(&self, resource_type: &str) -> Option<Shapes<'_>> {
        let mut out = Shapes::new();
        for b in self
            .0
            .iter()
            .filter(|b| b.root.as_deref().is_none_or(|r| r == resource_type))
        {
            out.push(b.shape()?);
        }
        (!out.is_empty()).then_some(out)
    }

    /// The members [`Plan::shapes`]' walks read (in FHIR and in Aidbox's format).
    pub(crate) fn shape_keys(&self, resource_type: &str) -> Option<Vec<String>> {
        let mut out: Vec<String> = Vec::new();
        for s in self.shapes(resource_type)? {
            s.reads(|k| {
                if !out.iter().any(|o| o == k) {
                    out.push(k.to_string());
                }
                true
            });
        }
        Some(out)
    }
}

impl Branch {
    fn shape(&self) -> Option<Shape<'_>> {
        let top = self.top.as_deref().filter(|_| self.direct)?;
        let ty = self.ty.as_deref();
        match self.steps.as_slice() {
            [Step::Field(key)] if key == top => {
                let ty = ty.filter(|t| *t != "Resource")?;
                Some(Shape::Field {
                    key,
                    reference: ty == "Reference",
                })
            }
            [Step::Field(key)] => Some(Shape::Cast {
                key,
                top,
                reference: ty? == "Reference",
            }),
            [Step::Field(key), Step::RefersTo(target)] if key == top => {
                Some(Shape::RefersTo { key, target })
            }
            [Step::Choice { prefix, keys }] if prefix == top => {
                Some(Shape::Choice { prefix, keys, top })
            }
            _ => None,
        }
    }
}

impl Shape<'_> {
    /// Whether `f` holds for every member the walk reads (in FHIR and in Aidbox's format).
    pub(crate) fn reads(&self, mut f: impl FnMut(&str) -> bool) -> bool {
        match *self {
            Shape::Field { key, .. } | Shape::RefersTo { key, .. } => f(key),
            Shape::Cast { key, top, .. } => f(key) && f(top),
            Shape::Choice { keys, top, .. } => keys.iter().all(|k| f(k)) && f(top),
        }
    }
}

/// The values a step of a path holds.
type Items<'v> = smallvec::SmallVec<[&'v Value; 8]>;

fn step<'a>(items: &[&'a Value], s: &Step, out: &mut Items<'a>) {
    fn push<'a>(out: &mut Items<'a>, v: &'a Value) {
        match v {
            Value::Array(a) => out.extend(a.iter()),
            Value::Null => {}
            v => out.push(v),
        }
    }
    for &it in items {
        match s {
            Step::Field(k) => {
                if let Some(v) = it.get(k) {
                    push(out, v);
                }
            }
            Step::Choice { prefix, keys } => {
                let Value::Object(m) = it else { continue };
                for (k, v) in m {
                    if k.len() > prefix.len() && k.starts_with(prefix.as_str()) && keys.contains(k)
                    {
                        push(out, v);
                    }
                }
            }
            Step::RefersTo(t) => {
                let r = it.get("reference").and_then(Value::as_str).unwrap_or("");
                if refers_to(r, t) {
                    out.push(it);
                }
            }
        }
    }
}

/// Whether reference `r` names a `t` (`T/…` or `…/T/…`), without building the patterns.
pub(crate) fn refers_to(r: &str, t: &str) -> bool {
    let typed_at = |i: usize| r[i..].starts_with(t) && r[i + t.len()..].starts_with('/');
    (r.starts_with(t) && typed_at(0)) || r.match_indices('/').any(|(i, _)| typed_at(i + 1))
}

/// Where a step's name is looked up: a type (with its bases) or a backbone's members.
enum Scope {
    Type(String),
    Backbone(&'static Members),
}

fn lookup(v: SchemaVersion, scope: &Scope, name: &str) -> Option<&'static FhirSchemaElement> {
    let model = ModelIndex::of(v);
    match scope {
        Scope::Backbone(members) => model.backbone_member(members, name),
        Scope::Type(t) => model.get(t)?.element(name),
    }
}

/// The plan of `expr` for `resource_type`, when every part of it is a plain path the model
/// confirms; `None` sends the parameter to the FHIRPath engine.
pub(crate) fn compile(expr: &str, resource_type: &str, version: FhirVersion) -> Option<Plan> {
    let v = version.schema();
    let branches = split_top(expr, '|')
        .into_iter()
        .map(|p| branch(p.trim(), resource_type, v))
        .collect::<Option<Vec<_>>>()?;
    Some(Plan(branches))
}

fn branch(part: &str, resource_type: &str, v: SchemaVersion) -> Option<Branch> {
    let part = strip_parens(part);
    // `X as T` at the end of a (parenthesised) branch.
    let (path, cast) = match part.rsplit_once(" as ") {
        Some((p, t)) if is_ident(t.trim()) => (strip_parens(p.trim()), Some(t.trim())),
        _ => (part, None),
    };
    let segments = split_top(path, '.');
    let (root, rest) = segments.split_first()?;
    let root = root.trim();
    let (root_ty, any) = match root {
        "Resource" | "DomainResource" => (resource_type, true),
        r if r == resource_type => (resource_type, false),
        _ => return None,
    };
    let mut scope = Scope::Type(root_ty.to_string());
    let mut ty: Option<String> = Some(root_ty.to_string());
    let mut steps = Vec::new();
    let mut pending: Option<(&'static FhirSchemaElement, String)> = None;
    let segs: Vec<&str> = rest.iter().map(|s| s.trim()).collect();
    for (i, seg) in segs.iter().enumerate() {
        if let Some(t) = call_arg(seg, "ofType").or_else(|| call_arg(seg, "as")) {
            let (el, name) = pending.take()?;
            steps.push(Step::Field(choice_key(el, &name, t)?));
            scope = Scope::Type(t.to_string());
            ty = Some(t.to_string());
            continue;
        }
        if let Some(t) = seg
            .strip_prefix("where(resolve() is ")
            .and_then(|s| s.strip_suffix(')'))
        {
            if pending.is_some() {
                return None;
            }
            steps.push(Step::RefersTo(t.trim().to_string()));
            ty = Some("Reference".into());
            continue;
        }
        if !is_ident(seg) || pending.is_some() {
            return None;
        }
        let el = lookup(v, &scope, seg)?;
        if el.choices.is_some() {
            // The next step (or the final `as`) names the type; alone it is every choice.
            pending = Some((el, seg.to_string()));
            let last = i + 1 == segs.len();
            if last && cast.is_none() {
                pending = None;
                steps.push(choice(seg, el.choices.clone()?));
                ty = None;
            }
            continue;
        }
        steps.push(Step::Field(seg.to_string()));
        ty = el.type_name.clone();
        scope = match (&el.elements, &el.type_name) {
            (Some(m), _) => Scope::Backbone(m),
            (None, Some(t)) => Scope::Type(t.clone()),
            (None, None) => return None,
        };
    }
    if let Some(t) = cast {
        let (el, name) = pending.take()?;
        steps.push(Step::Field(choice_key(el, &name, t)?));
        ty = Some(t.to_string());
    }
    if pending.is_some() {
        return None;
    }
    Some(Branch {
        root: (!any).then(|| resource_type.to_string()),
        steps,
        ty,
        top: segs.first().map(|s| s.to_string()),
        direct: segs.first().is_some_and(|s| !NOT_DIRECT.contains(s)),
    })
}

/// Every choice of element `name` (a path's last step without a type).
fn choice(name: &str, keys: Vec<String>) -> Step {
    // Every key is the prefix and a type; were one not, all members are looked at.
    let prefix = if keys.iter().all(|k| k.starts_with(name)) {
        name
    } else {
        ""
    };
    Step::Choice {
        prefix: prefix.to_string(),
        keys,
    }
}

/// `value` + `Quantity` → `valueQuantity`, when that is one of the element's choices.
fn choice_key(el: &FhirSchemaElement, name: &str, ty: &str) -> Option<String> {
    let mut c = ty.chars();
    let key = format!("{name}{}{}", c.next()?.to_uppercase(), c.as_str());
    el.choices.as_ref()?.contains(&key).then_some(key)
}

fn call_arg<'a>(seg: &'a str, f: &str) -> Option<&'a str> {
    let inner = seg
        .strip_prefix(f)?
        .strip_prefix('(')?
        .strip_suffix(')')?
        .trim();
    is_ident(inner).then_some(inner)
}

fn is_ident(s: &str) -> bool {
    !s.is_empty() && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
}

fn strip_parens(s: &str) -> &str {
    let mut s = s.trim();
    while s.starts_with('(') && s.ends_with(')') && balanced(&s[1..s.len() - 1]) {
        s = s[1..s.len() - 1].trim();
    }
    s
}

fn balanced(s: &str) -> bool {
    let mut depth = 0i32;
    for c in s.chars() {
        match c {
            '(' => depth += 1,
            ')' => {
                depth -= 1;
                if depth < 0 {
                    return false;
                }
            }
            _ => {}
        }
    }
    depth == 0
}

/// Splits on `sep` outside parentheses and quotes.
fn split_top(s: &str, sep: char) -> Vec<&str> {
    let (mut depth, mut quoted, mut start) = (0i32, false, 0);
    let mut out = Vec::new();
    for (i, c) in s.char_indices() {
        match c {
            '\'' => quoted = !quoted,
            '(' if !quoted => depth += 1,
            ')' if !quoted => depth -= 1,
            c if c == sep && depth == 0 && !quoted => {
                out.push(&s[start..i]);
                start = i + c.len_utf8();
            }
            _ => {}
        }
    }
    out.push(&s[start..]);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn plan(expr: &str, ty: &str) -> Option<Plan> {
        compile(expr, ty, FhirVersion::R4)
    }

    #[test]
    fn plain_paths_compile_and_others_do_not() {
        assert!(plan("Observation.code", "Observation").is_some());
        assert!(plan(
            "Observation.subject.where(resolve() is Patient)",
            "Observation"
        )
        .is_some());
        assert!(plan(
            "(Observation.value as Quantity) | (Observation.value as SampledData)",
            "Observation"
        )
        .is_some());
        assert!(plan("Observation.value.ofType(Quantity)", "Observation").is_some());
        assert!(plan("Observation.component.code", "Observation").is_some());
        assert!(plan("Observation.effective", "Observation").is_some());
        assert!(plan("Resource.id", "Observation").is_some());
        assert!(plan("Patient.name.where(use = 'official')", "Patient").is_none());
        assert!(plan("Observation.code.exists()", "Observation").is_none());
        assert!(plan("Observation.nonsense", "Observation").is_none());
        assert!(plan("Encounter.status", "Observation").is_none());
    }

    #[test]
    fn references_name_their_target_type() {
        assert!(refers_to("Patient/p1", "Patient"));
        assert!(refers_to("http://h/fhir/Patient/p2", "Patient"));
        assert!(refers_to("Patient/p1/_history/2", "Patient"));
        assert!(!refers_to("PatientX/p1", "Patient"));
        assert!(!refers_to("Group/Patient", "Patient"));
        assert!(!refers_to("http://h/fhir/APatient/p", "Patient"));
        assert!(!refers_to("Patient", "Patient"));
        assert!(!refers_to("", "Patient"));
    }

    #[test]
    fn walks_select_what_the_paths_name() {
        let o = json!({
            "resourceType": "Observation", "id": "o1",
            "code": {"coding": [{"system": "http://loinc.org", "code": "1"}]},
            "subject": {"reference": "Patient/p1"},
            "performer": [{"reference": "Practitioner/x"}, {"reference": "http://h/fhir/Patient/p2"}],
            "valueQuantity": {"value": 5},
            "effectivePeriod": {"start": "2024-01-01"},
            "component": [{"code": {"text": "a"}}, {"code": {"text": "b"}}]
        });
        let run = |e: &str| -> Vec<Value> {
            plan(e, "Observation")
                .unwrap()
                .select(&o)
                .into_iter()
                .cloned()
                .collect()
        };
        assert_eq!(
            run("Observation.subject.where(resolve() is Patient)"),
            vec![json!({"reference": "Patient/p1"})]
        );
        assert_eq!(
            run("Observation.performer.where(resolve() is Patient)"),
            vec![json!({"reference": "http://h/fhir/Patient/p2"})]
        );
        assert_eq!(
            run("(Observation.value as Quantity)"),
            vec![json!({"value": 5})]
        );
        assert!(run("(Observation.value as CodeableConcept)").is_empty());
        assert_eq!(
            run("Observation.effective"),
            vec![json!({"start": "2024-01-01"})]
        );
        assert_eq!(run("Observation.component.code").len(), 2);
        assert_eq!(run("Resource.id"), vec![json!("o1")]);
    }
}

/// The plans against the FHIRPath engine, parameter by parameter, on resources with the
/// shapes that matter (choices, references of several targets, arrays, backbones, absent
/// elements): same values, or the plan must not exist.
#[cfg(test)]
mod equivalence {
    use super::*;
    use crate::fhir::fhirpath::FhirPath;
    use crate::fhir::search::registry::Registry;
    use crate::fhir::search::value::extract;
    use serde_json::json;

    fn resources() -> Vec<Value> {
        vec![
            json!({"resourceType": "Observation", "id": "o1", "status": "final",
                   "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/observation-category", "code": "laboratory"}]}],
                   "code": {"coding": [{"system": "http://loinc.org", "code": "2339-0", "display": "Glucose"}], "text": "Glucose"},
                   "subject": {"reference": "Patient/p1"}, "encounter": {"reference": "Encounter/e1"},
                   "performer": [{"reference": "Practitioner/x"}, {"reference": "http://h/fhir/Patient/p2"}, {"display": "someone"}],
                   "effectiveDateTime": "2024-05-01T10:00:00Z", "issued": "2024-05-01T11:00:00Z",
                   "valueQuantity": {"value": 180.5, "unit": "mg/dL", "system": "http://unitsofmeasure.org", "code": "mg/dL"},
                   "interpretation": [{"coding": [{"code": "H"}]}],
                   "identifier": [{"system": "urn:x", "value": "1"}],
                   "component": [{"code": {"coding": [{"code": "a"}]}, "valueQuantity": {"value": 1}},
                                 {"code": {"coding": [{"code": "b"}]}, "valueCodeableConcept": {"coding": [{"code": "pos"}]}}]}),
            json!({"resourceType": "Observation", "id": "o2", "status": "preliminary",
                   "code": {"text": "note"}, "subject": {"reference": "Group/g1"},
                   "effectivePeriod": {"start": "2024-01-01", "end": "2024-01-02"},
                   "valueString": "high", "meta": {"lastUpdated": "2024-01-01T00:00:00Z", "tag": [{"code": "t"}]}}),
            json!({"resourceType": "Encounter", "id": "e1", "status": "in-progress",
                   "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "IMP"},
                   "subject": {"reference": "Patient/p1"}, "period": {"start": "2024-05-01"},
                   "participant": [{"individual": {"reference": "Practitioner/d1"}, "type": [{"coding": [{"code": "ATND"}]}]}],
                   "location": [{"location": {"reference": "Location/l1"}}],
                   "diagnosis": [{"condition": {"reference": "Condition/c1"}}]}),
            json!({"resourceType": "Patient", "id": "p1", "active": true, "gender": "female",
                   "birthDate": "1980-02-03", "name": [{"family": "Doe", "given": ["Jane", "J"]}],
                   "telecom": [{"system": "phone", "value": "555"}], "address": [{"city": "Boston", "postalCode": "02115"}],
                   "generalPractitioner": [{"reference": "Practitioner/d1"}], "deceasedBoolean": false}),
        ]
    }

    #[tokio::test]
    async fn plans_select_what_the_engine_selects() {
        let version = FhirVersion::R4;
        let fp = FhirPath::new(version).await.unwrap();
        let registry = Registry::load(version);
        let mut compared = 0;
        for r in resources() {
            let ty = r["resourceType"].as_str().unwrap();
            let prepared = fp.prepare(&r, None, Some(&r));
            for param in registry.of_type(ty) {
                let Some(plan) = &param.plan else { continue };
                let engine = match fp.eval(&prepared, &param.expression).await {
                    Ok(items) => extract(param.kind, &items),
                    Err(_) => continue,
                };
                let walked = extract(param.kind, plan.select(&r));
                assert_eq!(walked, engine, "{ty}.{} = {}", param.code, param.expression);
                compared += 1;
            }
        }
        assert!(compared > 60, "only {compared} parameters compared");
    }
}
