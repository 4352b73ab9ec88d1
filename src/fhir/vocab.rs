//! The vocabulary the FHIR modules share: a Subscription's status and content, the
//! notification format, and the interactions a topic triggers on. A leaf: it imports no
//! other module of `fhir/`, so the modules that use these words do not depend on each other
//! for them.

use super::FhirVersion;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Requested,
    Active,
    Error,
    Off,
}

impl Status {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Status::Requested => "requested",
            Status::Active => "active",
            Status::Error => "error",
            Status::Off => "off",
        }
    }
    pub(crate) fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "requested" => Status::Requested,
            "active" => Status::Active,
            "error" => Status::Error,
            "off" => Status::Off,
            _ => return None,
        })
    }
}

/// Payload content, ordered from least to most.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Content {
    Empty,
    IdOnly,
    FullResource,
}

impl Content {
    pub fn as_str(self) -> &'static str {
        match self {
            Content::Empty => "empty",
            Content::IdOnly => "id-only",
            Content::FullResource => "full-resource",
        }
    }
    pub(crate) fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "empty" => Content::Empty,
            "id-only" => Content::IdOnly,
            "full-resource" => Content::FullResource,
            _ => return None,
        })
    }
}

/// The wire format of notifications, from the store's FHIR version.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// R4 through the Subscriptions R5 Backport IG: `history` Bundle, `Parameters` status.
    R4Backport,
    /// R4B: `history` Bundle, `SubscriptionStatus`.
    R4B,
    /// R5 and R6: `subscription-notification` Bundle, `SubscriptionStatus`.
    R5,
}

impl From<FhirVersion> for Format {
    fn from(v: FhirVersion) -> Self {
        match v {
            FhirVersion::R4 => Format::R4Backport,
            FhirVersion::R4B => Format::R4B,
            FhirVersion::R5 | FhirVersion::R6 => Format::R5,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Interaction {
    Create,
    Update,
    Delete,
}

impl Interaction {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Interaction::Create => "create",
            Interaction::Update => "update",
            Interaction::Delete => "delete",
        }
    }

    pub(crate) fn parse(s: &str) -> Option<Self> {
        match s {
            "create" => Some(Interaction::Create),
            "update" => Some(Interaction::Update),
            "delete" => Some(Interaction::Delete),
            _ => None,
        }
    }

    pub(crate) fn bit(self) -> u8 {
        match self {
            Interaction::Create => 1,
            Interaction::Update => 2,
            Interaction::Delete => 4,
        }
    }
}
