//! Losses with mmdetection's semantics: element-wise losses, then `weight`, `reduction` and
//! `avg_factor` as `mmdet.models.losses.utils.weight_reduce_loss`.

mod focal;
mod softmax_ce;

pub use focal::{sigmoid_focal_loss, sigmoid_focal_loss_elementwise};
pub use softmax_ce::{softmax_cross_entropy, softmax_cross_entropy_resized};

use crate::ops::iou::{bbox_overlaps, OverlapMode};
use candle_core::{DType, Result, Tensor, D};
use serde::{Deserialize, Serialize};

/// How per-element losses are reduced.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Reduction {
    /// Keep per-element values.
    None,
    /// Mean (or sum / `avg_factor` when one is given).
    #[default]
    Mean,
    /// Sum.
    Sum,
}

/// `float32` machine epsilon, which mmdetection adds to `avg_factor` to avoid division by zero.
pub const AVG_FACTOR_EPS: f64 = f32::EPSILON as f64;

/// mmdetection's `weight_reduce_loss`: multiply by `weight` (broadcast), then
/// * no `avg_factor`: reduce per `reduction`;
/// * with `avg_factor`: `Mean` → `sum / (avg_factor + eps)`, `None` → unchanged, `Sum` → error (as
///   mmdetection raises).
pub fn weight_reduce_loss(
    loss: &Tensor,
    weight: Option<&Tensor>,
    reduction: Reduction,
    avg_factor: Option<f64>,
) -> Result<Tensor> {
    let loss = match weight {
        Some(w) => loss.broadcast_mul(w)?,
        None => loss.clone(),
    };
    match (avg_factor, reduction) {
        (None, Reduction::None) => Ok(loss),
        (None, Reduction::Mean) => loss.mean_all(),
        (None, Reduction::Sum) => loss.sum_all(),
        (Some(a), Reduction::Mean) => loss.sum_all()? / (a + AVG_FACTOR_EPS),
        (Some(_), Reduction::None) => Ok(loss),
        (Some(_), Reduction::Sum) => {
            candle_core::bail!("avg_factor can not be used with reduction=\"sum\"")
        }
    }
}

/// `|pred − target|` element-wise (mmdetection `l1_loss`), then [`weight_reduce_loss`].
pub fn l1_loss(
    pred: &Tensor,
    target: &Tensor,
    weight: Option<&Tensor>,
    reduction: Reduction,
    avg_factor: Option<f64>,
) -> Result<Tensor> {
    weight_reduce_loss(&(pred - target)?.abs()?, weight, reduction, avg_factor)
}

/// Smooth L1 (Girshick 2015): `0.5·d²/β` for `|d| < β`, else `|d| − 0.5·β` (mmdetection
/// `smooth_l1_loss`; `beta = 0` is L1).
pub fn smooth_l1_loss(
    pred: &Tensor,
    target: &Tensor,
    beta: f64,
    weight: Option<&Tensor>,
    reduction: Reduction,
    avg_factor: Option<f64>,
) -> Result<Tensor> {
    let d = (pred - target)?.abs()?;
    let loss = if beta > 0.0 {
        let quad = (d.sqr()? * (0.5 / beta))?;
        let lin = (&d - 0.5 * beta)?;
        d.lt(beta)?.where_cond(&quad, &lin)?
    } else {
        d
    };
    weight_reduce_loss(&loss, weight, reduction, avg_factor)
}

/// GIoU loss `1 − GIoU(pred_i, target_i)` for aligned `(N, 4)` xyxy boxes (mmdetection
/// `giou_loss`, eps 1e-6), then [`weight_reduce_loss`] (`weight` `(N,)`).
pub fn giou_loss(
    pred: &Tensor,
    target: &Tensor,
    weight: Option<&Tensor>,
    reduction: Reduction,
    avg_factor: Option<f64>,
    eps: f64,
) -> Result<Tensor> {
    let g = bbox_overlaps(pred, target, OverlapMode::Giou, true, eps)?;
    weight_reduce_loss(&g.affine(-1.0, 1.0)?, weight, reduction, avg_factor)
}

/// Binary cross-entropy with logits, element-wise and numerically stable:
/// `max(x, 0) − x·t + log(1 + exp(−|x|))` (`F.binary_cross_entropy_with_logits`), then
/// [`weight_reduce_loss`].
pub fn binary_cross_entropy_with_logits(
    logits: &Tensor,
    target: &Tensor,
    weight: Option<&Tensor>,
    reduction: Reduction,
    avg_factor: Option<f64>,
) -> Result<Tensor> {
    let loss =
        ((logits.relu()? - (logits * target)?)? + (logits.abs()?.neg()?.exp()? + 1.0)?.log()?)?;
    weight_reduce_loss(&loss, weight, reduction, avg_factor)
}

/// Softmax cross-entropy over the class axis 1, mmdetection / mmsegmentation `cross_entropy`:
///
/// * `pred` `(N, C)` or `(N, C, H, W)` logits; `label` `(N,)` or `(N, H, W)` integer classes;
/// * `class_weight` `(C,)` multiplies each element's loss by its class's weight (PyTorch's
///   `weight=`, without renormalisation), elements labelled `ignore_index` get 0;
/// * `avg_non_ignore` with `Mean` and no `avg_factor`: divide by the number of non-ignored
///   elements instead of all elements.
///
/// Errors: labels outside `[0, C)` that are not `ignore_index`.
#[allow(clippy::too_many_arguments)]
pub fn cross_entropy(
    pred: &Tensor,
    label: &Tensor,
    class_weight: Option<&Tensor>,
    ignore_index: Option<i64>,
    weight: Option<&Tensor>,
    reduction: Reduction,
    avg_factor: Option<f64>,
    avg_non_ignore: bool,
) -> Result<Tensor> {
    cross_entropy_inner(
        pred,
        label,
        class_weight,
        ignore_index,
        weight,
        reduction,
        avg_factor,
        avg_non_ignore,
        None,
    )
}

/// [`cross_entropy`] of `pred` `(N, C, h, w)` bilinearly resized to the label size `(N, H, W)`
/// first (`F.interpolate(mode="bilinear", align_corners)`, mmsegmentation's decode-head
/// `loss_by_feat`). On the CPU the resize and the loss are one op that does not keep the resized
/// logits ([`softmax_cross_entropy_resized`]); elsewhere it is `resize_bilinear` then
/// [`cross_entropy`].
///
/// Errors: as [`cross_entropy`]; `pred` not 4-D.
#[allow(clippy::too_many_arguments)]
pub fn cross_entropy_resized(
    pred: &Tensor,
    label: &Tensor,
    class_weight: Option<&Tensor>,
    ignore_index: Option<i64>,
    weight: Option<&Tensor>,
    reduction: Reduction,
    avg_factor: Option<f64>,
    avg_non_ignore: bool,
    align_corners: bool,
) -> Result<Tensor> {
    let (_, _, h, w) = label.unsqueeze(1)?.dims4()?;
    pred.dims4()?;
    let fused = pred.device().is_cpu() && matches!(pred.dtype(), DType::F32 | DType::F64);
    if !fused {
        let up = crate::ops::resize_bilinear(pred, h, w, align_corners)?;
        return cross_entropy(
            &up,
            label,
            class_weight,
            ignore_index,
            weight,
            reduction,
            avg_factor,
            avg_non_ignore,
        );
    }
    cross_entropy_inner(
        pred,
        label,
        class_weight,
        ignore_index,
        weight,
        reduction,
        avg_factor,
        avg_non_ignore,
        Some(align_corners),
    )
}

/// `resized`: `pred` is `(N, C, h, w)` to be resized to the labels' `(H, W)` with this
/// `align_corners` (CPU f32/f64 only).
#[allow(clippy::too_many_arguments)]
fn cross_entropy_inner(
    pred: &Tensor,
    label: &Tensor,
    class_weight: Option<&Tensor>,
    ignore_index: Option<i64>,
    weight: Option<&Tensor>,
    reduction: Reduction,
    avg_factor: Option<f64>,
    avg_non_ignore: bool,
    resized: Option<bool>,
) -> Result<Tensor> {
    let c = pred.dim(1)?;
    let n_pred = match resized {
        Some(_) => label.elem_count(),
        None => pred.elem_count() / c.max(1),
    };
    let labels: Vec<i64> = label.flatten_all()?.to_dtype(DType::I64)?.to_vec1()?;
    if n_pred != labels.len() {
        candle_core::bail!(
            "cross_entropy: {} predictions for {} labels",
            n_pred,
            labels.len()
        );
    }
    let ignore = ignore_index.unwrap_or(i64::MIN);
    let mut valid = Vec::with_capacity(labels.len());
    let mut safe = Vec::with_capacity(labels.len());
    for (i, &l) in labels.iter().enumerate() {
        if l == ignore {
            valid.push(0f32);
            safe.push(0u32);
        } else if l < 0 || l as usize >= c {
            candle_core::bail!("cross_entropy: label {l} at element {i} outside [0, {c})");
        } else {
            valid.push(1.0);
            safe.push(l as u32);
        }
    }
    let non_ignored = labels.iter().filter(|&&l| l != ignore).count() as f64;
    let avg = match (avg_factor, avg_non_ignore, reduction) {
        (None, true, Reduction::Mean) => Some(non_ignored),
        (a, _, _) => a,
    };
    let dev = pred.device();
    if pred.rank() >= 3 && dev.is_cpu() && matches!(pred.dtype(), DType::F32 | DType::F64) {
        // Dense predictions: the fused kernel on (N, C, H·W), classes not moved last.
        let weights: Vec<f64> = match class_weight {
            None => valid.iter().map(|&v| v as f64).collect(),
            Some(cw) => {
                let cw: Vec<f64> = cw.to_dtype(DType::F64)?.to_vec1()?;
                valid
                    .iter()
                    .zip(&safe)
                    .map(|(&v, &l)| v as f64 * cw[l as usize])
                    .collect()
            }
        };
        let loss = match resized {
            Some(ac) => {
                let (_, _, h, w) = label.unsqueeze(1)?.dims4()?;
                softmax_ce::softmax_cross_entropy_resized(pred, safe, weights, (h, w), ac)?
            }
            None => {
                let x = pred.reshape((pred.dim(0)?, c, ()))?;
                softmax_ce::softmax_cross_entropy(&x, safe, weights)?
            }
        }
        .reshape(label.shape())?;
        return weight_reduce_loss(&loss, weight, reduction, avg);
    }
    // Move classes last: (M, C).
    let logits = if pred.rank() == 2 {
        pred.clone()
    } else {
        pred.flatten_from(2)?.transpose(1, 2)?.flatten_to(1)?
    };
    let safe = Tensor::new(safe.as_slice(), dev)?;
    let max = logits.max_keepdim(D::Minus1)?.detach();
    let shifted = logits.broadcast_sub(&max)?;
    let lse = shifted.exp()?.sum_keepdim(D::Minus1)?.log()?;
    let picked = shifted.gather(&safe.unsqueeze(1)?, 1)?;
    let mut loss = (lse - picked)?.squeeze(1)?;
    let mut mask = Tensor::new(valid.as_slice(), dev)?.to_dtype(pred.dtype())?;
    if let Some(cw) = class_weight {
        mask = (mask * cw.index_select(&safe, 0)?)?;
    }
    loss = (loss * mask)?;
    let loss = loss.reshape(label.shape())?;
    weight_reduce_loss(&loss, weight, reduction, avg)
}

/// mmdetection's `mask_cross_entropy`: `pred` `(N, C, H, W)` mask logits, `target` `(N, H, W)`
/// binary masks, `labels` `(N,)`: BCE-with-logits on the channel of each RoI's class, averaged over
/// all pixels (`avg_factor` divides the sum instead).
pub fn mask_cross_entropy(
    pred: &Tensor,
    target: &Tensor,
    labels: &Tensor,
    avg_factor: Option<f64>,
) -> Result<Tensor> {
    let (n, _, h, w) = pred.dims4()?;
    let idx = labels
        .to_dtype(DType::U32)?
        .reshape((n, 1, 1, 1))?
        .broadcast_as((n, 1, h, w))?
        .contiguous()?;
    let sel = pred.gather(&idx, 1)?.squeeze(1)?;
    binary_cross_entropy_with_logits(
        &sel,
        &target.to_dtype(pred.dtype())?,
        None,
        Reduction::Mean,
        avg_factor,
    )
}
