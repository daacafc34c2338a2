//! The whole-file run config (mmengine's `Runner` fields) and the pieces every loop needs: model
//! building, weight loading, data loaders, batches → model inputs.

use crate::optim::OptimWrapperConfig;
use crate::schedule::SchedulerConfig;
use candle_core::{DType, Device, Tensor};
use densepred_backbones::AnyBackbone;
use densepred_core::config::defaults as d;
use densepred_core::params::SeededVarMap;
use densepred_core::structures::{BitmapMasks, GtInstances, ImageMeta};
use densepred_core::weights::{load_into, read_checkpoint, LoadReport};
use densepred_datasets::config::{DataloaderConfig, Empty, Unsupported};
use densepred_datasets::loader::{
    aspect_ratio_groups, collate_to, Batch, DataLoader, Normalization,
};
use densepred_datasets::{Dataset, Sample};
use densepred_models::{Detector, ModelConfig, Segmentor, STATE_DICT_PREFIXES};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Errors of the engine, naming the file or config key at fault.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// A config value is missing or wrong.
    #[error("config: {0}")]
    Config(String),
    /// Reading or writing a file failed.
    #[error("{path}: {reason}")]
    File {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        reason: String,
    },
    /// Data loading failed.
    #[error(transparent)]
    Data(#[from] densepred_datasets::DataError),
    /// Evaluation failed.
    #[error(transparent)]
    Eval(#[from] densepred_evaluation::EvalError),
    /// A tensor operation failed.
    #[error("{context}: {source}")]
    Candle {
        /// What was being done.
        context: String,
        /// The candle error.
        source: candle_core::Error,
    },
    /// Training was interrupted (Ctrl-C); the last checkpoint is intact.
    #[error("interrupted")]
    Interrupted,
}

/// Adds context to candle errors.
pub trait CandleContext<T> {
    /// Wraps the error with `context`.
    fn ctx(self, context: &str) -> Result<T, EngineError>;
}

impl<T> CandleContext<T> for candle_core::Result<T> {
    fn ctx(self, context: &str) -> Result<T, EngineError> {
        self.map_err(|source| EngineError::Candle {
            context: context.to_string(),
            source,
        })
    }
}

/// `train_cfg` (mmengine's loops).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainLoopConfig {
    /// `"EpochBasedTrainLoop"` or `"IterBasedTrainLoop"`.
    #[serde(rename = "type")]
    pub kind: String,
    /// Epochs (epoch-based).
    #[serde(default)]
    pub max_epochs: Option<u64>,
    /// Iterations (iteration-based).
    #[serde(default)]
    pub max_iters: Option<u64>,
    /// Evaluate every this many epochs (epoch-based) or iterations (iteration-based); 0 = never.
    #[serde(default = "d::one_u64")]
    pub val_interval: u64,
    /// First epoch / iteration at which validation may run.
    #[serde(default)]
    pub val_begin: u64,
}

/// `val_evaluator` / `test_evaluator`: mmdetection's `CocoMetric` (detectors) or mmsegmentation's
/// `IoUMetric` (segmentors).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EvaluatorConfig {
    /// `"CocoMetric"` or `"IoUMetric"`.
    #[serde(rename = "type")]
    pub kind: String,
    /// Ground-truth instances JSON (`CocoMetric`, required there).
    #[serde(default)]
    pub ann_file: Option<PathBuf>,
    /// `IoUMetric`: `["mIoU"]` (`mDice` and `mFscore` are not implemented).
    #[serde(default)]
    pub iou_metrics: Option<Vec<String>>,
    /// `IoUMetric`: label excluded from the counts (default 255).
    #[serde(default)]
    pub ignore_index: Option<u8>,
    /// `IoUMetric`'s `nan_to_num`: not supported (classes absent from both the predictions and
    /// the ground truth stay NaN and are left out of the means, mmseg's default).
    #[serde(default)]
    pub nan_to_num: Option<Unsupported>,
    /// `"bbox"`, `"segm"` or a list.
    #[serde(default)]
    pub metric: Option<toml::Value>,
    /// Print the per-class AP table.
    #[serde(default = "d::yes")]
    pub classwise: bool,
    /// Only write results (no evaluation).
    #[serde(default)]
    pub format_only: bool,
    /// Write `<prefix>.bbox.json`.
    #[serde(default)]
    pub outfile_prefix: Option<PathBuf>,
    /// Only `{}` (files on the local disk), as mmdetection's default.
    #[serde(default)]
    pub backend_args: Option<Empty>,
}

/// `default_hooks.checkpoint`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckpointHookConfig {
    /// `"CheckpointHook"`.
    #[serde(rename = "type", default)]
    pub kind: Option<String>,
    /// Save every this many epochs (`by_epoch`) or iterations.
    #[serde(default = "d::one_u64")]
    pub interval: u64,
    /// Count epochs (default: as the train loop).
    #[serde(default)]
    pub by_epoch: Option<bool>,
    /// Keep only the newest N checkpoints (−1: all).
    #[serde(default)]
    pub max_keep_ckpts: Option<i64>,
    /// Not supported (every `interval` checkpoint is kept, up to `max_keep_ckpts`).
    #[serde(default)]
    pub save_best: Option<Unsupported>,
}

/// `default_hooks.logger`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoggerHookConfig {
    /// `"LoggerHook"`.
    #[serde(rename = "type", default)]
    pub kind: Option<String>,
    /// Log every this many iterations.
    #[serde(default = "fifty")]
    pub interval: u64,
}

fn fifty() -> u64 {
    50
}

/// `default_hooks`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DefaultHooks {
    /// Checkpoint saving.
    #[serde(default)]
    pub checkpoint: Option<CheckpointHookConfig>,
    /// Logging.
    #[serde(default)]
    pub logger: Option<LoggerHookConfig>,
    /// `IterTimerHook`: the iteration and data times are always in the logs.
    #[serde(default)]
    pub timer: Option<StandardHook>,
    /// `ParamSchedulerHook`: the `param_scheduler` list is always applied.
    #[serde(default)]
    pub param_scheduler: Option<StandardHook>,
    /// `DistSamplerSeedHook`: the sampler's order is always drawn from `(seed, epoch)`.
    #[serde(default)]
    pub sampler_seed: Option<StandardHook>,
    /// `DetVisualizationHook` / `SegVisualizationHook` without drawing (their default); drawn
    /// predictions come from `densepred test --show-dir` / `--out-dir`.
    #[serde(default)]
    pub visualization: Option<StandardHook>,
}

/// A `default_hooks` entry whose behaviour densepred always has (or, for the visualization hooks
/// without `draw`, never needs): only the standard `type` is accepted, with no other key.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", deny_unknown_fields)]
pub enum StandardHook {
    /// mmengine's `IterTimerHook`.
    IterTimerHook {},
    /// mmengine's `ParamSchedulerHook`.
    ParamSchedulerHook {},
    /// mmengine's `DistSamplerSeedHook`.
    DistSamplerSeedHook {},
    /// mmdetection's `DetVisualizationHook` (no `draw`).
    DetVisualizationHook {},
    /// mmsegmentation's `SegVisualizationHook` (no `draw`).
    SegVisualizationHook {},
}

/// `val_cfg` / `test_cfg`: mmengine's loops, the only ones there are.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", deny_unknown_fields)]
pub enum EvalLoopConfig {
    /// mmengine's `ValLoop`.
    ValLoop {},
    /// mmengine's `TestLoop`.
    TestLoop {},
}

/// `log_level`: mmengine's logger level; densepred's terminal log shows `INFO` and above
/// (`RUST_LOG` changes it), so only `"INFO"` is accepted.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub enum LogLevel {
    /// The default.
    #[serde(rename = "INFO")]
    Info,
}

/// `auto_scale_lr`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AutoScaleLr {
    /// Scale the lr by `total batch / base_batch_size`.
    #[serde(default)]
    pub enable: bool,
    /// The batch size the config's lr was tuned for.
    pub base_batch_size: usize,
}

/// `randomness`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Randomness {
    /// Seed of weights, data order, augmentations and stochastic layers.
    #[serde(default)]
    pub seed: Option<u64>,
    /// Accepted: CPU runs are deterministic for a seed with either value.
    #[serde(default)]
    pub deterministic: bool,
    /// Not supported (training runs in one process: there is one rank to seed).
    #[serde(default)]
    pub diff_rank_seed: Option<Unsupported>,
}

/// A whole config file after `_base_` merging and overrides (mmdetection 3.x vocabulary).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunConfig {
    /// The model.
    pub model: ModelConfig,
    /// Training data.
    #[serde(default)]
    pub train_dataloader: Option<DataloaderConfig>,
    /// Validation data.
    #[serde(default)]
    pub val_dataloader: Option<DataloaderConfig>,
    /// Test data (default: the validation data).
    #[serde(default)]
    pub test_dataloader: Option<DataloaderConfig>,
    /// Validation metric.
    #[serde(default)]
    pub val_evaluator: Option<EvaluatorConfig>,
    /// Test metric (default: the validation metric).
    #[serde(default)]
    pub test_evaluator: Option<EvaluatorConfig>,
    /// Training loop.
    #[serde(default)]
    pub train_cfg: Option<TrainLoopConfig>,
    /// The validation loop (`ValLoop`).
    #[serde(default)]
    pub val_cfg: Option<EvalLoopConfig>,
    /// The test loop (`TestLoop`).
    #[serde(default)]
    pub test_cfg: Option<EvalLoopConfig>,
    /// Optimizer.
    #[serde(default)]
    pub optim_wrapper: Option<OptimWrapperConfig>,
    /// LR schedules.
    #[serde(default)]
    pub param_scheduler: Vec<SchedulerConfig>,
    /// Hooks.
    #[serde(default)]
    pub default_hooks: DefaultHooks,
    /// LR scaling by batch size.
    #[serde(default)]
    pub auto_scale_lr: Option<AutoScaleLr>,
    /// Seeds.
    #[serde(default)]
    pub randomness: Randomness,
    /// Output folder (default `work_dirs/<config name>`).
    #[serde(default)]
    pub work_dir: Option<PathBuf>,
    /// densepred's runtime key for where the model runs: `"cpu"` (default), `"cuda"` or
    /// `"cuda:N"`; the CLI's `--device` and Python's `device=` override it.
    #[serde(default)]
    pub device: Option<String>,
    /// Weights to start from.
    #[serde(default)]
    pub load_from: Option<PathBuf>,
    /// Resume from the work dir's last checkpoint.
    #[serde(default)]
    pub resume: bool,
    /// mmengine's registry scope (`"mmdet"`, `"mmseg"`); densepred's components are typed, so
    /// the scope selects nothing.
    #[serde(default)]
    pub default_scope: Option<DefaultScope>,
    /// Not supported (cuDNN, multiprocessing and distributed settings: densepred runs in one
    /// process on the CPU).
    #[serde(default)]
    pub env_cfg: Option<Unsupported>,
    /// Logger level (only `"INFO"`).
    #[serde(default)]
    pub log_level: Option<LogLevel>,
    /// Not supported (logged values are averaged over `default_hooks.logger.interval`).
    #[serde(default)]
    pub log_processor: Option<Unsupported>,
    /// Not supported (metrics go to the work dir's `metrics.jsonl` and `loss_curve.png`).
    #[serde(default)]
    pub vis_backends: Option<Unsupported>,
    /// Not supported (drawings come from `densepred test --show-dir` / `--out-dir`).
    #[serde(default)]
    pub visualizer: Option<Unsupported>,
}

impl RunConfig {
    /// Reads `path` (with `_base_` files and `overrides` `key=value` applied) into the typed
    /// config; returns it with the resolved table.
    ///
    /// Errors: unreadable files, unknown keys, wrong types (naming the file and key).
    pub fn load(path: &Path, overrides: &[String]) -> Result<(Self, toml::Table), EngineError> {
        let table = crate::config::load_with_overrides(path, overrides)
            .map_err(|e| EngineError::Config(e.to_string()))?;
        let cfg = Self::from_table(&table, path)?;
        Ok((cfg, table))
    }

    /// The typed config of an already merged table (`path` names it in errors).
    /// Errors: unknown keys, wrong types and refused values, naming the file and the key path
    /// (`test_dataloader.dataset: missing field `type``); then the value checks of
    /// [`RunConfig::validate`].
    pub fn from_table(table: &toml::Table, path: &Path) -> Result<Self, EngineError> {
        let cfg: Self = crate::config::typed(toml::Value::Table(table.clone()), "", path)
            .map_err(|e| EngineError::Config(e.to_string()))?;
        cfg.validate()
            .map_err(|e| EngineError::Config(format!("{}: {e}", path.display())))?;
        Ok(cfg)
    }

    /// Value checks that types cannot express, each naming its key path: every dataloader's
    /// transforms ([`TransformConfig::validate`](densepred_datasets::transforms::TransformConfig::validate)).
    ///
    /// Errors: the first bad value, as `key.path: reason`.
    pub fn validate(&self) -> Result<(), String> {
        for (name, dl) in [
            ("train_dataloader", &self.train_dataloader),
            ("val_dataloader", &self.val_dataloader),
            ("test_dataloader", &self.test_dataloader),
        ] {
            if let Some(dl) = dl {
                dl.validate()
                    .map_err(|(key, why)| format!("{name}.{key}: {why}"))?;
            }
        }
        Ok(())
    }

    /// The test split: `test_dataloader` and `test_evaluator`, each falling back to the
    /// validation one as mmengine's `TestLoop` users write `test_dataloader = val_dataloader`.
    ///
    /// Errors: [`EngineError::Config`] when neither is there.
    pub fn test_split(&self) -> Result<(&DataloaderConfig, &EvaluatorConfig), EngineError> {
        let ev = self
            .test_evaluator
            .as_ref()
            .or(self.val_evaluator.as_ref())
            .ok_or_else(|| {
                EngineError::Config(
                    "the config has neither test_evaluator nor val_evaluator".into(),
                )
            })?;
        Ok((self.test_loader()?, ev))
    }

    /// `test_dataloader`, else `val_dataloader` (the test pipeline, which inference uses too).
    ///
    /// Errors: [`EngineError::Config`] when neither is there.
    pub fn test_loader(&self) -> Result<&DataloaderConfig, EngineError> {
        self.test_dataloader
            .as_ref()
            .or(self.val_dataloader.as_ref())
            .ok_or_else(|| {
                EngineError::Config(
                    "the config has neither test_dataloader nor val_dataloader".into(),
                )
            })
    }

    /// The seed (`randomness.seed`, default 0).
    pub fn seed(&self) -> u64 {
        self.randomness.seed.unwrap_or(0)
    }
}

/// `default_scope`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub enum DefaultScope {
    /// mmdetection.
    #[serde(rename = "mmdet")]
    MmDet,
    /// mmsegmentation.
    #[serde(rename = "mmseg")]
    MmSeg,
}

/// `work_dir` or `work_dirs/<config file stem>`.
pub fn work_dir_for(cfg: &RunConfig, config_path: &Path, cli: Option<&Path>) -> PathBuf {
    if let Some(d) = cli {
        return d.to_path_buf();
    }
    if let Some(d) = &cfg.work_dir {
        return d.clone();
    }
    let stem = config_path
        .file_stem()
        .map(|s| s.to_string_lossy().to_string())
        .unwrap_or_else(|| "run".into());
    PathBuf::from("work_dirs").join(stem)
}

/// The network of a built model.
pub enum Net {
    /// A one-stage detector.
    Detector(Detector),
    /// An encoder-decoder segmentor.
    Segmentor(Segmentor),
}

/// A built model (detector or segmentor) with its parameter store.
pub struct BuiltModel {
    /// All parameters and buffers by mmdetection / mmsegmentation state-dict name.
    pub vars: SeededVarMap,
    /// The network.
    pub net: Net,
    /// The config it was built from.
    pub cfg: ModelConfig,
    /// Normalisation of the data preprocessor.
    pub norm: Normalization,
    /// Batch padding: each side up to a multiple of this.
    pub pad_size_divisor: usize,
    /// Segmentors in training: pad every batch to at least this `(h, w)` (mmseg
    /// `SegDataPreProcessor.size`, the crop size).
    pub pad_size: Option<(usize, usize)>,
    /// Device of the parameters.
    pub device: Device,
}

/// Builds the model of `cfg` with weights drawn from `seed`.
///
/// Errors: inconsistent model configs.
pub fn build_model(
    cfg: &ModelConfig,
    seed: u64,
    device: &Device,
) -> Result<BuiltModel, EngineError> {
    let vars = SeededVarMap::new(seed);
    let vb = vars.var_builder(DType::F32, device);
    let (net, norm, pad_size_divisor, pad_size) = match cfg {
        ModelConfig::EncoderDecoder(c) => {
            let dp = &c.data_preprocessor;
            let net = Net::Segmentor(Segmentor::new(vb, cfg).ctx("building model")?);
            let norm = Normalization {
                mean: dp.mean,
                std: dp.std,
            };
            (
                net,
                norm,
                dp.size_divisor.unwrap_or(1),
                dp.size.map(|[h, w]| (h, w)),
            )
        }
        _ => {
            let dp = cfg
                .data_preprocessor()
                .expect("every model but EncoderDecoder is a detector");
            let net = Net::Detector(Detector::new(vb, cfg).ctx("building model")?);
            let norm = Normalization {
                mean: dp.mean,
                std: dp.std,
            };
            (net, norm, dp.pad_size_divisor, None)
        }
    };
    Ok(BuiltModel {
        vars,
        net,
        cfg: cfg.clone(),
        norm,
        pad_size_divisor,
        pad_size,
        device: device.clone(),
    })
}

impl BuiltModel {
    /// The detector.
    ///
    /// Errors: the model is a segmentor.
    pub fn detector(&self) -> Result<&Detector, EngineError> {
        match &self.net {
            Net::Detector(d) => Ok(d),
            Net::Segmentor(_) => Err(EngineError::Config(
                "this needs a detector config, and model.type is EncoderDecoder".into(),
            )),
        }
    }

    /// The segmentor.
    ///
    /// Errors: the model is a detector.
    pub fn segmentor(&self) -> Result<&Segmentor, EngineError> {
        match &self.net {
            Net::Segmentor(s) => Ok(s),
            Net::Detector(_) => Err(EngineError::Config(
                "this needs a segmentor config (model.type = \"EncoderDecoder\")".into(),
            )),
        }
    }

    /// Whether the model is a segmentor.
    pub fn is_segmentor(&self) -> bool {
        matches!(self.net, Net::Segmentor(_))
    }

    /// The backbone.
    pub fn backbone(&self) -> &AnyBackbone {
        match &self.net {
            Net::Detector(d) => &d.backbone,
            Net::Segmentor(s) => &s.backbone,
        }
    }

    /// Classes the model predicts (`bbox_head.num_classes` / `decode_head.num_classes`).
    pub fn num_classes(&self) -> usize {
        match &self.net {
            Net::Detector(d) => d.num_classes(),
            Net::Segmentor(s) => s.num_classes(),
        }
    }

    /// The config key of [`BuiltModel::num_classes`], for messages.
    pub fn num_classes_key(&self) -> &'static str {
        self.cfg.num_classes_key()
    }

    /// Named training losses of a batch (detector: boxes of the samples; segmentor: the batch's
    /// label maps).
    ///
    /// Errors: a segmentation batch without label maps; candle errors.
    pub fn loss(&self, batch: &Batch) -> Result<Vec<(String, Tensor)>, EngineError> {
        match &self.net {
            Net::Detector(d) => {
                let (x, metas, gts) = model_inputs(batch);
                d.loss(&x, &metas, &gts).ctx("forward")
            }
            Net::Segmentor(s) => {
                let labels = batch.seg_maps.as_ref().ok_or_else(|| {
                    EngineError::Config(
                        "the training pipeline yields no label maps (add LoadAnnotations)".into(),
                    )
                })?;
                s.loss(&batch.images, labels).ctx("forward")
            }
        }
    }

    /// A detector over detached copies of the current weights (sharing storage): inference
    /// without recording an autograd graph.
    ///
    /// Errors: the model is a segmentor; as [`Detector::new`].
    pub fn inference_detector(&self) -> Result<Detector, EngineError> {
        self.detector()?;
        Detector::new(
            self.vars.inference_var_builder(DType::F32, &self.device),
            &self.cfg,
        )
        .ctx("building the inference model")
    }

    /// A segmentor over detached copies of the current weights (see
    /// [`BuiltModel::inference_detector`]).
    ///
    /// Errors: the model is a detector; as [`Segmentor::new`].
    pub fn inference_segmentor(&self) -> Result<Segmentor, EngineError> {
        self.segmentor()?;
        Segmentor::new(
            self.vars.inference_var_builder(DType::F32, &self.device),
            &self.cfg,
        )
        .ctx("building the inference model")
    }
}

/// Loads weights into `model`: a densepred / mmdetection / mmsegmentation checkpoint (keys under
/// one of [`STATE_DICT_PREFIXES`]: `backbone.*`, `neck.*`, `bbox_head.*`, `rpn_head.*`,
/// `roi_head.*`, `decode_head.*`, `auxiliary_head.*`)
/// or, when no key has one of these prefixes, a backbone-only
/// checkpoint such as the official SMT ImageNet `.pth` (keys mapped by the backbone's rename table
/// and put under `backbone.`; the classification head is reported as unexpected).
///
/// Errors: unreadable files; no parameter loaded at all.
pub fn load_weights(
    model: &BuiltModel,
    path: &Path,
    strict: bool,
) -> Result<LoadReport, EngineError> {
    let tensors = read_checkpoint(path).map_err(|e| EngineError::File {
        path: path.into(),
        reason: e.to_string(),
    })?;
    let prefixed = tensors
        .keys()
        .any(|k| STATE_DICT_PREFIXES.iter().any(|p| k.starts_with(p)));
    let bb = model.backbone();
    let map = |k: &str| -> Option<String> {
        if prefixed {
            match k.strip_prefix("backbone.") {
                Some(rest) => Some(format!("backbone.{}", bb.map_checkpoint_key(rest))),
                None => Some(k.to_string()),
            }
        } else {
            Some(format!("backbone.{}", bb.map_checkpoint_key(k)))
        }
    };
    let report =
        load_into(&model.vars, &tensors, &map, strict, path).map_err(|e| EngineError::File {
            path: path.into(),
            reason: e.to_string(),
        })?;
    if report.loaded.is_empty() {
        return Err(EngineError::File {
            path: path.into(),
            reason: format!("no parameter of the model matches this checkpoint\n{report}"),
        });
    }
    Ok(report)
}

/// Loads a checkpoint to test or run (`densepred test` / `infer`, Python's `Detector`,
/// `Segmentor`, `test`): strictly by default, as mmengine's runner loads `--checkpoint`: a
/// missing key, an unexpected key or a shape mismatch is an error listing the first few of each.
/// With `strict = false` the matching tensors load and one warning gives the comparison.
///
/// Errors: [`EngineError::File`] for an unreadable checkpoint, a mismatch (strict), or no
/// parameter matched at all.
pub fn load_checkpoint(
    model: &BuiltModel,
    path: &Path,
    strict: bool,
) -> Result<LoadReport, EngineError> {
    let report = load_weights(model, path, strict)?;
    if !report.is_exact() {
        tracing::warn!(
            "{}: not an exact match for the model (strict = false)\n{report}",
            path.display()
        );
    }
    Ok(report)
}

/// A data loader and its dataset.
pub struct Loader {
    /// The loader.
    pub loader: DataLoader,
    /// The dataset (classes, category ids).
    pub dataset: Arc<dyn Dataset>,
}

/// Builds the loader of a `*_dataloader` table (`train` shuffles per its sampler).
///
/// Errors: unreadable annotations, invalid pipeline.
pub fn build_loader(dl: &DataloaderConfig, seed: u64, train: bool) -> Result<Loader, EngineError> {
    let (dataset, pipeline, skip_invalid) = dl.dataset.build()?;
    let shuffle = train && dl.sampler.as_ref().map(|s| s.shuffle).unwrap_or(true);
    let aspect_groups = match dl.batch_sampler {
        Some(_) => Some(Arc::new(aspect_ratio_groups(dataset.as_ref())?)),
        None => None,
    };
    let loader = DataLoader {
        dataset: dataset.clone(),
        pipeline,
        batch_size: dl.batch_size.max(1),
        num_workers: dl.num_workers,
        shuffle,
        drop_last: dl.drop_last,
        seed,
        prefetch: 2,
        skip_invalid,
        aspect_groups,
        skipped: Default::default(),
        shard: Default::default(),
    };
    Ok(Loader { loader, dataset })
}

/// Per-image geometry of a sample.
pub fn image_meta(s: &Sample) -> ImageMeta {
    ImageMeta {
        ori_shape: s.ori_shape,
        img_shape: s.img_shape,
        pad_shape: s.pad_shape,
        scale_factor: s.scale_factor,
    }
}

/// The GT of a sample (boxes in the resized frame; `ignore` instances become ignored boxes; the
/// masks of the others, when loaded, as [`BitmapMasks`] of the pipeline's mask size).
pub fn gt_instances(s: &Sample) -> GtInstances {
    let mut g = GtInstances::default();
    let mut masks = s.masks.as_ref().map(|m| BitmapMasks {
        size: m.first().map(|a| a.dim()).unwrap_or(s.img_shape),
        masks: Vec::new(),
    });
    for (k, i) in s.instances.iter().enumerate() {
        if i.ignore {
            g.ignored.push(i.bbox);
        } else {
            g.bboxes.push(i.bbox);
            g.labels.push(i.label as i64);
            if let (Some(out), Some(src)) = (masks.as_mut(), s.masks.as_ref()) {
                out.masks.push(src[k].iter().copied().collect());
            }
        }
    }
    g.masks = masks;
    g
}

/// Batches samples for `model` (normalise, pad); fills `pad_shape` where the pipeline had no `Pad`.
/// `train`: segmentors pad to their `data_preprocessor.size` (mmseg pads training batches to the
/// crop size; test batches only to the largest image and `size_divisor`).
///
/// Errors: samples without images.
pub fn to_batch(
    model: &BuiltModel,
    mut samples: Vec<Sample>,
    device: &Device,
    train: bool,
) -> Result<Batch, EngineError> {
    // DetDataPreprocessor: each image's pad_shape is its own size rounded up to the divisor.
    let d = model.pad_size_divisor.max(1);
    for s in samples.iter_mut() {
        if let Some(img) = &s.img {
            let (h, w, _) = img.dim();
            s.pad_shape = (h.div_ceil(d) * d, w.div_ceil(d) * d);
        }
    }
    let min_size = if train { model.pad_size } else { None };
    Ok(collate_to(
        samples,
        Some(&model.norm),
        model.pad_size_divisor,
        min_size,
        device,
    )?)
}

/// `(B, 3, H, W)` images of a batch with metas and GT.
pub fn model_inputs(batch: &Batch) -> (Tensor, Vec<ImageMeta>, Vec<GtInstances>) {
    (
        batch.images.clone(),
        batch.samples.iter().map(image_meta).collect(),
        batch.samples.iter().map(gt_instances).collect(),
    )
}
