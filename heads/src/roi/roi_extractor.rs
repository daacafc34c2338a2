//! mmdetection's `SingleRoIExtractor`: each RoI reads the one FPN level its size maps to
//! (Lin et al. 2017, "Feature Pyramid Networks", Eq. 1, with mmdetection's
//! `floor(log2(sqrt(w·h) / finest_scale + 1e-6))` clamped to the levels) through RoIAlign
//! (He et al. 2017, §3) at that level's stride.

use candle_core::{DType, Result, Tensor};
use densepred_core::ops::roi_align::{map_roi_levels, roi_align, RoiAlignParams};
use serde::{Deserialize, Serialize};

fn avg() -> String {
    "avg".into()
}
fn yes() -> bool {
    true
}
fn finest_scale() -> f64 {
    56.0
}

/// `roi_layer` table: mmcv's `RoIAlign` options.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", deny_unknown_fields)]
pub enum RoiLayerConfig {
    /// mmcv's `RoIAlign`.
    RoIAlign {
        /// Output bins per side.
        output_size: usize,
        /// Samples per bin and axis; 0 = adaptive (`ceil(roi / output)`).
        #[serde(default)]
        sampling_ratio: usize,
        /// Only `"avg"` is supported.
        #[serde(default = "avg")]
        pool_mode: String,
        /// Half-pixel shift (mmcv's default `true`).
        #[serde(default = "yes")]
        aligned: bool,
    },
}

/// `bbox_roi_extractor` / `mask_roi_extractor` table (`type = "SingleRoIExtractor"`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SingleRoIExtractorConfig {
    /// The RoI operator.
    pub roi_layer: RoiLayerConfig,
    /// Channels of the FPN levels.
    pub out_channels: usize,
    /// Stride of each level used (P2–P5: 4, 8, 16, 32).
    pub featmap_strides: Vec<usize>,
    /// RoIs of `sqrt(w·h) < 2·finest_scale` use the first level.
    #[serde(default = "finest_scale")]
    pub finest_scale: f64,
}

/// The built extractor.
#[derive(Debug, Clone)]
pub struct SingleRoIExtractor {
    cfg: SingleRoIExtractorConfig,
}

impl SingleRoIExtractor {
    /// Checks the config.
    ///
    /// Errors: `pool_mode` other than `"avg"`, no strides, output size 0.
    pub fn new(cfg: &SingleRoIExtractorConfig) -> Result<Self> {
        let RoiLayerConfig::RoIAlign {
            output_size,
            pool_mode,
            ..
        } = &cfg.roi_layer;
        if pool_mode != "avg" {
            candle_core::bail!("roi_layer.pool_mode {pool_mode:?} is not supported (only \"avg\")");
        }
        if cfg.featmap_strides.is_empty() || *output_size == 0 {
            candle_core::bail!("roi extractor: featmap_strides and output_size must be non-empty");
        }
        Ok(Self { cfg: cfg.clone() })
    }

    /// Output bins per side.
    pub fn output_size(&self) -> usize {
        let RoiLayerConfig::RoIAlign { output_size, .. } = self.cfg.roi_layer;
        output_size
    }

    /// Levels each RoI reads (`rois` `(R, 5)`).
    ///
    /// Errors: malformed RoIs.
    pub fn levels(&self, rois: &Tensor) -> Result<Vec<usize>> {
        map_roi_levels(rois, self.cfg.featmap_strides.len(), self.cfg.finest_scale)
    }

    /// `feats` (at least `featmap_strides.len()` levels of `(B, C, H_l, W_l)`) and `rois`
    /// `(R, 5)` `(batch_index, x1, y1, x2, y2)` in image pixels → `(R, C, S, S)` RoI features,
    /// differentiable in `feats`.
    ///
    /// Errors: fewer levels than strides; RoIAlign errors.
    pub fn forward(&self, feats: &[Tensor], rois: &Tensor) -> Result<Tensor> {
        let n = self.cfg.featmap_strides.len();
        if feats.len() < n {
            candle_core::bail!(
                "roi extractor: {} feature levels for {n} strides",
                feats.len()
            );
        }
        let RoiLayerConfig::RoIAlign {
            output_size,
            sampling_ratio,
            aligned,
            ..
        } = self.cfg.roi_layer;
        let r = rois.dim(0)?;
        let c = feats[0].dim(1)?;
        if r == 0 {
            return Tensor::zeros(
                (0, c, output_size, output_size),
                DType::F32,
                feats[0].device(),
            );
        }
        let levels = self.levels(rois)?;
        let mut parts = Vec::new();
        let mut order: Vec<u32> = Vec::with_capacity(r);
        for (l, stride) in self.cfg.featmap_strides.iter().enumerate() {
            let idx: Vec<u32> = (0..r as u32).filter(|&i| levels[i as usize] == l).collect();
            if idx.is_empty() {
                continue;
            }
            let sub = rois.index_select(&Tensor::new(idx.as_slice(), rois.device())?, 0)?;
            let p = RoiAlignParams {
                output_size: (output_size, output_size),
                spatial_scale: 1.0 / *stride as f32,
                sampling_ratio,
                aligned,
            };
            parts.push(roi_align(&feats[l], &sub, p)?);
            order.extend(idx);
        }
        let all = Tensor::cat(&parts, 0)?;
        if order.iter().enumerate().all(|(i, &o)| i as u32 == o) {
            return Ok(all);
        }
        let mut inverse = vec![0u32; r];
        for (pos, &o) in order.iter().enumerate() {
            inverse[o as usize] = pos as u32;
        }
        all.index_select(&Tensor::new(inverse.as_slice(), all.device())?, 0)
    }
}

/// mmdetection's `bbox2roi`: per-image boxes → `(R, 5)` `(image index, x1, y1, x2, y2)` rows,
/// image 0 first.
///
/// Errors: candle errors.
pub fn bbox2roi(boxes: &[Vec<[f32; 4]>], device: &candle_core::Device) -> Result<Tensor> {
    let mut v = Vec::new();
    for (i, b) in boxes.iter().enumerate() {
        for r in b {
            v.extend_from_slice(&[i as f32, r[0], r[1], r[2], r[3]]);
        }
    }
    let n = v.len() / 5;
    Tensor::from_vec(v, (n, 5), device)
}
