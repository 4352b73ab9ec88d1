//! fhirPathCriteria of the common shape — comparisons of plain paths of `%current` /
//! `%previous` with literals, joined by `and` / `or` — decided on the JSON, without the
//! FHIRPath engine: `(%current.value as Quantity).value > 140`, `%current.status = 'final'
//! and %previous.status != 'final'`. The engine converts the whole resource per change and
//! costs tens of microseconds per expression; this is a few lookups.
//!
//! Only what is certain is decided here: paths the FHIR model confirms (through
//! [`crate::fhir::search::path`]), strings compared with code/string-like elements, numbers
//! with numeric ones, booleans with booleans. A path with several items, a value of another
//! type, or anything the grammar does not cover makes [`Fast::eval`] answer `None`, and the
//! engine decides. Unit tests compare both on the same resources.

use serde_json::Value;

use super::search::path::{self, Plan};
use super::FhirVersion;

/// A compiled criterion.
#[derive(Debug, Clone)]
pub(crate) struct Fast(Expr);

#[derive(Debug, Clone)]
enum Expr {
    Or(Box<Expr>, Box<Expr>),
    And(Box<Expr>, Box<Expr>),
    Cmp(Op, Operand, Operand),
    /// A boolean path on its own.
    Truth(Operand),
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Op {
    Eq,
    Ne,
    Gt,
    Lt,
    Ge,
    Le,
}

#[derive(Debug, Clone)]
enum Operand {
    Path {
        previous: bool,
        plan: Plan,
        kind: Kind,
    },
    Lit(Value),
}

/// What a path's values are, from the model: only these are compared here.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Kind {
    Text,
    Number,
    Bool,
}

fn kind_of(fhir_type: &str) -> Option<Kind> {
    Some(match fhir_type {
        "code" | "string" | "id" | "uri" | "url" | "canonical" | "markdown" | "oid" | "uuid" => {
            Kind::Text
        }
        "decimal" | "integer" | "positiveInt" | "unsignedInt" | "integer64" => Kind::Number,
        "boolean" => Kind::Bool,
        _ => return None,
    })
}

impl Fast {
    /// The criterion for changes of `resource_type`, when it has the shape decided here.
    pub(crate) fn compile(expr: &str, resource_type: &str, version: FhirVersion) -> Option<Fast> {
        let tokens = lex(expr)?;
        let mut p = Parser {
            t: &tokens,
            i: 0,
            ty: resource_type,
            version,
        };
        let e = p.or()?;
        (p.i == tokens.len()).then_some(Fast(e))
    }

    /// The top-level members of `%current` / `%previous` the criterion reads.
    pub(crate) fn top_keys(&self) -> Option<Vec<String>> {
        let mut out = Vec::new();
        keys(&self.0, &mut out)?;
        Some(out)
    }

    /// `Some(Some(b))` true/false, `Some(None)` empty (no decision), `None`: the engine must
    /// decide.
    pub(crate) fn eval(
        &self,
        previous: Option<&Value>,
        current: Option<&Value>,
    ) -> Option<Option<bool>> {
        eval(&self.0, previous, current)
    }
}

fn keys(e: &Expr, out: &mut Vec<String>) -> Option<()> {
    let operand = |o: &Operand, out: &mut Vec<String>| match o {
        Operand::Lit(_) => Some(()),
        Operand::Path { plan, .. } => {
            out.extend(plan.top_keys()?);
            Some(())
        }
    };
    match e {
        Expr::Or(a, b) | Expr::And(a, b) => {
            keys(a, out)?;
            keys(b, out)
        }
        Expr::Cmp(_, a, b) => {
            operand(a, out)?;
            operand(b, out)
        }
        Expr::Truth(o) => operand(o, out),
    }
}

fn eval<'a>(e: &'a Expr, prev: Option<&'a Value>, cur: Option<&'a Value>) -> Option<Option<bool>> {
    Some(match e {
        Expr::Or(a, b) => match (eval(a, prev, cur)?, eval(b, prev, cur)?) {
            (Some(true), _) | (_, Some(true)) => Some(true),
            (Some(false), Some(false)) => Some(false),
            _ => None,
        },
        Expr::And(a, b) => match (eval(a, prev, cur)?, eval(b, prev, cur)?) {
            (Some(false), _) | (_, Some(false)) => Some(false),
            (Some(true), Some(true)) => Some(true),
            _ => None,
        },
        Expr::Truth(o) => match single(o, prev, cur)? {
            None => None,
            Some(Value::Bool(b)) => Some(*b),
            Some(_) => return None,
        },
        Expr::Cmp(op, a, b) => match (single(a, prev, cur)?, single(b, prev, cur)?) {
            (Some(x), Some(y)) => Some(compare(*op, x, y)?),
            _ => None,
        },
    })
}

/// The operand's one value: `Some(None)` when empty, `None` when several or of a type not
/// compared here.
/// Borrowed: nothing is copied to compare.
fn single<'a>(
    o: &'a Operand,
    prev: Option<&'a Value>,
    cur: Option<&'a Value>,
) -> Option<Option<&'a Value>> {
    let (previous, plan, kind) = match o {
        Operand::Lit(v) => return Some(Some(v)),
        Operand::Path {
            previous,
            plan,
            kind,
        } => (previous, plan, kind),
    };
    let Some(resource) = (if *previous { prev } else { cur }) else {
        return Some(None);
    };
    let mut items = plan.select(resource);
    match items.len() {
        0 => Some(None),
        1 => {
            let v = items.pop()?;
            let fits = match kind {
                Kind::Text => v.is_string(),
                Kind::Number => v.is_number(),
                Kind::Bool => v.is_boolean(),
            };
            fits.then_some(Some(v))
        }
        _ => None,
    }
}

fn compare(op: Op, a: &Value, b: &Value) -> Option<bool> {
    use std::cmp::Ordering;
    let ord = match (a, b) {
        (Value::String(x), Value::String(y)) => x.cmp(y),
        (Value::Number(x), Value::Number(y)) => x.as_f64()?.partial_cmp(&y.as_f64()?)?,
        (Value::Bool(x), Value::Bool(y)) if matches!(op, Op::Eq | Op::Ne) => x.cmp(y),
        _ => return None,
    };
    if matches!(a, Value::String(_)) && !matches!(op, Op::Eq | Op::Ne) {
        // String ordering depends on collation details the engine owns.
        return None;
    }
    Some(match op {
        Op::Eq => ord == Ordering::Equal,
        Op::Ne => ord != Ordering::Equal,
        Op::Gt => ord == Ordering::Greater,
        Op::Lt => ord == Ordering::Less,
        Op::Ge => ord != Ordering::Less,
        Op::Le => ord != Ordering::Greater,
    })
}

#[derive(Debug, Clone, PartialEq)]
enum Tok {
    Open,
    Close,
    Dot,
    Word(String),
    Var(String),
    Str(String),
    Num(String),
    Op(Op),
}

fn lex(s: &str) -> Option<Vec<Tok>> {
    let c: Vec<char> = s.chars().collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < c.len() {
        let ch = c[i];
        match ch {
            ' ' | '\t' | '\n' | '\r' => i += 1,
            '(' => (out.push(Tok::Open), i += 1).1,
            ')' => (out.push(Tok::Close), i += 1).1,
            '.' => (out.push(Tok::Dot), i += 1).1,
            '=' => (out.push(Tok::Op(Op::Eq)), i += 1).1,
            '!' if c.get(i + 1) == Some(&'=') => (out.push(Tok::Op(Op::Ne)), i += 2).1,
            '>' | '<' => {
                let eq = c.get(i + 1) == Some(&'=');
                let op = match (ch, eq) {
                    ('>', false) => Op::Gt,
                    ('>', true) => Op::Ge,
                    ('<', false) => Op::Lt,
                    _ => Op::Le,
                };
                out.push(Tok::Op(op));
                i += if eq { 2 } else { 1 };
            }
            '\'' => {
                let end = (i + 1..c.len()).find(|&j| c[j] == '\'')?;
                let text: String = c[i + 1..end].iter().collect();
                if text.contains('\\') {
                    return None;
                }
                out.push(Tok::Str(text));
                i = end + 1;
            }
            '%' => {
                let end = (i + 1..c.len())
                    .find(|&j| !c[j].is_ascii_alphanumeric())
                    .unwrap_or(c.len());
                out.push(Tok::Var(c[i + 1..end].iter().collect()));
                i = end;
            }
            d if d.is_ascii_digit() => {
                let end = (i..c.len())
                    .find(|&j| !(c[j].is_ascii_digit() || c[j] == '.'))
                    .unwrap_or(c.len());
                out.push(Tok::Num(c[i..end].iter().collect()));
                i = end;
            }
            a if a.is_ascii_alphabetic() => {
                let end = (i..c.len())
                    .find(|&j| !(c[j].is_ascii_alphanumeric() || c[j] == '_'))
                    .unwrap_or(c.len());
                out.push(Tok::Word(c[i..end].iter().collect()));
                i = end;
            }
            _ => return None,
        }
    }
    Some(out)
}

struct Parser<'a> {
    t: &'a [Tok],
    i: usize,
    ty: &'a str,
    version: FhirVersion,
}

impl Parser<'_> {
    fn peek(&self) -> Option<&Tok> {
        self.t.get(self.i)
    }

    fn word(&self, w: &str) -> bool {
        matches!(self.peek(), Some(Tok::Word(x)) if x == w)
    }

    fn or(&mut self) -> Option<Expr> {
        let mut e = self.and()?;
        while self.word("or") {
            self.i += 1;
            e = Expr::Or(Box::new(e), Box::new(self.and()?));
        }
        Some(e)
    }

    fn and(&mut self) -> Option<Expr> {
        let mut e = self.cmp()?;
        while self.word("and") {
            self.i += 1;
            e = Expr::And(Box::new(e), Box::new(self.cmp()?));
        }
        Some(e)
    }

    fn cmp(&mut self) -> Option<Expr> {
        // A parenthesised boolean sub-expression.
        if self.peek() == Some(&Tok::Open) && !self.starts_path_group() {
            self.i += 1;
            let e = self.or()?;
            (self.peek() == Some(&Tok::Close)).then_some(())?;
            self.i += 1;
            return Some(e);
        }
        let a = self.operand()?;
        match self.peek() {
            Some(Tok::Op(op)) => {
                let op = *op;
                self.i += 1;
                let b = self.operand()?;
                Some(Expr::Cmp(op, a, b))
            }
            _ => matches!(
                a,
                Operand::Path {
                    kind: Kind::Bool,
                    ..
                }
            )
            .then_some(Expr::Truth(a)),
        }
    }

    /// `(` followed by a variable and ending `as Type)`: a cast path, not a sub-expression.
    fn starts_path_group(&self) -> bool {
        let mut depth = 0;
        for (j, t) in self.t[self.i..].iter().enumerate() {
            match t {
                Tok::Open => depth += 1,
                Tok::Close => {
                    depth -= 1;
                    if depth == 0 {
                        let inner = &self.t[self.i + 1..self.i + j];
                        return matches!(inner.first(), Some(Tok::Var(_)))
                            && inner.len() >= 2
                            && matches!(&inner[inner.len() - 2], Tok::Word(w) if w == "as");
                    }
                }
                _ => {}
            }
        }
        false
    }

    fn operand(&mut self) -> Option<Operand> {
        match self.peek()?.clone() {
            Tok::Str(s) => (self.i += 1, Some(Operand::Lit(Value::String(s)))).1,
            Tok::Num(n) => {
                self.i += 1;
                Some(Operand::Lit(serde_json::from_str::<Value>(&n).ok()?))
            }
            Tok::Word(w) if w == "true" || w == "false" => {
                self.i += 1;
                Some(Operand::Lit(Value::Bool(w == "true")))
            }
            _ => self.path(),
        }
    }

    /// `%current.a.b`, `(%current.value as Quantity).value`.
    fn path(&mut self) -> Option<Operand> {
        let mut text = self.ty.to_string();
        let grouped = self.peek() == Some(&Tok::Open);
        if grouped {
            self.i += 1;
        }
        let previous = match self.peek()? {
            Tok::Var(v) if v == "current" => false,
            Tok::Var(v) if v == "previous" => true,
            _ => return None,
        };
        self.i += 1;
        self.members(&mut text)?;
        if grouped {
            (self.word("as")).then_some(())?;
            self.i += 1;
            let Some(Tok::Word(t)) = self.peek().cloned() else {
                return None;
            };
            text.push_str(&format!(".ofType({t})"));
            self.i += 1;
            (self.peek() == Some(&Tok::Close)).then_some(())?;
            self.i += 1;
            self.members(&mut text)?;
        }
        let plan = path::compile(&text, self.ty, self.version)?;
        let kind = kind_of(plan.single_type()?)?;
        Some(Operand::Path {
            previous,
            plan,
            kind,
        })
    }

    fn members(&mut self, text: &mut String) -> Option<()> {
        while self.peek() == Some(&Tok::Dot) {
            self.i += 1;
            let Some(Tok::Word(w)) = self.peek().cloned() else {
                return None;
            };
            if self.t.get(self.i + 1) == Some(&Tok::Open) {
                return None; // a function call
            }
            text.push('.');
            text.push_str(&w);
            self.i += 1;
        }
        Some(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fhir::fhirpath::FhirPath;
    use serde_json::json;

    #[test]
    fn common_shapes_compile_and_others_do_not() {
        let c = |e: &str| Fast::compile(e, "Observation", FhirVersion::R4).is_some();
        assert!(c("(%current.value as Quantity).value > 140"));
        assert!(c(
            "%current.status = 'final' and %previous.status != 'final'"
        ));
        assert!(c(
            "(%current.status = 'final') or (%current.status = 'amended')"
        ));
        assert!(!c("%current.code.coding.exists(code = '1')"));
        assert!(!c("%current.status in ('final' | 'amended')"));
        assert!(!c("(%current.value as Quantity).value > 140 'x'"));
        assert!(!c("%current.effective > @2024-01-01"));
        assert!(
            !c("%current.code = 'x'"),
            "CodeableConcept is not compared here"
        );
    }

    #[tokio::test]
    async fn decisions_are_the_engines() {
        let fp = FhirPath::new(FhirVersion::R4).await.unwrap();
        let obs = |status: &str, value: Option<f64>| {
            let mut o =
                json!({"resourceType": "Observation", "status": status, "code": {"text": "x"}});
            if let Some(v) = value {
                o["valueQuantity"] = json!({"value": v, "unit": "mg/dL"});
            }
            o
        };
        let exprs = [
            "(%current.value as Quantity).value > 140",
            "(%current.value as Quantity).value <= 140.5",
            "%current.status = 'final' and %previous.status != 'final'",
            "%current.status = 'final' or %previous.status = 'final'",
            "(%current.status = 'amended') or ((%current.value as Quantity).value >= 100)",
            "%previous.status = 'preliminary' and %current.status = 'final'",
        ];
        let pairs = [
            (None, obs("final", Some(180.0))),
            (
                Some(obs("preliminary", Some(90.0))),
                obs("final", Some(140.0)),
            ),
            (Some(obs("final", None)), obs("amended", None)),
            (Some(obs("final", Some(150.0))), obs("final", Some(140.5))),
            (None, obs("registered", None)),
        ];
        let mut decided = 0;
        for e in exprs {
            let fast = Fast::compile(e, "Observation", FhirVersion::R4).unwrap();
            for (prev, cur) in &pairs {
                let Some(got) = fast.eval(prev.as_ref(), Some(cur)) else {
                    continue;
                };
                let p = fp.prepare(cur, prev.as_ref(), Some(cur));
                let engine = match fp.eval_criterion(&p, e).await {
                    Ok(b) => Some(b),
                    Err(crate::fhir::fhirpath::CriterionError::Empty) => None,
                    Err(err) => {
                        panic!("{e}: the engine failed ({err}) where the fast path decided")
                    }
                };
                assert_eq!(got, engine, "{e} on {prev:?} -> {cur}");
                decided += 1;
            }
        }
        assert!(decided >= 25, "only {decided} decided");
    }
}
