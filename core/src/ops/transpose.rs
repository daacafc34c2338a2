//! Swapping the last two dimensions with a cache-blocked copy.
//!
//! Tokens `(B, N, C)` ↔ maps `(B, C, H*W)` conversions sit between every linear layer and
//! convolution of a vision transformer; candle 0.11's generic strided copy moves 4M floats in
//! ~13 ms on this machine, a tiled copy in ~1 ms.

use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

const TILE: usize = 32;

struct TransposeLast2;

/// `x` as `batch` row-major `(r, c)` planes → the `batch` transposed `(c, r)` planes, contiguous.
pub(crate) fn kernel<T: Copy + Send + Sync + num_traits::Zero>(
    x: &[T],
    batch: usize,
    r: usize,
    c: usize,
) -> Vec<T> {
    let mut out = crate::kernel::zeroed(x.len());
    let plane = r * c;
    if plane == 0 {
        return out;
    }
    // Parallel over (batch, band of TILE output rows); each task writes a disjoint band of `out`
    // and walks the input in TILE x TILE blocks that stay in L1.
    debug_assert_eq!(x.len(), batch * plane);
    out.par_chunks_mut(plane)
        .zip(x.par_chunks(plane))
        .for_each(|(o, xi)| {
            o.par_chunks_mut(TILE * r)
                .enumerate()
                .for_each(|(t, band)| {
                    // Output rows j in [t*TILE, ..) are input columns.
                    let j0 = t * TILE;
                    let j1 = (j0 + TILE).min(c);
                    for i0 in (0..r).step_by(TILE) {
                        let i1 = (i0 + TILE).min(r);
                        for j in j0..j1 {
                            let orow = &mut band[(j - j0) * r + i0..(j - j0) * r + i1];
                            for (k, o) in orow.iter_mut().enumerate() {
                                // In bounds: (i0 + k) < r and j < c, so the index is < r * c = xi.len().
                                *o = unsafe { *xi.get_unchecked((i0 + k) * c + j) };
                            }
                        }
                    }
                });
        });
    out
}

impl CustomOp1 for TransposeLast2 {
    fn name(&self) -> &'static str {
        "transpose-last2"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let dims = l.shape().dims();
        let n = dims.len();
        let (r, c) = (dims[n - 2], dims[n - 1]);
        let batch = l.shape().elem_count() / (r * c).max(1);
        let what = "transpose: input";
        let out = crate::cpu_float!(what; v = (s, l) => kernel(v, batch, r, c));
        let mut od = dims.to_vec();
        od.swap(n - 2, n - 1);
        Ok((out, Shape::from(od)))
    }

    fn bwd(&self, _x: &Tensor, _y: &Tensor, dy: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(transpose_last2(dy)?))
    }
}

/// `x` `(..., R, C)` → contiguous `(..., C, R)`; differentiable. Same result as
/// `x.transpose(D::Minus2, D::Minus1)?.contiguous()`, faster on CPU (f32/f64).
///
/// Errors: a tensor of rank < 2.
pub fn transpose_last2(x: &Tensor) -> Result<Tensor> {
    if x.rank() < 2 {
        candle_core::bail!("transpose_last2: needs rank >= 2, got {:?}", x.dims());
    }
    if super::dispatch::select(&super::dispatch::TRANSPOSE_LAST2, x).is_ours() {
        x.contiguous()?.apply_op1(TransposeLast2)
    } else {
        x.transpose(x.rank() - 2, x.rank() - 1)?.contiguous()
    }
}
