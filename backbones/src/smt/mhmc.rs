//! SMT's multi-head mixed convolution (MHMC, paper Eq. 1–2) as one op.
//!
//! The channels of `x` `(B, C, H, W)` split into `heads` contiguous slices of `cg = C / heads`;
//! head `i` convolves its slice depthwise with a `k_i × k_i` kernel ("same" padding, stride 1)
//! plus bias, and the head outputs are interleaved: output channel `g·heads + i` is channel `g` of
//! head `i`, so that each group of SAA's grouped 1×1 convolution sees one channel of every head.
//!
//! Composed of candle ops that is, per head, a narrow (whose backward zero-pads the gradient to the
//! full input), a copy, the convolution, a bias add and an unsqueeze, then a concatenation: every
//! one of them a node whose gradient candle's autograd zero-fills and adds on one thread. As one
//! op the forward writes each output plane once and the backward writes each input plane once.
//! Same values as the composition (tested in f64); that composition is the path on devices other
//! than the CPU.

use candle_core::{CpuStorage, CustomOp2, Layout, Result, Shape, Tensor};
use densepred_core::ops::dispatch::{Op, FLOAT};
use densepred_core::ops::dwconv::{axpy_row, axpy_row_adjoint, dot_row, DwConvParams, Geom};
use num_traits::Float;
use rayon::prelude::*;

/// [`multi_head_mixed_conv`]'s dispatch entry: our CPU kernel, a candle composition elsewhere.
pub const MULTI_HEAD_MIXED_CONV: Op = Op::candle("multi_head_mixed_conv", FLOAT);

/// Geometry of one MHMC: per-head kernel sizes and the packed parameter offsets.
#[derive(Debug, Clone)]
struct Mhmc {
    b: usize,
    c: usize,
    h: usize,
    w: usize,
    /// Kernel size of each head (odd).
    ks: Vec<usize>,
}

impl Mhmc {
    fn heads(&self) -> usize {
        self.ks.len()
    }

    fn cg(&self) -> usize {
        self.c / self.heads()
    }

    /// Offsets of head `i`'s weight `(cg, 1, k_i, k_i)` and bias `(cg,)` in the packed
    /// parameters (`w_0, b_0, w_1, b_1, …`), and the total length.
    fn offsets(&self) -> (Vec<(usize, usize)>, usize) {
        let cg = self.cg();
        let mut at = 0;
        let offs = self
            .ks
            .iter()
            .map(|&k| {
                let w = at;
                at += cg * k * k;
                let b = at;
                at += cg;
                (w, b)
            })
            .collect();
        (offs, at)
    }

    /// Per-head plane geometry (one channel, "same" padding).
    fn geoms(&self) -> Result<Vec<Geom>> {
        self.ks
            .iter()
            .map(|&k| {
                Geom::new(
                    &Shape::from((1, 1, self.h, self.w)),
                    &Shape::from((1, 1, k, k)),
                    DwConvParams::same(k / 2),
                )
            })
            .collect()
    }

    /// `(head, channel within head)` feeding output channel `o`.
    fn source(&self, o: usize) -> (usize, usize) {
        (o % self.heads(), o / self.heads())
    }

    fn forward<T: Float + Send + Sync>(&self, geoms: &[Geom], x: &[T], p: &[T]) -> Vec<T> {
        let plane = self.h * self.w;
        let (offs, _) = self.offsets();
        let cg = self.cg();
        let mut out = densepred_core::kernel::zeroed(self.b * self.c * plane);
        out.par_chunks_mut(plane).enumerate().for_each(|(bo, op)| {
            let (bi, o) = (bo / self.c, bo % self.c);
            let (i, g) = self.source(o);
            let (k, gm) = (self.ks[i], &geoms[i]);
            let xin = &x[(bi * self.c + i * cg + g) * plane..][..plane];
            let wk = &p[offs[i].0 + g * k * k..][..k * k];
            op.fill(p[offs[i].1 + g]);
            for oy in 0..self.h {
                let orow = &mut op[oy * self.w..(oy + 1) * self.w];
                for ky in 0..k {
                    let Some(iy) = gm.in_row(oy, ky) else {
                        continue;
                    };
                    let irow = &xin[iy * self.w..(iy + 1) * self.w];
                    for kx in 0..k {
                        let (ox0, ox1, off) = gm.col_range(kx);
                        axpy_row(orow, irow, wk[ky * k + kx], ox0, ox1, off, 1);
                    }
                }
            }
        });
        out
    }

    /// `dx` `(B, C, H, W)` for the output gradient `gy`.
    fn grad_input<T: Float + Send + Sync>(&self, geoms: &[Geom], gy: &[T], p: &[T]) -> Vec<T> {
        let plane = self.h * self.w;
        let (offs, _) = self.offsets();
        let cg = self.cg();
        let heads = self.heads();
        let mut gx = densepred_core::kernel::zeroed(self.b * self.c * plane);
        gx.par_chunks_mut(plane).enumerate().for_each(|(bc, gi)| {
            let (bi, ch) = (bc / self.c, bc % self.c);
            let (i, g) = (ch / cg, ch % cg);
            let (k, gm) = (self.ks[i], &geoms[i]);
            let go = &gy[(bi * self.c + g * heads + i) * plane..][..plane];
            let wk = &p[offs[i].0 + g * k * k..][..k * k];
            for oy in 0..self.h {
                let orow = &go[oy * self.w..(oy + 1) * self.w];
                for ky in 0..k {
                    let Some(iy) = gm.in_row(oy, ky) else {
                        continue;
                    };
                    let irow = &mut gi[iy * self.w..(iy + 1) * self.w];
                    for kx in 0..k {
                        let (ox0, ox1, off) = gm.col_range(kx);
                        axpy_row_adjoint(irow, orow, wk[ky * k + kx], ox0, ox1, off, 1);
                    }
                }
            }
        });
        gx
    }

    /// Gradient of the packed parameters for input `x` and output gradient `gy`.
    fn grad_params<T: Float + Send + Sync>(&self, geoms: &[Geom], x: &[T], gy: &[T]) -> Vec<T> {
        let plane = self.h * self.w;
        let (offs, total) = self.offsets();
        let cg = self.cg();
        // Per output channel: (kernel gradient, bias gradient), summed over the batch.
        let per_channel: Vec<(Vec<T>, T)> = (0..self.c)
            .into_par_iter()
            .map(|o| {
                let (i, g) = self.source(o);
                let (k, gm) = (self.ks[i], &geoms[i]);
                let mut gw = vec![T::zero(); k * k];
                let mut gb = T::zero();
                for bi in 0..self.b {
                    let xin = &x[(bi * self.c + i * cg + g) * plane..][..plane];
                    let go = &gy[(bi * self.c + o) * plane..][..plane];
                    gb = gb + densepred_core::kernel::reduce::sum(go);
                    for oy in 0..self.h {
                        let orow = &go[oy * self.w..(oy + 1) * self.w];
                        for ky in 0..k {
                            let Some(iy) = gm.in_row(oy, ky) else {
                                continue;
                            };
                            let irow = &xin[iy * self.w..(iy + 1) * self.w];
                            for kx in 0..k {
                                let (ox0, ox1, off) = gm.col_range(kx);
                                gw[ky * k + kx] =
                                    gw[ky * k + kx] + dot_row(orow, irow, ox0, ox1, off, 1);
                            }
                        }
                    }
                }
                (gw, gb)
            })
            .collect();
        let mut dp = vec![T::zero(); total];
        for (o, (gw, gb)) in per_channel.into_iter().enumerate() {
            let (i, g) = self.source(o);
            let k = self.ks[i];
            dp[offs[i].0 + g * k * k..][..k * k].copy_from_slice(&gw);
            dp[offs[i].1 + g] = gb;
        }
        dp
    }
}

impl CustomOp2 for Mhmc {
    fn name(&self) -> &'static str {
        "multi-head-mixed-conv"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let g = self.geoms()?;
        let out = densepred_core::cpu_float!("MHMC"; x = (s1, l1), p = (s2, l2) => self.forward(&g, x, p));
        Ok((out, l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        p: &Tensor,
        _res: &Tensor,
        gy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let gy = gy.contiguous()?;
        let gx = gy.apply_op2_no_bwd(
            p,
            &MhmcGrad {
                op: self.clone(),
                input: true,
            },
        )?;
        let gp = x.apply_op2_no_bwd(
            &gy,
            &MhmcGrad {
                op: self.clone(),
                input: false,
            },
        )?;
        Ok((Some(gx), Some(gp)))
    }
}

/// The backward kernels as ops (operands read in place): `input: true` takes `(gy, params)` and
/// gives `dx`; `input: false` takes `(x, gy)` and gives the packed parameter gradient.
struct MhmcGrad {
    op: Mhmc,
    input: bool,
}

impl CustomOp2 for MhmcGrad {
    fn name(&self) -> &'static str {
        "multi-head-mixed-conv-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let op = &self.op;
        let g = op.geoms()?;
        if self.input {
            let out = densepred_core::cpu_float!("MHMC backward"; gy = (s1, l1), p = (s2, l2) => op.grad_input(&g, gy, p));
            Ok((out, l1.shape().clone()))
        } else {
            let out = densepred_core::cpu_float!("MHMC backward"; x = (s1, l1), gy = (s2, l2) => op.grad_params(&g, x, gy));
            Ok((out, Shape::from(op.offsets().1)))
        }
    }
}

/// MHMC of `x` `(B, C, H, W)`: head `i` (channels `[i·cg, (i+1)·cg)`, `cg = C / heads`) is
/// convolved depthwise with `weights[i]` `(cg, 1, k_i, k_i)` (odd `k_i`, zero padding `k_i / 2`)
/// plus `biases[i]` `(cg,)`; returns `(B, C, H, W)` with output channel `g·heads + i` = channel `g`
/// of head `i`. As the official `SAM` of AFeng-x/SMT `models/smt.py` (`local_conv_{i+1}` on
/// `s[i]`, `torch.cat(..., dim=2).reshape(B, C, H, W)`).
///
/// On the CPU (f32/f64) one op; elsewhere composed of candle ops and
/// [`densepred_core::ops::depthwise_conv2d`].
///
/// Errors: `heads = 0`, `C` not divisible by it, mismatched weight or bias shapes, an even
/// kernel, a kernel larger than the padded map.
pub fn multi_head_mixed_conv(x: &Tensor, weights: &[Tensor], biases: &[Tensor]) -> Result<Tensor> {
    let (b, c, h, w) = x.dims4()?;
    let heads = weights.len();
    if heads == 0 || c % heads != 0 || biases.len() != heads {
        candle_core::bail!(
            "MHMC: {c} channels, {heads} head weights, {} biases (need C divisible by heads)",
            biases.len()
        );
    }
    let cg = c / heads;
    let mut ks = Vec::with_capacity(heads);
    for (i, (wt, bs)) in weights.iter().zip(biases).enumerate() {
        let (wc, one, k, k2) = wt.dims4()?;
        if wc != cg || one != 1 || k != k2 || k % 2 == 0 || bs.elem_count() != cg {
            candle_core::bail!(
                "MHMC head {i}: weight {:?} / bias {:?}, expected ({cg}, 1, k, k) with odd k / ({cg},)",
                wt.dims(),
                bs.dims()
            );
        }
        ks.push(k);
    }
    let op = Mhmc { b, c, h, w, ks };
    op.geoms()?;
    let same_dtype = weights.iter().chain(biases).all(|t| t.dtype() == x.dtype());
    if densepred_core::ops::dispatch::select(&MULTI_HEAD_MIXED_CONV, x).is_ours() && same_dtype {
        let mut flat = Vec::with_capacity(2 * heads);
        for (wt, bs) in weights.iter().zip(biases) {
            flat.push(wt.flatten_all()?);
            flat.push(bs.flatten_all()?);
        }
        let packed = Tensor::cat(&flat, 0)?;
        return x.contiguous()?.apply_op2(&packed, op);
    }
    composed(x, weights, biases)
}

/// The candle-op composition (narrow per head, depthwise conv, interleave by concatenation).
fn composed(x: &Tensor, weights: &[Tensor], biases: &[Tensor]) -> Result<Tensor> {
    let (b, c, h, w) = x.dims4()?;
    let cg = c / weights.len();
    let outs = weights
        .iter()
        .zip(biases)
        .enumerate()
        .map(|(i, (wt, bs))| {
            let k = wt.dim(2)?;
            densepred_core::ops::depthwise_conv2d(
                &x.narrow(1, i * cg, cg)?,
                wt,
                Some(bs),
                DwConvParams::same(k / 2),
            )?
            .unsqueeze(2)
        })
        .collect::<Result<Vec<_>>>()?;
    Tensor::cat(&outs, 2)?.reshape((b, c, h, w))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn fill(shape: &[usize], std: f64, seed: u64) -> Tensor {
        let n: usize = shape.iter().product();
        let v: Vec<f64> = (0..n)
            .map(|i| {
                let t = ((i as u64 + 3) * 2_654_435_761 + seed * 131) % 10_007;
                (t as f64 / 10_007.0 - 0.5) * 2.0 * std
            })
            .collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    /// The op against the composition of candle ops and our depthwise conv in f64, on a
    /// non-square map smaller than the largest kernel's span in one direction (7x4 with k up to
    /// 9): values, and the gradients of the input and every head's weight and bias. Same sums in
    /// another order: 1e-11 on O(1) values.
    #[test]
    fn matches_composed_ops_f64() {
        let (b, c, h, w, heads) = (2, 8, 7, 4, 4);
        let cg = c / heads;
        let x = Var::from_tensor(&fill(&[b, c, h, w], 1.0, 1)).unwrap();
        let ws: Vec<Var> = (0..heads)
            .map(|i| {
                let k = 3 + 2 * i;
                Var::from_tensor(&fill(&[cg, 1, k, k], 0.3, 10 + i as u64)).unwrap()
            })
            .collect();
        let bs: Vec<Var> = (0..heads)
            .map(|i| Var::from_tensor(&fill(&[cg], 0.5, 20 + i as u64)).unwrap())
            .collect();
        let wt: Vec<Tensor> = ws.iter().map(|v| v.as_tensor().clone()).collect();
        let bt: Vec<Tensor> = bs.iter().map(|v| v.as_tensor().clone()).collect();
        let ours = multi_head_mixed_conv(&x, &wt, &bt).unwrap();
        let reference = composed(&x, &wt, &bt).unwrap();
        let mut all = vec![x.as_tensor().clone()];
        all.extend(wt.iter().cloned());
        all.extend(bt.iter().cloned());
        let all: Vec<&Tensor> = all.iter().collect();
        densepred_testutil::assert_same_values_and_grads(&ours, &reference, &all, 30, 1e-11);
    }

    #[test]
    fn bad_shapes_are_errors() {
        let x = fill(&[1, 6, 5, 5], 1.0, 1);
        let w = vec![fill(&[3, 1, 3, 3], 0.1, 2), fill(&[3, 1, 4, 4], 0.1, 3)];
        let b = vec![fill(&[3], 0.1, 4), fill(&[3], 0.1, 5)];
        let e = multi_head_mixed_conv(&x, &w, &b).unwrap_err();
        assert!(e.to_string().contains("MHMC head 1"), "{e}");
        let e = multi_head_mixed_conv(&x, &w[..1], &b[..1]).unwrap_err();
        assert!(e.to_string().contains("expected (6, 1, k, k)"), "{e}");
    }
}
