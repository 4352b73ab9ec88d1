//! The websocket channel's API: `$get-ws-binding-token` (type and instance level, GET and
//! POST) and the socket endpoint `/ws`, where a client binds with a token (plain text
//! `bind-with-token <token>` or JSON `{"type":"bind-with-token","payload":{"token":…}}`),
//! gets one handshake per covered subscription, then every pending event in eventNumber
//! order, new events and heartbeats. Tokens live in the queue (hashed), so any instance
//! can take a bind; they are single-use and short-lived.

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket, WebSocketUpgrade};
use axum::extract::{Path, RawQuery, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use chrono::{DateTime, SecondsFormat, Utc};
use futures::{SinkExt, StreamExt};
use rand::RngCore;
use serde_json::{json, Value};

use super::response::{bad_request, fhir_id, internal, json_body, not_found, Fhir};
use super::{ApiState, Shared};
use crate::channel::websocket::{Frame, SocketHandle};
use crate::fhir::notification::{bundle, operation_outcome, Kind, StatusInfo};
use crate::fhir::subscription::{ChannelType, Status};
use crate::queue::subscriptions;
use crate::queue::DELIVERY_CHANNEL;

/// Most subscriptions one token may cover.
const MAX_IDS: usize = 64;

/// `GET|POST /Subscription/$get-ws-binding-token?id=a&id=b` (or `id=a,b`).
pub(super) async fn token_type(
    State(s): State<Shared>,
    RawQuery(q): RawQuery,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Fhir, Fhir> {
    let mut ids = ids_from_query(q.as_deref())?;
    ids.extend(ids_from_body(&headers, body)?);
    if ids.is_empty() {
        return Err(bad_request("id", "name at least one Subscription id"));
    }
    issue(&s, ids).await
}

/// `GET|POST /Subscription/{id}/$get-ws-binding-token`.
pub(super) async fn token_one(
    State(s): State<Shared>,
    Path(id): Path<String>,
    RawQuery(q): RawQuery,
) -> Result<Fhir, Fhir> {
    if !ids_from_query(q.as_deref())?.is_empty() {
        return Err(bad_request(
            "id",
            "the instance-level operation takes no id",
        ));
    }
    issue(&s, vec![fhir_id(&id)?.to_string()]).await
}

fn ids_from_query(q: Option<&str>) -> Result<Vec<String>, Fhir> {
    let mut ids = Vec::new();
    for (k, v) in url::form_urlencoded::parse(q.unwrap_or("").as_bytes()) {
        match k.as_ref() {
            "_format" | "_pretty" => {}
            "id" => ids.extend(v.split(',').map(|x| x.trim().to_string())),
            other => {
                return Err(bad_request(
                    other,
                    format!("unknown parameter {other:?}; this operation takes id"),
                ))
            }
        }
    }
    Ok(ids)
}

/// `id` parameters of a Parameters body (POST form), if there is a body.
fn ids_from_body(
    headers: &HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Vec<String>, Fhir> {
    if body
        .as_ref()
        .is_ok_and(|b| b.iter().all(u8::is_ascii_whitespace))
    {
        return Ok(Vec::new());
    }
    let v = json_body(headers, body)?;
    if v["resourceType"] != "Parameters" {
        return Err(bad_request(
            "Parameters",
            "the body must be a Parameters resource",
        ));
    }
    let mut ids = Vec::new();
    for (i, p) in v["parameter"].as_array().into_iter().flatten().enumerate() {
        let path = format!("Parameters.parameter[{i}]");
        if p["name"] != "id" {
            return Err(bad_request(
                &path,
                "unknown parameter; this operation takes id",
            ));
        }
        let id = ["valueId", "valueString"]
            .iter()
            .find_map(|k| p[*k].as_str())
            .ok_or_else(|| bad_request(&path, "id needs a valueId or valueString"))?;
        ids.push(id.to_string());
    }
    Ok(ids)
}

/// Checks every id names a websocket subscription and records a token for them.
async fn issue(s: &ApiState, mut ids: Vec<String>) -> Result<Fhir, Fhir> {
    ids.sort();
    ids.dedup();
    if ids.len() > MAX_IDS {
        return Err(bad_request(
            "id",
            format!("at most {MAX_IDS} subscriptions per token"),
        ));
    }
    let c = s.pool.get().await.map_err(internal)?;
    for id in &ids {
        fhir_id(id)?;
        let row = subscriptions::get(&**c, id)
            .await
            .map_err(internal)?
            .ok_or_else(|| not_found(&format!("Subscription/{id}")))?;
        if row.channel != Some(ChannelType::Websocket) {
            return Err(bad_request(
                "id",
                format!("Subscription/{id} does not use the websocket channel"),
            ));
        }
    }
    let mut raw = [0u8; 32];
    rand::rng().fill_bytes(&mut raw);
    let token: String = raw.iter().map(|b| format!("{b:02x}")).collect();
    let lifetime = s.cfg.channels.websocket.token_lifetime_secs as f64;
    c.execute(
        "DELETE FROM fhir_cdc.ws_token WHERE expires_at < now() - interval '1 hour'",
        &[],
    )
    .await
    .map_err(internal)?;
    let expires: DateTime<Utc> = c
        .query_one(
            "INSERT INTO fhir_cdc.ws_token (token_hash, subscriptions, expires_at)
             VALUES (sha256(convert_to($1, 'UTF8')), $2, now() + make_interval(secs => $3))
             RETURNING expires_at",
            &[&token, &ids, &lifetime],
        )
        .await
        .map_err(internal)?
        .get(0);
    let mut parameter = vec![
        json!({"name": "token", "valueString": token}),
        json!({"name": "expiration", "valueDateTime": expires.to_rfc3339_opts(SecondsFormat::Secs, true)}),
    ];
    parameter.extend(
        ids.iter()
            .map(|id| json!({"name": "subscription", "valueString": id})),
    );
    parameter.push(json!({"name": "websocket-url", "valueUrl": ws_url(&s.cfg.api.base_url())}));
    Ok(Fhir(
        StatusCode::OK,
        json!({"resourceType": "Parameters", "parameter": parameter}),
    ))
}

/// The socket endpoint as clients reach it: the base URL with ws(s) and `/ws`.
pub(super) fn ws_url(base: &str) -> String {
    let url = if let Some(rest) = base.strip_prefix("https://") {
        format!("wss://{rest}")
    } else if let Some(rest) = base.strip_prefix("http://") {
        format!("ws://{rest}")
    } else {
        base.to_string()
    };
    format!("{url}/ws")
}

/// `GET /ws`: the socket. Authentication is the binding token, which needed an
/// authorised `$get-ws-binding-token` call: browsers cannot set headers on a websocket.
pub(super) async fn socket(State(s): State<Shared>, ws: WebSocketUpgrade) -> Response {
    ws.on_upgrade(move |socket| serve(s, socket))
}

async fn serve(s: Shared, socket: WebSocket) {
    let mut handle = s.hub.socket();
    let (mut tx, mut rx) = socket.split();
    let end = loop {
        tokio::select! {
            m = rx.next() => match m {
                Some(Ok(Message::Text(t))) => {
                    if let Err(why) = on_text(&s, &mut tx, &handle, t.as_str()).await {
                        break Some(why);
                    }
                }
                Some(Ok(Message::Close(_))) | None | Some(Err(_)) => break None,
                Some(Ok(_)) => {}
            },
            Some(f) = handle.frames.recv() => {
                if let Frame::Text(t, done) = f {
                    let ok = tx.send(Message::Text(Utf8Bytes::from(t))).await.is_ok();
                    let _ = done.send(ok);
                    if !ok {
                        break None;
                    }
                }
            },
            Some(Frame::Close(code, reason)) = handle.control.recv() => {
                break Some((code, reason));
            }
        }
    };
    s.hub.unbind_socket(handle.id).await;
    handle.frames.close();
    if let Some((code, reason)) = end {
        let frame = CloseFrame {
            code,
            reason: Utf8Bytes::from(reason),
        };
        let _ = tx.send(Message::Close(Some(frame))).await;
    }
}

type Sink = futures::stream::SplitSink<WebSocket, Message>;

/// A client message: a bind, in either form. A refused bind sends an OperationOutcome
/// frame and ends the socket with (code, reason).
async fn on_text(
    s: &ApiState,
    tx: &mut Sink,
    h: &SocketHandle,
    text: &str,
) -> Result<(), (u16, String)> {
    let Some(token) = bind_token(text) else {
        return refuse(tx, "expected bind-with-token <token>").await;
    };
    match bind(s, tx, h, &token).await {
        Ok(()) => Ok(()),
        Err(why) => refuse(tx, &why).await,
    }
}

async fn refuse(tx: &mut Sink, why: &str) -> Result<(), (u16, String)> {
    let oo = operation_outcome("security", why, None).to_string();
    let _ = tx.send(Message::Text(Utf8Bytes::from(oo))).await;
    // Close reasons are limited to 123 bytes.
    let mut reason: String = why.chars().take(100).collect();
    if reason.len() > 120 {
        reason.truncate(120);
    }
    Err((1008, reason))
}

/// The token of `bind-with-token <token>` or `{"type":"bind-with-token","payload":{"token":…}}`.
pub(super) fn bind_token(text: &str) -> Option<String> {
    let t = text.trim();
    if let Some(rest) = t.strip_prefix("bind-with-token") {
        let tok = rest.trim();
        return (!tok.is_empty() && !tok.contains(char::is_whitespace)).then(|| tok.to_string());
    }
    let v: Value = serde_json::from_str(t).ok()?;
    if v["type"] != "bind-with-token" {
        return None;
    }
    v["payload"]["token"]
        .as_str()
        .or_else(|| v["token"].as_str())
        .map(str::to_string)
}

/// Uses the token and binds the socket to each subscription it covers: handshake first,
/// then the socket is ready and the send worker is woken for the pending events.
async fn bind(s: &ApiState, tx: &mut Sink, h: &SocketHandle, token: &str) -> Result<(), String> {
    let c = s.pool.get().await.map_err(|e| format!("queue: {e}"))?;
    let row = c
        .query_opt(
            "DELETE FROM fhir_cdc.ws_token WHERE token_hash = sha256(convert_to($1, 'UTF8'))
             RETURNING subscriptions, expires_at > now()",
            &[&token],
        )
        .await
        .map_err(|e| format!("queue: {e}"))?
        .ok_or("unknown or already used token")?;
    let (ids, fresh): (Vec<String>, bool) = (row.get(0), row.get(1));
    if !fresh {
        return Err("token expired".into());
    }
    for id in ids {
        let sub = subscriptions::get(&**c, &id)
            .await
            .map_err(|e| format!("queue: {e}"))?
            .filter(|r| r.status != Status::Off)
            .ok_or_else(|| format!("Subscription/{id} is gone or off"))?;
        s.hub.bind(&id, h).await.map_err(|e| e.to_string())?;
        let settled = sub.cursor.number;
        let info = StatusInfo {
            subscription_id: id.clone(),
            status: sub.status,
            events_since_start: settled,
            topic_url: sub.topic.clone(),
            errors: Vec::new(),
            gaps: Vec::new(),
        };
        let b = bundle(
            s.cfg.source.fhir_version.into(),
            Kind::Handshake,
            &info,
            &[],
            sub.content,
            &s.cfg.api.base_url(),
            Utc::now(),
        );
        tx.send(Message::Text(Utf8Bytes::from(b.to_string())))
            .await
            .map_err(|e| format!("socket: {e}"))?;
        subscriptions::handshake_ok(&**c, &id)
            .await
            .map_err(|e| format!("queue: {e}"))?;
        s.hub.ready(&id, h.id);
        tracing::info!(subscription = %id, socket = h.id, "websocket bound");
        c.execute("SELECT pg_notify($1, $2)", &[&DELIVERY_CHANNEL, &sub.topic])
            .await
            .map_err(|e| format!("queue: {e}"))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_bind_forms_are_read() {
        assert_eq!(bind_token("bind-with-token abc").as_deref(), Some("abc"));
        assert_eq!(
            bind_token("  bind-with-token   abc \n").as_deref(),
            Some("abc")
        );
        assert_eq!(
            bind_token(r#"{"type":"bind-with-token","payload":{"token":"abc"}}"#).as_deref(),
            Some("abc")
        );
        assert_eq!(bind_token("bind-with-token"), None);
        assert_eq!(bind_token("bind-with-token a b"), None);
        assert_eq!(bind_token(r#"{"type":"ping"}"#), None);
        assert_eq!(bind_token("hello"), None);
    }

    #[test]
    fn the_socket_url_follows_the_base_url() {
        assert_eq!(
            ws_url("https://cdc.example/fhir"),
            "wss://cdc.example/fhir/ws"
        );
        assert_eq!(ws_url("http://127.0.0.1:8080"), "ws://127.0.0.1:8080/ws");
    }
}
