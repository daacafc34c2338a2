//! Assigners: which ground-truth box (if any) each prior learns from. mmdetection's
//! `MaxIoUAssigner` and `ATSSAssigner` (`mmdet/models/task_modules/assigners/`), computed on the
//! CPU per image (the IoU matrix through [`bbox_overlaps`]).

use candle_core::{DType, Device, Result, Tensor};
use densepred_core::config::defaults as d;
use densepred_core::ops::iou::{bbox_overlaps, OverlapMode};
use serde::{Deserialize, Serialize};

/// mmdetection's `INF` for "no candidate": unassigned priors of ATSS get `max_overlaps = −INF`.
pub const INF: f32 = 100_000_000.0;

/// The result of assigning `num_priors` priors to `num_gts` boxes (mmdetection's `AssignResult`).
#[derive(Debug, Clone, PartialEq)]
pub struct AssignResult {
    /// Number of ground-truth boxes.
    pub num_gts: usize,
    /// Per prior: 0 = negative (background), −1 = ignored, `i + 1` = positive for gt `i`.
    pub gt_inds: Vec<i64>,
    /// Per prior: IoU with the assigned (or best) gt.
    pub max_overlaps: Vec<f32>,
    /// Per prior: class of the assigned gt, −1 otherwise.
    pub labels: Vec<i64>,
}

impl AssignResult {
    fn fill_labels(&mut self, gt_labels: &[i64]) {
        self.labels = self
            .gt_inds
            .iter()
            .map(|&g| {
                if g > 0 {
                    gt_labels[(g - 1) as usize]
                } else {
                    -1
                }
            })
            .collect();
    }
}

fn cpu_vec2(t: &Tensor) -> Result<Vec<Vec<f32>>> {
    t.to_device(&Device::Cpu)?.to_dtype(DType::F32)?.to_vec2()
}

fn cpu_boxes(t: &Tensor) -> Result<Vec<[f32; 4]>> {
    Ok(cpu_vec2(t)?
        .into_iter()
        .map(|r| [r[0], r[1], r[2], r[3]])
        .collect())
}

/// Negative IoU range of [`MaxIoUAssigner`]: below a value, or inside `[lo, hi)`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum NegIouThr {
    /// `0 <= IoU < thr` is negative.
    Below(f64),
    /// `lo <= IoU < hi` is negative.
    Range([f64; 2]),
}

/// `type = "MaxIoUAssigner"`: each prior takes the gt of highest IoU when that IoU ≥
/// `pos_iou_thr`, is negative below `neg_iou_thr`, ignored in between; with
/// `match_low_quality`, every gt also claims its best prior(s) if that IoU ≥ `min_pos_iou`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MaxIoUAssigner {
    /// IoU at or above which a prior is positive.
    pub pos_iou_thr: f64,
    /// IoU range of negatives.
    pub neg_iou_thr: NegIouThr,
    /// Minimum IoU for a low-quality match.
    #[serde(default)]
    pub min_pos_iou: f64,
    /// A gt's low-quality match takes every prior tied at its maximum IoU (not only the first).
    #[serde(default = "d::yes")]
    pub gt_max_assign_all: bool,
    /// Priors whose IoF with an ignored (crowd) box exceeds this are ignored (−1: off).
    #[serde(default = "d::neg_one_f64")]
    pub ignore_iof_thr: f64,
    /// Compute that IoF as prior-over-ignored-box (mmdetection's default).
    #[serde(default = "d::yes")]
    pub ignore_wrt_candidates: bool,
    /// Allow low-quality matches.
    #[serde(default = "d::yes")]
    pub match_low_quality: bool,
}

impl MaxIoUAssigner {
    /// Assigns `priors` `(P, 4)` to `gt_boxes` `(G, 4)` with `gt_labels` (len G); `gt_ignore`
    /// `(I, 4)` are crowd boxes (used when `ignore_iof_thr > 0`).
    pub fn assign(
        &self,
        priors: &Tensor,
        gt_boxes: &Tensor,
        gt_labels: &[i64],
        gt_ignore: Option<&Tensor>,
    ) -> Result<AssignResult> {
        let num_priors = priors.dim(0)?;
        let num_gts = gt_boxes.dim(0)?;
        if num_gts == 0 || num_priors == 0 {
            let fill = if num_gts == 0 { 0 } else { -1 };
            return Ok(AssignResult {
                num_gts,
                gt_inds: vec![fill; num_priors],
                max_overlaps: vec![0.0; num_priors],
                labels: vec![-1; num_priors],
            });
        }
        // (G, P)
        let mut overlaps = cpu_vec2(&bbox_overlaps(
            gt_boxes,
            priors,
            OverlapMode::Iou,
            false,
            1e-6,
        )?)?;
        if let Some(ign) =
            gt_ignore.filter(|t| self.ignore_iof_thr > 0.0 && t.dim(0).unwrap_or(0) > 0)
        {
            let iof = if self.ignore_wrt_candidates {
                cpu_vec2(&bbox_overlaps(priors, ign, OverlapMode::Iof, false, 1e-6)?)?
            } else {
                let t = cpu_vec2(&bbox_overlaps(ign, priors, OverlapMode::Iof, false, 1e-6)?)?;
                (0..num_priors)
                    .map(|p| t.iter().map(|r| r[p]).collect())
                    .collect()
            };
            for (p, row) in iof.iter().enumerate() {
                if row.iter().cloned().fold(f32::MIN, f32::max) as f64 > self.ignore_iof_thr {
                    for g in overlaps.iter_mut() {
                        g[p] = -1.0;
                    }
                }
            }
        }
        let mut gt_inds = vec![-1i64; num_priors];
        let mut max_overlaps = vec![0f32; num_priors];
        let mut argmax = vec![0usize; num_priors];
        for p in 0..num_priors {
            // First maximum wins, as torch.max.
            let (mut best, mut bi) = (overlaps[0][p], 0);
            for (g, row) in overlaps.iter().enumerate().skip(1) {
                if row[p] > best {
                    best = row[p];
                    bi = g;
                }
            }
            max_overlaps[p] = best;
            argmax[p] = bi;
        }
        for p in 0..num_priors {
            let m = max_overlaps[p] as f64;
            let neg = match self.neg_iou_thr {
                NegIouThr::Below(t) => m >= 0.0 && m < t,
                NegIouThr::Range([lo, hi]) => m >= lo && m < hi,
            };
            if neg {
                gt_inds[p] = 0;
            }
            if m >= self.pos_iou_thr {
                gt_inds[p] = argmax[p] as i64 + 1;
            }
        }
        if self.match_low_quality {
            for (g, row) in overlaps.iter().enumerate() {
                let (mut best, mut bi) = (row[0], 0);
                for (p, &v) in row.iter().enumerate().skip(1) {
                    if v > best {
                        best = v;
                        bi = p;
                    }
                }
                if (best as f64) >= self.min_pos_iou {
                    if self.gt_max_assign_all {
                        for (p, &v) in row.iter().enumerate() {
                            if v == best {
                                gt_inds[p] = g as i64 + 1;
                            }
                        }
                    } else {
                        gt_inds[bi] = g as i64 + 1;
                    }
                }
            }
        }
        let mut r = AssignResult {
            num_gts,
            gt_inds,
            max_overlaps,
            labels: vec![],
        };
        r.fill_labels(gt_labels);
        Ok(r)
    }
}

fn default_topk() -> usize {
    9
}

/// `type = "ATSSAssigner"` (Zhang et al. 2020, "Bridging the Gap Between Anchor-based and
/// Anchor-free Detection", Alg. 1): per gt and level, the `topk` priors with the closest centres
/// are candidates; those with IoU ≥ mean + std (unbiased) of the candidates' IoUs and whose centre
/// lies inside the gt by more than 0.01 px are positive; a prior claimed by several gts goes to
/// the one of highest IoU.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AtssAssigner {
    /// Candidates per level and gt.
    #[serde(default = "default_topk")]
    pub topk: usize,
}

impl AtssAssigner {
    /// Assigns `priors` `(P, 4)` (levels concatenated, `num_level_priors` per level) to
    /// `gt_boxes` `(G, 4)` with `gt_labels` (len G).
    ///
    /// Errors: `num_level_priors` not summing to `P`.
    pub fn assign(
        &self,
        priors: &Tensor,
        num_level_priors: &[usize],
        gt_boxes: &Tensor,
        gt_labels: &[i64],
    ) -> Result<AssignResult> {
        let num_priors = priors.dim(0)?;
        let num_gts = gt_boxes.dim(0)?;
        if num_level_priors.iter().sum::<usize>() != num_priors {
            candle_core::bail!(
                "ATSSAssigner: num_level_priors {:?} do not sum to {num_priors}",
                num_level_priors
            );
        }
        if num_gts == 0 || num_priors == 0 {
            return Ok(AssignResult {
                num_gts,
                gt_inds: vec![0; num_priors],
                max_overlaps: vec![0.0; num_priors],
                labels: vec![-1; num_priors],
            });
        }
        let overlaps = cpu_vec2(&bbox_overlaps(
            priors,
            gt_boxes,
            OverlapMode::Iou,
            false,
            1e-6,
        )?)?; // (P, G)
        let pb = cpu_boxes(priors)?;
        let gb = cpu_boxes(gt_boxes)?;
        let centre = |b: &[f32; 4]| ((b[0] + b[2]) / 2.0, (b[1] + b[3]) / 2.0);
        let pc: Vec<(f32, f32)> = pb.iter().map(centre).collect();
        let mut best = vec![(-INF, 0usize); num_priors];
        for (g, gbox) in gb.iter().enumerate() {
            let (gx, gy) = centre(gbox);
            let dist: Vec<f32> = pc
                .iter()
                .map(|&(x, y)| ((x - gx).powi(2) + (y - gy).powi(2)).sqrt())
                .collect();
            let mut cands = Vec::new();
            let mut start = 0;
            for &n in num_level_priors {
                // The tie-breaking of torch.topk decides between equidistant priors.
                let local = super::topk::torch_topk_smallest(&dist[start..start + n], self.topk);
                cands.extend(local.into_iter().map(|i| i + start));
                start += n;
            }
            let ious: Vec<f64> = cands.iter().map(|&p| overlaps[p][g] as f64).collect();
            let k = ious.len() as f64;
            let mean = ious.iter().sum::<f64>() / k;
            let std = if ious.len() > 1 {
                (ious.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (k - 1.0)).sqrt()
            } else {
                f64::NAN
            };
            let thr = (mean + std) as f32;
            for &p in &cands {
                let (x, y) = pc[p];
                let inside = [x - gbox[0], y - gbox[1], gbox[2] - x, gbox[3] - y]
                    .iter()
                    .cloned()
                    .fold(f32::INFINITY, f32::min)
                    > 0.01;
                let iou = overlaps[p][g];
                // Strictly greater: on equal IoU the earlier gt keeps the prior (torch.max order).
                if iou >= thr && inside && iou > best[p].0 {
                    best[p] = (iou, g);
                }
            }
        }
        let gt_inds = best
            .iter()
            .map(|&(v, g)| if v != -INF { g as i64 + 1 } else { 0 })
            .collect();
        let max_overlaps = best.iter().map(|&(v, _)| v).collect();
        let mut r = AssignResult {
            num_gts,
            gt_inds,
            max_overlaps,
            labels: vec![],
        };
        r.fill_labels(gt_labels);
        Ok(r)
    }
}
