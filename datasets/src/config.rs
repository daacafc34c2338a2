//! The `dataset` table of a dataloader (mmdetection 3.x / mmsegmentation 1.x keys) and the
//! dataloader table around it.

use crate::ade::Ade20kDataset;
use crate::coco::{CocoDataset, CocoOptions};
pub use crate::transforms::toml_value::Empty;
use crate::transforms::{Pipeline, TransformConfig};
use crate::{DataError, Dataset};
use densepred_core::config::defaults as d;
pub use densepred_core::config::Unsupported;
use serde::{Deserialize, Serialize};
use std::path::PathBuf;
use std::sync::Arc;

/// `data_prefix` of a COCO dataset.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImgPrefix {
    /// Image folder relative to `data_root`.
    #[serde(default)]
    pub img: PathBuf,
}

/// `data_prefix` of a segmentation dataset.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SegPrefix {
    /// Image folder relative to `data_root`.
    pub img_path: PathBuf,
    /// Label-map folder relative to `data_root`.
    pub seg_map_path: PathBuf,
}

/// `filter_cfg` (mmdetection).
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FilterCfg {
    /// Drop images without objects.
    #[serde(default)]
    pub filter_empty_gt: bool,
    /// Drop images whose shorter side is smaller.
    #[serde(default)]
    pub min_size: u32,
}

/// `metainfo` override.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetaInfoCfg {
    /// Class subset / names.
    pub classes: Vec<String>,
    /// Class colours for drawings (RGB per class).
    #[serde(default)]
    pub palette: Option<Vec<[u8; 3]>>,
}

/// `type = "CocoDataset"`: COCO instances (mmdetection's `CocoDataset`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CocoDatasetConfig {
    /// Root folder (relative to the working directory).
    #[serde(default)]
    pub data_root: PathBuf,
    /// Instances JSON relative to `data_root`.
    pub ann_file: PathBuf,
    /// Image folder.
    #[serde(default)]
    pub data_prefix: ImgPrefix,
    /// Image filtering.
    #[serde(default)]
    pub filter_cfg: Option<FilterCfg>,
    /// Class subset.
    #[serde(default)]
    pub metainfo: Option<MetaInfoCfg>,
    /// Transform list.
    #[serde(default)]
    pub pipeline: Vec<TransformConfig>,
    /// mmdet's `test_mode` (disables filtering).
    #[serde(default)]
    pub test_mode: bool,
    /// Invalid records become warnings (skipped and counted) instead of errors.
    #[serde(default)]
    pub skip_invalid: bool,
    /// Only `{}` (local files).
    #[serde(default)]
    pub backend_args: Option<Empty>,
}

/// `type = "ADE20KDataset"`: ADE20K-layout semantic segmentation (mmsegmentation's
/// `ADE20KDataset`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Ade20kDatasetConfig {
    /// Root folder.
    #[serde(default)]
    pub data_root: PathBuf,
    /// Image and label-map folders.
    pub data_prefix: SegPrefix,
    /// mmseg's `reduce_zero_label` (ADE20K: true).
    #[serde(default = "d::yes")]
    pub reduce_zero_label: bool,
    /// Class names.
    #[serde(default)]
    pub metainfo: Option<MetaInfoCfg>,
    /// Transform list.
    #[serde(default)]
    pub pipeline: Vec<TransformConfig>,
    /// Invalid records become warnings instead of errors.
    #[serde(default)]
    pub skip_invalid: bool,
    /// mmseg's `test_mode`: ADE20K folders load the same way with either value.
    #[serde(default)]
    pub test_mode: bool,
}

densepred_core::config_by_type! {
    /// The `dataset` table, selected by `type`.
    pub enum DatasetConfig {
        /// COCO instances.
        "CocoDataset" => CocoDataset(CocoDatasetConfig),
        /// ADE20K-layout semantic segmentation.
        "ADE20KDataset" => Ade20kDataset(Ade20kDatasetConfig),
    }
}

impl DatasetConfig {
    /// The class colours of `metainfo.palette`, when the config gives them.
    pub fn palette(&self) -> Option<&[[u8; 3]]> {
        let m = match self {
            DatasetConfig::CocoDataset(c) => &c.metainfo,
            DatasetConfig::Ade20kDataset(c) => &c.metainfo,
        };
        m.as_ref().and_then(|m| m.palette.as_deref())
    }

    /// The transform list.
    pub fn pipeline(&self) -> &[TransformConfig] {
        match self {
            DatasetConfig::CocoDataset(c) => &c.pipeline,
            DatasetConfig::Ade20kDataset(c) => &c.pipeline,
        }
    }

    /// Reads the annotations and compiles the pipeline.
    ///
    /// Errors: as [`CocoDataset::load`] / [`Ade20kDataset::load`].
    pub fn build(&self) -> Result<(Arc<dyn Dataset>, Pipeline, bool), DataError> {
        match self {
            DatasetConfig::CocoDataset(CocoDatasetConfig {
                data_root,
                ann_file,
                data_prefix,
                filter_cfg,
                metainfo,
                pipeline,
                test_mode,
                skip_invalid,
                ..
            }) => {
                let f = filter_cfg.clone().unwrap_or_default();
                let opts = CocoOptions {
                    classes: metainfo.as_ref().map(|m| m.classes.clone()),
                    filter_empty_gt: f.filter_empty_gt && !test_mode,
                    min_size: if *test_mode { 0 } else { f.min_size },
                    skip_invalid: *skip_invalid,
                };
                let ds = CocoDataset::load(
                    &data_root.join(ann_file),
                    &data_root.join(&data_prefix.img),
                    &opts,
                )?;
                Ok((Arc::new(ds), Pipeline(pipeline.clone()), *skip_invalid))
            }
            DatasetConfig::Ade20kDataset(Ade20kDatasetConfig {
                data_root,
                data_prefix,
                reduce_zero_label,
                metainfo,
                pipeline,
                skip_invalid,
                ..
            }) => {
                let ds = Ade20kDataset::load(
                    data_root,
                    &data_root.join(&data_prefix.img_path),
                    &data_root.join(&data_prefix.seg_map_path),
                    metainfo.as_ref().map(|m| m.classes.clone()),
                    *reduce_zero_label,
                )?;
                Ok((Arc::new(ds), Pipeline(pipeline.clone()), *skip_invalid))
            }
        }
    }
}

/// `sampler` table: mmengine's `DefaultSampler` (one pass per epoch) or `InfiniteSampler` (the
/// iteration-based loops' sampler: epochs follow one another without end, which is how the
/// iteration-based loop reads any sampler here).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SamplerCfg {
    /// `DefaultSampler` or `InfiniteSampler`.
    #[serde(rename = "type")]
    pub kind: SamplerKind,
    /// Shuffle every epoch.
    #[serde(default = "d::yes")]
    pub shuffle: bool,
    /// mmengine's per-sampler seed: not supported (the order comes from `randomness.seed`).
    #[serde(default)]
    pub seed: Option<Unsupported>,
}

/// `sampler.type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum SamplerKind {
    /// mmengine's `DefaultSampler`.
    DefaultSampler,
    /// mmengine's `InfiniteSampler`.
    InfiniteSampler,
}

/// `batch_sampler` table: mmdet's `AspectRatioBatchSampler` (batches of one orientation, see
/// [`crate::loader::DataLoader::aspect_groups`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BatchSamplerCfg {
    /// `AspectRatioBatchSampler`.
    #[serde(rename = "type")]
    pub kind: BatchSamplerKind,
}

/// `batch_sampler.type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum BatchSamplerKind {
    /// mmdet's `AspectRatioBatchSampler`.
    AspectRatioBatchSampler,
}

/// A `train_dataloader` / `val_dataloader` / `test_dataloader` table.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataloaderConfig {
    /// Images per batch.
    #[serde(default = "d::one_usize")]
    pub batch_size: usize,
    /// Worker threads that run the pipeline (0: the loading thread itself).
    #[serde(default = "d::two_usize")]
    pub num_workers: usize,
    /// mmengine keeps worker processes between epochs; the loader's workers are threads of this
    /// process, so both values give the same batches.
    #[serde(default)]
    pub persistent_workers: bool,
    /// Drop the last incomplete batch.
    #[serde(default)]
    pub drop_last: bool,
    /// Sampler.
    #[serde(default)]
    pub sampler: Option<SamplerCfg>,
    /// Batch sampler (default: consecutive runs of the sampler's order).
    #[serde(default)]
    pub batch_sampler: Option<BatchSamplerCfg>,
    /// The dataset.
    pub dataset: DatasetConfig,
}

impl DataloaderConfig {
    /// Checks the values serde's types cannot: `batch_size` ≥ 1 and every transform of the
    /// pipeline ([`TransformConfig::validate`]).
    ///
    /// Errors: `(key, reason)`, `key` relative to the dataloader table
    /// (`dataset.pipeline.3.ratio_range`).
    pub fn validate(&self) -> Result<(), (String, String)> {
        if self.batch_size == 0 {
            return Err(("batch_size".into(), "must be at least 1".into()));
        }
        for (i, t) in self.dataset.pipeline().iter().enumerate() {
            t.validate()
                .map_err(|(k, why)| (format!("dataset.pipeline.{i}.{k}"), why))?;
        }
        Ok(())
    }
}
