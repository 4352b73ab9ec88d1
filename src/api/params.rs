//! Query parameters read strictly: each operation names the parameters it takes, a value is
//! checked for its type, and an unknown parameter or a bad value is a 400 naming it, never a
//! 500 and never silently ignored. `_format` and `_pretty` are accepted and ignored.

use std::collections::HashMap;

use super::response::{bad_request, Fhir};

/// Parameters after checking the names; repeated parameters are refused.
pub(super) struct Params(HashMap<String, String>);

impl Params {
    pub(super) fn parse(query: Option<&str>, known: &[&str]) -> Result<Self, Fhir> {
        let mut out = HashMap::new();
        for (k, v) in url::form_urlencoded::parse(query.unwrap_or("").as_bytes()) {
            if k == "_format" || k == "_pretty" {
                continue;
            }
            if !known.contains(&k.as_ref()) {
                return Err(bad_request(
                    &k,
                    format!(
                        "unknown parameter {k:?}; this operation takes {}",
                        known.join(", ")
                    ),
                ));
            }
            check_text(&k, &v)?;
            if out.insert(k.to_string(), v.to_string()).is_some() {
                return Err(bad_request(&k, format!("parameter {k:?} is given twice")));
            }
        }
        Ok(Params(out))
    }

    /// From a `Parameters` resource (the POST form of an operation).
    pub(super) fn from_parameters(body: &serde_json::Value, known: &[&str]) -> Result<Self, Fhir> {
        if body["resourceType"] != "Parameters" {
            return Err(bad_request(
                "Parameters",
                "the body must be a Parameters resource",
            ));
        }
        let mut out = HashMap::new();
        for (i, p) in body["parameter"]
            .as_array()
            .into_iter()
            .flatten()
            .enumerate()
        {
            let path = format!("Parameters.parameter[{i}]");
            let name = p["name"]
                .as_str()
                .ok_or_else(|| bad_request(&path, "parameter without a name"))?;
            if !known.contains(&name) {
                return Err(bad_request(&path, format!("unknown parameter {name:?}")));
            }
            let value = parameter_value(p).ok_or_else(|| {
                bad_request(
                    &path,
                    format!("parameter {name:?} has no string, code or integer value"),
                )
            })?;
            check_text(name, &value)?;
            if out.insert(name.to_string(), value).is_some() {
                return Err(bad_request(
                    &path,
                    format!("parameter {name:?} is given twice"),
                ));
            }
        }
        Ok(Params(out))
    }

    pub(super) fn text(&self, name: &str) -> Option<&str> {
        self.0.get(name).map(String::as_str)
    }

    /// A non-negative integer parameter.
    pub(super) fn number(&self, name: &str) -> Result<Option<i64>, Fhir> {
        let Some(v) = self.text(name) else {
            return Ok(None);
        };
        v.parse::<i64>()
            .ok()
            .filter(|n| *n >= 0)
            .map(Some)
            .ok_or_else(|| {
                bad_request(
                    name,
                    format!("{name} must be a non-negative integer, not {v:?}"),
                )
            })
    }

    /// A comma-separated list of values each in `allowed` (when given).
    pub(super) fn list(
        &self,
        name: &str,
        allowed: Option<&[&str]>,
    ) -> Result<Option<Vec<String>>, Fhir> {
        let Some(v) = self.text(name) else {
            return Ok(None);
        };
        let items: Vec<String> = v.split(',').map(|x| x.trim().to_string()).collect();
        for x in &items {
            if x.is_empty() {
                return Err(bad_request(name, format!("{name} has an empty value")));
            }
            if allowed.is_some_and(|a| !a.contains(&x.as_str())) {
                return Err(bad_request(
                    name,
                    format!(
                        "{name} {x:?} is not one of {}",
                        allowed.unwrap_or_default().join(", ")
                    ),
                ));
            }
        }
        Ok(Some(items))
    }
}

fn parameter_value(p: &serde_json::Value) -> Option<String> {
    [
        "valueString",
        "valueCode",
        "valueInteger",
        "valueInteger64",
        "valueUnsignedInt",
        "valueId",
    ]
    .iter()
    .find_map(|k| p.get(*k))
    .and_then(|v| match v {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Number(n) => Some(n.to_string()),
        _ => None,
    })
}

/// No control characters (Postgres refuses NUL; nothing else needs them) and bounded size.
fn check_text(name: &str, v: &str) -> Result<(), Fhir> {
    if v.chars().any(char::is_control) {
        return Err(bad_request(
            name,
            format!("{name} contains a control character"),
        ));
    }
    if v.len() > 4096 {
        return Err(bad_request(name, format!("{name} is too long")));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strict_parameters() {
        let p = Params::parse(
            Some("eventsSinceNumber=3&_format=json"),
            &["eventsSinceNumber"],
        )
        .unwrap();
        assert_eq!(p.number("eventsSinceNumber").unwrap(), Some(3));
        assert!(Params::parse(Some("x=1"), &["id"]).is_err());
        assert!(Params::parse(Some("id=a&id=b"), &["id"]).is_err());
        assert!(Params::parse(Some("id=%00"), &["id"]).is_err());
        let p = Params::parse(Some("eventsSinceNumber=-1"), &["eventsSinceNumber"]).unwrap();
        assert!(p.number("eventsSinceNumber").is_err());
        let p = Params::parse(Some("status=active,bogus"), &["status"]).unwrap();
        assert!(p.list("status", Some(&["active"])).is_err());
    }
}
