//! RPNHead (Ren et al. 2015, "Faster R-CNN", §3.1; FPN variant of Lin et al. 2017, §4.1), as
//! mmdetection 3.x's `mmdet.models.dense_heads.RPNHead`: per level a 3x3 conv + ReLU shared by
//! `rpn_cls` (1x1, A objectness logits) and `rpn_reg` (1x1, A·4 deltas).
//!
//! Training: MaxIoU assignment over the anchors of valid cells, `RandomSampler` (256 anchors, half
//! positive), sigmoid cross-entropy on the sampled anchors and L1 on the sampled positives' deltas,
//! both divided by the number of sampled anchors of the batch. Proposals: per level the `nms_pre`
//! best objectness scores, decoded and clipped to `img_shape`, then boxes with `w` or `h` ≤
//! `min_bbox_size` dropped, NMS per level (the level id acts as the class) and the first
//! `max_per_img` kept — mmdetection's `RPNHead._predict_by_feat_single` with `rescale=False`.

use super::common::*;
use super::retina_head::{DenseOutputs, LevelLosses};
use crate::task::coder::WH_RATIO_CLIP;
use crate::task::sampler::SamplerConfig;
use candle_core::{DType, Device, Result, Tensor};
use candle_nn::VarBuilder;
use densepred_core::config::defaults as d;
use densepred_core::losses::{
    binary_cross_entropy_with_logits, l1_loss, smooth_l1_loss, Reduction,
};
use densepred_core::nn::Conv2d;
use densepred_core::ops::nms::batched_nms;
use densepred_core::structures::{GtInstances, ImageMeta};
use rand::Rng;
use serde::{Deserialize, Serialize};

/// `type = "RPNHead"` (mmdetection's keyword arguments; the head has one class, objectness).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RpnHeadConfig {
    /// Channels of the FPN levels.
    pub in_channels: usize,
    /// Channels of the shared 3x3 conv.
    #[serde(default = "d::c256")]
    pub feat_channels: usize,
    /// Number of shared 3x3 convs: only 1 (mmdetection's default) is supported.
    #[serde(default = "d::one_usize")]
    pub num_convs: usize,
    /// mmdetection forces 1 for the RPN; accepted only as 1.
    #[serde(default = "d::one_usize")]
    pub num_classes: usize,
    /// Anchors.
    pub anchor_generator: PriorGeneratorConfig,
    /// Box encoding.
    pub bbox_coder: BBoxCoderConfig,
    /// Objectness loss (`CrossEntropyLoss` with `use_sigmoid = true`).
    pub loss_cls: CrossEntropyLossConfig,
    /// Regression loss on encoded deltas.
    pub loss_bbox: BoxLossConfig,
    /// Not supported: the convs are initialised N(0, 0.01) with zero bias, mmdetection's RPNHead
    /// default.
    #[serde(default)]
    pub init_cfg: Option<densepred_core::config::Unsupported>,
}

/// `train_cfg.rpn` of a two-stage detector.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RpnTrainConfig {
    /// Which anchors learn from which GT box (`MaxIoUAssigner`).
    pub assigner: AssignerConfig,
    /// Which assigned anchors enter the loss.
    pub sampler: SamplerConfig,
    /// Only −1 (keep the anchors of every valid cell) is supported.
    #[serde(default = "d::neg_one_f64")]
    pub allowed_border: f64,
    /// Weight of positive anchors in the classification loss (≤ 0: 1).
    #[serde(default = "d::neg_one_f64")]
    pub pos_weight: f64,
    /// mmdetection's `debug` flag, read by no head; either value trains the same.
    #[serde(default)]
    pub debug: bool,
}

impl RpnTrainConfig {
    /// The assignment part as the dense heads' train config.
    pub fn dense(&self) -> DenseTrainConfig {
        DenseTrainConfig {
            assigner: self.assigner.clone(),
            allowed_border: self.allowed_border,
            pos_weight: self.pos_weight,
            debug: self.debug,
            sampler: None,
        }
    }
}

/// `test_cfg.rpn` / `train_cfg.rpn_proposal`: how proposals are made.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RpnProposalConfig {
    /// Best anchors kept per level before NMS (≤ 0: all).
    #[serde(default = "nms_pre")]
    pub nms_pre: i64,
    /// Proposals kept per image after NMS.
    #[serde(default = "nms_pre_usize")]
    pub max_per_img: usize,
    /// NMS across the levels' proposals, per level.
    pub nms: NmsConfig,
    /// Boxes whose width or height is ≤ this (pixels of `img_shape`) are dropped.
    #[serde(default)]
    pub min_bbox_size: f64,
}

fn nms_pre() -> i64 {
    1000
}
fn nms_pre_usize() -> usize {
    1000
}

/// Proposals of one image: boxes `(N, 4)` xyxy in `img_shape` pixels (clipped), objectness
/// scores in `[0, 1]`, best first.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Proposals {
    /// xyxy pixels of the resized image.
    pub bboxes: Vec<[f32; 4]>,
    /// Sigmoid objectness.
    pub scores: Vec<f32>,
}

/// The built RPNHead.
pub struct RpnHead {
    cfg: RpnHeadConfig,
    rpn_conv: Conv2d,
    rpn_cls: Conv2d,
    rpn_reg: Conv2d,
}

impl RpnHead {
    /// Builds the head under `vb` (`rpn_conv.*`, `rpn_cls.*`, `rpn_reg.*`).
    ///
    /// Errors: `num_convs` ≠ 1, `num_classes` ≠ 1, `loss_cls.use_sigmoid = false`, a GIoU box
    /// loss (the RPN regresses deltas), bad anchor options.
    pub fn new(vb: VarBuilder, cfg: &RpnHeadConfig) -> Result<Self> {
        if cfg.num_convs != 1 {
            candle_core::bail!(
                "rpn_head.num_convs = {}: only 1 is supported",
                cfg.num_convs
            );
        }
        if cfg.num_classes != 1 {
            candle_core::bail!("rpn_head.num_classes must be 1 (objectness)");
        }
        if !cfg.loss_cls.use_sigmoid() {
            candle_core::bail!("rpn_head.loss_cls.use_sigmoid must be true");
        }
        if matches!(cfg.loss_bbox, BoxLossConfig::GIoULoss { .. }) {
            candle_core::bail!("rpn_head.loss_bbox: GIoULoss is not supported (use L1Loss)");
        }
        let a = cfg.anchor_generator.generator().num_base_priors()?;
        let f = cfg.feat_channels;
        Ok(Self {
            rpn_conv: normal_conv(vb.pp("rpn_conv"), cfg.in_channels, f, 3, 0.01, 0.0)?,
            rpn_cls: normal_conv(vb.pp("rpn_cls"), f, a, 1, 0.01, 0.0)?,
            rpn_reg: normal_conv(vb.pp("rpn_reg"), f, a * 4, 1, 0.01, 0.0)?,
            cfg: cfg.clone(),
        })
    }

    /// The config.
    pub fn config(&self) -> &RpnHeadConfig {
        &self.cfg
    }

    /// `feats`: FPN levels `(B, in_channels, H_l, W_l)` → objectness logits `(B, A, H_l, W_l)`
    /// and deltas `(B, A·4, H_l, W_l)` per level.
    pub fn forward(&self, feats: &[Tensor]) -> Result<DenseOutputs> {
        let mut cls_scores = Vec::with_capacity(feats.len());
        let mut bbox_preds = Vec::with_capacity(feats.len());
        for x in feats {
            let h = self.rpn_conv.forward_relu(x)?;
            cls_scores.push(self.rpn_cls.forward(&h)?);
            bbox_preds.push(self.rpn_reg.forward(&h)?);
        }
        Ok(DenseOutputs {
            cls_scores,
            bbox_preds,
            centernesses: None,
        })
    }

    /// The anchors of a batch whose outputs are `outs`.
    pub fn anchors(&self, outs: &DenseOutputs) -> Result<Anchors> {
        Anchors::new(
            self.cfg.anchor_generator.generator(),
            &outs.cls_scores,
            outs.cls_scores[0].device(),
        )
    }

    /// Per-image targets before sampling ([`anchor_targets`] with one class). The GT labels are
    /// used as given, as mmdetection's `RPNHead`: only label 0 is a positive objectness target,
    /// so a two-stage detector sets every GT label to 0 first (as mmdetection's
    /// `TwoStageDetector.loss` does).
    ///
    /// Errors: those of [`anchor_targets`].
    pub fn assign(
        &self,
        anchors: &Anchors,
        metas: &[ImageMeta],
        gts: &[GtInstances],
        train_cfg: &RpnTrainConfig,
    ) -> Result<Vec<ImageTargets>> {
        let dense = train_cfg.dense();
        let gen = self.cfg.anchor_generator.generator();
        metas
            .iter()
            .zip(gts)
            .map(|(m, g)| anchor_targets(anchors, gen, m, g, &dense, 1))
            .collect()
    }

    /// mmdetection's `loss_by_feat` with random sampling: assign, sample with `rng`, then
    /// [`Self::loss_from_targets`].
    ///
    /// Errors: candle errors; `metas` / `gts` shorter than the batch.
    pub fn loss_by_feat(
        &self,
        outs: &DenseOutputs,
        metas: &[ImageMeta],
        gts: &[GtInstances],
        train_cfg: &RpnTrainConfig,
        rng: &mut impl Rng,
    ) -> Result<LevelLosses> {
        let anchors = self.anchors(outs)?;
        let mut targets = self.assign(&anchors, metas, gts, train_cfg)?;
        let sampler = train_cfg.sampler.body();
        for t in &mut targets {
            let (pos, neg) = candidates(t);
            let (pos, neg) = sampler.choose(pos, neg, rng);
            keep_samples(t, &pos, &neg);
        }
        self.loss_from_targets(outs, &anchors, &targets)
    }

    /// `loss_rpn_cls` (sigmoid CE over the anchors with weight > 0) and `loss_rpn_bbox` (on the
    /// positives' encoded deltas) per level, each a sum divided by the number of weighted anchors
    /// of the batch (`avg_factor` = sampled positives + negatives; 1 when there are none).
    ///
    /// Errors: candle errors.
    pub fn loss_from_targets(
        &self,
        outs: &DenseOutputs,
        anchors: &Anchors,
        targets: &[ImageTargets],
    ) -> Result<LevelLosses> {
        let sampled: usize = targets
            .iter()
            .map(|t| t.label_weights.iter().filter(|&&w| w > 0.0).count())
            .sum();
        let avg = sampled.max(1) as f64;
        let coder = self.cfg.bbox_coder.coder();
        let (mut lc, mut lb) = (Vec::new(), Vec::new());
        for l in 0..outs.cls_scores.len() {
            let dev = outs.cls_scores[l].device().clone();
            let lt = LevelTargets::gather(anchors, targets, l, &dev)?;
            let logits = flatten_level(&outs.cls_scores[l], 1)?.flatten_all()?;
            // mmdetection's one-hot expansion with one channel: only label 0 is a positive target.
            let target = lt.labels.eq(0i64)?.to_dtype(logits.dtype())?;
            let loss_cls = binary_cross_entropy_with_logits(
                &logits,
                &target,
                Some(&lt.label_weights.to_dtype(logits.dtype())?),
                Reduction::Mean,
                Some(avg),
            )?;
            lc.push((loss_cls * self.cfg.loss_cls.loss_weight())?);
            let reg = flatten_level(&outs.bbox_preds[l], 4)?.flatten_to(1)?;
            let loss_bbox = if lt.pos_rows.is_empty() {
                (reg.sum_all()? * 0.0)?
            } else {
                let pred = reg.index_select(&lt.pos_rows_tensor(&dev)?, 0)?;
                let target =
                    coder.encode(&lt.pos_anchors_tensor(&dev)?, &lt.pos_gt_tensor(&dev)?)?;
                match &self.cfg.loss_bbox {
                    BoxLossConfig::SmoothL1Loss { beta, .. } => {
                        smooth_l1_loss(&pred, &target, *beta, None, Reduction::Mean, Some(avg))?
                    }
                    _ => l1_loss(&pred, &target, None, Reduction::Mean, Some(avg))?,
                }
            };
            lb.push((loss_bbox * self.cfg.loss_bbox.loss_weight())?);
        }
        Ok(vec![
            ("loss_rpn_cls".into(), lc),
            ("loss_rpn_bbox".into(), lb),
        ])
    }

    /// Proposals per image ([`Proposals`], `img_shape` frame) from the raw outputs.
    ///
    /// Errors: candle errors; `test_cfg.nms.type` other than `"nms"`.
    pub fn predict_by_feat(
        &self,
        outs: &DenseOutputs,
        metas: &[ImageMeta],
        cfg: &RpnProposalConfig,
    ) -> Result<Vec<Proposals>> {
        if cfg.nms.kind != "nms" {
            candle_core::bail!(
                "nms.type {:?} is not supported (only \"nms\")",
                cfg.nms.kind
            );
        }
        let cpu = Device::Cpu;
        let sizes = outs
            .cls_scores
            .iter()
            .map(|f| Ok((f.dim(2)?, f.dim(3)?)))
            .collect::<Result<Vec<_>>>()?;
        let anchors = self
            .cfg
            .anchor_generator
            .generator()
            .grid_priors(&sizes, &cpu)?;
        let coder = self.cfg.bbox_coder.coder();
        let cls: Vec<Tensor> = outs
            .cls_scores
            .iter()
            .map(|t| candle_nn::ops::sigmoid(&t.detach().to_device(&cpu)?.to_dtype(DType::F32)?))
            .collect::<Result<_>>()?;
        let reg: Vec<Tensor> = outs
            .bbox_preds
            .iter()
            .map(|t| t.detach().to_device(&cpu)?.to_dtype(DType::F32))
            .collect::<Result<_>>()?;
        let mut out = Vec::with_capacity(metas.len());
        for (i, meta) in metas.iter().enumerate() {
            let (mut boxes, mut scores, mut levels) = (Vec::new(), Vec::new(), Vec::new());
            for l in 0..cls.len() {
                let s: Vec<f32> = flatten_level(&cls[l].get(i)?.unsqueeze(0)?, 1)?
                    .flatten_all()?
                    .to_vec1()?;
                let mut order: Vec<u32> = (0..s.len() as u32).collect();
                if cfg.nms_pre > 0 && (cfg.nms_pre as usize) < s.len() {
                    order.sort_by(|&a, &b| s[b as usize].total_cmp(&s[a as usize]).then(a.cmp(&b)));
                    order.truncate(cfg.nms_pre as usize);
                }
                let idx = Tensor::new(order.as_slice(), &cpu)?;
                let deltas = flatten_level(&reg[l].get(i)?.unsqueeze(0)?, 4)?
                    .squeeze(0)?
                    .index_select(&idx, 0)?;
                let pri = anchors[l].index_select(&idx, 0)?;
                let max_shape = (meta.img_shape.0 as f64, meta.img_shape.1 as f64);
                let b: Vec<Vec<f32>> = coder
                    .decode(&pri, &deltas, Some(max_shape), WH_RATIO_CLIP)?
                    .to_vec2()?;
                for (r, &o) in b.iter().zip(&order) {
                    let (w, h) = (r[2] - r[0], r[3] - r[1]);
                    if w as f64 > cfg.min_bbox_size && h as f64 > cfg.min_bbox_size {
                        boxes.push([r[0], r[1], r[2], r[3]]);
                        scores.push(s[o as usize]);
                        levels.push(l as i64);
                    }
                }
            }
            if boxes.is_empty() {
                out.push(Proposals::default());
                continue;
            }
            let keep: Vec<i64> = batched_nms(
                &boxes_tensor(&boxes, &cpu)?,
                &Tensor::new(scores.as_slice(), &cpu)?,
                &Tensor::new(levels.as_slice(), &cpu)?,
                cfg.nms.iou_threshold as f32,
            )?
            .to_vec1()?;
            let keep = &keep[..keep.len().min(cfg.max_per_img)];
            out.push(Proposals {
                bboxes: keep.iter().map(|&k| boxes[k as usize]).collect(),
                scores: keep.iter().map(|&k| scores[k as usize]).collect(),
            });
        }
        Ok(out)
    }
}

/// Candidate positives (the assigned anchors) and negatives (weighted background anchors) of one
/// image's unsampled targets, both ascending anchor indices.
pub fn candidates(t: &ImageTargets) -> (Vec<usize>, Vec<usize>) {
    let mut is_pos = vec![false; t.labels.len()];
    for &i in &t.pos_inds {
        is_pos[i] = true;
    }
    let neg = (0..t.labels.len())
        .filter(|&i| t.label_weights[i] > 0.0 && !is_pos[i])
        .collect();
    (t.pos_inds.clone(), neg)
}

/// Restricts `t` to the sampled anchors: weight 0 for every anchor outside `pos ∪ neg`, and only
/// the sampled positives keep their box targets.
pub fn keep_samples(t: &mut ImageTargets, pos: &[usize], neg: &[usize]) {
    let mut keep = vec![false; t.labels.len()];
    for &i in pos.iter().chain(neg) {
        keep[i] = true;
    }
    for (w, k) in t.label_weights.iter_mut().zip(&keep) {
        if !k {
            *w = 0.0;
        }
    }
    let (mut pi, mut pg) = (Vec::new(), Vec::new());
    for (&i, g) in t.pos_inds.iter().zip(&t.pos_gt_bboxes) {
        if keep[i] {
            pi.push(i);
            pg.push(*g);
        }
    }
    t.pos_inds = pi;
    t.pos_gt_bboxes = pg;
}

densepred_core::config_by_type! {
    /// `model.rpn_head` table, selected by `type`.
    pub enum RpnHeadType {
        /// mmdetection's `RPNHead`.
        "RPNHead" => Rpn(RpnHeadConfig),
    }
}
