//! The training hooks (mmengine's `default_hooks`): each side effect of a training run is one
//! small hook that the train loop calls at fixed points, in order, without knowing what it does.
//!
//! | hook | mmengine | does |
//! |---|---|---|
//! | [`ParamSchedulerHook`] | `ParamSchedulerHook` | sets the learning rate of the next iteration from `param_scheduler` |
//! | [`IterTimerHook`] | `IterTimerHook` | data and iteration times, the progress bar |
//! | [`LoggerHook`] | `LoggerHook` | averages losses over `logger.interval`, writes `metrics.jsonl`, plots the curves |
//! | [`CheckpointHook`] | `CheckpointHook` | writes checkpoints every `checkpoint.interval` and at the end, keeps `max_keep_ckpts` |
//!
//! A new behaviour (EMA, a distributed sampler seed, early stopping) is a new hook, not a branch
//! in the loop. The loss check (mmengine's `CheckInvalidLossHook`) runs inside the train step,
//! before the backward pass, so that a diverged loss never reaches the weights.

use crate::curves::plot_curves;
use crate::optim::Optimizer;
use crate::runner::{BuiltModel, CandleContext, CheckpointHookConfig, EngineError};
use crate::schedule::{lr_at, SchedulerConfig};
use densepred_core::io::write_atomic;
use densepred_core::weights::save_safetensors_atomic;
use indicatif::ProgressBar;
use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// What the hooks see of a run in progress: counters, this iteration's outputs and the run's
/// results so far.
pub struct LoopState {
    /// Iterations done (the one in flight not counted before `after_train_iter`).
    pub iter: u64,
    /// Iterations per epoch (≥ 1).
    pub epoch_len: u64,
    /// Iterations of the whole run.
    pub max_iters: u64,
    /// Epoch-based loop (`EpochBasedTrainLoop`).
    pub by_epoch: bool,
    /// Learning rate of the iteration in flight.
    pub lr: f64,
    /// This iteration's losses by name, then `loss` (their sum).
    pub losses: Vec<(String, f64)>,
    /// Global gradient norm, when `clip_grad` computed it this iteration.
    pub grad_norm: Option<f64>,
    /// Seconds spent waiting for this iteration's batch.
    pub data_time: f64,
    /// Seconds of this iteration's step.
    pub iter_time: f64,
    /// The last validation metrics (mmdetection / mmsegmentation keys).
    pub last_val: Option<serde_json::Map<String, serde_json::Value>>,
    /// The last checkpoint written (weights file).
    pub last_checkpoint: Option<PathBuf>,
    /// The run's progress bar (hidden without `progress`); hooks print through
    /// `progress.suspend`.
    pub progress: ProgressBar,
}

impl LoopState {
    /// The epoch of the iteration just done (1-based).
    pub fn epoch(&self) -> u64 {
        self.iter.saturating_sub(1) / self.epoch_len + 1
    }

    /// Whether the iteration just done ended an epoch.
    pub fn epoch_end(&self) -> bool {
        self.iter % self.epoch_len == 0
    }
}

/// What a hook may use besides the state: the model, the optimizer and the work dir.
pub struct Runtime<'a> {
    /// The model being trained.
    pub model: &'a BuiltModel,
    /// Its optimizer.
    pub optimizer: &'a Optimizer,
    /// Output folder.
    pub work_dir: &'a Path,
    /// The resolved config (stored in checkpoints).
    pub table: &'a toml::Table,
}

/// A training hook. Every method has an empty default.
///
/// Errors: a hook's error stops the run with that error.
pub trait Hook {
    /// Before the first iteration (also of a resumed run).
    fn before_train(&mut self, _rt: &Runtime, _st: &mut LoopState) -> Result<(), EngineError> {
        Ok(())
    }
    /// Before the batch of the next iteration is fetched.
    fn before_fetch(&mut self, _st: &mut LoopState) {}
    /// After the batch arrived, before the step.
    fn before_train_iter(&mut self, _st: &mut LoopState) {}
    /// After the optimizer step; `st.iter` counts this iteration.
    fn after_train_iter(&mut self, _rt: &Runtime, _st: &mut LoopState) -> Result<(), EngineError> {
        Ok(())
    }
    /// After a validation pass with its report lines and its record (the metrics with `mode`,
    /// `iter` and `epoch`; `None`: nothing to evaluate).
    fn after_val(
        &mut self,
        _rt: &Runtime,
        _st: &mut LoopState,
        _metrics: Option<&(Vec<String>, serde_json::Map<String, serde_json::Value>)>,
    ) -> Result<(), EngineError> {
        Ok(())
    }
    /// After the last iteration.
    fn after_train(&mut self, _rt: &Runtime, _st: &mut LoopState) -> Result<(), EngineError> {
        Ok(())
    }
}

fn file_err(path: &Path, e: impl std::fmt::Display) -> EngineError {
    EngineError::File {
        path: path.to_path_buf(),
        reason: e.to_string(),
    }
}

/// mmengine's `ParamSchedulerHook`: the learning rate of each iteration from the schedulers
/// ([`lr_at`]).
pub struct ParamSchedulerHook {
    /// The `param_scheduler` list.
    pub schedulers: Vec<SchedulerConfig>,
    /// The optimizer's base rate (after `auto_scale_lr`).
    pub base_lr: f64,
}

impl Hook for ParamSchedulerHook {
    fn before_train_iter(&mut self, st: &mut LoopState) {
        st.lr = lr_at(
            &self.schedulers,
            self.base_lr,
            st.iter,
            st.epoch_len,
            st.max_iters,
        );
    }
}

/// mmengine's `IterTimerHook`: how long each iteration waited for data and how long its step
/// took; moves the progress bar.
#[derive(Default)]
pub struct IterTimerHook {
    fetch: Option<Instant>,
    step: Option<Instant>,
}

impl Hook for IterTimerHook {
    fn before_fetch(&mut self, _st: &mut LoopState) {
        self.fetch = Some(Instant::now());
    }
    fn before_train_iter(&mut self, st: &mut LoopState) {
        st.data_time = self.fetch.map_or(0.0, |t| t.elapsed().as_secs_f64());
        self.step = Some(Instant::now());
    }
    fn after_train_iter(&mut self, _rt: &Runtime, st: &mut LoopState) -> Result<(), EngineError> {
        st.iter_time = self.step.map_or(0.0, |t| t.elapsed().as_secs_f64());
        st.progress.inc(1);
        let loss = st.losses.last().map_or(f64::NAN, |l| l.1);
        st.progress
            .set_message(format!("loss {loss:.4} lr {:.2e}", st.lr));
        Ok(())
    }
}

fn memory_mb() -> f64 {
    memory_stats::memory_stats()
        .map(|m| m.physical_mem as f64 / 1048576.0)
        .unwrap_or(0.0)
}

/// mmengine's `LoggerHook`: one JSON line per `interval` iterations in `metrics.jsonl` (losses
/// averaged over the window, `lr`, `grad_norm`, `data_time`, `time`, `memory` in MiB), one per
/// validation, a terminal log line, and the loss / metric curves (`loss_curve.png`) at the end.
pub struct LoggerHook {
    interval: u64,
    path: PathBuf,
    file: std::fs::File,
    window: BTreeMap<String, (f64, u64)>,
}

impl LoggerHook {
    /// Appends to `work_dir/metrics.jsonl` every `interval` (≥ 1) iterations.
    ///
    /// Errors: the file cannot be opened.
    pub fn new(work_dir: &Path, interval: u64) -> Result<Self, EngineError> {
        let path = work_dir.join("metrics.jsonl");
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(|e| file_err(&path, e))?;
        Ok(Self {
            interval: interval.max(1),
            path,
            file,
            window: BTreeMap::new(),
        })
    }

    fn write(&mut self, v: serde_json::Value) -> Result<(), EngineError> {
        writeln!(self.file, "{v}").map_err(|e| file_err(&self.path, e))
    }
}

impl Hook for LoggerHook {
    fn after_train_iter(&mut self, _rt: &Runtime, st: &mut LoopState) -> Result<(), EngineError> {
        for (name, v) in &st.losses {
            let e = self.window.entry(name.clone()).or_insert((0.0, 0));
            e.0 += v;
            e.1 += 1;
        }
        if st.iter % self.interval != 0 && st.iter != st.max_iters {
            return Ok(());
        }
        let mut rec = serde_json::Map::new();
        rec.insert("mode".into(), "train".into());
        rec.insert("iter".into(), st.iter.into());
        rec.insert("epoch".into(), st.epoch().into());
        rec.insert("lr".into(), st.lr.into());
        for (k, (s, n)) in std::mem::take(&mut self.window) {
            rec.insert(k, (s / n as f64).into());
        }
        if let Some(n) = st.grad_norm {
            rec.insert("grad_norm".into(), n.into());
        }
        rec.insert("data_time".into(), st.data_time.into());
        rec.insert("time".into(), st.iter_time.into());
        rec.insert("memory".into(), memory_mb().round().into());
        tracing::info!(
            "epoch {} iter {}/{} lr {:.3e} loss {:.4} ({:.2} s/iter)",
            st.epoch(),
            st.iter,
            st.max_iters,
            st.lr,
            rec.get("loss").and_then(|v| v.as_f64()).unwrap_or(f64::NAN),
            st.iter_time
        );
        self.write(serde_json::Value::Object(rec))
    }

    fn after_val(
        &mut self,
        _rt: &Runtime,
        st: &mut LoopState,
        metrics: Option<&(Vec<String>, serde_json::Map<String, serde_json::Value>)>,
    ) -> Result<(), EngineError> {
        let Some((lines, rec)) = metrics else {
            return Ok(());
        };
        st.progress.suspend(|| {
            for l in lines {
                eprintln!("{l}");
            }
        });
        self.write(serde_json::Value::Object(rec.clone()))
    }

    fn after_train(&mut self, _rt: &Runtime, _st: &mut LoopState) -> Result<(), EngineError> {
        self.file.flush().map_err(|e| file_err(&self.path, e))?;
        let png = self.path.with_file_name("loss_curve.png");
        match plot_curves(&self.path, &png) {
            Ok(()) => tracing::info!("curves: {}", png.display()),
            Err(e) => tracing::warn!("could not draw the curves: {e}"),
        }
        Ok(())
    }
}

/// mmengine's `CheckpointHook`: every `interval` epochs (`by_epoch`) or iterations, and after the
/// last iteration, writes `epoch_N` / `iter_N` (`.safetensors` weights, `.optim.safetensors`
/// optimizer state, `.json` meta with the iteration, the config and the last validation
/// metrics), each file atomically, then points `last_checkpoint` at it; keeps the newest
/// `max_keep_ckpts`.
pub struct CheckpointHook {
    interval: u64,
    by_epoch: bool,
    max_keep: Option<usize>,
    kept: Vec<String>,
}

impl CheckpointHook {
    /// From `default_hooks.checkpoint` (absent: every epoch / iteration as the loop counts,
    /// all kept).
    pub fn new(cfg: Option<&CheckpointHookConfig>, loop_by_epoch: bool) -> Self {
        Self {
            interval: cfg.map_or(1, |c| c.interval).max(1),
            by_epoch: cfg.and_then(|c| c.by_epoch).unwrap_or(loop_by_epoch),
            max_keep: cfg
                .and_then(|c| c.max_keep_ckpts)
                .filter(|&m| m > 0)
                .map(|m| m as usize),
            kept: Vec::new(),
        }
    }
}

impl Hook for CheckpointHook {
    fn after_train_iter(&mut self, rt: &Runtime, st: &mut LoopState) -> Result<(), EngineError> {
        let due = if self.by_epoch {
            st.epoch_end() && (st.iter / st.epoch_len) % self.interval == 0
        } else {
            st.iter % self.interval == 0
        };
        if !due && st.iter != st.max_iters {
            return Ok(());
        }
        let stem = if self.by_epoch && st.epoch_end() {
            format!("epoch_{}", st.iter / st.epoch_len)
        } else {
            format!("iter_{}", st.iter)
        };
        let meta = serde_json::json!({
            "iter": st.iter, "epoch": st.iter / st.epoch_len, "config": rt.table,
            "optimizer": format!("{stem}.optim.safetensors"), "metrics": st.last_val,
        });
        st.last_checkpoint = Some(save_checkpoint(
            rt.work_dir,
            &stem,
            rt.model,
            rt.optimizer,
            meta,
        )?);
        if !self.kept.contains(&stem) {
            self.kept.push(stem);
        }
        if let Some(max_keep) = self.max_keep {
            while self.kept.len() > max_keep {
                let old = self.kept.remove(0);
                for ext in ["safetensors", "optim.safetensors", "json"] {
                    let _ = std::fs::remove_file(rt.work_dir.join(format!("{old}.{ext}")));
                }
            }
        }
        Ok(())
    }
}

/// Writes `stem.safetensors` (weights), `stem.optim.safetensors` and `stem.json` (meta), each
/// atomically, then points `last_checkpoint` at it. Returns the weights file.
///
/// Errors: a file that cannot be written (named).
pub fn save_checkpoint(
    work_dir: &Path,
    stem: &str,
    model: &BuiltModel,
    opt: &Optimizer,
    meta: serde_json::Value,
) -> Result<PathBuf, EngineError> {
    let weights: BTreeMap<String, candle_core::Tensor> = model
        .vars
        .named_vars()
        .into_iter()
        .map(|(k, v)| (k, v.as_tensor().clone()))
        .collect();
    let wpath = work_dir.join(format!("{stem}.safetensors"));
    save_safetensors_atomic(&weights, &wpath).map_err(|e| file_err(&wpath, e))?;
    let opath = work_dir.join(format!("{stem}.optim.safetensors"));
    save_safetensors_atomic(&opt.state_tensors().ctx("optimizer state")?, &opath)
        .map_err(|e| file_err(&opath, e))?;
    let mpath = work_dir.join(format!("{stem}.json"));
    let text = serde_json::to_string_pretty(&meta).map_err(|e| file_err(&mpath, e))?;
    write_atomic(&mpath, |p| {
        std::fs::write(p, &text).map_err(|e| e.to_string())
    })
    .map_err(|e| file_err(&mpath, e))?;
    let last = work_dir.join("last_checkpoint");
    write_atomic(&last, |p| {
        std::fs::write(p, format!("{stem}\n")).map_err(|e| e.to_string())
    })
    .map_err(|e| file_err(&last, e))?;
    Ok(wpath)
}
