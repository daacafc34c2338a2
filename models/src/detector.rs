//! Single-stage detectors (mmdetection's `SingleStageDetector`: RetinaNet, ATSS): backbone → neck
//! → dense head, built from the `[model]` table.

use candle_core::{Result, Tensor};
use candle_nn::VarBuilder;
use densepred_backbones::{AnyBackbone, Backbone, BackboneConfig};
use densepred_core::structures::{Detections, GtInstances, ImageMeta};
use densepred_heads::dense::{
    AtssHead, AtssHeadConfig, DenseHead, DenseTestConfig, DenseTrainConfig, RetinaHead,
    RetinaHeadConfig,
};
use densepred_necks::fpn::Fpn;
use densepred_necks::Neck;

use crate::config::{ModelConfig, NeckConfig};
use densepred_core::config::defaults as d;
use serde::{Deserialize, Serialize};

/// `model.data_preprocessor` (`type = "DetDataPreprocessor"`): per-channel normalisation of 0–255
/// RGB pixels and batch padding.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataPreprocessorConfig {
    /// `"DetDataPreprocessor"` (or `"SegDataPreProcessor"` for segmentors).
    #[serde(rename = "type")]
    pub kind: String,
    /// RGB means.
    pub mean: [f32; 3],
    /// RGB standard deviations.
    pub std: [f32; 3],
    /// mmdetection converts its BGR decodes to RGB; densepred decodes RGB, so this must be true.
    #[serde(default = "d::yes")]
    pub bgr_to_rgb: bool,
    /// Batch size padded up to a multiple of this.
    #[serde(default = "d::one_usize")]
    pub pad_size_divisor: usize,
    /// Value of the batch padding: only 0 (mmdetection's default) is supported.
    #[serde(default)]
    pub pad_value: Option<f64>,
}

/// `model.bbox_head` table of a one-stage detector.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "type")]
pub enum DenseHeadConfig {
    /// RetinaNet's head.
    RetinaHead(RetinaHeadConfig),
    /// ATSS's head.
    #[serde(rename = "ATSSHead")]
    AtssHead(AtssHeadConfig),
}

densepred_core::deserialize_by_type!(DenseHeadConfig {
    "RetinaHead" => DenseHeadConfig::RetinaHead [RetinaHeadConfig],
    "ATSSHead" => DenseHeadConfig::AtssHead [AtssHeadConfig],
});

impl DenseHeadConfig {
    /// Number of object classes.
    pub fn num_classes(&self) -> usize {
        match self {
            Self::RetinaHead(c) => c.num_classes,
            Self::AtssHead(c) => c.num_classes,
        }
    }
}

/// The body of `type = "RetinaNet"` / `"ATSS"` (mmdetection's `SingleStageDetector` arguments).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DetectorConfig {
    /// Normalisation and padding.
    pub data_preprocessor: DataPreprocessorConfig,
    /// Backbone.
    pub backbone: BackboneConfig,
    /// Neck.
    pub neck: NeckConfig,
    /// Dense head.
    pub bbox_head: DenseHeadConfig,
    /// Assignment settings (required for training).
    #[serde(default)]
    pub train_cfg: Option<DenseTrainConfig>,
    /// Post-processing settings.
    pub test_cfg: DenseTestConfig,
}

/// A built one-stage detector. Parameters live under `backbone.*`, `neck.*` and `bbox_head.*`,
/// mmdetection's state-dict keys.
pub struct Detector {
    model_cfg: ModelConfig,
    cfg: DetectorConfig,
    /// The backbone.
    pub backbone: AnyBackbone,
    neck: Box<dyn Neck>,
    head: Box<dyn DenseHead>,
}

impl Detector {
    /// Builds the detector that `cfg` describes with parameters from (or created in) `vb`.
    ///
    /// Errors: inconsistent component configs (the message names the component and field), a
    /// head type that does not fit the model type (RetinaNet needs RetinaHead, ATSS ATSSHead), a
    /// segmentor config.
    pub fn new(vb: VarBuilder, cfg: &ModelConfig) -> Result<Self> {
        let c = cfg.detector().ok_or_else(|| {
            candle_core::Error::msg(
                "model.type = \"EncoderDecoder\" is a segmentor, not a detector",
            )
        })?;
        match (cfg, &c.bbox_head) {
            (ModelConfig::RetinaNet(_), DenseHeadConfig::RetinaHead(_)) | (ModelConfig::Atss(_), DenseHeadConfig::AtssHead(_)) => {}
            _ => candle_core::bail!("model.bbox_head.type does not match model.type (RetinaNet uses RetinaHead, ATSS uses ATSSHead)"),
        }
        if c.data_preprocessor.pad_value.is_some_and(|v| v != 0.0) {
            candle_core::bail!("model.data_preprocessor.pad_value: only 0 is supported (batches are padded with zeros)");
        }
        if !c.data_preprocessor.bgr_to_rgb {
            candle_core::bail!("model.data_preprocessor.bgr_to_rgb = false is not supported: densepred decodes images as RGB");
        }
        let backbone = AnyBackbone::new(vb.pp("backbone"), &c.backbone)?;
        let neck: Box<dyn Neck> = match &c.neck {
            NeckConfig::Fpn(f) => {
                let shapes = backbone.out_shapes();
                let got: Vec<usize> = shapes.iter().map(|s| s.channels).collect();
                if got != f.in_channels {
                    candle_core::bail!("model.neck.in_channels {:?} do not match the backbone's output channels {:?}", f.in_channels, got);
                }
                Box::new(Fpn::new(vb.pp("neck"), f)?)
            }
        };
        let head: Box<dyn DenseHead> = match &c.bbox_head {
            DenseHeadConfig::RetinaHead(h) => Box::new(RetinaHead::new(vb.pp("bbox_head"), h)?),
            DenseHeadConfig::AtssHead(h) => Box::new(AtssHead::new(vb.pp("bbox_head"), h)?),
        };
        Ok(Self {
            model_cfg: cfg.clone(),
            cfg: c.clone(),
            backbone,
            neck,
            head,
        })
    }

    /// The `[model]` config this detector was built from.
    pub fn model_config(&self) -> &ModelConfig {
        &self.model_cfg
    }

    /// The detector config.
    pub fn config(&self) -> &DetectorConfig {
        &self.cfg
    }

    /// Number of object classes.
    pub fn num_classes(&self) -> usize {
        self.cfg.bbox_head.num_classes()
    }

    /// Backbone then neck: `(B, 3, H, W)` → pyramid levels `(B, C, H_l, W_l)`.
    pub fn extract_feat(&self, images: &Tensor, train: bool) -> Result<Vec<Tensor>> {
        let x = self.backbone.forward(images, train)?;
        self.neck.forward(&x)
    }

    /// Training forward: named scalar losses (each summed over levels, mmdetection's
    /// `parse_losses` order: head order of names).
    ///
    /// `images` `(B, 3, H, W)` normalised and padded; `metas` / `gts` one per image, GT boxes in
    /// the `img_shape` frame.
    ///
    /// Errors: missing `train_cfg`; candle errors.
    pub fn loss(
        &self,
        images: &Tensor,
        metas: &[ImageMeta],
        gts: &[GtInstances],
    ) -> Result<Vec<(String, Tensor)>> {
        let train_cfg =
            self.cfg.train_cfg.as_ref().ok_or_else(|| {
                candle_core::Error::msg("model.train_cfg is required for training")
            })?;
        let feats = self.extract_feat(images, true)?;
        let outs = self.head.forward(&feats)?;
        let per_level = self.head.loss_by_feat(&outs, metas, gts, train_cfg)?;
        per_level
            .into_iter()
            .map(|(name, levels)| {
                let mut it = levels.into_iter();
                let first = it
                    .next()
                    .ok_or_else(|| candle_core::Error::msg(format!("{name}: no levels")))?;
                let s = it.try_fold(first, |a, b| a + b)?;
                Ok((name, s))
            })
            .collect()
    }

    /// Inference: detections per image, boxes in original-image pixels.
    ///
    /// Errors: candle errors.
    pub fn predict(&self, images: &Tensor, metas: &[ImageMeta]) -> Result<Vec<Detections>> {
        let feats = self.extract_feat(images, false)?;
        let outs = self.head.forward(&feats)?;
        self.head.predict_by_feat(&outs, metas, &self.cfg.test_cfg)
    }
}
