//! The position branch of Conv2Former's MLP as one training op on NCHW maps:
//! `y = h + GELU(DW(h) + b)` (official `MLP`: `x = x + self.act(self.pos(x))`, `pos` a 3×3
//! depthwise convolution with bias, "same" padding).
//!
//! Composed of ops (depthwise convolution, GELU, add), the hidden map `h` (four times the block's
//! channels) feeds two nodes, so candle's autograd gives it a zero-filled gradient buffer and adds
//! both contributions into it, and keeps the convolution and GELU outputs for the backward. As
//! one op the forward writes `y` once and keeps only its inputs; the backward recomputes the
//! convolution (a few percent of the step) and writes `dh = dy + DWᵀ(dy ⊙ GELU'(z))` once, with
//! `z = DW(h) + b`. Same values as the composition (tested in f64,
//! `backbones/tests/fused_op_paths.rs`); that composition is the path on other devices.

use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};
use densepred_core::ops::activation::Act;
use densepred_core::ops::dispatch::{self, Op, FLOAT};
use densepred_core::ops::dwconv::{
    depthwise_conv2d, forward_kernel, grad_input_kernel, grad_weight_kernel, DwConvParams, Geom,
};
use rayon::prelude::*;

/// [`pos_gelu_residual`]'s dispatch entry: our CPU kernel, a candle composition elsewhere.
pub const POS_GELU_RESIDUAL: Op = Op::candle("pos_gelu_residual", FLOAT);

/// The op, with the convolution's "same" geometry.
struct PosGelu {
    p: DwConvParams,
}

/// `z[plane] ← f(z[plane] + b[channel], other[plane])` over the `(B·C)` planes of `z`, in
/// parallel.
fn per_plane<T: Act>(
    z: &mut [T],
    other: &[T],
    b: &[T],
    plane: usize,
    f: impl Fn(T, T) -> T + Sync,
) {
    let c = b.len();
    z.par_chunks_mut(plane)
        .zip(other.par_chunks(plane))
        .enumerate()
        .for_each(|(bc, (z, o))| {
            let bias = b[bc % c];
            for (z, &o) in z.iter_mut().zip(o) {
                *z = f(*z + bias, o);
            }
        });
}

/// `h + GELU(DW(h) + b)` on raw buffers (`h` `(B, C, H, W)`, `w` `(C, 1, k, k)`, `b` `(C,)`).
fn forward<T: Act>(g: &Geom, h: &[T], w: &[T], b: &[T], plane: usize) -> Vec<T> {
    let mut y = forward_kernel(g, h, w);
    per_plane(&mut y, h, b, plane, |z, h| h + z.gelu());
    y
}

/// `(dh, dw, db)` of [`forward`] given `dy`.
fn backward<T: Act>(
    g: &Geom,
    (h, w, b, dy): (&[T], &[T], &[T], &[T]),
    plane: usize,
) -> (Vec<T>, Vec<T>, Vec<T>) {
    // dz = dy ⊙ GELU'(z), with z recomputed.
    let mut dz = forward_kernel(g, h, w);
    per_plane(&mut dz, dy, b, plane, |z, d| d * z.gelu_grad());
    let mut dh = grad_input_kernel(g, &dz, w);
    dh.par_iter_mut().zip(dy).for_each(|(a, &d)| *a = *a + d);
    let dw = grad_weight_kernel(g, h, &dz);
    let c = b.len();
    let mut db = vec![T::zero(); c];
    for (bc, p) in dz.chunks(plane).enumerate() {
        db[bc % c] = db[bc % c] + densepred_core::kernel::reduce::sum(p);
    }
    (dh, dw, db)
}

impl CustomOp3 for PosGelu {
    fn name(&self) -> &'static str {
        "pos-gelu-residual"
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
        let g = Geom::new(l1.shape(), l2.shape(), self.p)?;
        let (_, _, hh, ww) = l1.shape().dims4()?;
        let out = densepred_core::cpu_float!("pos_gelu_residual";
            h = (s1, l1), w = (s2, l2), b = (s3, l3) => forward(&g, h, w, b, hh * ww));
        Ok((out, l1.shape().clone()))
    }

    fn bwd(
        &self,
        h: &Tensor,
        w: &Tensor,
        b: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let g = Geom::new(h.shape(), w.shape(), self.p)?;
        let (_, _, hh, ww) = h.dims4()?;
        let dy = dy.contiguous()?;
        let what = "pos_gelu_residual backward";
        let (dh, dw, db) = densepred_core::cpu_float_tensors!(what;
            hv = h, wv = w, bv = b, dv = dy => {
            let (dh, dw, db) = backward(&g, (hv, wv, bv, dv), hh * ww);
            (
                Tensor::from_vec(dh, h.shape(), h.device())?,
                Tensor::from_vec(dw, w.shape(), w.device())?,
                Tensor::from_vec(db, b.shape(), b.device())?,
            )
        });
        Ok((Some(dh), Some(dw), Some(db)))
    }
}

/// `h + GELU(DW(h) + b)`: `h` `(B, C, H, W)`, `w` `(C, 1, k, k)` with odd `k` ("same" padding
/// `k / 2`), `b` `(C,)` → `(B, C, H, W)`; the exact (erf) GELU. Counts the convolution's MACs as
/// `Conv2d` does (`h.elem_count() · k²`).
///
/// Errors: an even kernel, shapes that do not match.
pub fn pos_gelu_residual(h: &Tensor, w: &Tensor, b: &Tensor) -> Result<Tensor> {
    let (c, one, k, k2) = w.dims4()?;
    if k % 2 == 0 || k != k2 || one != 1 || h.dim(1)? != c || b.dims() != [c] {
        candle_core::bail!(
            "pos_gelu_residual: input {:?}, weight {:?}, bias {:?} do not match (odd square kernel, \
             one per channel)",
            h.dims(),
            w.dims(),
            b.dims()
        );
    }
    if densepred_core::flops::active() {
        densepred_core::flops::count("conv", (h.elem_count() * k * k) as u64);
    }
    let p = DwConvParams::same(k / 2);
    let same_dtype = w.dtype() == h.dtype() && b.dtype() == h.dtype();
    if !same_dtype || !dispatch::select(&POS_GELU_RESIDUAL, h).is_ours() {
        let z = depthwise_conv2d(h, w, Some(b), p)?;
        return h + densepred_core::nn::gelu(&z)?;
    }
    h.contiguous()?
        .apply_op3(&w.contiguous()?, &b.contiguous()?, PosGelu { p })
}
