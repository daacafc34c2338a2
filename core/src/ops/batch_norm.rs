//! Training-mode batch normalisation as one op.
//!
//! Composed of candle ops, a training BatchNorm keeps ~7 full-size intermediates alive for the
//! backward (transposed copy, centred input, its square, the normalised map, scaled, shifted,
//! transposed back); this op keeps only its input and output, and computes the gradients in one
//! pass per channel. Formulas (Ioffe & Szegedy 2015, §3, PyTorch `native_batch_norm_backward`):
//! `x̂ = (x − μ) / sqrt(σ² + eps)`, `y = γ x̂ + β`, `n` values per channel,
//! `dβ = Σ dy`, `dγ = Σ dy·x̂`, `dx = γ/sqrt(σ² + eps) · (dy − dβ/n − x̂·dγ/n)`.

use candle_core::{CpuStorage, CustomOp1, CustomOp3, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

/// Per-channel batch statistics: `(mean, biased variance)`, accumulated in f64 (two passes).
fn stats<T: num_traits::Float + Send + Sync>(
    x: &[T],
    b: usize,
    c: usize,
    hw: usize,
) -> Vec<(f64, f64)> {
    // Two passes per channel (mean, then squared deviations); each plane is summed in T with
    // vectorised lane accumulators and the plane sums are added in f64.
    (0..c)
        .into_par_iter()
        .map(|ch| {
            let n = (b * hw) as f64;
            let plane = |bi: usize| &x[(bi * c + ch) * hw..][..hw];
            let s: f64 = (0..b)
                .map(|bi| {
                    crate::kernel::reduce::sum(plane(bi))
                        .to_f64()
                        .unwrap_or(0.0)
                })
                .sum();
            let mean = s / n;
            let mt = T::from(mean).unwrap_or(T::zero());
            // Σ(x − m)² about the rounded mean, corrected back to the exact one:
            // Σ(x − mean)² = Σ(x − mt)² − n·(mean − mt)².
            let q: f64 = (0..b)
                .map(|bi| {
                    crate::kernel::reduce::sum_sq_dev(plane(bi), mt)
                        .to_f64()
                        .unwrap_or(0.0)
                })
                .sum();
            let dm = mean - mt.to_f64().unwrap_or(0.0);
            (mean, (q / n - dm * dm).max(0.0))
        })
        .collect()
}

use crate::kernel::SyncPtr;

fn dims(shape: &Shape) -> Result<(usize, usize, usize)> {
    let d = shape.dims();
    if d.len() < 2 {
        candle_core::bail!("batch_norm: expected (B, C, ...), got {d:?}");
    }
    Ok((d[0], d[1], d[2..].iter().product()))
}

/// Sums `buf` elementwise over the processes of a data-parallel run, in place (an all-reduce
/// that every rank calls with the same length, in the same order): the process group of SyncBN,
/// as `torch.distributed`'s default group is for `nn.SyncBatchNorm`.
///
/// Errors: the message of a failed reduction.
pub type AllReduceSum =
    std::sync::Arc<dyn Fn(&mut [f64]) -> std::result::Result<(), String> + Send + Sync>;

/// A SyncBN layer's group and the number of values per channel over all ranks.
#[derive(Clone)]
struct Synced {
    group: AllReduceSum,
    count: f64,
}

/// Forward with precomputed statistics: `(x, γ, β) → y` (then `max(y, 0)` when `relu`).
struct BnTrain {
    /// `(mean, 1 / sqrt(var + eps))` per channel.
    ms: Vec<(f64, f64)>,
    /// Apply ReLU to the output (the backward masks the gradient where the output is 0).
    relu: bool,
    /// SyncBN: the backward sums its per-channel reductions over the group.
    sync: Option<Synced>,
}

fn fwd_kernel<T: num_traits::Float + Send + Sync>(
    x: &[T],
    w: &[T],
    bias: &[T],
    ms: &[(f64, f64)],
    relu: bool,
    c: usize,
    hw: usize,
) -> Vec<T> {
    let mut out = crate::kernel::zeroed(x.len());
    out.par_chunks_mut(hw).enumerate().for_each(|(i, o)| {
        let ch = i % c;
        let (m, r) = ms[ch];
        let a = w[ch].to_f64().unwrap_or(0.0) * r;
        let sh = bias[ch].to_f64().unwrap_or(0.0) - m * a;
        let (a, sh) = (
            T::from(a).unwrap_or(T::zero()),
            T::from(sh).unwrap_or(T::zero()),
        );
        let xs = &x[i * hw..][..hw];
        if relu {
            o.iter_mut()
                .zip(xs)
                .for_each(|(o, &v)| *o = (v * a + sh).max(T::zero()));
        } else {
            o.iter_mut().zip(xs).for_each(|(o, &v)| *o = v * a + sh);
        }
    });
    out
}

impl CustomOp3 for BnTrain {
    fn name(&self) -> &'static str {
        "batch-norm-train"
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
        let (_, c, hw) = dims(l1.shape())?;
        let what = "batch_norm";
        let out = crate::cpu_float!(what; x = (s1, l1), w = (s2, l2), b = (s3, l3) =>
            fwd_kernel(x, w, b, &self.ms, self.relu, c, hw));
        Ok((out, l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _b: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (bsz, c, hw) = dims(x.shape())?;
        let n = bsz * c * hw;
        let wv: Vec<f64> = w.to_dtype(candle_core::DType::F64)?.to_vec1()?;
        let grad = grad.contiguous()?;
        // Without ReLU the third input is unused: pass the gradient again (no copy).
        let mask = if self.relu {
            res.detach().contiguous()?
        } else {
            grad.clone()
        };
        let packed = x.detach().contiguous()?.apply_op3_no_bwd(
            &grad,
            &mask,
            &BnTrainBwd {
                ms: self.ms.clone(),
                w: wv,
                relu: self.relu,
                sync: self.sync.clone(),
            },
        )?;
        let gx = packed.narrow(0, 0, n)?.reshape(x.shape())?;
        let gw = packed.narrow(0, n, c)?;
        let gb = packed.narrow(0, n + c, c)?;
        Ok((Some(gx), Some(gw), Some(gb)))
    }
}

/// `(x, dy, y) → [dx (flat), dγ (C), dβ (C)]`; with `relu`, `dy` counts only where the output
/// `y` is positive (the ReLU's derivative; `y` is unused otherwise).
struct BnTrainBwd {
    ms: Vec<(f64, f64)>,
    w: Vec<f64>,
    relu: bool,
    sync: Option<Synced>,
}

/// `(Σ g, Σ g·(x − m))` of channel `ch` over the batch (`g` = `dy` masked by the fused ReLU's
/// output `y`), each plane in T with lane accumulators, added up in f64.
#[allow(clippy::too_many_arguments)]
fn channel_sums<T: num_traits::Float>(
    x: &[T],
    dy: &[T],
    y: Option<&[T]>,
    m: f64,
    b: usize,
    c: usize,
    hw: usize,
    ch: usize,
) -> (f64, f64) {
    let mt = T::from(m).unwrap_or(T::zero());
    let (mut sdy, mut sdxm) = (0f64, 0f64);
    for bi in 0..b {
        let off = (bi * c + ch) * hw;
        let (xs, ds) = (&x[off..off + hw], &dy[off..off + hw]);
        let (a, bsum) = masked_sums(xs, ds, y.map(|y| &y[off..off + hw]), mt);
        sdy += a.to_f64().unwrap_or(0.0);
        sdxm += bsum.to_f64().unwrap_or(0.0);
    }
    (sdy, sdxm)
}

/// `dx` of channel `ch` from the sums of [`channel_sums`] over `cnt` values per channel:
/// `dx = k·(g − Σg/cnt − x̂·Σg·x̂/cnt)`, `k = γ·r`, written as `k·g + c1·(x − m) + c0`.
///
/// # Safety
/// `out` must hold `b·c·hw` elements and no other task may write channel `ch`'s planes.
#[allow(clippy::too_many_arguments)]
unsafe fn channel_dx<T: num_traits::Float>(
    out: SyncPtr<T>,
    x: &[T],
    dy: &[T],
    y: Option<&[T]>,
    (m, r): (f64, f64),
    w: f64,
    (sdy, sdxm, cnt): (f64, f64, f64),
    (b, c, hw, ch): (usize, usize, usize, usize),
) {
    let mt = T::from(m).unwrap_or(T::zero());
    let sdyx = sdxm * r;
    let k = w * r;
    let (mdy, mdyx) = (sdy / cnt, sdyx / cnt);
    let kt = T::from(k).unwrap_or(T::zero());
    let c1 = T::from(-k * r * mdyx).unwrap_or(T::zero());
    let c0 = T::from(-k * mdy).unwrap_or(T::zero());
    for bi in 0..b {
        let off = (bi * c + ch) * hw;
        // SAFETY: the caller gives this task channel `ch`, whose planes start at
        // (bi*c+ch)*hw in every image.
        let o = unsafe { std::slice::from_raw_parts_mut(out.get().add(off), hw) };
        let (xs, ds) = (&x[off..off + hw], &dy[off..off + hw]);
        match y {
            Some(y) => {
                for (((o, &xv), &dv), &yv) in o.iter_mut().zip(xs).zip(ds).zip(&y[off..]) {
                    let g = if yv > T::zero() { dv } else { T::zero() };
                    *o = kt * g + c1 * (xv - mt) + c0;
                }
            }
            None => {
                for ((o, &xv), &dv) in o.iter_mut().zip(xs).zip(ds) {
                    *o = kt * dv + c1 * (xv - mt) + c0;
                }
            }
        }
    }
}

/// `[dx (flat), dγ (C), dβ (C)]`. One process: one parallel pass per channel (sums, then `dx`
/// while the channel is in cache). SyncBN: the sums of every channel first, summed over the
/// group with the global count, then `dx` (PyTorch's `batch_norm_backward_reduce` + all-reduce +
/// `batch_norm_backward_elemt`); `dγ`, `dβ` stay this rank's (the data-parallel gradient
/// averaging combines them).
///
/// Errors: a failed reduction.
#[allow(clippy::too_many_arguments)]
fn bwd_kernel<T: num_traits::Float + Send + Sync>(
    x: &[T],
    dy: &[T],
    y: Option<&[T]>,
    ms: &[(f64, f64)],
    w: &[f64],
    sync: Option<&Synced>,
    b: usize,
    c: usize,
    hw: usize,
) -> Result<Vec<T>> {
    let n = b * c * hw;
    let mut out = crate::kernel::zeroed::<T>(n + 2 * c);
    let ptr = SyncPtr(out.as_mut_ptr());
    let dims = (b, c, hw);
    let per: Vec<(f64, f64)> = match sync {
        None => (0..c)
            .into_par_iter()
            .map(|ch| {
                let (sdy, sdxm) = channel_sums(x, dy, y, ms[ch].0, b, c, hw, ch);
                let cnt = (b * hw) as f64;
                // SAFETY: one task per channel; `out` outlives the parallel loop.
                unsafe {
                    channel_dx(
                        ptr,
                        x,
                        dy,
                        y,
                        ms[ch],
                        w[ch],
                        (sdy, sdxm, cnt),
                        (b, c, hw, ch),
                    )
                };
                (sdxm * ms[ch].1, sdy)
            })
            .collect(),
        Some(s) => {
            let local: Vec<(f64, f64)> = (0..c)
                .into_par_iter()
                .map(|ch| channel_sums(x, dy, y, ms[ch].0, b, c, hw, ch))
                .collect();
            let mut buf: Vec<f64> = local.iter().flat_map(|&(a, bb)| [a, bb]).collect();
            (s.group)(&mut buf)
                .map_err(|e| candle_core::Error::Msg(format!("SyncBN backward: {e}")))?;
            (0..c).into_par_iter().for_each(|ch| {
                let sums = (buf[2 * ch], buf[2 * ch + 1], s.count);
                // SAFETY: one task per channel; `out` outlives the parallel loop.
                unsafe {
                    channel_dx(
                        ptr,
                        x,
                        dy,
                        y,
                        ms[ch],
                        w[ch],
                        sums,
                        (dims.0, dims.1, dims.2, ch),
                    )
                };
            });
            local
                .iter()
                .zip(ms)
                .map(|(&(sdy, sdxm), &(_, r))| (sdxm * r, sdy))
                .collect()
        }
    };
    for (ch, (gw, gb)) in per.into_iter().enumerate() {
        out[n + ch] = T::from(gw).unwrap_or(T::zero());
        out[n + c + ch] = T::from(gb).unwrap_or(T::zero());
    }
    Ok(out)
}

/// `(Σ g, Σ g·(x − m))` over one plane, `g = dy` masked to `y > 0` when `y` is given (the fused
/// ReLU's output), with 8 lane accumulators so that the loop vectorises.
fn masked_sums<T: num_traits::Float>(x: &[T], dy: &[T], y: Option<&[T]>, m: T) -> (T, T) {
    const L: usize = 8;
    let (mut a, mut bb) = ([T::zero(); L], [T::zero(); L]);
    let n = x.len().min(dy.len());
    let full = n / L * L;
    let g = |j: usize| match y {
        Some(y) if y[j] <= T::zero() => T::zero(),
        _ => dy[j],
    };
    match y {
        Some(y) => {
            for j0 in (0..full).step_by(L) {
                for i in 0..L {
                    let j = j0 + i;
                    let gv = if y[j] > T::zero() { dy[j] } else { T::zero() };
                    a[i] = a[i] + gv;
                    bb[i] = bb[i] + gv * (x[j] - m);
                }
            }
        }
        None => {
            for j0 in (0..full).step_by(L) {
                for i in 0..L {
                    let j = j0 + i;
                    a[i] = a[i] + dy[j];
                    bb[i] = bb[i] + dy[j] * (x[j] - m);
                }
            }
        }
    }
    let (mut sa, mut sb) = (T::zero(), T::zero());
    for i in 0..L {
        sa = sa + a[i];
        sb = sb + bb[i];
    }
    for j in full..n {
        let gv = g(j);
        sa = sa + gv;
        sb = sb + gv * (x[j] - m);
    }
    (sa, sb)
}

impl CustomOp3 for BnTrainBwd {
    fn name(&self) -> &'static str {
        "batch-norm-train-bwd"
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
        let (b, c, hw) = dims(l1.shape())?;
        let what = "batch_norm backward";
        let relu = self.relu;
        let out = crate::cpu_float!(what; x = (s1, l1), g = (s2, l2), y = (s3, l3) =>
            bwd_kernel(x, g, relu.then_some(y), &self.ms, &self.w, self.sync.as_ref(), b, c, hw)?);
        Ok((out, Shape::from(b * c * hw + 2 * c)))
    }
}

/// Batch statistics of `(B, C, ...)` as a `(2, C)` f64 tensor would be; returned as a vector.
struct Stats;

impl CustomOp1 for Stats {
    fn name(&self) -> &'static str {
        "batch-norm-stats"
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (b, c, hw) = dims(l.shape())?;
        let st = crate::cpu_float!(raw "batch_norm"; x = (s, l) => stats(x, b, c, hw));
        let mut v: Vec<f64> = st.iter().map(|s| s.0).collect();
        v.extend(st.iter().map(|s| s.1));
        Ok((CpuStorage::F64(v), Shape::from((2, c))))
    }
}

/// Training-mode BatchNorm of `x` `(B, C, ...)` (any trailing dims, NCHW for 2-D maps) with the
/// batch statistics, `torch.nn.functional.batch_norm(training=True)`: returns
/// `(y, mean, var)` with `y` the shape of `x`, and the per-channel `mean` and biased `var` as
/// `(C,)` f64 vectors (for the running-statistics update). Differentiable in `x`, `weight` and
/// `bias` (all `(C,)`).
///
/// Errors: rank < 2, non-float or mixed dtypes, parameters of another length than `C`, fewer
/// than two values per channel.
pub fn batch_norm_train(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    eps: f64,
) -> Result<(Tensor, Vec<f64>, Vec<f64>)> {
    let (y, m, v, _) = batch_norm_train_synced(x, weight, bias, eps, false, None)?;
    Ok((y, m, v))
}

/// [`batch_norm_train`] followed by ReLU as one op (mmcv's `ConvModule` norm + activation):
/// `max(BN(x), 0)`. Keeps only `x` and the output for the backward, where the composition keeps
/// the normalised map too (PyTorch's in-place ReLU saves the same tensor). The gradient is the
/// composition's: zero where the output is 0.
///
/// Errors: as [`batch_norm_train`].
pub fn batch_norm_relu_train(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    eps: f64,
) -> Result<(Tensor, Vec<f64>, Vec<f64>)> {
    let (y, m, v, _) = batch_norm_train_synced(x, weight, bias, eps, true, None)?;
    Ok((y, m, v))
}

/// [`batch_norm_train`] (`relu = false`) or [`batch_norm_relu_train`] (`relu = true`), with the
/// statistics of the whole data-parallel batch when `group` is given (SyncBN, PyTorch's
/// `nn.SyncBatchNorm`): each rank's per-channel mean and variance are combined over the group
/// (sums of `n·mean`, then of `n·var + n·(mean_r − mean)²`, exact for unequal counts), and the
/// backward sums `Σ dy` and `Σ dy·x̂` over the group before computing `dx`. Returns `(y, mean,
/// var, count)` with `count` the values per channel over all ranks (for the unbiased running
/// variance). With `group = None` it is the one-process op.
///
/// Errors: as [`batch_norm_train`]; a failed reduction; a group on a device or dtype without our
/// kernel (SyncBN across ranks runs on the CPU, f32/f64).
pub fn batch_norm_train_synced(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    eps: f64,
    relu: bool,
    group: Option<&AllReduceSum>,
) -> Result<(Tensor, Vec<f64>, Vec<f64>, f64)> {
    let (b, c, hw) = dims(x.shape())?;
    if weight.elem_count() != c || bias.elem_count() != c {
        candle_core::bail!(
            "batch_norm: weight {:?} / bias {:?} do not match {c} channels",
            weight.dims(),
            bias.dims()
        );
    }
    let local = (b * hw) as f64;
    // SyncBN checks the count over all ranks, once it is known.
    if b * hw < 2 && group.is_none() {
        candle_core::bail!(
            "batch_norm: training needs more than one value per channel, got input {:?}",
            x.dims()
        );
    }
    if !super::dispatch::select(&super::dispatch::BATCH_NORM_TRAIN_SYNCED, x).is_ours() {
        if group.is_some() {
            candle_core::bail!(
                "SyncBN across ranks runs on our CPU kernel (f32/f64), not on {:?} {:?}",
                x.device(),
                x.dtype()
            );
        }
        let (y, m, v) = composed(x, weight, bias, eps, relu)?;
        return Ok((y, m, v, local));
    }
    let x = x.contiguous()?;
    let st = x.detach().apply_op1_no_bwd(&Stats)?.to_vec2::<f64>()?;
    let (mut mean, mut var) = (st[0].clone(), st[1].clone());
    let mut sync = None;
    if let Some(g) = group {
        let reduce = |buf: &mut [f64]| {
            g(buf).map_err(|e| candle_core::Error::Msg(format!("SyncBN statistics: {e}")))
        };
        let mut sums: Vec<f64> = mean.iter().map(|m| m * local).collect();
        sums.push(local);
        reduce(&mut sums)?;
        let count = sums[c];
        if count < 2.0 {
            candle_core::bail!(
                "SyncBN: training needs more than one value per channel over all ranks, got \
                 input {:?} here and {count} values in all",
                x.dims()
            );
        }
        let global: Vec<f64> = sums[..c].iter().map(|s| s / count).collect();
        let mut m2: Vec<f64> = (0..c)
            .map(|i| local * var[i] + local * (mean[i] - global[i]).powi(2))
            .collect();
        reduce(&mut m2)?;
        var = m2.iter().map(|s| s / count).collect();
        mean = global;
        sync = Some(Synced {
            group: g.clone(),
            count,
        });
    }
    let count = sync.as_ref().map_or(local, |s| s.count);
    let ms = mean
        .iter()
        .zip(&var)
        .map(|(&m, &v)| (m, 1.0 / (v + eps).sqrt()))
        .collect();
    let y = x.apply_op3(
        &weight.contiguous()?,
        &bias.contiguous()?,
        BnTrain { ms, relu, sync },
    )?;
    Ok((y, mean, var, count))
}

/// Training-mode batch norm from candle ops (the statistics are part of the graph, as in
/// PyTorch's composite): the path on devices without a kernel of ours, tested against the op.
fn composed(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    eps: f64,
    relu: bool,
) -> Result<(Tensor, Vec<f64>, Vec<f64>)> {
    let (b, c, hw) = dims(x.shape())?;
    let x3 = x.reshape((b, c, hw))?;
    let mean = x3.mean_keepdim(2)?.mean_keepdim(0)?; // (1, C, 1)
    let centred = x3.broadcast_sub(&mean)?;
    let var = centred.sqr()?.mean_keepdim(2)?.mean_keepdim(0)?; // biased
    let inv = (var.clone() + eps)?.sqrt()?.recip()?;
    let y = centred
        .broadcast_mul(&inv)?
        .broadcast_mul(&weight.reshape((1, c, 1))?)?
        .broadcast_add(&bias.reshape((1, c, 1))?)?;
    let y = if relu { y.relu()? } else { y };
    let stat = |t: &Tensor| -> Result<Vec<f64>> {
        t.detach()
            .flatten_all()?
            .to_dtype(DType::F64)?
            .to_device(&candle_core::Device::Cpu)?
            .to_vec1()
    };
    Ok((y.reshape(x.shape())?, stat(&mean)?, stat(&var)?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Var, D};

    /// Values in [-1, 3) (a positive mean, as activations before a norm often have).
    fn randn(shape: &[usize], seed: u64) -> Tensor {
        ((densepred_testutil::randn(shape, seed, DType::F64) * 2.0).unwrap() + 1.0).unwrap()
    }

    /// Values, statistics and gradients equal the textbook composition in f64 (1e-10).
    #[test]
    fn matches_composed_batch_norm() {
        let x = Var::from_tensor(&randn(&[3, 4, 5, 2], 1)).unwrap();
        let w = Var::from_tensor(&randn(&[4], 2)).unwrap();
        let b = Var::from_tensor(&randn(&[4], 3)).unwrap();
        let eps = 1e-5;
        let (y, mean, var) = batch_norm_train(&x, &w, &b, eps).unwrap();
        let xt = x
            .transpose(0, 1)
            .unwrap()
            .contiguous()
            .unwrap()
            .reshape((4, 30))
            .unwrap();
        let m = xt.mean_keepdim(D::Minus1).unwrap();
        let xc = xt.broadcast_sub(&m).unwrap();
        let v = xc.sqr().unwrap().mean_keepdim(D::Minus1).unwrap();
        let r = xc
            .broadcast_div(&(&v + eps).unwrap().sqrt().unwrap())
            .unwrap()
            .broadcast_mul(&w.reshape((4, 1)).unwrap())
            .unwrap()
            .broadcast_add(&b.reshape((4, 1)).unwrap())
            .unwrap()
            .reshape((4, 3, 5, 2))
            .unwrap()
            .transpose(0, 1)
            .unwrap();
        let err = |a: &Tensor, b: &Tensor| densepred_testutil::max_abs(&a, &b);
        assert!(err(&y, &r) < 1e-10);
        let mv: Vec<f64> = m.flatten_all().unwrap().to_vec1().unwrap();
        let vv: Vec<f64> = v.flatten_all().unwrap().to_vec1().unwrap();
        for i in 0..4 {
            assert!((mean[i] - mv[i]).abs() < 1e-12 && (var[i] - vv[i]).abs() < 1e-12);
        }
        densepred_testutil::assert_same_values_and_grads(&y, &r, &[&x, &w, &b], 4, 1e-10);
    }

    /// The fused BN + ReLU equals `relu(batch_norm_train(..))` in value and in every gradient
    /// (f64, 1e-12: the same arithmetic, masked), with about half the outputs clamped to 0.
    #[test]
    fn relu_variant_matches_batch_norm_then_relu() {
        let x = Var::from_tensor(&randn(&[2, 3, 4, 5], 11)).unwrap();
        let w = Var::from_tensor(&randn(&[3], 12)).unwrap();
        let b = Var::from_tensor(&(randn(&[3], 13) * 0.1).unwrap()).unwrap();
        let (y, mean, var) = batch_norm_relu_train(&x, &w, &b, 1e-5).unwrap();
        let (r, mean_r, var_r) = batch_norm_train(&x, &w, &b, 1e-5).unwrap();
        let r = r.relu().unwrap();
        assert_eq!((mean, var), (mean_r, var_r));
        let yv: Vec<f64> = y.flatten_all().unwrap().to_vec1().unwrap();
        let zeros = yv.iter().filter(|v| **v == 0.0).count();
        assert!(zeros > yv.len() / 4 && zeros < yv.len() * 3 / 4, "{zeros}");
        densepred_testutil::assert_same_values_and_grads(&y, &r, &[&x, &w, &b], 14, 1e-12);
    }

    /// The f32 kernels (plane sums in f32 lanes, added in f64) agree with the f64 ones on
    /// SMT-sized planes (2 images of 56×56, values offset by 3 so that the mean matters): values,
    /// statistics and gradients within 2e-5 relative to each tensor's largest magnitude (f32
    /// rounding of sums over ~6k elements).
    #[test]
    fn f32_kernels_agree_with_f64_on_large_planes() {
        let x64 = (randn(&[2, 3, 56, 56], 31) + 3.0).unwrap();
        let w64 = randn(&[3], 32);
        let b64 = randn(&[3], 33);
        let proj = randn(&[2, 3, 56, 56], 34);
        let run = |dt: DType| {
            let x = Var::from_tensor(&x64.to_dtype(dt).unwrap()).unwrap();
            let w = Var::from_tensor(&w64.to_dtype(dt).unwrap()).unwrap();
            let b = Var::from_tensor(&b64.to_dtype(dt).unwrap()).unwrap();
            let (y, mean, var) = batch_norm_relu_train(&x, &w, &b, 1e-5).unwrap();
            let g = (&y * proj.to_dtype(dt).unwrap())
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            let f = |t: &Tensor| t.to_dtype(DType::F64).unwrap();
            let grads = [&x, &w, &b].map(|v| f(g.get(v).unwrap()));
            (f(&y), mean, var, grads)
        };
        let (y32, m32, v32, g32) = run(DType::F32);
        let (y64, m64, v64, g64) = run(DType::F64);
        let rel = |a: &Tensor, b: &Tensor| {
            let scale = densepred_testutil::max_abs_value(&b);
            let d = (a - b).unwrap().abs().unwrap().max_all().unwrap();
            d.to_scalar::<f64>().unwrap() / scale.max(1e-30)
        };
        assert!(rel(&y32, &y64) < 2e-5, "values {}", rel(&y32, &y64));
        for i in 0..3 {
            assert!((m32[i] - m64[i]).abs() < 2e-5 * m64[i].abs());
            assert!((v32[i] - v64[i]).abs() < 2e-5 * v64[i]);
        }
        for (a, b) in g32.iter().zip(&g64) {
            assert!(rel(a, b) < 2e-5, "gradient {:?}: {}", b.dims(), rel(a, b));
        }
    }

    #[test]
    fn rejects_single_value_per_channel() {
        let x = randn(&[1, 2, 1, 1], 1);
        let w = randn(&[2], 2);
        assert!(batch_norm_train(&x, &w, &w, 1e-5).is_err());
    }

    /// The composed fallback (other devices) equals the op in values, statistics and gradients
    /// (f64, 1e-10: summation order only).
    #[test]
    fn composed_fallback_matches_op() {
        for relu in [false, true] {
            let x = Var::from_tensor(&randn(&[3, 4, 5, 2], 11)).unwrap();
            let w = Var::from_tensor(&randn(&[4], 12)).unwrap();
            let b = Var::from_tensor(&randn(&[4], 13)).unwrap();
            let (y1, m1, v1, _) = batch_norm_train_synced(&x, &w, &b, 1e-5, relu, None).unwrap();
            let (y2, m2, v2) = composed(&x, &w, &b, 1e-5, relu).unwrap();
            let err = |a: &Tensor, b: &Tensor| densepred_testutil::max_abs(&a, &b);
            assert!(err(&y1, &y2) < 1e-10);
            for (a, b) in m1.iter().zip(&m2).chain(v1.iter().zip(&v2)) {
                assert!((a - b).abs() < 1e-10);
            }
            densepred_testutil::assert_same_values_and_grads(&y1, &y2, &[&x, &w, &b], 14, 1e-10);
        }
    }
}
