//! RetinaHead (Lin et al. 2017, "Focal Loss for Dense Object Detection", §4 and Fig. 3), as
//! mmdetection 3.x's `mmdet.models.dense_heads.RetinaHead`: per level, two towers of
//! `stacked_convs` 3x3 ConvModules (cls and reg), then `retina_cls` (A·C logits) and `retina_reg`
//! (A·4 deltas); sigmoid focal loss and L1 / smooth-L1 on encoded deltas, both divided by the
//! number of positive anchors in the batch; `predict_by_feat` post-processing.

use super::common::*;
use candle_core::{Result, Tensor};
use candle_nn::VarBuilder;
use densepred_core::config::defaults as d;
use densepred_core::losses::{l1_loss, sigmoid_focal_loss, smooth_l1_loss, Reduction};
use densepred_core::nn::Conv2d;
use densepred_core::structures::{Detections, ImageMeta};
use serde::{Deserialize, Serialize};

/// `type = "RetinaHead"` (mmdetection's keyword arguments).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetinaHeadConfig {
    /// Object classes (no background).
    pub num_classes: usize,
    /// Channels of the FPN levels.
    pub in_channels: usize,
    /// 3x3 convs per tower.
    #[serde(default = "d::four_usize")]
    pub stacked_convs: usize,
    /// Channels of the towers.
    #[serde(default = "d::c256")]
    pub feat_channels: usize,
    /// Anchors.
    pub anchor_generator: PriorGeneratorConfig,
    /// Box encoding.
    pub bbox_coder: BBoxCoderConfig,
    /// Classification loss (focal).
    pub loss_cls: ClsLossConfig,
    /// Regression loss.
    pub loss_bbox: BoxLossConfig,
    /// Optional norm in the towers.
    #[serde(default)]
    pub norm_cfg: Option<NormConfig>,
    /// Regress decoded boxes (GIoU) instead of deltas.
    #[serde(default)]
    pub reg_decoded_bbox: bool,
    /// Not supported: the head is initialised as mmdetection's RetinaHead default (N(0, 0.01),
    /// classification bias from prior probability 0.01).
    #[serde(default)]
    pub init_cfg: Option<densepred_core::config::Unsupported>,
}

/// Raw outputs of a dense head, one tensor per level.
pub struct DenseOutputs {
    /// `(B, A·C, H_l, W_l)` logits.
    pub cls_scores: Vec<Tensor>,
    /// `(B, A·4, H_l, W_l)` deltas.
    pub bbox_preds: Vec<Tensor>,
    /// `(B, A, H_l, W_l)` centerness logits (ATSS).
    pub centernesses: Option<Vec<Tensor>>,
}

/// Per-level values of each named loss (mmdetection's `loss_by_feat` dict of lists).
pub type LevelLosses = Vec<(String, Vec<Tensor>)>;

/// The built RetinaHead.
pub struct RetinaHead {
    pub(super) cfg: RetinaHeadConfig,
    towers: ConvTowers,
    retina_cls: Conv2d,
    retina_reg: Conv2d,
    num_anchors: usize,
}

impl RetinaHead {
    /// Builds the head under `vb` (`cls_convs.{i}.conv.*`, `reg_convs.*`, `retina_cls.*`,
    /// `retina_reg.*`).
    ///
    /// Errors: `use_sigmoid = false`, GIoU without `reg_decoded_bbox`, bad anchor options.
    pub fn new(vb: VarBuilder, cfg: &RetinaHeadConfig) -> Result<Self> {
        let ClsLossConfig::FocalLoss { use_sigmoid, .. } = cfg.loss_cls;
        if !use_sigmoid {
            candle_core::bail!("RetinaHead: loss_cls.use_sigmoid must be true");
        }
        if matches!(cfg.loss_bbox, BoxLossConfig::GIoULoss { .. }) && !cfg.reg_decoded_bbox {
            candle_core::bail!("RetinaHead: GIoULoss needs reg_decoded_bbox = true");
        }
        let num_anchors = cfg.anchor_generator.generator().num_base_priors()?;
        let towers = ConvTowers::new(
            &vb,
            cfg.stacked_convs,
            cfg.in_channels,
            cfg.feat_channels,
            cfg.norm_cfg.as_ref(),
        )?;
        let last = towers.out_channels;
        let retina_cls = pred_conv(
            vb.pp("retina_cls"),
            last,
            num_anchors * cfg.num_classes,
            bias_init_with_prob(0.01),
        )?;
        let retina_reg = pred_conv(vb.pp("retina_reg"), last, num_anchors * 4, 0.0)?;
        Ok(Self {
            cfg: cfg.clone(),
            towers,
            retina_cls,
            retina_reg,
            num_anchors,
        })
    }

    /// The config.
    pub fn config(&self) -> &RetinaHeadConfig {
        &self.cfg
    }

    /// Anchors per location.
    pub fn num_anchors(&self) -> usize {
        self.num_anchors
    }

    /// `feats`: FPN levels `(B, in_channels, H_l, W_l)` → logits `(B, A·C, H_l, W_l)` and deltas
    /// `(B, A·4, H_l, W_l)` per level (channel = anchor·C + class).
    pub fn forward(&self, feats: &[Tensor]) -> Result<DenseOutputs> {
        let mut cls_scores = Vec::with_capacity(feats.len());
        let mut bbox_preds = Vec::with_capacity(feats.len());
        for x in feats {
            let (c, r) = self.towers.forward(x)?;
            cls_scores.push(self.retina_cls.forward(&c)?);
            bbox_preds.push(self.retina_reg.forward(&r)?);
        }
        Ok(DenseOutputs {
            cls_scores,
            bbox_preds,
            centernesses: None,
        })
    }

    /// mmdetection's `loss_by_feat`: `loss_cls` and `loss_bbox` per level, each a sum divided by
    /// the number of positive anchors of the batch (`avg_factor`; 1 when there are none, where
    /// mmdetection would divide by f32 eps).
    /// From precomputed targets ([`super::AnchorHead::loss_by_feat`] computes them).
    ///
    /// Errors: candle errors; mismatched batch sizes.
    pub fn loss_from_targets(
        &self,
        outs: &DenseOutputs,
        anchors: &Anchors,
        targets: &[ImageTargets],
    ) -> Result<LevelLosses> {
        let num_pos: usize = targets.iter().map(|t| t.pos_inds.len()).sum();
        let avg = if num_pos == 0 { 1.0 } else { num_pos as f64 };
        let ClsLossConfig::FocalLoss {
            gamma,
            alpha,
            loss_weight: wc,
            ..
        } = self.cfg.loss_cls;
        let coder = self.cfg.bbox_coder.coder();
        let (mut lc, mut lb) = (Vec::new(), Vec::new());
        for l in 0..outs.cls_scores.len() {
            let dev = outs.cls_scores[l].device().clone();
            let lt = LevelTargets::gather(anchors, targets, l, &dev)?;
            let cls = flatten_level(&outs.cls_scores[l], self.cfg.num_classes)?.flatten_to(1)?;
            let loss_cls = sigmoid_focal_loss(
                &cls,
                &lt.labels,
                gamma,
                alpha,
                Some(&lt.label_weights),
                Reduction::Mean,
                Some(avg),
            )?;
            lc.push((loss_cls * wc)?);
            let reg = flatten_level(&outs.bbox_preds[l], 4)?.flatten_to(1)?;
            let loss_bbox = if lt.pos_rows.is_empty() {
                (reg.sum_all()? * 0.0)?
            } else {
                let pred = reg.index_select(&lt.pos_rows_tensor(&dev)?, 0)?;
                let pa = lt.pos_anchors_tensor(&dev)?;
                let pg = lt.pos_gt_tensor(&dev)?;
                match &self.cfg.loss_bbox {
                    BoxLossConfig::L1Loss { .. } => l1_loss(
                        &pred,
                        &coder.encode(&pa, &pg)?,
                        None,
                        Reduction::Mean,
                        Some(avg),
                    )?,
                    BoxLossConfig::SmoothL1Loss { beta, .. } => smooth_l1_loss(
                        &pred,
                        &coder.encode(&pa, &pg)?,
                        *beta,
                        None,
                        Reduction::Mean,
                        Some(avg),
                    )?,
                    BoxLossConfig::GIoULoss { eps, .. } => {
                        let dec =
                            coder.decode(&pa, &pred, None, crate::task::coder::WH_RATIO_CLIP)?;
                        densepred_core::losses::giou_loss(
                            &dec,
                            &pg,
                            None,
                            Reduction::Mean,
                            Some(avg),
                            *eps,
                        )?
                    }
                }
            };
            lb.push((loss_bbox * self.cfg.loss_bbox.loss_weight())?);
        }
        Ok(vec![("loss_cls".into(), lc), ("loss_bbox".into(), lb)])
    }

    /// mmdetection's `predict_by_feat(rescale=True)`: detections per image in original-image
    /// pixels.
    ///
    /// Errors: candle errors; `metas` shorter than the batch.
    pub fn predict_by_feat(
        &self,
        outs: &DenseOutputs,
        metas: &[ImageMeta],
        test_cfg: &DenseTestConfig,
    ) -> Result<Vec<Detections>> {
        predict_batch(
            &outs.cls_scores,
            &outs.bbox_preds,
            None,
            self.cfg.anchor_generator.generator(),
            self.cfg.bbox_coder.coder(),
            self.cfg.num_classes,
            test_cfg,
            metas,
        )
    }
}
