//! Semantic segmentation decode heads with mmsegmentation 1.x semantics and parameter names:
//! [`UperHead`] (UperNet: PPM + FPN fusion, Xiao et al. 2018), [`FcnHead`] (the auxiliary head)
//! and [`FpnHead`] (Semantic FPN, Kirillov et al. 2019), plus mmseg's `loss_by_feat`
//! ([`seg_loss`]) and `accuracy`.
//!
//! Every head maps a list of backbone/neck maps `(B, C_i, H_i, W_i)` to logits
//! `(B, num_classes, H_0, W_0)` at the resolution of its first input (1/4 of the image for the
//! SMT configs).

use candle_core::{DType, Result, Tensor};
use candle_nn::VarBuilder;
use densepred_core::config::defaults as d;
use densepred_core::losses::{cross_entropy_resized, Reduction};
use densepred_core::nn::{BatchNorm2d, Conv2d, ConvCfg};
use densepred_core::ops::{adaptive_avg_pool2d, resize_bilinear};
use serde::{Deserialize, Serialize};

fn default_dropout() -> f64 {
    0.1
}

fn default_ignore() -> i64 {
    255
}

/// mmseg `CrossEntropyLoss` (softmax) settings of a decode head.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SegLossConfig {
    /// `"CrossEntropyLoss"`.
    #[serde(rename = "type")]
    pub kind: String,
    /// Only `false` (softmax) is supported.
    #[serde(default)]
    pub use_sigmoid: bool,
    /// Multiplies the loss (0.4 for the auxiliary FCN head).
    #[serde(default = "d::one_f64")]
    pub loss_weight: f64,
    /// Per-class weights `(num_classes,)`, PyTorch's `weight=`.
    #[serde(default)]
    pub class_weight: Option<Vec<f64>>,
    /// Divide by the non-ignored pixels instead of all pixels (mmseg default false).
    #[serde(default)]
    pub avg_non_ignore: bool,
    /// mmseg's name for the loss (`loss_ce`).
    #[serde(default = "loss_ce")]
    pub loss_name: String,
}

fn loss_ce() -> String {
    "loss_ce".into()
}

impl Default for SegLossConfig {
    fn default() -> Self {
        Self {
            kind: "CrossEntropyLoss".into(),
            use_sigmoid: false,
            loss_weight: 1.0,
            class_weight: None,
            avg_non_ignore: false,
            loss_name: loss_ce(),
        }
    }
}

/// mmseg `norm_cfg`: BN, or SyncBN (the statistics of the whole batch over the ranks of a
/// data-parallel run, [`densepred_core::nn::BatchNorm2d::sync`]; BN in one process).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SegNormConfig {
    /// `"BN"` or `"SyncBN"`.
    #[serde(rename = "type")]
    pub kind: String,
    /// Norm parameters are trained (only `true`, mmseg's default, is supported).
    #[serde(default = "d::yes", deserialize_with = "requires_grad_true")]
    pub requires_grad: bool,
}

impl SegNormConfig {
    /// Whether the norm is SyncBN.
    ///
    /// Errors: a type other than `BN` / `SyncBN` (named as `norm_cfg.type`).
    pub fn is_sync(&self) -> Result<bool> {
        match self.kind.as_str() {
            "BN" => Ok(false),
            "SyncBN" => Ok(true),
            o => candle_core::bail!("norm_cfg.type = {o:?}: BN and SyncBN are supported"),
        }
    }
}

/// `norm_cfg.requires_grad`: only `true` (the message names the key, since the decode heads'
/// flattened tables lose the key path).
fn requires_grad_true<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> std::result::Result<bool, D::Error> {
    if bool::deserialize(d)? {
        Ok(true)
    } else {
        Err(serde::de::Error::custom(
            "norm_cfg.requires_grad = false is not supported (norm layers are always trained)",
        ))
    }
}

/// Settings shared by mmseg decode heads (`BaseDecodeHead`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct DecodeCommon {
    /// Channels of the inputs the head reads (one per `in_index`).
    pub in_channels: InChannels,
    /// Which backbone/neck outputs the head reads.
    pub in_index: InIndex,
    /// Width of the head's convolutions.
    pub channels: usize,
    /// Dropout before `conv_seg` (training only).
    #[serde(default = "default_dropout")]
    pub dropout_ratio: f64,
    /// Classes (150 for ADE20K).
    pub num_classes: usize,
    /// `BN` / `SyncBN`.
    pub norm_cfg: SegNormConfig,
    /// Bilinear resizes use `align_corners` (false in every SMT config).
    #[serde(default)]
    pub align_corners: bool,
    /// Loss settings.
    #[serde(default)]
    pub loss_decode: SegLossConfig,
    /// Label value that is ignored by the loss and the metrics.
    #[serde(default = "default_ignore")]
    pub ignore_index: i64,
}

/// `in_channels`: one int or a list.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum InChannels {
    /// One input.
    One(usize),
    /// Several inputs.
    Many(Vec<usize>),
}

impl InChannels {
    fn list(&self) -> Vec<usize> {
        match self {
            Self::One(c) => vec![*c],
            Self::Many(v) => v.clone(),
        }
    }
}

/// `in_index`: one int or a list.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum InIndex {
    /// One input.
    One(usize),
    /// Several inputs.
    Many(Vec<usize>),
}

impl InIndex {
    fn list(&self) -> Vec<usize> {
        match self {
            Self::One(c) => vec![*c],
            Self::Many(v) => v.clone(),
        }
    }
}

fn select(inputs: &[Tensor], idx: &InIndex) -> Result<Vec<Tensor>> {
    idx.list()
        .into_iter()
        .map(|i| {
            inputs.get(i).cloned().ok_or_else(|| {
                candle_core::Error::msg(format!(
                    "decode head: in_index {i} but only {} inputs",
                    inputs.len()
                ))
            })
        })
        .collect()
}

/// mmcv `ConvModule` with a norm: conv (no bias) → BN → ReLU; parameters `conv.weight`,
/// `bn.{weight,bias,running_mean,running_var}`.
pub struct SegConvModule {
    conv: Conv2d,
    bn: BatchNorm2d,
}

impl SegConvModule {
    /// `k`x`k` conv with "same" padding `k / 2`, then the norm of `norm` (BN or SyncBN).
    ///
    /// Errors: a norm type other than `BN` / `SyncBN`; candle errors.
    pub fn new(
        norm: &SegNormConfig,
        vb: VarBuilder,
        cin: usize,
        cout: usize,
        k: usize,
    ) -> Result<Self> {
        Ok(Self {
            conv: Conv2d::new(
                vb.pp("conv"),
                cin,
                cout,
                k,
                ConvCfg {
                    padding: k / 2,
                    ..Default::default()
                },
                false,
            )?,
            bn: BatchNorm2d::new(vb.pp("bn"), cout, 1e-5)?.synced(norm.is_sync()?),
        })
    }

    /// `(B, cin, H, W)` → `(B, cout, H, W)`; `train` uses batch statistics.
    pub fn forward(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        self.bn.forward_relu(&self.conv.forward(x)?, train)
    }

    /// [`SegConvModule::forward`] of the channel concatenation of `xs` (`Σ C_j = cin`), without
    /// building it ([`Conv2d::forward_cat`]).
    pub fn forward_cat(&self, xs: &[Tensor], train: bool) -> Result<Tensor> {
        self.bn.forward_relu(&self.conv.forward_cat(xs)?, train)
    }

    /// [`SegConvModule::forward_cat`] of the parts each resized bilinearly to `size` first
    /// ([`Conv2d::forward_cat_resized`]).
    pub fn forward_cat_resized(
        &self,
        xs: &[Tensor],
        size: (usize, usize),
        align_corners: bool,
        train: bool,
    ) -> Result<Tensor> {
        let y = self.conv.forward_cat_resized(xs, size, align_corners)?;
        self.bn.forward_relu(&y, train)
    }
}

/// Dropout (`nn.Dropout2d` in mmseg's `BaseDecodeHead`: whole channels) and the 1x1 `conv_seg`.
struct ClsSeg {
    conv_seg: Conv2d,
    dropout: f64,
}

impl ClsSeg {
    fn new(vb: VarBuilder, channels: usize, num_classes: usize, dropout: f64) -> Result<Self> {
        // mmseg initialises conv_seg with normal(0, 0.01), bias 0.
        let weight = vb.pp("conv_seg").get_with_hints(
            (num_classes, channels, 1, 1),
            "weight",
            candle_nn::Init::Randn {
                mean: 0.0,
                stdev: 0.01,
            },
        )?;
        let bias =
            vb.pp("conv_seg")
                .get_with_hints(num_classes, "bias", candle_nn::Init::Const(0.0))?;
        Ok(Self {
            conv_seg: Conv2d {
                weight,
                bias: Some(bias),
                cfg: ConvCfg::default(),
            },
            dropout,
        })
    }

    fn forward(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let x = if train && self.dropout > 0.0 {
            dropout2d(x, self.dropout)?
        } else {
            x.clone()
        };
        self.conv_seg.forward(&x)
    }
}

/// `nn.Dropout2d(p)` in training: each `(b, c)` channel is zeroed with probability `p`, the kept
/// ones scaled by `1 / (1 − p)`; draws from `densepred_core::rng`.
fn dropout2d(x: &Tensor, p: f64) -> Result<Tensor> {
    let (b, c, _, _) = x.dims4()?;
    let keep = 1.0 - p;
    let mask: Vec<f32> = densepred_core::rng::with_rng(|r| {
        (0..b * c)
            .map(|_| {
                if rand::Rng::random::<f64>(r) < keep {
                    (1.0 / keep) as f32
                } else {
                    0.0
                }
            })
            .collect()
    });
    let mask = Tensor::from_vec(mask, b * c, x.device())?.to_dtype(x.dtype())?;
    let x3 = x.reshape((b * c, ()))?;
    densepred_core::ops::mul_scale_channels(&x3.unsqueeze(0)?, &mask)?
        .squeeze(0)?
        .reshape(x.shape())
}

/// UPerHead configuration (mmseg `UPerHead`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct UperHeadConfig {
    /// Shared decode-head settings.
    #[serde(flatten)]
    pub common: DecodeCommon,
    /// PPM pooling sizes (1, 2, 3, 6).
    #[serde(default = "pool_scales")]
    pub pool_scales: Vec<usize>,
    /// Keys of neither the head nor [`DecodeCommon`] are refused.
    #[serde(flatten)]
    pub unknown_keys: densepred_core::config::DenyRest,
}

fn pool_scales() -> Vec<usize> {
    vec![1, 2, 3, 6]
}

/// UperNet's decode head: PPM on the last input, FPN-style top-down fusion, all levels resized
/// to the first and fused by `fpn_bottleneck`, then `conv_seg`. Parameter names as mmseg
/// (`psp_modules.{i}.1`, `bottleneck`, `lateral_convs.{i}`, `fpn_convs.{i}`, `fpn_bottleneck`,
/// `conv_seg`).
pub struct UperHead {
    cfg: UperHeadConfig,
    psp_modules: Vec<SegConvModule>,
    bottleneck: SegConvModule,
    lateral_convs: Vec<SegConvModule>,
    fpn_convs: Vec<SegConvModule>,
    fpn_bottleneck: SegConvModule,
    cls: ClsSeg,
}

impl UperHead {
    /// Builds the head under `vb` (the `decode_head.` prefix).
    ///
    /// Errors: fewer than one input, mismatched `in_channels` / `in_index` lengths.
    pub fn new(vb: VarBuilder, cfg: &UperHeadConfig) -> Result<Self> {
        let c = &cfg.common;
        let ins = c.in_channels.list();
        if ins.is_empty() || ins.len() != c.in_index.list().len() {
            candle_core::bail!(
                "UPerHead: in_channels {:?} and in_index {:?} must be non-empty and equally long",
                ins,
                c.in_index.list()
            );
        }
        let last = *ins.last().expect("non-empty");
        let ch = c.channels;
        let psp_modules = (0..cfg.pool_scales.len())
            .map(|i| {
                SegConvModule::new(
                    &c.norm_cfg,
                    vb.pp(format!("psp_modules.{i}.1")),
                    last,
                    ch,
                    1,
                )
            })
            .collect::<Result<Vec<_>>>()?;
        let bottleneck = SegConvModule::new(
            &c.norm_cfg,
            vb.pp("bottleneck"),
            last + cfg.pool_scales.len() * ch,
            ch,
            3,
        )?;
        let n = ins.len();
        let lateral_convs = (0..n - 1)
            .map(|i| {
                SegConvModule::new(
                    &c.norm_cfg,
                    vb.pp(format!("lateral_convs.{i}")),
                    ins[i],
                    ch,
                    1,
                )
            })
            .collect::<Result<Vec<_>>>()?;
        let fpn_convs = (0..n - 1)
            .map(|i| SegConvModule::new(&c.norm_cfg, vb.pp(format!("fpn_convs.{i}")), ch, ch, 3))
            .collect::<Result<Vec<_>>>()?;
        let fpn_bottleneck =
            SegConvModule::new(&c.norm_cfg, vb.pp("fpn_bottleneck"), n * ch, ch, 3)?;
        let cls = ClsSeg::new(vb, ch, c.num_classes, c.dropout_ratio)?;
        Ok(Self {
            cfg: cfg.clone(),
            psp_modules,
            bottleneck,
            lateral_convs,
            fpn_convs,
            fpn_bottleneck,
            cls,
        })
    }

    /// The head's settings.
    pub fn config(&self) -> &UperHeadConfig {
        &self.cfg
    }

    fn psp(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let (_, _, h, w) = x.dims4()?;
        let ac = self.cfg.common.align_corners;
        let mut outs = vec![x.clone()];
        for (s, m) in self.cfg.pool_scales.iter().zip(&self.psp_modules) {
            let p = m.forward(&adaptive_avg_pool2d(x, *s, *s)?, train)?;
            outs.push(resize_bilinear(&p, h, w, ac)?);
        }
        self.bottleneck.forward_cat(&outs, train)
    }

    /// The fused features before `conv_seg`: `(B, channels, H_0, W_0)`.
    pub fn fused_features(&self, inputs: &[Tensor], train: bool) -> Result<Tensor> {
        let x = select(inputs, &self.cfg.common.in_index)?;
        let ac = self.cfg.common.align_corners;
        let n = x.len();
        let mut laterals = self
            .lateral_convs
            .iter()
            .zip(&x)
            .map(|(m, t)| m.forward(t, train))
            .collect::<Result<Vec<_>>>()?;
        laterals.push(self.psp(&x[n - 1], train)?);
        for i in (1..n).rev() {
            laterals[i - 1] = densepred_core::ops::add_resized(&laterals[i - 1], &laterals[i], ac)?;
        }
        let mut outs = self
            .fpn_convs
            .iter()
            .zip(&laterals)
            .map(|(m, t)| m.forward(t, train))
            .collect::<Result<Vec<_>>>()?;
        outs.push(laterals[n - 1].clone());
        let (_, _, h0, w0) = outs[0].dims4()?;
        self.fpn_bottleneck
            .forward_cat_resized(&outs, (h0, w0), ac, train)
    }

    /// Logits `(B, num_classes, H_0, W_0)`.
    pub fn forward(&self, inputs: &[Tensor], train: bool) -> Result<Tensor> {
        self.cls
            .forward(&self.fused_features(inputs, train)?, train)
    }
}

/// FCNHead configuration (mmseg `FCNHead`, used as UperNet's auxiliary head).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct FcnHeadConfig {
    /// Shared decode-head settings.
    #[serde(flatten)]
    pub common: DecodeCommon,
    /// Stacked 3x3 ConvModules (1 in the SMT configs).
    #[serde(default = "d::two_usize")]
    pub num_convs: usize,
    /// Concatenate the input with the convs' output before `conv_seg` (through `conv_cat`).
    #[serde(default = "d::yes")]
    pub concat_input: bool,
    /// Kernel size of the convs.
    #[serde(default = "d::three_usize")]
    pub kernel_size: usize,
    /// Keys of neither the head nor [`DecodeCommon`] are refused.
    #[serde(flatten)]
    pub unknown_keys: densepred_core::config::DenyRest,
}

/// FCN head: `num_convs` ConvModules (`convs.{i}`), optional `conv_cat`, then `conv_seg`.
pub struct FcnHead {
    cfg: FcnHeadConfig,
    convs: Vec<SegConvModule>,
    conv_cat: Option<SegConvModule>,
    cls: ClsSeg,
}

impl FcnHead {
    /// Builds the head under `vb` (e.g. `auxiliary_head.`).
    ///
    /// Errors: a list-valued `in_channels`/`in_index` (FCNHead reads one map), `num_convs = 0`
    /// with `concat_input` (mmseg forbids it).
    pub fn new(vb: VarBuilder, cfg: &FcnHeadConfig) -> Result<Self> {
        let c = &cfg.common;
        let cin = match (&c.in_channels, &c.in_index) {
            (InChannels::One(ch), InIndex::One(_)) => *ch,
            _ => candle_core::bail!("FCNHead: in_channels and in_index must be single integers"),
        };
        if cfg.num_convs == 0 && cfg.concat_input {
            candle_core::bail!("FCNHead: num_convs = 0 requires concat_input = false");
        }
        let k = cfg.kernel_size;
        let convs = (0..cfg.num_convs)
            .map(|i| {
                let i_c = if i == 0 { cin } else { c.channels };
                SegConvModule::new(&c.norm_cfg, vb.pp(format!("convs.{i}")), i_c, c.channels, k)
            })
            .collect::<Result<Vec<_>>>()?;
        let conv_cat = if cfg.concat_input {
            Some(SegConvModule::new(
                &c.norm_cfg,
                vb.pp("conv_cat"),
                cin + c.channels,
                c.channels,
                k,
            )?)
        } else {
            None
        };
        let cls = ClsSeg::new(vb, c.channels, c.num_classes, c.dropout_ratio)?;
        Ok(Self {
            cfg: cfg.clone(),
            convs,
            conv_cat,
            cls,
        })
    }

    /// The head's settings.
    pub fn config(&self) -> &FcnHeadConfig {
        &self.cfg
    }

    /// Logits `(B, num_classes, H_i, W_i)` at the resolution of its input.
    pub fn forward(&self, inputs: &[Tensor], train: bool) -> Result<Tensor> {
        let x = select(inputs, &self.cfg.common.in_index)?.remove(0);
        let mut y = x.clone();
        for m in &self.convs {
            y = m.forward(&y, train)?;
        }
        if let Some(cat) = &self.conv_cat {
            y = cat.forward(&Tensor::cat(&[x, y], 1)?, train)?;
        }
        self.cls.forward(&y, train)
    }
}

/// Semantic FPN head configuration (mmseg `FPNHead`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct FpnHeadConfig {
    /// Shared decode-head settings.
    #[serde(flatten)]
    pub common: DecodeCommon,
    /// Strides of the inputs (4, 8, 16, 32).
    pub feature_strides: Vec<usize>,
    /// Keys of neither the head nor [`DecodeCommon`] are refused.
    #[serde(flatten)]
    pub unknown_keys: densepred_core::config::DenyRest,
}

/// Semantic FPN's head: per input a scale head of `max(1, log2(s_i / s_0))` 3x3 ConvModules,
/// each followed by a 2x bilinear upsample when `s_i > s_0` (`scale_heads.{i}.{2k}` are the
/// convs), summed at the first input's size, then `conv_seg`.
pub struct FpnHead {
    cfg: FpnHeadConfig,
    scale_heads: Vec<Vec<SegConvModule>>,
    cls: ClsSeg,
}

impl FpnHead {
    /// Builds the head under `vb` (`decode_head.`).
    ///
    /// Errors: lengths of `in_channels`, `in_index`, `feature_strides` differ; strides not
    /// increasing powers-of-two multiples of the first.
    pub fn new(vb: VarBuilder, cfg: &FpnHeadConfig) -> Result<Self> {
        let c = &cfg.common;
        let ins = c.in_channels.list();
        let s = &cfg.feature_strides;
        if ins.len() != s.len() || ins.len() != c.in_index.list().len() || s.is_empty() {
            candle_core::bail!(
                "FPNHead: in_channels {:?}, in_index {:?} and feature_strides {:?} must have equal, non-zero lengths",
                ins,
                c.in_index.list(),
                s
            );
        }
        let mut scale_heads = Vec::new();
        for (i, (&cin, &st)) in ins.iter().zip(s).enumerate() {
            if st < s[0] || st % s[0] != 0 || !(st / s[0]).is_power_of_two() {
                candle_core::bail!(
                    "FPNHead: feature_strides {s:?} must be power-of-two multiples of the first"
                );
            }
            let len = ((st / s[0]).trailing_zeros() as usize).max(1);
            let mods = (0..len)
                .map(|k| {
                    let i_c = if k == 0 { cin } else { c.channels };
                    // With upsampling, modules alternate conv (even index) / upsample (odd).
                    let idx = if st != s[0] { 2 * k } else { k };
                    SegConvModule::new(
                        &c.norm_cfg,
                        vb.pp(format!("scale_heads.{i}.{idx}")),
                        i_c,
                        c.channels,
                        3,
                    )
                })
                .collect::<Result<Vec<_>>>()?;
            scale_heads.push(mods);
        }
        let cls = ClsSeg::new(vb, c.channels, c.num_classes, c.dropout_ratio)?;
        Ok(Self {
            cfg: cfg.clone(),
            scale_heads,
            cls,
        })
    }

    /// The head's settings.
    pub fn config(&self) -> &FpnHeadConfig {
        &self.cfg
    }

    /// Logits `(B, num_classes, H_0, W_0)`.
    pub fn forward(&self, inputs: &[Tensor], train: bool) -> Result<Tensor> {
        let x = select(inputs, &self.cfg.common.in_index)?;
        let ac = self.cfg.common.align_corners;
        let s0 = self.cfg.feature_strides[0];
        let mut out: Option<Tensor> = None;
        for ((t, mods), &st) in x
            .iter()
            .zip(&self.scale_heads)
            .zip(&self.cfg.feature_strides)
        {
            let mut y = t.clone();
            for m in mods {
                y = m.forward(&y, train)?;
                if st != s0 {
                    let (_, _, h, w) = y.dims4()?;
                    y = resize_bilinear(&y, 2 * h, 2 * w, ac)?;
                }
            }
            out = Some(match out {
                None => y,
                Some(o) => {
                    let (_, _, h, w) = o.dims4()?;
                    (&o + resize_bilinear(&y, h, w, ac)?)?
                }
            });
        }
        let out = out.ok_or_else(|| candle_core::Error::msg("FPNHead: no inputs"))?;
        self.cls.forward(&out, train)
    }
}

/// mmseg `BaseDecodeHead.loss_by_feat`: logits `(B, K, h, w)` are bilinearly resized to the
/// label size, then softmax cross-entropy against `labels` `(B, H, W)` (integer classes,
/// `ignore_index` skipped) averaged over **all** `B·H·W` pixels (ignored ones count as 0; with
/// `avg_non_ignore` over the non-ignored ones), times `loss_weight`.
///
/// Errors: label values outside `[0, K)` other than `ignore_index`; shape mismatches.
pub fn seg_loss(
    logits: &Tensor,
    labels: &Tensor,
    cfg: &SegLossConfig,
    ignore_index: i64,
    align_corners: bool,
) -> Result<Tensor> {
    if cfg.use_sigmoid {
        candle_core::bail!("loss_decode.use_sigmoid = true is not supported");
    }
    let cw = match &cfg.class_weight {
        Some(v) => Some(Tensor::new(v.as_slice(), logits.device())?.to_dtype(logits.dtype())?),
        None => None,
    };
    // The resize to the label size and the loss are one op on the CPU: the resized logits
    // (B, K, H, W) are not kept for the backward.
    let l = cross_entropy_resized(
        logits,
        labels,
        cw.as_ref(),
        Some(ignore_index),
        None,
        Reduction::Mean,
        None,
        cfg.avg_non_ignore,
        align_corners,
    )?;
    l * cfg.loss_weight
}

/// Predicted labels `(B, H, W)` (u32) after resizing logits to `(h, w)`: mmseg's
/// `predict_by_feat` argmax.
pub fn predict_labels(logits: &Tensor, h: usize, w: usize, align_corners: bool) -> Result<Tensor> {
    resize_bilinear(logits, h, w, align_corners)?.argmax(1)
}

/// mmseg `accuracy` (top-1, in percent) of `logits` `(B, K, h, w)` resized to the labels
/// `(B, H, W)`, over the pixels whose label is not `ignore_index`; 0 when all are ignored.
pub fn seg_accuracy(
    logits: &Tensor,
    labels: &Tensor,
    ignore_index: i64,
    align_corners: bool,
) -> Result<f64> {
    let (_, h, w) = labels.dims3()?;
    let pred: Vec<u32> = predict_labels(logits, h, w, align_corners)?
        .flatten_all()?
        .to_vec1()?;
    let lab: Vec<i64> = labels.flatten_all()?.to_dtype(DType::I64)?.to_vec1()?;
    let (mut ok, mut n) = (0usize, 0usize);
    for (p, l) in pred.iter().zip(&lab) {
        if *l != ignore_index {
            n += 1;
            ok += (*p as i64 == *l) as usize;
        }
    }
    Ok(if n == 0 {
        0.0
    } else {
        100.0 * ok as f64 / n as f64
    })
}
