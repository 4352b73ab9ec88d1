//! The docs follow the code: `docs/configuration.md` names every key of `ConfigFile` under
//! its section (keys are found by deserialising a `ConfigFile` from a tracer that records
//! every field serde asks for, so a new key fails here until it is documented), and the
//! README stays a front page under 200 lines whose links to `docs/` resolve.

use fhir_cdc::config::ConfigFile;
use serde::de::{self, DeserializeSeed, IntoDeserializer, Visitor};
use std::cell::RefCell;
use std::collections::BTreeSet;
use std::path::PathBuf;

type Error = de::value::Error;

/// A deserializer that answers every request with a minimal value and records the path of
/// every leaf: `source.lag.warn_bytes`, `topic[].workers`, `api.auth.tokens[].env`.
struct Tracer<'a> {
    path: String,
    keys: &'a RefCell<BTreeSet<String>>,
}

impl<'a> Tracer<'a> {
    fn child(&self, name: &str) -> Tracer<'a> {
        let path = if self.path.is_empty() {
            name.to_string()
        } else {
            format!("{}.{name}", self.path)
        };
        Tracer {
            path,
            keys: self.keys,
        }
    }

    fn same(&self) -> Tracer<'a> {
        Tracer {
            path: self.path.clone(),
            keys: self.keys,
        }
    }

    fn leaf(&self) {
        self.keys.borrow_mut().insert(self.path.clone());
    }
}

macro_rules! leaf {
    ($($m:ident => $visit:ident($v:expr)),* $(,)?) => {$(
        fn $m<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
            self.leaf();
            visitor.$visit($v)
        }
    )*};
}

impl<'de> de::Deserializer<'de> for Tracer<'_> {
    type Error = Error;

    leaf! {
        deserialize_bool => visit_bool(false),
        deserialize_i8 => visit_i64(0), deserialize_i16 => visit_i64(0),
        deserialize_i32 => visit_i64(0), deserialize_i64 => visit_i64(0),
        deserialize_u8 => visit_u64(0), deserialize_u16 => visit_u64(0),
        deserialize_u32 => visit_u64(0), deserialize_u64 => visit_u64(0),
        deserialize_f32 => visit_f64(0.0), deserialize_f64 => visit_f64(0.0),
        deserialize_char => visit_char('x'),
        deserialize_str => visit_str("x"), deserialize_string => visit_str("x"),
        deserialize_bytes => visit_bytes(b"x"), deserialize_byte_buf => visit_bytes(b"x"),
        deserialize_identifier => visit_str("x"),
    }

    fn deserialize_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        self.leaf();
        visitor.visit_unit()
    }

    fn deserialize_unit<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        self.leaf();
        visitor.visit_unit()
    }

    fn deserialize_ignored_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        visitor.visit_unit()
    }

    fn deserialize_option<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        visitor.visit_some(self)
    }

    fn deserialize_unit_struct<V: Visitor<'de>>(
        self,
        _: &'static str,
        visitor: V,
    ) -> Result<V::Value, Error> {
        self.leaf();
        visitor.visit_unit()
    }

    fn deserialize_newtype_struct<V: Visitor<'de>>(
        self,
        _: &'static str,
        visitor: V,
    ) -> Result<V::Value, Error> {
        visitor.visit_newtype_struct(self)
    }

    fn deserialize_seq<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        let item = Tracer {
            path: format!("{}[]", self.path),
            keys: self.keys,
        };
        visitor.visit_seq(Items(vec![item]))
    }

    fn deserialize_tuple<V: Visitor<'de>>(self, len: usize, visitor: V) -> Result<V::Value, Error> {
        self.leaf();
        visitor.visit_seq(Items((0..len).map(|_| self.same()).collect()))
    }

    fn deserialize_tuple_struct<V: Visitor<'de>>(
        self,
        _: &'static str,
        len: usize,
        visitor: V,
    ) -> Result<V::Value, Error> {
        self.deserialize_tuple(len, visitor)
    }

    /// A map whose keys are not fields (or a struct with a flattened part): the path is the
    /// key.
    fn deserialize_map<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        self.leaf();
        visitor.visit_map(Fields(Vec::new(), None))
    }

    fn deserialize_struct<V: Visitor<'de>>(
        self,
        _: &'static str,
        fields: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, Error> {
        let children = fields.iter().map(|f| (*f, self.child(f))).collect();
        visitor.visit_map(Fields(children, None))
    }

    fn deserialize_enum<V: Visitor<'de>>(
        self,
        _: &'static str,
        variants: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, Error> {
        self.leaf();
        visitor.visit_enum(Variant(variants[0], self))
    }

    fn is_human_readable(&self) -> bool {
        false
    }
}

struct Items<'a>(Vec<Tracer<'a>>);

impl<'de> de::SeqAccess<'de> for Items<'_> {
    type Error = Error;
    fn next_element_seed<T: DeserializeSeed<'de>>(
        &mut self,
        seed: T,
    ) -> Result<Option<T::Value>, Error> {
        if self.0.is_empty() {
            return Ok(None);
        }
        seed.deserialize(self.0.remove(0)).map(Some)
    }
}

struct Fields<'a>(Vec<(&'static str, Tracer<'a>)>, Option<Tracer<'a>>);

impl<'de> de::MapAccess<'de> for Fields<'_> {
    type Error = Error;
    fn next_key_seed<K: DeserializeSeed<'de>>(
        &mut self,
        seed: K,
    ) -> Result<Option<K::Value>, Error> {
        if self.0.is_empty() {
            return Ok(None);
        }
        let (name, t) = self.0.remove(0);
        self.1 = Some(t);
        let key: de::value::StrDeserializer<Error> = name.into_deserializer();
        seed.deserialize(key).map(Some)
    }
    fn next_value_seed<V: DeserializeSeed<'de>>(&mut self, seed: V) -> Result<V::Value, Error> {
        let t = self
            .1
            .take()
            .ok_or_else(|| de::Error::custom("value before key"))?;
        seed.deserialize(t)
    }
}

struct Variant<'a>(&'static str, Tracer<'a>);

impl<'de, 'a> de::EnumAccess<'de> for Variant<'a> {
    type Error = Error;
    type Variant = Tracer<'a>;
    fn variant_seed<V: DeserializeSeed<'de>>(
        self,
        seed: V,
    ) -> Result<(V::Value, Tracer<'a>), Error> {
        let name: de::value::StrDeserializer<Error> = self.0.into_deserializer();
        Ok((seed.deserialize(name)?, self.1))
    }
}

impl<'de> de::VariantAccess<'de> for Tracer<'_> {
    type Error = Error;
    fn unit_variant(self) -> Result<(), Error> {
        Ok(())
    }
    fn newtype_variant_seed<T: DeserializeSeed<'de>>(self, seed: T) -> Result<T::Value, Error> {
        seed.deserialize(self)
    }
    fn tuple_variant<V: Visitor<'de>>(self, len: usize, visitor: V) -> Result<V::Value, Error> {
        de::Deserializer::deserialize_tuple(self, len, visitor)
    }
    fn struct_variant<V: Visitor<'de>>(
        self,
        fields: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, Error> {
        de::Deserializer::deserialize_struct(self, "", fields, visitor)
    }
}

/// Every key path of `ConfigFile`.
fn config_keys() -> BTreeSet<String> {
    let keys = RefCell::new(BTreeSet::new());
    let t = Tracer {
        path: String::new(),
        keys: &keys,
    };
    let _: ConfigFile = serde::Deserialize::deserialize(t).expect("trace ConfigFile");
    let mut out = keys.into_inner();
    // `[[topic]]` flattens the SubscriptionTopic's own fields beside its keys, so serde
    // reads it as a map: its keys are named here (TopicEntry's fields).
    if out.remove("topic[]") {
        for k in ["file", "workers", "max_content", "on_criteria_error"] {
            out.insert(format!("topic[].{k}"));
        }
    }
    out
}

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The section heading a key is documented under: `source.lag.warn_bytes` → `[source.lag]`,
/// `topic[].file` → `[[topic]]`, `destination[].filter[].value` → `[[destination]] filter`.
fn section_and_key(path: &str) -> (String, String) {
    let (section, key) = match path.rsplit_once('.') {
        Some((s, k)) => (s, k),
        None => ("", path),
    };
    let heading = if section.is_empty() {
        "top level".to_string()
    } else if let Some(array) = section.strip_suffix("[]") {
        format!("[[{}]]", array.replace("[]", ""))
    } else {
        format!("[{}]", section.replace("[]", ""))
    };
    (heading, key.trim_end_matches("[]").to_string())
}

#[test]
fn every_config_key_is_documented_under_its_section() {
    let keys = config_keys();
    assert!(
        keys.contains("source.url"),
        "the tracer sees keys: {keys:?}"
    );
    assert!(keys.len() > 60, "{} keys: {keys:?}", keys.len());
    let doc = std::fs::read_to_string(repo().join("docs/configuration.md")).unwrap();
    let mut missing = Vec::new();
    for path in &keys {
        let (heading, key) = section_and_key(path);
        // The section's part of the page: from its heading to the next heading.
        let Some(start) = doc
            .lines()
            .position(|l| l.starts_with('#') && l.contains(&format!("`{heading}`")))
        else {
            missing.push(format!("{path}: no heading naming `{heading}`"));
            continue;
        };
        let row = format!("| `{key}` |");
        let found = doc
            .lines()
            .skip(start + 1)
            .take_while(|l| !l.starts_with('#'))
            .any(|l| l.starts_with(&row));
        if !found {
            missing.push(format!("{path}: no row {row} under `{heading}`"));
        }
    }
    assert!(
        missing.is_empty(),
        "docs/configuration.md misses:\n{}",
        missing.join("\n")
    );
}

#[test]
fn the_readme_is_a_front_page_and_its_links_resolve() {
    let readme = std::fs::read_to_string(repo().join("README.md")).unwrap();
    let lines = readme.lines().count();
    assert!(lines < 200, "README.md has {lines} lines");
    assert!(readme.contains("scripts/demo.sh") && readme.contains("scripts/test.sh"));
    for doc in [
        "stores",
        "configuration",
        "channels",
        "operations",
        "security",
        "performance",
    ] {
        let path = format!("docs/{doc}.md");
        assert!(readme.contains(&format!("({path})")), "README links {path}");
        assert!(repo().join(&path).is_file(), "{path} exists");
    }
    // Every relative link of the README and the docs names a file that exists.
    for entry in std::fs::read_dir(repo().join("docs")).unwrap() {
        let p = entry.unwrap().path();
        check_links(&p, &std::fs::read_to_string(&p).unwrap());
    }
    check_links(&repo().join("README.md"), &readme);
}

fn check_links(file: &std::path::Path, text: &str) {
    let dir = file.parent().unwrap();
    for part in text.split("](").skip(1) {
        let target = &part[..part.find(')').unwrap_or(part.len())];
        if target.contains("://") || target.starts_with('#') || target.starts_with("mailto:") {
            continue;
        }
        let path = target.split('#').next().unwrap();
        assert!(
            dir.join(path).exists(),
            "{}: link to {target} does not resolve",
            file.display()
        );
    }
}
