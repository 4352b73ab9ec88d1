//! The search-value cases of `value.rs`.

use super::*;
use serde_json::{json, Value};

/// (param type, FHIRPath results as JSON, modifier, search value, expected)
type Case = (ParamType, Value, Option<&'static str>, &'static str, bool);

fn cases() -> Vec<Case> {
    use ParamType::*;
    let loinc = json!([{"coding": [{"system": "http://loinc.org", "code": "2339-0", "display": "Glucose [Mass/volume] in Blood"}], "text": "Glucose"}]);
    let status = json!(["final"]);
    let ident = json!([{"system": "http://hospital.example/mrn", "value": "12345"}]);
    let subj = json!([{"reference": "Patient/p1"}]);
    let abs = json!([{"reference": "https://fhir.example.org/fhir/Patient/p1/_history/3"}]);
    let name = json!([{"family": "Müller", "given": ["José", "Anne"]}]);
    let dt = json!(["2024-03-15T10:30:00Z"]);
    let day = json!(["2024-03-15"]);
    let period = json!([{"start": "2024-03-01", "end": "2024-03-31"}]);
    let open = json!([{"start": "2024-03-01"}]);
    let q = json!([{"value": 140.4, "unit": "mg/dL", "system": "http://unitsofmeasure.org", "code": "mg/dL"}]);
    let n = json!([140]);
    let none = json!([]);
    let uri = json!(["http://example.org/fhir/ValueSet/x"]);
    let boolean = json!([true]);
    vec![
        // token: code, system|code, system|, |code, :not, :text, :missing, OR
        (Token, status.clone(), None, "final", true),
        (Token, status.clone(), None, "preliminary", false),
        (Token, status.clone(), None, "preliminary,final", true),
        (Token, status.clone(), None, "Final", false),
        (Token, status.clone(), Some("not"), "preliminary", true),
        (Token, status.clone(), Some("not"), "final", false),
        (Token, status.clone(), Some("not"), "amended,final", false),
        (Token, status.clone(), None, "|final", true),
        (Token, loinc.clone(), None, "http://loinc.org|2339-0", true),
        (Token, loinc.clone(), None, "2339-0", true),
        (Token, loinc.clone(), None, "http://loinc.org|", true),
        (
            Token,
            loinc.clone(),
            None,
            "http://snomed.info/sct|2339-0",
            false,
        ),
        (Token, loinc.clone(), None, "|2339-0", false),
        (Token, loinc.clone(), None, "http://loinc.org|1234-5", false),
        (Token, loinc.clone(), None, "1234-5,2339-0", true),
        (Token, loinc.clone(), Some("text"), "glucose", true),
        (Token, loinc.clone(), Some("text"), "GLUC", true),
        (Token, loinc.clone(), Some("text"), "sodium", false),
        (
            Token,
            loinc.clone(),
            Some("not"),
            "http://loinc.org|2339-0",
            false,
        ),
        (
            Token,
            loinc.clone(),
            Some("not"),
            "http://loinc.org|1234-5",
            true,
        ),
        (Token, loinc.clone(), Some("missing"), "false", true),
        (Token, loinc.clone(), Some("missing"), "true", false),
        (Token, none.clone(), Some("missing"), "true", true),
        (Token, none.clone(), Some("missing"), "false", false),
        (Token, none.clone(), None, "final", false),
        (
            Token,
            ident.clone(),
            None,
            "http://hospital.example/mrn|12345",
            true,
        ),
        (Token, ident.clone(), None, "12345", true),
        (Token, ident.clone(), None, "http://other|12345", false),
        (Token, boolean.clone(), None, "true", true),
        (Token, boolean.clone(), None, "false", false),
        // reference: Type/id, absolute and versioned, bare id, :missing
        (Reference, subj.clone(), None, "Patient/p1", true),
        (Reference, subj.clone(), None, "Patient/p2", false),
        (Reference, subj.clone(), None, "p1", true),
        (Reference, subj.clone(), None, "Group/p1", false),
        (
            Reference,
            subj.clone(),
            None,
            "https://fhir.example.org/fhir/Patient/p1",
            true,
        ),
        (Reference, subj.clone(), None, "Patient/p2,Patient/p1", true),
        (Reference, abs.clone(), None, "Patient/p1", true),
        (Reference, abs.clone(), None, "Patient/p1/_history/3", true),
        (Reference, abs.clone(), None, "Patient/p9", false),
        (Reference, subj.clone(), Some("missing"), "false", true),
        (Reference, none.clone(), Some("missing"), "true", true),
        (Reference, none.clone(), None, "Patient/p1", false),
        // string: case- and accent-insensitive prefix, :exact, :contains
        (String, name.clone(), None, "muller", true),
        (String, name.clone(), None, "MÜLL", true),
        (String, name.clone(), None, "jose", true),
        (String, name.clone(), None, "ann", true),
        (String, name.clone(), None, "ller", false),
        (String, name.clone(), Some("contains"), "ller", true),
        (String, name.clone(), Some("contains"), "xyz", false),
        (String, name.clone(), Some("exact"), "Müller", true),
        (String, name.clone(), Some("exact"), "muller", false),
        (String, name.clone(), Some("exact"), "Müll", false),
        (String, name.clone(), None, "smith,müller", true),
        (String, none.clone(), Some("missing"), "true", true),
        // date: precision ranges and prefixes
        (Date, dt.clone(), None, "2024-03-15", true),
        (Date, dt.clone(), None, "2024-03", true),
        (Date, dt.clone(), None, "2024", true),
        (Date, dt.clone(), None, "2024-03-16", false),
        (Date, dt.clone(), None, "eq2024-03-15", true),
        (Date, dt.clone(), None, "ne2024-03-15", false),
        (Date, dt.clone(), None, "ne2024-03-14", true),
        (Date, dt.clone(), None, "gt2024-03-14", true),
        (Date, dt.clone(), None, "gt2024-03-15", false),
        (Date, dt.clone(), None, "lt2024-03-16", true),
        (Date, dt.clone(), None, "lt2024-03-15", false),
        (Date, dt.clone(), None, "ge2024-03-15", true),
        (Date, dt.clone(), None, "le2024-03-15", true),
        (Date, dt.clone(), None, "le2024-03-14", false),
        (Date, dt.clone(), None, "sa2024-03-14", true),
        (Date, dt.clone(), None, "sa2024-03-15", false),
        (Date, dt.clone(), None, "eb2024-03-16", true),
        (Date, dt.clone(), None, "eb2024-03-15", false),
        (Date, dt.clone(), None, "ap2024-03-15", true),
        (Date, dt.clone(), None, "gt2024-03-15T10:00:00Z", true),
        (Date, dt.clone(), None, "lt2024-03-15T10:00:00Z", false),
        (Date, dt.clone(), None, "2024-03-15T10:30:00Z", true),
        (Date, dt.clone(), None, "2024-03-15T12:30:00+02:00", true),
        (Date, day.clone(), None, "2024-03-15", true),
        (Date, day.clone(), None, "2024-03-15T10:30:00Z", false),
        (Date, day.clone(), None, "ge2024-03-15T10:30:00Z", true),
        (Date, day.clone(), None, "gt2024-03-15", false),
        (Date, period.clone(), None, "2024-03", true),
        (Date, period.clone(), None, "2024-03-10", false),
        (Date, period.clone(), None, "ge2024-03-10", true),
        (Date, period.clone(), None, "le2024-03-10", true),
        (Date, period.clone(), None, "gt2024-04-01", false),
        (Date, period.clone(), None, "sa2024-02-28", true),
        (Date, open.clone(), None, "gt2030-01-01", true),
        (Date, open.clone(), None, "lt2024-01-01", false),
        (Date, none.clone(), None, "2024", false),
        // quantity: implicit precision, prefixes, system|code
        (Quantity, q.clone(), None, "140", true),
        (Quantity, q.clone(), None, "eq140", true),
        (Quantity, q.clone(), None, "140.4", true),
        (Quantity, q.clone(), None, "140.0", false),
        (Quantity, q.clone(), None, "141", false),
        (Quantity, q.clone(), None, "gt100", true),
        (Quantity, q.clone(), None, "gt140.4", false),
        (Quantity, q.clone(), None, "ge140.4", true),
        (Quantity, q.clone(), None, "lt200", true),
        (Quantity, q.clone(), None, "lt140", false),
        (Quantity, q.clone(), None, "le140.4", true),
        (Quantity, q.clone(), None, "ne150", true),
        (Quantity, q.clone(), None, "ne140", false),
        (Quantity, q.clone(), None, "ap135", true),
        (Quantity, q.clone(), None, "ap100", false),
        (
            Quantity,
            q.clone(),
            None,
            "140|http://unitsofmeasure.org|mg/dL",
            true,
        ),
        (Quantity, q.clone(), None, "140||mg/dL", true),
        (
            Quantity,
            q.clone(),
            None,
            "140|http://unitsofmeasure.org|mmol/L",
            false,
        ),
        (
            Quantity,
            q.clone(),
            None,
            "gt100|http://unitsofmeasure.org|mg/dL",
            true,
        ),
        (Quantity, q.clone(), None, "gt200,lt150", true),
        // number
        (Number, n.clone(), None, "140", true),
        (Number, n.clone(), None, "140.0", true),
        (Number, n.clone(), None, "139.6", false),
        (Number, n.clone(), None, "gt139", true),
        (Number, n.clone(), None, "lt140", false),
        (Number, n.clone(), None, "le140", true),
        (Number, n.clone(), None, "1.4e2", true),
        // uri
        (
            Uri,
            uri.clone(),
            None,
            "http://example.org/fhir/ValueSet/x",
            true,
        ),
        (
            Uri,
            uri.clone(),
            None,
            "http://example.org/fhir/ValueSet",
            false,
        ),
        (
            Uri,
            uri.clone(),
            Some("below"),
            "http://example.org/fhir",
            true,
        ),
        (
            Uri,
            uri.clone(),
            Some("above"),
            "http://example.org/fhir/ValueSet/x/y",
            true,
        ),
    ]
}

#[test]
fn table() {
    let all = cases();
    assert!(all.len() >= 120, "{}", all.len());
    for (kind, results, modifier, search, want) in all {
        let values = extract(kind, results.as_array().unwrap());
        assert_eq!(
            matches(&values, modifier, search),
            want,
            "{kind:?} {results} {modifier:?} {search}"
        );
        // Filter values survive the queue (JSON) unchanged.
        let back: Values = serde_json::from_value(serde_json::to_value(&values).unwrap()).unwrap();
        assert_eq!(back, values);
    }
}

#[test]
fn validation() {
    use ParamType::*;
    assert!(validate(Token, Some("not"), "final").is_ok());
    assert!(validate(Token, Some("in"), "http://vs").is_err());
    assert!(validate(Token, Some("not-in"), "http://vs").is_err());
    assert!(validate(Reference, Some("exact"), "Patient/1").is_err());
    assert!(validate(String, Some("exact"), "x").is_ok());
    assert!(validate(Date, None, "ge2024-01-01").is_ok());
    assert!(validate(Date, None, "yesterday").is_err());
    assert!(validate(Quantity, None, "gt5.4|http://unitsofmeasure.org|mg").is_ok());
    assert!(validate(Quantity, None, "lots").is_err());
    assert!(validate(Token, Some("missing"), "maybe").is_err());
}

#[test]
fn references_and_dates_normalise() {
    assert_eq!(normalize_reference("Patient/1"), "Patient/1");
    assert_eq!(
        normalize_reference("http://x.org/fhir/Patient/1/_history/2"),
        "Patient/1"
    );
    assert_eq!(normalize_reference("urn:uuid:abc"), "urn:uuid:abc");
    assert_eq!(
        normalize_reference("http://x.org/ValueSet/v|1.0"),
        "ValueSet/v"
    );
    let d = date_range("2024-02").unwrap();
    assert_eq!(d.hi - d.lo, 29 * 86_400_000, "leap February");
    assert_eq!(
        date_range("2024-12").unwrap().hi,
        date_range("2025").unwrap().lo
    );
    assert!(date_range("2024-13").is_none());
}
