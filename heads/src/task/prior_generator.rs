//! mmdetection's `AnchorGenerator` (`mmdet/models/task_modules/prior_generators/anchor_generator.py`).
//!
//! Conventions (pinned by `../shared/fixtures/ops/anchors_mmdet_retinanet`): base anchors are
//! centred at `center_offset · stride` (0 by default), ratio = h / w, anchors are not rounded, and
//! the priors of a level are ordered `(y·w + x)·A + a` with `a = ratio_idx · n_scales + scale_idx`
//! when `scale_major` (the default). Arithmetic is float32 in mmdetection's order so that the
//! anchors agree to the bit.

use candle_core::{Device, Result, Tensor};
use densepred_core::config::defaults as d;
use serde::{Deserialize, Serialize};

/// `type = "AnchorGenerator"` config; field names are mmdetection's.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AnchorGenerator {
    /// Stride of each level in pixels (P3–P7 of RetinaNet: 8, 16, 32, 64, 128).
    pub strides: Vec<usize>,
    /// Height / width ratios.
    pub ratios: Vec<f64>,
    /// Anchor scales (multiples of the base size); or give `octave_base_scale` + `scales_per_octave`.
    #[serde(default)]
    pub scales: Option<Vec<f64>>,
    /// Base size per level (default: the strides).
    #[serde(default)]
    pub base_sizes: Option<Vec<f64>>,
    /// Order anchors ratio-major with scales varying fastest (mmdetection's default).
    #[serde(default = "d::yes")]
    pub scale_major: bool,
    /// RetinaNet: 4.
    #[serde(default)]
    pub octave_base_scale: Option<f64>,
    /// RetinaNet: 3 (scales `octave_base_scale · 2^(i / scales_per_octave)`).
    #[serde(default)]
    pub scales_per_octave: Option<usize>,
    /// Anchor centre offset within a cell, in units of the stride.
    #[serde(default)]
    pub center_offset: f64,
}

impl AnchorGenerator {
    fn scales(&self) -> std::result::Result<Vec<f32>, String> {
        match (&self.scales, self.octave_base_scale, self.scales_per_octave) {
            (Some(s), None, None) => Ok(s.iter().map(|&v| v as f32).collect()),
            (None, Some(b), Some(n)) if n > 0 => Ok((0..n).map(|i| (2f64.powf(i as f64 / n as f64) * b) as f32).collect()),
            _ => Err("AnchorGenerator: give either `scales` or both `octave_base_scale` and `scales_per_octave`".into()),
        }
    }

    /// Anchors per location `A = len(ratios) · len(scales)`.
    pub fn num_base_priors(&self) -> Result<usize> {
        Ok(self.ratios.len() * self.scales().map_err(candle_core::Error::msg)?.len())
    }

    /// Base anchors of each level, `A` xyxy boxes around the cell's centre at the origin.
    ///
    /// Errors: inconsistent scale options.
    pub fn base_anchors(&self) -> Result<Vec<Vec<[f32; 4]>>> {
        let scales = self.scales().map_err(candle_core::Error::msg)?;
        let mut levels = Vec::with_capacity(self.strides.len());
        for (l, &stride) in self.strides.iter().enumerate() {
            let base = self
                .base_sizes
                .as_ref()
                .and_then(|b| b.get(l).copied())
                .unwrap_or(stride as f64);
            let (w, h) = (base as f32, base as f32);
            let (xc, yc) = (
                (self.center_offset * base) as f32,
                (self.center_offset * base) as f32,
            );
            let h_ratios: Vec<f32> = self.ratios.iter().map(|&r| (r as f32).sqrt()).collect();
            let w_ratios: Vec<f32> = h_ratios.iter().map(|&r| 1.0 / r).collect();
            let mut sizes = Vec::new();
            if self.scale_major {
                for (wr, hr) in w_ratios.iter().zip(&h_ratios) {
                    for &s in &scales {
                        sizes.push((w * wr * s, h * hr * s));
                    }
                }
            } else {
                for &s in &scales {
                    for (wr, hr) in w_ratios.iter().zip(&h_ratios) {
                        sizes.push((w * s * wr, h * s * hr));
                    }
                }
            }
            levels.push(
                sizes
                    .iter()
                    .map(|&(ws, hs)| [xc - 0.5 * ws, yc - 0.5 * hs, xc + 0.5 * ws, yc + 0.5 * hs])
                    .collect(),
            );
        }
        Ok(levels)
    }

    /// The anchors of every level for feature maps of `featmap_sizes` `(h, w)`: one
    /// `(h·w·A, 4)` float32 tensor per level, xyxy in input-image pixels.
    ///
    /// Errors: a number of sizes different from the number of strides.
    pub fn grid_priors(
        &self,
        featmap_sizes: &[(usize, usize)],
        device: &Device,
    ) -> Result<Vec<Tensor>> {
        if featmap_sizes.len() != self.strides.len() {
            candle_core::bail!(
                "AnchorGenerator: {} feature maps for {} strides",
                featmap_sizes.len(),
                self.strides.len()
            );
        }
        let base = self.base_anchors()?;
        featmap_sizes
            .iter()
            .zip(&self.strides)
            .zip(&base)
            .map(|((&(h, w), &stride), base)| {
                let mut v = Vec::with_capacity(h * w * base.len() * 4);
                for y in 0..h {
                    let sy = y as f32 * stride as f32;
                    for x in 0..w {
                        let sx = x as f32 * stride as f32;
                        for b in base {
                            v.extend_from_slice(&[b[0] + sx, b[1] + sy, b[2] + sx, b[3] + sy]);
                        }
                    }
                }
                Tensor::from_vec(v, (h * w * base.len(), 4), device)
            })
            .collect()
    }

    /// Per level, a `(h·w·A,)` u8 flag: 1 where the anchor's cell lies inside the un-padded image
    /// `valid_shape = (H, W)` (cells `x < ceil(W / stride)`, `y < ceil(H / stride)`), as
    /// mmdetection's `valid_flags(featmap_sizes, pad_shape)`.
    pub fn valid_flags(
        &self,
        featmap_sizes: &[(usize, usize)],
        valid_shape: (usize, usize),
        device: &Device,
    ) -> Result<Vec<Tensor>> {
        let a = self.num_base_priors()?;
        featmap_sizes
            .iter()
            .zip(&self.strides)
            .map(|(&(h, w), &stride)| {
                let vh = valid_shape.0.div_ceil(stride).min(h);
                let vw = valid_shape.1.div_ceil(stride).min(w);
                let mut v = Vec::with_capacity(h * w * a);
                for y in 0..h {
                    for x in 0..w {
                        let ok = (y < vh && x < vw) as u8;
                        v.extend(std::iter::repeat_n(ok, a));
                    }
                }
                Tensor::from_vec(v, h * w * a, device)
            })
            .collect()
    }
}
