//! Subscription input is read as strictly as a FHIR server would: a table of malformed
//! Subscriptions (R5 form and R4 backport form), each refused with the right status and the
//! element named in the OperationOutcome; the same Subscriptions written into the store end
//! in `error` with that element named and never notify; and a few thousand generated
//! requests never produce a 5xx nor stop delivery.

use crate::common::*;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};
use std::time::Duration;

const TOPIC: &str = r#"
[[topic]]
url = "http://fhir-cdc.test/topic/encounter"
resourceTrigger = [{ resource = "Encounter", supportedInteraction = ["create", "update"] }]
canFilterBy = [{ resource = "Encounter", filterParameter = "patient" }]
"#;
const TOPIC_URL: &str = "http://fhir-cdc.test/topic/encounter";
const BP: &str = "http://hl7.org/fhir/uv/subscriptions-backport/StructureDefinition/";

/// A valid R5 Subscription with every element this server reads.
fn r5(endpoint: &str) -> Value {
    json!({
        "resourceType": "Subscription",
        "status": "requested",
        "topic": TOPIC_URL,
        "channelType": {"system": "http://terminology.hl7.org/CodeSystem/subscription-channel-type", "code": "rest-hook"},
        "endpoint": endpoint,
        "content": "id-only",
        "contentType": "application/fhir+json",
        "heartbeatPeriod": 3600,
        "timeout": 5,
        "maxCount": 10,
        "parameter": [{"name": "X-A", "value": "b"}],
        "filterBy": [{"resourceType": "Encounter", "filterParameter": "patient", "value": "Patient/1"}]
    })
}

/// A valid R4 Subscription in the Backport IG form.
fn backport(endpoint: &str) -> Value {
    json!({
        "resourceType": "Subscription",
        "status": "requested",
        "reason": "test",
        "criteria": TOPIC_URL,
        "_criteria": {"extension": [{"url": format!("{BP}backport-filter-criteria"), "valueString": "Encounter?patient=Patient/1"}]},
        "channel": {
            "extension": [
                {"url": format!("{BP}backport-timeout"), "valueUnsignedInt": 5},
                {"url": format!("{BP}backport-heartbeat-period"), "valueUnsignedInt": 3600},
                {"url": format!("{BP}backport-max-count"), "valuePositiveInt": 10}
            ],
            "type": "rest-hook",
            "endpoint": endpoint,
            "payload": "application/fhir+json",
            "_payload": {"extension": [{"url": format!("{BP}backport-payload-content"), "valueCode": "id-only"}]},
            "header": ["X-A: b"]
        }
    })
}

/// One malformed Subscription: a change to the valid one, the status it gets, the element
/// the OperationOutcome names.
struct Case {
    /// JSON pointer of the element changed (`/filterBy/0/value`).
    at: &'static str,
    /// `None` removes the element.
    to: Option<Value>,
    status: u16,
    expression: String,
}

fn case(at: &'static str, to: Value, status: u16, expression: &str) -> Case {
    Case {
        at,
        to: Some(to),
        status,
        expression: expression.to_string(),
    }
}

fn removed(at: &'static str, status: u16, expression: &str) -> Case {
    Case {
        at,
        to: None,
        status,
        expression: expression.to_string(),
    }
}

/// Applies a case to a valid Subscription.
fn apply(base: &Value, c: &Case) -> Value {
    let mut v = base.clone();
    let (parent, key) = c.at.rsplit_once('/').unwrap();
    let holder = if parent.is_empty() {
        &mut v
    } else {
        v.pointer_mut(parent)
            .unwrap_or_else(|| panic!("{parent} not in the base"))
    };
    match (holder, &c.to) {
        (Value::Object(m), None) => {
            m.remove(key);
        }
        (Value::Object(m), Some(x)) => {
            m.insert(key.to_string(), x.clone());
        }
        (Value::Array(a), Some(x)) => {
            let i: usize = key.parse().unwrap();
            if i < a.len() {
                a[i] = x.clone();
            } else {
                a.push(x.clone());
            }
        }
        (h, _) => panic!("cannot apply {} to {h}", c.at),
    }
    v
}

fn r5_cases() -> Vec<Case> {
    let long = "x".repeat(5000);
    let s = "Subscription";
    let e = |x: &str| format!("{s}.{x}");
    let mut v = vec![
        removed("/resourceType", 400, &e("resourceType")),
        case("/resourceType", json!("Patient"), 400, &e("resourceType")),
        case("/resourceType", json!(1), 400, &e("resourceType")),
        case("/id", json!("a b"), 400, &e("id")),
        case("/id", json!(5), 400, &e("id")),
        case("/id", json!("x".repeat(65)), 400, &e("id")),
        case("/status", json!(1e308), 400, &e("status")),
        case("/status", json!(-1), 400, &e("status")),
        case("/status", json!({"$ref": "x"}), 400, &e("status")),
        case("/status", Value::Null, 400, &e("status")),
        case("/status", json!("bogus"), 400, &e("status")),
        case("/status", json!(""), 400, &e("status")),
        case("/status", json!(["active"]), 400, &e("status")),
        case("/status", json!("error"), 422, &e("status")),
        case("/status", json!("entered-in-error"), 422, &e("status")),
        removed("/topic", 400, &e("topic")),
        case("/topic", json!(5), 400, &e("topic")),
        case("/topic", Value::Null, 400, &e("topic")),
        case("/topic", json!("http://nope/topic"), 422, &e("topic")),
        case("/topic", json!(""), 400, &e("topic")),
        case("/topic", json!([TOPIC_URL]), 400, &e("topic")),
        removed("/channelType", 400, &e("channelType")),
        case("/channelType", json!("rest-hook"), 400, &e("channelType")),
        case(
            "/channelType",
            json!({"code": 1}),
            400,
            &e("channelType.code"),
        ),
        case("/channelType", json!({}), 400, &e("channelType.code")),
        case("/channelType/bogus", json!(1), 400, &e("channelType.bogus")),
        case(
            "/channelType/code",
            json!("carrier-pigeon"),
            422,
            &e("channelType"),
        ),
        case(
            "/channelType/userSelected",
            json!("yes"),
            400,
            &e("channelType.userSelected"),
        ),
        case("/channelType", Value::Null, 400, &e("channelType")),
        case("/endpoint", json!(1), 400, &e("endpoint")),
        case("/endpoint", json!("gopher://x"), 422, &e("endpoint")),
        case("/endpoint", json!("not a url"), 422, &e("endpoint")),
        removed("/endpoint", 422, &e("endpoint")),
        case("/endpoint", json!(""), 400, &e("endpoint")),
        case("/endpoint", json!("http://x\u{0}y/"), 400, &e("endpoint")),
        case(
            "/endpoint",
            json!(format!("http://x.org/{long}")),
            400,
            &e("endpoint"),
        ),
        case(
            "/endpoint",
            json!({"url": "http://x.org/"}),
            400,
            &e("endpoint"),
        ),
        case("/content", json!("everything"), 400, &e("content")),
        case("/content", json!(1), 400, &e("content")),
        case("/content", Value::Null, 400, &e("content")),
        case("/content", json!(["id-only"]), 400, &e("content")),
        case("/contentType", json!(-1), 400, &e("contentType")),
        case("/contentType", json!("text/xml"), 422, &e("contentType")),
        case("/contentType", Value::Null, 400, &e("contentType")),
    ];
    for (k, min) in [("heartbeatPeriod", 0), ("timeout", 0), ("maxCount", 1)] {
        let at: &'static str = match k {
            "heartbeatPeriod" => "/heartbeatPeriod",
            "timeout" => "/timeout",
            _ => "/maxCount",
        };
        v.push(case(at, json!(min - 1), 400, &e(k)));
        v.push(case(at, json!("10"), 400, &e(k)));
        v.push(case(at, json!(1.5), 400, &e(k)));
        v.push(case(at, json!(1e308), 400, &e(k)));
        v.push(case(
            at,
            serde_json::from_str("9223372036854775808").unwrap(),
            400,
            &e(k),
        ));
        v.push(case(at, json!(2_147_483_648i64), 400, &e(k)));
        v.push(case(at, Value::Null, 400, &e(k)));
    }
    v.extend(filter_cases(&e));
    v.extend(other_cases(&e, &long));
    v
}

fn filter_cases(e: &dyn Fn(&str) -> String) -> Vec<Case> {
    let ok = json!({"filterParameter": "patient", "value": "Patient/1"});
    let with = |k: &str, x: Value| {
        let mut f = ok.clone();
        f[k] = x;
        f
    };
    vec![
        case("/filterBy", json!("0"), 400, &e("filterBy")),
        case("/filterBy", json!("gopher://x"), 400, &e("filterBy")),
        case(
            "/filterBy",
            serde_json::from_str("9223372036854775808").unwrap(),
            400,
            &e("filterBy"),
        ),
        case("/filterBy", ok.clone(), 400, &e("filterBy")),
        case("/filterBy", Value::Null, 400, &e("filterBy")),
        case("/filterBy", json!([null]), 400, &e("filterBy[0]")),
        case("/filterBy", json!(["patient"]), 400, &e("filterBy[0]")),
        case(
            "/filterBy",
            json!([{"value": "Patient/1"}]),
            400,
            &e("filterBy[0].filterParameter"),
        ),
        case(
            "/filterBy",
            json!([{"filterParameter": "patient"}]),
            400,
            &e("filterBy[0].value"),
        ),
        case(
            "/filterBy",
            json!([with("filterParameter", json!(1))]),
            400,
            &e("filterBy[0].filterParameter"),
        ),
        case(
            "/filterBy",
            json!([with("value", json!(5))]),
            400,
            &e("filterBy[0].value"),
        ),
        case(
            "/filterBy",
            json!([with("value", json!(""))]),
            400,
            &e("filterBy[0].value"),
        ),
        case(
            "/filterBy",
            json!([with("value", json!("Pat\u{0}ient/1"))]),
            400,
            &e("filterBy[0].value"),
        ),
        case(
            "/filterBy",
            json!([with("extra", json!(1))]),
            400,
            &e("filterBy[0].extra"),
        ),
        case(
            "/filterBy",
            json!([with("comparator", json!("bigger"))]),
            400,
            &e("filterBy[0].comparator"),
        ),
        case(
            "/filterBy",
            json!([with("modifier", json!("sideways"))]),
            400,
            &e("filterBy[0].modifier"),
        ),
        case(
            "/filterBy",
            json!([with("resourceType", json!(7))]),
            400,
            &e("filterBy[0].resourceType"),
        ),
        case(
            "/filterBy",
            json!([with(
                "modifierExtension",
                json!([{"url": "http://example.org/x", "valueBoolean": true}])
            )]),
            422,
            &e("filterBy[0].modifierExtension[0]"),
        ),
        case(
            "/filterBy",
            json!([ok.clone(), {"filterParameter": "code", "value": "x"}]),
            422,
            &e("filterBy[1]"),
        ),
        case(
            "/filterBy",
            json!(vec![ok.clone(); 65]),
            400,
            &e("filterBy"),
        ),
    ]
}

fn other_cases(e: &dyn Fn(&str) -> String, long: &str) -> Vec<Case> {
    vec![
        case("/parameter", json!("x"), 400, &e("parameter")),
        case(
            "/parameter",
            json!([{"name": "X-A"}]),
            400,
            &e("parameter[0].value"),
        ),
        case(
            "/parameter",
            json!([{"value": "b"}]),
            400,
            &e("parameter[0].name"),
        ),
        case(
            "/parameter",
            json!([{"name": "bad name", "value": "b"}]),
            400,
            &e("parameter[0]"),
        ),
        case(
            "/parameter",
            json!([{"name": "X-A", "value": "b\u{1}"}]),
            400,
            &e("parameter[0].value"),
        ),
        case(
            "/parameter",
            json!([{"name": "X-A", "value": "b", "extra": 1}]),
            400,
            &e("parameter[0].extra"),
        ),
        case("/extra", json!(1), 400, &e("extra")),
        case("/Extra", json!({}), 400, &e("Extra")),
        case("/text", json!("narrative"), 400, &e("text")),
        case(
            "/meta",
            json!({"tag": [{"code": "a\u{0}"}]}),
            400,
            &e("meta.tag[0].code"),
        ),
        case(
            "/modifierExtension",
            json!([{"url": "http://example.org/must-understand", "valueBoolean": true}]),
            422,
            &e("modifierExtension[0]"),
        ),
        case(
            "/extension",
            json!([{"valueString": "x"}]),
            400,
            &e("extension[0].url"),
        ),
        case("/extension", json!("x"), 400, &e("extension")),
        case(
            "/contained",
            json!({"resourceType": "Patient"}),
            400,
            &e("contained"),
        ),
        case("/name", json!(5), 400, &e("name")),
        case("/name", json!(long), 400, &e("name")),
        case("/reason", json!(["x"]), 400, &e("reason")),
        case("/_status", json!("x"), 400, &e("_status")),
        case("/identifier", json!({"value": "x"}), 400, &e("identifier")),
        case("/\u{0}", json!(1), 400, &e("\\u{0}")),
        case(
            "/managingEntity",
            json!("Patient/1"),
            400,
            &e("managingEntity"),
        ),
        case("/contact", json!([5]), 400, &e("contact[0]")),
        case("/end", json!("tomorrow"), 400, &e("end")),
        case("/end", json!(5), 400, &e("end")),
        case("/end", json!("2024-01-01"), 400, &e("end")),
    ]
}

fn backport_cases() -> Vec<Case> {
    let e = |x: &str| format!("Subscription.{x}");
    let ch = |x: &str| format!("Subscription.channel.{x}");
    vec![
        removed("/criteria", 400, &e("criteria")),
        case("/criteria", json!(5), 400, &e("criteria")),
        case("/criteria", json!("http://nope/topic"), 422, &e("criteria")),
        removed("/channel", 400, &e("channel")),
        case("/channel", json!("rest-hook"), 400, &e("channel")),
        removed("/channel/type", 400, &ch("type")),
        case("/channel/type", json!("carrier-pigeon"), 422, &ch("type")),
        case("/channel/header", json!("X-A: b"), 400, &ch("header")),
        case("/channel/header", json!(["nocolon"]), 400, &ch("header[0]")),
        case("/channel/header", json!([5]), 400, &ch("header[0]")),
        case(
            "/channel/extension/0/valueUnsignedInt",
            json!(-1),
            400,
            &ch("extension[0].valueUnsignedInt"),
        ),
        case(
            "/channel/extension/0/valueUnsignedInt",
            Value::Null,
            400,
            &ch("extension[0].valueUnsignedInt"),
        ),
        case(
            "/channel/extension/1",
            json!({"url": format!("{BP}backport-heartbeat-period"), "valueString": "60"}),
            400,
            &ch("extension[1].valueString"),
        ),
        case(
            "/channel/extension/2/valuePositiveInt",
            json!(0),
            400,
            &ch("extension[2].valuePositiveInt"),
        ),
        case(
            "/channel/extension/2/valuePositiveInt",
            json!("10"),
            400,
            &ch("extension[2].valuePositiveInt"),
        ),
        case(
            "/channel/_payload/extension/0/valueCode",
            json!("everything"),
            400,
            &ch("_payload.extension[0].valueCode"),
        ),
        case(
            "/channel/_payload/extension/0",
            json!({"url": format!("{BP}backport-payload-content"), "valueString": "id-only"}),
            400,
            &ch("_payload.extension[0].valueString"),
        ),
        case(
            "/_criteria/extension/0/valueString",
            json!("garbage"),
            400,
            &e("_criteria.extension[0].valueString"),
        ),
        case(
            "/_criteria/extension/0",
            json!({"url": format!("{BP}backport-filter-criteria"), "valueInteger": 5}),
            400,
            &e("_criteria.extension[0].valueInteger"),
        ),
        case(
            "/_criteria/extension/0/valueString",
            json!("Encounter?code=x"),
            422,
            &e("_criteria.extension[0].valueString"),
        ),
        case("/_criteria", json!("x"), 400, &e("_criteria")),
        case("/topic", json!(TOPIC_URL), 422, &e("topic")),
        case("/status", json!(1), 400, &e("status")),
        case("/channel/extra", json!(1), 400, &ch("extra")),
        case("/extra", json!(1), 400, &e("extra")),
        case("/channel/endpoint", json!(5), 400, &ch("endpoint")),
        case("/channel/payload", json!(5), 400, &ch("payload")),
        case("/channel/payload", json!("text/xml"), 422, &ch("payload")),
        case(
            "/channel/_type",
            json!({"extension": [{"url": format!("{BP}backport-channel-type"), "valueCoding": {"code": "zulip"}}]}),
            422,
            &ch("type"),
        ),
    ]
}

/// Writes every case into the store's own Subscription table as `{prefix}-{i}`; asserts
/// each ends in `error` with its element named in the reason.
async fn store_refusals(env: &TestEnv, base: &Value, cases: &[&Case], prefix: &str) {
    for (i, c) in cases.iter().enumerate() {
        env.store
            .execute(
                "SELECT aidbox_put('Subscription', $1, $2)",
                &[&format!("{prefix}-{i}"), &apply(base, c)],
            )
            .await
            .unwrap();
    }
    let q = env.client().await;
    let like = format!("{prefix}-%");
    wait_until(
        "every stored case recorded",
        Duration::from_secs(60),
        || async {
            let n: i64 = q
                .query_one(
                    "SELECT count(*) FROM fhir_cdc.subscription WHERE id LIKE $1",
                    &[&like],
                )
                .await
                .unwrap()
                .get(0);
            n as usize == cases.len()
        },
    )
    .await;
    for (i, c) in cases.iter().enumerate() {
        let row = q
            .query_one(
                "SELECT status, last_error FROM fhir_cdc.subscription WHERE id = $1",
                &[&format!("{prefix}-{i}")],
            )
            .await
            .unwrap();
        let (status, error): (String, Option<String>) = (row.get(0), row.get(1));
        let error = error.unwrap_or_default();
        assert_eq!(status, "error", "{} = {:?}", c.at, c.to);
        assert!(
            error.contains(&format!("({})", c.expression)),
            "{} = {:?}: {error}",
            c.at,
            c.to
        );
    }
}

/// POSTs every case; asserts the status and the named element of each refusal.
async fn refuse_all(api: u16, base: &Value, cases: &[Case]) {
    let http = reqwest::Client::new();
    for c in cases {
        let body = apply(base, c);
        let r = http
            .post(format!("http://127.0.0.1:{api}/Subscription"))
            .header("content-type", "application/fhir+json")
            .body(serde_json::to_vec(&body).unwrap())
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        let oo: Value = r.json().await.unwrap();
        assert_eq!(status, c.status, "{} = {:?}: {oo}", c.at, c.to);
        assert_eq!(
            oo["resourceType"], "OperationOutcome",
            "{} = {:?}",
            c.at, c.to
        );
        assert_eq!(
            oo["issue"][0]["expression"][0],
            c.expression.as_str(),
            "{} = {:?}: {oo}",
            c.at,
            c.to
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_r5_subscriptions_are_refused_naming_the_element_via_api_and_store() {
    let env = TestEnv::aidbox(TOPIC).build().await;
    let (store, rx, api) = (&env.store, &env.rx, env.api);
    let d = env.start().await;
    let cases = r5_cases();
    assert!(cases.len() >= 100, "only {} cases", cases.len());
    let base = r5(&rx.url("refused"));
    // The valid one is accepted: the cases are refused for what they change.
    let ok = subscribe_with(
        api,
        TOPIC_URL,
        &rx.url("ok"),
        "id-only",
        json!({"filterBy": base["filterBy"]}),
    )
    .await;
    refuse_all(api, &base, &cases).await;
    // A body over the limit is refused before it is read.
    let mut huge = base.clone();
    huge["reason"] = json!("x".repeat(300 * 1024));
    let r = reqwest::Client::new()
        .post(format!("http://127.0.0.1:{api}/Subscription"))
        .json(&huge)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 413);
    assert_eq!(
        r.json::<Value>().await.unwrap()["resourceType"],
        "OperationOutcome"
    );

    // The same, written into the store's own table: each ends in error naming the element.
    // Not storable: NUL (jsonb refuses it), and what the store's columns decide (type, id).
    let storable: Vec<&Case> = cases
        .iter()
        .filter(|c| !c.at.starts_with("/resourceType") && !c.at.starts_with("/id"))
        .filter(|c| {
            !serde_json::to_string(&c.to).unwrap().contains("\\u0000") && !c.at.contains('\u{0}')
        })
        .collect();
    assert!(
        storable.len() >= 90,
        "only {} storable cases",
        storable.len()
    );
    store_refusals(&env, &base, &storable, "bad").await;

    // Nothing refused ever notifies; the valid subscription does.
    wait_until("ok active", Duration::from_secs(30), || async {
        status(api, &ok).await["status"] == "active"
    })
    .await;
    store
        .execute(
            "SELECT aidbox_put('Encounter', 'e1', $1)",
            &[&json!({"status": "planned", "subject": {"reference": "Patient/1"}})],
        )
        .await
        .unwrap();
    wait_until(
        "the valid subscription's event",
        Duration::from_secs(30),
        || async { rx.events("ok").len() == 1 },
    )
    .await;
    assert!(
        rx.bodies("refused").is_empty(),
        "a refused subscription was sent something"
    );
    validate(&rx.bodies("ok"), "r5", &["--sequence", "strict"]);
    drop(d);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_backport_subscriptions_are_refused_naming_the_element() {
    let env = TestEnv::aidbox(TOPIC)
        .config(|c| c.source.fhir_version = fhir_version("R4"))
        .build()
        .await;
    let (rx, api) = (&env.rx, env.api);
    let _d = env.start().await;
    let base = backport(&rx.url("refused"));
    let r = reqwest::Client::new()
        .post(format!("http://127.0.0.1:{api}/Subscription"))
        .json(&backport(&rx.url("valid")))
        .send()
        .await
        .unwrap();
    assert_eq!(
        r.status(),
        201,
        "the valid backport Subscription: {}",
        r.text().await.unwrap()
    );
    let cases = backport_cases();
    refuse_all(api, &base, &cases).await;

    // The same, written into the store's own table, end in error naming the element.
    let refs: Vec<&Case> = cases.iter().collect();
    store_refusals(&env, &base, &refs, "bp").await;
    assert!(
        rx.bodies("refused").is_empty(),
        "a refused subscription was sent something"
    );
}

/// A random JSON value of a kind clients get wrong.
fn junk(rng: &mut StdRng) -> Value {
    match rng.random_range(0..14) {
        0 => Value::Null,
        1 => json!(rng.random::<i64>()),
        2 => json!(rng.random::<f64>() * 1e300),
        3 => serde_json::from_str("18446744073709551616").unwrap(),
        4 => json!("\u{0}"),
        5 => json!("x".repeat(rng.random_range(0..20_000))),
        6 => json!([]),
        7 => json!([null, 1, "a"]),
        8 => json!({"$ref": "#"}),
        9 => json!(true),
        10 => json!("gopher://x"),
        11 => json!("\u{1}\u{7f}\u{202e}"),
        12 => json!(-1),
        _ => json!({"a": {"b": {"c": [1, {"d": "\u{0}"}]}}}),
    }
}

/// Every element path of the valid R5 Subscription, for mutations.
fn paths(v: &Value, at: String, out: &mut Vec<String>) {
    match v {
        Value::Object(m) => {
            for (k, x) in m {
                let p = format!("{at}/{k}");
                out.push(p.clone());
                paths(x, p, out);
            }
        }
        Value::Array(a) => {
            for (i, x) in a.iter().enumerate() {
                let p = format!("{at}/{i}");
                out.push(p.clone());
                paths(x, p, out);
            }
        }
        _ => {}
    }
}

/// One generated request: method, path and query, content type, body.
fn request(
    rng: &mut StdRng,
    base: &Value,
    targets: &[String],
) -> (reqwest::Method, String, &'static str, Vec<u8>) {
    let mut body = base.clone();
    for _ in 0..rng.random_range(1..4) {
        let at = &targets[rng.random_range(0..targets.len())];
        let (parent, key) = at.rsplit_once('/').unwrap();
        let x = junk(rng);
        match body.pointer_mut(if parent.is_empty() { "" } else { parent }) {
            Some(Value::Object(m)) if rng.random_bool(0.2) => {
                m.remove(key);
            }
            Some(Value::Object(m)) => {
                m.insert(key.to_string(), x);
            }
            Some(Value::Array(a)) => {
                if let Ok(i) = key.parse::<usize>() {
                    if i < a.len() {
                        a[i] = x;
                    }
                }
            }
            _ => {}
        }
    }
    let mut bytes = serde_json::to_vec(&body).unwrap();
    if rng.random_bool(0.05) {
        let cut = rng.random_range(0..bytes.len());
        bytes.truncate(cut);
    }
    if rng.random_bool(0.03) {
        bytes = (0..rng.random_range(0..64))
            .map(|_| rng.random::<u8>())
            .collect();
    }
    let ct = [
        "application/fhir+json",
        "application/json",
        "text/plain",
        "application/xml",
    ][rng.random_range(0..4)];
    let weird =
        ["x", "%00", "..", "a%20b", &"y".repeat(100), "ok-id"][rng.random_range(0..6)].to_string();
    let query = [
        "eventsSinceNumber=-1",
        "eventsSinceNumber=abc",
        "content=everything",
        "id=%00",
        "status=bogus",
        "x=1",
        "eventsSinceNumber=99999999999999999999",
        "status=active&status=off",
        "url=%00",
        "_format=json",
    ][rng.random_range(0..10)];
    use reqwest::Method;
    let (m, path) = match rng.random_range(0..8) {
        0..=2 => (Method::POST, "/Subscription".to_string()),
        3 => (Method::PUT, format!("/Subscription/{weird}")),
        4 => (Method::GET, format!("/Subscription/$status?{query}")),
        5 => (
            Method::GET,
            format!("/Subscription/{weird}/$events?{query}"),
        ),
        6 => (Method::POST, format!("/Subscription/{weird}/$events")),
        _ => (Method::GET, format!("/Subscription?{query}")),
    };
    (m, path, ct, bytes)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousands_of_generated_requests_never_get_a_5xx_nor_stop_delivery() {
    let env = TestEnv::aidbox(TOPIC).build().await;
    let (store, rx, api) = (&env.store, &env.rx, env.api);
    let d = env.start().await;
    let seed: u64 = std::env::var("FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random);
    eprintln!("generated requests: seed {seed} (FUZZ_SEED={seed} repeats them)");
    let mut rng = StdRng::seed_from_u64(seed);
    let base = r5(&rx.url("fuzz"));
    let mut targets = Vec::new();
    paths(&base, String::new(), &mut targets);
    // A fresh connection per request: a refused body may end the server's side of a kept-alive
    // connection while the client reuses it, a transport race that says nothing about the
    // answer. A server that stopped answering still fails every later request.
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()
        .unwrap();
    let mut by_status = std::collections::BTreeMap::new();
    for i in 0..3000 {
        let (m, path, ct, body) = request(&mut rng, &base, &targets);
        let r = http
            .request(m.clone(), format!("http://127.0.0.1:{api}{path}"))
            .header("content-type", ct)
            .body(body.clone())
            .send()
            .await
            .unwrap_or_else(|e| panic!("request {i} ({m} {path}) got no answer: {e}"));
        let status = r.status().as_u16();
        *by_status.entry(status).or_insert(0) += 1;
        assert!(
            status < 500,
            "request {i}: {m} {path} ({ct}) -> {status}: {}\nbody: {}",
            r.text().await.unwrap_or_default(),
            String::from_utf8_lossy(&body)
                .chars()
                .take(400)
                .collect::<String>()
        );
    }
    eprintln!("generated requests: answers by status {by_status:?}");
    assert!(
        by_status.keys().any(|s| *s == 400),
        "no refusal at all: {by_status:?}"
    );

    // Still up, and still delivering to a well-formed subscription.
    wait_api(api).await;
    subscribe_active(api, TOPIC_URL, &rx.url("after"), "id-only", json!({})).await;
    aidbox_put(
        store,
        "Encounter",
        "after-fuzz",
        &json!({"status": "planned"}),
    )
    .await;
    wait_until(
        "the notification after the generated requests",
        Duration::from_secs(30),
        || async { rx.events("after").len() == 1 },
    )
    .await;
    validate(&rx.bodies("after"), "r5", &["--sequence", "strict"]);
    drop(d);
}
