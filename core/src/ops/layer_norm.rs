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
    backend::BackendStorage, CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor, D,
};
use num_traits::Float;
use rayon::prelude::*;

struct LayerNormLastDim {
    eps: f64,
}

fn slice<'a, T>(d: &'a [T], l: &Layout) -> Result<&'a [T]> {
    super::contiguous(d, l, "layer_norm: inputs")
}

fn ln_kernel<T: Float + Send + Sync>(x: &[T], g: &[T], b: &[T], dim: usize, eps: f64) -> Vec<T> {
    let mut out = vec![T::zero(); x.len()];
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
        // Detached: gradients built from graph-tracked inputs would keep the forward graph
        // (and these temporaries) alive in the GradStore until the whole backward ends.
        let (x, gamma) = (&x.detach(), &gamma.detach());
        let (xh, rstd) = normalize(x, self.eps)?;
        let dim = x.dim(D::Minus1)?;
        let rows = x.elem_count() / dim;
        let g = dy.broadcast_mul(gamma)?;
        let mean_g = g.mean_keepdim(D::Minus1)?;
        let mean_gx = (&g * &xh)?.mean_keepdim(D::Minus1)?;
        let dx = g
            .broadcast_sub(&mean_g)?
            .sub(&xh.broadcast_mul(&mean_gx)?)?
            .broadcast_mul(&rstd)?;
        // Column sums as a gemm with a ones row (candle's sum over leading dims is slow).
        let ones = Tensor::ones((1, rows), dy.dtype(), dy.device())?;
        let dgamma = ones
            .matmul(&(dy * &xh)?.reshape((rows, dim))?)?
            .reshape(dim)?;
        let dbeta = ones
            .matmul(&dy.contiguous()?.reshape((rows, dim))?)?
            .reshape(dim)?;
        Ok((Some(dx), Some(dgamma), Some(dbeta)))
    }
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
