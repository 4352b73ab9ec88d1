//! Trigger + canFilterBy evaluation throughput on realistic Observations, one core.
//!
//!   scripts/bench.sh            (generates the workload with ../shared/workload/gen.py)
//!   cargo bench --bench evaluate -- resources.jsonl
//!
//! Prints, per scenario, changes evaluated per second on one core beside the physical
//! limit measured in the same run: parsing the same resources' JSON (which capture must
//! do for any change a criterion looks at).

// Benchmarks, examples and tests may unwrap (a panic there is a failed run, not a daemon),
// and their `pub` items are for their own modules.
#![allow(clippy::unwrap_used, unreachable_pub)]

use fhir_cdc::config::FhirVersion;
use fhir_cdc::fhir::fhirpath::FhirPath;
use fhir_cdc::fhir::search::registry::Registry;
use fhir_cdc::fhir::search::Searcher;
use fhir_cdc::fhir::topic::{Interaction, Topic};
use fhir_cdc::fhir::trigger::{self, ChangeEval, Compiled, Outcome};
use serde_json::{json, Value};
use std::sync::Arc;
use std::time::{Duration, Instant};

const TYPES: [&str; 5] = [
    "Encounter",
    "Patient",
    "MedicationRequest",
    "DiagnosticReport",
    "Condition",
];

/// 20 topics: 15 on type + interaction only (5 of them on Observation), and, when
/// `criteria`, 5 Observation topics with a FHIRPath criterion and 3 canFilterBy parameters.
fn topics(criteria: bool) -> Vec<Value> {
    let mut out = Vec::new();
    for i in 0..15 {
        let ty = if i < 5 { "Observation" } else { TYPES[i % 5] };
        out.push(
            json!({"resourceType": "SubscriptionTopic", "url": format!("http://t/plain-{i}"),
            "resourceTrigger": [{"resource": ty, "supportedInteraction": ["create", "update"]}]}),
        );
    }
    for (i, ty) in TYPES.iter().enumerate() {
        let t = if criteria {
            json!({"resourceType": "SubscriptionTopic", "url": format!("http://t/crit-{i}"),
                "resourceTrigger": [{"resource": "Observation", "supportedInteraction": ["create", "update"],
                    "fhirPathCriteria": format!("%current.status = 'final' and (%current.value.ofType(Quantity).value > {} or %current.code.coding.code.exists())", i * 10)}],
                "canFilterBy": [{"resource": "Observation", "filterParameter": "patient"},
                                {"resource": "Observation", "filterParameter": "code"},
                                {"resource": "Observation", "filterParameter": "date"}]})
        } else {
            json!({"resourceType": "SubscriptionTopic", "url": format!("http://t/more-{i}"),
                "resourceTrigger": [{"resource": ty, "supportedInteraction": ["delete"]}]})
        };
        out.push(t);
    }
    out
}

async fn scenario(
    s: &Searcher,
    bodies: &[String],
    criteria: bool,
    budget: Duration,
) -> (f64, usize) {
    let compiled: Vec<(Topic, Compiled)> = topics(criteria)
        .iter()
        .map(|t| {
            let t = Topic::from_json(t).unwrap();
            let c = trigger::compile(&t, &s.registry, &s.fp).unwrap();
            (t, c)
        })
        .collect();
    let start = Instant::now();
    let (mut n, mut fired) = (0usize, 0usize);
    while start.elapsed() < budget {
        for b in bodies {
            // What capture does per change: match type + interaction; parse and evaluate
            // only when a topic with criteria or filters wants the change.
            let ty = "Observation";
            let wanted: Vec<&(Topic, Compiled)> = compiled
                .iter()
                .filter(|(t, _)| t.matches(ty, Interaction::Update))
                .collect();
            let needs_body = wanted
                .iter()
                .any(|(_, c)| c.has_criteria() || !c.filters.is_empty());
            if needs_body {
                let current: Value = serde_json::from_str(b).unwrap();
                let ev = ChangeEval::from_arcs(s, None, Some(Arc::new(current)));
                for (_, c) in &wanted {
                    if c.has_criteria() {
                        match c.evaluate(&ev, ty, Interaction::Update).await {
                            Outcome::Fires => {}
                            _ => continue,
                        }
                    }
                    if !c.filters.is_empty() {
                        let v = c.filter_values(&ev, ty).await;
                        assert!(!v.is_empty());
                    }
                    fired += 1;
                }
            } else {
                fired += wanted.len();
            }
            n += 1;
        }
    }
    (n as f64 / start.elapsed().as_secs_f64(), fired)
}

fn parse_rate(bodies: &[String], budget: Duration) -> f64 {
    let start = Instant::now();
    let mut n = 0usize;
    while start.elapsed() < budget {
        for b in bodies {
            let v: Value = serde_json::from_str(b).unwrap();
            std::hint::black_box(v);
            n += 1;
        }
    }
    n as f64 / start.elapsed().as_secs_f64()
}

fn main() {
    let path = std::env::args().skip(1).find(|a| !a.starts_with('-'));
    let Some(path) = path else {
        eprintln!(
            "usage: cargo bench --bench evaluate -- resources.jsonl   (scripts/bench.sh makes one)"
        );
        return;
    };
    let bodies: Vec<String> = std::fs::read_to_string(&path)
        .unwrap()
        .lines()
        .filter(|l| {
            l.contains("\"resourceType\": \"Observation\"")
                || l.contains("\"resourceType\":\"Observation\"")
        })
        .map(str::to_string)
        .collect();
    assert!(!bodies.is_empty(), "no Observations in {path}");
    let avg = bodies.iter().map(String::len).sum::<usize>() / bodies.len();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let v = FhirVersion::R4;
        let s = Searcher { fp: FhirPath::new(v).await.unwrap(), registry: Arc::new(Registry::load(v)) };
        let budget = Duration::from_secs(5);
        println!("workload: {} Observations from {path}, {avg} bytes of JSON each; one core (current-thread runtime)", bodies.len());
        let limit = parse_rate(&bodies, budget);
        println!("physical limit, same run: serde_json parses {limit:.0} of these resources/s/core");
        let (plain, _) = scenario(&s, &bodies, false, budget).await;
        println!("20 topics, resource type + interaction only: {plain:.0} changes/s/core (target 50,000)");
        let (crit, fired) = scenario(&s, &bodies, true, budget).await;
        println!(
            "20 topics, 5 with a FHIRPath criterion and 3 canFilterBy each: {crit:.0} changes/s/core (target 10,000; {:.1} topic matches per change)",
            fired as f64 / (crit * budget.as_secs_f64()).max(1.0)
        );
    });
}
