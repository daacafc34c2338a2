//! Pieces shared by the anchor-based dense heads (mmdetection's `AnchorHead` / `BaseDenseHead`):
//! conv modules, config tables, per-anchor target assignment and the `predict_by_feat`
//! post-processing.

use crate::task::assigner::{AssignResult, AtssAssigner, MaxIoUAssigner};
use crate::task::coder::{DeltaXYWHBBoxCoder, WH_RATIO_CLIP};
use crate::task::prior_generator::AnchorGenerator;
use candle_core::{DType, Device, Result, Tensor};
use candle_nn::{Init, Module, VarBuilder};
use densepred_core::config::defaults as d;
use densepred_core::nn::{Conv2d, ConvCfg};
use densepred_core::ops::nms::batched_nms;
use densepred_core::structures::{Detections, GtInstances, ImageMeta};
use serde::{Deserialize, Serialize};

fn alpha() -> f64 {
    0.25
}
fn eps6() -> f64 {
    1e-6
}

/// `anchor_generator` table (`type = "AnchorGenerator"`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type")]
pub enum PriorGeneratorConfig {
    /// mmdetection's `AnchorGenerator`.
    AnchorGenerator(AnchorGenerator),
}

impl PriorGeneratorConfig {
    /// The generator.
    pub fn generator(&self) -> &AnchorGenerator {
        match self {
            Self::AnchorGenerator(g) => g,
        }
    }
}

/// `bbox_coder` table (`type = "DeltaXYWHBBoxCoder"`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type")]
pub enum BBoxCoderConfig {
    /// mmdetection's `DeltaXYWHBBoxCoder`.
    DeltaXYWHBBoxCoder(DeltaXYWHBBoxCoder),
}

impl BBoxCoderConfig {
    /// The coder.
    pub fn coder(&self) -> &DeltaXYWHBBoxCoder {
        match self {
            Self::DeltaXYWHBBoxCoder(c) => c,
        }
    }
}

densepred_core::config_by_type! {
    /// `assigner` table of `train_cfg`.
    pub enum AssignerConfig {
        /// IoU-threshold assignment (RetinaNet, RPN, R-CNN).
        "MaxIoUAssigner" => MaxIoUAssigner(MaxIoUAssigner),
        /// Adaptive training sample selection (ATSS).
        "ATSSAssigner" => AtssAssigner(AtssAssigner),
    }
}

/// Classification loss table (`loss_cls`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", deny_unknown_fields)]
pub enum ClsLossConfig {
    /// Sigmoid focal loss (Lin et al. 2017, eq. 5).
    FocalLoss {
        /// Must be true (softmax focal loss is not provided).
        #[serde(default = "d::yes")]
        use_sigmoid: bool,
        /// Focusing parameter γ.
        #[serde(default = "d::two_f64")]
        gamma: f64,
        /// Positive-class weight α.
        #[serde(default = "alpha")]
        alpha: f64,
        /// Multiplier of the loss.
        #[serde(default = "d::one_f64")]
        loss_weight: f64,
    },
}

/// Box regression loss table (`loss_bbox`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", deny_unknown_fields)]
pub enum BoxLossConfig {
    /// `|pred − target|` on encoded deltas.
    L1Loss {
        /// Multiplier of the loss.
        #[serde(default = "d::one_f64")]
        loss_weight: f64,
    },
    /// Smooth L1 on encoded deltas.
    SmoothL1Loss {
        /// Transition point.
        #[serde(default = "d::one_f64")]
        beta: f64,
        /// Multiplier of the loss.
        #[serde(default = "d::one_f64")]
        loss_weight: f64,
    },
    /// `1 − GIoU` on decoded boxes (needs `reg_decoded_bbox`).
    #[serde(rename = "GIoULoss")]
    GIoULoss {
        /// Added to the union and the enclosing area (mmdetection's default 1e-6).
        #[serde(default = "eps6")]
        eps: f64,
        /// Multiplier of the loss.
        #[serde(default = "d::one_f64")]
        loss_weight: f64,
    },
}

/// `train_cfg.sampler` of a dense head: mmdetection's `PseudoSampler` (every anchor).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", deny_unknown_fields)]
pub enum PseudoSamplerConfig {
    /// mmdetection's `PseudoSampler`.
    PseudoSampler {},
}

impl BoxLossConfig {
    /// `eps` of `GIoULoss` (mmdetection's default 1e-6 for the other losses, which do not use it).
    pub fn giou_eps(&self) -> f64 {
        match self {
            Self::GIoULoss { eps, .. } => *eps,
            _ => 1e-6,
        }
    }

    /// Multiplier of the loss.
    pub fn loss_weight(&self) -> f64 {
        match self {
            Self::L1Loss { loss_weight }
            | Self::SmoothL1Loss { loss_weight, .. }
            | Self::GIoULoss { loss_weight, .. } => *loss_weight,
        }
    }
}

/// mmdetection's `CrossEntropyLoss` table in its three modes: softmax over classes (default),
/// sigmoid per class (`use_sigmoid`), or per-pixel sigmoid of the target class's mask channel
/// (`use_mask`). Each head checks that the mode is the one it computes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", deny_unknown_fields)]
pub enum CrossEntropyLossConfig {
    /// `F.cross_entropy` / `F.binary_cross_entropy_with_logits`.
    CrossEntropyLoss {
        /// Sigmoid (binary) instead of softmax.
        #[serde(default)]
        use_sigmoid: bool,
        /// Mask loss (BCE of the target class's channel).
        #[serde(default)]
        use_mask: bool,
        /// Multiplier of the loss.
        #[serde(default = "d::one_f64")]
        loss_weight: f64,
    },
}

impl CrossEntropyLossConfig {
    /// `use_sigmoid`.
    pub fn use_sigmoid(&self) -> bool {
        let Self::CrossEntropyLoss { use_sigmoid, .. } = self;
        *use_sigmoid
    }
    /// `use_mask`.
    pub fn use_mask(&self) -> bool {
        let Self::CrossEntropyLoss { use_mask, .. } = self;
        *use_mask
    }
    /// Multiplier of the loss.
    pub fn loss_weight(&self) -> f64 {
        let Self::CrossEntropyLoss { loss_weight, .. } = self;
        *loss_weight
    }
}

/// Binary cross-entropy table (`loss_centerness`: `type = "CrossEntropyLoss"`, `use_sigmoid = true`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", deny_unknown_fields)]
pub enum BceLossConfig {
    /// Sigmoid cross-entropy.
    CrossEntropyLoss {
        /// Must be true.
        #[serde(default = "d::yes")]
        use_sigmoid: bool,
        /// Multiplier of the loss.
        #[serde(default = "d::one_f64")]
        loss_weight: f64,
    },
}

/// `norm_cfg` of the stacked convs (`type = "GN"`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", deny_unknown_fields)]
pub enum NormConfig {
    /// Group normalisation (Wu & He 2018), eps 1e-5.
    GN {
        /// Number of channel groups.
        num_groups: usize,
        /// Trainable affine parameters (frozen norms are not supported: must be true).
        #[serde(default = "d::yes")]
        requires_grad: bool,
    },
}

/// `nms` table of `test_cfg`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NmsConfig {
    /// Only `"nms"`.
    #[serde(rename = "type", default = "nms_name")]
    pub kind: String,
    /// Suppress a box whose IoU with a kept box of the same class is strictly above this.
    pub iou_threshold: f64,
}

fn nms_name() -> String {
    "nms".into()
}

/// `model.test_cfg` of a dense detector (mmdetection's names).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DenseTestConfig {
    /// Candidates kept per level before NMS (by score; −1 = all).
    #[serde(default = "nms_pre")]
    pub nms_pre: i64,
    /// Boxes whose width or height is ≤ this (original-image pixels) are dropped.
    #[serde(default)]
    pub min_bbox_size: f64,
    /// Class scores ≤ this are dropped.
    #[serde(default = "score_thr")]
    pub score_thr: f64,
    /// Per-class NMS.
    pub nms: NmsConfig,
    /// Detections kept per image.
    #[serde(default = "max_per_img")]
    pub max_per_img: usize,
}

fn nms_pre() -> i64 {
    1000
}
fn score_thr() -> f64 {
    0.05
}
fn max_per_img() -> usize {
    100
}

/// `model.train_cfg` of a dense detector.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DenseTrainConfig {
    /// Which anchors learn from which GT box.
    pub assigner: AssignerConfig,
    /// Anchors whose box leaves the padded image by more than this many pixels are ignored
    /// (−1: keep all anchors of valid cells). Only −1 is supported.
    #[serde(default = "d::neg_one_f64")]
    pub allowed_border: f64,
    /// Weight of positive anchors in the classification loss (≤ 0: 1).
    #[serde(default = "d::neg_one_f64")]
    pub pos_weight: f64,
    /// mmdetection's `debug` flag, which no dense head reads; either value trains the same.
    #[serde(default)]
    pub debug: bool,
    /// Dense heads use every anchor (mmdetection's `PseudoSampler`, the only one accepted).
    #[serde(default)]
    pub sampler: Option<PseudoSamplerConfig>,
}

/// The two stacked conv towers of mmdetection's anchor heads (`cls_convs.{i}`, `reg_convs.{i}`:
/// `stacked_convs` [`ConvModule`]s each, `in_channels → feat_channels → …`), run on every FPN
/// level before the prediction convs.
pub struct ConvTowers {
    cls: Vec<ConvModule>,
    reg: Vec<ConvModule>,
    /// Channels of the towers' outputs (`in_channels` when there are no convs).
    pub out_channels: usize,
}

impl ConvTowers {
    /// Builds both towers under `vb`.
    ///
    /// Errors: as [`ConvModule::new`].
    pub fn new(
        vb: &VarBuilder,
        stacked_convs: usize,
        in_channels: usize,
        feat_channels: usize,
        norm: Option<&NormConfig>,
    ) -> Result<Self> {
        let (mut cls, mut reg) = (Vec::new(), Vec::new());
        for i in 0..stacked_convs {
            let cin = if i == 0 { in_channels } else { feat_channels };
            cls.push(ConvModule::new(
                vb.pp("cls_convs").pp(i),
                cin,
                feat_channels,
                norm,
            )?);
            reg.push(ConvModule::new(
                vb.pp("reg_convs").pp(i),
                cin,
                feat_channels,
                norm,
            )?);
        }
        let out_channels = if stacked_convs == 0 {
            in_channels
        } else {
            feat_channels
        };
        Ok(Self {
            cls,
            reg,
            out_channels,
        })
    }

    /// One level `x` `(B, in_channels, H, W)` through both towers: the classification and the
    /// regression features, each `(B, out_channels, H, W)`.
    pub fn forward(&self, x: &Tensor) -> Result<(Tensor, Tensor)> {
        let mut c = x.clone();
        for m in &self.cls {
            c = m.forward(&c)?;
        }
        let mut r = x.clone();
        for m in &self.reg {
            r = m.forward(&r)?;
        }
        Ok((c, r))
    }
}

/// `ConvModule(conv 3x3 [+ GN] + ReLU)` of mmcv, with its names (`conv.*`, `gn.*`). The conv has
/// no bias when a norm follows (mmcv's `bias="auto"`).
pub struct ConvModule {
    conv: Conv2d,
    norm: Option<candle_nn::GroupNorm>,
}

impl ConvModule {
    /// 3x3 stride-1 conv `cin → cout`, init N(0, 0.01) (mmdetection's head init), GN weight 1 /
    /// bias 0.
    ///
    /// Errors: `num_groups` not dividing `cout`; frozen norms.
    pub fn new(vb: VarBuilder, cin: usize, cout: usize, norm: Option<&NormConfig>) -> Result<Self> {
        let weight = vb.pp("conv").get_with_hints(
            (cout, cin, 3, 3),
            "weight",
            Init::Randn {
                mean: 0.0,
                stdev: 0.01,
            },
        )?;
        let bias = if norm.is_none() {
            Some(
                vb.pp("conv")
                    .get_with_hints(cout, "bias", Init::Const(0.0))?,
            )
        } else {
            None
        };
        let conv = Conv2d {
            weight,
            bias,
            cfg: ConvCfg {
                padding: 1,
                ..Default::default()
            },
        };
        let norm = match norm {
            None => None,
            Some(NormConfig::GN {
                num_groups,
                requires_grad,
            }) => {
                if !requires_grad {
                    candle_core::bail!(
                        "{}: GN with requires_grad = false is not supported",
                        vb.prefix()
                    );
                }
                let w = vb
                    .pp("gn")
                    .get_with_hints(cout, "weight", Init::Const(1.0))?;
                let b = vb.pp("gn").get_with_hints(cout, "bias", Init::Const(0.0))?;
                Some(candle_nn::GroupNorm::new(w, b, cout, *num_groups, 1e-5)?)
            }
        };
        Ok(Self { conv, norm })
    }

    /// `(B, cin, H, W)` → `(B, cout, H, W)`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = self.conv.forward(x)?;
        let y = match &self.norm {
            Some(n) => n.forward(&y)?,
            None => y,
        };
        y.relu()
    }
}

/// A 3x3 prediction conv (`retina_cls`, `atss_reg`, ...): weight N(0, 0.01), bias `bias_init`.
pub fn pred_conv(vb: VarBuilder, cin: usize, cout: usize, bias_init: f64) -> Result<Conv2d> {
    normal_conv(vb, cin, cout, 3, 0.01, bias_init)
}

/// A `k×k` stride-1 "same" conv with bias, weight N(0, `std`) and bias `bias_init` (mmengine's
/// `normal_init`), under `vb` (`weight`, `bias`).
pub fn normal_conv(
    vb: VarBuilder,
    cin: usize,
    cout: usize,
    k: usize,
    std: f64,
    bias_init: f64,
) -> Result<Conv2d> {
    let weight = vb.get_with_hints(
        (cout, cin, k, k),
        "weight",
        Init::Randn {
            mean: 0.0,
            stdev: std,
        },
    )?;
    let bias = vb.get_with_hints(cout, "bias", Init::Const(bias_init))?;
    Ok(Conv2d {
        weight,
        bias: Some(bias),
        cfg: ConvCfg {
            padding: k / 2,
            ..Default::default()
        },
    })
}

/// mmcv's `bias_init_with_prob(p)` = −log((1 − p) / p): the classifier bias that makes every
/// initial sigmoid score `p` (RetinaNet §4.1, p = 0.01).
pub fn bias_init_with_prob(p: f64) -> f64 {
    -((1.0 - p) / p).ln()
}

/// `(B, A·K, H, W)` → `(B, H·W·A, K)`: mmdetection's `permute(0, 2, 3, 1).reshape(B, -1, K)`, so
/// row `(y·W + x)·A + a` matches the anchor order of [`AnchorGenerator::grid_priors`].
pub fn flatten_level(x: &Tensor, k: usize) -> Result<Tensor> {
    let (b, ak, h, w) = x.dims4()?;
    if ak % k != 0 {
        candle_core::bail!("head output has {ak} channels, not a multiple of {k}");
    }
    x.permute((0, 2, 3, 1))?.reshape((b, h * w * (ak / k), k))
}

/// The anchors of one batch: per level `(H_l·W_l·A, 4)` xyxy pixels, and their CPU copy.
pub struct Anchors {
    /// Feature-map size `(h, w)` per level.
    pub featmap_sizes: Vec<(usize, usize)>,
    /// Anchors per level.
    pub num_level_anchors: Vec<usize>,
    /// `(N_l, 4)` per level.
    pub levels: Vec<Tensor>,
    /// All levels concatenated, `(N, 4)`.
    pub all: Tensor,
    /// The same as rows.
    pub rows: Vec<[f32; 4]>,
}

impl Anchors {
    /// Anchors for the given feature maps (`(B, C, H_l, W_l)` per level).
    ///
    /// Errors: as [`AnchorGenerator::grid_priors`].
    pub fn new(gen: &AnchorGenerator, feats: &[Tensor], device: &Device) -> Result<Self> {
        let featmap_sizes = feats
            .iter()
            .map(|f| Ok((f.dim(2)?, f.dim(3)?)))
            .collect::<Result<Vec<_>>>()?;
        let levels = gen.grid_priors(&featmap_sizes, device)?;
        let num_level_anchors = levels
            .iter()
            .map(|l| l.dim(0))
            .collect::<Result<Vec<_>>>()?;
        let all = Tensor::cat(&levels, 0)?;
        let rows = all
            .to_device(&Device::Cpu)?
            .to_vec2::<f32>()?
            .into_iter()
            .map(|r| [r[0], r[1], r[2], r[3]])
            .collect();
        Ok(Self {
            featmap_sizes,
            num_level_anchors,
            levels,
            all,
            rows,
        })
    }

    /// `[start, end)` of level `l` in the concatenated anchors.
    pub fn level_range(&self, l: usize) -> (usize, usize) {
        let s: usize = self.num_level_anchors[..l].iter().sum();
        (s, s + self.num_level_anchors[l])
    }
}

/// Per-anchor training targets of one image (mmdetection's `_get_targets_single` with the pseudo
/// sampler): every valid anchor is a sample.
#[derive(Debug, Clone, PartialEq)]
pub struct ImageTargets {
    /// Per anchor: the class to learn, `num_classes` for background.
    pub labels: Vec<i64>,
    /// Per anchor: 1 for positives and negatives, 0 for ignored or invalid anchors.
    pub label_weights: Vec<f32>,
    /// Positive anchors, ascending.
    pub pos_inds: Vec<usize>,
    /// The GT box (xyxy, img_shape frame) of each positive.
    pub pos_gt_bboxes: Vec<[f32; 4]>,
    /// The raw assignment over the valid anchors (for inspection and tests).
    pub assign: AssignResult,
}

/// `(N, 4)` f32 tensor of xyxy rows.
pub fn boxes_tensor(b: &[[f32; 4]], device: &Device) -> Result<Tensor> {
    Tensor::from_vec(
        b.iter().flatten().copied().collect::<Vec<f32>>(),
        (b.len(), 4),
        device,
    )
}

/// Assigns the anchors of one image to its ground truth. Anchors of cells outside the image's
/// `pad_shape` are invalid (weight 0, background), as mmdetection's `valid_flags`.
///
/// Errors: candle errors from the assigner; `allowed_border ≥ 0` (not supported).
pub fn anchor_targets(
    anchors: &Anchors,
    gen: &AnchorGenerator,
    meta: &ImageMeta,
    gt: &GtInstances,
    cfg: &DenseTrainConfig,
    num_classes: usize,
) -> Result<ImageTargets> {
    if cfg.allowed_border >= 0.0 {
        candle_core::bail!(
            "train_cfg.allowed_border = {} is not supported (use -1)",
            cfg.allowed_border
        );
    }
    let dev = Device::Cpu;
    let flags: Vec<u8> = Tensor::cat(
        &gen.valid_flags(&anchors.featmap_sizes, meta.pad_shape, &dev)?,
        0,
    )?
    .to_vec1()?;
    let valid: Vec<usize> = (0..flags.len()).filter(|&i| flags[i] != 0).collect();
    let all_valid = valid.len() == flags.len();
    let priors = if all_valid {
        anchors.all.to_device(&dev)?
    } else {
        boxes_tensor(
            &valid.iter().map(|&i| anchors.rows[i]).collect::<Vec<_>>(),
            &dev,
        )?
    };
    let gt_boxes = boxes_tensor(&gt.bboxes, &dev)?;
    let assign = match &cfg.assigner {
        AssignerConfig::MaxIoUAssigner(a) => {
            let ign = if gt.ignored.is_empty() {
                None
            } else {
                Some(boxes_tensor(&gt.ignored, &dev)?)
            };
            a.assign(&priors, &gt_boxes, &gt.labels, ign.as_ref())?
        }
        AssignerConfig::AtssAssigner(a) => {
            let mut per_level = Vec::with_capacity(anchors.num_level_anchors.len());
            for l in 0..anchors.num_level_anchors.len() {
                let (s, e) = anchors.level_range(l);
                per_level.push(flags[s..e].iter().filter(|&&f| f != 0).count());
            }
            a.assign(&priors, &per_level, &gt_boxes, &gt.labels)?
        }
    };
    let n = flags.len();
    let mut labels = vec![num_classes as i64; n];
    let mut label_weights = vec![0f32; n];
    let mut pos_inds = Vec::new();
    let mut pos_gt_bboxes = Vec::new();
    let pos_w = if cfg.pos_weight <= 0.0 {
        1.0
    } else {
        cfg.pos_weight as f32
    };
    for (j, &g) in assign.gt_inds.iter().enumerate() {
        let i = valid[j];
        if g > 0 {
            let k = (g - 1) as usize;
            labels[i] = gt.labels[k];
            label_weights[i] = pos_w;
            pos_inds.push(i);
            pos_gt_bboxes.push(gt.bboxes[k]);
        } else if g == 0 {
            label_weights[i] = 1.0;
        }
    }
    Ok(ImageTargets {
        labels,
        label_weights,
        pos_inds,
        pos_gt_bboxes,
        assign,
    })
}

/// The targets of one pyramid level over the whole batch, rows ordered `(image, anchor)` as the
/// flattened `(B·N_l, K)` head outputs.
pub struct LevelTargets {
    /// `(B·N_l,)` i64 class targets (`num_classes` = background).
    pub labels: Tensor,
    /// `(B·N_l,)` f32 classification weights.
    pub label_weights: Tensor,
    /// Rows of the positives in the flattened outputs.
    pub pos_rows: Vec<u32>,
    /// Anchor of each positive.
    pub pos_anchors: Vec<[f32; 4]>,
    /// GT box of each positive.
    pub pos_gt: Vec<[f32; 4]>,
}

impl LevelTargets {
    /// Gathers level `l` of every image's targets.
    ///
    /// Errors: candle errors.
    pub fn gather(
        anchors: &Anchors,
        targets: &[ImageTargets],
        l: usize,
        device: &Device,
    ) -> Result<Self> {
        let (s, e) = anchors.level_range(l);
        let n = e - s;
        let mut labels = Vec::with_capacity(targets.len() * n);
        let mut weights = Vec::with_capacity(targets.len() * n);
        let (mut pos_rows, mut pos_anchors, mut pos_gt) = (Vec::new(), Vec::new(), Vec::new());
        for (b, t) in targets.iter().enumerate() {
            labels.extend_from_slice(&t.labels[s..e]);
            weights.extend_from_slice(&t.label_weights[s..e]);
            for (&p, g) in t.pos_inds.iter().zip(&t.pos_gt_bboxes) {
                if p >= s && p < e {
                    pos_rows.push((b * n + p - s) as u32);
                    pos_anchors.push(anchors.rows[p]);
                    pos_gt.push(*g);
                }
            }
        }
        Ok(Self {
            labels: Tensor::from_vec(labels, targets.len() * n, device)?,
            label_weights: Tensor::from_vec(weights, targets.len() * n, device)?,
            pos_rows,
            pos_anchors,
            pos_gt,
        })
    }

    /// `(P, 4)` tensor of the positive anchors.
    pub fn pos_anchors_tensor(&self, device: &Device) -> Result<Tensor> {
        boxes_tensor(&self.pos_anchors, device)
    }

    /// `(P, 4)` tensor of the positives' GT boxes.
    pub fn pos_gt_tensor(&self, device: &Device) -> Result<Tensor> {
        boxes_tensor(&self.pos_gt, device)
    }

    /// `(P,)` u32 row indices of the positives.
    pub fn pos_rows_tensor(&self, device: &Device) -> Result<Tensor> {
        Tensor::new(self.pos_rows.as_slice(), device)
    }
}

/// One image's raw head outputs of one level, as CPU rows.
pub struct LevelOutputs<'a> {
    /// `(A·C, H, W)` classification logits.
    pub cls: &'a Tensor,
    /// `(A·4, H, W)` box deltas.
    pub reg: &'a Tensor,
    /// `(A, H, W)` score-factor logits (ATSS centerness), if any.
    pub score_factor: Option<&'a Tensor>,
}

/// mmdetection's `_predict_by_feat_single` + `_bbox_post_process` for one image: per level
/// sigmoid scores, keep `> score_thr`, top `nms_pre` by score, decode (clipped to `img_shape`);
/// then concatenate, rescale to the original image (multiply by `1 / scale_factor` in f32),
/// multiply by the sigmoid score factor if any, drop boxes with `w` or `h` ≤ `min_bbox_size`,
/// per-class NMS, keep `max_per_img`.
///
/// `levels`: one entry per pyramid level; `anchors`: `(N_l, 4)` per level.
///
/// Errors: shape mismatches.
pub fn predict_image(
    levels: &[LevelOutputs],
    anchors: &[Tensor],
    num_classes: usize,
    coder: &DeltaXYWHBBoxCoder,
    cfg: &DenseTestConfig,
    meta: &ImageMeta,
) -> Result<Detections> {
    let cpu = Device::Cpu;
    let mut boxes: Vec<Tensor> = Vec::new();
    let mut scores: Vec<f32> = Vec::new();
    let mut labels: Vec<i64> = Vec::new();
    let mut factors: Vec<f32> = Vec::new();
    for (lvl, a) in levels.iter().zip(anchors) {
        let cls = flatten_level(&lvl.cls.unsqueeze(0)?, num_classes)?.squeeze(0)?;
        let s: Vec<f32> = candle_nn::ops::sigmoid(&cls)?
            .to_device(&cpu)?
            .flatten_all()?
            .to_vec1()?;
        let mut cand: Vec<usize> = (0..s.len())
            .filter(|&i| s[i] as f64 > cfg.score_thr)
            .collect();
        cand.sort_by(|&x, &y| s[y].total_cmp(&s[x]).then(x.cmp(&y)));
        if cfg.nms_pre > 0 {
            cand.truncate(cfg.nms_pre as usize);
        }
        if cand.is_empty() {
            continue;
        }
        let rows: Vec<u32> = cand.iter().map(|&i| (i / num_classes) as u32).collect();
        let idx = Tensor::new(rows.as_slice(), &cpu)?;
        let reg = flatten_level(&lvl.reg.unsqueeze(0)?, 4)?
            .squeeze(0)?
            .to_device(&cpu)?;
        let deltas = reg.index_select(&idx, 0)?;
        let pri = a.to_device(&cpu)?.index_select(&idx, 0)?;
        let max_shape = (meta.img_shape.0 as f64, meta.img_shape.1 as f64);
        boxes.push(coder.decode(&pri, &deltas, Some(max_shape), WH_RATIO_CLIP)?);
        scores.extend(cand.iter().map(|&i| s[i]));
        labels.extend(cand.iter().map(|&i| (i % num_classes) as i64));
        if let Some(f) = lvl.score_factor {
            let f: Vec<f32> =
                candle_nn::ops::sigmoid(&f.to_device(&cpu)?.permute((1, 2, 0))?.flatten_all()?)?
                    .to_vec1()?;
            factors.extend(rows.iter().map(|&r| f[r as usize]));
        }
    }
    if scores.is_empty() {
        return Ok(Detections::default());
    }
    let inv = [
        (1.0 / meta.scale_factor.0) as f32,
        (1.0 / meta.scale_factor.1) as f32,
    ];
    let b: Vec<Vec<f32>> = Tensor::cat(&boxes, 0)?.to_vec2()?;
    let mut bx: Vec<[f32; 4]> = b
        .iter()
        .map(|r| [r[0] * inv[0], r[1] * inv[1], r[2] * inv[0], r[3] * inv[1]])
        .collect();
    if !factors.is_empty() {
        for (s, f) in scores.iter_mut().zip(&factors) {
            *s *= f;
        }
    }
    let keep: Vec<usize> = (0..bx.len())
        .filter(|&i| {
            (bx[i][2] - bx[i][0]) as f64 > cfg.min_bbox_size
                && (bx[i][3] - bx[i][1]) as f64 > cfg.min_bbox_size
        })
        .collect();
    if keep.len() != bx.len() {
        bx = keep.iter().map(|&i| bx[i]).collect();
        scores = keep.iter().map(|&i| scores[i]).collect();
        labels = keep.iter().map(|&i| labels[i]).collect();
    }
    if bx.is_empty() {
        return Ok(Detections::default());
    }
    if cfg.nms.kind != "nms" {
        candle_core::bail!(
            "test_cfg.nms.type {:?} is not supported (only \"nms\")",
            cfg.nms.kind
        );
    }
    let kept: Vec<i64> = batched_nms(
        &boxes_tensor(&bx, &cpu)?,
        &Tensor::new(scores.as_slice(), &cpu)?,
        &Tensor::new(labels.as_slice(), &cpu)?,
        cfg.nms.iou_threshold as f32,
    )?
    .to_dtype(DType::I64)?
    .to_vec1()?;
    let kept = &kept[..kept.len().min(cfg.max_per_img)];
    Ok(Detections {
        bboxes: kept.iter().map(|&k| bx[k as usize]).collect(),
        scores: kept.iter().map(|&k| scores[k as usize]).collect(),
        labels: kept.iter().map(|&k| labels[k as usize]).collect(),
        masks: None,
    })
}

/// Per-image training targets of a batch ([`anchor_targets`] for each `(meta, gt)` pair), the
/// `get_targets` of mmdetection's anchor heads.
///
/// Errors: those of [`anchor_targets`].
pub fn batch_anchor_targets(
    anchors: &Anchors,
    gen: &AnchorGenerator,
    metas: &[ImageMeta],
    gts: &[GtInstances],
    cfg: &DenseTrainConfig,
    num_classes: usize,
) -> Result<Vec<ImageTargets>> {
    metas
        .iter()
        .zip(gts)
        .map(|(m, g)| anchor_targets(anchors, gen, m, g, cfg, num_classes))
        .collect()
}

/// mmdetection's `predict_by_feat` for a batch: per image, the levels' `cls_scores` /
/// `bbox_preds` (and `centernesses` when present, as ATSS's score factors) go through
/// [`predict_image`] with anchors of `gen` on the maps' sizes. Detections are in
/// original-image pixels (xyxy).
///
/// Errors: batch sizes that differ between levels; candle errors.
pub fn predict_batch(
    cls_scores: &[Tensor],
    bbox_preds: &[Tensor],
    centernesses: Option<&[Tensor]>,
    gen: &AnchorGenerator,
    coder: &DeltaXYWHBBoxCoder,
    num_classes: usize,
    test_cfg: &DenseTestConfig,
    metas: &[ImageMeta],
) -> Result<Vec<Detections>> {
    let sizes = cls_scores
        .iter()
        .map(|f| Ok((f.dim(2)?, f.dim(3)?)))
        .collect::<Result<Vec<_>>>()?;
    let anchors = gen.grid_priors(&sizes, &Device::Cpu)?;
    let per_image = |maps: &[Tensor], i: usize| -> Result<Vec<Tensor>> {
        maps.iter().map(|t| t.get(i)).collect()
    };
    metas
        .iter()
        .enumerate()
        .map(|(i, meta)| {
            let cls = per_image(cls_scores, i)?;
            let reg = per_image(bbox_preds, i)?;
            let ctr = centernesses.map(|c| per_image(c, i)).transpose()?;
            let levels: Vec<LevelOutputs> = (0..cls.len())
                .map(|l| LevelOutputs {
                    cls: &cls[l],
                    reg: &reg[l],
                    score_factor: ctr.as_ref().map(|c| &c[l]),
                })
                .collect();
            predict_image(&levels, &anchors, num_classes, coder, test_cfg, meta)
        })
        .collect()
}
