//! Encoder-decoder segmentors (mmsegmentation's `EncoderDecoder`: UperNet, Semantic FPN):
//! backbone → optional neck → decode head (+ optional auxiliary head), built from the `[model]`
//! table with mmseg's vocabulary and parameter names (`backbone.`, `neck.`, `decode_head.`,
//! `auxiliary_head.`).

use crate::config::{ModelConfig, NeckConfig};
use candle_core::{Result, Tensor};
use candle_nn::VarBuilder;
use densepred_backbones::{AnyBackbone, Backbone, BackboneConfig};
use densepred_core::config::defaults as d;
use densepred_heads::seg::{
    seg_loss, FcnHead, FcnHeadConfig, FpnHead, FpnHeadConfig, UperHead, UperHeadConfig,
};
use densepred_necks::Neck;
use serde::{Deserialize, Serialize};

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
    #[serde(default = "d::yes")]
    pub bgr_to_rgb: bool,
    /// Image padding value (after normalisation, as mmseg's `stack_batch`): only 0.
    #[serde(default)]
    pub pad_val: f64,
    /// Label padding value (the ignore index): only 255.
    #[serde(default = "d::ignore_255")]
    pub seg_pad_val: u8,
    /// Pad every batch to this `[h, w]` (the crop size in training).
    #[serde(default)]
    pub size: Option<[usize; 2]>,
    /// Or pad to a multiple of this.
    #[serde(default)]
    pub size_divisor: Option<usize>,
}

densepred_core::config_by_type! {
    /// A decode or auxiliary head.
    pub enum SegHeadConfig {
        /// UperNet's head.
        "UPerHead" => UperHead(UperHeadConfig),
        /// Semantic FPN's head.
        "FPNHead" => FpnHead(FpnHeadConfig),
        /// FCN head (auxiliary).
        "FCNHead" => FcnHead(FcnHeadConfig),
    }
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
    /// mmseg's `train_cfg`: only the empty table (`{}`), mmseg's value for EncoderDecoder.
    #[serde(default)]
    pub train_cfg: Option<densepred_core::config::EmptyTable>,
    /// Inference mode.
    #[serde(default)]
    pub test_cfg: SegTestConfig,
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
    /// Errors: a detector config; `bgr_to_rgb = false`; a `test_cfg.mode` other than `whole` or
    /// `slide` (or `slide` without `crop_size` and `stride`); a neck whose `in_channels` differ from
    /// the backbone's output channels; head construction errors.
    pub fn new(vb: VarBuilder, cfg: &ModelConfig) -> Result<Self> {
        let c = cfg.segmentor().ok_or_else(|| {
            candle_core::Error::msg("model.type is a detector, not an EncoderDecoder segmentor")
        })?;
        match c.test_cfg.mode.as_str() {
            "whole" => {}
            "slide" => {
                let ok = |v: Option<[usize; 2]>| v.is_some_and(|[a, b]| a > 0 && b > 0);
                if !ok(c.test_cfg.crop_size) || !ok(c.test_cfg.stride) {
                    candle_core::bail!("model.test_cfg: mode = \"slide\" needs crop_size = [h, w] and stride = [h, w], both positive");
                }
            }
            m => candle_core::bail!("model.test_cfg.mode = {m:?}: expected \"whole\" or \"slide\""),
        }
        if !c.data_preprocessor.bgr_to_rgb {
            candle_core::bail!("model.data_preprocessor.bgr_to_rgb = false is not supported: densepred decodes images as RGB");
        }
        if c.data_preprocessor.pad_val != 0.0 || c.data_preprocessor.seg_pad_val != 255 {
            candle_core::bail!(
                "model.data_preprocessor: only pad_val = 0 and seg_pad_val = 255 (mmseg's defaults) are supported, got {} and {}",
                c.data_preprocessor.pad_val,
                c.data_preprocessor.seg_pad_val
            );
        }
        let backbone = AnyBackbone::new(vb.pp("backbone"), &c.backbone)?;
        let neck: Option<Box<dyn Neck>> = match &c.neck {
            None => None,
            Some(n) => Some(n.build(vb.pp("neck"), &backbone)?),
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

    /// Decode-head logits of normalised images `(B, 3, H, W)`, resized bilinearly to `(B, K, H, W)`
    /// (mmseg `encode_decode`).
    ///
    /// Errors: candle errors.
    pub fn encode_decode(&self, images: &Tensor) -> Result<Tensor> {
        let (_, _, h, w) = images.dims4()?;
        let feats = self.extract_feat(images, false)?;
        let logits = self.decode_head.forward(&feats, false)?;
        let ac = self.decode_head.common().align_corners;
        densepred_core::ops::resize_bilinear(&logits, h, w, ac)
    }

    /// Inference logits `(B, K, H, W)` of normalised, padded images `(B, 3, H, W)` in the
    /// `test_cfg` mode: `whole` runs [`Segmentor::encode_decode`] once; `slide` runs it on
    /// `crop_size` windows every `stride` pixels (the last window of a row or column aligned to the
    /// image's far edge) and averages the overlapping logits (mmseg `slide_inference`).
    ///
    /// Errors: candle errors.
    pub fn predict_logits(&self, images: &Tensor) -> Result<Tensor> {
        let tc = &self.cfg.test_cfg;
        if tc.mode != "slide" {
            return self.encode_decode(images);
        }
        let [hc, wc] = tc.crop_size.expect("checked in new");
        let [hs, ws] = tc.stride.expect("checked in new");
        let (_, _, h, w) = images.dims4()?;
        let mut sum: Option<Tensor> = None;
        let mut count = vec![0f32; h * w];
        for [y1, y2, x1, x2] in slide_windows((h, w), (hc, wc), (hs, ws)) {
            {
                let crop = images.narrow(2, y1, y2 - y1)?.narrow(3, x1, x2 - x1)?;
                let l = self
                    .encode_decode(&crop)?
                    .pad_with_zeros(2, y1, h - y2)?
                    .pad_with_zeros(3, x1, w - x2)?;
                sum = Some(match sum {
                    None => l,
                    Some(s) => (s + l)?,
                });
                for y in y1..y2 {
                    for c in &mut count[y * w + x1..y * w + x2] {
                        *c += 1.0;
                    }
                }
            }
        }
        let sum = sum.expect("at least one window");
        let count =
            Tensor::from_vec(count, (1, 1, h, w), images.device())?.to_dtype(sum.dtype())?;
        sum.broadcast_div(&count)
    }

    /// Logits `(K, H_ori, W_ori)` per image (mmseg `postprocess_result`): each image's logits are
    /// cropped to its `img_shape` `(h, w)` inside the padding, flipped back horizontally when
    /// `flipped`, and resized bilinearly to `ori_shape`.
    ///
    /// Errors: a shape larger than the padded batch; candle errors.
    pub fn postprocess(
        &self,
        logits: &Tensor,
        img_shapes: &[(usize, usize)],
        ori_shapes: &[(usize, usize)],
        flipped: bool,
    ) -> Result<Vec<Tensor>> {
        let ac = self.decode_head.common().align_corners;
        img_shapes
            .iter()
            .zip(ori_shapes)
            .enumerate()
            .map(|(i, (&(h, w), &(oh, ow)))| {
                let mut l = logits.get(i)?.narrow(1, 0, h)?.narrow(2, 0, w)?;
                if flipped {
                    l = densepred_core::ops::flip_last_dim(&l)?;
                }
                densepred_core::ops::resize_bilinear(&l.unsqueeze(0)?, oh, ow, ac)?.squeeze(0)
            })
            .collect()
    }

    /// Label maps `(H_ori, W_ori)` (u32) per image: [`Segmentor::predict_logits`], then
    /// [`Segmentor::postprocess`], then the argmax over classes.
    ///
    /// Errors: as [`Segmentor::postprocess`].
    pub fn predict(
        &self,
        images: &Tensor,
        img_shapes: &[(usize, usize)],
        ori_shapes: &[(usize, usize)],
    ) -> Result<Vec<Tensor>> {
        let logits = self.predict_logits(images)?;
        self.postprocess(&logits, img_shapes, ori_shapes, false)?
            .into_iter()
            .map(|l| l.argmax(0))
            .collect()
    }
}

/// The windows `[y1, y2, x1, x2]` (pixels, end exclusive) of sliding-window inference over an
/// `(h, w)` image with `crop = (h_c, w_c)` windows every `stride = (h_s, w_s)` pixels, row by row:
/// `max(h − h_c + h_s − 1, 0) / h_s + 1` rows (likewise columns); a window that would pass the
/// far edge is moved back to end on it, and windows are clipped to images smaller than the crop
/// (mmseg `EncoderDecoder.slide_inference`).
pub fn slide_windows(
    (h, w): (usize, usize),
    (hc, wc): (usize, usize),
    (hs, ws): (usize, usize),
) -> Vec<[usize; 4]> {
    let grids = |n: usize, c: usize, s: usize| (n + s).saturating_sub(c + 1) / s.max(1) + 1;
    let mut out = Vec::new();
    for gy in 0..grids(h, hc, hs) {
        for gx in 0..grids(w, wc, ws) {
            let y2 = (gy * hs + hc).min(h);
            let x2 = (gx * ws + wc).min(w);
            out.push([y2.saturating_sub(hc), y2, x2.saturating_sub(wc), x2]);
        }
    }
    out
}
