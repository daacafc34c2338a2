//! Whole-file TOML configs with mmdetection / mmengine semantics.
//!
//! * `_base_ = ["../_base_/a.toml", ...]`: each base (path relative to the file naming it, itself
//!   possibly with bases) is merged in order, then the file's own keys on top. Tables merge key by
//!   key recursively; any other value replaces; a table containing `_delete_ = true` replaces the
//!   inherited table instead of merging into it (the marker is removed).
//! * `--set a.b.c=V`: `V` is parsed as a TOML value when it is one (`3`, `1e-4`, `true`, `[1, 2]`,
//!   `"x"`), otherwise taken as a plain string (`annotations/val.json`), as mmdet's
//!   `--cfg-options`. Intermediate tables are created when missing; indexing into arrays is
//!   `a.0.b`.

use std::path::{Path, PathBuf};
use toml::{Table, Value};

/// Config errors, naming the file and the key.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A config file could not be read or parsed.
    #[error("{path}: {reason}")]
    File {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// An override is malformed.
    #[error("--set {0}")]
    Override(String),
    /// A value has the wrong type or a key is unknown.
    #[error("{path}: {reason}")]
    Invalid {
        /// The config file.
        path: PathBuf,
        /// What is wrong, naming the key.
        reason: String,
    },
}

/// Reads `path` with all its `_base_` files merged in (cycles are an error).
pub fn load(path: &Path) -> Result<Table, ConfigError> {
    load_inner(path, &mut Vec::new())
}

fn load_inner(path: &Path, stack: &mut Vec<PathBuf>) -> Result<Table, ConfigError> {
    let canon = path.canonicalize().map_err(|e| ConfigError::File {
        path: path.into(),
        reason: e.to_string(),
    })?;
    if stack.contains(&canon) {
        return Err(ConfigError::File {
            path: path.into(),
            reason: "_base_ inheritance cycle".into(),
        });
    }
    stack.push(canon);
    let text = std::fs::read_to_string(path).map_err(|e| ConfigError::File {
        path: path.into(),
        reason: e.to_string(),
    })?;
    let mut own: Table = toml::from_str(&text).map_err(|e| ConfigError::File {
        path: path.into(),
        reason: format!("invalid TOML: {e}"),
    })?;
    let bases = match own.remove("_base_") {
        None => vec![],
        Some(Value::String(s)) => vec![s],
        Some(Value::Array(a)) => a
            .into_iter()
            .map(|v| {
                v.as_str()
                    .map(String::from)
                    .ok_or_else(|| ConfigError::File {
                        path: path.into(),
                        reason: "_base_ must list file paths".into(),
                    })
            })
            .collect::<Result<_, _>>()?,
        Some(_) => {
            return Err(ConfigError::File {
                path: path.into(),
                reason: "_base_ must be a path or a list of paths".into(),
            })
        }
    };
    let dir = path.parent().unwrap_or(Path::new("."));
    let mut merged = Table::new();
    for b in bases {
        let base = load_inner(&dir.join(&b), stack)?;
        merge(&mut merged, base);
    }
    merge(&mut merged, own);
    stack.pop();
    Ok(merged)
}

/// Merges `over` into `base` (see the module docs).
pub fn merge(base: &mut Table, over: Table) {
    for (k, v) in over {
        match (base.get_mut(&k), v) {
            (Some(Value::Table(bt)), Value::Table(mut ot)) => {
                if ot
                    .remove("_delete_")
                    .and_then(|d| d.as_bool())
                    .unwrap_or(false)
                {
                    strip_delete(&mut ot);
                    *bt = ot;
                } else {
                    merge(bt, ot);
                }
            }
            (_, Value::Table(mut ot)) => {
                ot.remove("_delete_");
                strip_delete(&mut ot);
                base.insert(k, Value::Table(ot));
            }
            (_, v) => {
                base.insert(k, v);
            }
        }
    }
}

fn strip_delete(t: &mut Table) {
    t.remove("_delete_");
    for (_, v) in t.iter_mut() {
        if let Value::Table(inner) = v {
            strip_delete(inner);
        }
    }
}

/// Parses an override value: a TOML value if it is one, else a plain string.
pub fn parse_value(v: &str) -> Value {
    let wrapped = format!("v = {v}");
    match toml::from_str::<Table>(&wrapped) {
        Ok(mut t) => t
            .remove("v")
            .unwrap_or_else(|| Value::String(v.to_string())),
        Err(_) => Value::String(v.to_string()),
    }
}

/// Applies one `key.path=value` override.
pub fn set(cfg: &mut Table, assignment: &str) -> Result<(), ConfigError> {
    let (key, value) = assignment
        .split_once('=')
        .ok_or_else(|| ConfigError::Override(format!("{assignment:?}: expected key.path=value")))?;
    let parts: Vec<&str> = key.trim().split('.').collect();
    if parts.iter().any(|p| p.is_empty()) {
        return Err(ConfigError::Override(format!(
            "{assignment:?}: empty key segment"
        )));
    }
    set_in_table(cfg, &parts, parse_value(value.trim()))
        .map_err(|e| ConfigError::Override(format!("{assignment:?}: {e}")))
}

fn set_in_table(t: &mut Table, parts: &[&str], value: Value) -> Result<(), String> {
    let (head, rest) = (parts[0], &parts[1..]);
    if rest.is_empty() {
        t.insert(head.to_string(), value);
        return Ok(());
    }
    let child = t
        .entry(head.to_string())
        .or_insert_with(|| Value::Table(Table::new()));
    set_in_value(child, head, rest, value)
}

fn set_in_value(v: &mut Value, name: &str, parts: &[&str], value: Value) -> Result<(), String> {
    match v {
        Value::Table(t) => set_in_table(t, parts, value),
        Value::Array(a) => {
            let idx: usize = parts[0].parse().map_err(|_| {
                format!(
                    "{name} is an array; index it with a number, not {:?}",
                    parts[0]
                )
            })?;
            let len = a.len();
            let slot = a
                .get_mut(idx)
                .ok_or_else(|| format!("index {idx} of {name} out of range (length {len})"))?;
            if parts.len() == 1 {
                *slot = value;
                Ok(())
            } else {
                set_in_value(slot, parts[0], &parts[1..], value)
            }
        }
        _ => Err(format!("{name} is not a table")),
    }
}

/// Loads `path` and applies `overrides` in order.
pub fn load_with_overrides(path: &Path, overrides: &[String]) -> Result<Table, ConfigError> {
    let mut cfg = load(path)?;
    for o in overrides {
        set(&mut cfg, o)?;
    }
    Ok(cfg)
}

/// Deserialises the table at `key` (e.g. `train_dataloader`) into `T`, naming the file and key on
/// error (unknown fields included, through `deny_unknown_fields`).
pub fn section<T: serde::de::DeserializeOwned>(
    cfg: &Table,
    key: &str,
    path: &Path,
) -> Result<T, ConfigError> {
    let v = cfg.get(key).ok_or_else(|| ConfigError::Invalid {
        path: path.into(),
        reason: format!("no [{key}] table"),
    })?;
    typed(v.clone(), key, path)
}

/// Deserialises `value` (found at the dotted key path `prefix`, empty for the whole file) into
/// `T`. The error names the file and the key path of the value at fault, written as `--set`
/// takes it (`test_dataloader.dataset: missing field `type``,
/// `model.bbox_head.init_cfg: this key is not supported`). Tables selected by `type` keep the
/// path where their enum uses [`densepred_core::deserialize_by_type`]; inside the others
/// (datasets, transforms, losses) the path ends at that table and the message names the key.
pub fn typed<T: serde::de::DeserializeOwned>(
    value: Value,
    prefix: &str,
    path: &Path,
) -> Result<T, ConfigError> {
    serde_path_to_error::deserialize(value).map_err(|e| {
        let mut key: Vec<String> = prefix
            .split('.')
            .filter(|s| !s.is_empty())
            .map(String::from)
            .collect();
        key.extend(densepred_core::config::dotted_path(e.path()));
        let (key, msg) = densepred_core::config::join_key_path(key, e.inner().message());
        let at = if key.is_empty() {
            String::new()
        } else {
            format!("{}: ", key.join("."))
        };
        ConfigError::Invalid {
            path: path.into(),
            reason: format!("{at}{msg}"),
        }
    })
}
