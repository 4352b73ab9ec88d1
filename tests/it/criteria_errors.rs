//! Criteria errors that speak: the official R5 example SubscriptionTopic (queryCriteria plus
//! a fhirPathCriteria whose `|` makes `and` give no boolean) notifies exactly once per
//! in-progress → completed, with the criteria error logged once and counted; the topic's
//! `on_criteria_error` policy decides.

use crate::common::*;
use fhir_cdc::fhir::fhirpath::FhirPath;
use fhir_cdc::fhir::search::registry::Registry;
use fhir_cdc::fhir::search::Searcher;
use fhir_cdc::fhir::topic::{Interaction, Topic};
use fhir_cdc::fhir::trigger::{self, ChangeEval, OnCriteriaError, Outcome};
use serde_json::{json, Value};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

const URL: &str = "http://example.org/FHIR/R5/SubscriptionTopic/example";

fn example_path() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../shared/conformance/examples/r5/SubscriptionTopic-example.json")
        .canonicalize()
        .unwrap()
}

fn enc(status: &str, patient: &str) -> Value {
    json!({"resourceType": "Encounter", "id": "e", "status": status, "class": [{"coding": [{"code": "IMP"}]}],
           "subject": {"reference": patient}})
}

#[tokio::test]
async fn the_policy_decides_when_criteria_give_no_decision() {
    let s = Searcher {
        fp: FhirPath::new(fhir_cdc::fhir::FhirVersion::R5)
            .await
            .unwrap(),
        registry: Arc::new(Registry::load(fhir_cdc::fhir::FhirVersion::R5)),
    };
    let v: Value = serde_json::from_str(&std::fs::read_to_string(example_path()).unwrap()).unwrap();
    let topic = Topic::from_json(&v).unwrap();
    let (prev, curr) = (
        enc("in-progress", "Patient/1"),
        enc("completed", "Patient/1"),
    );
    let ev = ChangeEval::new(&s, Some(&prev), Some(&curr));
    let mut fired = Vec::new();
    for policy in [
        OnCriteriaError::UseQueryCriteria,
        OnCriteriaError::Skip,
        OnCriteriaError::Notify,
    ] {
        let mut c = trigger::compile(&topic, &s.registry, &s.fp).unwrap();
        c.on_error = policy;
        match c.evaluate(&ev, "Encounter", Interaction::Update).await {
            Outcome::Error(e) => {
                assert_eq!(e.kind, "empty", "{}", e.message);
                fired.push(e.fires);
            }
            other => panic!("{policy:?}: expected a criteria error, got {other:?}"),
        }
    }
    assert_eq!(fired, [true, false, true]);
    // completed → completed: the queryCriteria decide before any FHIRPath runs.
    let c = trigger::compile(&topic, &s.registry, &s.fp).unwrap();
    let same = ChangeEval::new(&s, Some(&curr), Some(&curr));
    assert!(matches!(
        c.evaluate(&same, "Encounter", Interaction::Update).await,
        Outcome::DoesNotFire
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_official_example_topic_notifies_once_per_completion_and_logs_the_error_once() {
    let topics = format!(
        "[[topic]]\nfile = {:?}\n",
        example_path().display().to_string()
    );
    let env = TestEnv::aidbox(&topics).build().await;
    let (store, rx, api) = (&env.store, &env.rx, env.api);
    let d = env.start().await;
    let filter = json!({"filterBy": [{"resourceType": "Encounter", "filterParameter": "subject", "value": "Patient/p1"}]});
    subscribe_active(api, URL, &rx.url("done"), "id-only", filter).await;
    let put = |id: &'static str, status: &'static str, patient: &'static str| async move {
        let mut body = enc(status, patient);
        body.as_object_mut().unwrap().remove("id");
        body.as_object_mut().unwrap().remove("resourceType");
        aidbox_put(store, "Encounter", id, &body).await;
    };
    put("e1", "planned", "Patient/p1").await; // a create: not a supported interaction
    put("e1", "in-progress", "Patient/p1").await; // not completed: the query fails
    put("e1", "completed", "Patient/p1").await; // fires
    put("e1", "completed", "Patient/p1").await; // completed → completed: no
    put("e2", "in-progress", "Patient/p2").await;
    put("e2", "completed", "Patient/p2").await; // fires, filtered out (another patient)
    put("e3", "in-progress", "Patient/p1").await;
    put("e3", "completed", "Patient/p1").await; // fires
    wait_until("two notifications", Duration::from_secs(30), || async {
        rx.events("done").len() >= 2
    })
    .await;
    // Anything more would have been queued by now with the last change.
    wait_settled(&env).await;
    let urls: Vec<String> = rx
        .events("done")
        .iter()
        .map(|b| b["entry"][1]["fullUrl"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(
        urls,
        [
            "http://fhir-cdc.test/fhir/Encounter/e1",
            "http://fhir-cdc.test/fhir/Encounter/e3"
        ]
    );
    let log = d.log_text();
    let lines = log.matches("topic criteria could not be evaluated").count();
    assert_eq!(
        lines, 1,
        "the criteria error is logged once per topic and kind:\n{log}"
    );
    assert!(
        !log.contains("in-progress") && !log.contains("Patient/p1\""),
        "resource content in the log"
    );
    let metrics = reqwest::get(format!("http://127.0.0.1:{api}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let counted = metrics
        .lines()
        .find(|l| l.starts_with("fhir_cdc_criteria_errors_total{") && l.contains(URL))
        .unwrap_or_else(|| panic!("no criteria error counter:\n{metrics}"));
    let n: f64 = counted.rsplit(' ').next().unwrap().parse().unwrap();
    assert_eq!(n, 3.0, "{counted}");
    validate(&rx.bodies("done"), "r5", &["--sequence", "strict"]);
}
