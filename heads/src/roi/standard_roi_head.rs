//! `StandardRoIHead` (mmdetection 3.x): the second stage of Faster / Mask R-CNN. Training assigns
//! the proposals (with the GT boxes prepended) to the GT (`MaxIoUAssigner`), samples them
//! (`RandomSampler`), and computes the box head's softmax CE + L1 on the target class's deltas and
//! the mask head's per-pixel BCE on the target class's channel against mmdetection's
//! `mask_target` (each positive's GT mask RoIAligned to `mask_size²` over the proposal, then
//! binarised at 0.5). Inference: class-wise decoding and NMS of the box head, then masks for the
//! kept boxes pasted into the original image (`_do_paste_mask`) and binarised.

use super::bbox_head::{BBoxHead, BBoxHeadConfig};
use super::mask_head::{MaskHead, MaskHeadConfig};
use super::roi_extractor::{bbox2roi, SingleRoIExtractor, SingleRoIExtractorConfig};
use crate::dense::common::{boxes_tensor, AssignerConfig, BoxLossConfig, NmsConfig};
use crate::task::assigner::AssignResult;
use crate::task::coder::WH_RATIO_CLIP;
use crate::task::sampler::{SamplerConfig, SamplingResult};
use candle_core::{DType, Device, Result, Tensor, D};
use candle_nn::VarBuilder;
use densepred_core::config::defaults as d;
use densepred_core::losses::{
    cross_entropy, l1_loss, mask_cross_entropy, smooth_l1_loss, Reduction,
};
use densepred_core::ops::nms::batched_nms;
use densepred_core::ops::paste_mask::paste_masks;
use densepred_core::ops::roi_align::{roi_align, RoiAlignParams};
use densepred_core::structures::{BitmapMasks, Detections, GtInstances, ImageMeta};
use rand::Rng;
use serde::{Deserialize, Serialize};

densepred_core::config_by_type! {
    /// `bbox_roi_extractor` / `mask_roi_extractor` table, selected by `type`.
    pub enum RoIExtractorConfig {
        /// One level per RoI.
        "SingleRoIExtractor" => SingleRoIExtractor(SingleRoIExtractorConfig),
    }
}

impl RoIExtractorConfig {
    fn build(&self) -> Result<SingleRoIExtractor> {
        match self {
            Self::SingleRoIExtractor(c) => SingleRoIExtractor::new(c),
        }
    }
}

/// `type = "StandardRoIHead"` (mmdetection's keyword arguments).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StandardRoIHeadConfig {
    /// RoI features of the box head.
    pub bbox_roi_extractor: RoIExtractorConfig,
    /// The box head.
    pub bbox_head: BBoxHeadConfig,
    /// RoI features of the mask head (Mask R-CNN).
    #[serde(default)]
    pub mask_roi_extractor: Option<RoIExtractorConfig>,
    /// The mask head (Mask R-CNN; absent for Faster R-CNN).
    #[serde(default)]
    pub mask_head: Option<MaskHeadConfig>,
    /// Reuse the box extractor for masks: only `false` is supported.
    #[serde(default)]
    pub share_roi_extractor: bool,
    /// Not supported (each head has mmdetection's default init).
    #[serde(default)]
    pub init_cfg: Option<densepred_core::config::Unsupported>,
}

densepred_core::config_by_type! {
    /// `model.roi_head` table, selected by `type`.
    pub enum RoIHeadConfig {
        /// mmdetection's `StandardRoIHead`.
        "StandardRoIHead" => StandardRoIHead(StandardRoIHeadConfig),
    }
}

fn mask_size() -> usize {
    28
}

/// `train_cfg.rcnn`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RcnnTrainConfig {
    /// Which proposals learn from which GT box (`MaxIoUAssigner`).
    pub assigner: AssignerConfig,
    /// Which assigned proposals enter the loss (`RandomSampler`).
    pub sampler: SamplerConfig,
    /// Side of the mask targets.
    #[serde(default = "mask_size")]
    pub mask_size: usize,
    /// Weight of positives in the classification loss (≤ 0: 1).
    #[serde(default = "d::neg_one_f64")]
    pub pos_weight: f64,
    /// mmdetection's `debug` flag, read by no head; either value trains the same.
    #[serde(default)]
    pub debug: bool,
}

fn score_thr() -> f64 {
    0.05
}
fn max_per_img() -> usize {
    100
}

/// `test_cfg.rcnn`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RcnnTestConfig {
    /// Class scores ≤ this are dropped.
    #[serde(default = "score_thr")]
    pub score_thr: f64,
    /// Per-class NMS.
    pub nms: NmsConfig,
    /// Detections kept per image.
    #[serde(default = "max_per_img")]
    pub max_per_img: usize,
    /// A mask pixel is on where the pasted probability is ≥ this.
    #[serde(default = "d::half")]
    pub mask_thr_binary: f64,
}

/// The sampled RoIs of one image and their targets (mmdetection's `SamplingResult` plus
/// `get_targets`), positives first.
#[derive(Debug, Clone, PartialEq)]
pub struct ImageRoiSamples {
    /// Sampled positive boxes (xyxy, `img_shape` frame), then negatives.
    pub boxes: Vec<[f32; 4]>,
    /// Number of positives (the first entries of `boxes`).
    pub num_pos: usize,
    /// Class of each positive.
    pub pos_labels: Vec<i64>,
    /// GT index of each positive.
    pub pos_gt_inds: Vec<usize>,
    /// The assignment over `[GT boxes; proposals]` (for inspection and tests).
    pub assign: AssignResult,
    /// The sampling result (indices into `[GT boxes; proposals]`).
    pub sampling: SamplingResult,
}

/// Losses of the RoI head and the classification accuracy (a metric, in percent).
pub struct RoiLosses {
    /// `loss_cls`, `loss_bbox` and (with a mask head) `loss_mask`, scalars.
    pub losses: Vec<(String, Tensor)>,
    /// Top-1 accuracy of the box classifier over the sampled RoIs, in percent.
    pub acc: f32,
}

/// Raw outputs of the heads on sampled RoIs (exposed for tests and inspection).
pub struct RoiOutputs {
    /// `(R, classes + 1)` logits.
    pub cls_score: Tensor,
    /// `(R, 4·classes)` deltas.
    pub bbox_pred: Tensor,
    /// `(P, classes, M, M)` mask logits of the positives, with a mask head.
    pub mask_preds: Option<Tensor>,
}

/// The built RoI head.
pub struct StandardRoIHead {
    cfg: StandardRoIHeadConfig,
    bbox_extractor: SingleRoIExtractor,
    bbox_head: BBoxHead,
    mask: Option<(SingleRoIExtractor, MaskHead)>,
}

impl StandardRoIHead {
    /// Builds the head under `vb` (`bbox_head.*`, `mask_head.*`).
    ///
    /// Errors: a mask head without a mask extractor (or the reverse), `share_roi_extractor`,
    /// the errors of each component.
    pub fn new(vb: VarBuilder, cfg: &RoIHeadConfig) -> Result<Self> {
        let c = cfg.body();
        if c.share_roi_extractor {
            candle_core::bail!("roi_head.share_roi_extractor = true is not supported");
        }
        let mask = match (&c.mask_roi_extractor, &c.mask_head) {
            (Some(e), Some(h)) => Some((e.build()?, MaskHead::new(vb.pp("mask_head"), h)?)),
            (None, None) => None,
            _ => candle_core::bail!(
                "roi_head: mask_roi_extractor and mask_head must be given together"
            ),
        };
        Ok(Self {
            bbox_extractor: c.bbox_roi_extractor.build()?,
            bbox_head: BBoxHead::new(vb.pp("bbox_head"), &c.bbox_head)?,
            mask,
            cfg: c.clone(),
        })
    }

    /// Number of object classes.
    pub fn num_classes(&self) -> usize {
        self.cfg.bbox_head.body().num_classes
    }

    /// Whether the head predicts masks.
    pub fn with_mask(&self) -> bool {
        self.mask.is_some()
    }

    /// Box branch on `rois` `(R, 5)`: RoI features `(R, C, 7, 7)`, logits and deltas.
    ///
    /// Errors: candle errors.
    pub fn forward_bbox(
        &self,
        feats: &[Tensor],
        rois: &Tensor,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        let f = self.bbox_extractor.forward(feats, rois)?;
        let (cls, reg) = self.bbox_head.forward(&f)?;
        Ok((f, cls, reg))
    }

    /// Mask branch on `rois` `(P, 5)`: logits `(P, classes, 28, 28)`.
    ///
    /// Errors: no mask head; candle errors.
    pub fn forward_mask(&self, feats: &[Tensor], rois: &Tensor) -> Result<Tensor> {
        let (e, h) = self
            .mask
            .as_ref()
            .ok_or_else(|| candle_core::Error::msg("roi_head has no mask head"))?;
        if rois.dim(0)? == 0 {
            // No RoI (a batch without positives): no work, an empty result.
            let side = 2 * e.output_size();
            let n = h.config().num_classes;
            return Tensor::zeros((0, n, side, side), feats[0].dtype(), feats[0].device());
        }
        h.forward(&e.forward(feats, rois)?)
    }

    /// Assignment and sampling of each image's `proposals` (xyxy, `img_shape` frame) against its
    /// GT (mmdetection's `StandardRoIHead.loss` up to `bbox_loss`).
    ///
    /// Errors: assigner errors; a sampler other than `RandomSampler` is refused by the config.
    pub fn sample(
        &self,
        proposals: &[Vec<[f32; 4]>],
        gts: &[GtInstances],
        train_cfg: &RcnnTrainConfig,
        rng: &mut impl Rng,
    ) -> Result<Vec<ImageRoiSamples>> {
        let cpu = Device::Cpu;
        let AssignerConfig::MaxIoUAssigner(assigner) = &train_cfg.assigner else {
            candle_core::bail!("train_cfg.rcnn.assigner: only MaxIoUAssigner is supported");
        };
        let sampler = train_cfg.sampler.body();
        proposals
            .iter()
            .zip(gts)
            .map(|(props, gt)| {
                let ign = if gt.ignored.is_empty() {
                    None
                } else {
                    Some(boxes_tensor(&gt.ignored, &cpu)?)
                };
                let mut assign = assigner.assign(
                    &boxes_tensor(props, &cpu)?,
                    &boxes_tensor(&gt.bboxes, &cpu)?,
                    &gt.labels,
                    ign.as_ref(),
                )?;
                let sampling = sampler.sample(&mut assign, &gt.labels, rng);
                let added = sampling.num_gts_added;
                let candidate = |i: usize| {
                    if i < added {
                        gt.bboxes[i]
                    } else {
                        props[i - added]
                    }
                };
                let mut boxes: Vec<[f32; 4]> =
                    sampling.pos_inds.iter().map(|&i| candidate(i)).collect();
                boxes.extend(sampling.neg_inds.iter().map(|&i| candidate(i)));
                Ok(ImageRoiSamples {
                    num_pos: sampling.pos_inds.len(),
                    pos_labels: sampling
                        .pos_assigned_gt_inds
                        .iter()
                        .map(|&g| gt.labels[g])
                        .collect(),
                    pos_gt_inds: sampling.pos_assigned_gt_inds.clone(),
                    boxes,
                    assign,
                    sampling,
                })
            })
            .collect()
    }

    /// mmdetection's `StandardRoIHead.loss`: [`Self::sample`] then [`Self::loss_from_samples`].
    ///
    /// Errors: as those two.
    pub fn loss(
        &self,
        feats: &[Tensor],
        proposals: &[Vec<[f32; 4]>],
        gts: &[GtInstances],
        train_cfg: &RcnnTrainConfig,
        rng: &mut impl Rng,
    ) -> Result<RoiLosses> {
        let samples = self.sample(proposals, gts, train_cfg, rng)?;
        Ok(self.loss_from_samples(feats, &samples, gts, train_cfg)?.0)
    }

    /// The heads on sampled RoIs: box logits and deltas on every sampled RoI and, with a mask
    /// head, mask logits on the positives.
    ///
    /// Errors: candle errors.
    pub fn forward_samples(
        &self,
        feats: &[Tensor],
        samples: &[ImageRoiSamples],
    ) -> Result<RoiOutputs> {
        let dev = feats[0].device().clone();
        let boxes: Vec<Vec<[f32; 4]>> = samples.iter().map(|s| s.boxes.clone()).collect();
        let (_, cls_score, bbox_pred) = self.forward_bbox(feats, &bbox2roi(&boxes, &dev)?)?;
        let mask_preds = if self.mask.is_some() {
            let pos: Vec<Vec<[f32; 4]>> = samples
                .iter()
                .map(|s| s.boxes[..s.num_pos].to_vec())
                .collect();
            Some(self.forward_mask(feats, &bbox2roi(&pos, &dev)?)?)
        } else {
            None
        };
        Ok(RoiOutputs {
            cls_score,
            bbox_pred,
            mask_preds,
        })
    }

    /// [`Self::forward_samples`] then [`Self::loss_by_outputs`]; also returns the raw outputs.
    ///
    /// Errors: as those two.
    pub fn loss_from_samples(
        &self,
        feats: &[Tensor],
        samples: &[ImageRoiSamples],
        gts: &[GtInstances],
        train_cfg: &RcnnTrainConfig,
    ) -> Result<(RoiLosses, RoiOutputs)> {
        let outs = self.forward_samples(feats, samples)?;
        Ok((self.loss_by_outputs(&outs, samples, gts, train_cfg)?, outs))
    }

    /// Losses from the heads' outputs on sampled RoIs: `loss_cls` (softmax CE averaged over the
    /// sampled RoIs), `loss_bbox` (L1 of the target class's deltas of the positives, divided by
    /// the number of sampled RoIs) and, with a mask head, `loss_mask` (BCE of the target class's
    /// channel against [`mask_targets`], averaged over all positive pixels).
    ///
    /// Errors: a mask head but GT without masks; candle errors.
    pub fn loss_by_outputs(
        &self,
        outs: &RoiOutputs,
        samples: &[ImageRoiSamples],
        gts: &[GtInstances],
        train_cfg: &RcnnTrainConfig,
    ) -> Result<RoiLosses> {
        let (cls_score, bbox_pred) = (&outs.cls_score, &outs.bbox_pred);
        let dev = cls_score.device().clone();
        let nc = self.num_classes();
        let r = cls_score.dim(0)?;
        // Targets, rows ordered as the RoIs.
        let mut labels = Vec::with_capacity(r);
        let mut weights = Vec::with_capacity(r);
        let (mut pos_rows, mut pos_cols, mut pos_props, mut pos_gts) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        let pos_w = if train_cfg.pos_weight <= 0.0 {
            1.0
        } else {
            train_cfg.pos_weight
        };
        let mut row = 0u32;
        for (s, gt) in samples.iter().zip(gts) {
            for (k, b) in s.boxes.iter().enumerate() {
                if k < s.num_pos {
                    let l = s.pos_labels[k];
                    labels.push(l);
                    weights.push(pos_w);
                    for c in 0..4 {
                        pos_rows.push(row);
                        pos_cols.push((l as u32) * 4 + c);
                    }
                    pos_props.push(*b);
                    pos_gts.push(gt.bboxes[s.pos_gt_inds[k]]);
                } else {
                    labels.push(nc as i64);
                    weights.push(1.0);
                }
                row += 1;
            }
        }
        let avg = weights.iter().filter(|&&w| w > 0.0).count().max(1) as f64;
        let bh = self.bbox_head.config();
        let loss_cls = cross_entropy(
            cls_score,
            &Tensor::new(labels.as_slice(), &dev)?,
            None,
            None,
            Some(&Tensor::new(weights.as_slice(), &dev)?.to_dtype(cls_score.dtype())?),
            Reduction::Mean,
            Some(avg),
            false,
        )?;
        let acc = accuracy(cls_score, &labels)?;
        let loss_bbox = if pos_props.is_empty() {
            (bbox_pred.sum_all()? * 0.0)?
        } else {
            let p = pos_props.len();
            let flat = bbox_pred.flatten_all()?;
            let width = bbox_pred.dim(1)? as u32;
            let idx: Vec<u32> = pos_rows
                .iter()
                .zip(&pos_cols)
                .map(|(&r, &c)| r * width + c)
                .collect();
            let pred = flat
                .index_select(&Tensor::new(idx.as_slice(), &dev)?, 0)?
                .reshape((p, 4))?;
            let target = bh.bbox_coder.coder().encode(
                &boxes_tensor(&pos_props, &dev)?,
                &boxes_tensor(&pos_gts, &dev)?,
            )?;
            match &bh.loss_bbox {
                BoxLossConfig::SmoothL1Loss { beta, .. } => {
                    smooth_l1_loss(&pred, &target, *beta, None, Reduction::Mean, Some(r as f64))?
                }
                _ => l1_loss(&pred, &target, None, Reduction::Mean, Some(r as f64))?,
            }
        };
        let mut losses = vec![
            (
                "loss_cls".to_string(),
                (loss_cls * bh.loss_cls.loss_weight())?,
            ),
            (
                "loss_bbox".to_string(),
                (loss_bbox * bh.loss_bbox.loss_weight())?,
            ),
        ];
        if let (Some((_, mh)), Some(preds)) = (&self.mask, &outs.mask_preds) {
            let loss = if preds.dim(0)? == 0 {
                (preds.sum_all()? * 0.0)?
            } else {
                let mut targets = Vec::new();
                let mut pl = Vec::new();
                for (s, gt) in samples.iter().zip(gts) {
                    let masks = gt.masks.as_ref().ok_or_else(|| {
                        candle_core::Error::msg(
                            "the mask head needs GT masks (LoadAnnotations with_mask = true)",
                        )
                    })?;
                    targets.push(mask_targets(
                        &s.boxes[..s.num_pos],
                        &s.pos_gt_inds,
                        masks,
                        train_cfg.mask_size,
                    )?);
                    pl.extend_from_slice(&s.pos_labels);
                }
                let t = Tensor::cat(&targets, 0)?.to_device(&dev)?;
                mask_cross_entropy(preds, &t, &Tensor::new(pl.as_slice(), &dev)?, None)?
            };
            losses.push((
                "loss_mask".to_string(),
                (loss * mh.config().loss_mask.loss_weight())?,
            ));
        }
        Ok(RoiLosses { losses, acc })
    }

    /// mmdetection's `StandardRoIHead.predict(rescale=True)`: detections per image in
    /// original-image pixels (boxes divided by `scale_factor`) with, when the head has a mask
    /// branch, binary masks of `ori_shape`.
    ///
    /// `proposals`: per image, xyxy boxes in the `img_shape` frame.
    ///
    /// Errors: `nms.type` other than `"nms"`; candle errors.
    pub fn predict(
        &self,
        feats: &[Tensor],
        proposals: &[Vec<[f32; 4]>],
        metas: &[ImageMeta],
        cfg: &RcnnTestConfig,
    ) -> Result<Vec<Detections>> {
        if cfg.nms.kind != "nms" {
            candle_core::bail!("test_cfg.rcnn.nms.type {:?} is not supported", cfg.nms.kind);
        }
        let dev = feats[0].device().clone();
        let rois = bbox2roi(proposals, &dev)?;
        let (_, cls, reg) = self.forward_bbox(feats, &rois)?;
        let cpu = Device::Cpu;
        let scores: Vec<Vec<f32>> =
            candle_nn::ops::softmax(&cls.to_device(&cpu)?.to_dtype(DType::F32)?, D::Minus1)?
                .to_vec2()?;
        let reg = reg.to_device(&cpu)?.to_dtype(DType::F32)?;
        let nc = self.num_classes();
        let coder = self.bbox_head.config().bbox_coder.coder();
        let mut dets = Vec::with_capacity(metas.len());
        let mut start = 0usize;
        for (props, meta) in proposals.iter().zip(metas) {
            let n = props.len();
            let d = if n == 0 {
                Detections::default()
            } else {
                let rep: Vec<[f32; 4]> = props
                    .iter()
                    .flat_map(|b| std::iter::repeat_n(*b, nc))
                    .collect();
                let deltas = reg.narrow(0, start, n)?.reshape((n * nc, 4))?;
                let max_shape = (meta.img_shape.0 as f64, meta.img_shape.1 as f64);
                let decoded: Vec<Vec<f32>> = coder
                    .decode(
                        &boxes_tensor(&rep, &cpu)?,
                        &deltas,
                        Some(max_shape),
                        WH_RATIO_CLIP,
                    )?
                    .to_vec2()?;
                let mut cand = Vec::new();
                for (ri, row) in scores[start..start + n].iter().enumerate() {
                    for (c, &s) in row[..nc].iter().enumerate() {
                        if s as f64 > cfg.score_thr {
                            cand.push(ri * nc + c);
                        }
                    }
                }
                if cand.is_empty() {
                    Detections::default()
                } else {
                    let b: Vec<[f32; 4]> = cand
                        .iter()
                        .map(|&i| {
                            let r = &decoded[i];
                            [r[0], r[1], r[2], r[3]]
                        })
                        .collect();
                    let s: Vec<f32> = cand
                        .iter()
                        .map(|&i| scores[start + i / nc][i % nc])
                        .collect();
                    let l: Vec<i64> = cand.iter().map(|&i| (i % nc) as i64).collect();
                    let keep: Vec<i64> = batched_nms(
                        &boxes_tensor(&b, &cpu)?,
                        &Tensor::new(s.as_slice(), &cpu)?,
                        &Tensor::new(l.as_slice(), &cpu)?,
                        cfg.nms.iou_threshold as f32,
                    )?
                    .to_vec1()?;
                    let keep = &keep[..keep.len().min(cfg.max_per_img)];
                    Detections {
                        bboxes: keep.iter().map(|&k| b[k as usize]).collect(),
                        scores: keep.iter().map(|&k| s[k as usize]).collect(),
                        labels: keep.iter().map(|&k| l[k as usize]).collect(),
                        masks: None,
                    }
                }
            };
            dets.push(d);
            start += n;
        }
        if self.mask.is_some() {
            self.predict_masks(feats, &mut dets, metas, cfg)?;
        } else {
            for (d, meta) in dets.iter_mut().zip(metas) {
                let inv = [
                    (1.0 / meta.scale_factor.0) as f32,
                    (1.0 / meta.scale_factor.1) as f32,
                ];
                for b in &mut d.bboxes {
                    *b = [b[0] * inv[0], b[1] * inv[1], b[2] * inv[0], b[3] * inv[1]];
                }
            }
        }
        Ok(dets)
    }

    /// Masks of `dets` (boxes in the `img_shape` frame, rescaled here to the original frame by
    /// dividing by `scale_factor`, as mmdetection's `FCNMaskHead._predict_by_feat_single`).
    fn predict_masks(
        &self,
        feats: &[Tensor],
        dets: &mut [Detections],
        metas: &[ImageMeta],
        cfg: &RcnnTestConfig,
    ) -> Result<()> {
        let dev = feats[0].device().clone();
        let boxes: Vec<Vec<[f32; 4]>> = dets.iter().map(|d| d.bboxes.clone()).collect();
        let rois = bbox2roi(&boxes, &dev)?;
        let logits = if rois.dim(0)? > 0 {
            Some(self.forward_mask(feats, &rois)?.to_device(&Device::Cpu)?)
        } else {
            None
        };
        let mut start = 0;
        for (d, meta) in dets.iter_mut().zip(metas) {
            let n = d.len();
            let (h, w) = meta.ori_shape;
            let (sw, sh) = (meta.scale_factor.0 as f32, meta.scale_factor.1 as f32);
            for b in &mut d.bboxes {
                *b = [b[0] / sw, b[1] / sh, b[2] / sw, b[3] / sh];
            }
            if n == 0 {
                d.masks = Some(BitmapMasks {
                    size: (h, w),
                    masks: vec![],
                });
                continue;
            }
            let l = logits
                .as_ref()
                .expect("detections imply RoIs")
                .narrow(0, start, n)?;
            let (_, _, mh, mw) = l.dims4()?;
            let idx = Tensor::new(
                d.labels
                    .iter()
                    .map(|&x| x as u32)
                    .collect::<Vec<_>>()
                    .as_slice(),
                &Device::Cpu,
            )?
            .reshape((n, 1, 1, 1))?
            .broadcast_as((n, 1, mh, mw))?
            .contiguous()?;
            let probs = candle_nn::ops::sigmoid(&l.gather(&idx, 1)?.squeeze(1)?)?;
            let pasted: Vec<f32> =
                paste_masks(&probs, &boxes_tensor(&d.bboxes, &Device::Cpu)?, h, w)?
                    .flatten_all()?
                    .to_vec1()?;
            let thr = cfg.mask_thr_binary as f32;
            d.masks = Some(BitmapMasks {
                size: (h, w),
                masks: pasted
                    .chunks(h * w)
                    .map(|m| m.iter().map(|&p| u8::from(p >= thr)).collect())
                    .collect(),
            });
            start += n;
        }
        Ok(())
    }
}

/// mmdetection's `mask_target` for one image: for each positive box (xyxy, clipped to the mask
/// size) with its GT index, the GT mask RoIAligned to `size × size` (aligned, spatial scale 1,
/// adaptive sampling) and binarised at ≥ 0.5 → `(P, size, size)` f32 of 0/1.
///
/// Errors: a GT index without a mask; candle errors.
pub fn mask_targets(
    boxes: &[[f32; 4]],
    gt_inds: &[usize],
    masks: &BitmapMasks,
    size: usize,
) -> Result<Tensor> {
    let cpu = Device::Cpu;
    if boxes.is_empty() {
        return Tensor::zeros((0, size, size), DType::F32, &cpu);
    }
    if boxes.len() != gt_inds.len() {
        candle_core::bail!(
            "mask_targets: {} boxes, {} GT indices",
            boxes.len(),
            gt_inds.len()
        );
    }
    let (mh, mw) = masks.size;
    // Only the masks that positives use, in first-use order.
    let mut used: Vec<usize> = Vec::new();
    let mut rows = Vec::with_capacity(boxes.len() * 5);
    for (b, &g) in boxes.iter().zip(gt_inds) {
        if g >= masks.len() {
            candle_core::bail!("mask_targets: GT {g} has no mask ({} masks)", masks.len());
        }
        let slot = match used.iter().position(|&u| u == g) {
            Some(p) => p,
            None => {
                used.push(g);
                used.len() - 1
            }
        };
        let (w, h) = (mw as f32, mh as f32);
        rows.extend_from_slice(&[
            slot as f32,
            b[0].clamp(0.0, w),
            b[1].clamp(0.0, h),
            b[2].clamp(0.0, w),
            b[3].clamp(0.0, h),
        ]);
    }
    let planes: Vec<f32> = used
        .iter()
        .flat_map(|&g| masks.masks[g].iter().map(|&v| v as f32))
        .collect();
    let feats = Tensor::from_vec(planes, (used.len(), 1, mh, mw), &cpu)?;
    let rois = Tensor::from_vec(rows, (boxes.len(), 5), &cpu)?;
    let p = RoiAlignParams {
        output_size: (size, size),
        spatial_scale: 1.0,
        sampling_ratio: 0,
        aligned: true,
    };
    roi_align(&feats, &rois, p)?
        .squeeze(1)?
        .ge(0.5)?
        .to_dtype(DType::F32)
}

/// Top-1 accuracy (%) of `(R, C + 1)` logits against `labels`.
fn accuracy(logits: &Tensor, labels: &[i64]) -> Result<f32> {
    if labels.is_empty() {
        return Ok(0.0);
    }
    let pred: Vec<u32> = logits.detach().argmax(D::Minus1)?.to_vec1()?;
    let hits = pred
        .iter()
        .zip(labels)
        .filter(|(&p, &l)| p as i64 == l)
        .count();
    Ok(hits as f32 * 100.0 / labels.len() as f32)
}
