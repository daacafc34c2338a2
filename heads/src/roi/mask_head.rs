//! `FCNMaskHead` (He et al. 2017, "Mask R-CNN", Fig. 4 right; mmdetection's `FCNMaskHead`):
//! `num_convs` 3x3 conv + ReLU on the `(P, C, 14, 14)` RoI features, a 2x2 stride-2 transposed
//! conv + ReLU, and a 1x1 conv to one `28x28` logit map per class.

use crate::dense::common::CrossEntropyLossConfig;
use candle_core::{Result, Tensor};
use candle_nn::{Init, VarBuilder};
use densepred_core::config::defaults as d;
use densepred_core::nn::{Conv2d, ConvCfg};
use serde::{Deserialize, Serialize};

fn fourteen() -> usize {
    14
}
fn eighty() -> usize {
    80
}

/// `upsample_cfg` table: only the 2x transposed convolution.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", deny_unknown_fields)]
pub enum UpsampleConfig {
    /// `ConvTranspose2d(k = s = scale_factor)`.
    #[serde(rename = "deconv")]
    Deconv {
        /// Only 2.
        scale_factor: usize,
    },
}

fn deconv2() -> UpsampleConfig {
    UpsampleConfig::Deconv { scale_factor: 2 }
}

/// `roi_head.mask_head` table (`type = "FCNMaskHead"`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FcnMaskHeadConfig {
    /// 3x3 convs before the upsampling.
    #[serde(default = "d::four_usize")]
    pub num_convs: usize,
    /// RoI feature side.
    #[serde(default = "fourteen")]
    pub roi_feat_size: usize,
    /// Channels of the RoI features.
    #[serde(default = "d::c256")]
    pub in_channels: usize,
    /// Kernel of the convs: only 3.
    #[serde(default = "d::three_usize")]
    pub conv_kernel_size: usize,
    /// Channels of the convs.
    #[serde(default = "d::c256")]
    pub conv_out_channels: usize,
    /// Object classes (one mask channel each).
    #[serde(default = "eighty")]
    pub num_classes: usize,
    /// One mask for all classes: only `false` is supported.
    #[serde(default)]
    pub class_agnostic: bool,
    /// The upsampling.
    #[serde(default = "deconv2")]
    pub upsample_cfg: UpsampleConfig,
    /// `CrossEntropyLoss` with `use_mask = true`.
    pub loss_mask: CrossEntropyLossConfig,
    /// Not supported: Kaiming-normal (fan-out) convs, zero biases (mmdetection's defaults).
    #[serde(default)]
    pub init_cfg: Option<densepred_core::config::Unsupported>,
}

densepred_core::config_by_type! {
    /// `roi_head.mask_head` table, selected by `type`.
    pub enum MaskHeadConfig {
        /// The FCN mask head.
        "FCNMaskHead" => Fcn(FcnMaskHeadConfig),
    }
}

/// The built mask head.
pub struct MaskHead {
    cfg: FcnMaskHeadConfig,
    convs: Vec<Conv2d>,
    up_weight: Tensor,
    up_bias: Tensor,
    conv_logits: Conv2d,
}

fn kaiming_fan_out(fan_out: usize) -> Init {
    Init::Randn {
        mean: 0.0,
        stdev: (2.0 / fan_out as f64).sqrt(),
    }
}

impl MaskHead {
    /// Builds the head under `vb` (`convs.{i}.conv.*`, `upsample.*`, `conv_logits.*`).
    ///
    /// Errors: class-agnostic masks, a kernel other than 3, an upsampling other than 2x deconv,
    /// a `loss_mask` without `use_mask`.
    pub fn new(vb: VarBuilder, cfg: &MaskHeadConfig) -> Result<Self> {
        let c = cfg.body();
        if c.class_agnostic {
            candle_core::bail!("roi_head.mask_head.class_agnostic = true is not supported");
        }
        if c.conv_kernel_size != 3 {
            candle_core::bail!("roi_head.mask_head.conv_kernel_size: only 3 is supported");
        }
        let UpsampleConfig::Deconv { scale_factor } = c.upsample_cfg;
        if scale_factor != 2 {
            candle_core::bail!("roi_head.mask_head.upsample_cfg.scale_factor: only 2 is supported");
        }
        if !c.loss_mask.use_mask() {
            candle_core::bail!("roi_head.mask_head.loss_mask must have use_mask = true");
        }
        let co = c.conv_out_channels;
        let mut convs = Vec::new();
        for i in 0..c.num_convs {
            let cin = if i == 0 { c.in_channels } else { co };
            convs.push(Conv2d::with_init(
                vb.pp("convs").pp(i).pp("conv"),
                cin,
                co,
                3,
                ConvCfg {
                    padding: 1,
                    ..Default::default()
                },
                true,
                kaiming_fan_out(co * 9),
            )?);
        }
        let up_in = if c.num_convs == 0 { c.in_channels } else { co };
        let up_weight = vb.pp("upsample").get_with_hints(
            (up_in, co, 2, 2),
            "weight",
            kaiming_fan_out(up_in * 4),
        )?;
        let up_bias = vb
            .pp("upsample")
            .get_with_hints(co, "bias", Init::Const(0.0))?;
        let conv_logits = Conv2d::with_init(
            vb.pp("conv_logits"),
            co,
            c.num_classes,
            1,
            ConvCfg::default(),
            true,
            kaiming_fan_out(c.num_classes),
        )?;
        Ok(Self {
            cfg: c.clone(),
            convs,
            up_weight,
            up_bias,
            conv_logits,
        })
    }

    /// The config.
    pub fn config(&self) -> &FcnMaskHeadConfig {
        &self.cfg
    }

    /// `(P, C, S, S)` RoI features → mask logits `(P, classes, 2S, 2S)`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut h = x.clone();
        for c in &self.convs {
            h = c.forward_relu(&h)?;
        }
        let h = densepred_core::ops::conv_transpose2x2(&h, &self.up_weight, &self.up_bias, true)?;
        self.conv_logits.forward(&h)
    }
}
