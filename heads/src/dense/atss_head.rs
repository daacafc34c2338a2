//! ATSSHead (Zhang et al. 2020, "Bridging the Gap Between Anchor-based and Anchor-free Detection
//! via Adaptive Training Sample Selection", §3–4), as mmdetection 3.x's
//! `mmdet.models.dense_heads.ATSSHead`: GN towers, one anchor per location, `atss_cls`,
//! `atss_reg` (multiplied by a learnable per-level `Scale`) and `atss_centerness`; ATSS
//! assignment; sigmoid focal loss over the positives count, GIoU on decoded boxes weighted by the
//! centerness target and divided by its sum, and centerness BCE.

use super::common::*;
use super::retina_head::{DenseOutputs, LevelLosses};
use candle_core::{Result, Tensor};
use candle_nn::{Init, VarBuilder};
use densepred_core::config::defaults as d;
use densepred_core::losses::{
    binary_cross_entropy_with_logits, giou_loss, sigmoid_focal_loss, Reduction,
};
use densepred_core::nn::Conv2d;
use densepred_core::structures::{Detections, ImageMeta};
use serde::{Deserialize, Serialize};

fn gn32() -> Option<NormConfig> {
    Some(NormConfig::GN {
        num_groups: 32,
        requires_grad: true,
    })
}

/// `type = "ATSSHead"` (mmdetection's keyword arguments).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AtssHeadConfig {
    /// Object classes (no background).
    pub num_classes: usize,
    /// Channels of the FPN levels.
    pub in_channels: usize,
    /// 3x3 ConvModules per tower.
    #[serde(default = "d::four_usize")]
    pub stacked_convs: usize,
    /// Channels of the towers.
    #[serde(default = "d::c256")]
    pub feat_channels: usize,
    /// Tower norm (default GN with 32 groups).
    #[serde(default = "gn32")]
    pub norm_cfg: Option<NormConfig>,
    /// Kernel of the prediction convs (only 3).
    #[serde(default = "d::three_usize")]
    pub pred_kernel_size: usize,
    /// Anchors (ATSS: `octave_base_scale = 8`, one ratio).
    pub anchor_generator: PriorGeneratorConfig,
    /// Box encoding (stds 0.1, 0.1, 0.2, 0.2).
    pub bbox_coder: BBoxCoderConfig,
    /// Classification loss (focal).
    pub loss_cls: ClsLossConfig,
    /// GIoU on decoded boxes.
    pub loss_bbox: BoxLossConfig,
    /// Centerness BCE.
    pub loss_centerness: BceLossConfig,
    /// Must be true (the loss is computed on decoded boxes).
    #[serde(default = "d::yes")]
    pub reg_decoded_bbox: bool,
    /// Not supported: the head is initialised as mmdetection's ATSSHead default (N(0, 0.01),
    /// classification bias from prior probability 0.01).
    #[serde(default)]
    pub init_cfg: Option<densepred_core::config::Unsupported>,
}

/// The built ATSSHead.
pub struct AtssHead {
    pub(super) cfg: AtssHeadConfig,
    towers: ConvTowers,
    atss_cls: Conv2d,
    atss_reg: Conv2d,
    atss_centerness: Conv2d,
    scales: Vec<Tensor>,
    num_anchors: usize,
}

/// ATSS's centerness target `sqrt(min(l, r)/max(l, r) · min(t, b)/max(t, b))` of each anchor
/// centre inside its GT box (f32, mmdetection's `centerness_target`).
pub fn centerness_target(anchors: &[[f32; 4]], gts: &[[f32; 4]]) -> Vec<f32> {
    anchors
        .iter()
        .zip(gts)
        .map(|(a, g)| {
            let cx = (a[2] + a[0]) / 2.0;
            let cy = (a[3] + a[1]) / 2.0;
            let (l, t, r, b) = (cx - g[0], cy - g[1], g[2] - cx, g[3] - cy);
            ((l.min(r) / l.max(r)) * (t.min(b) / t.max(b))).sqrt()
        })
        .collect()
}

impl AtssHead {
    /// Builds the head under `vb` (`cls_convs.{i}.{conv,gn}.*`, `reg_convs.*`, `atss_cls.*`,
    /// `atss_reg.*`, `atss_centerness.*`, `scales.{l}.scale`), one `Scale` per anchor stride.
    ///
    /// Errors: unsupported options (`use_sigmoid = false`, a non-GIoU box loss,
    /// `reg_decoded_bbox = false`, `pred_kernel_size ≠ 3`).
    pub fn new(vb: VarBuilder, cfg: &AtssHeadConfig) -> Result<Self> {
        let ClsLossConfig::FocalLoss { use_sigmoid, .. } = cfg.loss_cls;
        let BceLossConfig::CrossEntropyLoss {
            use_sigmoid: ctr_sigmoid,
            ..
        } = cfg.loss_centerness;
        if !use_sigmoid || !ctr_sigmoid {
            candle_core::bail!("ATSSHead: loss_cls and loss_centerness need use_sigmoid = true");
        }
        if !matches!(cfg.loss_bbox, BoxLossConfig::GIoULoss { .. }) || !cfg.reg_decoded_bbox {
            candle_core::bail!(
                "ATSSHead: only loss_bbox = GIoULoss with reg_decoded_bbox = true is supported"
            );
        }
        if cfg.pred_kernel_size != 3 {
            candle_core::bail!(
                "ATSSHead: pred_kernel_size {} is not supported (3)",
                cfg.pred_kernel_size
            );
        }
        let gen = cfg.anchor_generator.generator();
        let num_anchors = gen.num_base_priors()?;
        let towers = ConvTowers::new(
            &vb,
            cfg.stacked_convs,
            cfg.in_channels,
            cfg.feat_channels,
            cfg.norm_cfg.as_ref(),
        )?;
        let last = towers.out_channels;
        let atss_cls = pred_conv(
            vb.pp("atss_cls"),
            last,
            num_anchors * cfg.num_classes,
            bias_init_with_prob(0.01),
        )?;
        let atss_reg = pred_conv(vb.pp("atss_reg"), last, num_anchors * 4, 0.0)?;
        let atss_centerness = pred_conv(vb.pp("atss_centerness"), last, num_anchors, 0.0)?;
        let scales = (0..gen.strides.len())
            .map(|l| {
                vb.pp("scales")
                    .pp(l)
                    .get_with_hints((), "scale", Init::Const(1.0))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            cfg: cfg.clone(),
            towers,
            atss_cls,
            atss_reg,
            atss_centerness,
            scales,
            num_anchors,
        })
    }

    /// The config.
    pub fn config(&self) -> &AtssHeadConfig {
        &self.cfg
    }

    /// Anchors per location.
    pub fn num_anchors(&self) -> usize {
        self.num_anchors
    }

    /// FPN levels `(B, in_channels, H_l, W_l)` → logits `(B, A·C, H_l, W_l)`, scaled deltas
    /// `(B, A·4, H_l, W_l)` and centerness logits `(B, A, H_l, W_l)` per level.
    ///
    /// Errors: more levels than scales.
    pub fn forward(&self, feats: &[Tensor]) -> Result<DenseOutputs> {
        if feats.len() > self.scales.len() {
            candle_core::bail!(
                "ATSSHead: {} levels for {} scales",
                feats.len(),
                self.scales.len()
            );
        }
        let (mut cls_scores, mut bbox_preds, mut ctrs) = (Vec::new(), Vec::new(), Vec::new());
        for (l, x) in feats.iter().enumerate() {
            let (c, r) = self.towers.forward(x)?;
            cls_scores.push(self.atss_cls.forward(&c)?);
            bbox_preds.push(self.atss_reg.forward(&r)?.broadcast_mul(&self.scales[l])?);
            ctrs.push(self.atss_centerness.forward(&r)?);
        }
        Ok(DenseOutputs {
            cls_scores,
            bbox_preds,
            centernesses: Some(ctrs),
        })
    }

    /// mmdetection's `ATSSHead.loss_by_feat`: per level `loss_cls` (focal / max(#pos, 1)),
    /// `loss_bbox` (centerness-weighted GIoU of the decoded positives, divided by the batch's sum
    /// of centerness targets clamped to ≥ 1) and `loss_centerness` (BCE / max(#pos, 1)).
    /// From precomputed targets ([`super::AnchorHead::loss_by_feat`] computes them).
    ///
    /// Errors: candle errors.
    pub fn loss_from_targets(
        &self,
        outs: &DenseOutputs,
        anchors: &Anchors,
        targets: &[ImageTargets],
    ) -> Result<LevelLosses> {
        let ctrs = outs
            .centernesses
            .as_ref()
            .ok_or_else(|| candle_core::Error::msg("ATSSHead: outputs without centerness"))?;
        let num_pos: usize = targets.iter().map(|t| t.pos_inds.len()).sum();
        let avg = (num_pos as f64).max(1.0);
        let ClsLossConfig::FocalLoss {
            gamma,
            alpha,
            loss_weight: wc,
            ..
        } = self.cfg.loss_cls;
        let BceLossConfig::CrossEntropyLoss {
            loss_weight: wctr, ..
        } = self.cfg.loss_centerness;
        let wb = self.cfg.loss_bbox.loss_weight();
        let coder = self.cfg.bbox_coder.coder();
        let (mut lc, mut lb, mut lctr) = (Vec::new(), Vec::new(), Vec::new());
        let mut ctr_sum = 0f32;
        for l in 0..outs.cls_scores.len() {
            let dev = outs.cls_scores[l].device().clone();
            let lt = LevelTargets::gather(anchors, targets, l, &dev)?;
            let cls = flatten_level(&outs.cls_scores[l], self.cfg.num_classes)?.flatten_to(1)?;
            lc.push(
                (sigmoid_focal_loss(
                    &cls,
                    &lt.labels,
                    gamma,
                    alpha,
                    Some(&lt.label_weights),
                    Reduction::Mean,
                    Some(avg),
                )? * wc)?,
            );
            let reg = flatten_level(&outs.bbox_preds[l], 4)?.flatten_to(1)?;
            let ctr = flatten_level(&ctrs[l], 1)?.flatten_all()?;
            if lt.pos_rows.is_empty() {
                lb.push((reg.sum_all()? * 0.0)?);
                lctr.push((ctr.sum_all()? * 0.0)?);
                continue;
            }
            let rows = lt.pos_rows_tensor(&dev)?;
            let ct = centerness_target(&lt.pos_anchors, &lt.pos_gt);
            ctr_sum += ct.iter().sum::<f32>();
            let ct = Tensor::new(ct.as_slice(), &dev)?;
            let pa = lt.pos_anchors_tensor(&dev)?;
            let dec = coder.decode(
                &pa,
                &reg.index_select(&rows, 0)?,
                None,
                crate::task::coder::WH_RATIO_CLIP,
            )?;
            lb.push(
                (giou_loss(
                    &dec,
                    &lt.pos_gt_tensor(&dev)?,
                    Some(&ct),
                    Reduction::Mean,
                    Some(1.0),
                    self.cfg.loss_bbox.giou_eps(),
                )? * wb)?,
            );
            let pc = ctr.index_select(&rows, 0)?;
            lctr.push(
                (binary_cross_entropy_with_logits(&pc, &ct, None, Reduction::Mean, Some(avg))?
                    * wctr)?,
            );
        }
        let bbox_avg = (ctr_sum as f64).max(1.0);
        let lb = lb
            .into_iter()
            .map(|x| x / bbox_avg)
            .collect::<Result<Vec<_>>>()?;
        Ok(vec![
            ("loss_cls".into(), lc),
            ("loss_bbox".into(), lb),
            ("loss_centerness".into(), lctr),
        ])
    }

    /// mmdetection's `predict_by_feat(rescale=True)`: `score_thr` and `nms_pre` act on the class
    /// score, NMS and the reported score use class score × sigmoid(centerness).
    ///
    /// Errors: candle errors.
    pub fn predict_by_feat(
        &self,
        outs: &DenseOutputs,
        metas: &[ImageMeta],
        test_cfg: &DenseTestConfig,
    ) -> Result<Vec<Detections>> {
        let ctrs = outs
            .centernesses
            .as_ref()
            .ok_or_else(|| candle_core::Error::msg("ATSSHead: outputs without centerness"))?;
        predict_batch(
            &outs.cls_scores,
            &outs.bbox_preds,
            Some(ctrs),
            self.cfg.anchor_generator.generator(),
            self.cfg.bbox_coder.coder(),
            self.cfg.num_classes,
            test_cfg,
            metas,
        )
    }
}
