//! Header values and the signing secret are the subscriber's secrets (a receiver's bearer
//! token, the key its signatures are checked with), not data: reads never show them, and an
//! update that sends the redaction mark back keeps what is stored. Headers live in R5
//! `parameter[].value` and in R4/R4B `channel.header[]` ("Name: value"); the signing secret
//! in the signing-secret extension's `valueString`.

use serde_json::Value;

use super::read::SECRET_EXTENSION;

/// What a read shows instead of a header value.
pub(crate) const REDACTED: &str = "***";

/// Replaces every header value and the signing secret of a Subscription resource with
/// [`REDACTED`].
pub(crate) fn redact_headers(resource: &mut Value) {
    if let Some(e) = secret_extension(resource) {
        e["valueString"] = Value::String(REDACTED.into());
    }
    if let Some(ps) = resource.get_mut("parameter").and_then(Value::as_array_mut) {
        for p in ps {
            if let Some(v) = p.get_mut("value") {
                *v = Value::String(REDACTED.into());
            }
        }
    }
    for h in channel_headers(resource) {
        if let Some((name, _)) = h.as_str().and_then(|s| s.split_once(':')) {
            *h = Value::String(format!("{name}: {REDACTED}"));
        }
    }
}

/// Where `incoming` sends [`REDACTED`] as a header's value, puts back the value `stored`
/// holds for a header of the same name (names compare without case, as HTTP's do). A
/// redacted header with no stored value of that name is left as sent.
pub(crate) fn restore_headers(incoming: &mut Value, stored: &Value) {
    let kept = secret_extension(&mut stored.clone()).and_then(|e| e.get("valueString").cloned());
    if let (Some(e), Some(kept)) = (secret_extension(incoming), kept) {
        if e.get("valueString").and_then(Value::as_str) == Some(REDACTED) {
            e["valueString"] = kept;
        }
    }
    let stored_params: Vec<(String, Value)> = stored
        .get("parameter")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|p| {
            Some((
                p.get("name")?.as_str()?.to_lowercase(),
                p.get("value")?.clone(),
            ))
        })
        .collect();
    if let Some(ps) = incoming.get_mut("parameter").and_then(Value::as_array_mut) {
        for p in ps {
            let name = p.get("name").and_then(Value::as_str).map(str::to_lowercase);
            let redacted = p.get("value").and_then(Value::as_str) == Some(REDACTED);
            let kept = stored_params.iter().find(|(n, _)| Some(n) == name.as_ref());
            if let (true, Some((_, v))) = (redacted, kept) {
                p["value"] = v.clone();
            }
        }
    }
    let mut stored = stored.clone();
    let stored_headers: Vec<String> = channel_headers(&mut stored)
        .into_iter()
        .filter_map(|h| h.as_str().map(str::to_string))
        .collect();
    for h in channel_headers(incoming) {
        let Some((name, value)) = h.as_str().and_then(|s| s.split_once(':')) else {
            continue;
        };
        if value.trim() != REDACTED {
            continue;
        }
        let same = |s: &&String| {
            s.split_once(':')
                .is_some_and(|(n, _)| n.trim().eq_ignore_ascii_case(name.trim()))
        };
        if let Some(kept) = stored_headers.iter().find(same) {
            *h = Value::String(kept.clone());
        }
    }
}

/// Applies `f` to every secret a Subscription resource holds: header values (R5
/// `parameter[].value`, the value part of R4/R4B `channel.header[]`) and the signing
/// secret. Sealing at rest uses it.
pub(crate) fn map_secrets(resource: &mut Value, mut f: impl FnMut(&str) -> String) {
    if let Some(e) = secret_extension(resource) {
        if let Some(v) = e.get("valueString").and_then(Value::as_str) {
            e["valueString"] = Value::String(f(v));
        }
    }
    if let Some(ps) = resource.get_mut("parameter").and_then(Value::as_array_mut) {
        for p in ps {
            if let Some(v) = p.get("value").and_then(Value::as_str) {
                p["value"] = Value::String(f(v));
            }
        }
    }
    for h in channel_headers(resource) {
        if let Some((name, value)) = h.as_str().and_then(|s| s.split_once(':')) {
            *h = Value::String(format!("{name}: {}", f(value.trim())));
        }
    }
}

fn secret_extension(resource: &mut Value) -> Option<&mut Value> {
    resource
        .get_mut("extension")?
        .as_array_mut()?
        .iter_mut()
        .find(|e| e.get("url").and_then(Value::as_str) == Some(SECRET_EXTENSION))
}

fn channel_headers(resource: &mut Value) -> Vec<&mut Value> {
    match resource
        .get_mut("channel")
        .and_then(|c| c.get_mut("header"))
        .and_then(Value::as_array_mut)
    {
        Some(a) => a.iter_mut().collect(),
        None => Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn every_secret_is_mapped_and_nothing_else() {
        let mut r = json!({
            "extension": [{"url": SECRET_EXTENSION, "valueString": "sign-me"}],
            "parameter": [{"name": "Authorization", "value": "Bearer A"}],
            "channel": {"header": ["X-Key: k1"], "endpoint": "https://x/"}
        });
        map_secrets(&mut r, |s| format!("<{s}>"));
        assert_eq!(r["extension"][0]["valueString"], "<sign-me>");
        assert_eq!(r["parameter"][0]["value"], "<Bearer A>");
        assert_eq!(r["parameter"][0]["name"], "Authorization");
        assert_eq!(r["channel"]["header"][0], "X-Key: <k1>");
        assert_eq!(r["channel"]["endpoint"], "https://x/");
    }

    #[test]
    fn r5_parameters_are_redacted_and_restored_by_name() {
        let stored = json!({"parameter": [
            {"name": "Authorization", "value": "Bearer SECRET123"},
            {"name": "X-Other", "value": "two"}]});
        let mut shown = stored.clone();
        redact_headers(&mut shown);
        assert!(!shown.to_string().contains("SECRET123"));
        assert_eq!(shown["parameter"][0]["value"], REDACTED);
        // The client sends the redacted form back with one header changed.
        let mut incoming = shown.clone();
        incoming["parameter"][1]["value"] = json!("three");
        restore_headers(&mut incoming, &stored);
        assert_eq!(incoming["parameter"][0]["value"], "Bearer SECRET123");
        assert_eq!(incoming["parameter"][1]["value"], "three");
    }

    #[test]
    fn the_signing_secret_is_redacted_and_restored() {
        let stored = json!({"extension": [{"url": SECRET_EXTENSION, "valueString": "a-long-signing-secret"}]});
        let mut shown = stored.clone();
        redact_headers(&mut shown);
        assert_eq!(shown["extension"][0]["valueString"], REDACTED);
        let mut incoming = shown.clone();
        restore_headers(&mut incoming, &stored);
        assert_eq!(incoming, stored);
    }

    #[test]
    fn r4_channel_headers_are_redacted_and_restored_by_name() {
        let stored = json!({"channel": {"type": "rest-hook",
            "header": ["Authorization: Bearer SECRET123"]}});
        let mut shown = stored.clone();
        redact_headers(&mut shown);
        assert_eq!(shown["channel"]["header"][0], "Authorization: ***");
        let mut incoming = json!({"channel": {"type": "rest-hook",
            "header": ["authorization: ***", "X-New: ***"]}});
        restore_headers(&mut incoming, &stored);
        assert_eq!(
            incoming["channel"]["header"][0],
            "Authorization: Bearer SECRET123"
        );
        assert_eq!(
            incoming["channel"]["header"][1], "X-New: ***",
            "nothing stored of that name: left as sent"
        );
    }
}
