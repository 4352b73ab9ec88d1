//! Postgres's text output of a `jsonb` value (`jsonb_out`), for tests and benchmarks that
//! feed capture bodies as a `jsonb` column sends them: an object's members sorted by the
//! byte length of their names, then by their bytes, with `, ` and `: ` between items.
//! Included with `#[path]` by `src/fhir/scan.rs`'s tests, `tests/it/lazy_capture.rs` and
//! `benches/capture.rs`, which are three crates.

use serde_json::Value;

pub(crate) fn jsonb_text(v: &Value) -> String {
    match v {
        Value::Object(m) => {
            let mut keys: Vec<&String> = m.keys().collect();
            keys.sort_by(|a, b| a.len().cmp(&b.len()).then(a.cmp(b)));
            let items: Vec<String> = keys
                .iter()
                .map(|k| format!("{}: {}", Value::from(k.as_str()), jsonb_text(&m[*k])))
                .collect();
            format!("{{{}}}", items.join(", "))
        }
        Value::Array(a) => {
            let items: Vec<String> = a.iter().map(jsonb_text).collect();
            format!("[{}]", items.join(", "))
        }
        other => other.to_string(),
    }
}
