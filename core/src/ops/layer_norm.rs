//! LayerNorm over the last dimension as a candle `CustomOp3` with a fast CPU forward kernel and an
//! analytic backward pass.
//!
//! candle-nn's fused `ops::layer_norm` has no backward pass and its differentiable fallback runs
//! seven tensor ops with temporaries; this op gives one pass forward and the standard closed-form
//! gradient backward (Ba et al. 2016, "Layer Normalization"; PyTorch's `native_layer_norm`):
//! with `xh = (x - mean) * rstd`, `g = dy * gamma`,
//! `dx = rstd * (g - mean(g) - xh * mean(g * xh))`, `dgamma = sum(dy * xh)`, `dbeta = sum(dy)`.
//! Variance is the biased one, as in `torch.nn.LayerNorm`.

use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor, D};
use num_traits::Float;
use rayon::prelude::*;

/// LayerNorm over the last dimension on raw buffers: `x` `(rows, dim)` row-major, `g`, `b`
/// `(dim,)`; returns `(rows, dim)` (the CPU kernel of [`layer_norm`], for fused ops that
/// normalise inside their own kernels).
pub fn ln_kernel<T: Float + Send + Sync>(
    x: &[T],
    g: &[T],
    b: &[T],
    dim: usize,
    eps: f64,
) -> Vec<T> {
    let mut out = crate::kernel::zeroed(x.len());
    let n = T::from(dim).unwrap_or_else(T::one);
    let eps = T::from(eps).unwrap_or_else(T::zero);
    out.par_chunks_mut(dim)
        .zip(x.par_chunks(dim))
        .for_each(|(o, xr)| {
            let mean = crate::kernel::reduce::sum(xr) / n;
            let var = crate::kernel::reduce::sum_sq_dev(xr, mean) / n;
            let rstd = (var + eps).sqrt().recip();
            for i in 0..dim {
                o[i] = (xr[i] - mean) * rstd * g[i] + b[i];
            }
        });
    out
}

/// Rows per parallel task of [`ln_backward`] (each task also keeps its own `dgamma`/`dbeta`).
const BWD_ROWS: usize = 64;

/// The closed-form LayerNorm gradients (module doc) in one pass over the rows: `x`, `dy`
/// `(rows, dim)` row-major, `g` `(dim,)`. Returns `(dx (rows, dim), dgamma (dim,), dbeta (dim,))`.
/// Mean and `rstd` are recomputed per row, as in the forward kernel.
pub fn ln_backward<T: Float + Send + Sync>(
    x: &[T],
    g: &[T],
    dy: &[T],
    dim: usize,
    eps: f64,
) -> (Vec<T>, Vec<T>, Vec<T>) {
    let mut dx = crate::kernel::zeroed(x.len());
    if dim == 0 || x.is_empty() {
        return (dx, vec![T::zero(); dim], vec![T::zero(); dim]);
    }
    let n = T::from(dim).unwrap_or_else(T::one);
    let eps = T::from(eps).unwrap_or_else(T::zero);
    let blk = dim * BWD_ROWS;
    let zeros = || (vec![T::zero(); dim], vec![T::zero(); dim]);
    let (dg, db) = dx
        .par_chunks_mut(blk)
        .zip(x.par_chunks(blk).zip(dy.par_chunks(blk)))
        .fold(zeros, |(mut dg, mut db), (dxb, (xb, dyb))| {
            for ((o, xr), dr) in dxb.chunks_mut(dim).zip(xb.chunks(dim)).zip(dyb.chunks(dim)) {
                let mean = crate::kernel::reduce::sum(xr) / n;
                let var = crate::kernel::reduce::sum_sq_dev(xr, mean) / n;
                let rstd = (var + eps).sqrt().recip();
                // Σ g·dy and Σ g·dy·x̂ over the row, and the parameter sums.
                let (mut s1, mut s2) = (T::zero(), T::zero());
                for i in 0..dim {
                    let xh = (xr[i] - mean) * rstd;
                    let gd = dr[i] * g[i];
                    s1 = s1 + gd;
                    s2 = s2 + gd * xh;
                    dg[i] = dg[i] + dr[i] * xh;
                    db[i] = db[i] + dr[i];
                }
                let (m1, m2) = (s1 / n, s2 / n);
                for i in 0..dim {
                    let xh = (xr[i] - mean) * rstd;
                    o[i] = rstd * (dr[i] * g[i] - m1 - xh * m2);
                }
            }
            (dg, db)
        })
        .reduce(zeros, |(mut a, mut b), (c, d)| {
            for i in 0..dim {
                a[i] = a[i] + c[i];
                b[i] = b[i] + d[i];
            }
            (a, b)
        });
    (dx, dg, db)
}

/// `((x - mean) * rstd, rstd)` over the last dimension, with tensor ops (any device).
fn normalize(x: &Tensor, eps: f64) -> Result<(Tensor, Tensor)> {
    let mean = x.mean_keepdim(D::Minus1)?;
    let xc = x.broadcast_sub(&mean)?;
    let var = xc.sqr()?.mean_keepdim(D::Minus1)?;
    let rstd = (var + eps)?.sqrt()?.recip()?;
    Ok((xc.broadcast_mul(&rstd)?, rstd))
}

/// LayerNorm over the last dimension: `y = (x - mean) / sqrt(var + eps) * weight + bias`, as
/// `torch.nn.functional.layer_norm(x, (C,), weight, bias, eps)`.
///
/// * `x`: `(..., C)`; `weight`, `bias`: `(C,)`. Returns the shape of `x`.
///
/// Our kernel (CPU, f32/f64) is one fused pass with an analytic backward; elsewhere
/// ([`super::dispatch`]) it is composed of differentiable tensor ops.
///
/// Errors: `weight`/`bias` whose length differs from `C`, mixed dtypes.
pub fn layer_norm(x: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<Tensor> {
    if super::dispatch::select(&super::dispatch::LAYER_NORM, x).is_ours() {
        x.contiguous()?.apply_op3(
            weight,
            bias,
            LayerNormOp {
                eps,
                axis: NormAxis::Last,
            },
        )
    } else {
        let (xh, _) = normalize(x, eps)?;
        xh.broadcast_mul(weight)?.broadcast_add(bias)
    }
}

/// LayerNorm over the channel dimension of an NCHW map (the "channels_first" LayerNorm of
/// ConvNeXt / Conv2Former): `x` `(B, C, H, W)`, `weight`, `bias` `(C,)`; returns `(B, C, H, W)`.
///
/// Our kernel (CPU, f32/f64) is one pass on the NCHW layout (statistics over `C` at every
/// position, no transposed copies) with the closed-form backward of the module doc; elsewhere it
/// is [`layer_norm`] between two permutes.
///
/// Errors: as [`layer_norm`], plus a non-4-D `x`.
pub fn layer_norm_channels(x: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<Tensor> {
    x.dims4()?;
    if super::dispatch::select(&super::dispatch::LAYER_NORM_CHANNELS, x).is_ours() {
        x.contiguous()?.apply_op3(
            weight,
            bias,
            LayerNormOp {
                eps,
                axis: NormAxis::Channels,
            },
        )
    } else {
        layer_norm_channels_permuted(x, weight, bias, eps)
    }
}

/// [`layer_norm_channels`] as [`layer_norm`] over the last dimension between two permutes (the
/// fallback, and the reference of the tests).
pub fn layer_norm_channels_permuted(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    eps: f64,
) -> Result<Tensor> {
    let y = layer_norm(&x.permute((0, 2, 3, 1))?, weight, bias, eps)?;
    y.permute((0, 3, 1, 2))?.contiguous()
}

/// Spatial positions per parallel task of the channel kernels.
const POS: usize = 128;

/// Mean and `rstd` over the channels at positions `p0..p0 + len` of image `img` (`x` row-major
/// `(B, C, HW)`), into the first `len` entries of `mean` / `rstd`.
#[allow(clippy::too_many_arguments)]
fn channel_stats<T: Float>(
    x: &[T],
    (c, hw): (usize, usize),
    img: usize,
    p0: usize,
    len: usize,
    eps: T,
    mean: &mut [T; POS],
    rstd: &mut [T; POS],
) {
    let n = T::from(c).unwrap_or_else(T::one);
    let base = img * c * hw + p0;
    mean[..len].fill(T::zero());
    rstd[..len].fill(T::zero());
    for ch in 0..c {
        let row = &x[base + ch * hw..base + ch * hw + len];
        for i in 0..len {
            mean[i] = mean[i] + row[i];
        }
    }
    for m in mean[..len].iter_mut() {
        *m = *m / n;
    }
    for ch in 0..c {
        let row = &x[base + ch * hw..base + ch * hw + len];
        for i in 0..len {
            let d = row[i] - mean[i];
            rstd[i] = rstd[i] + d * d;
        }
    }
    for r in rstd[..len].iter_mut() {
        *r = (*r / n + eps).sqrt().recip();
    }
}

fn lnc_forward<T: Float + Send + Sync>(
    x: &[T],
    g: &[T],
    b: &[T],
    (batch, c, hw): (usize, usize, usize),
    eps: f64,
) -> Vec<T> {
    let mut out: Vec<T> = crate::kernel::zeroed(x.len());
    let ptr = crate::kernel::SyncPtr(out.as_mut_ptr());
    let eps = T::from(eps).unwrap_or_else(T::zero);
    let chunks = hw.div_ceil(POS);
    (0..batch * chunks).into_par_iter().for_each(|t| {
        let (img, p0) = (t / chunks, (t % chunks) * POS);
        let len = POS.min(hw - p0);
        let (mut mean, mut rstd) = ([T::zero(); POS], [T::zero(); POS]);
        channel_stats(x, (c, hw), img, p0, len, eps, &mut mean, &mut rstd);
        for ch in 0..c {
            let at = img * c * hw + ch * hw + p0;
            // SAFETY: task `t` writes positions `p0..p0 + len` of image `img` in every channel:
            // the tasks' ranges are disjoint and inside `out`.
            let o = unsafe { std::slice::from_raw_parts_mut(ptr.get().add(at), len) };
            let row = &x[at..at + len];
            for i in 0..len {
                o[i] = (row[i] - mean[i]) * rstd[i] * g[ch] + b[ch];
            }
        }
    });
    out
}

/// The closed-form gradients (module doc) with the statistics over the channels: `x`, `dy`
/// `(B, C, HW)`, `g` `(C,)`. Returns `(dx, dgamma (C,), dbeta (C,))`.
fn lnc_backward<T: Float + Send + Sync>(
    x: &[T],
    g: &[T],
    dy: &[T],
    (batch, c, hw): (usize, usize, usize),
    eps: f64,
) -> (Vec<T>, Vec<T>, Vec<T>) {
    let mut dx: Vec<T> = crate::kernel::zeroed(x.len());
    let ptr = crate::kernel::SyncPtr(dx.as_mut_ptr());
    let n = T::from(c).unwrap_or_else(T::one);
    let eps = T::from(eps).unwrap_or_else(T::zero);
    let chunks = hw.div_ceil(POS);
    let zeros = || (vec![T::zero(); c], vec![T::zero(); c]);
    let (dg, db) = (0..batch * chunks)
        .into_par_iter()
        .fold(zeros, |(mut dg, mut db), t| {
            let (img, p0) = (t / chunks, (t % chunks) * POS);
            let len = POS.min(hw - p0);
            let (mut mean, mut rstd) = ([T::zero(); POS], [T::zero(); POS]);
            channel_stats(x, (c, hw), img, p0, len, eps, &mut mean, &mut rstd);
            // Σ_c g·dy and Σ_c g·dy·x̂ per position, and the parameter sums.
            let (mut s1, mut s2) = ([T::zero(); POS], [T::zero(); POS]);
            for ch in 0..c {
                let at = img * c * hw + ch * hw + p0;
                let (xr, dr) = (&x[at..at + len], &dy[at..at + len]);
                let (mut sg, mut sb) = (T::zero(), T::zero());
                for i in 0..len {
                    let xh = (xr[i] - mean[i]) * rstd[i];
                    let gd = dr[i] * g[ch];
                    s1[i] = s1[i] + gd;
                    s2[i] = s2[i] + gd * xh;
                    sg = sg + dr[i] * xh;
                    sb = sb + dr[i];
                }
                dg[ch] = dg[ch] + sg;
                db[ch] = db[ch] + sb;
            }
            for ch in 0..c {
                let at = img * c * hw + ch * hw + p0;
                let (xr, dr) = (&x[at..at + len], &dy[at..at + len]);
                // SAFETY: as in `lnc_forward`, disjoint position ranges per task.
                let o = unsafe { std::slice::from_raw_parts_mut(ptr.get().add(at), len) };
                for i in 0..len {
                    let xh = (xr[i] - mean[i]) * rstd[i];
                    o[i] = rstd[i] * (dr[i] * g[ch] - s1[i] / n - xh * s2[i] / n);
                }
            }
            (dg, db)
        })
        .reduce(zeros, |(mut a, mut b), (c2, d2)| {
            for i in 0..a.len() {
                a[i] = a[i] + c2[i];
                b[i] = b[i] + d2[i];
            }
            (a, b)
        });
    (dx, dg, db)
}

/// Where a LayerNorm takes its statistics, with its CPU kernels: over the last dimension or
/// over the channels of an NCHW map. One [`LayerNormOp`] serves both.
#[derive(Debug, Clone, Copy)]
enum NormAxis {
    /// Statistics over the last dimension.
    Last,
    /// Statistics over the channels of `(B, C, H, W)`.
    Channels,
}

impl NormAxis {
    /// The op's name.
    fn name(self) -> &'static str {
        match self {
            NormAxis::Last => "layer-norm-last-dim",
            NormAxis::Channels => "layer-norm-channels",
        }
    }

    /// The kernels' dimensions of an input shape, `(outer, normalised, inner)`.
    fn dims(self, shape: &Shape) -> Result<(usize, usize, usize)> {
        match self {
            NormAxis::Last => {
                let dim = shape.dims().last().copied().unwrap_or(0);
                Ok((shape.elem_count() / dim.max(1), dim, 1))
            }
            NormAxis::Channels => {
                let (b, c, h, w) = shape.dims4()?;
                Ok((b, c, h * w))
            }
        }
    }

    /// Forward kernel: `(x, gamma, beta)` → `y`.
    fn forward<T: Float + Send + Sync>(
        self,
        (x, g, b): (&[T], &[T], &[T]),
        dims: (usize, usize, usize),
        eps: f64,
    ) -> Vec<T> {
        match self {
            NormAxis::Last => ln_kernel(x, g, b, dims.1, eps),
            NormAxis::Channels => lnc_forward(x, g, b, dims, eps),
        }
    }

    /// Backward kernel: `(x, gamma, dy)` → `(dx, dgamma, dbeta)`.
    fn backward<T: Float + Send + Sync>(
        self,
        (x, g, dy): (&[T], &[T], &[T]),
        dims: (usize, usize, usize),
        eps: f64,
    ) -> (Vec<T>, Vec<T>, Vec<T>) {
        match self {
            NormAxis::Last => ln_backward(x, g, dy, dims.1, eps),
            NormAxis::Channels => lnc_backward(x, g, dy, dims, eps),
        }
    }
}

/// The LayerNorm custom op over a [`NormAxis`]: `(x, gamma, beta)` → `y`, f32 or f64 on CPU,
/// with the closed-form backward of the module doc.
struct LayerNormOp {
    eps: f64,
    axis: NormAxis,
}

impl CustomOp3 for LayerNormOp {
    fn name(&self) -> &'static str {
        self.axis.name()
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (axis, what) = (self.axis, self.axis.name());
        let dims = axis.dims(l1.shape())?;
        if l2.shape().elem_count() != dims.1 || l3.shape().elem_count() != dims.1 || dims.1 == 0 {
            candle_core::bail!(
                "{}: weight {:?} / bias {:?} must have the normalised size of x {:?}",
                what,
                l2.shape(),
                l3.shape(),
                l1.shape()
            );
        }
        let out = crate::cpu_float!(what; x = (s1, l1), g = (s2, l2), b = (s3, l3) =>
            axis.forward((x, g, b), dims, self.eps));
        Ok((out, l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        gamma: &Tensor,
        _beta: &Tensor,
        _res: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let dy = dy.contiguous()?;
        let (axis, what) = (self.axis, self.axis.name());
        let dims = axis.dims(x.shape())?;
        // Read through the storage locks (no copies); the results are new tensors with no graph
        // of their own.
        let (dev, xsh, gsh) = (x.device(), x.shape(), gamma.shape());
        let (dx, dg, db) = crate::cpu_float_tensors!(what; xv = x, gv = gamma, dv = dy => {
            let (dx, dg, db) = axis.backward((xv, gv, dv), dims, self.eps);
            (
                Tensor::from_vec(dx, xsh, dev)?,
                Tensor::from_vec(dg, gsh, dev)?,
                Tensor::from_vec(db, gsh, dev)?,
            )
        });
        Ok((Some(dx), Some(dg), Some(db)))
    }
}

#[cfg(test)]
mod channel_tests {
    use super::*;
    use candle_core::{Device, Var};

    fn values(shape: &[usize], seed: u64) -> Tensor {
        let n: usize = shape.iter().product();
        let mut s = seed | 1;
        let v: Vec<f64> = (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                (s >> 11) as f64 / (1u64 << 53) as f64 * 4.0 - 2.0
            })
            .collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    use densepred_testutil::max_abs as max_diff;

    /// Values and all three gradients equal the permute + last-dim LayerNorm composition in f64,
    /// on shapes whose positions span several tasks and end in a partial one.
    #[test]
    fn matches_the_permuted_composition_f64() {
        for (shape, seed) in [
            ([2, 5, 7, 3], 1u64),
            ([1, 16, 20, 13], 2),
            ([3, 1, 4, 4], 3),
        ] {
            let x = Var::from_tensor(&values(&shape, seed)).unwrap();
            let g = Var::from_tensor(&values(&[shape[1]], seed + 10)).unwrap();
            let b = Var::from_tensor(&values(&[shape[1]], seed + 20)).unwrap();
            let proj = values(&shape, seed + 30);
            let run = |f: &dyn Fn(&Tensor, &Tensor, &Tensor, f64) -> Result<Tensor>| {
                let y = f(x.as_tensor(), g.as_tensor(), b.as_tensor(), 1e-6).unwrap();
                let gr = densepred_testutil::grads_of_dot(&y, &proj);
                let grads: Vec<Tensor> = [&x, &g, &b]
                    .iter()
                    .map(|v| gr.get(v.as_tensor()).unwrap().clone())
                    .collect();
                (y, grads)
            };
            let (y1, g1) = run(&layer_norm_channels);
            let (y2, g2) = run(&layer_norm_channels_permuted);
            assert!(max_diff(&y1, &y2) < 1e-12, "{shape:?} values");
            assert_eq!(g1.len(), g2.len());
            for (i, (a, b)) in g1.iter().zip(&g2).enumerate() {
                assert!(max_diff(a, b) < 1e-10, "{shape:?} gradient {i}");
            }
        }
    }
}
