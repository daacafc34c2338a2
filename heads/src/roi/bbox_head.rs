//! `Shared2FCBBoxHead` (mmdetection's `ConvFCBBoxHead` with two shared FCs; Lin et al. 2017,
//! FPN §4.2's "2fc" box head): flatten the `(R, C, 7, 7)` RoI features, two FC + ReLU layers of
//! `fc_out_channels`, then `fc_cls` (classes + background, background last) and `fc_reg`
//! (class-specific deltas).

use crate::dense::common::{BBoxCoderConfig, BoxLossConfig, CrossEntropyLossConfig};
use candle_core::{Result, Tensor};
use candle_nn::{Init, VarBuilder};
use densepred_core::config::defaults as d;
use densepred_core::nn::Linear;
use serde::{Deserialize, Serialize};

fn fc1024() -> usize {
    1024
}
fn seven() -> usize {
    7
}
fn eighty() -> usize {
    80
}

/// `roi_head.bbox_head` table (`type = "Shared2FCBBoxHead"`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Shared2FcBBoxHeadConfig {
    /// Channels of the RoI features.
    #[serde(default = "d::c256")]
    pub in_channels: usize,
    /// Width of the shared FCs.
    #[serde(default = "fc1024")]
    pub fc_out_channels: usize,
    /// RoI feature side.
    #[serde(default = "seven")]
    pub roi_feat_size: usize,
    /// Object classes (no background).
    #[serde(default = "eighty")]
    pub num_classes: usize,
    /// Box encoding relative to the RoI (stds 0.1, 0.1, 0.2, 0.2 in Mask R-CNN).
    pub bbox_coder: BBoxCoderConfig,
    /// One box for all classes instead of one per class: only `false` is supported.
    #[serde(default)]
    pub reg_class_agnostic: bool,
    /// Regress decoded boxes: only `false` is supported.
    #[serde(default)]
    pub reg_decoded_bbox: bool,
    /// Softmax cross-entropy over classes + background.
    pub loss_cls: CrossEntropyLossConfig,
    /// L1 / smooth-L1 on the target class's deltas.
    pub loss_bbox: BoxLossConfig,
    /// Not supported: Xavier-uniform shared FCs, N(0, 0.01) `fc_cls`, N(0, 0.001) `fc_reg`, zero
    /// biases (mmdetection's defaults).
    #[serde(default)]
    pub init_cfg: Option<densepred_core::config::Unsupported>,
}

densepred_core::config_by_type! {
    /// `roi_head.bbox_head` table, selected by `type`.
    pub enum BBoxHeadConfig {
        /// Two shared FCs.
        "Shared2FCBBoxHead" => Shared2Fc(Shared2FcBBoxHeadConfig),
    }
}

/// The built box head.
pub struct BBoxHead {
    cfg: Shared2FcBBoxHeadConfig,
    shared_fcs: Vec<Linear>,
    fc_cls: Linear,
    fc_reg: Linear,
}

impl BBoxHead {
    /// Builds the head under `vb` (`shared_fcs.{0,1}.*`, `fc_cls.*`, `fc_reg.*`).
    ///
    /// Errors: `reg_class_agnostic`, `reg_decoded_bbox`, a sigmoid or mask `loss_cls`, GIoU.
    pub fn new(vb: VarBuilder, cfg: &BBoxHeadConfig) -> Result<Self> {
        let c = cfg.body();
        if c.reg_class_agnostic || c.reg_decoded_bbox {
            candle_core::bail!(
                "roi_head.bbox_head: reg_class_agnostic and reg_decoded_bbox must be false"
            );
        }
        if c.loss_cls.use_sigmoid() || c.loss_cls.use_mask() {
            candle_core::bail!("roi_head.bbox_head.loss_cls must be the softmax CrossEntropyLoss");
        }
        if matches!(c.loss_bbox, BoxLossConfig::GIoULoss { .. }) {
            candle_core::bail!("roi_head.bbox_head.loss_bbox: GIoULoss is not supported");
        }
        let mut shared_fcs = Vec::new();
        let mut cin = c.in_channels * c.roi_feat_size * c.roi_feat_size;
        for i in 0..2 {
            let bound = (6.0 / (cin + c.fc_out_channels) as f64).sqrt();
            shared_fcs.push(Linear::with_init(
                vb.pp("shared_fcs").pp(i),
                cin,
                c.fc_out_channels,
                true,
                Init::Uniform {
                    lo: -bound,
                    up: bound,
                },
            )?);
            cin = c.fc_out_channels;
        }
        let normal = |std: f64| Init::Randn {
            mean: 0.0,
            stdev: std,
        };
        Ok(Self {
            fc_cls: Linear::with_init(vb.pp("fc_cls"), cin, c.num_classes + 1, true, normal(0.01))?,
            fc_reg: Linear::with_init(
                vb.pp("fc_reg"),
                cin,
                c.num_classes * 4,
                true,
                normal(0.001),
            )?,
            shared_fcs,
            cfg: c.clone(),
        })
    }

    /// The config.
    pub fn config(&self) -> &Shared2FcBBoxHeadConfig {
        &self.cfg
    }

    /// `(R, C, S, S)` RoI features → class logits `(R, classes + 1)` (background last) and
    /// deltas `(R, 4·classes)` (`class·4 + (dx, dy, dw, dh)`).
    pub fn forward(&self, x: &Tensor) -> Result<(Tensor, Tensor)> {
        let mut h = x.flatten_from(1)?;
        for fc in &self.shared_fcs {
            h = fc.forward(&h)?.relu()?;
        }
        Ok((self.fc_cls.forward(&h)?, self.fc_reg.forward(&h)?))
    }
}
