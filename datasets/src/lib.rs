//! densepred-datasets: dataset readers (COCO instances, ADE20K-layout semantic segmentation),
//! mmdetection / mmsegmentation transforms under their names, and a deterministic parallel loader
//! that batches samples into `(B, 3, H, W)` tensors with per-image metadata.
//!
//! CPU-side arrays are `ndarray` (images `(H, W, 3)` f32 RGB 0–255, masks and label maps
//! `(H, W)` u8); they become candle tensors only in [`loader::collate`].

pub mod ade;
pub mod coco;
pub mod config;
pub mod loader;
pub mod transforms;

use ndarray::{Array2, Array3};
use std::path::PathBuf;

/// Errors of data loading; every variant names the file and, where there is one, the record and
/// field.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    /// A file could not be read or decoded.
    #[error("{path}: {reason}")]
    File {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        reason: String,
    },
    /// A record of an annotation file is invalid.
    #[error("{path}: {record}: field {field}: {reason}")]
    Record {
        /// The annotation file.
        path: PathBuf,
        /// Which record, e.g. `annotation id 42 (image id 7)`.
        record: String,
        /// The field at fault, e.g. `bbox`.
        field: String,
        /// What is wrong.
        reason: String,
    },
    /// A configuration value is invalid.
    #[error("config: {0}")]
    Config(String),
    /// A sample failed in the pipeline: the image (file and id), the transform (its position in
    /// the `pipeline` list and its `type`) and what went wrong there.
    #[error("{img_path} (image id {img_id}): pipeline step {step} ({transform}): {source}")]
    Sample {
        /// The image file.
        img_path: PathBuf,
        /// The image id (COCO id; position for ADE20K).
        img_id: u64,
        /// Position of the transform in the `pipeline` list (0-based).
        step: usize,
        /// The transform's `type`.
        transform: &'static str,
        /// The error of the transform ([`DataError::Panic`] when it panicked).
        source: Box<DataError>,
    },
    /// Code panicked (a bug, reported instead of ending the loader silently).
    #[error("panicked: {0}")]
    Panic(String),
    /// The loader stopped before the end of the epoch.
    #[error("data loader: {0}")]
    Loader(String),
}

impl DataError {
    /// The innermost error (through [`DataError::Sample`]).
    pub fn root(&self) -> &DataError {
        match self {
            DataError::Sample { source, .. } => source.root(),
            o => o,
        }
    }
}

/// The message of a panic payload (`&str` / `String` payloads; otherwise a placeholder).
pub fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "a non-string panic payload".to_string()
    }
}

/// One object of a detection sample.
#[derive(Debug, Clone, PartialEq)]
pub struct Instance {
    /// `[x1, y1, x2, y2]` in pixels of the current image.
    pub bbox: [f32; 4],
    /// Contiguous label in `[0, num_classes)`.
    pub label: usize,
    /// Crowd region: ignored by assigners (mmdet's `ignore_flag`).
    pub ignore: bool,
    /// Source annotation id (for error messages and evaluation).
    pub ann_id: u64,
}

/// A sample as it moves through the pipeline (mmdetection's results dict, typed).
#[derive(Debug, Clone)]
pub struct Sample {
    /// Image file.
    pub img_path: PathBuf,
    /// Image id (COCO id; position for ADE20K).
    pub img_id: u64,
    /// `(H, W, 3)` RGB, f32 in 0–255 (after `Normalize`, normalised values). `None` until
    /// `LoadImageFromFile`.
    pub img: Option<Array3<f32>>,
    /// `(H, W)` of the file.
    pub ori_shape: (usize, usize),
    /// `(H, W)` after resizing (and cropping), before padding.
    pub img_shape: (usize, usize),
    /// `(H, W)` after padding.
    pub pad_shape: (usize, usize),
    /// `(w_scale, h_scale)` applied by resizing.
    pub scale_factor: (f64, f64),
    /// Whether the image was flipped horizontally.
    pub flip: bool,
    /// Objects (detection), in current-image pixels; filled by `LoadAnnotations` from
    /// `ann_instances`, so that annotations loaded after a `Resize` stay at the original scale (the
    /// mmdetection test-pipeline convention used for evaluation).
    pub instances: Vec<Instance>,
    /// The dataset's annotations for this image, in original-image pixels.
    pub ann_instances: Vec<Instance>,
    /// Instance masks `(H, W)` u8 (0/1), parallel to `instances`, when loaded.
    pub masks: Option<Vec<Array2<u8>>>,
    /// Raw annotations of the instances (polygons / RLE), for `LoadAnnotations(with_mask)`.
    pub segmentations: Vec<Option<hotcoco::types::Segmentation>>,
    /// Label-map file (semantic segmentation).
    pub seg_map_path: Option<PathBuf>,
    /// `(H, W)` class map, 255 = ignore.
    pub gt_seg_map: Option<Array2<u8>>,
    /// Apply mmseg's `reduce_zero_label` when loading the label map.
    pub reduce_zero_label: bool,
}

impl Sample {
    /// A sample with only its paths and ids set.
    pub fn new(img_path: PathBuf, img_id: u64) -> Self {
        Self {
            img_path,
            img_id,
            img: None,
            ori_shape: (0, 0),
            img_shape: (0, 0),
            pad_shape: (0, 0),
            scale_factor: (1.0, 1.0),
            flip: false,
            instances: Vec::new(),
            ann_instances: Vec::new(),
            masks: None,
            segmentations: Vec::new(),
            seg_map_path: None,
            gt_seg_map: None,
            reduce_zero_label: false,
        }
    }
}

/// Class names and (for COCO) the mapping between category ids and contiguous labels.
#[derive(Debug, Clone, PartialEq)]
pub struct MetaInfo {
    /// Class names in label order.
    pub classes: Vec<String>,
    /// COCO category id of each label (empty for segmentation datasets).
    pub cat_ids: Vec<u64>,
}

/// A dataset: a list of samples (paths and annotations, not yet decoded).
pub trait Dataset: Send + Sync {
    /// Number of samples.
    fn len(&self) -> usize;
    /// Whether there are no samples.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// The `i`-th sample before the pipeline runs.
    fn sample(&self, i: usize) -> Sample;
    /// Classes of the dataset.
    fn metainfo(&self) -> &MetaInfo;
}
