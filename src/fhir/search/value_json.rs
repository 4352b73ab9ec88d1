//! [`Values`] written as JSON text directly, in the form their serde derive gives (`{"t":
//! "token","v":[[system,code,text],…]}`): capture writes every event's `filters` this way.
//! Going through serde's map and enum machinery was a tenth of capture's instructions per
//! row; the delivery side still reads them back with serde (`tests` hold the two together).

use std::fmt::Write;

use super::value::{Range, Values};

/// Appends `v` as JSON.
pub(crate) fn write_values(v: &Values, out: &mut String) {
    let (tag, n) = match v {
        Values::Token(x) => ("token", x.len()),
        Values::Reference(x) => ("reference", x.len()),
        Values::String(x) => ("string", x.len()),
        Values::Date(x) => ("date", x.len()),
        Values::Quantity(x) => ("quantity", x.len()),
        Values::Number(x) => ("number", x.len()),
        Values::Uri(x) => ("uri", x.len()),
    };
    out.push_str("{\"t\":\"");
    out.push_str(tag);
    out.push_str("\",\"v\":[");
    for i in 0..n {
        if i > 0 {
            out.push(',');
        }
        match v {
            Values::Token(x) => {
                let (system, code, text) = &x[i];
                out.push('[');
                write_opt(system.as_deref(), out);
                out.push(',');
                write_str(code, out);
                out.push(',');
                write_opt(text.as_deref(), out);
                out.push(']');
            }
            Values::Reference(x) | Values::Uri(x) => write_str(&x[i], out),
            Values::String(x) => {
                out.push('[');
                write_str(&x[i].0, out);
                out.push(',');
                write_str(&x[i].1, out);
                out.push(']');
            }
            Values::Date(x) => write_range(x[i], out),
            Values::Quantity(x) => {
                let (value, system, code) = &x[i];
                out.push('[');
                write_f64(*value, out);
                out.push(',');
                write_opt(system.as_deref(), out);
                out.push(',');
                write_opt(code.as_deref(), out);
                out.push(']');
            }
            Values::Number(x) => write_f64(x[i], out),
        }
    }
    out.push_str("]}");
}

fn write_range(r: Range, out: &mut String) {
    let _ = write!(out, "{{\"lo\":{},\"hi\":{}}}", r.lo, r.hi);
}

fn write_opt(s: Option<&str>, out: &mut String) {
    match s {
        Some(s) => write_str(s, out),
        None => out.push_str("null"),
    }
}

/// A number as serde_json writes an `f64` (with its formatter, `zmij`): with a fraction or
/// exponent, `null` when not finite. `Display` took four times as many instructions.
fn write_f64(x: f64, out: &mut String) {
    if !x.is_finite() {
        out.push_str("null");
        return;
    }
    out.push_str(zmij::Buffer::new().format_finite(x));
}

/// A JSON string: `"` and `\` escaped, control characters as serde_json writes them.
pub(crate) fn write_str(s: &str, out: &mut String) {
    out.push('"');
    let bytes = s.as_bytes();
    let mut plain = 0;
    loop {
        let i = crate::fhir::scan::plain_end(bytes, plain);
        let Some(&b) = bytes.get(i) else { break };
        let esc = match b {
            b'"' => "\\\"",
            b'\\' => "\\\\",
            b'\n' => "\\n",
            b'\r' => "\\r",
            b'\t' => "\\t",
            0x08 => "\\b",
            0x0c => "\\f",
            _ => "",
        };
        out.push_str(&s[plain..i]);
        if esc.is_empty() {
            let _ = write!(out, "\\u{b:04x}");
        } else {
            out.push_str(esc);
        }
        plain = i + 1;
    }
    out.push_str(&s[plain..]);
    out.push('"');
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all() -> Vec<Values> {
        let s = |x: &str| x.to_string();
        vec![
            Values::Token(vec![
                (
                    Some(s("http://loinc.org")),
                    s("2339-0"),
                    Some(s("Glucose \"fasting\" é")),
                ),
                (None, s("a\\b\n\t\r\u{8}\u{c}\u{1}\u{1f}/"), None),
            ]),
            Values::Reference(vec![s("Patient/p1"), s("urn:uuid:x")]),
            Values::String(vec![(s("doe"), s("Doé"))]),
            Values::Date(vec![
                Range {
                    lo: -5,
                    hi: i64::MAX,
                },
                Range {
                    lo: i64::MIN,
                    hi: 0,
                },
            ]),
            Values::Quantity(vec![
                (
                    180.5,
                    Some(s("http://unitsofmeasure.org")),
                    Some(s("mg/dL")),
                ),
                (100.0, None, None),
                (1e300, None, None),
                (-0.000001, None, None),
            ]),
            Values::Number(vec![3.0, 0.1, -2.5e-10]),
            Values::Uri(vec![]),
            Values::Token(vec![]),
        ]
    }

    #[test]
    fn writes_what_serde_writes() {
        for v in all() {
            let mut ours = String::new();
            write_values(&v, &mut ours);
            let serde = serde_json::to_string(&v).unwrap();
            let (a, b): (serde_json::Value, serde_json::Value) = (
                serde_json::from_str(&ours).unwrap(),
                serde_json::from_str(&serde).unwrap(),
            );
            assert_eq!(a, b, "{ours} vs {serde}");
            assert_eq!(serde_json::from_str::<Values>(&ours).unwrap(), v);
        }
    }

    #[test]
    fn strings_escape_as_serde_escapes_them() {
        for s in ["", "plain", "q\"b\\", "\u{0}\u{7}\u{1b}\u{7f}", "é😀\n"] {
            let mut ours = String::new();
            write_str(s, &mut ours);
            assert_eq!(ours, serde_json::to_string(s).unwrap());
        }
    }
}
