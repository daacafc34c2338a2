//! Reading a backbone from a TOML config (`[backbone]`, or `[model.backbone]` in a full model
//! config) and its weights.

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device};
use densepred_backbones::{AnyBackbone, BackboneConfig};
use densepred_core::params::SeededVarMap;
use densepred_core::weights::{load_into, read_checkpoint, LoadReport};
use std::path::Path;

/// Parses the backbone table of `path`.
pub fn read(path: &Path) -> Result<BackboneConfig> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("{}: cannot read config", path.display()))?;
    let value: toml::Table =
        toml::from_str(&text).with_context(|| format!("{}: invalid TOML", path.display()))?;
    let table = match (
        value.get("backbone"),
        value.get("model").and_then(|m| m.get("backbone")),
    ) {
        (Some(t), _) => t.clone(),
        (None, Some(t)) => t.clone(),
        (None, None) => bail!(
            "{}: no [backbone] or [model.backbone] table",
            path.display()
        ),
    };
    table
        .try_into()
        .with_context(|| format!("{}: invalid [backbone] table", path.display()))
}

/// A built backbone with its variables.
pub struct Loaded {
    /// The trainable model (its parameters are the variables of `vars`).
    pub model: AnyBackbone,
    /// The same weights, detached: for inference without autograd bookkeeping.
    pub inference: AnyBackbone,
    pub vars: SeededVarMap,
    pub report: Option<LoadReport>,
}

/// Builds the backbone of `config` on `device` and, if given, loads `weights` strictly (official
/// key names; `backbone.` prefixes and the detection spelling accepted).
pub fn build(config: &Path, weights: Option<&Path>, device: &Device) -> Result<Loaded> {
    let cfg = read(config)?;
    let vars = SeededVarMap::new(0);
    let model = AnyBackbone::new(vars.var_builder(DType::F32, device), &cfg)
        .map_err(|e| anyhow::anyhow!("{}: {e}", config.display()))?;
    let report = match weights {
        Some(w) => {
            let tensors = read_checkpoint(w)?;
            Some(load_into(
                &vars,
                &tensors,
                &|k| Some(model.map_checkpoint_key(k)),
                true,
                w,
            )?)
        }
        None => None,
    };
    let inference = AnyBackbone::new(vars.inference_var_builder(DType::F32, device), &cfg)?;
    Ok(Loaded {
        model,
        inference,
        vars,
        report,
    })
}
