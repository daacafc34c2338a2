//! Encoder-decoder segmentors (mmsegmentation's `EncoderDecoder`: UperNet, Semantic FPN):
//! backbone → optional neck → decode head (+ optional auxiliary head), built from the `[model]`
//! table with mmseg's vocabulary and parameter names (`backbone.`, `neck.`, `decode_head.`,
//! `auxiliary_head.`).

use crate::detector::NeckConfig;
use candle_core::{Result, Tensor};
use candle_nn::VarBuilder;
use densepred_backbones::{AnyBackbone, Backbone, BackboneConfig};
use densepred_heads::seg::{
    predict_labels, seg_loss, FcnHead, FcnHeadConfig, FpnHead, FpnHeadConfig, UperHead,
    UperHeadConfig,
};
use densepred_necks::fpn::Fpn;
use densepred_necks::Neck;
use serde::{Deserialize, Serialize};

fn t() -> bool {
    true
}
fn seg_pad() -> u8 {
    255
}

/// mmseg `SegDataPreProcessor`: normalisation, channel order and the padding of images and labels.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SegDataPreprocessorConfig {
    /// `"SegDataPreProcessor"`.
    #[serde(rename = "type")]
    pub kind: String,
    /// Per-channel mean (RGB order, 0–255 pixel units).
    pub mean: [f32; 3],
    /// Per-channel std.
    pub std: [f32; 3],
    /// Must be true (images are decoded as RGB).
    #[serde(default = "t")]
    pub bgr_to_rgb: bool,
    /// Image padding value (before normalisation).
    #[serde(default)]
    pub pad_val: f64,
    /// Label padding value (the ignore index).
    #[serde(default = "seg_pad")]
    pub seg_pad_val: u8,
    /// Pad every batch to this `[h, w]` (the crop size in training).
    #[serde(default)]
    pub size: Option<[usize; 2]>,
    /// Or pad to a multiple of this.
    #[serde(default)]
    pub size_divisor: Option<usize>,
}

/// A decode or auxiliary head.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type")]
pub enum SegHeadConfig {
    /// UperNet's head.
    #[serde(rename = "UPerHead")]
    UperHead(UperHeadConfig),
    /// Semantic FPN's head.
    #[serde(rename = "FPNHead")]
    FpnHead(FpnHeadConfig),
    /// FCN head (auxiliary).
    #[serde(rename = "FCNHead")]
    FcnHead(FcnHeadConfig),
}

/// A built head.
pub enum SegHead {
    /// UPerHead.
    Uper(UperHead),
    /// FPNHead.
    Fpn(FpnHead),
    /// FCNHead.
    Fcn(FcnHead),
}

impl SegHead {
    fn new(vb: VarBuilder, cfg: &SegHeadConfig) -> Result<Self> {
        Ok(match cfg {
            SegHeadConfig::UperHead(c) => Self::Uper(UperHead::new(vb, c)?),
            SegHeadConfig::FpnHead(c) => Self::Fpn(FpnHead::new(vb, c)?),
            SegHeadConfig::FcnHead(c) => Self::Fcn(FcnHead::new(vb, c)?),
        })
    }

    /// Logits `(B, K, H_0, W_0)`.
    pub fn forward(&self, x: &[Tensor], train: bool) -> Result<Tensor> {
        match self {
            Self::Uper(h) => h.forward(x, train),
            Self::Fpn(h) => h.forward(x, train),
            Self::Fcn(h) => h.forward(x, train),
        }
    }

    fn common(&self) -> &densepred_heads::seg::DecodeCommon {
        match self {
            Self::Uper(h) => &h.config().common,
            Self::Fpn(h) => &h.config().common,
            Self::Fcn(h) => &h.config().common,
        }
    }
}

/// mmseg `test_cfg`: whole-image or sliding-window inference.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SegTestConfig {
    /// `"whole"` or `"slide"`.
    #[serde(default = "whole")]
    pub mode: String,
    /// Window `[h, w]` for `slide`.
    #[serde(default)]
    pub crop_size: Option<[usize; 2]>,
    /// Window stride `[h, w]` for `slide`.
    #[serde(default)]
    pub stride: Option<[usize; 2]>,
}

fn whole() -> String {
    "whole".into()
}

impl Default for SegTestConfig {
    fn default() -> Self {
        Self {
            mode: whole(),
            crop_size: None,
            stride: None,
        }
    }
}

/// mmseg `EncoderDecoder` config.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EncoderDecoderConfig {
    /// Normalisation and padding.
    pub data_preprocessor: SegDataPreprocessorConfig,
    /// Backbone (`type = "SMT"`).
    pub backbone: BackboneConfig,
    /// Optional neck (FPN for Semantic FPN).
    #[serde(default)]
    pub neck: Option<NeckConfig>,
    /// The decode head.
    pub decode_head: SegHeadConfig,
    /// Optional auxiliary head (loss only).
    #[serde(default)]
    pub auxiliary_head: Option<SegHeadConfig>,
    /// mmseg's (empty) `train_cfg`.
    #[serde(default)]
    pub train_cfg: Option<serde_json::Value>,
    /// Inference mode.
    #[serde(default)]
    pub test_cfg: SegTestConfig,
}

/// The `[model]` table of a segmentation config.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type")]
pub enum SegModelConfig {
    /// mmseg `EncoderDecoder`.
    EncoderDecoder(EncoderDecoderConfig),
}

/// A built encoder-decoder segmentor.
pub struct Segmentor {
    cfg: EncoderDecoderConfig,
    /// The backbone.
    pub backbone: AnyBackbone,
    neck: Option<Box<dyn Neck>>,
    decode_head: SegHead,
    auxiliary_head: Option<SegHead>,
}

impl Segmentor {
    /// Builds the model under `vb` (parameters `backbone.*`, `neck.*`, `decode_head.*`,
    /// `auxiliary_head.*`).
    ///
    /// Errors: `bgr_to_rgb = false`; a neck whose `in_channels` differ from the backbone's output
    /// channels; head construction errors.
    pub fn new(vb: VarBuilder, cfg: &SegModelConfig) -> Result<Self> {
        let SegModelConfig::EncoderDecoder(c) = cfg;
        if !c.data_preprocessor.bgr_to_rgb {
            candle_core::bail!("model.data_preprocessor.bgr_to_rgb = false is not supported: densepred decodes images as RGB");
        }
        let backbone = AnyBackbone::new(vb.pp("backbone"), &c.backbone)?;
        let neck: Option<Box<dyn Neck>> = match &c.neck {
            None => None,
            Some(NeckConfig::Fpn(f)) => {
                let got: Vec<usize> = backbone.out_shapes().iter().map(|s| s.channels).collect();
                if got != f.in_channels {
                    candle_core::bail!(
                        "model.neck.in_channels {:?} do not match the backbone's output channels {:?}",
                        f.in_channels,
                        got
                    );
                }
                Some(Box::new(Fpn::new(vb.pp("neck"), f)?))
            }
        };
        let decode_head = SegHead::new(vb.pp("decode_head"), &c.decode_head)?;
        let auxiliary_head = match &c.auxiliary_head {
            Some(a) => Some(SegHead::new(vb.pp("auxiliary_head"), a)?),
            None => None,
        };
        Ok(Self {
            cfg: c.clone(),
            backbone,
            neck,
            decode_head,
            auxiliary_head,
        })
    }

    /// The model settings.
    pub fn config(&self) -> &EncoderDecoderConfig {
        &self.cfg
    }

    /// Classes of the decode head.
    pub fn num_classes(&self) -> usize {
        self.decode_head.common().num_classes
    }

    /// Backbone (and neck) maps for normalised images `(B, 3, H, W)`.
    pub fn extract_feat(&self, images: &Tensor, train: bool) -> Result<Vec<Tensor>> {
        let x = self.backbone.forward(images, train)?;
        match &self.neck {
            Some(n) => n.forward(&x),
            None => Ok(x),
        }
    }

    /// Training losses, mmseg names: `decode.loss_ce` and (with an auxiliary head)
    /// `aux.loss_ce` (already × its `loss_weight`). `labels` `(B, H, W)` integer classes at the
    /// padded image size, `ignore_index` (255) for unlabelled and padded pixels.
    ///
    /// Errors: labels outside `[0, K)` other than the ignore index; candle errors.
    pub fn loss(&self, images: &Tensor, labels: &Tensor) -> Result<Vec<(String, Tensor)>> {
        let feats = self.extract_feat(images, true)?;
        let mut out = Vec::new();
        let heads = std::iter::once(("decode", &self.decode_head))
            .chain(self.auxiliary_head.as_ref().map(|h| ("aux", h)));
        for (prefix, head) in heads {
            let c = head.common();
            let logits = head.forward(&feats, true)?;
            let l = seg_loss(
                &logits,
                labels,
                &c.loss_decode,
                c.ignore_index,
                c.align_corners,
            )?;
            out.push((format!("{prefix}.{}", c.loss_decode.loss_name), l));
        }
        Ok(out)
    }

    /// Whole-image inference: decode-head logits `(B, K, H/4, W/4)` for normalised, padded images
    /// `(B, 3, H, W)`, resized to the padded size `(B, K, H, W)`.
    ///
    /// Errors: `test_cfg.mode` other than `whole` (sliding windows are not implemented yet);
    /// candle errors.
    pub fn predict_logits(&self, images: &Tensor) -> Result<Tensor> {
        if self.cfg.test_cfg.mode != "whole" {
            candle_core::bail!(
                "model.test_cfg.mode = {:?} is not supported yet (use \"whole\")",
                self.cfg.test_cfg.mode
            );
        }
        let (_, _, h, w) = images.dims4()?;
        let feats = self.extract_feat(images, false)?;
        let logits = self.decode_head.forward(&feats, false)?;
        let ac = self.decode_head.common().align_corners;
        densepred_core::ops::resize_bilinear(&logits, h, w, ac)
    }

    /// Label maps `(H_ori, W_ori)` (u32) per image: logits cropped to each image's `img_shape`
    /// `(h, w)` inside the padding, resized bilinearly to `ori_shape`, argmax over classes (mmseg
    /// `postprocess_result`).
    ///
    /// Errors: a shape larger than the padded batch; candle errors.
    pub fn predict(
        &self,
        images: &Tensor,
        img_shapes: &[(usize, usize)],
        ori_shapes: &[(usize, usize)],
    ) -> Result<Vec<Tensor>> {
        let logits = self.predict_logits(images)?;
        let ac = self.decode_head.common().align_corners;
        img_shapes
            .iter()
            .zip(ori_shapes)
            .enumerate()
            .map(|(i, (&(h, w), &(oh, ow)))| {
                let l = logits
                    .get(i)?
                    .narrow(1, 0, h)?
                    .narrow(2, 0, w)?
                    .unsqueeze(0)?;
                predict_labels(&l, oh, ow, ac)?.squeeze(0)
            })
            .collect()
    }
}
