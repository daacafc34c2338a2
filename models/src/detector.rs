//! Detectors, built from the `[model]` table: one-stage (mmdetection's `SingleStageDetector`:
//! RetinaNet, ATSS — backbone → neck → dense head) and two-stage (`TwoStageDetector`: Faster and
//! Mask R-CNN — backbone → neck → RPN → RoI head). Both are one [`Detector`] with the same
//! `loss` / `predict` interface, checkpoint format and config style.

use candle_core::{Result, Tensor};
use candle_nn::VarBuilder;
use densepred_backbones::{AnyBackbone, Backbone, BackboneConfig};
use densepred_core::structures::{Detections, GtInstances, ImageMeta};
use densepred_heads::dense::{
    AtssHead, AtssHeadConfig, DenseHead, DenseTestConfig, DenseTrainConfig, RetinaHead,
    RetinaHeadConfig, RpnHead, RpnHeadType, RpnProposalConfig, RpnTrainConfig,
};
use densepred_heads::roi::{RcnnTestConfig, RcnnTrainConfig, RoIHeadConfig, StandardRoIHead};
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
    /// Pad GT masks to the batch size (Mask R-CNN sets it): the RoI head always reads GT masks
    /// as zero beyond their stored size, which is what padding gives, so either value trains the
    /// same.
    #[serde(default)]
    pub pad_mask: bool,
}

densepred_core::config_by_type! {
    /// `model.bbox_head` table of a one-stage detector.
    pub enum DenseHeadConfig {
        /// RetinaNet's head.
        "RetinaHead" => RetinaHead(RetinaHeadConfig),
        /// ATSS's head.
        "ATSSHead" => AtssHead(AtssHeadConfig),
    }
}

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

/// `model.train_cfg` of a two-stage detector.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TwoStageTrainConfig {
    /// RPN assignment and sampling.
    pub rpn: RpnTrainConfig,
    /// How training proposals are made.
    pub rpn_proposal: RpnProposalConfig,
    /// RoI head assignment and sampling.
    pub rcnn: RcnnTrainConfig,
}

/// `model.test_cfg` of a two-stage detector.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TwoStageTestConfig {
    /// How test proposals are made.
    pub rpn: RpnProposalConfig,
    /// Box and mask post-processing.
    pub rcnn: RcnnTestConfig,
}

/// The body of `type = "MaskRCNN"` / `"FasterRCNN"` (mmdetection's `TwoStageDetector`
/// arguments).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TwoStageDetectorConfig {
    /// Normalisation and padding.
    pub data_preprocessor: DataPreprocessorConfig,
    /// Backbone.
    pub backbone: BackboneConfig,
    /// Neck.
    pub neck: NeckConfig,
    /// Region proposal network.
    pub rpn_head: RpnHeadType,
    /// Second stage.
    pub roi_head: RoIHeadConfig,
    /// Assignment and sampling settings (required for training).
    #[serde(default)]
    pub train_cfg: Option<TwoStageTrainConfig>,
    /// Proposal and post-processing settings.
    pub test_cfg: TwoStageTestConfig,
}

/// The heads of a built detector.
enum Heads {
    Dense {
        cfg: DetectorConfig,
        head: Box<dyn DenseHead>,
    },
    TwoStage {
        cfg: TwoStageDetectorConfig,
        rpn: RpnHead,
        roi: StandardRoIHead,
    },
}

/// A built detector. Parameters live under mmdetection's state-dict keys: `backbone.*`,
/// `neck.*` and `bbox_head.*` (one-stage) or `rpn_head.*` and `roi_head.*` (two-stage).
pub struct Detector {
    model_cfg: ModelConfig,
    /// The backbone.
    pub backbone: AnyBackbone,
    neck: Box<dyn Neck>,
    heads: Heads,
}

fn check_preprocessor(dp: &DataPreprocessorConfig) -> Result<()> {
    if dp.pad_value.is_some_and(|v| v != 0.0) {
        candle_core::bail!("model.data_preprocessor.pad_value: only 0 is supported (batches are padded with zeros)");
    }
    if !dp.bgr_to_rgb {
        candle_core::bail!("model.data_preprocessor.bgr_to_rgb = false is not supported: densepred decodes images as RGB");
    }
    Ok(())
}

impl Detector {
    /// Builds the detector that `cfg` describes with parameters from (or created in) `vb`.
    ///
    /// Errors: inconsistent component configs (the message names the component and field), a
    /// head type that does not fit the model type (RetinaNet needs RetinaHead, ATSS ATSSHead), a
    /// segmentor config.
    pub fn new(vb: VarBuilder, cfg: &ModelConfig) -> Result<Self> {
        let dp = cfg.data_preprocessor().ok_or_else(|| {
            candle_core::Error::msg(
                "model.type = \"EncoderDecoder\" is a segmentor, not a detector",
            )
        })?;
        check_preprocessor(dp)?;
        let backbone = AnyBackbone::new(vb.pp("backbone"), cfg.backbone())?;
        let heads = match cfg {
            ModelConfig::MaskRcnn(c) | ModelConfig::FasterRcnn(c) => {
                let rpn = RpnHead::new(vb.pp("rpn_head"), c.rpn_head.body())?;
                let roi = StandardRoIHead::new(vb.pp("roi_head"), &c.roi_head)?;
                if matches!(cfg, ModelConfig::MaskRcnn(_)) && !roi.with_mask() {
                    candle_core::bail!("model.type = \"MaskRCNN\" needs roi_head.mask_head and roi_head.mask_roi_extractor");
                }
                Heads::TwoStage {
                    cfg: c.clone(),
                    rpn,
                    roi,
                }
            }
            _ => {
                let c = cfg.detector().expect("a one-stage detector");
                let head: Box<dyn DenseHead> = match (cfg, &c.bbox_head) {
                    (ModelConfig::RetinaNet(_), DenseHeadConfig::RetinaHead(h)) => {
                        Box::new(RetinaHead::new(vb.pp("bbox_head"), h)?)
                    }
                    (ModelConfig::Atss(_), DenseHeadConfig::AtssHead(h)) => {
                        Box::new(AtssHead::new(vb.pp("bbox_head"), h)?)
                    }
                    _ => candle_core::bail!("model.bbox_head.type does not match model.type (RetinaNet uses RetinaHead, ATSS uses ATSSHead)"),
                };
                Heads::Dense {
                    cfg: c.clone(),
                    head,
                }
            }
        };
        let neck = cfg
            .neck()
            .expect("detectors have a neck")
            .build(vb.pp("neck"), &backbone)?;
        Ok(Self {
            model_cfg: cfg.clone(),
            backbone,
            neck,
            heads,
        })
    }

    /// The `[model]` config this detector was built from.
    pub fn model_config(&self) -> &ModelConfig {
        &self.model_cfg
    }

    /// Number of object classes.
    pub fn num_classes(&self) -> usize {
        match &self.heads {
            Heads::Dense { cfg, .. } => cfg.bbox_head.num_classes(),
            Heads::TwoStage { roi, .. } => roi.num_classes(),
        }
    }

    /// Whether the detector predicts instance masks.
    pub fn with_mask(&self) -> bool {
        matches!(&self.heads, Heads::TwoStage { roi, .. } if roi.with_mask())
    }

    /// Backbone then neck: `(B, 3, H, W)` → pyramid levels `(B, C, H_l, W_l)`.
    pub fn extract_feat(&self, images: &Tensor, train: bool) -> Result<Vec<Tensor>> {
        let x = self.backbone.forward(images, train)?;
        self.neck.forward(&x)
    }

    /// Training forward: named scalar losses (each summed over levels, mmdetection's
    /// `parse_losses` order: head order of names). Two-stage detectors return the RPN's
    /// `loss_rpn_cls`, `loss_rpn_bbox`, then the RoI head's `loss_cls`, `loss_bbox` and
    /// `loss_mask`; the RPN and R-CNN samplers draw from the run's seeded generator
    /// ([`densepred_core::rng`]).
    ///
    /// `images` `(B, 3, H, W)` normalised and padded; `metas` / `gts` one per image, GT boxes (and
    /// masks) in the `img_shape` frame.
    ///
    /// Errors: missing `train_cfg`; a mask head without GT masks; candle errors.
    pub fn loss(
        &self,
        images: &Tensor,
        metas: &[ImageMeta],
        gts: &[GtInstances],
    ) -> Result<Vec<(String, Tensor)>> {
        Ok(self.loss_with_proposals(images, metas, gts, None)?.0)
    }

    /// [`Detector::loss`], with the RoI head of a two-stage detector run on `proposals` (per
    /// image, xyxy in the `img_shape` frame) instead of the RPN's own when given (mmdetection's
    /// `TwoStageDetector.loss` with proposals in the data samples); the RPN losses are computed
    /// either way. Returns the losses and the proposals the RoI head ran on (none for a
    /// single-stage detector).
    ///
    /// Errors: as [`Detector::loss`]; `proposals` for a single-stage detector, or not one list
    /// per image.
    pub fn loss_with_proposals(
        &self,
        images: &Tensor,
        metas: &[ImageMeta],
        gts: &[GtInstances],
        proposals: Option<&[Vec<[f32; 4]>]>,
    ) -> Result<(Vec<(String, Tensor)>, Vec<Vec<[f32; 4]>>)> {
        let missing = || candle_core::Error::msg("model.train_cfg is required for training");
        if let Some(p) = proposals {
            if p.len() != metas.len() {
                candle_core::bail!(
                    "proposals for {} images in a batch of {}",
                    p.len(),
                    metas.len()
                );
            }
        }
        let feats = self.extract_feat(images, true)?;
        match &self.heads {
            Heads::Dense { cfg, head } => {
                if proposals.is_some() {
                    candle_core::bail!("a single-stage detector takes no proposals");
                }
                let train_cfg = cfg.train_cfg.as_ref().ok_or_else(missing)?;
                let outs = head.forward(&feats)?;
                Ok((
                    sum_levels(head.loss_by_feat(&outs, metas, gts, train_cfg)?)?,
                    Vec::new(),
                ))
            }
            Heads::TwoStage { cfg, rpn, roi } => {
                let train_cfg = cfg.train_cfg.as_ref().ok_or_else(missing)?;
                let outs = rpn.forward(&feats)?;
                // mmdetection's TwoStageDetector.loss: every GT is "an object" for the RPN.
                let objects: Vec<GtInstances> = gts
                    .iter()
                    .map(|g| GtInstances {
                        bboxes: g.bboxes.clone(),
                        labels: vec![0; g.labels.len()],
                        ignored: g.ignored.clone(),
                        masks: None,
                    })
                    .collect();
                let rpn_losses = densepred_core::rng::with_rng(|rng| {
                    rpn.loss_by_feat(&outs, metas, &objects, &train_cfg.rpn, rng)
                })?;
                let proposals: Vec<Vec<[f32; 4]>> = match proposals {
                    Some(p) => p.to_vec(),
                    None => rpn
                        .predict_by_feat(&outs, metas, &train_cfg.rpn_proposal)?
                        .into_iter()
                        .map(|p| p.bboxes)
                        .collect(),
                };
                // GT masks padded to the batch, as mmdetection's `pad_mask`.
                let (_, _, bh, bw) = images.dims4()?;
                let padded: Vec<GtInstances> = gts
                    .iter()
                    .map(|g| GtInstances {
                        masks: g.masks.as_ref().map(|m| m.padded(bh, bw)),
                        ..g.clone()
                    })
                    .collect();
                let roi_losses = densepred_core::rng::with_rng(|rng| {
                    roi.loss(&feats, &proposals, &padded, &train_cfg.rcnn, rng)
                })?;
                let mut losses = sum_levels(rpn_losses)?;
                losses.extend(roi_losses.losses);
                Ok((losses, proposals))
            }
        }
    }

    /// Inference: detections per image, boxes in original-image pixels; two-stage detectors with
    /// a mask head add binary masks of the original image size.
    ///
    /// Errors: candle errors.
    pub fn predict(&self, images: &Tensor, metas: &[ImageMeta]) -> Result<Vec<Detections>> {
        let feats = self.extract_feat(images, false)?;
        match &self.heads {
            Heads::Dense { cfg, head } => {
                let outs = head.forward(&feats)?;
                head.predict_by_feat(&outs, metas, &cfg.test_cfg)
            }
            Heads::TwoStage { cfg, rpn, roi } => {
                let outs = rpn.forward(&feats)?;
                let proposals: Vec<Vec<[f32; 4]>> = rpn
                    .predict_by_feat(&outs, metas, &cfg.test_cfg.rpn)?
                    .into_iter()
                    .map(|p| p.bboxes)
                    .collect();
                roi.predict(&feats, &proposals, metas, &cfg.test_cfg.rcnn)
            }
        }
    }
}

/// Sums each named per-level loss over the levels.
fn sum_levels(per_level: Vec<(String, Vec<Tensor>)>) -> Result<Vec<(String, Tensor)>> {
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
