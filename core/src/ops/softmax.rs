//! Softmax over the last dimension with a backward pass.
//!
//! candle-nn 0.11's fused `ops::softmax_last_dim` is forward-only (`apply_op1_no_bwd`), so
//! attention trained through it receives no gradient for `q` and `k`. This op keeps a fused,
//! numerically stable CPU forward (max-subtracted) and adds the standard backward
//! `dx = y * (dy - sum(dy * y))`.

use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor, D};
use num_traits::Float;
use rayon::prelude::*;

struct SoftmaxLastDim;

/// Element-wise `exp`, specialised per dtype (f32: the vectorisable [`super::activation::exp_f32`]).
pub(crate) trait FastExp: Float {
    fn fast_exp(self) -> Self;
}
impl FastExp for f32 {
    #[inline(always)]
    fn fast_exp(self) -> Self {
        super::activation::exp_f32(self)
    }
}
impl FastExp for f64 {
    #[inline(always)]
    fn fast_exp(self) -> Self {
        self.exp()
    }
}

/// Softmax of one row in place, max-subtracted: the row kernel of [`softmax_last_dim`] and of
/// the attention kernels' probabilities.
#[inline]
pub(crate) fn softmax_in_place<T: FastExp>(r: &mut [T]) {
    let m = crate::kernel::reduce::max(r);
    for v in r.iter_mut() {
        *v = (*v - m).fast_exp();
    }
    let inv = crate::kernel::reduce::sum(r).recip();
    for v in r.iter_mut() {
        *v = *v * inv;
    }
}

fn kernel<T: FastExp + Send + Sync>(x: &[T], dim: usize) -> Vec<T> {
    let mut out = x.to_vec();
    out.par_chunks_mut(dim).for_each(softmax_in_place);
    out
}

impl CustomOp1 for SoftmaxLastDim {
    fn name(&self) -> &'static str {
        "softmax-last-dim"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let dim = l.shape().dims().last().copied().unwrap_or(1).max(1);
        let what = "softmax: input";
        let out = crate::cpu_float!(what; v = (s, l) => kernel(v, dim));
        Ok((out, l.shape().clone()))
    }

    fn bwd(&self, _x: &Tensor, y: &Tensor, dy: &Tensor) -> Result<Option<Tensor>> {
        let y = &y.detach();
        let s = (dy * y)?.sum_keepdim(D::Minus1)?;
        Ok(Some((y * dy.broadcast_sub(&s)?)?))
    }
}

/// `softmax(x)` over the last dimension: `(..., N)` → `(..., N)`, rows summing to 1;
/// differentiable. Our kernel (CPU, f32/f64) is one pass; elsewhere candle-nn's composed softmax.
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    if super::dispatch::select(&super::dispatch::SOFTMAX_LAST_DIM, x).is_ours() {
        x.contiguous()?.apply_op1(SoftmaxLastDim)
    } else {
        candle_nn::ops::softmax(x, D::Minus1)
    }
}
