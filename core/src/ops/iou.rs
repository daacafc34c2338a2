//! The IoU family on `(N, 4)` xyxy boxes in absolute pixels (no +1: width = x2 − x1), with the
//! semantics of `torchvision.ops` (`box_area`, `box_iou`, `generalized_box_iou`,
//! `distance_box_iou`, `complete_box_iou`) and of mmdetection's `bbox_overlaps` (modes `iou`,
//! `iof`, `giou`; pairwise or aligned; `eps` clamping the denominators).
//!
//! All functions are composed of candle tensor ops, so they run on any device and are
//! differentiable (GIoU losses go through them); the only exception is the aspect-ratio term of
//! CIoU, which needs `atan` (absent from candle) and is computed per box on the CPU.

use candle_core::{Result, Tensor};

/// The four coordinate columns `(x1, y1, x2, y2)`, each `(N,)`.
pub fn columns(b: &Tensor) -> Result<[Tensor; 4]> {
    let (_, four) = b.dims2()?;
    if four != 4 {
        candle_core::bail!("boxes must be (N, 4), got {:?}", b.dims());
    }
    Ok([
        b.narrow(1, 0, 1)?.squeeze(1)?,
        b.narrow(1, 1, 1)?.squeeze(1)?,
        b.narrow(1, 2, 1)?.squeeze(1)?,
        b.narrow(1, 3, 1)?.squeeze(1)?,
    ])
}

/// `(x2 − x1) · (y2 − y1)` per box: `(N, 4)` → `(N,)` (`torchvision.ops.box_area`; negative for
/// inverted boxes, as there).
pub fn box_area(b: &Tensor) -> Result<Tensor> {
    let [x1, y1, x2, y2] = columns(b)?;
    (x2 - x1)? * (y2 - y1)?
}

/// Pairwise intersection `(N, M)` and the enclosing box's `(w, h)` `(N, M)` each, all clamped at 0.
struct Pairwise {
    inter: Tensor,
    area1: Tensor,
    area2: Tensor,
    enclose_w: Tensor,
    enclose_h: Tensor,
}

fn pairwise(a: &Tensor, b: &Tensor) -> Result<Pairwise> {
    let [ax1, ay1, ax2, ay2] = columns(a)?;
    let [bx1, by1, bx2, by2] = columns(b)?;
    let col = |t: &Tensor| t.unsqueeze(1);
    let row = |t: &Tensor| t.unsqueeze(0);
    let iw = (col(&ax2)?.broadcast_minimum(&row(&bx2)?)?
        - col(&ax1)?.broadcast_maximum(&row(&bx1)?)?)?
    .relu()?;
    let ih = (col(&ay2)?.broadcast_minimum(&row(&by2)?)?
        - col(&ay1)?.broadcast_maximum(&row(&by1)?)?)?
    .relu()?;
    let ew = (col(&ax2)?.broadcast_maximum(&row(&bx2)?)?
        - col(&ax1)?.broadcast_minimum(&row(&bx1)?)?)?
    .relu()?;
    let eh = (col(&ay2)?.broadcast_maximum(&row(&by2)?)?
        - col(&ay1)?.broadcast_minimum(&row(&by1)?)?)?
    .relu()?;
    Ok(Pairwise {
        inter: (iw * ih)?,
        area1: ((ax2 - ax1)? * (ay2 - ay1)?)?,
        area2: ((bx2 - bx1)? * (by2 - by1)?)?,
        enclose_w: ew,
        enclose_h: eh,
    })
}

fn union(p: &Pairwise) -> Result<Tensor> {
    p.area1
        .unsqueeze(1)?
        .broadcast_add(&p.area2.unsqueeze(0)?)?
        - &p.inter
}

/// Pairwise IoU `(N, M)` of `a` `(N, 4)` and `b` `(M, 4)`: `inter / union`, no epsilon
/// (`torchvision.ops.box_iou`: 0/0 gives NaN for two empty boxes, as there).
pub fn box_iou(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let p = pairwise(a, b)?;
    p.inter.div(&union(&p)?)
}

/// Pairwise generalised IoU (Rezatofighi et al. 2019): `IoU − (C − U) / C` with `C` the area of
/// the smallest enclosing box (`torchvision.ops.generalized_box_iou`). `(N, M)`.
pub fn generalized_box_iou(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let p = pairwise(a, b)?;
    let u = union(&p)?;
    let iou = p.inter.div(&u)?;
    let c = (&p.enclose_w * &p.enclose_h)?;
    iou - ((&c - &u)? / &c)?
}

/// Pairwise distance IoU (Zheng et al. 2020): `IoU − ρ²(centres) / (c² + eps)` with `c` the
/// diagonal of the enclosing box (`torchvision.ops.distance_box_iou`, default `eps = 1e-7`).
pub fn distance_box_iou(a: &Tensor, b: &Tensor, eps: f64) -> Result<Tensor> {
    Ok(diou_and_iou(a, b, eps)?.0)
}

fn diou_and_iou(a: &Tensor, b: &Tensor, eps: f64) -> Result<(Tensor, Tensor)> {
    let p = pairwise(a, b)?;
    let iou = p.inter.div(&union(&p)?)?;
    let diag = ((p.enclose_w.sqr()? + p.enclose_h.sqr()?)? + eps)?;
    let [ax1, ay1, ax2, ay2] = columns(a)?;
    let [bx1, by1, bx2, by2] = columns(b)?;
    let acx = ((ax1 + ax2)? / 2.0)?.unsqueeze(1)?;
    let acy = ((ay1 + ay2)? / 2.0)?.unsqueeze(1)?;
    let bcx = ((bx1 + bx2)? / 2.0)?.unsqueeze(0)?;
    let bcy = ((by1 + by2)? / 2.0)?.unsqueeze(0)?;
    let dist = (acx.broadcast_sub(&bcx)?.sqr()? + acy.broadcast_sub(&bcy)?.sqr()?)?;
    Ok(((&iou - dist.div(&diag)?)?, iou))
}

/// Pairwise complete IoU (Zheng et al. 2020): `DIoU − α·v` with
/// `v = 4/π² (atan(w_a/h_a) − atan(w_b/h_b))²` and `α = v / (1 − IoU + v + eps)`
/// (`torchvision.ops.complete_box_iou`, default `eps = 1e-7`). `(N, M)`. The `atan` terms are
/// computed on the CPU and carry no gradient (`α` has none in torchvision either).
pub fn complete_box_iou(a: &Tensor, b: &Tensor, eps: f64) -> Result<Tensor> {
    let (diou, iou) = diou_and_iou(a, b, eps)?;
    let aspect = |t: &Tensor| -> Result<Tensor> {
        let [x1, y1, x2, y2] = columns(t)?;
        let w: Vec<f64> = (x2 - x1)?.to_dtype(candle_core::DType::F64)?.to_vec1()?;
        let h: Vec<f64> = (y2 - y1)?.to_dtype(candle_core::DType::F64)?.to_vec1()?;
        let v: Vec<f64> = w.iter().zip(&h).map(|(w, h)| (w / h).atan()).collect();
        Tensor::new(v, t.device())?.to_dtype(t.dtype())
    };
    let d = aspect(a)?
        .unsqueeze(1)?
        .broadcast_sub(&aspect(b)?.unsqueeze(0)?)?;
    let v = (d.sqr()? * (4.0 / (std::f64::consts::PI * std::f64::consts::PI)))?;
    let alpha = v.div(&((&v - &iou)? + (1.0 + eps))?)?.detach();
    diou - (alpha * v)?
}

/// mmdetection's `bbox_overlaps` modes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OverlapMode {
    /// Intersection over union.
    Iou,
    /// Intersection over the area of the first box ("foreground").
    Iof,
    /// Generalised IoU.
    Giou,
}

/// mmdetection's `bbox_overlaps(bboxes1, bboxes2, mode, is_aligned, eps=1e-6)`.
///
/// * pairwise (`aligned = false`): `a` `(N, 4)`, `b` `(M, 4)` → `(N, M)`;
/// * aligned: `a`, `b` `(N, 4)` → `(N,)`.
///
/// The union (or area of `a` for `Iof`) and the enclosing area are clamped below at `eps`, so
/// empty boxes give 0 rather than NaN (unlike [`box_iou`]).
///
/// Errors: aligned inputs of different lengths.
pub fn bbox_overlaps(
    a: &Tensor,
    b: &Tensor,
    mode: OverlapMode,
    aligned: bool,
    eps: f64,
) -> Result<Tensor> {
    let [ax1, ay1, ax2, ay2] = columns(a)?;
    let [bx1, by1, bx2, by2] = columns(b)?;
    let (ax1, ay1, ax2, ay2, bx1, by1, bx2, by2) = if aligned {
        if a.dim(0)? != b.dim(0)? {
            candle_core::bail!(
                "bbox_overlaps aligned: {} vs {} boxes",
                a.dim(0)?,
                b.dim(0)?
            );
        }
        (ax1, ay1, ax2, ay2, bx1, by1, bx2, by2)
    } else {
        let c = |t: Tensor| t.unsqueeze(1);
        let r = |t: Tensor| t.unsqueeze(0);
        (
            c(ax1)?,
            c(ay1)?,
            c(ax2)?,
            c(ay2)?,
            r(bx1)?,
            r(by1)?,
            r(bx2)?,
            r(by2)?,
        )
    };
    let area1 = ((&ax2 - &ax1)? * (&ay2 - &ay1)?)?;
    let area2 = ((&bx2 - &bx1)? * (&by2 - &by1)?)?;
    let iw = (ax2.broadcast_minimum(&bx2)? - ax1.broadcast_maximum(&bx1)?)?.relu()?;
    let ih = (ay2.broadcast_minimum(&by2)? - ay1.broadcast_maximum(&by1)?)?.relu()?;
    let overlap = (iw * ih)?;
    let denom = match mode {
        OverlapMode::Iof => area1.broadcast_as(overlap.shape())?.contiguous()?,
        _ => (area1.broadcast_add(&area2)? - &overlap)?,
    };
    let denom = denom.maximum(eps)?;
    let ious = overlap.div(&denom)?;
    if mode != OverlapMode::Giou {
        return Ok(ious);
    }
    let ew = (ax2.broadcast_maximum(&bx2)? - ax1.broadcast_minimum(&bx1)?)?.relu()?;
    let eh = (ay2.broadcast_maximum(&by2)? - ay1.broadcast_minimum(&by1)?)?.relu()?;
    let enclose = (ew * eh)?.maximum(eps)?;
    ious - ((&enclose - &denom)? / &enclose)?
}
