//! canFilterBy walks on members' text ([`crate::fhir::search::direct`]) against the `Value`
//! way through this store's format converter: the same values, in FHIR JSON and in Aidbox's
//! format, or no answer (and the complete resource instead) when the text is in doubt.

use super::format::{to_fhir, Attributes};
use crate::fhir::scan::{members, Source};
use crate::fhir::search::direct::RawDoc;
use crate::fhir::search::path::{compile, Plan};
use crate::fhir::search::registry::ParamType;
use crate::fhir::search::value::{extract, Values};
use crate::fhir::FhirVersion;
use serde_json::{json, Value};

const V: FhirVersion = FhirVersion::R4;

fn plan(expr: &str) -> Plan {
    compile(expr, "Observation", V).expect("a plan")
}

/// The values the `Value` way gives: the whole body parsed, converted from Aidbox's
/// format when `aidbox`, walked and extracted.
fn by_value(body: &Value, aidbox: bool, plan: &Plan, kind: ParamType) -> Values {
    let mut m = body.as_object().unwrap().clone();
    if aidbox {
        to_fhir(&mut m, V, &Attributes::default());
    }
    let v = Value::Object(m);
    extract(kind, plan.select_as(&v, Some("Observation")))
}

/// The values read from the members' text.
fn by_text(
    text: &str,
    aidbox: bool,
    attrs: Vec<&str>,
    plan: &Plan,
    kind: ParamType,
) -> Option<Values> {
    let kept = members(text.as_bytes(), Source::Unchecked, |_| true).expect("scanned");
    let doc = RawDoc::new(kept, aidbox, attrs);
    doc.values(&plan.shapes("Observation").expect("shapes"), kind)
}

#[test]
fn each_walk_reads_what_the_value_way_reads_in_both_formats() {
    let cases = [
        ("Observation.code", ParamType::Token),
        (
            "Observation.subject.where(resolve() is Patient)",
            ParamType::Reference,
        ),
        ("Observation.subject", ParamType::Reference),
        ("Observation.performer", ParamType::Reference),
        (
            "(Observation.value as Quantity) | (Observation.value as SampledData)",
            ParamType::Quantity,
        ),
        ("Observation.effective", ParamType::Date),
        (
            "Observation.value.ofType(CodeableConcept)",
            ParamType::Token,
        ),
    ];
    let bodies = [
        json!({"resourceType": "Observation", "status": "final",
            "code": {"coding": [{"system": "http://loinc.org", "code": "1-8"}, "x", {"code": "2"}], "text": "T\"q"},
            "subject": {"reference": "Patient/p1", "display": "P"},
            "performer": [{"reference": "Practitioner/d1"}, null, {"reference": "#c1"}],
            "valueQuantity": {"value": 5.5, "unit": "mg", "system": "http://unitsofmeasure.org"},
            "effectivePeriod": {"start": "2024-01-01", "end": "2024-02"}}),
        // Aidbox's forms: typed, uri and local references, choices under their element.
        json!({"resourceType": "Observation",
            "subject": {"resourceType": "Patient", "id": "p2"},
            "performer": [{"uri": "http://x.org/fhir/Practitioner/9"}, {"localRef": "c2"}, {"id": "only"}],
            "value": {"Quantity": {"value": 7, "code": "kg"}},
            "valueQuantity": {"value": 1},
            "effective": {"dateTime": "2024-03-04T05:06:07Z"}}),
        json!({"resourceType": "Observation", "subject": {"resourceType": "Group", "id": "g"},
            "value": {"CodeableConcept": {"coding": [{"code": "pos"}]}},
            "effective": {"Period": {"start": "2020"}, "extra": 1}}),
    ];
    let mut answered = 0;
    for body in &bodies {
        let text = body.to_string();
        for aidbox in [false, true] {
            for (expr, kind) in cases {
                let p = plan(expr);
                let want = by_value(body, aidbox, &p, kind);
                let got = by_text(&text, aidbox, Vec::new(), &p, kind).expect("the text answers");
                assert_eq!(got, want, "{expr} on {body} (aidbox: {aidbox})");
                answered += usize::from(!want.is_empty());
            }
        }
    }
    // Progress: most walks found values, in both formats.
    assert!(answered >= 20, "{answered} walks with values");
}

#[test]
fn doubtful_text_is_left_to_the_complete_resource() {
    let p = plan("Observation.code");
    // A repeated name inside the member: serde_json keeps the last, the text does not say.
    let text = r#"{"code": {"text": "a", "text": "b"}}"#;
    assert_eq!(by_text(text, false, Vec::new(), &p, ParamType::Token), None);
    // A member stored under a first-class extension's key becomes an extension.
    let text = r#"{"code": {"text": "a"}}"#;
    assert_eq!(
        by_text(text, true, vec!["code"], &p, ParamType::Token),
        None
    );
    assert!(by_text(text, true, Vec::new(), &p, ParamType::Token).is_some());
    // The resource's own members are never read from the body.
    assert!(compile("Resource.id", "Observation", V)
        .unwrap()
        .shapes("Observation")
        .is_none());
    assert!(plan("Observation.component.code")
        .shapes("Observation")
        .is_none());
}
