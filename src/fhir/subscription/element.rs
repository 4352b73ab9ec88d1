//! Reading FHIR JSON element by element, strictly: every element of an object must be
//! claimed by the reader (unknown elements are refused), every value has its FHIR type and
//! cardinality checked, `null` is refused, strings may not hold control characters and are
//! bounded in size. Every refusal names the element by its FHIRPath
//! (`Subscription.filterBy[0].value`).

use serde_json::{Map, Value};
use std::collections::HashSet;

use super::Invalid;

/// Longest string element accepted (characters).
pub(super) const MAX_STRING: usize = 4096;
/// Most entries of a repeating element.
pub(super) const MAX_ITEMS: usize = 64;

/// A refusal of the resource as such: HTTP 400.
pub(super) fn structure(path: &str, message: impl Into<String>) -> Invalid {
    Invalid {
        code: "structure",
        message: message.into(),
        expression: path.to_string(),
    }
}

/// A value outside its value set or range: HTTP 400.
pub(super) fn value(path: &str, message: impl Into<String>) -> Invalid {
    Invalid {
        code: "value",
        message: message.into(),
        expression: path.to_string(),
    }
}

/// A required element is missing: HTTP 400.
pub(super) fn required(path: &str) -> Invalid {
    Invalid {
        code: "required",
        message: format!("{path} is required"),
        expression: path.to_string(),
    }
}

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// A FHIR string: no control characters but tab, CR and LF; not empty; bounded.
pub(super) fn check_string<'a>(path: &str, v: &'a Value) -> Result<&'a str, Invalid> {
    let Value::String(s) = v else {
        return Err(structure(
            path,
            format!("{path} must be a string, not {}", type_name(v)),
        ));
    };
    if let Some(c) = s
        .chars()
        .find(|c| (*c < ' ' && !matches!(c, '\t' | '\r' | '\n')) || *c == '\u{7f}')
    {
        return Err(structure(
            path,
            format!("{path} contains the control character U+{:04X}", c as u32),
        ));
    }
    if s.trim().is_empty() {
        return Err(structure(path, format!("{path} is empty")));
    }
    if s.chars().count() > MAX_STRING {
        return Err(structure(
            path,
            format!("{path} is longer than {MAX_STRING} characters"),
        ));
    }
    Ok(s)
}

/// Deepest nesting accepted anywhere in the resource.
pub(super) const MAX_DEPTH: usize = 24;

/// Checks every string and key of `v`, however deep (elements read only for their shape,
/// such as `meta` or `contained`, included): no control characters, bounded size and depth.
/// Postgres refuses NUL in jsonb; nothing we store may carry one.
pub(super) fn scan(path: &str, v: &Value, depth: usize) -> Result<(), Invalid> {
    if depth > MAX_DEPTH {
        return Err(structure(
            path,
            format!("{path} is nested deeper than {MAX_DEPTH} levels"),
        ));
    }
    match v {
        Value::String(_) => check_string(path, v).map(|_| ()),
        Value::Array(items) => {
            if items.len() > MAX_ITEMS * 16 {
                return Err(structure(path, format!("{path} has too many entries")));
            }
            for (i, x) in items.iter().enumerate() {
                scan(&format!("{path}[{i}]"), x, depth + 1)?;
            }
            Ok(())
        }
        Value::Object(map) => {
            for (k, x) in map {
                let p = format!("{path}.{}", printable(k));
                if k.is_empty() || k.chars().any(char::is_control) || k.len() > 128 {
                    return Err(structure(&p, format!("{p} is not an element name")));
                }
                scan(&p, x, depth + 1)?;
            }
            Ok(())
        }
        _ => Ok(()),
    }
}

/// A key as it may appear in an expression: control characters escaped.
fn printable(k: &str) -> String {
    k.chars()
        .flat_map(|c| {
            if c.is_control() {
                c.escape_unicode().collect::<Vec<_>>()
            } else {
                vec![c]
            }
        })
        .take(128)
        .collect()
}

/// A JSON object being read: keys not claimed by the time [`Obj::finish`] runs are refused.
pub(super) struct Obj<'a> {
    pub(crate) path: String,
    map: &'a Map<String, Value>,
    claimed: HashSet<&'a str>,
}

impl<'a> Obj<'a> {
    pub(super) fn new(path: &str, v: &'a Value) -> Result<Self, Invalid> {
        let Value::Object(map) = v else {
            return Err(structure(
                path,
                format!("{path} must be an object, not {}", type_name(v)),
            ));
        };
        Ok(Obj {
            path: path.to_string(),
            map,
            claimed: HashSet::new(),
        })
    }

    fn at(&self, key: &str) -> String {
        format!("{}.{key}", self.path)
    }

    /// The value of `key`, claimed; `null` is refused (FHIR JSON never has nulls).
    fn get(&mut self, key: &'static str) -> Result<Option<&'a Value>, Invalid> {
        let Some((k, v)) = self.map.get_key_value(key) else {
            return Ok(None);
        };
        self.claimed.insert(k.as_str());
        self.primitive_extension(key)?;
        if v.is_null() {
            return Err(structure(
                &self.at(key),
                format!("{} is null", self.at(key)),
            ));
        }
        Ok(Some(v))
    }

    /// `_key`: the extensions of a primitive element, an object (or array, when repeating).
    fn primitive_extension(&mut self, key: &str) -> Result<(), Invalid> {
        let under = format!("_{key}");
        if let Some((k, v)) = self.map.get_key_value(&under) {
            self.claimed.insert(k.as_str());
            if !v.is_object() && !v.is_array() {
                return Err(structure(
                    &self.at(&under),
                    format!("{} must be an object", self.at(&under)),
                ));
            }
        }
        Ok(())
    }

    /// The `_key` object, claimed (the backport IG puts extensions there).
    pub(super) fn extensions_of(&mut self, key: &'static str) -> Result<Option<Obj<'a>>, Invalid> {
        let under = format!("_{key}");
        match self.map.get_key_value(&under) {
            None => Ok(None),
            Some((k, v)) => {
                self.claimed.insert(k.as_str());
                Obj::new(&self.at(&under), v).map(Some)
            }
        }
    }

    pub(super) fn string(&mut self, key: &'static str) -> Result<Option<&'a str>, Invalid> {
        match self.get(key)? {
            None => Ok(None),
            Some(v) => check_string(&self.at(key), v).map(Some),
        }
    }

    pub(super) fn required_string(&mut self, key: &'static str) -> Result<&'a str, Invalid> {
        self.string(key)?.ok_or_else(|| required(&self.at(key)))
    }

    /// A `code` from a closed value set.
    pub(super) fn code(
        &mut self,
        key: &'static str,
        allowed: &[&str],
    ) -> Result<Option<&'a str>, Invalid> {
        let Some(s) = self.string(key)? else {
            return Ok(None);
        };
        if allowed.contains(&s) {
            Ok(Some(s))
        } else {
            Err(value(
                &self.at(key),
                format!(
                    "{} {s:?} is not one of {}",
                    self.at(key),
                    allowed.join(", ")
                ),
            ))
        }
    }

    /// An integer in `min..=i32::MAX` (`unsignedInt`: 0, `positiveInt`: 1).
    pub(super) fn integer(&mut self, key: &'static str, min: i64) -> Result<Option<i32>, Invalid> {
        let Some(v) = self.get(key)? else {
            return Ok(None);
        };
        integer(&self.at(key), v, min).map(Some)
    }

    pub(super) fn boolean(&mut self, key: &'static str) -> Result<Option<bool>, Invalid> {
        match self.get(key)? {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(v) => Err(structure(
                &self.at(key),
                format!("{} must be a boolean, not {}", self.at(key), type_name(v)),
            )),
        }
    }

    pub(super) fn object(&mut self, key: &'static str) -> Result<Option<Obj<'a>>, Invalid> {
        match self.get(key)? {
            None => Ok(None),
            Some(v) => Obj::new(&self.at(key), v).map(Some),
        }
    }

    /// A repeating element: an array of at most [`MAX_ITEMS`] entries, each with its path
    /// (`filterBy[0]`). An empty array (not valid FHIR JSON, but clients send it) reads as
    /// absent: it narrows nothing.
    pub(super) fn array(&mut self, key: &'static str) -> Result<Vec<(String, &'a Value)>, Invalid> {
        let Some(v) = self.get(key)? else {
            return Ok(Vec::new());
        };
        let path = self.at(key);
        let Value::Array(items) = v else {
            return Err(structure(
                &path,
                format!("{path} must be an array, not {}", type_name(v)),
            ));
        };
        if items.len() > MAX_ITEMS {
            return Err(structure(
                &path,
                format!("{path} has more than {MAX_ITEMS} entries"),
            ));
        }
        items
            .iter()
            .enumerate()
            .map(|(i, item)| {
                let p = format!("{path}[{i}]");
                if item.is_null() {
                    Err(structure(&p, format!("{p} is null")))
                } else {
                    Ok((p, item))
                }
            })
            .collect()
    }

    /// An array of objects.
    pub(super) fn objects(&mut self, key: &'static str) -> Result<Vec<Obj<'a>>, Invalid> {
        self.array(key)?
            .into_iter()
            .map(|(p, v)| Obj::new(&p, v))
            .collect()
    }

    /// A complex element read only for its shape (an object), not its content.
    pub(super) fn opaque_object(&mut self, key: &'static str) -> Result<(), Invalid> {
        self.object(key).map(|_| ())
    }

    /// A repeating complex element read only for its shape (objects).
    pub(super) fn opaque_objects(&mut self, key: &'static str) -> Result<(), Invalid> {
        self.objects(key).map(|_| ())
    }

    /// `extension`: objects with a `url`; read for shape. Returns them for the caller.
    pub(super) fn extensions(&mut self, key: &'static str) -> Result<Vec<Extension<'a>>, Invalid> {
        self.objects(key)?
            .into_iter()
            .map(Extension::read)
            .collect()
    }

    /// Refuses every element nobody claimed.
    pub(super) fn finish(self) -> Result<(), Invalid> {
        let mut unknown: Vec<&String> = self
            .map
            .keys()
            .filter(|k| !self.claimed.contains(k.as_str()))
            .collect();
        unknown.sort();
        match unknown.first() {
            None => Ok(()),
            Some(k) => Err(structure(
                &self.at(k),
                format!("{} is not an element of {}", self.at(k), self.path),
            )),
        }
    }
}

/// An integer JSON number in `min..=i32::MAX` (FHIR JSON numbers, not strings).
pub(super) fn integer(path: &str, v: &Value, min: i64) -> Result<i32, Invalid> {
    let Value::Number(n) = v else {
        return Err(structure(
            path,
            format!("{path} must be an integer, not {}", type_name(v)),
        ));
    };
    let n = n.as_i64().ok_or_else(|| {
        value(
            path,
            format!("{path} must be an integer between {min} and {}", i32::MAX),
        )
    })?;
    if n < min || n > i64::from(i32::MAX) {
        return Err(value(
            path,
            format!("{path} must be an integer between {min} and {}", i32::MAX),
        ));
    }
    Ok(n as i32)
}

/// One extension: its url and its `value[x]`, if any.
pub(super) struct Extension<'a> {
    pub(crate) path: String,
    pub(crate) url: &'a str,
    /// `("valueString", value)`.
    pub(crate) value: Option<(&'a str, &'a Value)>,
}

impl<'a> Extension<'a> {
    fn read(mut o: Obj<'a>) -> Result<Self, Invalid> {
        let url = o.required_string("url")?;
        o.string("id")?;
        let path = o.path.clone();
        // Nested extensions (complex extensions) are read for shape.
        o.extensions("extension")?;
        let values: Vec<(&'a str, &'a Value)> = o
            .map
            .iter()
            .filter(|(k, _)| k.starts_with("value"))
            .map(|(k, v)| (k.as_str(), v))
            .collect();
        for (k, _) in &values {
            o.claimed.insert(k);
        }
        if values.len() > 1 {
            return Err(structure(
                &path,
                format!("{path} has more than one value[x]"),
            ));
        }
        if let Some((k, v)) = values.first() {
            if v.is_null() {
                return Err(structure(
                    &format!("{path}.{k}"),
                    format!("{path}.{k} is null"),
                ));
            }
            if let Value::String(_) = v {
                check_string(&format!("{path}.{k}"), v)?;
            }
        }
        o.finish()?;
        Ok(Extension {
            path,
            url,
            value: values.first().copied(),
        })
    }

    /// The value's path, for errors.
    pub(super) fn value_path(&self) -> String {
        match self.value {
            Some((k, _)) => format!("{}.{k}", self.path),
            None => self.path.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn strict_reads_name_the_element() {
        let v = json!({"a": "x", "n": 3, "arr": ["p", "q"], "bad": "\u{0}", "neg": -1, "big": 1e308, "nul": null});
        let mut o = Obj::new("R", &v).unwrap();
        assert_eq!(o.string("a").unwrap(), Some("x"));
        assert_eq!(o.integer("n", 1).unwrap(), Some(3));
        assert_eq!(o.array("arr").unwrap()[1].0, "R.arr[1]");
        assert_eq!(o.string("bad").unwrap_err().expression, "R.bad");
        assert_eq!(o.integer("neg", 0).unwrap_err().expression, "R.neg");
        assert_eq!(o.integer("big", 0).unwrap_err().expression, "R.big");
        assert_eq!(o.string("nul").unwrap_err().code, "structure");
        assert_eq!(o.string("n").unwrap_err().code, "structure");
        let v = json!({"known": "x", "extra": 1});
        let mut o = Obj::new("R", &v).unwrap();
        o.string("known").unwrap();
        assert_eq!(o.finish().unwrap_err().expression, "R.extra");
        let deep = json!({"meta": {"tag": [{"code": "a\u{0}b"}]}});
        assert_eq!(
            scan("R", &deep, 0).unwrap_err().expression,
            "R.meta.tag[0].code"
        );
        let key = json!({"x\u{0}": 1});
        assert_eq!(scan("R", &key, 0).unwrap_err().expression, "R.x\\u{0}");
    }
}
