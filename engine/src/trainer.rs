//! The training loop (mmengine's `EpochBasedTrainLoop` / `IterBasedTrainLoop` with the default
//! hooks) for detectors and segmentors: seeded and deterministic on CPU, logging to
//! `metrics.jsonl`, atomic checkpoints, resume, periodic validation (COCO bbox mAP or mIoU) and
//! the final curve plot.

use crate::curves::plot_curves;
use crate::optim::{param_groups, Optimizer};
use crate::runner::*;
use crate::schedule::lr_at;
use crate::tester::{progress_bar, validate};
use candle_core::{Device, Tensor};
use densepred_core::io::write_atomic;
use densepred_core::weights::{read_checkpoint, save_safetensors_atomic};
use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

/// How to run [`train`].
#[derive(Clone)]
pub struct TrainOptions {
    /// Output folder (checkpoints, metrics, curves, resolved config).
    pub work_dir: PathBuf,
    /// Continue from `work_dir/last_checkpoint`.
    pub resume: bool,
    /// Weights to start from (overrides the config's `load_from`).
    pub load_from: Option<PathBuf>,
    /// Device of the model.
    pub device: Device,
    /// Draw progress bars.
    pub progress: bool,
    /// Set to stop after the current iteration (Ctrl-C).
    pub interrupt: Option<Arc<AtomicBool>>,
}

/// What a finished run returns.
pub struct TrainSummary {
    /// Iterations done in total.
    pub iters: u64,
    /// The last checkpoint written.
    pub last_checkpoint: Option<PathBuf>,
    /// The last validation metrics (mmdetection keys).
    pub last_val: Option<serde_json::Map<String, serde_json::Value>>,
}

fn mix(a: u64, b: u64) -> u64 {
    let mut z = a ^ b.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

fn file_err(path: &Path, e: impl std::fmt::Display) -> EngineError {
    EngineError::File {
        path: path.to_path_buf(),
        reason: e.to_string(),
    }
}

fn memory_mb() -> f64 {
    memory_stats::memory_stats()
        .map(|m| m.physical_mem as f64 / 1048576.0)
        .unwrap_or(0.0)
}

/// Writes `stem.safetensors` (weights), `stem.optim.safetensors` and `stem.json` (meta), each
/// atomically, then points `last_checkpoint` at it.
fn save_checkpoint(
    work_dir: &Path,
    stem: &str,
    model: &BuiltModel,
    opt: &Optimizer,
    meta: serde_json::Value,
) -> Result<PathBuf, EngineError> {
    let weights: BTreeMap<String, Tensor> = model
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

/// Trains the detector or segmentor of `cfg` (`table` is the resolved config, stored in checkpoints and the
/// work dir).
///
/// Errors: config, data, model, I/O errors (naming the file / key); [`EngineError::Interrupted`]
/// when `interrupt` was raised (after the iteration in flight; checkpoints stay intact).
pub fn train(
    cfg: &RunConfig,
    table: &toml::Table,
    opts: &TrainOptions,
) -> Result<TrainSummary, EngineError> {
    let seed = cfg.seed();
    let dev = &opts.device;
    let wd = &opts.work_dir;
    std::fs::create_dir_all(wd).map_err(|e| file_err(wd, e))?;
    let cfg_text = toml::to_string(table).map_err(|e| EngineError::Config(e.to_string()))?;
    let cfg_path = wd.join("config.toml");
    write_atomic(&cfg_path, |p| {
        std::fs::write(p, &cfg_text).map_err(|e| e.to_string())
    })
    .map_err(|e| file_err(&cfg_path, e))?;

    let train_dl = cfg
        .train_dataloader
        .as_ref()
        .ok_or_else(|| EngineError::Config("train_dataloader is required for training".into()))?;
    let loop_cfg = cfg
        .train_cfg
        .as_ref()
        .ok_or_else(|| EngineError::Config("train_cfg is required for training".into()))?;
    let ow = cfg
        .optim_wrapper
        .as_ref()
        .ok_or_else(|| EngineError::Config("optim_wrapper is required for training".into()))?;
    if ow.kind != "OptimWrapper" {
        return Err(EngineError::Config(format!(
            "optim_wrapper.type {:?} is not supported (OptimWrapper)",
            ow.kind
        )));
    }
    let accum = ow.accumulative_counts.max(1) as u64;

    let model = build_model(&cfg.model, seed, dev)?;
    let Loader { loader, dataset } = build_loader(train_dl, seed, true)?;
    let classes = &dataset.metainfo().classes;
    if classes.len() != model.num_classes() {
        return Err(EngineError::Config(format!(
            "{} = {} but the training set has {} classes",
            model.num_classes_key(),
            model.num_classes(),
            classes.len()
        )));
    }
    let epoch_len = loader.num_batches() as u64;
    if epoch_len == 0 {
        return Err(EngineError::Config(
            "the training set yields no batch".into(),
        ));
    }
    let by_epoch = match loop_cfg.kind.as_str() {
        "EpochBasedTrainLoop" => true,
        "IterBasedTrainLoop" => false,
        o => {
            return Err(EngineError::Config(format!(
                "train_cfg.type {o:?}: expected EpochBasedTrainLoop or IterBasedTrainLoop"
            )))
        }
    };
    let max_iters = if by_epoch {
        loop_cfg
            .max_epochs
            .ok_or_else(|| EngineError::Config("train_cfg.max_epochs is required".into()))?
            * epoch_len
    } else {
        loop_cfg
            .max_iters
            .ok_or_else(|| EngineError::Config("train_cfg.max_iters is required".into()))?
    };

    let mut opt_cfg = ow.optimizer.clone();
    if let Some(a) = cfg.auto_scale_lr.as_ref().filter(|a| a.enable) {
        let scaled = opt_cfg.lr() * (train_dl.batch_size as f64) / (a.base_batch_size as f64);
        tracing::info!(
            "auto_scale_lr: lr {} → {scaled} (batch {} / base {})",
            opt_cfg.lr(),
            train_dl.batch_size,
            a.base_batch_size
        );
        opt_cfg.set_lr(scaled);
    }
    let base_lr = opt_cfg.lr();
    let mut opt = Optimizer::new(
        opt_cfg,
        param_groups(
            model.vars.named_vars(),
            ow.paramwise_cfg.as_ref(),
            &|_| false,
            &[],
        ),
    );
    tracing::info!(
        "{} parameters in {} trainable tensors",
        model.vars.num_parameters(),
        opt.params.len()
    );

    let mut start_iter = 0u64;
    if opts.resume {
        let last = wd.join("last_checkpoint");
        match std::fs::read_to_string(&last) {
            Ok(stem) => {
                let stem = stem.trim();
                let w = wd.join(format!("{stem}.safetensors"));
                load_weights(&model, &w, true)?;
                let o = wd.join(format!("{stem}.optim.safetensors"));
                let state = read_checkpoint(&o).map_err(|e| file_err(&o, e))?;
                opt.load_state(&state).ctx("restoring optimizer state")?;
                let m = wd.join(format!("{stem}.json"));
                let meta: serde_json::Value = serde_json::from_str(
                    &std::fs::read_to_string(&m).map_err(|e| file_err(&m, e))?,
                )
                .map_err(|e| file_err(&m, e))?;
                start_iter = meta["iter"]
                    .as_u64()
                    .ok_or_else(|| file_err(&m, "no `iter` field"))?;
                tracing::info!("resumed from {} at iteration {start_iter}", w.display());
            }
            Err(_) => tracing::warn!("--resume: no {} yet, starting from scratch", last.display()),
        }
    } else if let Some(p) = opts.load_from.as_ref().or(cfg.load_from.as_ref()) {
        let report = load_weights(&model, p, false)?;
        tracing::info!(
            "load_from {}: {} tensors loaded, {} missing, {} unexpected",
            p.display(),
            report.loaded.len(),
            report.missing.len(),
            report.unexpected.len()
        );
        tracing::debug!("{report}");
    }

    let val = match (&cfg.val_dataloader, &cfg.val_evaluator) {
        (Some(d), Some(e)) if loop_cfg.val_interval > 0 => {
            Some((build_loader(d, seed, false)?, e.clone()))
        }
        _ => None,
    };
    let ckpt = cfg.default_hooks.checkpoint.clone();
    let ckpt_by_epoch = ckpt.as_ref().and_then(|c| c.by_epoch).unwrap_or(by_epoch);
    let log_interval = cfg
        .default_hooks
        .logger
        .as_ref()
        .map(|l| l.interval)
        .unwrap_or(50)
        .max(1);
    let metrics_path = wd.join("metrics.jsonl");
    let mut metrics = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&metrics_path)
        .map_err(|e| file_err(&metrics_path, e))?;
    let mut log = |v: serde_json::Value| -> Result<(), EngineError> {
        writeln!(metrics, "{v}").map_err(|e| file_err(&metrics_path, e))
    };

    let pb = progress_bar(max_iters, opts.progress, "train");
    pb.set_position(start_iter);
    let mut last_checkpoint = None;
    let mut last_val = None;
    let mut kept: Vec<String> = Vec::new();
    let mut window: BTreeMap<String, (f64, u64)> = BTreeMap::new();
    let mut grads: Option<candle_core::backprop::GradStore> = None;
    let mut it = start_iter;
    let mut t_data = Instant::now();
    'outer: while it < max_iters {
        let epoch = it / epoch_len;
        let skip = (it % epoch_len) as usize;
        let epoch_start = it;
        for batch in loader.epoch_from(epoch, skip) {
            if it >= max_iters {
                break 'outer;
            }
            let data_time = t_data.elapsed().as_secs_f64();
            let t_iter = Instant::now();
            let batch = to_batch(&model, batch?, dev, true)?;
            let lr = lr_at(&cfg.param_scheduler, base_lr, it, epoch_len, max_iters);
            densepred_core::rng::seed(mix(seed, it));
            let losses = model.loss(&batch).map_err(|e| match e {
                EngineError::Candle { context, source } => EngineError::Candle {
                    context: format!("iteration {}: {context}", it + 1),
                    source,
                },
                o => o,
            })?;
            let mut total: Option<Tensor> = None;
            for (name, v) in &losses {
                let f = v.to_scalar::<f32>().ctx("loss value")? as f64;
                if !f.is_finite() {
                    return Err(EngineError::Config(format!(
                        "iteration {}: {name} is {f} (diverged); lower the learning rate",
                        it + 1
                    )));
                }
                let e = window.entry(name.clone()).or_insert((0.0, 0));
                e.0 += f;
                e.1 += 1;
                total = Some(match total {
                    None => v.clone(),
                    Some(t) => (t + v).ctx("loss sum")?,
                });
            }
            let total =
                total.ok_or_else(|| EngineError::Config("the model returned no loss".into()))?;
            let total_v = total.to_scalar::<f32>().ctx("loss value")? as f64;
            let e = window.entry("loss".into()).or_insert((0.0, 0));
            e.0 += total_v;
            e.1 += 1;
            let scaled = if accum > 1 {
                (total / accum as f64).ctx("loss scale")?
            } else {
                total
            };
            let g = scaled
                .backward()
                .ctx(&format!("iteration {}: backward", it + 1))?;
            grads = Some(match grads.take() {
                None => g,
                Some(mut acc) => {
                    for p in &opt.params {
                        if let Some(new) = g.get(p.var.as_tensor()) {
                            let sum = match acc.get(p.var.as_tensor()) {
                                Some(old) => (old + new).ctx("gradient accumulation")?,
                                None => new.clone(),
                            };
                            acc.insert(p.var.as_tensor(), sum);
                        }
                    }
                    acc
                }
            });
            let mut grad_norm = None;
            if (it + 1) % accum == 0 || it + 1 == max_iters {
                let gs = grads.take().expect("set above");
                let mut scale = 1.0;
                if let Some(c) = &ow.clip_grad {
                    let n = opt.grad_norm(&gs).ctx("gradient norm")?;
                    grad_norm = Some(n);
                    if n > c.max_norm {
                        scale = c.max_norm / (n + 1e-6);
                    }
                }
                opt.step(&gs, lr, scale).ctx("optimizer step")?;
            }
            it += 1;
            pb.inc(1);
            pb.set_message(format!("loss {total_v:.4} lr {lr:.2e}"));
            let iter_time = t_iter.elapsed().as_secs_f64();
            if it % log_interval == 0 || it == max_iters {
                let mut rec = serde_json::Map::new();
                rec.insert("mode".into(), "train".into());
                rec.insert("iter".into(), it.into());
                rec.insert("epoch".into(), (epoch + 1).into());
                rec.insert("lr".into(), lr.into());
                for (k, (s, n)) in std::mem::take(&mut window) {
                    rec.insert(k, (s / n as f64).into());
                }
                if let Some(n) = grad_norm {
                    rec.insert("grad_norm".into(), n.into());
                }
                rec.insert("data_time".into(), data_time.into());
                rec.insert("time".into(), iter_time.into());
                rec.insert("memory".into(), memory_mb().round().into());
                tracing::info!(
                    "epoch {} iter {it}/{max_iters} lr {lr:.3e} loss {:.4} ({:.2} s/iter)",
                    epoch + 1,
                    rec["loss"].as_f64().unwrap_or(f64::NAN),
                    iter_time
                );
                log(serde_json::Value::Object(rec))?;
            }
            let epoch_end = it % epoch_len == 0;
            let interval = ckpt.as_ref().map(|c| c.interval).unwrap_or(1).max(1);
            let save = if ckpt_by_epoch {
                epoch_end && (it / epoch_len) % interval == 0
            } else {
                it % interval == 0
            };
            if save || it == max_iters {
                let stem = if ckpt_by_epoch && epoch_end {
                    format!("epoch_{}", it / epoch_len)
                } else {
                    format!("iter_{it}")
                };
                let meta = serde_json::json!({
                    "iter": it, "epoch": it / epoch_len, "config": table,
                    "optimizer": format!("{stem}.optim.safetensors"), "metrics": last_val,
                });
                last_checkpoint = Some(save_checkpoint(wd, &stem, &model, &opt, meta)?);
                if !kept.contains(&stem) {
                    kept.push(stem);
                }
                if let Some(max_keep) = ckpt
                    .as_ref()
                    .and_then(|c| c.max_keep_ckpts)
                    .filter(|&m| m > 0)
                {
                    while kept.len() > max_keep as usize {
                        let old = kept.remove(0);
                        for ext in ["safetensors", "optim.safetensors", "json"] {
                            let _ = std::fs::remove_file(wd.join(format!("{old}.{ext}")));
                        }
                    }
                }
            }
            let do_val = match &val {
                Some(_) if by_epoch => {
                    epoch_end
                        && (it / epoch_len) % loop_cfg.val_interval == 0
                        && it / epoch_len >= loop_cfg.val_begin
                }
                Some(_) => it % loop_cfg.val_interval == 0 && it >= loop_cfg.val_begin,
                None => false,
            } || (val.is_some() && it == max_iters);
            if do_val {
                let (
                    Loader {
                        loader: vl,
                        dataset: vd,
                    },
                    ev,
                ) = val.as_ref().expect("checked");
                pb.suspend(|| tracing::info!("evaluating on {} images", vd.len()));
                if let Some((lines, mut rec)) = validate(&model, vl, vd.as_ref(), ev, dev)? {
                    pb.suspend(|| {
                        for l in &lines {
                            eprintln!("{l}");
                        }
                    });
                    rec.insert("mode".into(), "val".into());
                    rec.insert("iter".into(), it.into());
                    rec.insert("epoch".into(), (it.div_ceil(epoch_len)).into());
                    log(serde_json::Value::Object(rec.clone()))?;
                    last_val = Some(rec);
                }
            }
            if opts
                .interrupt
                .as_ref()
                .is_some_and(|f| f.load(Ordering::SeqCst))
            {
                pb.abandon();
                return Err(EngineError::Interrupted);
            }
            t_data = Instant::now();
        }
        if it == epoch_start && it < max_iters {
            // Defensive: the loader reports every failure as an error, so an epoch that ends
            // without a batch would otherwise restart forever.
            return Err(EngineError::Data(densepred_datasets::DataError::Loader(
                format!("epoch {} yielded no batch", epoch + 1),
            )));
        }
    }
    pb.finish_and_clear();
    drop(log);
    let png = wd.join("loss_curve.png");
    match plot_curves(&metrics_path, &png) {
        Ok(()) => tracing::info!("curves: {}", png.display()),
        Err(e) => tracing::warn!("could not draw the curves: {e}"),
    }
    Ok(TrainSummary {
        iters: it,
        last_checkpoint,
        last_val,
    })
}
