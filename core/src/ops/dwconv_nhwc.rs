//! Channels-last depthwise convolution on vision-transformer tokens, optionally fused with the
//! residual add and exact GELU of SMT's detail-specific FFN.
//!
//! Tokens `(B, H·W, C)` are an NHWC map, so a depthwise convolution can run on them directly:
//! no `(B, N, C) ↔ (B, C, H, W)` transposes, and the inner loop runs over contiguous channels.
//! Modes:
//! * [`LocalMode::Plain`]: `y = DW(x) + b` (MSA's local branch on `v`);
//! * [`LocalMode::ResidualGelu`]: `y = GELU(x + DW(x) + b)` (the FFN: `act(h + dwconv(h))`).
//!
//! Stride 1, odd kernel `k`, zero padding `k / 2` ("same"). The backward pass recomputes the
//! pre-activation; gradients for input, weight and bias.

use super::activation::Act;
use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};
use num_traits::Float;
use rayon::prelude::*;

/// What follows the convolution.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LocalMode {
    /// `DW(x) + b`.
    Plain,
    /// `GELU(x + DW(x) + b)`.
    ResidualGelu,
}

/// Geometry of a token convolution: batch, map height and width, channels, (odd) kernel size.
///
/// With the row kernels below ([`conv_row`], [`taps_major`], [`grad_input`],
/// [`grad_weight_bias`]) it is the kernel-level API that fused ops built on this convolution
/// (SMT's detail FFN in `densepred_backbones::smt::ffn`) use.
#[derive(Debug, Clone, Copy)]
pub struct Geo {
    /// Batch size `B`.
    pub b: usize,
    /// Map height `H`.
    pub h: usize,
    /// Map width `W`.
    pub w: usize,
    /// Channels `C`.
    pub c: usize,
    /// Odd kernel size `k` ("same" padding `k / 2`).
    pub k: usize,
}

/// `z = [x +] DW(x) + b` for one output row `(b, y)`: `out` has `W·C` values; `x` is
/// `(B, H·W, C)`, `wt` tap-major `(k·k, C)` ([`taps_major`]), `bias` `(C,)`.
#[inline]
#[allow(clippy::too_many_arguments)]
pub fn conv_row<T: Float>(
    g: &Geo,
    x: &[T],
    wt: &[T],
    bias: &[T],
    bi: usize,
    y: usize,
    residual: bool,
    out: &mut [T],
) {
    let (h, w, c, k) = (g.h, g.w, g.c, g.k);
    let p = k / 2;
    let plane = &x[bi * h * w * c..(bi + 1) * h * w * c];
    for xo in 0..w {
        let o = &mut out[xo * c..(xo + 1) * c];
        o.copy_from_slice(bias);
        if residual {
            let src = &plane[(y * w + xo) * c..(y * w + xo + 1) * c];
            for (a, &v) in o.iter_mut().zip(src) {
                *a = *a + v;
            }
        }
        for ky in 0..k {
            let yi = y as isize + ky as isize - p as isize;
            if yi < 0 || yi >= h as isize {
                continue;
            }
            for kx in 0..k {
                let xi = xo as isize + kx as isize - p as isize;
                if xi < 0 || xi >= w as isize {
                    continue;
                }
                let src = &plane
                    [(yi as usize * w + xi as usize) * c..(yi as usize * w + xi as usize + 1) * c];
                let wk = &wt[(ky * k + kx) * c..(ky * k + kx + 1) * c];
                for ((a, &v), &ww) in o.iter_mut().zip(src).zip(wk) {
                    *a = *a + ww * v;
                }
            }
        }
    }
}

/// Weight `(C, 1, k, k)` → tap-major `(k·k, C)`.
pub fn taps_major<T: Float>(w: &[T], c: usize, k: usize) -> Vec<T> {
    let mut t = vec![T::zero(); c * k * k];
    for ch in 0..c {
        for i in 0..k * k {
            t[i * c + ch] = w[ch * k * k + i];
        }
    }
    t
}

fn forward<T: Act>(g: &Geo, x: &[T], w: &[T], b: &[T], mode: LocalMode) -> Vec<T> {
    let wt = taps_major(w, g.c, g.k);
    let row = g.w * g.c;
    let mut out = crate::kernel::zeroed(g.b * g.h * row);
    out.par_chunks_mut(row).enumerate().for_each(|(r, o)| {
        conv_row(
            g,
            x,
            &wt,
            b,
            r / g.h,
            r % g.h,
            mode == LocalMode::ResidualGelu,
            o,
        );
        if mode == LocalMode::ResidualGelu {
            for v in o.iter_mut() {
                *v = v.gelu();
            }
        }
    });
    out
}

/// Returns `(dx, dw (C,1,k,k), db (C))`.
fn backward<T: Act>(
    g: &Geo,
    x: &[T],
    w: &[T],
    b: &[T],
    dy: &[T],
    mode: LocalMode,
) -> (Vec<T>, Vec<T>, Vec<T>) {
    let row = g.w * g.c;
    let wt = taps_major(w, g.c, g.k);
    // dz = dy · GELU'(z) (or dy).
    let mut dz = dy.to_vec();
    if mode == LocalMode::ResidualGelu {
        dz.par_chunks_mut(row).enumerate().for_each(|(r, d)| {
            let mut z = vec![T::zero(); row];
            conv_row(g, x, &wt, b, r / g.h, r % g.h, true, &mut z);
            for (dv, zv) in d.iter_mut().zip(&z) {
                *dv = *dv * zv.gelu_grad();
            }
        });
    }
    let dx = grad_input(g, &dz, &wt, mode == LocalMode::ResidualGelu);
    let (gw, gb) = grad_weight_bias(g, x, &dz);
    (dx, gw, gb)
}

/// `dx` of `z = [x +] DW(x) + b` given `dz` (`(B, H·W, C)`) and tap-major weights `wt` `(k·k, C)`:
/// `dx[y', x'] = [dz[y', x'] +] Σ_taps w · dz[y' − ky + p, x' − kx + p]`, a gather per row.
pub fn grad_input<T: Float + Send + Sync>(g: &Geo, dz: &[T], wt: &[T], residual: bool) -> Vec<T> {
    let (c, k) = (g.c, g.k);
    let p = k / 2;
    let row = g.w * c;
    let mut dx = crate::kernel::zeroed(dz.len());
    dx.par_chunks_mut(row).enumerate().for_each(|(r, o)| {
        let (bi, y) = (r / g.h, r % g.h);
        let plane = &dz[bi * g.h * row..(bi + 1) * g.h * row];
        for xo in 0..g.w {
            let out = &mut o[xo * c..(xo + 1) * c];
            if residual {
                out.copy_from_slice(&plane[y * row + xo * c..y * row + (xo + 1) * c]);
            }
            for ky in 0..k {
                let yo = y as isize - ky as isize + p as isize;
                if yo < 0 || yo >= g.h as isize {
                    continue;
                }
                for kx in 0..k {
                    let xs = xo as isize - kx as isize + p as isize;
                    if xs < 0 || xs >= g.w as isize {
                        continue;
                    }
                    let src = &plane[yo as usize * row + xs as usize * c
                        ..yo as usize * row + (xs as usize + 1) * c];
                    let wk = &wt[(ky * k + kx) * c..(ky * k + kx + 1) * c];
                    for ((a, &v), &ww) in out.iter_mut().zip(src).zip(wk) {
                        *a = *a + ww * v;
                    }
                }
            }
        }
    });
    dx
}

/// Weight `(C, 1, k, k)` and bias `(C,)` gradients of `z = DW(x) + b` given `dz`: per-thread
/// tap-major accumulators over row chunks, reduced. Returns `(dw (C·k·k), db (C))`.
pub fn grad_weight_bias<T: Float + Send + Sync>(g: &Geo, x: &[T], dz: &[T]) -> (Vec<T>, Vec<T>) {
    let (c, k) = (g.c, g.k);
    let p = k / 2;
    let row = g.w * c;
    let rows = g.b * g.h;
    let (gwt, gb) = (0..rows)
        .into_par_iter()
        .fold(
            || (vec![T::zero(); k * k * c], vec![T::zero(); c]),
            |(mut gw, mut gb), r| {
                let (bi, y) = (r / g.h, r % g.h);
                let plane = &x[bi * g.h * row..(bi + 1) * g.h * row];
                let d = &dz[r * row..(r + 1) * row];
                for xo in 0..g.w {
                    let dv = &d[xo * c..(xo + 1) * c];
                    for (a, &v) in gb.iter_mut().zip(dv) {
                        *a = *a + v;
                    }
                    for ky in 0..k {
                        let yi = y as isize + ky as isize - p as isize;
                        if yi < 0 || yi >= g.h as isize {
                            continue;
                        }
                        for kx in 0..k {
                            let xi = xo as isize + kx as isize - p as isize;
                            if xi < 0 || xi >= g.w as isize {
                                continue;
                            }
                            let src = &plane[yi as usize * row + xi as usize * c
                                ..yi as usize * row + (xi as usize + 1) * c];
                            let acc = &mut gw[(ky * k + kx) * c..(ky * k + kx + 1) * c];
                            for ((a, &s), &dd) in acc.iter_mut().zip(src).zip(dv) {
                                *a = *a + s * dd;
                            }
                        }
                    }
                }
                (gw, gb)
            },
        )
        .reduce(
            || (vec![T::zero(); k * k * c], vec![T::zero(); c]),
            |(mut a, mut b), (c2, d2)| {
                a.iter_mut().zip(c2).for_each(|(x, y)| *x = *x + y);
                b.iter_mut().zip(d2).for_each(|(x, y)| *x = *x + y);
                (a, b)
            },
        );
    let mut gw = vec![T::zero(); c * k * k];
    for ch in 0..c {
        for i in 0..k * k {
            gw[ch * k * k + i] = gwt[i * c + ch];
        }
    }
    (gw, gb)
}

struct LocalConv {
    hw: (usize, usize),
    mode: LocalMode,
}

impl LocalConv {
    fn geo(&self, x: &Shape, w: &Shape) -> Result<Geo> {
        let (b, n, c) = x.dims3()?;
        let (wc, one, k, k2) = w.dims4()?;
        let (h, wd) = self.hw;
        if n != h * wd || wc != c || one != 1 || k != k2 || k % 2 == 0 {
            candle_core::bail!(
                "token dwconv: tokens {:?} for {h}x{wd}, weight {:?} (needs (C, 1, k, k), odd k)",
                x.dims(),
                w.dims()
            );
        }
        Ok(Geo { b, h, w: wd, c, k })
    }
}

impl CustomOp3 for LocalConv {
    fn name(&self) -> &'static str {
        "token-dwconv"
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
        let g = self.geo(l1.shape(), l2.shape())?;
        let out = crate::cpu_float!("token dwconv"; x = (s1, l1), w = (s2, l2), b = (s3, l3) =>
            forward(&g, x, w, b, self.mode));
        Ok((out, l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let g = self.geo(x.shape(), w.shape())?;
        let dy = dy.contiguous()?;
        let dev = x.device();
        let what = "token dwconv backward";
        let (x, w, b) = (x.contiguous()?, w.contiguous()?, b.contiguous()?);
        let (dx, dw, db) = crate::cpu_float_tensors!(what; xv = x, wv = w, bv = b, dv = dy => {
            let (dx, dw, db) = backward(&g, xv, wv, bv, dv, self.mode);
            (
                Tensor::from_vec(dx, x.shape(), dev)?,
                Tensor::from_vec(dw, w.shape(), dev)?,
                Tensor::from_vec(db, b.shape(), dev)?,
            )
        });
        Ok((Some(dx), Some(dw), Some(db)))
    }
}

/// Depthwise "same" convolution of tokens `x` `(B, H·W, C)` (row-major over `(H, W)`) with
/// `weight` `(C, 1, k, k)` (odd `k`) and `bias` `(C,)`, followed by `mode`; returns `(B, H·W, C)`.
/// Same values as `to_tokens(conv2d(to_map(x), groups = C))` (+ residual + GELU).
///
/// Where our kernel does not run ([`super::dispatch`]) it is composed of candle ops.
///
/// Errors: shapes that do not fit `hw`, an even kernel.
pub fn token_dwconv(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    hw: (usize, usize),
    mode: LocalMode,
) -> Result<Tensor> {
    if super::dispatch::select(&super::dispatch::TOKEN_DWCONV, x).is_ours() {
        return x.contiguous()?.apply_op3(
            &weight.contiguous()?,
            &bias.contiguous()?,
            LocalConv { hw, mode },
        );
    }
    let (b, n, c) = x.dims3()?;
    let k = weight.dim(2)?;
    let map = x.transpose(1, 2)?.reshape((b, c, hw.0, hw.1))?;
    let y = super::dwconv::depthwise_conv2d(
        &map,
        weight,
        Some(bias),
        super::dwconv::DwConvParams::same(k / 2),
    )?;
    let y = y.reshape((b, c, n))?.transpose(1, 2)?.contiguous()?;
    match mode {
        LocalMode::Plain => Ok(y),
        LocalMode::ResidualGelu => super::activation::gelu_erf(&(y + x)?),
    }
}
