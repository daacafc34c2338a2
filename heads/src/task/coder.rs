//! `DeltaXYWHBBoxCoder` (mmdetection `mmdet/models/task_modules/coders/delta_xywh_bbox_coder.py`;
//! Girshick et al., R-CNN box regression): boxes ↔ normalised deltas `(dx, dy, dw, dh)`.

use candle_core::{Result, Tensor};
use densepred_core::config::defaults as d;
use densepred_core::ops::iou::columns;
use serde::{Deserialize, Serialize};

fn default_means() -> [f64; 4] {
    [0.0; 4]
}
fn default_stds() -> [f64; 4] {
    [1.0; 4]
}
fn default_ctr_clamp() -> f64 {
    32.0
}

/// Config and behaviour of mmdetection's `DeltaXYWHBBoxCoder` (`type = "DeltaXYWHBBoxCoder"`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeltaXYWHBBoxCoder {
    /// Subtracted from the raw deltas when encoding (added back when decoding).
    #[serde(default = "default_means")]
    pub target_means: [f64; 4],
    /// Raw deltas are divided by these (RPN/RetinaNet: 1; Faster R-CNN box head: 0.1, 0.1, 0.2, 0.2).
    #[serde(default = "default_stds")]
    pub target_stds: [f64; 4],
    /// Clip decoded boxes to the image when a shape is given.
    #[serde(default = "d::yes")]
    pub clip_border: bool,
    /// Clamp the centre shift to ±`ctr_clamp` pixels and dw/dh only from above (YOLOF's variant).
    #[serde(default)]
    pub add_ctr_clamp: bool,
    /// Centre-shift clamp in pixels (with `add_ctr_clamp`).
    #[serde(default = "default_ctr_clamp")]
    pub ctr_clamp: f64,
}

impl Default for DeltaXYWHBBoxCoder {
    fn default() -> Self {
        Self {
            target_means: default_means(),
            target_stds: default_stds(),
            clip_border: true,
            add_ctr_clamp: false,
            ctr_clamp: 32.0,
        }
    }
}

/// mmdetection's default `wh_ratio_clip` (16 / 1000): dw, dh are clamped to ±|log(16/1000)|.
pub const WH_RATIO_CLIP: f64 = 16.0 / 1000.0;

fn vec4(v: [f64; 4], like: &Tensor) -> Result<Tensor> {
    Tensor::new(&v, like.device())?
        .to_dtype(like.dtype())?
        .unsqueeze(0)
}

impl DeltaXYWHBBoxCoder {
    /// Deltas `(N, 4)` that move `proposals` `(N, 4)` onto `gt` `(N, 4)` (both xyxy pixels):
    /// `((gx − px)/pw, (gy − py)/ph, log(gw/pw), log(gh/ph))`, then `(· − means) / stds`.
    pub fn encode(&self, proposals: &Tensor, gt: &Tensor) -> Result<Tensor> {
        let [px1, py1, px2, py2] = columns(proposals)?;
        let [gx1, gy1, gx2, gy2] = columns(gt)?;
        let (pw, ph) = ((&px2 - &px1)?, (&py2 - &py1)?);
        let (gw, gh) = ((&gx2 - &gx1)?, (&gy2 - &gy1)?);
        let px = ((px1 + px2)? * 0.5)?;
        let py = ((py1 + py2)? * 0.5)?;
        let gx = ((gx1 + gx2)? * 0.5)?;
        let gy = ((gy1 + gy2)? * 0.5)?;
        let d = Tensor::stack(
            &[
                (gx - px)?.div(&pw)?,
                (gy - py)?.div(&ph)?,
                gw.div(&pw)?.log()?,
                gh.div(&ph)?.log()?,
            ],
            1,
        )?;
        d.broadcast_sub(&vec4(self.target_means, &d)?)?
            .broadcast_div(&vec4(self.target_stds, &d)?)
    }

    /// Boxes `(N, 4)` from `rois` `(N, 4)` and `deltas` `(N, 4)`: de-normalise, shift the centre by
    /// `(dx·w, dy·h)`, scale the size by `exp(dw), exp(dh)` with dw, dh clamped to
    /// ±|log(wh_ratio_clip)| (both sides, as mmdetection; torchvision clamps only from above),
    /// then clip x to `[0, W]` and y to `[0, H]` when `max_shape = Some((H, W))` and
    /// `clip_border`. Differentiable in `deltas`.
    pub fn decode(
        &self,
        rois: &Tensor,
        deltas: &Tensor,
        max_shape: Option<(f64, f64)>,
        wh_ratio_clip: f64,
    ) -> Result<Tensor> {
        let d = deltas
            .broadcast_mul(&vec4(self.target_stds, deltas)?)?
            .broadcast_add(&vec4(self.target_means, deltas)?)?;
        let [dx, dy, dw, dh] = columns(&d)?;
        let [x1, y1, x2, y2] = columns(rois)?;
        let (pw, ph) = ((&x2 - &x1)?, (&y2 - &y1)?);
        let px = ((x1 + x2)? * 0.5)?;
        let py = ((y1 + y2)? * 0.5)?;
        let max_ratio = wh_ratio_clip.ln().abs();
        let (mut sx, mut sy) = ((&pw * dx)?, (&ph * dy)?);
        let (dw, dh) = if self.add_ctr_clamp {
            sx = sx.clamp(-self.ctr_clamp, self.ctr_clamp)?;
            sy = sy.clamp(-self.ctr_clamp, self.ctr_clamp)?;
            (dw.minimum(max_ratio)?, dh.minimum(max_ratio)?)
        } else {
            (
                dw.clamp(-max_ratio, max_ratio)?,
                dh.clamp(-max_ratio, max_ratio)?,
            )
        };
        let gx = (px + sx)?;
        let gy = (py + sy)?;
        let hw = ((pw * dw.exp()?)? * 0.5)?;
        let hh = ((ph * dh.exp()?)? * 0.5)?;
        let (mut bx1, mut by1, mut bx2, mut by2) =
            ((&gx - &hw)?, (&gy - &hh)?, (gx + hw)?, (gy + hh)?);
        if let (true, Some((h, w))) = (self.clip_border, max_shape) {
            bx1 = bx1.clamp(0.0, w)?;
            bx2 = bx2.clamp(0.0, w)?;
            by1 = by1.clamp(0.0, h)?;
            by2 = by2.clamp(0.0, h)?;
        }
        Tensor::stack(&[bx1, by1, bx2, by2], 1)
    }
}
