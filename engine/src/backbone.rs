//! A backbone on its own, read from a TOML file with a `[backbone]` table (or the
//! `[model.backbone]` table of a full model config): what `densepred features` and the Python
//! `densepred.Backbone` run.

use crate::runner::EngineError;
use candle_core::{DType, Device};
use densepred_backbones::{AnyBackbone, BackboneConfig};
use densepred_core::params::SeededVarMap;
use densepred_core::weights::{load_into, read_checkpoint, LoadReport};
use std::path::Path;

fn file_err(path: &Path, reason: impl std::fmt::Display) -> EngineError {
    EngineError::File {
        path: path.to_path_buf(),
        reason: reason.to_string(),
    }
}

/// Parses the backbone table of the TOML file `path` (`[backbone]`, else `[model.backbone]`;
/// no `_base_` merging).
///
/// Errors: [`EngineError::File`] when the file is missing or not TOML;
/// [`EngineError::Config`] (naming the file and the key) when neither table exists or a field is
/// unknown or has the wrong type.
pub fn read_config(path: &Path) -> Result<BackboneConfig, EngineError> {
    if !path.is_file() {
        return Err(file_err(path, "no such file"));
    }
    let text =
        std::fs::read_to_string(path).map_err(|e| file_err(path, format!("cannot read: {e}")))?;
    let value: toml::Table =
        toml::from_str(&text).map_err(|e| file_err(path, format!("invalid TOML: {e}")))?;
    let table = match (
        value.get("backbone"),
        value.get("model").and_then(|m| m.get("backbone")),
    ) {
        (Some(t), _) => t.clone(),
        (None, Some(t)) => t.clone(),
        (None, None) => {
            return Err(EngineError::Config(format!(
                "{}: no [backbone] or [model.backbone] table",
                path.display()
            )))
        }
    };
    table.try_into().map_err(|e| {
        EngineError::Config(format!("{}: invalid [backbone] table: {e}", path.display()))
    })
}

/// A built backbone with its variables.
pub struct LoadedBackbone {
    /// The trainable model (its parameters are the variables of `vars`).
    pub model: AnyBackbone,
    /// The same weights, detached: for inference without autograd bookkeeping.
    pub inference: AnyBackbone,
    /// The parameter store (official state-dict names).
    pub vars: SeededVarMap,
    /// What loading `weights` matched, when weights were given.
    pub report: Option<LoadReport>,
}

/// Builds the backbone of the config file `config` on `device` (weights drawn from seed 0) and,
/// if given, loads `weights` strictly (`.safetensors` or official `.pth`; official key names,
/// `backbone.` prefixes and the detection wrapper's `attn.dw_conv` spelling accepted).
///
/// Errors: as [`read_config`]; [`EngineError::File`] for an unreadable checkpoint or one that
/// does not match the model exactly (the message lists missing and unexpected keys and shape
/// mismatches).
pub fn build_backbone(
    config: &Path,
    weights: Option<&Path>,
    device: &Device,
) -> Result<LoadedBackbone, EngineError> {
    let cfg = read_config(config)?;
    let vars = SeededVarMap::new(0);
    let model = AnyBackbone::new(vars.var_builder(DType::F32, device), &cfg)
        .map_err(|e| EngineError::Config(format!("{}: {e}", config.display())))?;
    let report = match weights {
        Some(w) => {
            let tensors = read_checkpoint(w).map_err(|e| file_err(w, e))?;
            Some(
                load_into(
                    &vars,
                    &tensors,
                    &|k| Some(model.map_checkpoint_key(k)),
                    true,
                    w,
                )
                .map_err(|e| file_err(w, e))?,
            )
        }
        None => None,
    };
    let inference = AnyBackbone::new(vars.inference_var_builder(DType::F32, device), &cfg)
        .map_err(|e| EngineError::Config(format!("{}: {e}", config.display())))?;
    Ok(LoadedBackbone {
        model,
        inference,
        vars,
        report,
    })
}
