//! Nearest-neighbour resizing of NCHW maps to an explicit size, with a backward pass.
//!
//! Semantics of `F.interpolate(x, size=(oh, ow), mode="nearest")`: output pixel `d` reads input
//! `min(floor(d · s), in − 1)` with the float32 scale `s = in / out`. candle's
//! `upsample_nearest2d` computes the same forward but its backward only supports integer factors;
//! FPN top-down paths on un-padded images need e.g. 7x9 → 13x17.

use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

fn src_index(d: usize, inp: usize, out: usize) -> usize {
    let s = inp as f32 / out as f32;
    ((d as f32 * s).floor() as usize).min(inp - 1)
}

/// The source index of every output position along one axis, as `index_select` takes them.
fn nearest_index(inp: usize, out: usize) -> Vec<u32> {
    (0..out).map(|d| src_index(d, inp, out) as u32).collect()
}

struct Nearest {
    oh: usize,
    ow: usize,
}

/// The source pixel `sy·w + sx` of each output pixel `y·ow + x`, row-major.
fn source_pixels(h: usize, w: usize, oh: usize, ow: usize) -> Vec<usize> {
    let xs: Vec<usize> = (0..ow).map(|d| src_index(d, w, ow)).collect();
    (0..oh)
        .flat_map(|y| {
            let row = src_index(y, h, oh) * w;
            xs.iter().map(move |&sx| row + sx)
        })
        .collect()
}

/// `planes` maps `(h, w)` → `(oh, ow)`: each output pixel copies its source pixel.
fn fwd<T: Copy + Send + Sync + Default>(
    x: &[T],
    planes: usize,
    h: usize,
    w: usize,
    oh: usize,
    ow: usize,
) -> Vec<T> {
    let src = source_pixels(h, w, oh, ow);
    let mut out = vec![T::default(); planes * oh * ow];
    out.par_chunks_mut(oh * ow).enumerate().for_each(|(p, o)| {
        let plane = &x[p * h * w..(p + 1) * h * w];
        for (o, &s) in o.iter_mut().zip(&src) {
            *o = plane[s];
        }
    });
    out
}

/// The adjoint of [`fwd`]: each output gradient is added to its source pixel.
fn bwd<T: Copy + Send + Sync + Default + std::ops::AddAssign>(
    g: &[T],
    planes: usize,
    h: usize,
    w: usize,
    oh: usize,
    ow: usize,
) -> Vec<T> {
    let src = source_pixels(h, w, oh, ow);
    let mut out = vec![T::default(); planes * h * w];
    out.par_chunks_mut(h * w).enumerate().for_each(|(p, o)| {
        let gp = &g[p * oh * ow..(p + 1) * oh * ow];
        for (&gv, &s) in gp.iter().zip(&src) {
            o[s] += gv;
        }
    });
    out
}

impl CustomOp1 for Nearest {
    fn name(&self) -> &'static str {
        "resize-nearest"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (b, c, h, w) = l.shape().dims4()?;
        let what = "resize_nearest: input";
        let out = crate::cpu_float!(what; v = (s, l) => fwd(v, b * c, h, w, self.oh, self.ow));
        Ok((out, Shape::from((b, c, self.oh, self.ow))))
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        let (b, c, h, w) = x.dims4()?;
        let g = g.contiguous()?;
        let what = "resize_nearest backward";
        let out = crate::cpu_float_tensors!(what; gv = g => Tensor::from_vec(
            bwd(gv, b * c, h, w, self.oh, self.ow),
            (b, c, h, w),
            x.device(),
        )?);
        Ok(Some(out))
    }
}

/// Nearest resize of `x` `(B, C, H, W)` to `(B, C, oh, ow)`, PyTorch `mode="nearest"` indexing;
/// differentiable for any sizes.
///
/// Errors: a non-4-D input or a zero output size.
pub fn resize_nearest(x: &Tensor, oh: usize, ow: usize) -> Result<Tensor> {
    if oh == 0 || ow == 0 {
        candle_core::bail!("resize_nearest: empty output size {oh}x{ow}");
    }
    if super::dispatch::select(&super::dispatch::RESIZE_NEAREST, x).is_ours() {
        return x.contiguous()?.apply_op1(Nearest { oh, ow });
    }
    // Elsewhere: the same source rows and columns gathered with `index_select` (candle's
    // `upsample_nearest2d` has no backward for non-integer factors).
    let (_, _, h, w) = x.dims4()?;
    let rows = Tensor::new(nearest_index(h, oh).as_slice(), x.device())?;
    let cols = Tensor::new(nearest_index(w, ow).as_slice(), x.device())?;
    x.index_select(&rows, 2)?.index_select(&cols, 3)
}
