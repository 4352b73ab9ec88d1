//! `/console` driven in headless Chromium (Debian's `chromium`; `scripts/test.sh` installs
//! it): a subscription in `error` shows with its reason and its last attempts, the chart
//! draws what was queued and sent, nothing shows resource content or endpoint paths, and
//! with auth on and no token the page shows a token form and no data. Real WAL, a real
//! receiver; a screenshot goes to `target/console.png`.

use crate::common::*;
use fhir_cdc::config::{AuthConfig, StaticToken};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

fn chromium() -> PathBuf {
    for c in ["chromium", "chromium-browser", "google-chrome"] {
        if let Ok(out) = Command::new("which").arg(c).output() {
            if out.status.success() {
                return PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
            }
        }
    }
    panic!("no chromium: scripts/test.sh installs it (apt-get install chromium)");
}

/// Chromium's flags for a headless run that lets the page's script fetch and draw.
fn headless(extra: &[&str]) -> Command {
    let profile = tempfile::tempdir().unwrap().keep();
    let mut c = Command::new(chromium());
    c.args([
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--no-first-run",
        "--virtual-time-budget=8000",
    ])
    .arg(format!("--user-data-dir={}", profile.display()))
    .args(extra);
    c
}

/// The page's DOM after its script ran.
fn dom(url: &str) -> String {
    let out = headless(&["--dump-dom"]).arg(url).output().unwrap();
    assert!(
        out.status.success(),
        "chromium failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn screenshot(url: &str, to: &Path) {
    let _ = std::fs::remove_file(to);
    let out = headless(&["--window-size=1280,1400"])
        .arg(format!("--screenshot={}", to.display()))
        .arg(url)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let size = std::fs::metadata(to).map(|m| m.len()).unwrap_or(0);
    assert!(
        size > 20_000,
        "a screenshot of a drawn page, got {size} bytes"
    );
}

async fn console_state(api: u16, token: Option<&str>) -> (u16, Value) {
    let mut r = reqwest::Client::new().get(format!("http://127.0.0.1:{api}/console/api/state"));
    if let Some(t) = token {
        r = r.bearer_auth(t);
    }
    let resp = r.send().await.unwrap();
    let code = resp.status().as_u16();
    (code, resp.json().await.unwrap_or(Value::Null))
}

/// The `<tr>` of the subscriptions table for `id`.
fn row<'a>(dom: &'a str, id: &str) -> &'a str {
    let start = dom
        .find(&format!("data-id=\"{id}\""))
        .unwrap_or_else(|| panic!("no row for {id} in:\n{dom}"));
    let end = dom[start..].find("</tr>").unwrap() + start;
    &dom[start..end]
}

/// The attribute `name` of the `<polyline>` of `series`.
fn series_attr(dom: &str, series: &str, name: &str) -> String {
    let at = dom
        .find(&format!("data-series=\"{series}\""))
        .unwrap_or_else(|| panic!("no {series} line drawn in:\n{dom}"));
    let tag_start = dom[..at].rfind('<').unwrap();
    let tag = &dom[tag_start..tag_start + dom[tag_start..].find('>').unwrap()];
    let key = format!(" {name}=\"");
    let v = &tag[tag.find(&key).unwrap_or_else(|| panic!("{name} in {tag}")) + key.len()..];
    v[..v.find('"').unwrap()].to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_shows_a_failing_subscription_its_attempts_and_the_last_hour() {
    let env = TestEnv::aidbox(ENCOUNTER_TOPICS).build().await;
    let (rx, api) = (env.rx.clone(), env.api);
    let _d = env.start().await;
    let ok = subscribe_active(api, ENCOUNTER_TOPIC, &rx.url("ok"), "id-only", json!({})).await;
    let bad = subscribe_active(
        api,
        ENCOUNTER_TOPIC,
        &rx.url("bad-path"),
        "id-only",
        json!({}),
    )
    .await;
    rx.answer("bad-path", 400);
    for id in ["c1", "c2", "c3"] {
        put_encounter(&env.store, id).await;
    }
    wait_until("3 delivered to ok", Duration::from_secs(60), || async {
        rx.events("ok").len() == 3
    })
    .await;
    wait_until("bad in error", Duration::from_secs(60), || async {
        status(api, &bad).await["status"] == "error"
    })
    .await;
    let full = format!("http://fhir-cdc.test/fhir/Subscription/{ok}");
    validate(&rx.bodies("ok"), "r5", &["--expect-subscription", &full]);
    // The sampler has seen the 3 events queued and the notifications sent.
    let counted = |s: &Value| {
        let sum = |k: &str| -> u64 {
            s["history"]
                .as_array()
                .map(|m| m.iter().map(|x| x[k].as_u64().unwrap_or(0)).sum())
                .unwrap_or(0)
        };
        sum("events_queued") >= 3 && sum("notifications_sent") >= 3
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let (code, s) = console_state(api, None).await;
        if counted(&s) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the last hour never counted 3 events queued and 3 sent: HTTP {code} {}\nlog:\n{}",
            s["history"],
            env.log_text()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (code, state) = console_state(api, None).await;
    assert_eq!(code, 200);
    let text = state.to_string();
    for secret in ["in-progress", "AMB", "bad-path", "\"resource\""] {
        assert!(
            !text.contains(secret),
            "{secret} in the console's data: {text}"
        );
    }

    let url = format!("http://127.0.0.1:{api}/console");
    let page = dom(&url);
    assert!(page.contains("data-state=\"loaded\""), "{page}");
    // The failing subscription, with its reason.
    let r = row(&page, &bad);
    assert!(r.contains("data-status=\"error\""), "{r}");
    assert!(r.contains("endpoint answered HTTP 400"), "{r}");
    assert!(row(&page, &ok).contains("data-status=\"active\""));
    assert!(page.contains("DEGRADED"), "the verdict");
    // Its attempts (selected because it is in error): the receiver's 400.
    assert!(page.contains(&format!("<span id=\"detail-id\">{bad}</span>")));
    assert!(
        page.contains("<td class=\"status-code\">400</td>"),
        "{page}"
    );
    // The chart drew the events and the sends.
    for s in ["queued", "sent"] {
        let max: u64 = series_attr(&page, s, "data-max").parse().unwrap();
        assert!(max >= 1, "{s} drew nothing");
        let points = series_attr(&page, s, "points");
        assert!(!points.is_empty() && points.contains(','), "{s}: {points}");
    }
    assert!(page.contains("data-series=\"lag\""));
    for secret in ["in-progress", "AMB", "bad-path"] {
        assert!(!page.contains(secret), "{secret} shown on the page");
    }
    screenshot(&url, &repo().join("target/console.png"));
}

const TOKEN_ENV: &str = "FHIR_CDC_CONSOLE_TEST_TOKEN";
const TOKEN: &str = "console-test-token-0123456789abcdef";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_auth_on_the_console_shows_nothing_without_a_token() {
    // SAFETY of intent: the daemon reads its static token from its environment.
    std::env::set_var(TOKEN_ENV, TOKEN);
    let env = TestEnv::aidbox(ENCOUNTER_TOPICS)
        .config(|c| {
            c.api.auth = Some(AuthConfig {
                issuer: None,
                audience: None,
                jwks_url: None,
                jwks_file: None,
                leeway_secs: 30,
                tokens: vec![StaticToken {
                    env: TOKEN_ENV.into(),
                    scopes: "system/Subscription.rs".into(),
                }],
            })
        })
        .build()
        .await;
    let api = env.api;
    let _d = env.start().await;
    let base = format!("http://127.0.0.1:{api}");
    // The page loads without a token; its data does not.
    for p in ["/console", "/console/console.js", "/console/console.css"] {
        assert_eq!(
            reqwest::get(format!("{base}{p}")).await.unwrap().status(),
            200,
            "{p}"
        );
    }
    assert_eq!(console_state(api, None).await.0, 401);
    assert_eq!(
        console_state(api, Some("wrong-token-0123456789")).await.0,
        401
    );
    let (code, state) = console_state(api, Some(TOKEN)).await;
    assert_eq!(code, 200);
    assert_eq!(state["report"]["slot"]["name"], env.slot.as_str());

    let slot = env.slot.as_str();
    let page = dom(&format!("{base}/console"));
    assert!(page.contains("data-state=\"login\""), "{page}");
    assert!(
        page.contains("<section id=\"login\">"),
        "the token form shows: {page}"
    );
    assert!(page.contains("<main id=\"main\" hidden=\"\">"), "{page}");
    assert!(!page.contains(slot), "no data before a token: {page}");
    assert!(!page.contains(ENCOUNTER_TOPIC), "no data before a token");

    // With the token (given in the fragment, which no server sees) the data shows.
    let page = dom(&format!("{base}/console#token={TOKEN}"));
    assert!(page.contains("data-state=\"loaded\""), "{page}");
    assert!(page.contains(slot), "{page}");
    assert!(
        page.contains("<section id=\"login\" hidden=\"\">"),
        "{page}"
    );
    assert!(
        !page.contains(TOKEN),
        "the token is not written into the page"
    );
}
