//! Inference on arbitrary images with a config's test pipeline (mmdetection's `DetInferencer`,
//! mmsegmentation's `inference_model`): what `densepred infer` and the Python `Detector` /
//! `Segmentor` run.

use crate::runner::{
    build_model, load_checkpoint, model_inputs, to_batch, BuiltModel, CandleContext, EngineError,
    RunConfig,
};
use candle_core::{DType, Device};
use densepred_core::structures::Detections;
use densepred_datasets::config::DatasetConfig;
use densepred_datasets::transforms::{Pipeline, TransformConfig};
use densepred_datasets::Sample;
use ndarray::{Array2, Array3};
use rand::SeedableRng;
use std::path::{Path, PathBuf};

/// One input image.
#[derive(Debug, Clone)]
pub enum ImageInput {
    /// An image file (JPEG or PNG; grayscale files become 3 channels).
    Path(PathBuf),
    /// `(H, W, 3)` RGB pixels.
    Rgb(Array3<u8>),
}

/// A model with the test pipeline of its config, ready to predict on images.
pub struct Inferencer {
    /// The model (its weights: the checkpoint, else the config's initialisation).
    pub model: BuiltModel,
    /// The test pipeline without file loading and annotation steps.
    pipeline: Pipeline,
    /// Class names, index = label.
    classes: Vec<String>,
    /// The dataset's `reduce_zero_label` (ADE20K: label PNGs store class + 1).
    reduce_zero_label: bool,
    /// `metainfo.palette` of the config's test dataset.
    palette: Option<Vec<[u8; 3]>>,
}

/// The class names of `ds`: its `metainfo.classes`, else what the dataset reads from its
/// annotations (COCO categories, the ADE20K list); if the dataset cannot be read here,
/// `class_0`, `class_1`, … (with a warning).
fn class_names(ds: &DatasetConfig, num_classes: usize) -> Vec<String> {
    match ds.build() {
        Ok((d, _, _)) => d.metainfo().classes.clone(),
        Err(e) => {
            tracing::warn!("class names unavailable ({e}); using class_<index>");
            (0..num_classes).map(|i| format!("class_{i}")).collect()
        }
    }
}

impl Inferencer {
    /// Builds the model of `cfg` on `device` and loads `checkpoint` (any `.safetensors` written by
    /// `densepred train`, or an mmdetection / mmsegmentation `.pth`; see
    /// [`load_checkpoint`] for `strict`) when given; without one, the weights are the config's initialisation (seed
    /// `randomness.seed`). The test pipeline is that of `test_dataloader`, else
    /// `val_dataloader`.
    ///
    /// Errors: [`EngineError::Config`] when the config has neither loader;
    /// [`EngineError::File`] for a missing checkpoint, or a mismatched one when `strict`.
    pub fn new(
        cfg: &RunConfig,
        checkpoint: Option<&Path>,
        strict: bool,
        device: &Device,
    ) -> Result<Self, EngineError> {
        let dl = cfg.test_loader()?;
        let model = build_model(&cfg.model, cfg.seed(), device)?;
        if let Some(ck) = checkpoint {
            load_checkpoint(&model, ck, strict)?;
        }
        let pipeline = Pipeline(
            dl.dataset
                .pipeline()
                .iter()
                .filter(|t| {
                    !matches!(
                        t,
                        TransformConfig::LoadAnnotations { .. }
                            | TransformConfig::LoadImageFromFile { .. }
                    )
                })
                .cloned()
                .collect(),
        );
        let classes = class_names(&dl.dataset, model.num_classes());
        let reduce_zero_label = matches!(
            &dl.dataset,
            DatasetConfig::Ade20kDataset(c) if c.reduce_zero_label
        );
        Ok(Self {
            palette: dl.dataset.palette().map(|p| p.to_vec()),
            model,
            pipeline,
            classes,
            reduce_zero_label,
        })
    }

    /// Class names; a label `l` of a detection or a label map is `classes()[l]`.
    pub fn classes(&self) -> &[String] {
        &self.classes
    }

    /// Whether the model is a segmentor (else a detector).
    pub fn is_segmentor(&self) -> bool {
        self.model.is_segmentor()
    }

    /// The dataset's `reduce_zero_label`: label PNGs of this dataset store class `l` as `l + 1`.
    pub fn reduce_zero_label(&self) -> bool {
        self.reduce_zero_label
    }

    /// `metainfo.palette` of the test dataset, when the config gives one.
    pub fn palette(&self) -> Option<&[[u8; 3]]> {
        self.palette.as_deref()
    }

    /// Decodes (paths) or converts (arrays) the inputs and runs the test pipeline on each.
    fn prepare(&self, inputs: &[ImageInput]) -> Result<Vec<Sample>, EngineError> {
        let mut out = Vec::with_capacity(inputs.len());
        for (i, input) in inputs.iter().enumerate() {
            let (path, img) = match input {
                ImageInput::Path(p) => {
                    if !p.is_file() {
                        return Err(EngineError::File {
                            path: p.clone(),
                            reason: "no such file".into(),
                        });
                    }
                    (p.clone(), densepred_datasets::transforms::load_rgb(p)?)
                }
                ImageInput::Rgb(a) => {
                    let (h, w, c) = a.dim();
                    if c != 3 || h == 0 || w == 0 {
                        return Err(EngineError::Config(format!(
                            "image {i}: expected an (H, W, 3) RGB array with H, W > 0, got \
                             ({h}, {w}, {c})"
                        )));
                    }
                    (PathBuf::from(format!("<array {i}>")), a.mapv(|v| v as f32))
                }
            };
            let mut s = Sample::new(path, i as u64);
            let (h, w, _) = img.dim();
            s.ori_shape = (h, w);
            s.img_shape = (h, w);
            s.pad_shape = (h, w);
            s.img = Some(img);
            out.push(
                self.pipeline
                    .apply(s, &mut rand::rngs::StdRng::seed_from_u64(0))?,
            );
        }
        Ok(out)
    }

    /// Detections per input image, boxes `[x1, y1, x2, y2]` in pixels of the original image,
    /// scores in 0–1, 0-based labels, as the config's `test_cfg` (score threshold, NMS, `max_per_img`)
    /// selects them. The images run as one batch (padded to the largest).
    ///
    /// Errors: the model is a segmentor; unreadable images; non-RGB arrays.
    pub fn detect(&self, inputs: &[ImageInput]) -> Result<Vec<Detections>, EngineError> {
        let det = self.model.inference_detector()?;
        if inputs.is_empty() {
            return Ok(Vec::new());
        }
        let samples = self.prepare(inputs)?;
        let batch = to_batch(&self.model, samples, &self.model.device, false)?;
        let (x, metas, _) = model_inputs(&batch);
        det.predict(&x, &metas).ctx("detector inference")
    }

    /// Label maps `(H, W)` (original image size) of 0-based class indices per input image
    /// (`whole` or `slide` inference as the config's `test_cfg` says). The images run as one
    /// batch (padded to the largest).
    ///
    /// Errors: the model is a detector; unreadable images; non-RGB arrays.
    pub fn segment(&self, inputs: &[ImageInput]) -> Result<Vec<Array2<u32>>, EngineError> {
        let seg = self.model.inference_segmentor()?;
        if inputs.is_empty() {
            return Ok(Vec::new());
        }
        let samples = self.prepare(inputs)?;
        let batch = to_batch(&self.model, samples, &self.model.device, false)?;
        let img_shapes: Vec<_> = batch.samples.iter().map(|s| s.img_shape).collect();
        let ori_shapes: Vec<_> = batch.samples.iter().map(|s| s.ori_shape).collect();
        let preds = seg
            .predict(&batch.images, &img_shapes, &ori_shapes)
            .ctx("segmentor inference")?;
        preds
            .into_iter()
            .map(|p| {
                let p = p.to_dtype(DType::U32).ctx("label map")?;
                let (h, w) = p.dims2().ctx("label map")?;
                let v = p
                    .flatten_all()
                    .and_then(|t| t.to_vec1::<u32>())
                    .ctx("label map")?;
                Array2::from_shape_vec((h, w), v)
                    .map_err(|e| EngineError::Config(format!("label map: {e}")))
            })
            .collect()
    }
}
