//! Search values: what a resource has for a parameter (normalised from the FHIRPath
//! results), and whether a search value (`eq140`, `http://loinc.org|2339-0`, `Patient/1`)
//! matches it, as FHIR search defines per parameter type.

use super::json::Json;
use super::registry::ParamType;
use chrono::{DateTime, NaiveDate, TimeZone, Utc};
use serde::{Deserialize, Serialize};

/// A half-open time range `[lo, hi)` in milliseconds since the epoch.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Range {
    pub(crate) lo: i64,
    pub(crate) hi: i64,
}

/// A resource's values for one parameter, normalised for matching. This is what an event
/// carries as its filter values (serialised as JSON in the queue).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "t", content = "v", rename_all = "lowercase")]
pub enum Values {
    /// `(system, code, text)`; text is display/CodeableConcept.text for `:text`.
    Token(Vec<(Option<String>, String, Option<String>)>),
    /// `Type/id` (relative), or the canonical/absolute URL as written.
    Reference(Vec<String>),
    /// Lower-cased, accents removed; the original for `:exact`.
    String(Vec<(String, String)>),
    Date(Vec<Range>),
    /// `(value, system, code)`.
    Quantity(Vec<(f64, Option<String>, Option<String>)>),
    Number(Vec<f64>),
    Uri(Vec<String>),
}

impl Values {
    pub(crate) fn is_empty(&self) -> bool {
        match self {
            Values::Token(v) => v.is_empty(),
            Values::Reference(v) | Values::Uri(v) => v.is_empty(),
            Values::String(v) => v.is_empty(),
            Values::Date(v) => v.is_empty(),
            Values::Quantity(v) => v.is_empty(),
            Values::Number(v) => v.is_empty(),
        }
    }
}

/// Lower-case and strip accents (the string search normalisation).
pub(crate) fn fold(s: &str) -> String {
    s.chars()
        .flat_map(char::to_lowercase)
        .map(|c| match c {
            'à' | 'á' | 'â' | 'ã' | 'ä' | 'å' | 'ā' => 'a',
            'ç' | 'ć' | 'č' => 'c',
            'è' | 'é' | 'ê' | 'ë' | 'ē' | 'ę' | 'ě' => 'e',
            'ì' | 'í' | 'î' | 'ï' | 'ī' => 'i',
            'ñ' | 'ń' | 'ň' => 'n',
            'ò' | 'ó' | 'ô' | 'õ' | 'ö' | 'ø' | 'ō' => 'o',
            'ù' | 'ú' | 'û' | 'ü' | 'ū' | 'ů' => 'u',
            'ý' | 'ÿ' => 'y',
            'ž' | 'ź' | 'ż' => 'z',
            'š' | 'ś' => 's',
            'ł' => 'l',
            'ř' => 'r',
            other => other,
        })
        .collect()
}

/// `http://x/fhir/Patient/1/_history/2` → `Patient/1`; `Patient/1` stays; other strings
/// (canonicals, URNs) stay as written, without a `|version`.
pub(crate) fn normalize_reference(r: &str) -> String {
    if let Some((ty, id)) = r.split_once('/') {
        // The common form, already relative: `Type/id`.
        if is_type_name(ty) && !id.is_empty() && !id.contains(['/', '|']) {
            return r.to_string();
        }
    }
    let r = r.split('|').next().unwrap_or(r);
    let r = match r.find("/_history/") {
        Some(i) => &r[..i],
        None => r,
    };
    let parts: Vec<&str> = r.trim_end_matches('/').rsplitn(3, '/').collect();
    if parts.len() >= 2 {
        let (id, ty) = (parts[0], parts[1]);
        if is_type_name(ty) && !id.is_empty() {
            return format!("{ty}/{id}");
        }
    }
    r.to_string()
}

/// A resource type's shape: an upper-case ASCII letter, then letters and digits.
fn is_type_name(ty: &str) -> bool {
    ty.chars().next().is_some_and(|c| c.is_ascii_uppercase())
        && ty.chars().all(|c| c.is_ascii_alphanumeric())
}

/// A FHIR date/dateTime/instant as the range its precision covers.
pub(crate) fn date_range(s: &str) -> Option<Range> {
    let s = s.trim();
    let ms = |d: DateTime<Utc>| d.timestamp_millis();
    let day = |y: i32, m: u32, d: u32| NaiveDate::from_ymd_opt(y, m, d);
    let utc = |d: NaiveDate| Utc.from_utc_datetime(&d.and_hms_opt(0, 0, 0).unwrap_or_default());
    match s.len() {
        4 => {
            let y: i32 = s.parse().ok()?;
            Some(Range {
                lo: ms(utc(day(y, 1, 1)?)),
                hi: ms(utc(day(y + 1, 1, 1)?)),
            })
        }
        7 => {
            let y: i32 = s[..4].parse().ok()?;
            let m: u32 = s[5..7].parse().ok()?;
            let start = day(y, m, 1)?;
            let next = if m == 12 {
                day(y + 1, 1, 1)?
            } else {
                day(y, m + 1, 1)?
            };
            Some(Range {
                lo: ms(utc(start)),
                hi: ms(utc(next)),
            })
        }
        10 => {
            let d = NaiveDate::parse_from_str(s, "%Y-%m-%d").ok()?;
            let next = d.succ_opt()?;
            Some(Range {
                lo: ms(utc(d)),
                hi: ms(utc(next)),
            })
        }
        _ => {
            let t = DateTime::parse_from_rfc3339(s).ok()?.with_timezone(&Utc);
            // Precision: seconds, or the given fraction.
            let frac = s
                .split('.')
                .nth(1)
                .map(|f| f.chars().take_while(char::is_ascii_digit).count())
                .unwrap_or(0);
            let width = match frac {
                0 => 1000,
                1 => 100,
                2 => 10,
                _ => 1,
            };
            let lo = ms(t);
            Some(Range { lo, hi: lo + width })
        }
    }
}

/// Normalises FHIRPath results (as JSON: a `serde_json::Value` or capture's borrowed
/// [`Lite`](super::json::Lite) tree, read alike) for a parameter of type `kind`.
pub(crate) fn extract<'v, J, I>(kind: ParamType, items: I) -> Values
where
    J: Json<'v>,
    I: IntoIterator<Item = J>,
{
    let items = items.into_iter();
    match kind {
        ParamType::Token => {
            let mut out = Vec::new();
            for v in items {
                token_values(v, &mut out);
            }
            Values::Token(out)
        }
        ParamType::Reference => Values::Reference(
            items
                .filter_map(|v| match v.as_str() {
                    Some(s) => Some(normalize_reference(s)),
                    None => v
                        .get("reference")
                        .and_then(Json::as_str)
                        .map(normalize_reference),
                })
                .collect(),
        ),
        ParamType::String => {
            let mut out = Vec::new();
            for v in items {
                string_values(v, &mut out);
            }
            Values::String(out.into_iter().map(|s| (fold(&s), s)).collect())
        }
        ParamType::Date => Values::Date(date_values(items)),
        ParamType::Quantity => Values::Quantity(quantity_values(items)),
        ParamType::Number => Values::Number(
            items
                .filter_map(|v| {
                    v.as_f64()
                        .or_else(|| v.as_str().and_then(|s| s.parse().ok()))
                        .or_else(|| v.get("value").and_then(Json::as_f64))
                })
                .collect(),
        ),
        ParamType::Uri | ParamType::Special | ParamType::Composite => Values::Uri(
            items
                .filter_map(|v| v.as_str().map(str::to_string))
                .collect(),
        ),
    }
}

/// Date values: dates and instants at their precision, Periods (an open end is unbounded),
/// Timing events.
fn date_values<'v, J: Json<'v>>(items: impl Iterator<Item = J>) -> Vec<Range> {
    let mut out = Vec::new();
    for v in items {
        if let Some(s) = v.as_str() {
            out.extend(date_range(s));
            continue;
        }
        if !v.is_object() {
            continue;
        }
        // Period: an open end is unbounded.
        let lo = v.get("start").and_then(Json::as_str).and_then(date_range);
        let hi = v.get("end").and_then(Json::as_str).and_then(date_range);
        if lo.is_some() || hi.is_some() {
            out.push(Range {
                lo: lo.map(|r| r.lo).unwrap_or(i64::MIN),
                hi: hi.map(|r| r.hi).unwrap_or(i64::MAX),
            });
        }
        for e in v.get("event").and_then(Json::items).into_iter().flatten() {
            out.extend(e.as_str().and_then(date_range));
        }
    }
    out
}

/// Quantity values: (value, system, code or unit); a bare number has neither.
fn quantity_values<'v, J: Json<'v>>(
    items: impl Iterator<Item = J>,
) -> Vec<(f64, Option<String>, Option<String>)> {
    let s = |v: Option<J>| v.and_then(Json::as_str).map(str::to_string);
    items
        .filter_map(|v| {
            if let Some(n) = v.as_f64() {
                return Some((n, None, None));
            }
            if !v.is_object() {
                return None;
            }
            Some((
                v.get("value")?.as_f64()?,
                s(v.get("system")),
                s(v.get("code").or_else(|| v.get("unit"))),
            ))
        })
        .collect()
}

fn token_values<'v, J: Json<'v>>(v: J, out: &mut Vec<(Option<String>, String, Option<String>)>) {
    let s = |o: J, k: &str| o.get(k).and_then(Json::as_str).map(str::to_string);
    if let Some(c) = v.as_str() {
        out.push((None, c.to_string(), None));
        return;
    }
    if let Some(b) = v.as_bool() {
        out.push((None, b.to_string(), None));
        return;
    }
    if !v.is_object() {
        return;
    }
    if let Some(codings) = v.get("coding").and_then(Json::items) {
        let text = s(v, "text");
        let empty = codings.len() == 0;
        for c in codings.filter(|c| c.is_object()) {
            if let Some(code) = s(c, "code") {
                out.push((
                    s(c, "system"),
                    code,
                    s(c, "display").or_else(|| text.clone()),
                ));
            }
        }
        if empty {
            if let Some(t) = text {
                out.push((None, String::new(), Some(t)));
            }
        }
    } else if let Some(code) = s(v, "code") {
        out.push((s(v, "system"), code, s(v, "display")));
    } else if let Some(value) = s(v, "value") {
        // Identifier (system|value) or ContactPoint (value).
        let system = if v.get("use").is_some() && v.get("type").is_none() {
            s(v, "system").filter(|x| x.contains(':'))
        } else {
            s(v, "system")
        };
        out.push((system, value, None));
    }
}

fn string_values<'v, J: Json<'v>>(v: J, out: &mut Vec<String>) {
    if let Some(s) = v.as_str() {
        out.push(s.to_string());
    } else if let Some(items) = v.items() {
        items.for_each(|x| string_values(x, out));
    } else if v.is_object() {
        for k in [
            "text",
            "family",
            "given",
            "prefix",
            "suffix",
            "line",
            "city",
            "district",
            "state",
            "postalCode",
            "country",
        ] {
            if let Some(x) = v.get(k) {
                string_values(x, out);
            }
        }
    }
}

/// Search prefixes for ordered types.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Prefix {
    Eq,
    Ne,
    Gt,
    Lt,
    Ge,
    Le,
    Sa,
    Eb,
    Ap,
}

/// Splits `ge2024-01-01` into (Ge, "2024-01-01"); no prefix means Eq.
pub(crate) fn split_prefix(v: &str) -> (Prefix, &str) {
    let table = [
        ("eq", Prefix::Eq),
        ("ne", Prefix::Ne),
        ("gt", Prefix::Gt),
        ("lt", Prefix::Lt),
        ("ge", Prefix::Ge),
        ("le", Prefix::Le),
        ("sa", Prefix::Sa),
        ("eb", Prefix::Eb),
        ("ap", Prefix::Ap),
    ];
    for (p, k) in table {
        if let Some(rest) = v.strip_prefix(p) {
            if rest.starts_with(|c: char| c.is_ascii_digit() || c == '-' || c == '.') {
                return (k, rest);
            }
        }
    }
    (Prefix::Eq, v)
}

/// Compares a resource range with a search range under a prefix (FHIR search semantics).
fn range_matches(p: Prefix, r: Range, s: Range) -> bool {
    match p {
        Prefix::Eq => r.lo >= s.lo && r.hi <= s.hi,
        Prefix::Ne => !(r.lo >= s.lo && r.hi <= s.hi),
        Prefix::Gt => r.hi > s.hi,
        Prefix::Lt => r.lo < s.lo,
        Prefix::Ge => r.hi > s.lo,
        Prefix::Le => r.lo < s.hi,
        Prefix::Sa => r.lo >= s.hi,
        Prefix::Eb => r.hi <= s.lo,
        Prefix::Ap => {
            let pad = ((s.hi - s.lo) / 10).max(1);
            r.lo < s.hi + pad && r.hi > s.lo - pad
        }
    }
}

/// The implicit range of a decimal as written: `140` → [139.5, 140.5), `140.0` → [139.95, 140.05).
fn number_range(s: &str) -> Option<(f64, f64, f64)> {
    let v: f64 = s.parse().ok()?;
    let decimals = s.split('.').nth(1).map(str::len).unwrap_or(0);
    let half = 0.5 * 10f64.powi(-(decimals as i32));
    Some((v, v - half, v + half))
}

fn number_matches(p: Prefix, x: f64, s: &str) -> bool {
    let Some((v, lo, hi)) = number_range(s) else {
        return false;
    };
    match p {
        Prefix::Eq => x >= lo && x < hi,
        Prefix::Ne => !(x >= lo && x < hi),
        Prefix::Gt | Prefix::Sa => x > v,
        Prefix::Lt | Prefix::Eb => x < v,
        Prefix::Ge => x >= v,
        Prefix::Le => x <= v,
        Prefix::Ap => (x - v).abs() <= (v.abs() * 0.1).max(hi - lo),
    }
}

/// Why a search value cannot be used.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub(crate) enum SearchError {
    #[error("modifier :{0} is not supported for this parameter type")]
    Modifier(String),
    #[error("value {0:?} is not valid for this parameter type")]
    Value(String),
}

/// Checks a search value and modifier before any resource is seen (subscription time).
pub(crate) fn validate(
    kind: ParamType,
    modifier: Option<&str>,
    value: &str,
) -> Result<(), SearchError> {
    match (kind, modifier) {
        (_, None) | (_, Some("missing")) => {}
        (ParamType::Token, Some("not" | "text")) => {}
        (ParamType::String, Some("exact" | "contains")) => {}
        (ParamType::Uri, Some("below" | "above")) => {}
        (_, Some(m)) => return Err(SearchError::Modifier(m.to_string())),
    }
    if modifier == Some("missing") && value != "true" && value != "false" {
        return Err(SearchError::Value(value.into()));
    }
    for alt in value.split(',') {
        let ok = match kind {
            ParamType::Date if modifier.is_none() => date_range(split_prefix(alt).1).is_some(),
            ParamType::Number | ParamType::Quantity if modifier.is_none() => {
                number_range(split_prefix(alt).1.split('|').next().unwrap_or("")).is_some()
            }
            _ => true,
        };
        if !ok {
            return Err(SearchError::Value(alt.to_string()));
        }
    }
    Ok(())
}

/// Does `values` match the search `value` (comma = OR) under `modifier`?
pub(crate) fn matches(values: &Values, modifier: Option<&str>, value: &str) -> bool {
    if modifier == Some("missing") {
        return (value == "true") == values.is_empty();
    }
    if modifier == Some("not") {
        return !value.split(',').any(|alt| matches_one(values, None, alt));
    }
    value
        .split(',')
        .any(|alt| matches_one(values, modifier, alt))
}

fn matches_one(values: &Values, modifier: Option<&str>, alt: &str) -> bool {
    match values {
        Values::Token(ts) => {
            if modifier == Some("text") {
                let want = fold(alt);
                return ts
                    .iter()
                    .any(|(_, _, t)| t.as_deref().is_some_and(|t| fold(t).starts_with(&want)));
            }
            let (system, code) = match alt.split_once('|') {
                Some((s, c)) => (Some(s), c),
                None => (None, alt),
            };
            ts.iter().any(|(s, c, _)| match system {
                None => c == code,
                // `|code`: no system.
                Some("") => s.is_none() && c == code,
                // `system|`: any code of the system.
                Some(sys) if code.is_empty() => s.as_deref() == Some(sys),
                Some(sys) => s.as_deref() == Some(sys) && c == code,
            })
        }
        Values::Reference(rs) => {
            let want = normalize_reference(alt);
            rs.iter().any(|r| {
                r == &want || (!want.contains('/') && r.rsplit('/').next() == Some(want.as_str()))
            })
        }
        Values::String(ss) => {
            let want = fold(alt);
            ss.iter().any(|(folded, orig)| match modifier {
                Some("exact") => orig == alt,
                Some("contains") => folded.contains(&want),
                _ => folded.starts_with(&want),
            })
        }
        Values::Date(rs) => {
            let (p, v) = split_prefix(alt);
            let Some(s) = date_range(v) else {
                return false;
            };
            rs.iter().any(|r| range_matches(p, *r, s))
        }
        Values::Number(ns) => {
            let (p, v) = split_prefix(alt);
            ns.iter().any(|x| number_matches(p, *x, v))
        }
        Values::Quantity(qs) => {
            let (p, v) = split_prefix(alt);
            let mut parts = v.splitn(3, '|');
            let num = parts.next().unwrap_or("");
            let system = parts.next().filter(|s| !s.is_empty());
            let code = parts.next().filter(|s| !s.is_empty());
            qs.iter().any(|(x, s, c)| {
                number_matches(p, *x, num)
                    && system.is_none_or(|sys| s.as_deref() == Some(sys))
                    && code.is_none_or(|cd| c.as_deref() == Some(cd))
            })
        }
        Values::Uri(us) => us.iter().any(|u| match modifier {
            Some("below") => u.starts_with(alt),
            Some("above") => alt.starts_with(u.as_str()),
            _ => u == alt,
        }),
    }
}

#[cfg(test)]
#[path = "value_tests.rs"]
mod tests;
