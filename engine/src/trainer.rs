//! The training loop (mmengine's `EpochBasedTrainLoop` / `IterBasedTrainLoop` with the default
//! hooks) for detectors and segmentors: seeded and deterministic on CPU, logging to
//! `metrics.jsonl`, atomic checkpoints, resume, periodic validation (COCO bbox mAP or mIoU) and
//! the final curve plot.

use crate::hooks::{
    CheckpointHook, Hook, IterTimerHook, LoggerHook, LoopState, ParamSchedulerHook,
};
use crate::loops::TrainLoop;
use crate::optim::{param_groups, Optimizer};
use crate::runner::*;
use crate::tester::progress_bar;
use candle_core::Device;
use densepred_core::io::write_atomic;
use densepred_core::weights::read_checkpoint;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

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
    /// The data-parallel run this process belongs to (`None`: a single process). Every rank
    /// loads its shard of each epoch, starts from rank 0's weights and averages its gradients
    /// with the others before each optimizer step; only rank 0 writes the work dir and runs the
    /// validation.
    pub dist: Option<Arc<crate::dist::Dist>>,
}

impl TrainOptions {
    /// A fresh single-process run on the CPU writing to `work_dir`: no resume, no extra
    /// weights, no progress bars, no interrupt flag (the fields a caller usually changes are
    /// public).
    pub fn new(work_dir: impl Into<PathBuf>) -> Self {
        TrainOptions {
            work_dir: work_dir.into(),
            resume: false,
            load_from: None,
            device: Device::Cpu,
            progress: false,
            interrupt: None,
            dist: None,
        }
    }
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

fn file_err(path: &Path, e: impl std::fmt::Display) -> EngineError {
    EngineError::File {
        path: path.to_path_buf(),
        reason: e.to_string(),
    }
}

/// Whether `train_cfg` counts epochs, and the run's length in iterations (`epoch_len`
/// iterations an epoch), as mmengine's `EpochBasedTrainLoop` / `IterBasedTrainLoop`.
///
/// Errors: another loop type, or its length key missing (named).
fn loop_length(loop_cfg: &TrainLoopConfig, epoch_len: u64) -> Result<(bool, u64), EngineError> {
    let missing = |k: &str| EngineError::Config(format!("train_cfg.{k} is required"));
    match loop_cfg.kind.as_str() {
        "EpochBasedTrainLoop" => Ok((
            true,
            loop_cfg.max_epochs.ok_or_else(|| missing("max_epochs"))? * epoch_len,
        )),
        "IterBasedTrainLoop" => Ok((
            false,
            loop_cfg.max_iters.ok_or_else(|| missing("max_iters"))?,
        )),
        o => Err(EngineError::Config(format!(
            "train_cfg.type {o:?}: expected EpochBasedTrainLoop or IterBasedTrainLoop"
        ))),
    }
}

/// `--resume`: restores the weights, the optimizer state and the iteration of the checkpoint
/// `work_dir/last_checkpoint` names, and returns that iteration (0, with a warning, when there is
/// no checkpoint yet).
///
/// Errors: a named checkpoint file that is missing or unreadable (named).
fn resume(model: &BuiltModel, opt: &mut Optimizer, wd: &Path) -> Result<u64, EngineError> {
    let last = wd.join("last_checkpoint");
    let Ok(stem) = std::fs::read_to_string(&last) else {
        tracing::warn!("--resume: no {} yet, starting from scratch", last.display());
        return Ok(0);
    };
    let stem = stem.trim();
    let w = wd.join(format!("{stem}.safetensors"));
    load_weights(model, &w, true)?;
    let o = wd.join(format!("{stem}.optim.safetensors"));
    let state = read_checkpoint(&o).map_err(|e| file_err(&o, e))?;
    opt.load_state(&state).ctx("restoring optimizer state")?;
    let m = wd.join(format!("{stem}.json"));
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&m).map_err(|e| file_err(&m, e))?)
            .map_err(|e| file_err(&m, e))?;
    let iter = meta["iter"]
        .as_u64()
        .ok_or_else(|| file_err(&m, "no `iter` field"))?;
    tracing::info!("resumed from {} at iteration {iter}", w.display());
    Ok(iter)
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
    let wd = &opts.work_dir;
    let single = Arc::new(crate::dist::Dist::single());
    let dist = opts.dist.as_ref().unwrap_or(&single);
    // Several ranks on CUDA: one GPU per rank (its local rank), NCCL between them.
    let dev = &dist.rank_device(opts.device.clone())?;
    let main = dist.is_main();
    if main {
        std::fs::create_dir_all(wd).map_err(|e| file_err(wd, e))?;
        let cfg_text = toml::to_string(table).map_err(|e| EngineError::Config(e.to_string()))?;
        let cfg_path = wd.join("config.toml");
        write_atomic(&cfg_path, |p| {
            std::fs::write(p, &cfg_text).map_err(|e| e.to_string())
        })
        .map_err(|e| file_err(&cfg_path, e))?;
    }

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
    let Loader {
        mut loader,
        dataset,
    } = build_loader(train_dl, seed, true)?;
    loader.shard = densepred_datasets::loader::Shard::train(dist.rank, dist.world);
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
    let (by_epoch, max_iters) = loop_length(loop_cfg, epoch_len)?;

    let mut opt_cfg = ow.optimizer.clone();
    if let Some(a) = cfg.auto_scale_lr.as_ref().filter(|a| a.enable) {
        // mmengine scales by the total batch: per-rank batch × ranks.
        let total = train_dl.batch_size * dist.world;
        let scaled = opt_cfg.lr() * (total as f64) / (a.base_batch_size as f64);
        tracing::info!(
            "auto_scale_lr: lr {} → {scaled} (batch {total} / base {})",
            opt_cfg.lr(),
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

    let start_iter = if opts.resume {
        resume(&model, &mut opt, wd)?
    } else {
        if let Some(p) = opts.load_from.as_ref().or(cfg.load_from.as_ref()) {
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
        0
    };

    dist.broadcast_vars(&model.vars)?;
    let val = match (&cfg.val_dataloader, &cfg.val_evaluator) {
        // Every rank validates its shard; rank 0 gathers and evaluates.
        (Some(d), Some(e)) if loop_cfg.val_interval > 0 => {
            Some((build_loader(d, seed, false)?, e.clone()))
        }
        _ => None,
    };
    let mut hooks: Vec<Box<dyn Hook>> = vec![
        Box::new(ParamSchedulerHook {
            schedulers: cfg.param_scheduler.clone(),
            base_lr,
        }),
        Box::new(IterTimerHook::default()),
    ];
    if main {
        hooks.push(Box::new(LoggerHook::new(
            wd,
            cfg.default_hooks.logger.as_ref().map_or(50, |l| l.interval),
        )?));
        hooks.push(Box::new(CheckpointHook::new(
            cfg.default_hooks.checkpoint.as_ref(),
            by_epoch,
        )));
    }
    let mut st = LoopState {
        iter: start_iter,
        epoch_len,
        max_iters,
        by_epoch,
        lr: base_lr,
        losses: Vec::new(),
        grad_norm: None,
        data_time: 0.0,
        iter_time: 0.0,
        last_val: None,
        last_checkpoint: None,
        progress: progress_bar(max_iters, opts.progress && main, "train"),
    };
    st.progress.set_position(start_iter);
    let train_loop = TrainLoop {
        loader: &loader,
        val: val.as_ref().map(|(l, e)| (l, e, loop_cfg)),
        accumulate: accum,
        clip_grad: ow.clip_grad.as_ref().map(|c| c.max_norm),
        seed,
        device: dev,
        interrupt: opts.interrupt.as_deref(),
        dist,
    };
    train_loop.run(&model, &mut opt, table, wd, &mut hooks, &mut st)?;
    Ok(TrainSummary {
        iters: st.iter,
        last_checkpoint: st.last_checkpoint,
        last_val: st.last_val,
    })
}
