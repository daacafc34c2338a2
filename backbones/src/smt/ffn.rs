//! The detail-specific FFN of SMT (taken from Shunted Transformer) as one training op on tokens:
//! `y = fc2(GELU(h + DW(h) + b_dw))` with `h = fc1(x)`.
//!
//! Composed of three ops ([`densepred_core::ops::bias::linear_bias`], [`densepred_core::ops::token_dwconv`],
//! [`densepred_core::ops::bias::linear_bias`]), candle's autograd gives the two hidden tensors (`h` and the GELU
//! output, each `ratio ×` the block's tokens) a zero-filled gradient buffer and an add each, on
//! one thread. As one op, the backward writes every hidden gradient once into a buffer of its own
//! and the forward keeps exactly what the backward needs (`h`, the GELU input and output), as
//! PyTorch's autograd saves them. Same values as the composed ops (tested in f64).

use candle_core::{CpuStorage, CustomOp2, Layout, Result, Shape, Tensor, WithDType};
use densepred_core::kernel::{gemm_into, KernelFloat, MatView};
use densepred_core::ops::activation::Act;
use densepred_core::ops::bias::linear_fwd;
use densepred_core::ops::dispatch::{Op, FLOAT};
use densepred_core::ops::dwconv_nhwc::{conv_row, grad_input, grad_weight_bias, taps_major, Geo};
use rayon::prelude::*;
use std::sync::Mutex;

/// [`detail_ffn`]'s dispatch entry: our CPU kernel, a candle composition elsewhere.
pub const DETAIL_FFN: Op = Op::candle("detail_ffn", FLOAT);
/// [`pre_norm_ffn_residual`]'s dispatch entry: our CPU kernel, a candle composition elsewhere.
pub const PRE_NORM_FFN_RESIDUAL: Op = Op::candle("pre_norm_ffn_residual", FLOAT);

/// Sizes of one FFN: tokens `(B, H·W, C)`, hidden width `hd`, output width `co`, kernel `k`;
/// `ln`: a LayerNorm over `C` runs first (its parameters packed after the FFN's).
#[derive(Debug, Clone, Copy)]
struct Dims {
    b: usize,
    hgt: usize,
    wid: usize,
    c: usize,
    hd: usize,
    co: usize,
    k: usize,
    ln: bool,
}

impl Dims {
    fn rows(&self) -> usize {
        self.b * self.hgt * self.wid
    }

    /// The token-convolution geometry over the hidden channels.
    fn geo(&self) -> Geo {
        Geo {
            b: self.b,
            h: self.hgt,
            w: self.wid,
            c: self.hd,
            k: self.k,
        }
    }

    /// Offsets of `fc1.weight (hd, c)`, `fc1.bias (hd)`, `dw.weight (hd, 1, k, k)`, `dw.bias (hd)`,
    /// `fc2.weight (co, hd)`, `fc2.bias (co)`, and with `ln` the norm's `weight (c)` and
    /// `bias (c)`, in the packed parameter vector, and its length (`o[8]`).
    fn offsets(&self) -> [usize; 9] {
        let mut o = [0; 9];
        let ln = if self.ln { self.c } else { 0 };
        let sizes = [
            self.hd * self.c,
            self.hd,
            self.hd * self.k * self.k,
            self.hd,
            self.co * self.hd,
            self.co,
            ln,
            ln,
        ];
        for (i, s) in sizes.iter().enumerate() {
            o[i + 1] = o[i] + s;
        }
        o
    }
}

/// Element types of the CPU kernel.
trait FfnFloat: KernelFloat + Act + WithDType + num_traits::Float {}
impl FfnFloat for f32 {}
impl FfnFloat for f64 {}

/// What the forward keeps for the backward: `h = fc1(x)`, `pre = h + DW(h) + b_dw`,
/// `z = GELU(pre)`, each `(rows, hd)`, and with a LayerNorm first its output `xn` `(rows, c)`.
struct Saved<T> {
    xn: Option<Vec<T>>,
    h: Vec<T>,
    pre: Vec<T>,
    z: Vec<T>,
}

enum SavedAny {
    F32(Saved<f32>),
    F64(Saved<f64>),
}

trait Stash: Sized {
    fn stash(s: Saved<Self>) -> SavedAny;
    fn unstash(s: SavedAny) -> Option<Saved<Self>>;
}

impl Stash for f32 {
    fn stash(s: Saved<f32>) -> SavedAny {
        SavedAny::F32(s)
    }
    fn unstash(s: SavedAny) -> Option<Saved<f32>> {
        match s {
            SavedAny::F32(s) => Some(s),
            SavedAny::F64(_) => None,
        }
    }
}

impl Stash for f64 {
    fn stash(s: Saved<f64>) -> SavedAny {
        SavedAny::F64(s)
    }
    fn unstash(s: SavedAny) -> Option<Saved<f64>> {
        match s {
            SavedAny::F64(s) => Some(s),
            SavedAny::F32(_) => None,
        }
    }
}

struct DetailFfn {
    dims: Dims,
    /// The LayerNorm's eps (used when `dims.ln`).
    ln_eps: f64,
    /// Add the input to the output (`co == c`): the block's residual connection.
    residual: bool,
    /// Keep the hidden tensors for a backward pass (the inputs are tracked).
    save: bool,
    saved: Mutex<Option<SavedAny>>,
}

/// `a += b` elementwise, in parallel blocks.
fn add_into<T: KernelFloat>(a: &mut [T], b: &[T]) {
    a.par_chunks_mut(1 << 14)
        .zip(b.par_chunks(1 << 14))
        .for_each(|(a, b)| {
            for (x, &y) in a.iter_mut().zip(b) {
                *x += y;
            }
        });
}

/// Column sums of a row-major `(rows, cols)` buffer (a bias gradient), in parallel over row blocks.
fn col_sums<T: KernelFloat>(a: &[T], cols: usize) -> Vec<T> {
    if cols == 0 {
        return Vec::new();
    }
    a.par_chunks(cols * 256)
        .fold(
            || vec![T::zero(); cols],
            |mut acc, blk| {
                for r in blk.chunks(cols) {
                    for (s, &v) in acc.iter_mut().zip(r) {
                        *s += v;
                    }
                }
                acc
            },
        )
        .reduce(
            || vec![T::zero(); cols],
            |mut a, b| {
                for (s, v) in a.iter_mut().zip(b) {
                    *s += v;
                }
                a
            },
        )
}

impl DetailFfn {
    fn hidden<T: FfnFloat>(&self, x: &[T], p: &[T]) -> Saved<T> {
        let d = self.dims;
        let o = d.offsets();
        let g = d.geo();
        let rows = d.rows();
        let xn = d.ln.then(|| {
            densepred_core::ops::layer_norm::ln_kernel(
                x,
                &p[o[6]..o[7]],
                &p[o[7]..o[8]],
                d.c,
                self.ln_eps,
            )
        });
        let xin = xn.as_deref().unwrap_or(x);
        let h = linear_fwd(xin, &p[o[0]..o[1]], &p[o[1]..o[2]], rows, d.c, d.hd);
        let wt = taps_major(&p[o[2]..o[3]], d.hd, d.k);
        let b_dw = &p[o[3]..o[4]];
        let row = d.wid * d.hd;
        let mut pre = densepred_core::kernel::zeroed(rows * d.hd);
        let mut z = densepred_core::kernel::zeroed(rows * d.hd);
        pre.par_chunks_mut(row)
            .zip(z.par_chunks_mut(row))
            .enumerate()
            .for_each(|(r, (pr, zr))| {
                conv_row(&g, &h, &wt, b_dw, r / d.hgt, r % d.hgt, true, pr);
                for (zv, &v) in zr.iter_mut().zip(pr.iter()) {
                    *zv = v.gelu();
                }
            });
        Saved { xn, h, pre, z }
    }

    fn forward<T: FfnFloat + Stash>(&self, x: &[T], p: &[T]) -> Vec<T> {
        let d = self.dims;
        let o = d.offsets();
        let s = self.hidden(x, p);
        let mut y = linear_fwd(&s.z, &p[o[4]..o[5]], &p[o[5]..o[6]], d.rows(), d.hd, d.co);
        if self.residual {
            add_into(&mut y, x);
        }
        if self.save {
            *self.saved.lock().unwrap_or_else(|e| e.into_inner()) = Some(T::stash(s));
        }
        y
    }

    /// `(dx (rows, c), dp (packed))` for the output gradient `dy` `(rows, co)`.
    fn backward<T: FfnFloat + Stash>(&self, x: &[T], p: &[T], dy: &[T]) -> (Vec<T>, Vec<T>) {
        let d = self.dims;
        let o = d.offsets();
        let rows = d.rows();
        let saved = self
            .saved
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
            .and_then(T::unstash);
        // Recomputed when the forward did not keep them (a second backward through the graph).
        let s = saved.unwrap_or_else(|| self.hidden(x, p));
        let mut dp = vec![T::zero(); o[8]];
        // fc2: dz = dy W2, dW2 = dyᵀ z, db2 = Σ dy.
        let mut dz = densepred_core::kernel::zeroed(rows * d.hd);
        gemm_into(
            &mut dz,
            MatView::rows_of(rows, d.hd, 0, d.hd),
            false,
            dy,
            MatView::rows_of(rows, d.co, 0, d.co),
            p,
            MatView::rows_of(d.co, d.hd, o[4], d.hd),
        );
        gemm_into(
            &mut dp,
            MatView::rows_of(d.co, d.hd, o[4], d.hd),
            false,
            dy,
            MatView::rows_of(rows, d.co, 0, d.co).t(),
            &s.z,
            MatView::rows_of(rows, d.hd, 0, d.hd),
        );
        dp[o[5]..o[6]].copy_from_slice(&col_sums(dy, d.co));
        drop(s.z);
        // GELU: dpre = dz · GELU'(pre), in place.
        dz.par_chunks_mut(d.hd * 64)
            .zip(s.pre.par_chunks(d.hd * 64))
            .for_each(|(g, pr)| {
                for (gv, &v) in g.iter_mut().zip(pr) {
                    *gv = *gv * v.gelu_grad();
                }
            });
        drop(s.pre);
        let dpre = dz;
        // Residual depthwise conv: dh = dpre + DWᵀ(dpre); dW_dw, db_dw from h and dpre.
        let g = d.geo();
        let wt = taps_major(&p[o[2]..o[3]], d.hd, d.k);
        let dh = grad_input(&g, &dpre, &wt, true);
        let (gw_dw, gb_dw) = grad_weight_bias(&g, &s.h, &dpre);
        drop(dpre);
        dp[o[2]..o[3]].copy_from_slice(&gw_dw);
        dp[o[3]..o[4]].copy_from_slice(&gb_dw);
        // fc1: dx = dh W1, dW1 = dhᵀ x, db1 = Σ dh.
        let mut dx = densepred_core::kernel::zeroed(rows * d.c);
        gemm_into(
            &mut dx,
            MatView::rows_of(rows, d.c, 0, d.c),
            false,
            &dh,
            MatView::rows_of(rows, d.hd, 0, d.hd),
            p,
            MatView::rows_of(d.hd, d.c, o[0], d.c),
        );
        gemm_into(
            &mut dp,
            MatView::rows_of(d.hd, d.c, o[0], d.c),
            false,
            &dh,
            MatView::rows_of(rows, d.hd, 0, d.hd).t(),
            s.xn.as_deref().unwrap_or(x),
            MatView::rows_of(rows, d.c, 0, d.c),
        );
        dp[o[1]..o[2]].copy_from_slice(&col_sums(&dh, d.hd));
        drop(dh);
        if d.ln {
            // Through the LayerNorm (recomputing its row statistics from x).
            let (dxl, dg, db) = densepred_core::ops::layer_norm::ln_backward(
                x,
                &p[o[6]..o[7]],
                &dx,
                d.c,
                self.ln_eps,
            );
            dp[o[6]..o[7]].copy_from_slice(&dg);
            dp[o[7]..o[8]].copy_from_slice(&db);
            dx = dxl;
        }
        if self.residual {
            add_into(&mut dx, dy);
        }
        (dx, dp)
    }
}

impl CustomOp2 for DetailFfn {
    fn name(&self) -> &'static str {
        "detail-ffn"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let d = self.dims;
        let what = "detail FFN";
        let out =
            densepred_core::cpu_float!(what; x = (s1, l1), p = (s2, l2) => self.forward(x, p));
        Ok((out, Shape::from((d.b, d.hgt * d.wid, d.co))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        p: &Tensor,
        _res: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let dy = dy.contiguous()?;
        let what = "detail FFN backward";
        // Read through the storage locks: no copies of x and p beyond these views.
        let (dx, dp) = densepred_core::cpu_float_tensors!(what; xv = x, pv = p, dv = dy => {
            let (dx, dp) = self.backward(xv, pv, dv);
            (
                Tensor::from_vec(dx, x.shape(), x.device())?,
                Tensor::from_vec(dp, p.shape(), p.device())?,
            )
        });
        Ok((Some(dx), Some(dp)))
    }
}

/// Checks that the FFN's parameters fit each other, the tokens and `hw` (see [`detail_ffn`]);
/// returns `(B, C, hd, co, k)`.
#[allow(clippy::too_many_arguments)]
fn validate_ffn(
    x: &Tensor,
    fc1_w: &Tensor,
    fc1_b: &Tensor,
    dw_w: &Tensor,
    dw_b: &Tensor,
    fc2_w: &Tensor,
    fc2_b: &Tensor,
    hw: (usize, usize),
) -> Result<(usize, usize, usize, usize, usize)> {
    let (b, n, c) = x.dims3()?;
    let (hd, c1) = fc1_w.dims2()?;
    let (hd_dw, one, k, k2) = dw_w.dims4()?;
    let (co, hd2) = fc2_w.dims2()?;
    if c1 != c
        || hd_dw != hd
        || one != 1
        || k != k2
        || k % 2 == 0
        || hd2 != hd
        || fc1_b.elem_count() != hd
        || dw_b.elem_count() != hd
        || fc2_b.elem_count() != co
        || n != hw.0 * hw.1
    {
        candle_core::bail!(
            "detail FFN: tokens {:?} for {}x{}, fc1 {:?}/{:?}, dwconv {:?}/{:?}, fc2 {:?}/{:?} \
             do not fit",
            x.dims(),
            hw.0,
            hw.1,
            fc1_w.dims(),
            fc1_b.dims(),
            dw_w.dims(),
            dw_b.dims(),
            fc2_w.dims(),
            fc2_b.dims()
        );
    }
    Ok((b, c, hd, co, k))
}

/// SMT's feed-forward block on tokens `x` `(B, H·W, C)` (row-major over `hw = (H, W)`):
/// `fc2(GELU(h + DW(h) + dw_b))`, `h = fc1(x)`, with `fc1_w` `(hd, C)`, `fc1_b` `(hd,)`, `dw_w`
/// `(hd, 1, k, k)` (odd `k`, zero padding `k / 2`), `dw_b` `(hd,)`, `fc2_w` `(co, hd)`, `fc2_b`
/// `(co,)`; returns `(B, H·W, co)`. Matches the official `Mlp` of AFeng-x/SMT `models/smt.py`
/// (`fc1` → `DWConv` → `act(x + dwconv)` → `fc2`, dropout 0).
///
/// When gradients are tracked on the CPU (f32/f64) it runs as one op (see the module doc); else
/// as the three ops it is made of.
///
/// Errors: shapes that do not fit each other or `hw`, an even kernel, unsupported dtypes.
#[allow(clippy::too_many_arguments)]
pub fn detail_ffn(
    x: &Tensor,
    fc1_w: &Tensor,
    fc1_b: &Tensor,
    dw_w: &Tensor,
    dw_b: &Tensor,
    fc2_w: &Tensor,
    fc2_b: &Tensor,
    hw: (usize, usize),
) -> Result<Tensor> {
    let (b, c, hd, co, k) = validate_ffn(x, fc1_w, fc1_b, dw_w, dw_b, fc2_w, fc2_b, hw)?;
    let params = [fc1_w, fc1_b, dw_w, dw_b, fc2_w, fc2_b];
    if !fusable(&DETAIL_FFN, x, &params) {
        let h = densepred_core::ops::bias::linear_bias(x, fc1_w, fc1_b)?;
        let z = densepred_core::ops::token_dwconv(
            &h,
            dw_w,
            dw_b,
            hw,
            densepred_core::ops::LocalMode::ResidualGelu,
        )?;
        return densepred_core::ops::bias::linear_bias(&z, fc2_w, fc2_b);
    }
    let dims = Dims {
        b,
        hgt: hw.0,
        wid: hw.1,
        c,
        hd,
        co,
        k,
        ln: false,
    };
    run_fused(x, &params, dims, 0.0, false)
}

/// Whether the FFN runs as one op: gradients tracked, our kernel for `x`
/// ([`densepred_core::ops::dispatch`]), one dtype throughout.
fn fusable(op: &densepred_core::ops::dispatch::Op, x: &Tensor, params: &[&Tensor]) -> bool {
    let tracked = x.track_op() || params.iter().any(|t| t.track_op());
    tracked
        && densepred_core::ops::dispatch::select(op, x).is_ours()
        && params.iter().all(|t| t.dtype() == x.dtype())
}

/// Packs `params` (in [`Dims::offsets`] order) and applies the fused op to `x`.
fn run_fused(
    x: &Tensor,
    params: &[&Tensor],
    dims: Dims,
    ln_eps: f64,
    residual: bool,
) -> Result<Tensor> {
    let flat = params
        .iter()
        .map(|t| t.flatten_all())
        .collect::<Result<Vec<_>>>()?;
    let packed = Tensor::cat(&flat, 0)?;
    let op = DetailFfn {
        dims,
        ln_eps,
        residual,
        save: true,
        saved: Mutex::new(None),
    };
    x.contiguous()?.apply_op2(&packed, op)
}

/// A pre-norm transformer block's FFN half with its residual connection:
/// `x + detail_ffn(layer_norm(x, ln_w, ln_b, ln_eps), ...)` (see [`detail_ffn`] and
/// [`densepred_core::ops::layer_norm`] for the shapes; `ln_w`, `ln_b` `(C,)`, and `fc2` must map back to `C`).
/// SMT's `Block` computes `x + mlp(norm2(x))` this way (AFeng-x/SMT `models/smt.py`).
///
/// When gradients are tracked on the CPU (f32/f64) it is one op, so that neither the normalised
/// tokens nor the FFN's output become graph tensors with a zero-filled gradient buffer and a
/// serial add each (candle's autograd); else the composed ops.
///
/// Errors: as [`detail_ffn`], plus norm parameters that are not `(C,)` or an FFN that does not
/// map back to `C`.
#[allow(clippy::too_many_arguments)]
pub fn pre_norm_ffn_residual(
    x: &Tensor,
    ln_w: &Tensor,
    ln_b: &Tensor,
    ln_eps: f64,
    fc1_w: &Tensor,
    fc1_b: &Tensor,
    dw_w: &Tensor,
    dw_b: &Tensor,
    fc2_w: &Tensor,
    fc2_b: &Tensor,
    hw: (usize, usize),
) -> Result<Tensor> {
    let c = x.dims3()?.2;
    let co = fc2_w.dims2()?.0;
    if ln_w.elem_count() != c || ln_b.elem_count() != c || co != c {
        candle_core::bail!(
            "pre-norm FFN block: tokens {:?}, norm {:?}/{:?}, fc2 {:?}: the norm must be (C,) and \
             fc2 must map back to C",
            x.dims(),
            ln_w.dims(),
            ln_b.dims(),
            fc2_w.dims()
        );
    }
    let params = [fc1_w, fc1_b, dw_w, dw_b, fc2_w, fc2_b, ln_w, ln_b];
    if !fusable(&PRE_NORM_FFN_RESIDUAL, x, &params) {
        let xn = densepred_core::ops::layer_norm(x, ln_w, ln_b, ln_eps)?;
        return x + detail_ffn(&xn, fc1_w, fc1_b, dw_w, dw_b, fc2_w, fc2_b, hw)?;
    }
    let (b, c, hd, _, k) = validate_ffn(x, fc1_w, fc1_b, dw_w, dw_b, fc2_w, fc2_b, hw)?;
    let dims = Dims {
        b,
        hgt: hw.0,
        wid: hw.1,
        c,
        hd,
        co: c,
        k,
        ln: true,
    };
    run_fused(x, &params, dims, ln_eps, true)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device, Var};

    fn rand(shape: &[usize], std: f64, seed: u64) -> Tensor {
        // A deterministic, non-degenerate fill (no RNG dependency in the test).
        let n: usize = shape.iter().product();
        let v: Vec<f64> = (0..n)
            .map(|i| {
                let t = ((i as u64 + 1) * 2_654_435_761 + seed * 97) % 10_007;
                (t as f64 / 10_007.0 - 0.5) * 2.0 * std
            })
            .collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    /// The fused op against the three composed ops, in f64: output and the gradients of the
    /// input and all six parameters, for an odd map (5x3), kernel 3 and an unequal out width.
    /// Both sides compute the same sums in different orders; 1e-10 leaves room for that
    /// reassociation (terms are O(1), about 1e-15 each) and still catches any wrong index.
    #[test]
    fn fused_matches_composed_ops_f64() {
        let (b, h, w, c, hd, co, k) = (2, 5, 3, 6, 10, 7, 3);
        let x = Var::from_tensor(&rand(&[b, h * w, c], 1.0, 1)).unwrap();
        let ps: Vec<Var> = [
            (vec![hd, c], 0.4, 2),
            (vec![hd], 0.3, 3),
            (vec![hd, 1, k, k], 0.4, 4),
            (vec![hd], 0.3, 5),
            (vec![co, hd], 0.4, 6),
            (vec![co], 0.3, 7),
        ]
        .into_iter()
        .map(|(s, std, seed)| Var::from_tensor(&rand(&s, std, seed)).unwrap())
        .collect();
        let p: Vec<&Tensor> = ps.iter().map(|v| v.as_tensor()).collect();
        let fused = detail_ffn(&x, p[0], p[1], p[2], p[3], p[4], p[5], (h, w)).unwrap();
        let hh = densepred_core::ops::bias::linear_bias(&x, p[0], p[1]).unwrap();
        let z = densepred_core::ops::token_dwconv(
            &hh,
            p[2],
            p[3],
            (h, w),
            densepred_core::ops::LocalMode::ResidualGelu,
        )
        .unwrap();
        let composed = densepred_core::ops::bias::linear_bias(&z, p[4], p[5]).unwrap();
        let mut all = vec![x.as_tensor()];
        all.extend(p.iter().copied());
        densepred_testutil::assert_same_values_and_grads(&fused, &composed, &all, 8, 1e-10);
    }

    /// The fused pre-norm block `x + FFN(LN(x))` against the LayerNorm op, the fused FFN and a
    /// candle add, in f64: output and the gradients of the input and all eight parameters (the
    /// input's gradient takes both the residual and the norm's path). 1e-10 as above.
    #[test]
    fn pre_norm_residual_matches_norm_ffn_add_f64() {
        let (b, h, w, c, hd, k) = (2, 5, 3, 6, 10, 3);
        let x = Var::from_tensor(&rand(&[b, h * w, c], 1.0, 11)).unwrap();
        let ps: Vec<Var> = [
            (vec![hd, c], 0.4, 12),
            (vec![hd], 0.3, 13),
            (vec![hd, 1, k, k], 0.4, 14),
            (vec![hd], 0.3, 15),
            (vec![c, hd], 0.4, 16),
            (vec![c], 0.3, 17),
            (vec![c], 0.5, 18),
            (vec![c], 0.3, 19),
        ]
        .into_iter()
        .map(|(s, std, seed)| Var::from_tensor(&rand(&s, std, seed)).unwrap())
        .collect();
        let p: Vec<&Tensor> = ps.iter().map(|v| v.as_tensor()).collect();
        // LayerNorm weight around 1, as trained ones are.
        let ln_w = (p[6] + 1.0).unwrap();
        let eps = 1e-5;
        let fused = pre_norm_ffn_residual(
            &x,
            &ln_w,
            p[7],
            eps,
            p[0],
            p[1],
            p[2],
            p[3],
            p[4],
            p[5],
            (h, w),
        )
        .unwrap();
        let xn = densepred_core::ops::layer_norm(&x, &ln_w, p[7], eps).unwrap();
        let composed = (x.as_tensor()
            + detail_ffn(&xn, p[0], p[1], p[2], p[3], p[4], p[5], (h, w)).unwrap())
        .unwrap();
        let mut all = vec![x.as_tensor()];
        all.extend(p.iter().copied());
        densepred_testutil::assert_same_values_and_grads(&fused, &composed, &all, 20, 1e-10);
    }

    /// Without tracked inputs the composed path runs; the fused one gives the same f32 values
    /// (one rounding per op, sums reassociated: 1e-5 on O(1) outputs).
    #[test]
    fn untracked_and_fused_agree_f32() {
        let (b, h, w, c, hd, k) = (1, 4, 4, 8, 16, 3);
        let x = rand(&[b, h * w, c], 1.0, 11).to_dtype(DType::F32).unwrap();
        let p: Vec<Tensor> = [
            vec![hd, c],
            vec![hd],
            vec![hd, 1, k, k],
            vec![hd],
            vec![c, hd],
            vec![c],
        ]
        .iter()
        .enumerate()
        .map(|(i, s)| rand(s, 0.3, 20 + i as u64).to_dtype(DType::F32).unwrap())
        .collect();
        let plain = detail_ffn(&x, &p[0], &p[1], &p[2], &p[3], &p[4], &p[5], (h, w)).unwrap();
        let xv = Var::from_tensor(&x).unwrap();
        let fused = detail_ffn(&xv, &p[0], &p[1], &p[2], &p[3], &p[4], &p[5], (h, w)).unwrap();
        let d = (&plain - &fused).unwrap().abs().unwrap().max_all().unwrap();
        assert!(d.to_scalar::<f32>().unwrap() < 1e-5, "differ by {d}");
        assert!(densepred_testutil::max_abs_value(&plain) > 0.1);
    }

    #[test]
    fn mismatched_shapes_are_an_error() {
        let x = rand(&[1, 6, 4], 1.0, 1);
        let e = detail_ffn(
            &x,
            &rand(&[8, 4], 0.1, 2),
            &rand(&[8], 0.1, 3),
            &rand(&[8, 1, 3, 3], 0.1, 4),
            &rand(&[8], 0.1, 5),
            &rand(&[4, 8], 0.1, 6),
            &rand(&[4], 0.1, 7),
            (2, 2),
        )
        .unwrap_err();
        assert!(e.to_string().contains("detail FFN"), "{e}");
    }
}
