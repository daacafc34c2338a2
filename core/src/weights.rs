//! Reading checkpoints (safetensors, PyTorch `.pth`) and loading them into a model's variables with
//! a report of what matched, in the manner of PyTorch's `load_state_dict` (missing keys, unexpected
//! keys, shape mismatches).

use crate::params::SeededVarMap;
use candle_core::{Device, Tensor, Var};
use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::path::{Path, PathBuf};

/// Errors of checkpoint reading and loading.
#[derive(Debug, thiserror::Error)]
pub enum WeightsError {
    /// The file could not be read or parsed as the format its extension names.
    #[error("{path}: cannot read checkpoint: {reason}")]
    Read {
        /// The checkpoint file.
        path: PathBuf,
        /// What went wrong.
        reason: String,
    },
    /// A file could not be written.
    #[error("{path}: cannot write: {reason}")]
    Write {
        /// The output file.
        path: PathBuf,
        /// What went wrong.
        reason: String,
    },
    /// Strict loading found keys that do not correspond one-to-one with the model.
    #[error("{path}: checkpoint does not match the model\n{report}")]
    Mismatch {
        /// The checkpoint file.
        path: PathBuf,
        /// The full comparison.
        report: Box<LoadReport>,
    },
    /// A tensor operation failed while copying values.
    #[error("{path}: {source}")]
    Candle {
        /// The checkpoint file.
        path: PathBuf,
        /// The candle error.
        source: candle_core::Error,
    },
}

/// Reads every tensor of a checkpoint onto the CPU, by name.
///
/// * `*.safetensors`: all tensors.
/// * anything else is read as a PyTorch zip checkpoint (`torch.save`): the state dict is taken from
///   the top-level key `model` (official SMT / timm ImageNet checkpoints), else `state_dict`
///   (mmdetection / mmsegmentation), else the top-level dict itself.
///
/// Errors: [`WeightsError::Read`] naming the file and the parser's message.
pub fn read_checkpoint(path: &Path) -> Result<BTreeMap<String, Tensor>, WeightsError> {
    let err = |reason: String| WeightsError::Read {
        path: path.to_path_buf(),
        reason,
    };
    if !path.exists() {
        return Err(err("no such file".into()));
    }
    let is_st = path.extension().and_then(|e| e.to_str()) == Some("safetensors");
    let list: Vec<(String, Tensor)> = if is_st {
        candle_core::safetensors::load(path, &Device::Cpu)
            .map_err(|e| err(e.to_string()))?
            .into_iter()
            .collect()
    } else {
        let mut last = String::new();
        let mut found = None;
        for key in [Some("model"), Some("state_dict"), None] {
            match candle_core::pickle::read_all_with_key(path, key) {
                Ok(v) if !v.is_empty() => {
                    found = Some(v);
                    break;
                }
                Ok(_) => last = "no tensors found".into(),
                Err(e) => last = e.to_string(),
            }
        }
        found.ok_or_else(|| {
            err(format!(
                "not a PyTorch checkpoint with a state dict ({last})"
            ))
        })?
    };
    Ok(list.into_iter().collect())
}

/// What a load matched, by model parameter name.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LoadReport {
    /// Model variables that received a value.
    pub loaded: Vec<String>,
    /// Model variables that the checkpoint lacks.
    pub missing: Vec<String>,
    /// Checkpoint keys (as written in the file) that map to no model variable.
    pub unexpected: Vec<String>,
    /// `(model name, model shape, checkpoint shape)` of same-named tensors whose shapes differ.
    pub shape_mismatch: Vec<(String, Vec<usize>, Vec<usize>)>,
    /// Checkpoint keys ignored on purpose (`num_batches_tracked`, `__*__` fixture extras).
    pub ignored: Vec<String>,
}

impl LoadReport {
    /// True when every model variable was loaded and nothing else was in the checkpoint.
    pub fn is_exact(&self) -> bool {
        self.missing.is_empty() && self.unexpected.is_empty() && self.shape_mismatch.is_empty()
    }
}

impl fmt::Display for LoadReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "loaded {} tensors, ignored {}",
            self.loaded.len(),
            self.ignored.len()
        )?;
        // The first few of each list (a backbone-only checkpoint misses hundreds of keys).
        const SHOWN: usize = 8;
        let more = |n: usize| {
            if n > SHOWN {
                format!(", … and {} more", n - SHOWN)
            } else {
                String::new()
            }
        };
        let list = |f: &mut fmt::Formatter<'_>, what: &str, v: &[String]| -> fmt::Result {
            if !v.is_empty() {
                let head: Vec<&str> = v.iter().take(SHOWN).map(String::as_str).collect();
                writeln!(
                    f,
                    "{what} ({}): {}{}",
                    v.len(),
                    head.join(", "),
                    more(v.len())
                )?;
            }
            Ok(())
        };
        list(f, "missing keys", &self.missing)?;
        list(f, "unexpected keys", &self.unexpected)?;
        for (k, m, c) in self.shape_mismatch.iter().take(SHOWN) {
            writeln!(f, "shape mismatch for {k}: model {m:?}, checkpoint {c:?}")?;
        }
        if self.shape_mismatch.len() > SHOWN {
            writeln!(
                f,
                "… and {} more shape mismatches",
                self.shape_mismatch.len() - SHOWN
            )?;
        }
        Ok(())
    }
}

/// Copies checkpoint tensors into the model variables of `vars`.
///
/// `map_key` turns a checkpoint key into the model's name for it (`None`: not a model tensor, e.g.
/// an optimizer entry). Keys ending in `num_batches_tracked` and keys starting with `__` are
/// ignored. Values are converted to each variable's dtype.
///
/// With `strict`, any missing key, unexpected key or shape mismatch is an error
/// ([`WeightsError::Mismatch`]) and no variable is changed; otherwise the matching tensors are loaded
/// and the report says what did not match.
pub fn load_into(
    vars: &SeededVarMap,
    tensors: &BTreeMap<String, Tensor>,
    map_key: &dyn Fn(&str) -> Option<String>,
    strict: bool,
    path: &Path,
) -> Result<LoadReport, WeightsError> {
    let model: HashMap<String, Var> = vars.named_vars().into_iter().collect();
    let mut report = LoadReport::default();
    let mut to_set: Vec<(Var, &Tensor)> = Vec::new();
    let mut seen: HashMap<String, String> = HashMap::new();
    for (key, t) in tensors {
        if key.starts_with("__") || key.ends_with("num_batches_tracked") {
            report.ignored.push(key.clone());
            continue;
        }
        let Some(name) = map_key(key).filter(|n| model.contains_key(n)) else {
            report.unexpected.push(key.clone());
            continue;
        };
        if let Some(prev) = seen.insert(name.clone(), key.clone()) {
            return Err(WeightsError::Read {
                path: path.to_path_buf(),
                reason: format!("keys {prev} and {key} both map to parameter {name}"),
            });
        }
        let var = &model[&name];
        if var.dims() != t.dims() {
            report
                .shape_mismatch
                .push((name, var.dims().to_vec(), t.dims().to_vec()));
            continue;
        }
        report.loaded.push(name);
        to_set.push((var.clone(), t));
    }
    let mut missing: Vec<String> = model
        .keys()
        .filter(|k| !seen.contains_key(*k))
        .cloned()
        .collect();
    missing.sort();
    report.missing = missing;
    report.loaded.sort();
    if strict && !report.is_exact() {
        return Err(WeightsError::Mismatch {
            path: path.to_path_buf(),
            report: Box::new(report),
        });
    }
    for (var, t) in to_set {
        t.to_dtype(var.dtype())
            .and_then(|v| v.to_device(var.device()))
            .and_then(|v| var.set(&v))
            .map_err(|source| WeightsError::Candle {
                path: path.to_path_buf(),
                source,
            })?;
    }
    Ok(report)
}

/// Writes named tensors to a safetensors file atomically (a temporary file in the same folder,
/// then a rename), so an interrupted write never leaves a truncated file under `path`. Missing
/// parent folders are created.
///
/// Errors: I/O or serialisation failures, naming `path`.
pub fn save_safetensors_atomic(
    tensors: &BTreeMap<String, Tensor>,
    path: &Path,
) -> Result<(), WeightsError> {
    let err = |reason: String| WeightsError::Write {
        path: path.to_path_buf(),
        reason,
    };
    let cpu: HashMap<String, Tensor> = tensors
        .iter()
        .map(|(k, t)| t.to_device(&Device::Cpu).map(|t| (k.clone(), t)))
        .collect::<Result<_, _>>()
        .map_err(|e| err(e.to_string()))?;
    crate::io::write_atomic(path, |tmp| {
        candle_core::safetensors::save(&cpu, tmp).map_err(|e| e.to_string())
    })
    .map_err(err)
}
