//! The top-level members of a resource that compiled topics read without the FHIRPath
//! engine (search parameter plans and plain-path criteria), so capture parses only those.
//!
//! A 1.3 KB Observation has a dozen members; one topic with three canFilterBy parameters
//! reads three of them. Parsing the rest into `serde_json::Value` maps (and converting it
//! from Aidbox's format) was most of capture's CPU per row. Members not kept are still read
//! through (syntax-checked, never allocated), so a body that is not JSON is refused the same.
//!
//! The engine is never given a partial resource: [`crate::fhir::trigger::ChangeEval`] parses
//! the complete one the first time an expression without a plan needs it.

use serde::de::{DeserializeSeed, IgnoredAny, MapAccess, Visitor};
use serde_json::{Map, Value};
use std::fmt;

// A partial resource's `resourceType` is the row's (`RowChange::resource_with` sets it, as
// it sets `id` and `meta` when a reader names them): the body's is not read. Parsing it too
// cost three allocations per row for a value then replaced.

/// The bit of [`Names::lengths`] for a key of `key`'s length.
fn length_bit(key: &str) -> u64 {
    1 << key.len().min(63)
}

/// A handful of member names, looked up once per member of every captured body.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
struct Names {
    /// Sorted, without repeats. A scan comparing lengths first is cheaper than a tree's
    /// ordered comparisons (a `BTreeSet` lookup was 3% of capture's instructions per row
    /// with 20 topics, a call to `memcmp` per step).
    keys: Vec<String>,
    /// Bit `n` (`n` < 63) is set when a key of `n` bytes is in, bit 63 for longer ones: most
    /// members a body has and no topic reads are refused by their length alone, before the
    /// list is searched (that search was 3% of capture's instructions per row).
    lengths: u64,
}

impl Names {
    fn insert(&mut self, k: String) {
        self.lengths |= length_bit(&k);
        if let Err(at) = self.keys.binary_search(&k) {
            self.keys.insert(at, k);
        }
    }

    fn contains(&self, key: &str) -> bool {
        self.lengths & length_bit(key) != 0 && self.keys.iter().any(|k| k == key)
    }
}

/// Which top-level members of a resource type's JSON the topics read.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Fields {
    /// Members built as `Value`s.
    keys: Names,
    /// Members read from their own text by canFilterBy walks ([`crate::fhir::search::direct`]),
    /// kept as text and built as a `Value` only when also in `keys`.
    raw: Names,
    /// Some reader needs every member: parse the resource whole.
    all: bool,
}

/// A body's kept members: the `Value` ones, and the text of the `raw` ones (`None` when the
/// body was read by serde, not by the scanner: its readers then take the complete resource).
pub(crate) struct Parsed<'t> {
    pub(crate) map: Map<String, Value>,
    pub(crate) raw: Option<Vec<super::scan::Member<'t>>>,
}

impl Fields {
    /// Every member (what an expression without a known shape needs).
    pub fn all() -> Fields {
        Fields {
            all: true,
            ..Fields::default()
        }
    }

    /// Adds the members one reader reads; `None` means it reads the whole resource.
    pub(crate) fn add<I: IntoIterator<Item = String>>(&mut self, keys: Option<I>) {
        match keys {
            None => self.all = true,
            Some(k) => {
                for k in k {
                    // First-class extensions of Aidbox's format become `extension` entries
                    // when converted: a reader of extensions needs every member.
                    if k == "extension" || k == "modifierExtension" {
                        self.all = true;
                    }
                    self.keys.insert(k);
                }
            }
        }
    }

    /// Adds the members of canFilterBy walks that read them from their text alone (each
    /// walk's list): kept as text, unless a member of the walk is built as a `Value` anyway
    /// (a criterion reads it), when the walk's members all are, and the walk reads the
    /// `Value`s. Parsing a member both ways cost more than the walk saved.
    pub(crate) fn settle(&mut self, walks: Vec<Vec<String>>) {
        let mut text = walks;
        loop {
            let (tree, rest): (Vec<_>, Vec<_>) = text
                .into_iter()
                .partition(|keys| keys.iter().any(|k| self.keeps(k)));
            text = rest;
            if tree.is_empty() {
                break;
            }
            for keys in tree {
                self.add(Some(keys));
            }
        }
        for k in text.into_iter().flatten() {
            self.raw.insert(k);
        }
    }

    /// Whether `key` is kept as text for the walks of [`Fields::settle`] (never when the
    /// resource is parsed whole: its `Value` answers them).
    pub(crate) fn keeps_raw(&self, key: &str) -> bool {
        !self.all && self.raw.contains(key)
    }

    /// The members kept as text for canFilterBy walks (see [`Fields::settle`]).
    pub fn text_keys(&self) -> &[String] {
        if self.all {
            &[]
        } else {
            &self.raw.keys
        }
    }

    /// Whether the whole resource must be parsed.
    pub fn is_all(&self) -> bool {
        self.all
    }

    /// Whether `key` is kept.
    pub(crate) fn keeps(&self, key: &str) -> bool {
        self.all || self.keys.contains(key)
    }

    /// Parses a JSON object keeping only the members this set keeps; the others are read
    /// through without being built. Errors as `serde_json::from_slice` would, and a body
    /// that is not an object gives `Ok(None)`.
    pub(crate) fn parse<'t>(
        &self,
        text: &'t [u8],
        source: super::scan::Source,
    ) -> serde_json::Result<Option<Parsed<'t>>> {
        if self.all {
            return match serde_json::from_slice(text)? {
                Value::Object(map) => Ok(Some(Parsed { map, raw: None })),
                _ => Ok(None),
            };
        }
        let kept = |k: &str| self.keeps(k) || self.keeps_raw(k);
        if let Some(members) = super::scan::members(text, source, kept) {
            let mut map = Map::new();
            let mut raw = Vec::new();
            for m in members {
                if self.keeps(m.key) {
                    // The scanner checked the whole text is UTF-8: `from_str` does not again.
                    map.insert(m.key.to_string(), serde_json::from_str(m.value)?);
                }
                if self.keeps_raw(m.key) {
                    raw.push(m);
                }
            }
            return Ok(Some(Parsed {
                map,
                raw: Some(raw),
            }));
        }
        // Not JSON, not an object, or escaped names: serde decides, and words the error.
        let mut de = serde_json::Deserializer::from_slice(text);
        let out = Partial(self).deserialize(&mut de)?;
        de.end()?;
        Ok(out.map(|map| Parsed { map, raw: None }))
    }
}

/// A member name: `Some` (owned) when the set keeps it.
struct Key<'f>(&'f Fields);

impl<'de> DeserializeSeed<'de> for Key<'_> {
    type Value = Option<String>;

    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_str(self)
    }
}

impl<'de> Visitor<'de> for Key<'_> {
    type Value = Option<String>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a member name")
    }

    fn visit_str<E>(self, key: &str) -> Result<Self::Value, E> {
        Ok(self.0.keeps(key).then(|| key.to_string()))
    }
}

/// The seed that keeps a [`Fields`]' members of an object.
struct Partial<'f>(&'f Fields);

impl<'de> DeserializeSeed<'de> for Partial<'_> {
    type Value = Option<Map<String, Value>>;

    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Partial<'_> {
    type Value = Option<Map<String, Value>>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut out = Map::new();
        // A key is looked at where it lies in the body; only kept ones are copied.
        while let Some(kept) = map.next_key_seed(Key(self.0))? {
            match kept {
                Some(key) => {
                    out.insert(key, map.next_value::<Value>()?);
                }
                None => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        Ok(Some(out))
    }

    // Any other JSON value is a body that is not an object: read through, refused later.
    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut s: A) -> Result<Self::Value, A::Error> {
        while s.next_element::<IgnoredAny>()?.is_some() {}
        Ok(None)
    }
    fn visit_str<E>(self, _: &str) -> Result<Self::Value, E> {
        Ok(None)
    }
    fn visit_bool<E>(self, _: bool) -> Result<Self::Value, E> {
        Ok(None)
    }
    fn visit_i64<E>(self, _: i64) -> Result<Self::Value, E> {
        Ok(None)
    }
    fn visit_u64<E>(self, _: u64) -> Result<Self::Value, E> {
        Ok(None)
    }
    fn visit_f64<E>(self, _: f64) -> Result<Self::Value, E> {
        Ok(None)
    }
    fn visit_unit<E>(self) -> Result<Self::Value, E> {
        Ok(None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fhir::scan::Source::Unchecked;
    use serde_json::json;

    fn fields(keys: &[&str]) -> Fields {
        let mut f = Fields::default();
        f.add(Some(keys.iter().map(|k| k.to_string())));
        f
    }

    #[test]
    fn keeps_only_the_named_members() {
        let body = json!({"resourceType": "Observation", "id": "o1", "meta": {"versionId": "1"},
            "status": "final", "code": {"text": "x"}, "note": [{"text": "long"}],
            "valueQuantity": {"value": 1}});
        let m = fields(&["code", "valueQuantity"])
            .parse(body.to_string().as_bytes(), Unchecked)
            .unwrap()
            .unwrap()
            .map;
        let keys: Vec<&str> = m.keys().map(String::as_str).collect();
        // Not even `resourceType`: the row's type is the resource's (`resource_with`).
        assert_eq!(keys, vec!["code", "valueQuantity"]);
        assert_eq!(m["code"], body["code"]);
        assert_eq!(m["valueQuantity"], body["valueQuantity"]);
        // `id` and `meta` only when a reader names them (`Resource.id`, `_lastUpdated`).
        let m = fields(&["id", "meta"])
            .parse(body.to_string().as_bytes(), Unchecked)
            .unwrap()
            .unwrap()
            .map;
        let keys: Vec<&str> = m.keys().map(String::as_str).collect();
        assert_eq!(keys, vec!["id", "meta"]);
        assert_eq!(m["meta"], body["meta"]);
    }

    #[test]
    fn bad_json_is_refused_even_in_members_not_kept() {
        let f = fields(&["code"]);
        assert!(f
            .parse(br#"{"code": {}, "note": [1, }"#, Unchecked)
            .is_err());
        assert!(f.parse(br#"{"code": {}} trailing"#, Unchecked).is_err());
        assert!(f.parse(b"[1, 2]", Unchecked).unwrap().is_none());
        assert!(f.parse(b"\"text\"", Unchecked).unwrap().is_none());
    }

    #[test]
    fn extension_readers_and_unknown_shapes_need_everything() {
        let mut f = fields(&["code"]);
        assert!(!f.is_all());
        f.add(Some(["extension".to_string()]));
        assert!(f.is_all());
        let mut g = fields(&["code"]);
        g.add(None::<Vec<String>>);
        assert!(g.is_all());
        let body = br#"{"a": 1, "b": {"c": 2}}"#;
        assert_eq!(
            Fields::all().parse(body, Unchecked).unwrap().unwrap().map,
            serde_json::from_slice::<Map<String, Value>>(body).unwrap()
        );
    }

    #[test]
    fn escaped_keys_are_read() {
        let m = fields(&["code"])
            .parse(br#"{"co\u0064e": 1, "n\u006fte": 2}"#, Unchecked)
            .unwrap()
            .unwrap()
            .map;
        assert_eq!(m.get("code"), Some(&json!(1)));
        assert!(m.get("note").is_none());
    }
}
