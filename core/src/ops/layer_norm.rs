//! LayerNorm over the last dimension as a candle `CustomOp3` with a fast CPU forward kernel and an
//! analytic backward pass.
//!
//! candle-nn's fused `ops::layer_norm` has no backward pass and its differentiable fallback runs
//! seven tensor ops with temporaries; this op gives one pass forward and the standard closed-form
//! gradient backward (Ba et al. 2016, "Layer Normalization"; PyTorch's `native_layer_norm`):
//! with `xh = (x - mean) * rstd`, `g = dy * gamma`,
//! `dx = rstd * (g - mean(g) - xh * mean(g * xh))`, `dgamma = sum(dy * xh)`, `dbeta = sum(dy)`.
//! Variance is the biased one, as in `torch.nn.LayerNorm`.

use candle_core::{
    backend::BackendStorage, CpuStorage, CustomOp3, DType, Layout, Result, Shape, Storage, Tensor,
    D,
};
use num_traits::Float;
use rayon::prelude::*;

struct LayerNormLastDim {
    eps: f64,
}

fn slice<'a, T>(d: &'a [T], l: &Layout) -> Result<&'a [T]> {
    super::contiguous(d, l, "layer_norm: inputs")
}

pub(super) fn ln_kernel<T: Float + Send + Sync>(
    x: &[T],
    g: &[T],
    b: &[T],
    dim: usize,
    eps: f64,
) -> Vec<T> {
    let mut out = super::zeroed(x.len());
    let n = T::from(dim).unwrap_or_else(T::one);
    let eps = T::from(eps).unwrap_or_else(T::zero);
    out.par_chunks_mut(dim)
        .zip(x.par_chunks(dim))
        .for_each(|(o, xr)| {
            let mean = super::reduce::sum(xr) / n;
            let var = super::reduce::sum_sq_dev(xr, mean) / n;
            let rstd = (var + eps).sqrt().recip();
            for i in 0..dim {
                o[i] = (xr[i] - mean) * rstd * g[i] + b[i];
            }
        });
    out
}

impl CustomOp3 for LayerNormLastDim {
    fn name(&self) -> &'static str {
        "layer-norm-last-dim"
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
        let dim = l1.shape().dims().last().copied().unwrap_or(0);
        if l2.shape().elem_count() != dim || l3.shape().elem_count() != dim || dim == 0 {
            candle_core::bail!(
                "layer_norm: weight {:?} / bias {:?} must have the last dim of x {:?}",
                l2.shape(),
                l3.shape(),
                l1.shape()
            );
        }
        let out = match (s1, s2, s3) {
            (CpuStorage::F32(x), CpuStorage::F32(g), CpuStorage::F32(b)) => CpuStorage::F32(
                ln_kernel(slice(x, l1)?, slice(g, l2)?, slice(b, l3)?, dim, self.eps),
            ),
            (CpuStorage::F64(x), CpuStorage::F64(g), CpuStorage::F64(b)) => CpuStorage::F64(
                ln_kernel(slice(x, l1)?, slice(g, l2)?, slice(b, l3)?, dim, self.eps),
            ),
            _ => candle_core::bail!(
                "layer_norm: expected f32 or f64 inputs of one dtype, got {:?}",
                s1.dtype()
            ),
        };
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
        let what = "layer_norm backward";
        let dim = gamma.elem_count();
        macro_rules! run {
            ($t:ty) => {{
                // Read through the storage locks (no copies); the results are new tensors with
                // no graph of their own.
                let (xs, xl) = x.storage_and_layout();
                let (gs, gl) = gamma.storage_and_layout();
                let (ds, dl) = dy.storage_and_layout();
                let (dx, dg, db) = match (&*xs, &*gs, &*ds) {
                    (Storage::Cpu(xc), Storage::Cpu(gc), Storage::Cpu(dc)) => ln_backward::<$t>(
                        slice(xc.as_slice::<$t>()?, xl)?,
                        slice(gc.as_slice::<$t>()?, gl)?,
                        slice(dc.as_slice::<$t>()?, dl)?,
                        dim,
                        self.eps,
                    ),
                    _ => candle_core::bail!("{what}: expected CPU tensors"),
                };
                drop((xs, gs, ds));
                (
                    Tensor::from_vec(dx, x.shape(), x.device())?,
                    Tensor::from_vec(dg, gamma.shape(), x.device())?,
                    Tensor::from_vec(db, gamma.shape(), x.device())?,
                )
            }};
        }
        let (dx, dg, db) = match x.dtype() {
            DType::F32 => run!(f32),
            DType::F64 => run!(f64),
            t => candle_core::bail!("{what}: unsupported dtype {t:?}"),
        };
        Ok((Some(dx), Some(dg), Some(db)))
    }
}

/// Rows per parallel task of [`ln_backward`] (each task also keeps its own `dgamma`/`dbeta`).
const BWD_ROWS: usize = 64;

/// The closed-form LayerNorm gradients (module doc) in one pass over the rows: `x`, `dy`
/// `(rows, dim)` row-major, `g` `(dim,)`. Returns `(dx (rows, dim), dgamma (dim,), dbeta (dim,))`.
/// Mean and `rstd` are recomputed per row, as in the forward kernel.
pub(super) fn ln_backward<T: Float + Send + Sync>(
    x: &[T],
    g: &[T],
    dy: &[T],
    dim: usize,
    eps: f64,
) -> (Vec<T>, Vec<T>, Vec<T>) {
    let mut dx = super::zeroed(x.len());
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
                let mean = super::reduce::sum(xr) / n;
                let var = super::reduce::sum_sq_dev(xr, mean) / n;
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
/// On CPU with f32/f64 this is one fused kernel with an analytic backward pass; elsewhere it is
/// composed of differentiable tensor ops.
///
/// Errors: `weight`/`bias` whose length differs from `C`, mixed dtypes.
pub fn layer_norm(x: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<Tensor> {
    if x.device().is_cpu() && matches!(x.dtype(), DType::F32 | DType::F64) {
        x.contiguous()?
            .apply_op3(weight, bias, LayerNormLastDim { eps })
    } else {
        let (xh, _) = normalize(x, eps)?;
        xh.broadcast_mul(weight)?.broadcast_add(bias)
    }
}

/// LayerNorm over the channel dimension of an NCHW map (the "channels_first" LayerNorm of
/// ConvNeXt / Conv2Former): `x` `(B, C, H, W)`, `weight`, `bias` `(C,)`; returns `(B, C, H, W)`.
///
/// Errors: as [`layer_norm`], plus a non-4-D `x`.
pub fn layer_norm_channels(x: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<Tensor> {
    let y = layer_norm(&x.permute((0, 2, 3, 1))?, weight, bias, eps)?;
    y.permute((0, 3, 1, 2))?.contiguous()
}
