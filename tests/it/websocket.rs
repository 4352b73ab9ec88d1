//! The websocket channel with real tokio-tungstenite clients: tokens, both bind forms,
//! handshakes, events kept while no client is bound, several clients, heartbeats, refused
//! tokens, and sockets closed when their subscription goes. Every Bundle is validated.

use crate::common::*;
use futures::{SinkExt, StreamExt};
use serde_json::{json, Value};
use std::time::Duration;
use tokio_tungstenite::tungstenite::Message;

const TOPIC: &str = "http://fhir-cdc.test/topic/encounter-all";
const TOPICS: &str = r#"
[[topic]]
url = "http://fhir-cdc.test/topic/encounter-all"
status = "active"
resourceTrigger = [{ resource = "Encounter", supportedInteraction = ["create", "update", "delete"] }]
"#;

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn ws_subscription(api: u16) -> String {
    let body = json!({
        "resourceType": "Subscription",
        "status": "requested",
        "topic": TOPIC,
        "channelType": {"system": "http://terminology.hl7.org/CodeSystem/subscription-channel-type", "code": "websocket"},
        "content": "id-only",
        "heartbeatPeriod": 2
    });
    let r = reqwest::Client::new()
        .post(format!("http://127.0.0.1:{api}/Subscription"))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201, "{}", r.text().await.unwrap());
    r.json::<Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string()
}

/// A token from `$get-ws-binding-token`: GET at type level, or POST at instance level.
async fn token(api: u16, id: &str, instance: bool) -> (String, Value) {
    let c = reqwest::Client::new();
    let r = if instance {
        c.post(format!(
            "http://127.0.0.1:{api}/Subscription/{id}/$get-ws-binding-token"
        ))
        .send()
        .await
        .unwrap()
    } else {
        c.get(format!(
            "http://127.0.0.1:{api}/Subscription/$get-ws-binding-token?id={id}"
        ))
        .send()
        .await
        .unwrap()
    };
    assert_eq!(r.status(), 200);
    let p: Value = r.json().await.unwrap();
    let get = |n: &str| {
        p["parameter"]
            .as_array()
            .unwrap()
            .iter()
            .find(|x| x["name"] == n)
            .cloned()
            .unwrap_or(Value::Null)
    };
    assert_eq!(get("subscription")["valueString"], id);
    assert!(get("expiration")["valueDateTime"].is_string());
    assert!(get("websocket-url")["valueUrl"]
        .as_str()
        .unwrap()
        .ends_with("/ws"));
    (get("token")["valueString"].as_str().unwrap().to_string(), p)
}

async fn connect(api: u16) -> Ws {
    let (ws, _) = tokio_tungstenite::connect_async(format!("ws://127.0.0.1:{api}/ws"))
        .await
        .unwrap();
    ws
}

/// The next frame within `secs`: Ok(JSON of a text frame) or Err(close reason).
async fn next(ws: &mut Ws, secs: u64) -> Result<Value, String> {
    loop {
        let m = tokio::time::timeout(Duration::from_secs(secs), ws.next())
            .await
            .expect("a frame in time");
        match m {
            Some(Ok(Message::Text(t))) => return Ok(serde_json::from_str(t.as_str()).unwrap()),
            Some(Ok(Message::Close(f))) => {
                return Err(f.map(|f| f.reason.to_string()).unwrap_or_default())
            }
            Some(Ok(_)) => continue,
            other => return Err(format!("socket ended: {other:?}")),
        }
    }
}

/// Frames until one whose status type is `kind`; heartbeats in between are kept too.
async fn until(ws: &mut Ws, kind: &str, got: &mut Vec<Value>) -> Value {
    loop {
        let b = next(ws, 20).await.expect("a notification");
        got.push(b.clone());
        if status_of(&b)["type"] == kind {
            return b;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_clients_bind_get_kept_events_heartbeats_and_are_closed_on_delete() {
    let env = TestEnv::aidbox(TOPICS).build().await;
    let api = env.api;
    let _d = env.start().await;
    let id = ws_subscription(api).await;
    assert_eq!(
        status(api, &id).await["status"],
        "requested",
        "no handshake before a bind"
    );

    // Events while no client is bound are kept.
    put_encounter(&env.store, "w1").await;
    put_encounter(&env.store, "w2").await;
    wait_until("2 events queued", Duration::from_secs(30), || async {
        let row = fhir_cdc::queue::subscriptions::get(&env.store, &id)
            .await
            .unwrap()
            .unwrap();
        let n = fhir_cdc::queue::matched::count_pending(&env.store, &row.track())
            .await
            .unwrap();
        n == 2
    })
    .await;

    // Client A: type-level token, plain-text bind.
    let (tok_a, _) = token(api, &id, false).await;
    let mut a = connect(api).await;
    a.send(Message::text(format!("bind-with-token {tok_a}")))
        .await
        .unwrap();
    let mut got_a = vec![];
    let hs = until(&mut a, "handshake", &mut got_a).await;
    assert_eq!(got_a.len(), 1, "the handshake comes first");
    assert_eq!(status_of(&hs)["status"], "requested");
    let mut numbers = vec![];
    while numbers.len() < 2 {
        let b = until(&mut a, "event-notification", &mut got_a).await;
        numbers.extend(event_numbers(&b));
    }
    assert_eq!(numbers, vec![1, 2], "kept events, in order");
    assert_eq!(status(api, &id).await["status"], "active");

    // Client B: instance-level token, JSON bind; both get the next event.
    let (tok_b, _) = token(api, &id, true).await;
    let mut b = connect(api).await;
    let bind = json!({"type": "bind-with-token", "payload": {"token": tok_b}});
    b.send(Message::text(bind.to_string())).await.unwrap();
    let mut got_b = vec![];
    until(&mut b, "handshake", &mut got_b).await;
    put_encounter(&env.store, "w3").await;
    let ea = until(&mut a, "event-notification", &mut got_a).await;
    let eb = until(&mut b, "event-notification", &mut got_b).await;
    assert_eq!(event_numbers(&ea), vec![3]);
    assert_eq!(event_numbers(&eb), vec![3]);

    // Idle: heartbeats (heartbeatPeriod 2) reach both.
    until(&mut a, "heartbeat", &mut got_a).await;
    until(&mut b, "heartbeat", &mut got_b).await;

    // A used token, a made-up one: an OperationOutcome frame, then a close.
    for bad in [tok_a.as_str(), "0123456789abcdef"] {
        let mut c = connect(api).await;
        c.send(Message::text(format!("bind-with-token {bad}")))
            .await
            .unwrap();
        let oo = next(&mut c, 10).await.expect("an error frame");
        assert_eq!(oo["resourceType"], "OperationOutcome");
        let reason = next(&mut c, 10).await.expect_err("then a close");
        assert!(reason.contains("unknown or already used token"), "{reason}");
    }

    // Deleting the subscription closes both sockets with a reason.
    let r = reqwest::Client::new()
        .delete(format!("http://127.0.0.1:{api}/Subscription/{id}"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204);
    for ws in [&mut a, &mut b] {
        let reason = loop {
            match next(ws, 10).await {
                Ok(_) => continue,
                Err(r) => break r,
            }
        };
        assert_eq!(reason, "subscription deleted");
    }
    let sub = format!("http://fhir-cdc.test/fhir/Subscription/{id}");
    validate(
        &got_a,
        "r5",
        &["--expect-subscription", &sub, "--sequence", "strict"],
    );
    validate(&got_b, "r5", &["--expect-subscription", &sub]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_token_is_refused_and_a_rest_hook_subscription_gets_none() {
    let env = TestEnv::aidbox(TOPICS)
        .config(|c| c.channels.websocket.token_lifetime_secs = 1)
        .build()
        .await;
    let api = env.api;
    let _d = env.start().await;
    let id = ws_subscription(api).await;
    let (tok, _) = token(api, &id, false).await;
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let mut c = connect(api).await;
    c.send(Message::text(format!("bind-with-token {tok}")))
        .await
        .unwrap();
    assert_eq!(
        next(&mut c, 10).await.unwrap()["resourceType"],
        "OperationOutcome"
    );
    assert_eq!(next(&mut c, 10).await.unwrap_err(), "token expired");

    let hook = subscribe(api, TOPIC, &env.rx.url("h"), "id-only").await;
    let r = reqwest::get(format!(
        "http://127.0.0.1:{api}/Subscription/$get-ws-binding-token?id={hook}"
    ))
    .await
    .unwrap();
    assert_eq!(r.status(), 400);
    assert!(r
        .text()
        .await
        .unwrap()
        .contains("does not use the websocket channel"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscriptions_sockets_live_in_one_instance_until_they_close() {
    let env = TestEnv::aidbox(TOPICS).build().await;
    let api_a = env.api;
    let _a = env.start().await;
    let api_b = free_port();
    let config_b = env.config_variant("b.toml", |c| {
        c.api.listen = format!("127.0.0.1:{api_b}").parse().unwrap()
    });
    let _b = Daemon::start_args(&["deliver"], &config_b, &env.dir.path().join("b.log"));
    wait_api(api_b).await;
    let id = ws_subscription(api_a).await;

    let (tok, _) = token(api_a, &id, false).await;
    let mut on_a = connect(api_a).await;
    on_a.send(Message::text(format!("bind-with-token {tok}")))
        .await
        .unwrap();
    until(&mut on_a, "handshake", &mut vec![]).await;

    // A token from either instance is good anywhere, but the sockets stay with A.
    let (tok, _) = token(api_b, &id, false).await;
    let mut on_b = connect(api_b).await;
    on_b.send(Message::text(format!("bind-with-token {tok}")))
        .await
        .unwrap();
    assert_eq!(
        next(&mut on_b, 10).await.unwrap()["resourceType"],
        "OperationOutcome"
    );
    let reason = next(&mut on_b, 10).await.unwrap_err();
    assert!(reason.contains("another instance"), "{reason}");

    // Once A's last socket closes, B may hold the subscription and delivers it.
    on_a.close(None).await.unwrap();
    let mut got = vec![];
    let mut tries = 0;
    let mut on_b = loop {
        tries += 1;
        let (tok, _) = token(api_b, &id, true).await;
        let mut ws = connect(api_b).await;
        ws.send(Message::text(format!("bind-with-token {tok}")))
            .await
            .unwrap();
        let first = next(&mut ws, 10).await;
        match first {
            Ok(b) if b["resourceType"] == "Bundle" => {
                got.push(b);
                break ws;
            }
            other => {
                assert!(tries < 20, "B never got the subscription: {other:?}");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    };
    put_encounter(&env.store, "moved").await;
    let e = until(&mut on_b, "event-notification", &mut got).await;
    assert_eq!(event_numbers(&e), vec![1]);
    validate(&got, "r5", &["--sequence", "strict"]);
}
