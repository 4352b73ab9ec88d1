//! What value extraction reads of JSON, as a trait over two trees: `serde_json::Value`
//! (what the engine and criteria use) and [`Lite`], a tree that borrows its strings from the
//! row's text. Capture builds the `Lite` of a canFilterBy member instead of a `Value`: no
//! `String` per key and per string, no `BTreeMap` node per object to build and drop (those
//! were most of capture's instructions per row). Both trees go through the same extraction
//! code ([`super::value::extract`]), so they cannot disagree on what a value means.

use serde::de::{Deserialize, Deserializer, Error, MapAccess, SeqAccess, Visitor};
use serde_json::Value;
use std::borrow::Cow;
use std::fmt;

/// A JSON value as extraction reads it.
pub(crate) trait Json<'v>: Copy + 'v {
    type Items: ExactSizeIterator<Item = Self>;
    fn as_str(self) -> Option<&'v str>;
    fn as_bool(self) -> Option<bool>;
    /// A number's value (`None` for anything else, as `Value::as_f64`).
    fn as_f64(self) -> Option<f64>;
    fn is_object(self) -> bool;
    /// An object's member (`None` for anything else).
    fn get(self, key: &str) -> Option<Self>;
    /// An array's items (`None` for anything else).
    fn items(self) -> Option<Self::Items>;
}

impl<'v> Json<'v> for &'v Value {
    type Items = std::slice::Iter<'v, Value>;
    fn as_str(self) -> Option<&'v str> {
        Value::as_str(self)
    }
    fn as_bool(self) -> Option<bool> {
        Value::as_bool(self)
    }
    fn as_f64(self) -> Option<f64> {
        match self {
            Value::Number(n) => n.as_f64(),
            _ => None,
        }
    }
    fn is_object(self) -> bool {
        Value::is_object(self)
    }
    fn get(self, key: &str) -> Option<Self> {
        self.as_object()?.get(key)
    }
    fn items(self) -> Option<Self::Items> {
        self.as_array().map(|a| a.iter())
    }
}

/// A JSON value whose strings borrow from the text it was read from (unless they hold
/// escapes). Objects keep their members in order, in a `Vec`: capture reads a few members
/// of small objects. An object with a repeated name is refused when read (serde_json's map
/// keeps the last, a `Lite` would have to choose): such a body goes the `Value` way.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Lite<'a> {
    Null,
    Bool(bool),
    /// serde_json's value of the number (`u64`, `i64` or `f64` as read, then `as f64`).
    Number(f64),
    String(Cow<'a, str>),
    Array(Vec<Lite<'a>>),
    Object(Vec<(Cow<'a, str>, Lite<'a>)>),
}

impl<'a> Lite<'a> {
    /// Reads `text` (a member's value, as the scanner found it).
    pub(crate) fn parse(text: &'a str) -> serde_json::Result<Lite<'a>> {
        serde_json::from_str(text)
    }

    /// The object's members (`None` for anything else).
    pub(crate) fn members(&self) -> Option<&[(Cow<'a, str>, Lite<'a>)]> {
        match self {
            Lite::Object(m) => Some(m),
            _ => None,
        }
    }
}

impl<'v, 'a: 'v> Json<'v> for &'v Lite<'a> {
    type Items = std::slice::Iter<'v, Lite<'a>>;
    fn as_str(self) -> Option<&'v str> {
        match self {
            Lite::String(s) => Some(s),
            _ => None,
        }
    }
    fn as_bool(self) -> Option<bool> {
        match self {
            Lite::Bool(b) => Some(*b),
            _ => None,
        }
    }
    fn as_f64(self) -> Option<f64> {
        match self {
            Lite::Number(n) => Some(*n),
            _ => None,
        }
    }
    fn is_object(self) -> bool {
        matches!(self, Lite::Object(_))
    }
    fn get(self, key: &str) -> Option<Self> {
        self.members()?
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v)
    }
    fn items(self) -> Option<Self::Items> {
        match self {
            Lite::Array(a) => Some(a.iter()),
            _ => None,
        }
    }
}

impl<'de: 'a, 'a> Deserialize<'de> for Lite<'a> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(LiteVisitor)
    }
}

/// A name or string, borrowed when the text holds it without escapes.
struct Text<'a>(Cow<'a, str>);

impl<'de: 'a, 'a> Deserialize<'de> for Text<'a> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Text<'de>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a string")
            }
            fn visit_borrowed_str<E>(self, s: &'de str) -> Result<Self::Value, E> {
                Ok(Text(Cow::Borrowed(s)))
            }
            fn visit_str<E>(self, s: &str) -> Result<Self::Value, E> {
                Ok(Text(Cow::Owned(s.to_string())))
            }
        }
        d.deserialize_str(V)
    }
}

struct LiteVisitor;

impl<'de> Visitor<'de> for LiteVisitor {
    type Value = Lite<'de>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("any JSON value")
    }
    fn visit_unit<E>(self) -> Result<Self::Value, E> {
        Ok(Lite::Null)
    }
    fn visit_bool<E>(self, b: bool) -> Result<Self::Value, E> {
        Ok(Lite::Bool(b))
    }
    // As `serde_json::Number::as_f64` gives them.
    fn visit_u64<E>(self, n: u64) -> Result<Self::Value, E> {
        Ok(Lite::Number(n as f64))
    }
    fn visit_i64<E>(self, n: i64) -> Result<Self::Value, E> {
        Ok(Lite::Number(n as f64))
    }
    fn visit_f64<E>(self, n: f64) -> Result<Self::Value, E> {
        Ok(Lite::Number(n))
    }
    fn visit_borrowed_str<E>(self, s: &'de str) -> Result<Self::Value, E> {
        Ok(Lite::String(Cow::Borrowed(s)))
    }
    fn visit_str<E>(self, s: &str) -> Result<Self::Value, E> {
        Ok(Lite::String(Cow::Owned(s.to_string())))
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        let mut out = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(16));
        while let Some(v) = seq.next_element()? {
            out.push(v);
        }
        Ok(Lite::Array(out))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut out: Vec<(Cow<'de, str>, Lite<'de>)> = Vec::new();
        while let Some(Text(k)) = map.next_key()? {
            if out.iter().any(|(seen, _)| *seen == k) {
                return Err(A::Error::custom("a repeated member name"));
            }
            let v = map.next_value()?;
            out.push((k, v));
        }
        Ok(Lite::Object(out))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn borrows_strings_and_reads_like_serde_json() {
        let text = r#"{"a": "x", "b": [1, -2, 2.5, 1e300, null, true], "c": {"d": "e\"f"}}"#;
        let lite = Lite::parse(text).unwrap();
        let value: Value = serde_json::from_str(text).unwrap();
        let a = (&lite).get("a").unwrap();
        assert!(matches!(a, Lite::String(Cow::Borrowed("x"))));
        let nums: Vec<Option<f64>> = (&lite)
            .get("b")
            .unwrap()
            .items()
            .unwrap()
            .map(|v| v.as_f64())
            .collect();
        let want: Vec<Option<f64>> = value["b"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| (v).as_f64())
            .collect();
        assert_eq!(nums, want);
        assert_eq!(
            (&lite)
                .get("c")
                .and_then(|c| c.get("d"))
                .and_then(|d| d.as_str()),
            Some("e\"f")
        );
        assert_eq!(
            (&lite).get("b").unwrap().items().unwrap().nth(4),
            Some(&Lite::Null)
        );
        assert_eq!(
            (&lite)
                .get("b")
                .unwrap()
                .items()
                .unwrap()
                .nth(5)
                .unwrap()
                .as_bool(),
            Some(true)
        );
    }

    #[test]
    fn repeated_names_and_bad_json_are_refused() {
        assert!(Lite::parse(r#"{"a": 1, "a": 2}"#).is_err());
        assert!(Lite::parse(r#"{"a": {"b": 1, "b": 1}}"#).is_err());
        assert!(Lite::parse(r#"{"a": 1,}"#).is_err());
        assert!(Lite::parse(r#"{"a": 1} x"#).is_err());
    }
}
