//! FHIRPath through `octofhir-fhirpath`, typed by the embedded FHIR models of the store's
//! version (so `value as Quantity` and `ofType()` work). One engine per process; compiled
//! expressions are cached by the engine.

use octofhir_fhirpath::core::value::utils::{json_to_fhirpath_value, json_to_fhirpath_value_arc};
use octofhir_fhirpath::{create_function_registry, Collection, EvaluationContext, FhirPathEngine};
use octofhir_fhirschema::{EmbeddedSchemaProvider, ModelFhirVersion, ModelProvider};
use serde_json::Value;
use std::sync::Arc;

use crate::fhir::FhirVersion;

pub struct FhirPath {
    engine: FhirPathEngine,
    provider: Arc<dyn ModelProvider + Send + Sync>,
}

/// A resource made ready for many evaluations, with `%previous` and `%current` bound.
pub(crate) struct Prepared {
    ctx: EvaluationContext,
    /// `%previous`/`%current` that are absent: the engine binds every variable as a
    /// one-item collection, so these are rewritten to the empty literal `{}` instead.
    absent: Vec<&'static str>,
}

impl FhirPath {
    pub async fn new(version: FhirVersion) -> anyhow::Result<Self> {
        let v = match version {
            FhirVersion::R4 => ModelFhirVersion::R4,
            FhirVersion::R4B => ModelFhirVersion::R4B,
            FhirVersion::R5 => ModelFhirVersion::R5,
            FhirVersion::R6 => ModelFhirVersion::R6,
        };
        let provider: Arc<dyn ModelProvider + Send + Sync> =
            Arc::new(EmbeddedSchemaProvider::new(v));
        let engine = FhirPathEngine::new(Arc::new(create_function_registry()), provider.clone())
            .await
            .map_err(|e| anyhow::anyhow!("starting the FHIRPath engine: {e}"))?;
        Ok(FhirPath { engine, provider })
    }

    /// Checks that `expr` parses.
    pub(crate) fn compile(&self, expr: &str) -> Result<(), String> {
        self.engine
            .compile_plan(expr)
            .map(|_| ())
            .map_err(|e| e.to_string())
    }

    /// `focus` is the evaluation input (`%resource`); `previous`/`current` bind `%previous`
    /// and `%current` (an absent one is the empty collection).
    pub(crate) fn prepare(
        &self,
        focus: &Value,
        previous: Option<&Value>,
        current: Option<&Value>,
    ) -> Prepared {
        let arc = |v: &Value| Arc::new(v.clone());
        self.prepare_arcs(
            Some(&arc(focus)),
            previous.map(arc).as_ref(),
            current.map(arc).as_ref(),
        )
    }

    /// As [`FhirPath::prepare`], sharing the caller's JSON instead of copying it. `focus`
    /// `None` means the current version, else the previous one.
    pub(crate) fn prepare_arcs(
        &self,
        focus: Option<&Arc<Value>>,
        previous: Option<&Arc<Value>>,
        current: Option<&Arc<Value>>,
    ) -> Prepared {
        let pv = previous.map(|p| json_to_fhirpath_value_arc(p.clone()));
        let cv = current.map(|c| json_to_fhirpath_value_arc(c.clone()));
        let input = match focus {
            Some(f) => json_to_fhirpath_value_arc(f.clone()),
            None => cv
                .clone()
                .or_else(|| pv.clone())
                .unwrap_or_else(|| json_to_fhirpath_value(Value::Null)),
        };
        let ctx = EvaluationContext::new(
            Collection::single(input),
            self.provider.clone(),
            None,
            None,
            None,
        );
        let mut absent = Vec::new();
        for (name, v) in [("previous", pv), ("current", cv)] {
            match v {
                Some(v) => ctx.set_variable(name.into(), v),
                None => absent.push(name),
            }
        }
        Prepared { ctx, absent }
    }

    /// Evaluates `expr`; the results as JSON.
    pub(crate) async fn eval(&self, p: &Prepared, expr: &str) -> Result<Vec<Value>, String> {
        let rewritten;
        let expr = if p.absent.iter().any(|n| expr.contains(&format!("%{n}"))) {
            rewritten = without_absent(expr, &p.absent);
            rewritten.as_str()
        } else {
            expr
        };
        let r = self
            .engine
            .evaluate(expr, &p.ctx)
            .await
            .map_err(|e| e.to_string())?;
        Ok(r.value.iter().map(|v| v.to_json_value()).collect())
    }

    /// A criterion: exactly one boolean, or why not. An empty result counts as "no boolean"
    /// (a strict engine raises an error for what this one returns empty, e.g. `and` over a
    /// two-item collection), so that the topic's policy decides rather than silence.
    pub(crate) async fn eval_criterion(
        &self,
        p: &Prepared,
        expr: &str,
    ) -> Result<bool, CriterionError> {
        let out = self.eval(p, expr).await.map_err(CriterionError::Engine)?;
        match out.as_slice() {
            [Value::Bool(b)] => Ok(*b),
            [] => Err(CriterionError::Empty),
            [_] => Err(CriterionError::NotBoolean),
            many => Err(CriterionError::Many(many.len())),
        }
    }
}

/// Why a fhirPathCriteria gave no decision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum CriterionError {
    Engine(String),
    Empty,
    NotBoolean,
    Many(usize),
}

impl CriterionError {
    /// The kind, for logging once per topic per kind.
    pub(crate) fn kind(&self) -> &'static str {
        match self {
            CriterionError::Engine(_) => "error",
            CriterionError::Empty => "empty",
            CriterionError::NotBoolean => "not-boolean",
            CriterionError::Many(_) => "multi-item",
        }
    }
}

impl std::fmt::Display for CriterionError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CriterionError::Engine(e) => write!(f, "fhirPathCriteria failed: {e}"),
            CriterionError::Empty => {
                write!(f, "fhirPathCriteria gave no boolean (an empty result)")
            }
            CriterionError::NotBoolean => {
                write!(f, "fhirPathCriteria gave a value that is not a boolean")
            }
            CriterionError::Many(n) => {
                write!(f, "fhirPathCriteria gave {n} values instead of one boolean")
            }
        }
    }
}

/// Replaces `%name` (not `%nameMore`) by `{}` for each absent variable.
fn without_absent(expr: &str, absent: &[&str]) -> String {
    let mut out = expr.to_string();
    for n in absent {
        let pat = format!("%{n}");
        let mut res = String::with_capacity(out.len());
        let mut rest = out.as_str();
        while let Some(i) = rest.find(&pat) {
            let after = &rest[i + pat.len()..];
            let continues = after
                .chars()
                .next()
                .is_some_and(|c| c.is_ascii_alphanumeric() || c == '_');
            res.push_str(&rest[..i]);
            res.push_str(if continues { &pat } else { "{}" });
            rest = after;
        }
        res.push_str(rest);
        out = res;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn absent_variables_become_empty() {
        assert_eq!(
            without_absent(
                "%previous.status != 'x' and %current.id = %previousId",
                &["previous"]
            ),
            "{}.status != 'x' and %current.id = %previousId"
        );
    }
}
