//! FHIRPath through `octofhir-fhirpath`, typed by the embedded FHIR models of the store's
//! version (so `value as Quantity` and `ofType()` work). One engine per process; compiled
//! expressions are cached by the engine.

use octofhir_fhirpath::core::value::utils::json_to_fhirpath_value;
use octofhir_fhirpath::{create_function_registry, Collection, EvaluationContext, FhirPathEngine};
use octofhir_fhirschema::{EmbeddedSchemaProvider, ModelFhirVersion, ModelProvider};
use serde_json::Value;
use std::sync::Arc;

use crate::config::FhirVersion;

pub struct FhirPath {
    engine: FhirPathEngine,
    provider: Arc<dyn ModelProvider + Send + Sync>,
}

/// A resource made ready for many evaluations, with `%previous` and `%current` bound.
pub struct Prepared {
    ctx: EvaluationContext,
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
    pub fn compile(&self, expr: &str) -> Result<(), String> {
        self.engine
            .compile_plan(expr)
            .map(|_| ())
            .map_err(|e| e.to_string())
    }

    /// `focus` is the evaluation input (`%resource`); `previous`/`current` bind `%previous`
    /// and `%current` (an absent one is an empty collection).
    pub fn prepare(
        &self,
        focus: &Value,
        previous: Option<&Value>,
        current: Option<&Value>,
    ) -> Prepared {
        let input = json_to_fhirpath_value(focus.clone());
        let ctx = EvaluationContext::new(
            Collection::single(input),
            self.provider.clone(),
            None,
            None,
            None,
        );
        let bind = |name: &str, v: Option<&Value>| match v {
            Some(v) => ctx.set_variable(name.into(), json_to_fhirpath_value(v.clone())),
            None => ctx.set_variable(name.into(), json_to_fhirpath_value(Value::Array(vec![]))),
        };
        bind("previous", previous);
        bind("current", current);
        Prepared { ctx }
    }

    /// Evaluates `expr`; the results as JSON.
    pub async fn eval(&self, p: &Prepared, expr: &str) -> Result<Vec<Value>, String> {
        let r = self
            .engine
            .evaluate(expr, &p.ctx)
            .await
            .map_err(|e| e.to_string())?;
        Ok(r.value.iter().map(|v| v.to_json_value()).collect())
    }

    /// Evaluates a criterion: exactly one boolean, else an error saying what came back.
    pub async fn eval_bool(&self, p: &Prepared, expr: &str) -> Result<bool, String> {
        let out = self.eval(p, expr).await?;
        match out.as_slice() {
            [Value::Bool(b)] => Ok(*b),
            [] => Ok(false),
            other => Err(format!(
                "expected one boolean, got {} value(s) of another kind",
                other.len()
            )),
        }
    }
}
