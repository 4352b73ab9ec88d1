//! `../shared/workload/gen.py --mode writes` (5,000 operations, seed 7: Patients, Encounters,
//! Observations, DiagnosticReports, MedicationRequests created, updated through their
//! lifecycle, some deleted) replayed into each profile's tables through the store's own write
//! statements (`fhir-cdc init-store`'s `fhir_put` / `fhir_delete`), each operation its own
//! transaction as a REST server makes it: exactly one event per operation, with its type, id
//! and interaction, in order, and no others.

use crate::common::*;
use fhir_cdc::config::ProfileKind;
use serde_json::Value;
use std::time::Duration;

const TOPIC: &str = r#"
[[topic]]
url = "http://fhir-cdc.test/topic/workload"
resourceTrigger = [
  { resource = "Patient", supportedInteraction = ["create", "update", "delete"] },
  { resource = "Encounter", supportedInteraction = ["create", "update", "delete"] },
  { resource = "Observation", supportedInteraction = ["create", "update", "delete"] },
  { resource = "DiagnosticReport", supportedInteraction = ["create", "update", "delete"] },
  { resource = "MedicationRequest", supportedInteraction = ["create", "update", "delete"] },
]
"#;

struct Op {
    op: String,
    resource_type: String,
    id: String,
    resource: Value,
}

/// The workload, generated once per machine (cached by `scripts/workload.sh`).
fn workload() -> Vec<Op> {
    let path = crate::common::workload_file(&["5000", "7"]);
    std::fs::read_to_string(&path)
        .unwrap()
        .lines()
        .map(|l| {
            let v: Value = serde_json::from_str(l).unwrap();
            Op {
                op: v["op"].as_str().unwrap().into(),
                resource_type: v["resourceType"].as_str().unwrap().into(),
                id: v["id"].as_str().unwrap().into(),
                resource: v["resource"].clone(),
            }
        })
        .collect()
}

async fn replay(profile: ProfileKind) {
    let ops = workload();
    assert_eq!(ops.len(), 5000);
    let env = TestEnv::empty(TOPIC)
        .config(move |c| c.source.profile = profile)
        .build()
        .await;
    let store = &env.store;
    let layout = fhir_cdc::store::init::layout_sql(profile).unwrap();
    store.batch_execute(layout).await.unwrap();
    let _d = env.start().await;
    for op in &ops {
        let r = if op.op == "delete" {
            store
                .execute("SELECT fhir_delete($1, $2)", &[&op.resource_type, &op.id])
                .await
        } else {
            store
                .execute(
                    "SELECT fhir_put($1, $2, $3)",
                    &[&op.resource_type, &op.id, &op.resource],
                )
                .await
        };
        r.unwrap_or_else(|e| panic!("{} {}/{}: {e}", op.op, op.resource_type, op.id));
    }
    // The store's own ids (Medplum's are UUIDs made from the workload's).
    let ids: Vec<String> = ops.iter().map(|o| o.id.clone()).collect();
    let ids: Vec<String> = if profile == ProfileKind::Medplum {
        store
            .query(
                "SELECT medplum_id(x)::text FROM unnest($1::text[]) WITH ORDINALITY AS u(x, n) ORDER BY n",
                &[&ids],
            )
            .await
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect()
    } else {
        ids
    };
    let expected: Vec<(String, String, String)> = ops
        .iter()
        .zip(ids)
        .map(|(o, id)| (o.resource_type.clone(), id, o.op.clone()))
        .collect();
    let count = || async {
        store
            .query_one("SELECT count(*) FROM fhir_cdc.event", &[])
            .await
            .unwrap()
            .get::<_, i64>(0)
    };
    wait_until(
        "every operation queued",
        Duration::from_secs(120),
        || async { count().await >= 5000 },
    )
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let got: Vec<(String, String, String)> = store
        .query(
            "SELECT resource_type, resource_id, interaction FROM fhir_cdc.event ORDER BY id",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    assert_eq!(
        got.len(),
        expected.len(),
        "one event per operation, no others"
    );
    if let Some(i) = (0..got.len()).find(|&i| got[i] != expected[i]) {
        panic!(
            "operation {i}: expected {:?}, got {:?}",
            expected[i], got[i]
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aidbox_replay_gives_one_event_per_operation() {
    replay(ProfileKind::Aidbox).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hapi_replay_gives_one_event_per_operation() {
    replay(ProfileKind::Hapi).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn helios_replay_gives_one_event_per_operation() {
    replay(ProfileKind::Helios).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn medplum_replay_gives_one_event_per_operation() {
    replay(ProfileKind::Medplum).await;
}
