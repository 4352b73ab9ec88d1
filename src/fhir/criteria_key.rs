//! Keys that say two topics' criteria are the same, so a change decides them once.

use std::sync::Arc;

use super::search::registry::SearchParam;

/// A trigger's criteria as text (type, queryCriteria, fhirPathCriteria) with its hash, which
/// is compared first: with 20 topics a change looked for the key a dozen times.
#[derive(Debug, Clone)]
pub(crate) struct CriteriaKey {
    hash: u64,
    text: Arc<str>,
}

impl CriteriaKey {
    pub(super) fn of(t: &super::topic::ResourceTrigger) -> Self {
        Self::text(format!(
            "{}\u{1f}{:?}\u{1f}{:?}",
            t.resource_type, t.query_criteria, t.fhirpath_criteria
        ))
    }

    /// A topic's canFilterBy parameters (resource type, name, definition): topics with the
    /// same key get the same values.
    pub(super) fn filters<'p>(
        filters: impl Iterator<Item = (&'p Option<String>, &'p str, &'p SearchParam)>,
    ) -> Self {
        let text = filters.map(|(ty, name, p)| {
            format!(
                "{ty:?}\u{1f}{name}\u{1f}{}\u{1f}{:?}\u{1e}",
                p.expression, p.kind
            )
        });
        Self::text(text.collect())
    }

    /// Any criteria written out as text; equal texts are equal keys.
    fn text(text: String) -> Self {
        use std::hash::{Hash, Hasher};
        let text: Arc<str> = text.into();
        // SipHash with fixed keys: the same text gives the same hash in every topic.
        let mut h = std::collections::hash_map::DefaultHasher::new();
        text.hash(&mut h);
        CriteriaKey {
            hash: h.finish(),
            text,
        }
    }

    pub(crate) fn same(&self, other: &CriteriaKey) -> bool {
        self.hash == other.hash && (Arc::ptr_eq(&self.text, &other.text) || self.text == other.text)
    }
}
