//! Fused softmax cross-entropy over the class axis of `(B, C, S)` logits, without moving classes
//! last: per element `w · (logsumexp_c x[c] − x[label])`, with the backward
//! `g · w · (softmax(x) − onehot(label))` recomputed from the logits.
//!
//! For semantic segmentation the composed version (transpose to `(B·S, C)`, shift, exp, sum,
//! log, gather, and the gradients of each) keeps half a dozen logit-sized tensors alive; at
//! 512x512 with 150 classes and batch 2 each is 315 MB. This op keeps none in the forward and
//! writes one (the gradient) in the backward.

use candle_core::{CpuStorage, CustomOp1, CustomOp2, DType, Layout, Result, Shape, Tensor};
use num_traits::Float;
use rayon::prelude::*;
use std::sync::Arc;

/// Pixels per block: the class loop runs over a block of contiguous pixels at a time.
const BLOCK: usize = 256;

/// Per-element targets shared by the forward and the backward.
struct Targets {
    /// Class of each element `(B·S)`; any value where `weight` is 0.
    labels: Vec<u32>,
    /// Weight of each element (0 for ignored ones).
    weights: Vec<f64>,
    /// Classes.
    c: usize,
    /// Elements per image.
    s: usize,
}

struct SoftmaxCe(Arc<Targets>);
struct SoftmaxCeGrad(Arc<Targets>);

/// Per element `e = b·S + s`: `max_c x` and `sum_c exp(x − max)`, in blocks of contiguous
/// pixels (the class loop outside, the pixel loop inside, so that both read contiguous rows).
fn stats<T: Float + Send + Sync>(x: &[T], t: &Targets) -> (Vec<T>, Vec<T>) {
    let (c, s) = (t.c, t.s);
    let n = x.len() / c.max(1);
    let mut m = vec![T::neg_infinity(); n];
    let mut sum = vec![T::zero(); n];
    m.par_chunks_mut(s.max(1))
        .zip(sum.par_chunks_mut(s.max(1)))
        .enumerate()
        .for_each(|(bi, (mi, si))| {
            let xi = &x[bi * c * s..(bi + 1) * c * s];
            mi.par_chunks_mut(BLOCK)
                .zip(si.par_chunks_mut(BLOCK))
                .enumerate()
                .for_each(|(k, (mb, sb))| {
                    let s0 = k * BLOCK;
                    let len = mb.len();
                    for cc in 0..c {
                        for (v, &xv) in mb.iter_mut().zip(&xi[cc * s + s0..cc * s + s0 + len]) {
                            if xv > *v {
                                *v = xv;
                            }
                        }
                    }
                    for cc in 0..c {
                        let row = &xi[cc * s + s0..cc * s + s0 + len];
                        for ((v, &xv), &mv) in sb.iter_mut().zip(row).zip(mb.iter()) {
                            *v = *v + (xv - mv).exp();
                        }
                    }
                });
        });
    (m, sum)
}

fn fwd_kernel<T: Float + Send + Sync>(x: &[T], t: &Targets) -> Vec<T> {
    let (c, s) = (t.c, t.s);
    let (m, sum) = stats(x, t);
    (0..m.len())
        .into_par_iter()
        .map(|e| {
            let w = t.weights[e];
            if w == 0.0 {
                return T::zero();
            }
            let (bi, j) = (e / s, e % s);
            let picked = x[(bi * c + t.labels[e] as usize) * s + j];
            T::from(w).expect("f64 weight") * (sum[e].ln() + m[e] - picked)
        })
        .collect()
}

/// [`grad_kernel`] written over the logits themselves (each element depends only on itself and
/// its pixel's statistics, computed first).
fn grad_in_place<T: Float + Send + Sync>(x: &mut [T], g: &[T], t: &Targets) {
    let (c, s) = (t.c, t.s);
    let (m, sum) = stats(x, t);
    let coef: Vec<T> = (0..m.len())
        .into_par_iter()
        .map(|e| g[e] * T::from(t.weights[e]).expect("f64 weight") / sum[e])
        .collect();
    x.par_chunks_mut(s.max(1))
        .enumerate()
        .for_each(|(row, xr)| {
            let (bi, cc) = (row / c, row % c);
            let base = bi * s;
            for (j, v) in xr.iter_mut().enumerate() {
                let e = base + j;
                let mut o = coef[e] * (*v - m[e]).exp();
                if t.weights[e] != 0.0 && t.labels[e] as usize == cc {
                    o = o - g[e] * T::from(t.weights[e]).expect("f64 weight");
                }
                *v = o;
            }
        });
}

fn grad_kernel<T: Float + Send + Sync>(x: &[T], g: &[T], t: &Targets) -> Vec<T> {
    let (c, s) = (t.c, t.s);
    let (m, sum) = stats(x, t);
    // grad = coef · exp(x − max) − g · w · [class == label], coef = g · w / sum.
    let coef: Vec<T> = (0..m.len())
        .into_par_iter()
        .map(|e| g[e] * T::from(t.weights[e]).expect("f64 weight") / sum[e])
        .collect();
    let mut out = vec![T::zero(); x.len()];
    out.par_chunks_mut(s.max(1))
        .zip(x.par_chunks(s.max(1)))
        .enumerate()
        .for_each(|(row, (o, xr))| {
            let (bi, cc) = (row / c, row % c);
            let base = bi * s;
            for j in 0..o.len() {
                let e = base + j;
                let mut v = coef[e] * (xr[j] - m[e]).exp();
                if t.weights[e] != 0.0 && t.labels[e] as usize == cc {
                    v = v - g[e] * T::from(t.weights[e]).expect("f64 weight");
                }
                o[j] = v;
            }
        });
    out
}

impl CustomOp1 for SoftmaxCe {
    fn name(&self) -> &'static str {
        "softmax-cross-entropy"
    }

    fn cpu_fwd(&self, st: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let t = &self.0;
        let b = l.shape().dims()[0];
        let what = "softmax_cross_entropy: logits";
        let out = crate::cpu_float!(what; v = (st, l) => fwd_kernel(v, t));
        Ok((out, Shape::from((b, t.s))))
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        let g = g.detach().contiguous()?;
        Ok(Some(
            x.detach()
                .apply_op2_no_bwd(&g, &SoftmaxCeGrad(self.0.clone()))?,
        ))
    }
}

impl CustomOp2 for SoftmaxCeGrad {
    fn name(&self) -> &'static str {
        "softmax-cross-entropy-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let what = "softmax_cross_entropy backward";
        let out = crate::cpu_float!(what; x = (s1, l1), g = (s2, l2) => grad_kernel(x, g, &self.0));
        Ok((out, l1.shape().clone()))
    }
}

/// Per-element softmax cross-entropy `(B, S)` of logits `(B, C, S)` (classes on axis 1, elements
/// contiguous on the last axis): `weights[e] · (logsumexp_c x[b, c, s] − x[b, labels[e], s])`
/// for element `e = b·S + s`. Elements with weight 0 give 0 (their label is not read).
/// Differentiable in the logits; CPU f32 / f64 only.
///
/// Errors: `labels` / `weights` not of length `B·S`; a label `≥ C` with a non-zero weight; a
/// non-CPU device or another dtype.
pub fn softmax_cross_entropy(
    logits: &Tensor,
    labels: Vec<u32>,
    weights: Vec<f64>,
) -> Result<Tensor> {
    let (b, c, s) = logits.dims3()?;
    if labels.len() != b * s || weights.len() != b * s {
        candle_core::bail!(
            "softmax_cross_entropy: {} labels and {} weights for {b}x{s} elements",
            labels.len(),
            weights.len()
        );
    }
    if let Some(i) = (0..labels.len()).find(|&i| weights[i] != 0.0 && labels[i] as usize >= c) {
        candle_core::bail!(
            "softmax_cross_entropy: label {} at element {i} outside [0, {c})",
            labels[i]
        );
    }
    if !logits.device().is_cpu() || !matches!(logits.dtype(), DType::F32 | DType::F64) {
        candle_core::bail!("softmax_cross_entropy: CPU f32 / f64 only");
    }
    let t = Arc::new(Targets {
        labels,
        weights,
        c,
        s,
    });
    logits.contiguous()?.apply_op1(SoftmaxCe(t))
}

/// Softmax cross-entropy of low-resolution logits bilinearly resized to the label size, without
/// keeping the resized logits: per image, the forward resizes, takes the loss and drops the
/// resized map; the backward resizes again, turns it into its gradient in place and applies the
/// resize's transpose.
struct ResizedCe {
    /// Targets of each image (`s` = label pixels per image).
    per_image: Vec<Targets>,
    resample: crate::ops::resample::Resample,
    /// `(C, h, w)` of the logits.
    c: usize,
    hw: usize,
}

struct SoftmaxCeResized(Arc<ResizedCe>);
struct SoftmaxCeResizedGrad(Arc<ResizedCe>);

impl ResizedCe {
    fn forward<T: Float + Send + Sync>(&self, x: &[T]) -> Vec<T> {
        let mut out = Vec::with_capacity(self.per_image.len() * self.per_image[0].s);
        for (b, t) in self.per_image.iter().enumerate() {
            let up = self
                .resample
                .forward(&x[b * self.c * self.hw..][..self.c * self.hw], self.c);
            out.extend(fwd_kernel(&up, t));
        }
        out
    }

    fn grad<T: Float + Send + Sync>(&self, x: &[T], g: &[T]) -> Vec<T> {
        let mut out = Vec::with_capacity(x.len());
        for (b, t) in self.per_image.iter().enumerate() {
            let mut up = self
                .resample
                .forward(&x[b * self.c * self.hw..][..self.c * self.hw], self.c);
            grad_in_place(&mut up, &g[b * t.s..][..t.s], t);
            out.extend(self.resample.backward(&up, self.c));
        }
        out
    }
}

impl CustomOp1 for SoftmaxCeResized {
    fn name(&self) -> &'static str {
        "softmax-cross-entropy-resized"
    }

    fn cpu_fwd(&self, st: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let r = &self.0;
        let what = "softmax_cross_entropy_resized: logits";
        let out = crate::cpu_float!(what; v = (st, l) => r.forward(v));
        Ok((out, Shape::from((r.per_image.len(), r.per_image[0].s))))
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        let g = g.detach().contiguous()?;
        Ok(Some(x.detach().apply_op2_no_bwd(
            &g,
            &SoftmaxCeResizedGrad(self.0.clone()),
        )?))
    }
}

impl CustomOp2 for SoftmaxCeResizedGrad {
    fn name(&self) -> &'static str {
        "softmax-cross-entropy-resized-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let what = "softmax_cross_entropy_resized backward";
        let r = &self.0;
        let out = crate::cpu_float!(what; x = (s1, l1), g = (s2, l2) => r.grad(x, g));
        Ok((out, l1.shape().clone()))
    }
}

/// Per-pixel softmax cross-entropy `(B, H·W)` of `logits` `(B, C, h, w)` bilinearly resized to
/// `(H, W)` (`F.interpolate(mode="bilinear", align_corners)`, as [`crate::ops::resize_bilinear`]),
/// for pixel `e = b·H·W + p`: `weights[e] · (logsumexp_c u[b, c, p] − u[b, labels[e], p])` with `u`
/// the resized logits. Equal to `softmax_cross_entropy(resize_bilinear(logits))` without keeping
/// the `(B, C, H, W)` resized logits for the backward (mmseg computes its decode-head losses on
/// logits resized to the label size; at 512² with 150 classes those are 315 MB per head).
/// Differentiable in the logits; CPU f32 / f64 only.
///
/// Errors: `labels` / `weights` not of length `B·H·W`; a label `≥ C` with a non-zero weight; a
/// non-CPU device or another dtype; an empty size.
pub fn softmax_cross_entropy_resized(
    logits: &Tensor,
    labels: Vec<u32>,
    weights: Vec<f64>,
    (oh, ow): (usize, usize),
    align_corners: bool,
) -> Result<Tensor> {
    let (b, c, h, w) = logits.dims4()?;
    let s = oh * ow;
    if labels.len() != b * s || weights.len() != b * s || s == 0 || b == 0 {
        candle_core::bail!(
            "softmax_cross_entropy_resized: {} labels and {} weights for {b} images of {oh}x{ow}",
            labels.len(),
            weights.len()
        );
    }
    if let Some(i) = (0..labels.len()).find(|&i| weights[i] != 0.0 && labels[i] as usize >= c) {
        candle_core::bail!(
            "softmax_cross_entropy_resized: label {} at element {i} outside [0, {c})",
            labels[i]
        );
    }
    if !logits.device().is_cpu() || !matches!(logits.dtype(), DType::F32 | DType::F64) {
        candle_core::bail!("softmax_cross_entropy_resized: CPU f32 / f64 only");
    }
    let per_image = (0..b)
        .map(|i| Targets {
            labels: labels[i * s..(i + 1) * s].to_vec(),
            weights: weights[i * s..(i + 1) * s].to_vec(),
            c,
            s,
        })
        .collect();
    let r = Arc::new(ResizedCe {
        per_image,
        resample: crate::ops::resample::Resample::bilinear(h, w, oh, ow, align_corners),
        c,
        hw: h * w,
    });
    logits.contiguous()?.apply_op1(SoftmaxCeResized(r))
}
