//! The webhook receiver of `scripts/bench.sh`: answers 200 to every POST and, for each event a
//! notification carries, records how long after the store commit (the event's `timestamp`) it
//! arrived. `GET /stats` prints the counts, latency percentiles and the last arrival's time,
//! `GET /events` the events received; `POST /reset` clears them.
//! A benchmark tool, not part of the daemon.
//!
//!   cargo run --release --example bench_receiver -- 127.0.0.1:9999

// Benchmarks, examples and tests may unwrap (a panic there is a failed run, not a daemon),
// and their `pub` items are for their own modules.
#![allow(clippy::unwrap_used, unreachable_pub)]

use axum::extract::State;
use axum::routing::{get, post};
use axum::Router;
use chrono::{DateTime, Utc};
use serde_json::{json, Value};
use std::sync::{Arc, Mutex};

#[derive(Default)]
struct Stats {
    requests: u64,
    /// Milliseconds from store commit to arrival, one per event.
    latencies: Vec<f64>,
    /// When the last notification arrived (Unix seconds): a run's end, without the
    /// polling's delay.
    last_at: f64,
    /// … and the first.
    first_at: f64,
}

type Shared = Arc<Mutex<Stats>>;

#[tokio::main]
async fn main() {
    let addr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:9999".into());
    let stats = Shared::default();
    let app = Router::new()
        .route("/hook/{name}", post(hook))
        .route("/stats", get(report))
        .route("/events", get(events))
        .route("/reset", post(reset))
        .with_state(stats);
    let l = tokio::net::TcpListener::bind(&addr).await.expect("bind");
    axum::serve(l, app).await.expect("serve");
}

async fn hook(State(s): State<Shared>, body: axum::body::Bytes) -> &'static str {
    let now = Utc::now();
    let mut ms = Vec::new();
    if let Ok(v) = serde_json::from_slice::<Value>(&body) {
        for t in timestamps(&v) {
            ms.push((now - t).num_microseconds().unwrap_or(0) as f64 / 1000.0);
        }
    }
    let mut s = s.lock().unwrap_or_else(|e| e.into_inner());
    s.requests += 1;
    s.latencies.extend(ms);
    s.last_at = now.timestamp_micros() as f64 / 1e6;
    if s.requests == 1 {
        s.first_at = s.last_at;
    }
    "ok"
}

/// Event timestamps of an R5/R4B (SubscriptionStatus) or R4 backport (Parameters) notification.
fn timestamps(b: &Value) -> Vec<DateTime<Utc>> {
    let status = &b["entry"][0]["resource"];
    let mut out = Vec::new();
    let parse = |v: &Value| {
        v.as_str()
            .and_then(|t| DateTime::parse_from_rfc3339(t).ok())
    };
    for e in status["notificationEvent"].as_array().into_iter().flatten() {
        out.extend(parse(&e["timestamp"]).map(|t| t.with_timezone(&Utc)));
    }
    for p in status["parameter"].as_array().into_iter().flatten() {
        if p["name"] == "notification-event" {
            for part in p["part"].as_array().into_iter().flatten() {
                if part["name"] == "timestamp" {
                    out.extend(parse(&part["valueInstant"]).map(|t| t.with_timezone(&Utc)));
                }
            }
        }
    }
    out
}

async fn report(State(s): State<Shared>) -> String {
    let s = s.lock().unwrap_or_else(|e| e.into_inner());
    let mut l = s.latencies.clone();
    l.sort_by(|a, b| a.total_cmp(b));
    let pct = |p: f64| {
        if l.is_empty() {
            0.0
        } else {
            l[((l.len() - 1) as f64 * p).round() as usize]
        }
    };
    json!({
        "requests": s.requests,
        "events": l.len(),
        "p50_ms": pct(0.50),
        "p95_ms": pct(0.95),
        "p99_ms": pct(0.99),
        "max_ms": l.last().copied().unwrap_or(0.0),
        "last_at": s.last_at,
        "first_at": s.first_at,
    })
    .to_string()
}

/// The events received so far, as a bare number: what the bench polls, cheaply.
async fn events(State(s): State<Shared>) -> String {
    s.lock()
        .unwrap_or_else(|e| e.into_inner())
        .latencies
        .len()
        .to_string()
}

async fn reset(State(s): State<Shared>) -> &'static str {
    *s.lock().unwrap_or_else(|e| e.into_inner()) = Stats::default();
    "ok"
}
