//! Table-driven trigger and filter cases, evaluated with the real FHIRPath engine and the
//! official search parameters: the official example topics (R5 admission and example, the
//! Backport IG's encounter-complete) and topics written from the R5 SubscriptionTopic text.

use fhir_cdc::config::FhirVersion;
use fhir_cdc::fhir::fhirpath::FhirPath;
use fhir_cdc::fhir::search::registry::Registry;
use fhir_cdc::fhir::search::Searcher;
use fhir_cdc::fhir::subscription::Filter;
use fhir_cdc::fhir::topic::{Interaction, Topic};
use fhir_cdc::fhir::trigger::{self, ChangeEval, Outcome};
use serde_json::{json, Value};
use std::sync::Arc;

use Interaction::{Create, Delete, Update};

async fn searcher(v: FhirVersion) -> Searcher {
    Searcher {
        fp: FhirPath::new(v).await.unwrap(),
        registry: Arc::new(Registry::load(v)),
    }
}

fn example(path: &str) -> Value {
    let p = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../shared/conformance/examples")
        .join(path);
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

fn enc(status: &str) -> Value {
    json!({"resourceType": "Encounter", "id": "e1", "status": status, "subject": {"reference": "Patient/p1"}})
}

fn topic(trigger: Value) -> Value {
    json!({"resourceType": "SubscriptionTopic", "url": "http://t/x", "resourceTrigger": [trigger]})
}

/// Expected outcome: F fires, N does not, E is an evaluation error (does not fire, logged).
#[derive(Debug, PartialEq, Clone, Copy)]
enum O {
    F,
    N,
    E,
}

async fn run(
    s: &Searcher,
    topic: &Value,
    ty: &str,
    i: Interaction,
    prev: Option<Value>,
    curr: Option<Value>,
) -> O {
    let t = Topic::from_json(topic).unwrap();
    let c = trigger::compile(&t, &s.registry, &s.fp).unwrap();
    match c
        .evaluate(&ChangeEval::new(s, prev.as_ref(), curr.as_ref()), ty, i)
        .await
    {
        Outcome::Fires => O::F,
        Outcome::DoesNotFire => O::N,
        // The topic's policy (default: the queryCriteria decide) made it fire regardless.
        Outcome::Error(e) if e.fires => O::F,
        Outcome::Error(_) => O::E,
    }
}

#[tokio::test]
async fn trigger_cases() {
    let r5 = searcher(FhirVersion::R5).await;
    let r4b = searcher(FhirVersion::R4B).await;
    let admission = example("r5/SubscriptionTopic-admission.json");
    let r5_example = example("r5/SubscriptionTopic-example.json");
    let complete = example("r4b-backport/SubscriptionTopic-r4b-encounter-complete.json");
    let current_only =
        topic(json!({"resource": "Encounter", "queryCriteria": {"current": "status=finished"}}));
    let previous_only = topic(
        json!({"resource": "Encounter", "queryCriteria": {"previous": "status=finished", "resultForCreate": "test-fails"}}),
    );
    let either = topic(
        json!({"resource": "Encounter", "queryCriteria": {"previous": "status=planned", "current": "status=finished", "requireBoth": false}}),
    );
    let del_pass = topic(
        json!({"resource": "Encounter", "supportedInteraction": ["delete"], "queryCriteria": {"current": "status=finished", "resultForDelete": "test-passes"}}),
    );
    let del_fail = topic(
        json!({"resource": "Encounter", "supportedInteraction": ["delete"], "queryCriteria": {"current": "status=finished", "resultForDelete": "test-fails"}}),
    );
    let del_both = topic(
        json!({"resource": "Encounter", "supportedInteraction": ["delete"], "queryCriteria": {"previous": "status=finished", "current": "status=finished", "resultForDelete": "test-passes", "requireBoth": true}}),
    );
    let create_only = topic(json!({"resource": "Encounter", "supportedInteraction": ["create"]}));
    let high = topic(
        json!({"resource": "Observation", "fhirPathCriteria": "%current.value.ofType(Quantity).value > 140"}),
    );
    let unit = topic(
        json!({"resource": "Observation", "fhirPathCriteria": "(%current.value as Quantity).unit = 'mg/dL'"}),
    );
    let not_bool = topic(json!({"resource": "Encounter", "fhirPathCriteria": "%current.status"}));
    let no_prev =
        topic(json!({"resource": "Encounter", "fhirPathCriteria": "%previous.exists().not()"}));
    let code_q = topic(
        json!({"resource": "Observation", "queryCriteria": {"current": "code=http://loinc.org|2339-0&status=final,amended"}}),
    );
    let multi = json!({"resourceType": "SubscriptionTopic", "url": "http://t/m", "resourceTrigger": [
        {"resource": "Encounter", "supportedInteraction": ["create"]},
        {"resource": "Observation", "supportedInteraction": ["update"], "queryCriteria": {"current": "status=final"}}]});
    let q = |v: f64| json!({"resourceType": "Observation", "id": "o", "status": "final", "code": {"coding": [{"system": "http://loinc.org", "code": "2339-0"}]}, "valueQuantity": {"value": v, "unit": "mg/dL"}});
    let st = |s: &str| json!({"resourceType": "Observation", "id": "o", "status": s, "code": {"coding": [{"system": "http://loinc.org", "code": "2339-0"}]}});

    #[allow(clippy::type_complexity)]
    let cases: Vec<(
        &str,
        &Searcher,
        &Value,
        &str,
        Interaction,
        Option<Value>,
        Option<Value>,
        O,
    )> = vec![
        // R5 admission: queryCriteria and fhirPathCriteria must both hold.
        (
            "admission update planned→in-progress",
            &r5,
            &admission,
            "Encounter",
            Update,
            Some(enc("planned")),
            Some(enc("in-progress")),
            O::F,
        ),
        (
            "admission update in-progress→in-progress",
            &r5,
            &admission,
            "Encounter",
            Update,
            Some(enc("in-progress")),
            Some(enc("in-progress")),
            O::N,
        ),
        (
            "admission update in-progress→completed",
            &r5,
            &admission,
            "Encounter",
            Update,
            Some(enc("in-progress")),
            Some(enc("completed")),
            O::N,
        ),
        (
            "admission update planned→planned",
            &r5,
            &admission,
            "Encounter",
            Update,
            Some(enc("planned")),
            Some(enc("planned")),
            O::N,
        ),
        // On create %previous is empty, so its FHIRPath gives no boolean; its queryCriteria
        // pass (resultForCreate test-passes, current in-progress), and by the default
        // on_criteria_error policy they decide: it fires, as the topic's author meant
        // (issue 11; before, the empty FHIRPath silently did not fire).
        (
            "admission create in-progress",
            &r5,
            &admission,
            "Encounter",
            Create,
            None,
            Some(enc("in-progress")),
            O::F,
        ),
        (
            "admission create planned",
            &r5,
            &admission,
            "Encounter",
            Create,
            None,
            Some(enc("planned")),
            O::N,
        ),
        (
            "admission delete (not supported)",
            &r5,
            &admission,
            "Encounter",
            Delete,
            Some(enc("in-progress")),
            None,
            O::N,
        ),
        (
            "admission other type",
            &r5,
            &admission,
            "Observation",
            Update,
            Some(st("final")),
            Some(st("final")),
            O::N,
        ),
        // Backport encounter-complete (R4B): %previous.id.empty() makes create work.
        (
            "complete create finished",
            &r4b,
            &complete,
            "Encounter",
            Create,
            None,
            Some(enc("finished")),
            O::F,
        ),
        (
            "complete create planned",
            &r4b,
            &complete,
            "Encounter",
            Create,
            None,
            Some(enc("planned")),
            O::N,
        ),
        (
            "complete update in-progress→finished",
            &r4b,
            &complete,
            "Encounter",
            Update,
            Some(enc("in-progress")),
            Some(enc("finished")),
            O::F,
        ),
        (
            "complete update finished→finished",
            &r4b,
            &complete,
            "Encounter",
            Update,
            Some(enc("finished")),
            Some(enc("finished")),
            O::N,
        ),
        (
            "complete update finished→in-progress",
            &r4b,
            &complete,
            "Encounter",
            Update,
            Some(enc("finished")),
            Some(enc("in-progress")),
            O::N,
        ),
        (
            "complete delete (not supported)",
            &r4b,
            &complete,
            "Encounter",
            Delete,
            Some(enc("finished")),
            None,
            O::N,
        ),
        // R5 example topic: its FHIRPath unions booleans with `|` where `or` is meant (a known
        // quirk of the example): `and` over a two-item collection yields no boolean. The
        // queryCriteria passed, so by the default policy they decide: it fires (issue 11;
        // before, it silently did not).
        (
            "example update in-progress→completed",
            &r5,
            &r5_example,
            "Encounter",
            Update,
            Some(enc("in-progress")),
            Some(enc("completed")),
            O::F,
        ),
        (
            "example update completed→completed (query fails first)",
            &r5,
            &r5_example,
            "Encounter",
            Update,
            Some(enc("completed")),
            Some(enc("completed")),
            O::N,
        ),
        (
            "example create (not supported)",
            &r5,
            &r5_example,
            "Encounter",
            Create,
            None,
            Some(enc("completed")),
            O::N,
        ),
        // current only, requireBoth absent.
        (
            "current-only planned→finished",
            &r5,
            &current_only,
            "Encounter",
            Update,
            Some(enc("planned")),
            Some(enc("finished")),
            O::F,
        ),
        (
            "current-only finished→finished",
            &r5,
            &current_only,
            "Encounter",
            Update,
            Some(enc("finished")),
            Some(enc("finished")),
            O::F,
        ),
        (
            "current-only planned→planned",
            &r5,
            &current_only,
            "Encounter",
            Update,
            Some(enc("planned")),
            Some(enc("planned")),
            O::N,
        ),
        (
            "current-only create finished",
            &r5,
            &current_only,
            "Encounter",
            Create,
            None,
            Some(enc("finished")),
            O::F,
        ),
        (
            "current-only create planned",
            &r5,
            &current_only,
            "Encounter",
            Create,
            None,
            Some(enc("planned")),
            O::N,
        ),
        // previous only, resultForCreate test-fails.
        (
            "previous-only finished→cancelled",
            &r5,
            &previous_only,
            "Encounter",
            Update,
            Some(enc("finished")),
            Some(enc("cancelled")),
            O::F,
        ),
        (
            "previous-only planned→cancelled",
            &r5,
            &previous_only,
            "Encounter",
            Update,
            Some(enc("planned")),
            Some(enc("cancelled")),
            O::N,
        ),
        (
            "previous-only create finished",
            &r5,
            &previous_only,
            "Encounter",
            Create,
            None,
            Some(enc("finished")),
            O::N,
        ),
        // requireBoth false: either test.
        (
            "either planned→in-progress",
            &r5,
            &either,
            "Encounter",
            Update,
            Some(enc("planned")),
            Some(enc("in-progress")),
            O::F,
        ),
        (
            "either in-progress→finished",
            &r5,
            &either,
            "Encounter",
            Update,
            Some(enc("in-progress")),
            Some(enc("finished")),
            O::F,
        ),
        (
            "either in-progress→in-progress",
            &r5,
            &either,
            "Encounter",
            Update,
            Some(enc("in-progress")),
            Some(enc("in-progress")),
            O::N,
        ),
        (
            "either create finished (resultForCreate fails)",
            &r5,
            &either,
            "Encounter",
            Create,
            None,
            Some(enc("finished")),
            O::F,
        ),
        (
            "either create planned",
            &r5,
            &either,
            "Encounter",
            Create,
            None,
            Some(enc("planned")),
            O::N,
        ),
        // Deletes: resultForDelete both ways, requireBoth with the previous version.
        (
            "delete resultForDelete passes",
            &r5,
            &del_pass,
            "Encounter",
            Delete,
            Some(enc("planned")),
            None,
            O::F,
        ),
        (
            "delete resultForDelete fails",
            &r5,
            &del_fail,
            "Encounter",
            Delete,
            Some(enc("finished")),
            None,
            O::N,
        ),
        (
            "delete both: finished",
            &r5,
            &del_both,
            "Encounter",
            Delete,
            Some(enc("finished")),
            None,
            O::F,
        ),
        (
            "delete both: planned",
            &r5,
            &del_both,
            "Encounter",
            Delete,
            Some(enc("planned")),
            None,
            O::N,
        ),
        (
            "delete topic ignores updates",
            &r5,
            &del_pass,
            "Encounter",
            Update,
            Some(enc("finished")),
            Some(enc("finished")),
            O::N,
        ),
        // Create-only.
        (
            "create-only create",
            &r5,
            &create_only,
            "Encounter",
            Create,
            None,
            Some(enc("planned")),
            O::F,
        ),
        (
            "create-only update",
            &r5,
            &create_only,
            "Encounter",
            Update,
            Some(enc("planned")),
            Some(enc("finished")),
            O::N,
        ),
        (
            "create-only delete",
            &r5,
            &create_only,
            "Encounter",
            Delete,
            Some(enc("planned")),
            None,
            O::N,
        ),
        // FHIRPath with choice types.
        (
            "ofType(Quantity) 150 > 140",
            &r5,
            &high,
            "Observation",
            Create,
            None,
            Some(q(150.0)),
            O::F,
        ),
        (
            "ofType(Quantity) 140 > 140",
            &r5,
            &high,
            "Observation",
            Create,
            None,
            Some(q(140.0)),
            O::N,
        ),
        (
            "ofType(Quantity) on a string value",
            &r5,
            &high,
            "Observation",
            Create,
            None,
            Some(
                json!({"resourceType": "Observation", "id": "o", "status": "final", "code": {}, "valueString": "high"}),
            ),
            O::N,
        ),
        (
            "ofType(Quantity) without value",
            &r5,
            &high,
            "Observation",
            Create,
            None,
            Some(st("final")),
            O::N,
        ),
        (
            "as Quantity unit",
            &r5,
            &unit,
            "Observation",
            Update,
            Some(q(1.0)),
            Some(q(2.0)),
            O::F,
        ),
        (
            "not a boolean",
            &r5,
            &not_bool,
            "Encounter",
            Update,
            Some(enc("planned")),
            Some(enc("finished")),
            O::E,
        ),
        (
            "%previous empty on create",
            &r5,
            &no_prev,
            "Encounter",
            Create,
            None,
            Some(enc("planned")),
            O::F,
        ),
        (
            "%previous present on update",
            &r5,
            &no_prev,
            "Encounter",
            Update,
            Some(enc("planned")),
            Some(enc("planned")),
            O::N,
        ),
        // queryCriteria with system|code AND status OR.
        (
            "query code+status final",
            &r5,
            &code_q,
            "Observation",
            Create,
            None,
            Some(st("final")),
            O::F,
        ),
        (
            "query code+status amended",
            &r5,
            &code_q,
            "Observation",
            Create,
            None,
            Some(st("amended")),
            O::F,
        ),
        (
            "query code+status preliminary",
            &r5,
            &code_q,
            "Observation",
            Create,
            None,
            Some(st("preliminary")),
            O::N,
        ),
        // Multi-type topic.
        (
            "multi Encounter create",
            &r5,
            &multi,
            "Encounter",
            Create,
            None,
            Some(enc("planned")),
            O::F,
        ),
        (
            "multi Encounter update",
            &r5,
            &multi,
            "Encounter",
            Update,
            Some(enc("planned")),
            Some(enc("finished")),
            O::N,
        ),
        (
            "multi Observation update final",
            &r5,
            &multi,
            "Observation",
            Update,
            Some(st("preliminary")),
            Some(st("final")),
            O::F,
        ),
        (
            "multi Observation update preliminary",
            &r5,
            &multi,
            "Observation",
            Update,
            Some(st("registered")),
            Some(st("preliminary")),
            O::N,
        ),
        (
            "multi Observation create",
            &r5,
            &multi,
            "Observation",
            Create,
            None,
            Some(st("final")),
            O::N,
        ),
    ];
    let n = cases.len();
    let mut wrong = Vec::new();
    for (name, s, t, ty, i, prev, curr, want) in cases {
        let got = run(s, t, ty, i, prev, curr).await;
        if got != want {
            wrong.push(format!("{name}: got {got:?}, want {want:?}"));
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
    assert!(n >= 50, "{n}");
}

/// (resource, filter's resource type, parameter, modifier, value, expected)
type FilterCase<'a> = (&'a Value, &'a str, &'a str, Option<&'a str>, &'a str, bool);

#[tokio::test]
async fn filter_cases() {
    let s = searcher(FhirVersion::R5).await;
    let topic = json!({"resourceType": "SubscriptionTopic", "url": "http://t/f",
    "resourceTrigger": [{"resource": "Encounter"}, {"resource": "Observation"}],
    "canFilterBy": [
        {"resource": "Encounter", "filterParameter": "patient"},
        {"resource": "Encounter", "filterParameter": "subject"},
        {"resource": "Encounter", "filterParameter": "status"},
        {"resource": "Encounter", "filterParameter": "date"},
        {"resource": "Observation", "filterParameter": "patient"},
        {"resource": "Observation", "filterParameter": "code"},
        {"resource": "Observation", "filterParameter": "status"},
        {"resource": "Observation", "filterParameter": "value-quantity"},
        {"resource": "Observation", "filterParameter": "date"},
        {"resource": "Observation", "filterParameter": "identifier"}
    ]});
    let t = Topic::from_json(&topic).unwrap();
    let c = trigger::compile(&t, &s.registry, &s.fp).unwrap();
    let e_patient = json!({"resourceType": "Encounter", "id": "e", "status": "in-progress", "subject": {"reference": "Patient/p1"},
        "actualPeriod": {"start": "2024-03-01T08:00:00Z", "end": "2024-03-03T10:00:00Z"}});
    let e_group = json!({"resourceType": "Encounter", "id": "e", "status": "planned", "subject": {"reference": "https://x.org/fhir/Group/g1"}});
    let o = json!({"resourceType": "Observation", "id": "o", "status": "final",
        "identifier": [{"system": "http://lab.example/accession", "value": "A-77"}],
        "subject": {"reference": "Patient/p2"},
        "code": {"coding": [{"system": "http://loinc.org", "code": "2339-0", "display": "Glucose"}]},
        "valueQuantity": {"value": 140.4, "unit": "mg/dL", "system": "http://unitsofmeasure.org", "code": "mg/dL"},
        "effectiveDateTime": "2024-07-01T08:30:00Z"});
    let cases: Vec<FilterCase> = vec![
        (&e_patient, "Encounter", "patient", None, "Patient/p1", true),
        (&e_patient, "Encounter", "patient", None, "p1", true),
        (
            &e_patient,
            "Encounter",
            "patient",
            None,
            "Patient/p2",
            false,
        ),
        (&e_patient, "Encounter", "subject", None, "Patient/p1", true),
        (&e_group, "Encounter", "patient", None, "Group/g1", false),
        (&e_group, "Encounter", "subject", None, "Group/g1", true),
        (
            &e_group,
            "Encounter",
            "patient",
            Some("missing"),
            "true",
            true,
        ),
        (&e_patient, "Encounter", "status", None, "in-progress", true),
        (
            &e_patient,
            "Encounter",
            "status",
            Some("not"),
            "in-progress",
            false,
        ),
        (
            &e_patient,
            "Encounter",
            "status",
            None,
            "planned,in-progress",
            true,
        ),
        (&e_patient, "Encounter", "date", None, "ge2024-03-02", true),
        (&e_patient, "Encounter", "date", None, "gt2024-03-05", false),
        (&e_patient, "Encounter", "date", None, "2024-03", true),
        (&e_patient, "Encounter", "date", None, "sa2024-02-01", true),
        (&o, "Observation", "patient", None, "Patient/p2", true),
        (&o, "Observation", "patient", None, "Patient/p1", false),
        (
            &o,
            "Observation",
            "code",
            None,
            "http://loinc.org|2339-0",
            true,
        ),
        (&o, "Observation", "code", None, "2339-0", true),
        (
            &o,
            "Observation",
            "code",
            None,
            "http://snomed.info/sct|2339-0",
            false,
        ),
        (&o, "Observation", "code", Some("text"), "gluc", true),
        (&o, "Observation", "status", None, "final", true),
        (&o, "Observation", "status", Some("not"), "final", false),
        (&o, "Observation", "value-quantity", None, "eq140", true),
        (&o, "Observation", "value-quantity", None, "140.4", true),
        (&o, "Observation", "value-quantity", None, "gt140", true),
        (&o, "Observation", "value-quantity", None, "gt150", false),
        (&o, "Observation", "value-quantity", None, "lt140", false),
        (
            &o,
            "Observation",
            "value-quantity",
            None,
            "140|http://unitsofmeasure.org|mg/dL",
            true,
        ),
        (&o, "Observation", "date", None, "2024-07-01", true),
        (&o, "Observation", "date", None, "ge2024-06-01", true),
        (&o, "Observation", "date", None, "lt2024-07-01", false),
        (
            &o,
            "Observation",
            "identifier",
            None,
            "http://lab.example/accession|A-77",
            true,
        ),
        (&o, "Observation", "identifier", None, "A-78", false),
        // A filter naming Encounter leaves Observations alone.
        (&o, "Encounter", "patient", None, "Patient/p1", true),
    ];
    for (res, filter_type, param, modifier, value, want) in cases {
        let ty = res["resourceType"].as_str().unwrap();
        let values = c
            .filter_values(&ChangeEval::new(&s, None, Some(res)), ty)
            .await;
        let values = values.into_iter().collect();
        let f = Filter {
            resource_type: Some(filter_type.to_string()),
            parameter: param.to_string(),
            comparator: None,
            modifier: modifier.map(str::to_string),
            value: value.to_string(),
            source: String::new(),
        };
        assert_eq!(
            f.matches(ty, &values),
            want,
            "{ty} {param}:{modifier:?}={value}"
        );
    }
}

#[tokio::test]
async fn filter_definition_and_explicit_fhirpath() {
    let s = searcher(FhirVersion::R5).await;
    let topic = json!({"resourceType": "SubscriptionTopic", "url": "http://t/d",
    "resourceTrigger": [{"resource": "Observation"}],
    "canFilterBy": [
        {"resource": "Observation", "filterParameter": "who",
         "filterDefinition": "http://hl7.org/fhir/SearchParameter/clinical-patient"},
        {"resource": "Observation", "filterParameter": "flag",
         "expression": "Observation.interpretation", "type": "token"}
    ]});
    let t = Topic::from_json(&topic).unwrap();
    let c = trigger::compile(&t, &s.registry, &s.fp).unwrap();
    assert_eq!(c.filters.len(), 2);
    let o = json!({"resourceType": "Observation", "id": "o", "status": "final", "code": {},
        "subject": {"reference": "Patient/p7"},
        "interpretation": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v3-ObservationInterpretation", "code": "HH"}]}]});
    let values: std::collections::HashMap<_, _> = c
        .filter_values(&ChangeEval::new(&s, None, Some(&o)), "Observation")
        .await
        .into_iter()
        .collect();
    let f = |param: &str, value: &str| Filter {
        resource_type: Some("Observation".into()),
        parameter: param.into(),
        comparator: None,
        modifier: None,
        value: value.into(),
        source: String::new(),
    };
    assert!(f("who", "Patient/p7").matches("Observation", &values));
    assert!(!f("who", "Patient/p8").matches("Observation", &values));
    assert!(f("flag", "HH").matches("Observation", &values));
    assert!(f(
        "flag",
        "http://terminology.hl7.org/CodeSystem/v3-ObservationInterpretation|HH"
    )
    .matches("Observation", &values));
    assert!(!f("flag", "L").matches("Observation", &values));
}
