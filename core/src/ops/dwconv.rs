//! Depthwise 2-D convolution as a candle `CustomOp2`, with CPU kernels for the forward pass and
//! both backward passes (input and weight).
//!
//! candle 0.11 runs `conv2d` with `groups == C` as `C` separate convolutions that are concatenated
//! afterwards (candle issue #3389), which is ~35x slower than PyTorch for a 7x7 kernel on
//! `(1, 64, 56, 56)`. SMT and Conv2Former are built from depthwise convolutions, so this op is on
//! their hot path.
//!
//! Semantics are those of `torch.nn.functional.conv2d(x, w, stride, padding, dilation, groups=C)`
//! with zero padding: `y[b, c, oy, ox] = sum_{ky, kx} w[c, 0, ky, kx] * x[b, c, oy*sh - ph + ky*dh,
//! ox*sw - pw + kx*dw]`, out-of-range input samples read as 0, and
//! `OH = (H + 2*ph - dh*(KH-1) - 1) / sh + 1` (floor), likewise for `OW`.
//!
//! The CPU kernels work one `(H, W)` plane at a time and accumulate whole output rows as
//! `row += w * shifted input row`, so the inner loop is a contiguous axpy the compiler vectorises.
//! Planes are spread over threads with rayon (batch x channel for the forward pass and the input
//! gradient, channels for the weight gradient, which sums over the batch).

use candle_core::{CpuStorage, CustomOp2, Layout, Result, Shape, Tensor};
use num_traits::Float;
use rayon::prelude::*;

/// Stride, zero padding and dilation of a depthwise convolution, each `(vertical, horizontal)` in
/// pixels of the input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DwConvParams {
    /// `(sh, sw)`, both >= 1.
    pub stride: (usize, usize),
    /// `(ph, pw)`: zeros added on each side.
    pub padding: (usize, usize),
    /// `(dh, dw)`, both >= 1.
    pub dilation: (usize, usize),
}

impl DwConvParams {
    /// Stride 1, the given symmetric padding, dilation 1: the "same" convolution of an odd
    /// `k x k` kernel when `padding = k / 2`.
    pub fn same(padding: usize) -> Self {
        Self {
            stride: (1, 1),
            padding: (padding, padding),
            dilation: (1, 1),
        }
    }
}

/// Sizes of one depthwise convolution, resolved once from the shapes.
///
/// With the plane kernels ([`forward_kernel`], [`grad_input_kernel`], [`grad_weight_kernel`]) and
/// the row kernels ([`axpy_row`], [`axpy_row_adjoint`], [`dot_row`]) it is the kernel-level API
/// of the NCHW depthwise convolution that fused ops built on it use (SMT's multi-head mixed
/// convolution, Conv2Former's MLP position branch, in `densepred_backbones`).
#[derive(Debug, Clone, Copy)]
pub struct Geom {
    b: usize,
    c: usize,
    h: usize,
    w: usize,
    kh: usize,
    kw: usize,
    oh: usize,
    ow: usize,
    p: DwConvParams,
}

fn out_len(len: usize, k: usize, s: usize, p: usize, d: usize, axis: &str) -> Result<usize> {
    let span = d * (k - 1) + 1;
    if s == 0 || d == 0 {
        candle_core::bail!("depthwise_conv2d: stride and dilation must be >= 1 ({axis})");
    }
    if len + 2 * p < span {
        candle_core::bail!(
            "depthwise_conv2d: kernel span {span} exceeds padded input {} along {axis}",
            len + 2 * p
        );
    }
    Ok((len + 2 * p - span) / s + 1)
}

impl Geom {
    /// The geometry of `x` `(B, C, H, W)` convolved with `w` `(C, 1, KH, KW)` under `p`.
    ///
    /// Errors: shapes that do not match, a zero stride or dilation, or a kernel span larger
    /// than the padded input.
    pub fn new(x: &Shape, w: &Shape, p: DwConvParams) -> Result<Self> {
        let (b, c, h, wd) = x.dims4()?;
        let (wc, one, kh, kw) = w.dims4()?;
        if wc != c || one != 1 {
            candle_core::bail!(
                "depthwise_conv2d: weight must be (C, 1, KH, KW) with C = {c}, got {:?}",
                w.dims()
            );
        }
        if kh == 0 || kw == 0 {
            candle_core::bail!("depthwise_conv2d: empty kernel {:?}", w.dims());
        }
        let oh = out_len(h, kh, p.stride.0, p.padding.0, p.dilation.0, "height")?;
        let ow = out_len(wd, kw, p.stride.1, p.padding.1, p.dilation.1, "width")?;
        Ok(Self {
            b,
            c,
            h,
            w: wd,
            kh,
            kw,
            oh,
            ow,
            p,
        })
    }

    /// The geometry as the CUDA kernels take it.
    #[cfg(feature = "cuda")]
    fn cuda(&self) -> Result<super::cuda::DwGeom> {
        let i = |v: usize| super::cuda::int(v, "depthwise_conv2d");
        Ok(super::cuda::DwGeom {
            b: i(self.b)?,
            c: i(self.c)?,
            h: i(self.h)?,
            w: i(self.w)?,
            kh: i(self.kh)?,
            kw: i(self.kw)?,
            oh: i(self.oh)?,
            ow: i(self.ow)?,
            sh: i(self.p.stride.0)?,
            sw: i(self.p.stride.1)?,
            ph: i(self.p.padding.0)?,
            pw: i(self.p.padding.1)?,
            dh: i(self.p.dilation.0)?,
            dw: i(self.p.dilation.1)?,
        })
    }

    /// Errors unless an output gradient of shape `gy` matches the output `(B, C, OH, OW)`.
    fn check_grad(&self, gy: &Shape, what: &str) -> Result<()> {
        if gy.dims() != [self.b, self.c, self.oh, self.ow] {
            candle_core::bail!("{what}: gradient shape {gy:?} does not match the output");
        }
        Ok(())
    }

    /// Input row read by output row `oy` at kernel row `ky`, if inside the image.
    #[inline]
    pub fn in_row(&self, oy: usize, ky: usize) -> Option<usize> {
        let iy =
            (oy * self.p.stride.0 + ky * self.p.dilation.0) as isize - self.p.padding.0 as isize;
        (iy >= 0 && (iy as usize) < self.h).then_some(iy as usize)
    }

    /// For kernel column `kx`: the output columns `[ox0, ox1)` whose input column
    /// `ox * sw + off` lies inside the image, and `off = kx * dw - pw`.
    #[inline]
    pub fn col_range(&self, kx: usize) -> (usize, usize, isize) {
        let sw = self.p.stride.1 as isize;
        let off = (kx * self.p.dilation.1) as isize - self.p.padding.1 as isize;
        let ox0 = if off >= 0 { 0 } else { (-off + sw - 1) / sw };
        let last = self.w as isize - 1 - off;
        let ox1 = if last < 0 {
            0
        } else {
            (last / sw + 1).min(self.ow as isize)
        };
        (ox0 as usize, (ox1.max(ox0)) as usize, off)
    }
}

/// `out_row[ox0..ox1] (+)= wv * in_row[ox*sw + off]` for the valid columns.
#[inline]
pub fn axpy_row<T: Float>(
    out: &mut [T],
    inp: &[T],
    wv: T,
    ox0: usize,
    ox1: usize,
    off: isize,
    sw: usize,
) {
    if ox0 >= ox1 {
        return;
    }
    if sw == 1 {
        let base = (ox0 as isize + off) as usize;
        let n = ox1 - ox0;
        for (o, &i) in out[ox0..ox1].iter_mut().zip(&inp[base..base + n]) {
            *o = *o + wv * i;
        }
    } else {
        for ox in ox0..ox1 {
            let ix = (ox * sw) as isize + off;
            out[ox] = out[ox] + wv * inp[ix as usize];
        }
    }
}

/// The adjoint of `axpy_row`: `in_row[ox*sw + off] += wv * out_row[ox]`.
#[inline]
pub fn axpy_row_adjoint<T: Float>(
    inp: &mut [T],
    out: &[T],
    wv: T,
    ox0: usize,
    ox1: usize,
    off: isize,
    sw: usize,
) {
    if ox0 >= ox1 {
        return;
    }
    if sw == 1 {
        let base = (ox0 as isize + off) as usize;
        let n = ox1 - ox0;
        for (i, &o) in inp[base..base + n].iter_mut().zip(&out[ox0..ox1]) {
            *i = *i + wv * o;
        }
    } else {
        for ox in ox0..ox1 {
            let ix = ((ox * sw) as isize + off) as usize;
            inp[ix] = inp[ix] + wv * out[ox];
        }
    }
}

/// `sum_ox out_row[ox] * in_row[ox*sw + off]` over the valid columns.
#[inline]
pub fn dot_row<T: Float>(out: &[T], inp: &[T], ox0: usize, ox1: usize, off: isize, sw: usize) -> T {
    let mut acc = T::zero();
    if ox0 >= ox1 {
        return acc;
    }
    if sw == 1 {
        let base = (ox0 as isize + off) as usize;
        let n = ox1 - ox0;
        return crate::kernel::reduce::dot(&out[ox0..ox1], &inp[base..base + n]);
    } else {
        for ox in ox0..ox1 {
            acc = acc + out[ox] * inp[((ox * sw) as isize + off) as usize];
        }
    }
    acc
}

/// One plane of a stride-1, dilation-1 depthwise correlation, register-blocked:
/// `out[oy, ox] = Σ_{ky, kx} wk[ky, kx] · x[oy + ky − ph, ox + kx − pw]` (zero outside `x`).
///
/// `x` is `(h, w)`, `out` `(oh, ow)`, `wk` `(kh, kw)`, all row-major. The rows of `x` are first
/// copied into `padded` with `pw` zeros on the left (and enough on the right), so that every tap
/// reads a full window (the last block's too); then each block of 32 or 8 output columns is
/// accumulated in registers over all taps and stored once (the row kernels above load and store
/// the output row once per tap, which bounds them by memory traffic for large kernels).
#[allow(clippy::too_many_arguments)]
fn plane_s1<T: Float>(
    x: &[T],
    (h, w): (usize, usize),
    wk: &[T],
    (kh, kw): (usize, usize),
    (ph, pw): (usize, usize),
    out: &mut [T],
    (oh, ow): (usize, usize),
    padded: &mut Vec<T>,
) {
    // Wide enough for the last 8-column block's window and for the copied rows.
    let wp = (ow.next_multiple_of(8) + kw - 1).max(pw + w);
    padded.clear();
    padded.resize(h * wp, T::zero());
    for r in 0..h {
        padded[r * wp + pw..r * wp + pw + w].copy_from_slice(&x[r * w..(r + 1) * w]);
    }
    for oy in 0..oh {
        // Kernel rows whose input row `oy + ky − ph` lies inside `x`.
        let ky0 = ph.saturating_sub(oy);
        let ky1 = kh.min((h + ph).saturating_sub(oy));
        // The padded input rows of the taps `ky0..ky1`, and their kernel rows.
        let rows = &padded[(oy + ky0 - ph) * wp..(oy + ky1 - ph) * wp];
        let wrows = &wk[ky0 * kw..ky1 * kw];
        let orow = &mut out[oy * ow..(oy + 1) * ow];
        let mut ox = 0;
        while ox + 32 <= ow {
            orow[ox..ox + 32].copy_from_slice(&taps::<T, 32>(rows, wp, wrows, kw, ox));
            ox += 32;
        }
        while ox + 8 <= ow {
            orow[ox..ox + 8].copy_from_slice(&taps::<T, 8>(rows, wp, wrows, kw, ox));
            ox += 8;
        }
        if ox < ow {
            // The last block reads past the row into the zero padding; its extra columns are
            // dropped.
            let n = ow - ox;
            orow[ox..].copy_from_slice(&taps::<T, 8>(rows, wp, wrows, kw, ox)[..n]);
        }
    }
}

/// `L` consecutive outputs from column `ox` of one output row of [`plane_s1`]: the sum over the
/// kernel rows `wrows` (`kw` taps each) of each tap times the window of its padded input row
/// (`rows`, `wp` wide), accumulated in an array the compiler keeps in vector registers.
#[inline(always)]
fn taps<T: Float, const L: usize>(
    rows: &[T],
    wp: usize,
    wrows: &[T],
    kw: usize,
    ox: usize,
) -> [T; L] {
    let mut acc = [T::zero(); L];
    for (prow, wr) in rows.chunks_exact(wp).zip(wrows.chunks_exact(kw)) {
        for (kx, &wv) in wr.iter().enumerate() {
            let src: &[T; L] = prow[ox + kx..ox + kx + L]
                .try_into()
                .expect("window inside the row");
            for i in 0..L {
                acc[i] = acc[i] + wv * src[i];
            }
        }
    }
    acc
}

/// Whether the register-blocked [`plane_s1`] applies: stride 1 and dilation 1 (every depthwise
/// convolution of SMT, Conv2Former and MCGA) with padding below the kernel size.
fn unit_stride(g: &Geom) -> bool {
    g.p.stride == (1, 1) && g.p.dilation == (1, 1) && g.p.padding.0 < g.kh && g.p.padding.1 < g.kw
}

/// The forward CPU kernel: `x` `(B, C, H, W)` and `w` `(C, 1, KH, KW)` (row-major, sizes in `g`)
/// → `y` `(B, C, OH, OW)`, no bias. Kernel-level API for fused ops built on this convolution.
pub fn forward_kernel<T: Float + Send + Sync>(g: &Geom, x: &[T], w: &[T]) -> Vec<T> {
    let (plane_in, plane_out, kk) = (g.h * g.w, g.oh * g.ow, g.kh * g.kw);
    let mut out = crate::kernel::zeroed(g.b * g.c * plane_out);
    if unit_stride(g) {
        out.par_chunks_mut(plane_out)
            .enumerate()
            .for_each_init(Vec::new, |pad, (bc, o)| {
                let c = bc % g.c;
                plane_s1(
                    &x[bc * plane_in..(bc + 1) * plane_in],
                    (g.h, g.w),
                    &w[c * kk..(c + 1) * kk],
                    (g.kh, g.kw),
                    g.p.padding,
                    o,
                    (g.oh, g.ow),
                    pad,
                );
            });
        return out;
    }
    let cols: Vec<_> = (0..g.kw).map(|kx| g.col_range(kx)).collect();
    out.par_chunks_mut(plane_out)
        .enumerate()
        .for_each(|(bc, o)| {
            let c = bc % g.c;
            let xin = &x[bc * plane_in..(bc + 1) * plane_in];
            let wk = &w[c * kk..(c + 1) * kk];
            for oy in 0..g.oh {
                let orow = &mut o[oy * g.ow..(oy + 1) * g.ow];
                for ky in 0..g.kh {
                    let Some(iy) = g.in_row(oy, ky) else { continue };
                    let irow = &xin[iy * g.w..(iy + 1) * g.w];
                    for (kx, &(ox0, ox1, off)) in cols.iter().enumerate() {
                        axpy_row(orow, irow, wk[ky * g.kw + kx], ox0, ox1, off, g.p.stride.1);
                    }
                }
            }
        });
    out
}

/// The input-gradient CPU kernel: `dy` `(B, C, OH, OW)` and `w` → `dx` `(B, C, H, W)`.
pub fn grad_input_kernel<T: Float + Send + Sync>(g: &Geom, gy: &[T], w: &[T]) -> Vec<T> {
    let (plane_in, plane_out, kk) = (g.h * g.w, g.oh * g.ow, g.kh * g.kw);
    let mut gx = crate::kernel::zeroed(g.b * g.c * plane_in);
    if unit_stride(g) {
        // dx is the correlation of dy with the kernel rotated by 180°, padded by k − 1 − p.
        gx.par_chunks_mut(plane_in)
            .enumerate()
            .for_each_init(Vec::new, |pad, (bc, gi)| {
                let c = bc % g.c;
                let rotated: Vec<T> = w[c * kk..(c + 1) * kk].iter().rev().copied().collect();
                plane_s1(
                    &gy[bc * plane_out..(bc + 1) * plane_out],
                    (g.oh, g.ow),
                    &rotated,
                    (g.kh, g.kw),
                    (g.kh - 1 - g.p.padding.0, g.kw - 1 - g.p.padding.1),
                    gi,
                    (g.h, g.w),
                    pad,
                );
            });
        return gx;
    }
    let cols: Vec<_> = (0..g.kw).map(|kx| g.col_range(kx)).collect();
    gx.par_chunks_mut(plane_in)
        .enumerate()
        .for_each(|(bc, gi)| {
            let c = bc % g.c;
            let go = &gy[bc * plane_out..(bc + 1) * plane_out];
            let wk = &w[c * kk..(c + 1) * kk];
            for oy in 0..g.oh {
                let orow = &go[oy * g.ow..(oy + 1) * g.ow];
                for ky in 0..g.kh {
                    let Some(iy) = g.in_row(oy, ky) else { continue };
                    let irow = &mut gi[iy * g.w..(iy + 1) * g.w];
                    for (kx, &(ox0, ox1, off)) in cols.iter().enumerate() {
                        axpy_row_adjoint(
                            irow,
                            orow,
                            wk[ky * g.kw + kx],
                            ox0,
                            ox1,
                            off,
                            g.p.stride.1,
                        );
                    }
                }
            }
        });
    gx
}

/// The weight-gradient CPU kernel: `x` and `dy` → `dw` `(C, 1, KH, KW)` (summed over the batch).
pub fn grad_weight_kernel<T: Float + Send + Sync>(g: &Geom, x: &[T], gy: &[T]) -> Vec<T> {
    let (plane_in, plane_out, kk) = (g.h * g.w, g.oh * g.ow, g.kh * g.kw);
    let mut gw = vec![T::zero(); g.c * kk];
    let cols: Vec<_> = (0..g.kw).map(|kx| g.col_range(kx)).collect();
    gw.par_chunks_mut(kk).enumerate().for_each(|(c, gwk)| {
        for b in 0..g.b {
            let bc = b * g.c + c;
            let xin = &x[bc * plane_in..(bc + 1) * plane_in];
            let go = &gy[bc * plane_out..(bc + 1) * plane_out];
            for oy in 0..g.oh {
                let orow = &go[oy * g.ow..(oy + 1) * g.ow];
                for ky in 0..g.kh {
                    let Some(iy) = g.in_row(oy, ky) else { continue };
                    let irow = &xin[iy * g.w..(iy + 1) * g.w];
                    for (kx, &(ox0, ox1, off)) in cols.iter().enumerate() {
                        let k = ky * g.kw + kx;
                        gwk[k] = gwk[k] + dot_row(orow, irow, ox0, ox1, off, g.p.stride.1);
                    }
                }
            }
        }
    });
    gw
}

/// The forward op: `(x (B,C,H,W), w (C,1,KH,KW)) -> (B,C,OH,OW)`.
struct DwConv2d {
    p: DwConvParams,
}

impl CustomOp2 for DwConv2d {
    fn name(&self) -> &'static str {
        "depthwise-conv2d"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let g = Geom::new(l1.shape(), l2.shape(), self.p)?;
        let out =
            crate::cpu_float!(self.name(); x = (s1, l1), w = (s2, l2) => forward_kernel(&g, x, w));
        Ok((out, Shape::from((g.b, g.c, g.oh, g.ow))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        use super::cuda::{grid_1d, launch_binary, Init};
        let g = Geom::new(l1.shape(), l2.shape(), self.p)?;
        let n = g.b * g.c * g.oh * g.ow;
        let out = launch_binary(
            "dwconv_fwd",
            true,
            (s1, l1),
            (s2, l2),
            n,
            Init::Written,
            grid_1d(n),
            &g.cuda()?,
        )?;
        Ok((out, Shape::from((g.b, g.c, g.oh, g.ow))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        // Detached: gradients built from graph-tracked inputs would keep the forward graph
        // (and these temporaries) alive in the GradStore until the whole backward ends.
        let (x, w) = (&x.detach(), &w.detach());
        let grad = grad.contiguous()?;
        let gx = grad.apply_op2_no_bwd(
            w,
            &DwConv2dGradInput {
                p: self.p,
                x_shape: x.shape().clone(),
            },
        )?;
        let gw = x.apply_op2_no_bwd(
            &grad,
            &DwConv2dGradWeight {
                p: self.p,
                w_shape: w.shape().clone(),
            },
        )?;
        Ok((Some(gx), Some(gw)))
    }
}

/// `(dL/dy (B,C,OH,OW), w) -> dL/dx (B,C,H,W)`.
struct DwConv2dGradInput {
    p: DwConvParams,
    x_shape: Shape,
}

impl CustomOp2 for DwConv2dGradInput {
    fn name(&self) -> &'static str {
        "depthwise-conv2d-grad-input"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let g = Geom::new(&self.x_shape, l2.shape(), self.p)?;
        g.check_grad(l1.shape(), self.name())?;
        let out = crate::cpu_float!(self.name(); gy = (s1, l1), w = (s2, l2) => grad_input_kernel(&g, gy, w));
        Ok((out, self.x_shape.clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        use super::cuda::{grid_1d, launch_binary, Init};
        let g = Geom::new(&self.x_shape, l2.shape(), self.p)?;
        g.check_grad(l1.shape(), self.name())?;
        let n = g.b * g.c * g.h * g.w;
        let out = launch_binary(
            "dwconv_grad_input",
            true,
            (s1, l1),
            (s2, l2),
            n,
            Init::Written,
            grid_1d(n),
            &g.cuda()?,
        )?;
        Ok((out, self.x_shape.clone()))
    }
}

/// `(x (B,C,H,W), dL/dy (B,C,OH,OW)) -> dL/dw (C,1,KH,KW)`.
struct DwConv2dGradWeight {
    p: DwConvParams,
    w_shape: Shape,
}

impl CustomOp2 for DwConv2dGradWeight {
    fn name(&self) -> &'static str {
        "depthwise-conv2d-grad-weight"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let g = Geom::new(l1.shape(), &self.w_shape, self.p)?;
        g.check_grad(l2.shape(), self.name())?;
        let out = crate::cpu_float!(self.name(); x = (s1, l1), gy = (s2, l2) => grad_weight_kernel(&g, x, gy));
        Ok((out, self.w_shape.clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        use super::cuda::{launch_binary, Init, THREADS};
        let g = Geom::new(l1.shape(), &self.w_shape, self.p)?;
        g.check_grad(l2.shape(), self.name())?;
        // One block of THREADS (= DW_REDUCE_THREADS in densepred.cu) per kernel tap.
        let taps = g.c * g.kh * g.kw;
        let cfg = candle_core::cuda_backend::cudarc::driver::LaunchConfig {
            grid_dim: (super::cuda::int(taps, self.name())? as u32, 1, 1),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        let out = launch_binary(
            "dwconv_grad_weight",
            true,
            (s1, l1),
            (s2, l2),
            taps,
            Init::Written,
            cfg,
            &g.cuda()?,
        )?;
        Ok((out, self.w_shape.clone()))
    }
}

/// Depthwise 2-D convolution (`groups = C`), differentiable in `x`, `weight` and `bias`.
///
/// * `x`: `(B, C, H, W)`, f32 or f64.
/// * `weight`: `(C, 1, KH, KW)`, same dtype (PyTorch's depthwise `Conv2d.weight` layout).
/// * `bias`: optional `(C,)`.
///
/// Returns `(B, C, OH, OW)` with `OH = (H + 2*ph - dh*(KH-1) - 1) / sh + 1`, as
/// `torch.nn.functional.conv2d(x, weight, bias, stride, padding, dilation, groups=C)`.
///
/// Errors: shapes that are not 4-D, a weight that is not `(C, 1, KH, KW)`, a kernel span larger
/// than the padded input, mixed or non-float dtypes. CPU (f32/f64) and, with the `cuda` feature,
/// CUDA (f32/f64) run our kernels; other devices and dtypes fall back to candle's grouped `conv2d`.
pub fn depthwise_conv2d(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    p: DwConvParams,
) -> Result<Tensor> {
    let y = if super::dispatch::select(&super::dispatch::DEPTHWISE_CONV2D, x).is_ours() {
        x.contiguous()?
            .apply_op2(&weight.contiguous()?, DwConv2d { p })?
    } else {
        depthwise_conv2d_reference(x, weight, p)?
    };
    match bias {
        Some(b) => super::bias::add_bias_channels(&y, b),
        None => Ok(y),
    }
}

/// The same convolution through candle's own grouped `conv2d` (slow on CPU, see the module docs).
/// Used as the reference in tests and on devices that have no kernel of ours.
///
/// Errors: as `candle_core::Tensor::conv2d`; non-square stride, padding or dilation are not
/// supported by candle and give an error.
pub fn depthwise_conv2d_reference(x: &Tensor, weight: &Tensor, p: DwConvParams) -> Result<Tensor> {
    if p.stride.0 != p.stride.1 || p.padding.0 != p.padding.1 || p.dilation.0 != p.dilation.1 {
        candle_core::bail!(
            "depthwise_conv2d_reference: candle's conv2d needs equal (h, w) parameters, got {p:?}"
        );
    }
    let c = x.dim(1)?;
    super::im2col::candle_conv2d(x, weight, p.stride.0, p.padding.0, p.dilation.0, c)
}
