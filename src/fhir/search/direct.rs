//! canFilterBy values read from the text of the one member a parameter's plan walks, as a
//! [`Lite`] tree that borrows its strings, instead of from a `serde_json::Value` of the
//! member (converted from Aidbox's format first). Capture kept `code`, `subject` and `value`
//! of every Observation as `Value` trees for bench.sh's topic; building, converting and
//! dropping them was about half of its instructions per row.
//!
//! Only the walks of [`Shape`] are read this way, and Aidbox's format is converted as the
//! Aidbox store's format converter does for what extraction reads: a `Reference`'s forms
//! (`{"resourceType", "id"}`, `uri`, `localRef`) become `reference`, and a choice stored as
//! `"value": {"Quantity": {…}}` is `valueQuantity`. Nothing else conversion changes is read by
//! [`extract`] (it reads a selected item's own strings and numbers, and its codings'). Any
//! doubt (a repeated member name, an Aidbox first-class extension under the member's key)
//! answers `None`, and the caller reads the complete resource instead. Tests hold both ways
//! together on the workload's resources of every type, in both formats.

use std::borrow::Cow;
use std::sync::OnceLock;

use super::json::Lite;
use super::path::{refers_to, Shape};
use super::registry::ParamType;
use super::value::{extract, Values};
use crate::fhir::model::upper_first;
use crate::fhir::scan::Member;

/// One version of a change as the members capture kept as text.
#[derive(Debug)]
pub(crate) struct RawDoc<'a> {
    members: Vec<Member<'a>>,
    /// Each member read once, when a walk first needs it (`Err`: not a [`Lite`]).
    read: Vec<OnceLock<Result<Lite<'a>, ()>>>,
    /// The body is in Aidbox's format, and the converter knows its type.
    aidbox: bool,
    /// Top-level keys that are the store's first-class extensions for this type.
    attributes: Vec<&'a str>,
}

/// An item a walk selects: borrowed from a member's tree, or converted from Aidbox's format.
type Item<'s, 'a> = Cow<'s, Lite<'a>>;

impl<'a> RawDoc<'a> {
    pub(crate) fn new(members: Vec<Member<'a>>, aidbox: bool, attributes: Vec<&'a str>) -> Self {
        RawDoc {
            read: members.iter().map(|_| OnceLock::new()).collect(),
            members,
            aidbox,
            attributes,
        }
    }

    /// The member `key` (the last one, as serde_json's map keeps): `Ok(None)` when absent,
    /// `Err` when its text is not a [`Lite`] or it is a first-class extension's key.
    fn read(&self, key: &str) -> Result<Option<&Lite<'a>>, ()> {
        if self.attributes.contains(&key) {
            return Err(());
        }
        let Some(i) = self.members.iter().rposition(|m| m.key == key) else {
            return Ok(None);
        };
        let (Some(m), Some(cell)) = (self.members.get(i), self.read.get(i)) else {
            return Err(());
        };
        match cell.get_or_init(|| Lite::parse(m.value).map_err(|_| ())) {
            Ok(v) => Ok(Some(v)),
            Err(()) => Err(()),
        }
    }

    /// The values of a parameter of type `kind` whose plan's branches walk `shapes`; `None`
    /// when this text cannot answer (see the module's doc).
    pub(crate) fn values(&self, shapes: &[Shape<'_>], kind: ParamType) -> Option<Values> {
        let mut selected = Vec::new();
        for shape in shapes {
            self.select(*shape, &mut selected)?;
        }
        Some(extract(kind, selected.iter().map(|c| &**c)))
    }

    /// Appends the items one branch's walk selects, as [`super::path`] walks the converted
    /// resource.
    fn select<'s>(&'s self, shape: Shape<'_>, out: &mut Vec<Item<'s, 'a>>) -> Option<()> {
        match shape {
            Shape::Field { key, reference } => {
                if let Some(v) = self.read(key).ok()? {
                    flatten(self.convert(v, reference), out);
                }
            }
            Shape::Cast {
                key,
                top,
                reference,
            } => {
                for (_, v) in self.choices(&[key], top, |_| reference)? {
                    flatten(v, out);
                }
            }
            Shape::RefersTo { key, target } => {
                if let Some(v) = self.read(key).ok()? {
                    let mut items = Vec::new();
                    flatten(self.convert(v, true), &mut items);
                    out.extend(
                        items
                            .into_iter()
                            .filter(|it| refers_to(reference_of(it), target)),
                    );
                }
            }
            Shape::Choice { prefix, keys, top } => {
                let keys: smallvec::SmallVec<[&str; 16]> =
                    keys.iter().map(String::as_str).collect();
                let is_reference = |k: &str| k.strip_prefix(prefix) == Some("Reference");
                let mut found = self.choices(&keys, top, is_reference)?;
                // serde_json's map is ordered by name: the choices come in that order.
                found.sort_by(|a, b| a.0.cmp(&b.0));
                for (_, v) in found {
                    flatten(v, out);
                }
            }
        }
        Some(())
    }

    /// A member's value as the converter leaves it: Aidbox's reference forms become
    /// `reference` when the member is a `Reference` (copied only when one does).
    fn convert<'s>(&self, v: &'s Lite<'a>, reference: bool) -> Item<'s, 'a> {
        if self.aidbox && reference && needs_reference(v) {
            let mut owned = v.clone();
            convert_reference_items(&mut owned);
            Cow::Owned(owned)
        } else {
            Cow::Borrowed(v)
        }
    }

    /// The typed members of choice element `top` among `keys`: those written as FHIR
    /// (`valueQuantity`), and in Aidbox's format the one stored under `top` (`"value":
    /// {"Quantity": …}`), which replaces a FHIR one of the same name as conversion does.
    /// `reference` says which keys are `Reference`s.
    fn choices<'s>(
        &'s self,
        keys: &[&str],
        top: &str,
        reference: impl Fn(&str) -> bool,
    ) -> Option<Vec<(String, Item<'s, 'a>)>> {
        let mut out = Vec::new();
        for k in keys {
            if let Some(v) = self.read(k).ok()? {
                out.push((k.to_string(), self.convert(v, reference(k))));
            }
        }
        if !self.aidbox {
            return Some(out);
        }
        let Some(Lite::Object(inner)) = self.read(top).ok()? else {
            return Some(out);
        };
        let [(ty, v)] = inner.as_slice() else {
            return Some(out);
        };
        let name = format!("{top}{}", upper_first(ty));
        if !keys.contains(&name.as_str()) {
            return Some(out);
        }
        let v = self.convert(v, reference(&name));
        out.retain(|(k, _)| *k != name);
        out.push((name, v));
        Some(out)
    }
}

/// What `where(resolve() is T)` reads of an item: its `reference` string, else "".
fn reference_of<'v>(it: &'v Lite<'_>) -> &'v str {
    match it
        .members()
        .and_then(|m| m.iter().find(|(k, _)| k == "reference"))
    {
        Some((_, Lite::String(s))) => s,
        _ => "",
    }
}

/// A step's items: an array's elements, nothing for `null`, else the value (as
/// [`super::path`] walks).
fn flatten<'s, 'a>(v: Item<'s, 'a>, out: &mut Vec<Item<'s, 'a>>) {
    match v {
        Cow::Borrowed(Lite::Array(a)) => out.extend(a.iter().map(Cow::Borrowed)),
        Cow::Owned(Lite::Array(a)) => out.extend(a.into_iter().map(Cow::Owned)),
        Cow::Borrowed(Lite::Null) | Cow::Owned(Lite::Null) => {}
        v => out.push(v),
    }
}

/// Whether converting `v`'s references would change one (an object without `reference`).
fn needs_reference(v: &Lite<'_>) -> bool {
    match v {
        Lite::Array(items) => items.iter().any(needs_reference),
        Lite::Object(m) => !m.iter().any(|(k, _)| k == "reference"),
        _ => false,
    }
}

/// Aidbox's reference forms in `v` (an object, or arrays of them) → `reference`.
fn convert_reference_items(v: &mut Lite<'_>) {
    match v {
        Lite::Array(items) => items.iter_mut().for_each(convert_reference_items),
        Lite::Object(m) => reference(m),
        _ => {}
    }
}

/// As the store converter's `reference`: FHIR references (with `reference`) stay.
fn reference(m: &mut Vec<(Cow<'_, str>, Lite<'_>)>) {
    let get = |m: &Vec<(Cow<'_, str>, Lite<'_>)>, key: &str| -> Option<String> {
        m.iter().find(|(k, _)| k == key).and_then(|(_, v)| match v {
            Lite::String(s) => Some(s.to_string()),
            _ => None,
        })
    };
    if m.iter().any(|(k, _)| k == "reference") {
        return;
    }
    let remove = |m: &mut Vec<(Cow<'_, str>, Lite<'_>)>, key: &str| m.retain(|(k, _)| k != key);
    let target = match (get(m, "resourceType"), get(m, "id")) {
        (Some(t), Some(id)) => {
            remove(m, "resourceType");
            remove(m, "id");
            format!("{t}/{id}")
        }
        _ => {
            if let Some(uri) = get(m, "uri") {
                remove(m, "uri");
                uri
            } else if let Some(local) = get(m, "localRef") {
                remove(m, "localRef");
                format!("#{local}")
            } else {
                return;
            }
        }
    };
    m.push((Cow::Borrowed("reference"), Lite::String(Cow::Owned(target))));
}
