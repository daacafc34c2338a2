//! Separable linear resampling of NCHW maps with a backward pass: bilinear resize
//! (`F.interpolate(mode="bilinear")`) and adaptive average pooling (`F.adaptive_avg_pool2d`).
//!
//! Both are `Y = A_h · X · A_wᵀ` per plane with sparse per-axis matrices, so one kernel applies
//! them and its transpose gives the gradient. candle 0.11 has a bilinear forward but its backward
//! errors, and no adaptive pooling; UperNet's PPM and every segmentation head need both.

use candle_core::{CpuStorage, CustomOp1, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

/// For each output index along one axis, the input taps and their weights.
type Taps = Vec<Vec<(usize, f64)>>;

/// PyTorch's `upsample_bilinear2d` taps along one axis (`area_pixel_compute_source_index`, float
/// arithmetic as for float32 inputs): `align_corners = false` maps output `d` to
/// `max(0, (d + 0.5) · in/out − 0.5)`; `true` maps it to `d · (in − 1)/(out − 1)`.
fn bilinear_taps(inp: usize, out: usize, align_corners: bool) -> Taps {
    let scale: f32 = if align_corners {
        if out > 1 {
            (inp as f32 - 1.0) / (out as f32 - 1.0)
        } else {
            0.0
        }
    } else {
        inp as f32 / out as f32
    };
    (0..out)
        .map(|d| {
            let src = if align_corners {
                scale * d as f32
            } else {
                (scale * (d as f32 + 0.5) - 0.5).max(0.0)
            };
            let i0 = (src as usize).min(inp - 1);
            let i1 = if i0 < inp - 1 { i0 + 1 } else { i0 };
            let l1 = src - i0 as f32;
            let l0 = 1.0 - l1;
            if i1 == i0 {
                vec![(i0, (l0 + l1) as f64)]
            } else {
                vec![(i0, l0 as f64), (i1, l1 as f64)]
            }
        })
        .collect()
}

/// `adaptive_avg_pool` bins along one axis: output `i` averages inputs
/// `[floor(i·in/out), ceil((i+1)·in/out))` (bins overlap, or repeat inputs, when `out > in`).
fn adaptive_taps(inp: usize, out: usize) -> Taps {
    (0..out)
        .map(|i| {
            let s = (i * inp) / out;
            let e = ((i + 1) * inp).div_ceil(out);
            let w = 1.0 / (e - s) as f64;
            (s..e).map(|j| (j, w)).collect()
        })
        .collect()
}

pub(crate) struct Resample {
    /// Taps of each output row / column.
    th: Taps,
    tw: Taps,
    /// Input height and width.
    h: usize,
    w: usize,
    name: &'static str,
}

impl Resample {
    /// A bilinear resampler from `(h, w)` planes to `(oh, ow)` (see [`resize_bilinear`]).
    pub(crate) fn bilinear(h: usize, w: usize, oh: usize, ow: usize, align_corners: bool) -> Self {
        Self {
            th: bilinear_taps(h, oh, align_corners),
            tw: bilinear_taps(w, ow, align_corners),
            h,
            w,
            name: "resize-bilinear",
        }
    }

    /// The same resampling from candle ops, `A_h · X · A_wᵀ` with dense `(oh, h)` and `(ow, w)`
    /// matrices on the device of `x` `(B, C, h, w)` (the path where our kernel does not run;
    /// candle's `upsample_bilinear2d` has no backward).
    fn composed(&self, x: &Tensor) -> Result<Tensor> {
        let dense = |taps: &Taps, inp: usize| -> Result<Tensor> {
            let mut m = vec![0f64; taps.len() * inp];
            for (o, t) in taps.iter().enumerate() {
                for &(i, wt) in t {
                    m[o * inp + i] += wt;
                }
            }
            Tensor::from_vec(m, (taps.len(), inp), x.device())?.to_dtype(x.dtype())
        };
        let ah = dense(&self.th, self.h)?;
        let aw_t = dense(&self.tw, self.w)?.t()?;
        ah.broadcast_matmul(&x.broadcast_matmul(&aw_t)?)
    }

    /// `(planes, h, w)` → `(planes, oh, ow)`.
    pub(crate) fn forward<T: num_traits::Float + Send + Sync>(
        &self,
        x: &[T],
        planes: usize,
    ) -> Vec<T> {
        let (h, w, oh, ow) = (self.h, self.w, self.th.len(), self.tw.len());
        let mut out = vec![T::zero(); planes * oh * ow];
        out.par_chunks_mut(oh * ow).enumerate().for_each(|(p, o)| {
            let src = &x[p * h * w..][..h * w];
            // Along W first: (h, ow).
            let mut tmp = vec![T::zero(); h * ow];
            for y in 0..h {
                let row = &src[y * w..][..w];
                for (xo, taps) in self.tw.iter().enumerate() {
                    let mut acc = T::zero();
                    for &(j, wt) in taps {
                        acc = acc + row[j] * T::from(wt).unwrap_or(T::zero());
                    }
                    tmp[y * ow + xo] = acc;
                }
            }
            for (yo, taps) in self.th.iter().enumerate() {
                let orow = &mut o[yo * ow..][..ow];
                for &(i, wt) in taps {
                    let wt = T::from(wt).unwrap_or(T::zero());
                    for (ov, &tv) in orow.iter_mut().zip(&tmp[i * ow..][..ow]) {
                        *ov = *ov + tv * wt;
                    }
                }
            }
        });
        out
    }

    /// The transpose of [`Self::forward`]: `(planes, oh, ow)` gradients → `(planes, h, w)`.
    pub(crate) fn backward<T: num_traits::Float + Send + Sync>(
        &self,
        g: &[T],
        planes: usize,
    ) -> Vec<T> {
        let (h, w, oh, ow) = (self.h, self.w, self.th.len(), self.tw.len());
        let mut out = vec![T::zero(); planes * h * w];
        out.par_chunks_mut(h * w).enumerate().for_each(|(p, o)| {
            let gp = &g[p * oh * ow..][..oh * ow];
            let mut tmp = vec![T::zero(); h * ow];
            for (yo, taps) in self.th.iter().enumerate() {
                for &(i, wt) in taps {
                    let wt = T::from(wt).unwrap_or(T::zero());
                    for (tv, &gv) in tmp[i * ow..][..ow].iter_mut().zip(&gp[yo * ow..][..ow]) {
                        *tv = *tv + gv * wt;
                    }
                }
            }
            for y in 0..h {
                let orow = &mut o[y * w..][..w];
                for (xo, taps) in self.tw.iter().enumerate() {
                    let gv = tmp[y * ow + xo];
                    for &(j, wt) in taps {
                        orow[j] = orow[j] + gv * T::from(wt).unwrap_or(T::zero());
                    }
                }
            }
        });
        out
    }
}

/// The backward as its own op (no further gradient).
struct ResampleBwd<'a>(&'a Resample);

impl CustomOp1 for ResampleBwd<'_> {
    fn name(&self) -> &'static str {
        "resample-backward"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (b, c, _, _) = l.shape().dims4()?;
        let r = self.0;
        let what = "resample backward";
        let out = crate::cpu_float!(what; g = (s, l) => r.backward(g, b * c));
        Ok((out, Shape::from((b, c, r.h, r.w))))
    }
}

impl CustomOp1 for Resample {
    fn name(&self) -> &'static str {
        self.name
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (b, c, h, w) = l.shape().dims4()?;
        if (h, w) != (self.h, self.w) {
            candle_core::bail!(
                "{}: built for {}x{}, got {h}x{w}",
                self.name,
                self.h,
                self.w
            );
        }
        let out = crate::cpu_float!(self.name; x = (s, l) => self.forward(x, b * c));
        Ok((out, Shape::from((b, c, self.th.len(), self.tw.len()))))
    }

    fn bwd(&self, _x: &Tensor, _res: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(g.contiguous()?.apply_op1_no_bwd(&ResampleBwd(self))?))
    }
}

fn check(x: &Tensor, oh: usize, ow: usize, what: &str) -> Result<(usize, usize)> {
    let (_, _, h, w) = x.dims4()?;
    if oh == 0 || ow == 0 || h == 0 || w == 0 {
        candle_core::bail!("{what}: empty size (input {h}x{w}, output {oh}x{ow})");
    }
    if !matches!(x.dtype(), DType::F32 | DType::F64) {
        candle_core::bail!("{what}: expected f32/f64, got {:?}", x.dtype());
    }
    Ok((h, w))
}

/// Bilinear resize of `x` `(B, C, H, W)` to `(B, C, oh, ow)`, `F.interpolate(size=(oh, ow),
/// mode="bilinear", align_corners=...)` semantics (half-pixel centres with the source clamped at
/// 0 when `align_corners` is false, as mmseg's `resize` calls it); differentiable.
///
/// Errors: a non-4-D or non-float input, or an empty input/output size.
pub fn resize_bilinear(x: &Tensor, oh: usize, ow: usize, align_corners: bool) -> Result<Tensor> {
    let (h, w) = check(x, oh, ow, "resize_bilinear")?;
    if (h, w) == (oh, ow) {
        return Ok(x.clone());
    }
    let r = Resample::bilinear(h, w, oh, ow, align_corners);
    if !super::dispatch::select(&super::dispatch::RESIZE_BILINEAR, x).is_ours() {
        return r.composed(x);
    }
    x.contiguous()?.apply_op1(r)
}

/// The adjoint (backward) of [`resize_bilinear`] from `(h, w)` to the size of `g`: gradients
/// `g (B, C, OH, OW)` → `(B, C, h, w)`; not differentiable itself. CPU, f32/f64.
///
/// Errors: a non-4-D or non-float gradient, an empty size.
pub(crate) fn resize_bilinear_adjoint(
    g: &Tensor,
    h: usize,
    w: usize,
    align_corners: bool,
) -> Result<Tensor> {
    let (oh, ow) = check(g, h, w, "resize_bilinear backward")?;
    let r = Resample::bilinear(h, w, oh, ow, align_corners);
    g.contiguous()?.apply_op1_no_bwd(&ResampleBwd(&r))
}

/// `a + resize_bilinear(x, H, W)` for `a (B, C, H, W)` and a smaller (or equal) `x (B, C, h, w)`,
/// as one op: the resized `x` is not kept for the backward (an FPN top-down step,
/// `laterals[i-1] + resize(laterals[i])`). Equal to the two ops in value and gradients.
///
/// Errors: batch/channel mismatch, a non-float input, the [`resize_bilinear`] errors.
pub fn add_resized(a: &Tensor, x: &Tensor, align_corners: bool) -> Result<Tensor> {
    let (b, c, oh, ow) = a.dims4()?;
    let (xb, xc, h, w) = x.dims4()?;
    if (b, c) != (xb, xc) || a.dtype() != x.dtype() {
        candle_core::bail!(
            "add_resized: {:?} {:?} and {:?} {:?} differ in batch, channels or dtype",
            a.dims(),
            a.dtype(),
            x.dims(),
            x.dtype()
        );
    }
    if (h, w) == (oh, ow) || !super::dispatch::select(&super::dispatch::ADD_RESIZED, a).is_ours() {
        return a + resize_bilinear(x, oh, ow, align_corners)?;
    }
    check(x, oh, ow, "add_resized")?;
    a.contiguous()?.apply_op2(
        &x.contiguous()?,
        AddResized {
            r: Resample::bilinear(h, w, oh, ow, align_corners),
            align_corners,
        },
    )
}

struct AddResized {
    r: Resample,
    align_corners: bool,
}

impl candle_core::CustomOp2 for AddResized {
    fn name(&self) -> &'static str {
        "add-resized"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (b, c, _, _) = l2.shape().dims4()?;
        fn add<T: num_traits::Float + Send + Sync>(a: &[T], up: Vec<T>) -> Vec<T> {
            let mut up = up;
            up.par_iter_mut().zip(a).for_each(|(u, &a)| *u = a + *u);
            up
        }
        let what = "add_resized";
        let out =
            crate::cpu_float!(what; a = (s1, l1), x = (s2, l2) => add(a, self.r.forward(x, b * c)));
        Ok((out, l1.shape().clone()))
    }

    fn bwd(
        &self,
        _a: &Tensor,
        x: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (_, _, h, w) = x.dims4()?;
        let g = g.detach();
        let gx = resize_bilinear_adjoint(&g, h, w, self.align_corners)?;
        Ok((Some(g), Some(gx)))
    }
}

/// Adaptive average pooling of `x` `(B, C, H, W)` to `(B, C, oh, ow)`,
/// `torch.nn.AdaptiveAvgPool2d((oh, ow))`: output `(i, j)` averages rows
/// `[⌊i·H/oh⌋, ⌈(i+1)·H/oh⌉)` × columns likewise (an output larger than the input repeats
/// inputs through overlapping bins); differentiable.
///
/// Errors: a non-4-D or non-float input, an empty size.
pub fn adaptive_avg_pool2d(x: &Tensor, oh: usize, ow: usize) -> Result<Tensor> {
    let (h, w) = check(x, oh, ow, "adaptive_avg_pool2d")?;
    let r = Resample {
        th: adaptive_taps(h, oh),
        tw: adaptive_taps(w, ow),
        h,
        w,
        name: "adaptive-avg-pool2d",
    };
    if !super::dispatch::select(&super::dispatch::ADAPTIVE_AVG_POOL2D, x).is_ours() {
        return r.composed(x);
    }
    x.contiguous()?.apply_op1(r)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn adaptive_bins_follow_pytorch() {
        // 4 -> 6 (PPM scale 6 on a 4-row map): starts floor(i*4/6), ends ceil((i+1)*4/6).
        let t = adaptive_taps(4, 6);
        let spans: Vec<(usize, usize)> = t.iter().map(|v| (v[0].0, v[v.len() - 1].0 + 1)).collect();
        assert_eq!(spans, vec![(0, 1), (0, 2), (1, 2), (2, 3), (2, 4), (3, 4)]);
    }

    #[test]
    fn identity_sizes_and_bad_input() {
        let x = Tensor::ones((1, 2, 3, 4), DType::F32, &Device::Cpu).unwrap();
        let y = resize_bilinear(&x, 3, 4, false).unwrap();
        assert_eq!(y.dims(), &[1, 2, 3, 4]);
        assert!(resize_bilinear(&x, 0, 4, false).is_err());
        let xi = Tensor::ones((1, 2, 3, 4), DType::U8, &Device::Cpu).unwrap();
        assert!(adaptive_avg_pool2d(&xi, 2, 2).is_err());
    }
}

/// Reverses the last dimension (a horizontal flip of `(…, H, W)` maps), as `torch.flip(x, [-1])`.
/// Differentiable (an `index_select` with reversed indices).
///
/// Errors: a rank-0 tensor; candle errors.
pub fn flip_last_dim(x: &Tensor) -> Result<Tensor> {
    let d = x.rank();
    if d == 0 {
        candle_core::bail!("flip_last_dim: a scalar has no dimension to flip");
    }
    let n = x.dim(d - 1)?;
    let idx: Vec<u32> = (0..n as u32).rev().collect();
    let idx = Tensor::from_vec(idx, n, x.device())?;
    x.contiguous()?.index_select(&idx, d - 1)
}
