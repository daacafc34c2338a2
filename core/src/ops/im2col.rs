//! im2col / col2im and the dense convolution built on them.
//!
//! candle 0.11's CPU `conv2d` backward computes the input gradient with a direct
//! `conv_transpose2d` (one dot product per output pixel and tap) and the weight gradient as a
//! convolution with the batch as channels; for the 3x3 256-channel towers of RetinaNet/ATSS heads
//! that is several times slower than the forward. Here a dense convolution is
//! `W (C_out, C_in·K·K) @ unfold(x) (C_in·K·K, B·OH·OW)`: forward and both gradients become GEMMs
//! (candle's `matmul`, parallel `gemm`) plus an `unfold` whose backward is `fold` (col2im).
//! This is the lowering PyTorch's CPU `slow_conv2d` uses too (`aten/src/ATen/native/ConvolutionMM2d.cpp`).

use crate::kernel::{gemm_into, KernelFloat, MatView};
#[cfg(test)]
use candle_core::CustomOp1;
use candle_core::{CpuStorage, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

mod bias_act;
mod shifted;
mod winograd;

pub use bias_act::conv2d_gemm_bias_act;

/// Geometry of an unfold: input `(B, C, H, W)`, square-or-not kernel `(KH, KW)`, equal stride,
/// padding and dilation on both axes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UnfoldParams {
    /// Kernel height and width in taps.
    pub kernel: (usize, usize),
    /// Stride in input pixels.
    pub stride: usize,
    /// Zero padding on each side, in input pixels.
    pub padding: usize,
    /// Spacing between kernel taps, in input pixels.
    pub dilation: usize,
}

#[derive(Debug, Clone, Copy)]
struct Geom {
    b: usize,
    c: usize,
    h: usize,
    w: usize,
    kh: usize,
    kw: usize,
    oh: usize,
    ow: usize,
    s: usize,
    p: usize,
    d: usize,
}

impl Geom {
    fn new(b: usize, c: usize, h: usize, w: usize, p: UnfoldParams) -> Result<Self> {
        let (kh, kw) = p.kernel;
        if p.stride == 0 || p.dilation == 0 || kh == 0 || kw == 0 {
            candle_core::bail!("unfold: kernel, stride and dilation must be >= 1, got {p:?}");
        }
        let out = |len: usize, k: usize, axis: &str| -> Result<usize> {
            let span = p.dilation * (k - 1) + 1;
            if len + 2 * p.padding < span {
                candle_core::bail!(
                    "unfold: kernel span {span} exceeds padded input {} along {axis}",
                    len + 2 * p.padding
                );
            }
            Ok((len + 2 * p.padding - span) / p.stride + 1)
        };
        Ok(Self {
            b,
            c,
            h,
            w,
            kh,
            kw,
            oh: out(h, kh, "height")?,
            ow: out(w, kw, "width")?,
            s: p.stride,
            p: p.padding,
            d: p.dilation,
        })
    }

    fn rows(&self) -> usize {
        self.c * self.kh * self.kw
    }

    fn cols(&self) -> usize {
        self.b * self.oh * self.ow
    }

    /// Input coordinate read by output index `o` at tap `k` (None: in the zero padding).
    #[inline]
    fn src(&self, o: usize, k: usize, len: usize) -> Option<usize> {
        let pos = o * self.s + k * self.d;
        if pos < self.p || pos - self.p >= len {
            None
        } else {
            Some(pos - self.p)
        }
    }

    /// The output range `[lo, hi)` along an axis whose taps at `k` land inside the input.
    fn valid_range(&self, k: usize, len: usize, olen: usize) -> (usize, usize) {
        let lo = (0..olen).find(|&o| self.src(o, k, len).is_some());
        match lo {
            None => (0, 0),
            Some(lo) => {
                let hi = (lo..olen)
                    .take_while(|&o| self.src(o, k, len).is_some())
                    .last()
                    .map_or(lo, |o| o + 1);
                (lo, hi)
            }
        }
    }
}

#[cfg(test)]
/// `x (B,C,H,W)` contiguous → `cols (C·KH·KW, B·OH·OW)`, row `(c·KH + ky)·KW + kx`, column
/// `(b·OH + oy)·OW + ox`, zeros where the tap falls in the padding.
fn unfold_kernel<T: Copy + Send + Sync + num_traits::Zero>(g: &Geom, x: &[T]) -> Vec<T> {
    let mut out = crate::kernel::zeroed(g.rows() * g.cols());
    unfold_into(g, x, &mut out);
    out
}

/// [`unfold_kernel`] into `out` (`C·KH·KW × B·OH·OW`); every element is written (padding taps
/// as zeros), so `out` may hold anything beforehand.
fn unfold_into<T: Copy + Send + Sync + num_traits::Zero>(g: &Geom, x: &[T], out: &mut [T]) {
    let (l, n) = (g.oh * g.ow, g.cols());
    debug_assert_eq!(out.len(), g.rows() * n);
    debug_assert_eq!(x.len(), g.b * g.c * g.h * g.w);
    out.par_chunks_mut(n).enumerate().for_each(|(row, dst)| {
        let c = row / (g.kh * g.kw);
        let ky = (row / g.kw) % g.kh;
        let kx = row % g.kw;
        let (x_lo, x_hi) = g.valid_range(kx, g.w, g.ow);
        for bi in 0..g.b {
            let plane = &x[(bi * g.c + c) * g.h * g.w..][..g.h * g.w];
            let dst_b = &mut dst[bi * l..][..l];
            for oy in 0..g.oh {
                let dst_row = &mut dst_b[oy * g.ow..][..g.ow];
                let Some(iy) = g.src(oy, ky, g.h) else {
                    dst_row.fill(T::zero());
                    continue;
                };
                dst_row[..x_lo].fill(T::zero());
                dst_row[x_hi.max(x_lo)..].fill(T::zero());
                let src_row = &plane[iy * g.w..][..g.w];
                if g.s == 1 {
                    if x_hi > x_lo {
                        let ix0 = x_lo + kx * g.d - g.p;
                        dst_row[x_lo..x_hi].copy_from_slice(&src_row[ix0..ix0 + (x_hi - x_lo)]);
                    }
                } else {
                    for ox in x_lo..x_hi {
                        dst_row[ox] = src_row[ox * g.s + kx * g.d - g.p];
                    }
                }
            }
        }
    });
}

#[cfg(test)]
/// The adjoint of [`unfold_kernel`] (col2im): `cols (C·KH·KW, B·OH·OW)` → `(B,C,H,W)`, summing
/// every column entry into the input pixel it was read from.
fn fold_kernel<T>(g: &Geom, cols: &[T]) -> Vec<T>
where
    T: Copy + Send + Sync + num_traits::Zero + std::ops::AddAssign,
{
    let hw = g.h * g.w;
    // Channel-major scratch so each thread owns whole channels; then transposed to (B, C, H, W).
    let mut by_c = crate::kernel::zeroed(g.c * g.b * hw);
    fold_channels(g, cols, &mut by_c);
    if g.b == 1 {
        return by_c;
    }
    let mut out = crate::kernel::zeroed(g.b * g.c * hw);
    out.par_chunks_mut(hw).enumerate().for_each(|(i, dst)| {
        let (bi, c) = (i / g.c, i % g.c);
        dst.copy_from_slice(&by_c[(c * g.b + bi) * hw..][..hw]);
    });
    out
}

/// Adds the fold of `cols` into `by_c`, laid out channel-major `(C, B, H, W)` (for B = 1 that is
/// the image's `(C, H, W)`).
fn fold_channels<T>(g: &Geom, cols: &[T], by_c: &mut [T])
where
    T: Copy + Send + Sync + std::ops::AddAssign,
{
    let (l, n, hw) = (g.oh * g.ow, g.cols(), g.h * g.w);
    let taps = g.kh * g.kw;
    debug_assert_eq!(cols.len(), g.rows() * n);
    debug_assert_eq!(by_c.len(), g.c * g.b * hw);
    by_c.par_chunks_mut(g.b * hw)
        .enumerate()
        .for_each(|(c, dst)| {
            for t in 0..taps {
                let (ky, kx) = (t / g.kw, t % g.kw);
                let src = &cols[(c * taps + t) * n..][..n];
                let (x_lo, x_hi) = g.valid_range(kx, g.w, g.ow);
                for bi in 0..g.b {
                    let src_b = &src[bi * l..][..l];
                    let dst_b = &mut dst[bi * hw..][..hw];
                    for oy in 0..g.oh {
                        let Some(iy) = g.src(oy, ky, g.h) else {
                            continue;
                        };
                        let s_row = &src_b[oy * g.ow..][..g.ow];
                        let d_row = &mut dst_b[iy * g.w..][..g.w];
                        for ox in x_lo..x_hi {
                            d_row[ox * g.s + kx * g.d - g.p] += s_row[ox];
                        }
                    }
                }
            }
        });
}

#[cfg(test)]
struct Unfold {
    p: UnfoldParams,
}

#[cfg(test)]
struct Fold {
    g: Geom,
}

#[cfg(test)]
fn dims(l: &Layout) -> Result<(usize, usize, usize, usize)> {
    l.shape().dims4()
}

#[cfg(test)]
impl CustomOp1 for Unfold {
    fn name(&self) -> &'static str {
        "unfold"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (b, c, h, w) = dims(l)?;
        let g = Geom::new(b, c, h, w, self.p)?;
        let out = crate::cpu_float!("unfold"; x = (s, l) => unfold_kernel(&g, x));
        Ok((out, Shape::from((g.rows(), g.cols()))))
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let (b, c, h, w) = x.dims4()?;
        let g = Geom::new(b, c, h, w, self.p)?;
        Ok(Some(grad.contiguous()?.apply_op1_no_bwd(&Fold { g })?))
    }
}

#[cfg(test)]
impl CustomOp1 for Fold {
    fn name(&self) -> &'static str {
        "fold"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let g = self.g;
        if l.shape().dims() != [g.rows(), g.cols()] {
            candle_core::bail!(
                "fold: expected columns ({}, {}), got {:?}",
                g.rows(),
                g.cols(),
                l.shape()
            );
        }
        let out = crate::cpu_float!("fold"; x = (s, l) => fold_kernel(&g, x));
        Ok((out, Shape::from((g.b, g.c, g.h, g.w))))
    }
}

/// im2col, `torch.nn.functional.unfold` up to the layout: `x (B, C, H, W)` →
/// `(C·KH·KW, B·OH·OW)` with row `(c·KH + ky)·KW + kx` (the order of a PyTorch conv weight's
/// trailing dims) and column `(b·OH + oy)·OW + ox`; taps in the zero padding read 0.
/// `OH = (H + 2p − d(KH−1) − 1) / s + 1`, likewise `OW`. Differentiable (backward = col2im).
///
/// Errors: a non-4-D or non-float input; kernel span larger than the padded input; zero stride,
/// dilation or kernel size. Test-only: the fused products never build the explicit unfold; it
/// is their reference.
#[cfg(test)]
pub(crate) fn unfold(x: &Tensor, p: UnfoldParams) -> Result<Tensor> {
    x.contiguous()?.apply_op1(Unfold { p })
}

/// The dense convolution as one op: `(x (B,C_in,H,W), w (C_out,C_in,KH,KW)) → (B,C_out,OH,OW)`.
/// Forward lowers to unfold + GEMM; the columns are dropped afterwards and rebuilt from `x` in
/// the backward, so the graph keeps only `x` and `w` (as PyTorch's autograd does for a
/// convolution) instead of a `(C_in·K·K, B·OH·OW)` matrix per layer: for the RetinaNet head at
/// 640² and batch 2 that is ~1.6 GB less memory in training.
///
/// All three products run on the operands' own buffers (weight blocks and input channel ranges
/// are strided views, results accumulate in place), so a call allocates only its result and one
/// column block: no copies of the input, no per-image partial results to stack.
#[derive(Debug, Clone, Copy)]
struct ConvGemm {
    p: UnfoldParams,
    /// Column budget per block (elements); [`MAX_COLS`] outside tests.
    max_cols: usize,
    lowering: Lowering,
}

/// How [`ConvGemm`] lowers a convolution to GEMMs (production code runs [`Lowering::Auto`];
/// the tests force each lowering).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(not(test), allow(dead_code))]
enum Lowering {
    /// [`Lowering::Winograd`] for 3x3 kernels of stride 1, padding 1 and dilation 1 with at
    /// least [`WINOGRAD_MIN_CHANNELS`] input and output channels, else [`Lowering::Shifted`] for
    /// stride 1 and at least [`SHIFTED_MIN_CHANNELS`] input channels, else [`Lowering::Unfold`].
    Auto,
    /// im2col blocks and one GEMM per image and block (any stride).
    Unfold,
    /// One GEMM per tap on the shifted padded input ([`shifted`]; stride 1 only).
    Shifted,
    /// Winograd's `F(2x2, 3x3)`: 16 GEMMs on transformed tiles ([`winograd`]; 3x3, stride 1,
    /// padding 1, dilation 1 only).
    Winograd,
}

/// Fewest input channels for which [`Lowering::Auto`] picks the shifted GEMMs: their inner
/// dimension is `C`, and below a few dozen the GEMM micro-kernels run mostly on edges (an RGB
/// stem keeps the unfold).
const SHIFTED_MIN_CHANNELS: usize = 16;

/// Fewest input and output channels for which [`Lowering::Auto`] picks Winograd's
/// `F(2x2, 3x3)`: its 16 products per tile have inner dimension `C` and `OC` rows (the
/// gradients swap them), and below this the transforms, which are memory-bound, outweigh the
/// 2.25x fewer multiply-adds.
const WINOGRAD_MIN_CHANNELS: usize = 64;

/// Most elements of one unfolded column block (128 MiB of f32): larger convolutions are split
/// over input channels.
const MAX_COLS: usize = 32 << 20;

/// The sizes of one convolution: `x (B, C, H, W)`, `w (OC, C, KH, KW)`, output `OH × OW = L`.
#[derive(Debug, Clone, Copy)]
struct ConvDims {
    b: usize,
    c: usize,
    h: usize,
    w: usize,
    oc: usize,
    /// `KH·KW`.
    taps: usize,
    /// Input channels of the weight (≥ `c`): `x` meets the weight's channels
    /// `c_off..c_off + c` (a convolution over a channel concatenation, one part at a time).
    wc: usize,
    c_off: usize,
    /// Geometry of one image (B = 1) over all input channels.
    g1: Geom,
}

impl ConvDims {
    fn new(
        x: (usize, usize, usize, usize),
        w: (usize, usize, usize, usize),
        c_off: usize,
        p: UnfoldParams,
    ) -> Result<Self> {
        let (b, c, h, wd) = x;
        let (oc, wc, kh, kw) = w;
        if (kh, kw) != p.kernel || c_off + c > wc {
            candle_core::bail!(
                "conv2d_gemm: input {x:?} does not match weight {w:?} (kernel {:?}, input channels from {c_off})",
                p.kernel
            );
        }
        Ok(Self {
            b,
            c,
            h,
            w: wd,
            oc,
            taps: kh * kw,
            wc,
            c_off,
            g1: Geom::new(1, c, h, wd, p)?,
        })
    }

    fn l(&self) -> usize {
        self.g1.oh * self.g1.ow
    }

    /// Geometry of one image's channel block of `n` channels.
    fn block(&self, n: usize) -> Geom {
        Geom { c: n, ..self.g1 }
    }

    /// The `(OC, n·KH·KW)` block of the weight matrix `(OC, WC·KH·KW)` for the input's channels
    /// `c0..c0+n`.
    fn w_block(&self, c0: usize, n: usize) -> MatView {
        MatView::rows_of(
            self.oc,
            n * self.taps,
            (self.c_off + c0) * self.taps,
            self.wc * self.taps,
        )
    }
}

impl ConvGemm {
    /// The production lowering of a convolution with geometry `p`.
    fn new(p: UnfoldParams) -> Self {
        Self {
            p,
            max_cols: MAX_COLS,
            lowering: Lowering::Auto,
        }
    }

    /// Whether `d` runs on Winograd's `F(2x2, 3x3)`.
    fn winograd(&self, d: &ConvDims) -> bool {
        let possible = winograd::applies(d);
        match self.lowering {
            Lowering::Auto => {
                possible && d.c >= WINOGRAD_MIN_CHANNELS && d.oc >= WINOGRAD_MIN_CHANNELS
            }
            Lowering::Winograd => possible,
            Lowering::Unfold | Lowering::Shifted => false,
        }
    }

    /// Whether `d` runs on the shifted GEMMs (when not on [`ConvGemm::winograd`]).
    fn shifted(&self, d: &ConvDims) -> bool {
        let possible = self.p.stride == 1 && d.b > 0;
        match self.lowering {
            Lowering::Auto => possible && d.c >= SHIFTED_MIN_CHANNELS,
            Lowering::Unfold | Lowering::Winograd => false,
            Lowering::Shifted => possible,
        }
    }

    /// Input-channel chunks `(start, len)` whose columns for one image stay within [`MAX_COLS`].
    fn channel_chunks(&self, c: usize, l: usize) -> Vec<(usize, usize)> {
        let (kh, kw) = self.p.kernel;
        let per_channel = (kh * kw * l).max(1);
        let n = (self.max_cols / per_channel).clamp(1, c.max(1));
        (0..c).step_by(n).map(|c0| (c0, n.min(c - c0))).collect()
    }

    /// `y_i = Σ_chunks W[:, chunk] @ unfold(x_i[chunk])`, written straight into the
    /// `(B, OC, OH·OW)` result.
    /// With `init`, the products are added to a copy of it (same shape as `y`).
    fn forward<T: KernelFloat>(
        &self,
        d: &ConvDims,
        x: &[T],
        w: &[T],
        init: Option<&[T]>,
    ) -> Vec<T> {
        if self.winograd(d) {
            return winograd::forward(d, x, w, init);
        }
        if self.shifted(d) {
            return shifted::forward(d, x, w, init);
        }
        let (l, hw) = (d.l(), d.h * d.w);
        let chunks = self.channel_chunks(d.c, l);
        let mut y = match init {
            Some(v) => v.to_vec(),
            None => crate::kernel::zeroed(d.b * d.oc * l),
        };
        let mut cols = vec![T::zero(); chunks[0].1 * d.taps * l];
        for i in 0..d.b {
            for (k, &(c0, n)) in chunks.iter().enumerate() {
                let g = d.block(n);
                let cols = &mut cols[..n * d.taps * l];
                unfold_into(&g, &x[(i * d.c + c0) * hw..][..n * hw], cols);
                gemm_into(
                    &mut y,
                    MatView::rows_of(d.oc, l, i * d.oc * l, l),
                    k > 0 || init.is_some(),
                    w,
                    d.w_block(c0, n),
                    cols,
                    MatView::rows_of(n * d.taps, l, 0, l),
                );
            }
        }
        y
    }

    /// `dX_i[chunk] = fold(W[:, chunk]ᵀ @ dY_i)`, folded straight into the `(B, C, H, W)` result.
    fn grad_input<T: KernelFloat>(&self, d: &ConvDims, w: &[T], gy: &[T]) -> Vec<T> {
        if self.winograd(d) {
            return winograd::grad_input(d, w, gy);
        }
        if self.shifted(d) {
            return shifted::grad_input(d, w, gy);
        }
        let (l, hw) = (d.l(), d.h * d.w);
        let chunks = self.channel_chunks(d.c, l);
        let mut gx = crate::kernel::zeroed(d.b * d.c * hw);
        let mut gcols = vec![T::zero(); chunks[0].1 * d.taps * l];
        for i in 0..d.b {
            for &(c0, n) in &chunks {
                let gcols = &mut gcols[..n * d.taps * l];
                gemm_into(
                    gcols,
                    MatView::rows_of(n * d.taps, l, 0, l),
                    false,
                    w,
                    d.w_block(c0, n).t(),
                    gy,
                    MatView::rows_of(d.oc, l, i * d.oc * l, l),
                );
                fold_channels(&d.block(n), gcols, &mut gx[(i * d.c + c0) * hw..][..n * hw]);
            }
        }
        gx
    }

    /// `dW[:, chunk] = Σ_i dY_i @ unfold(x_i[chunk])ᵀ`, accumulated in the `(OC, WC, KH, KW)`
    /// result (zero outside the input's channels).
    ///
    /// On unfold blocks, unless the convolution runs on the shifted GEMMs and one image's
    /// unfold exceeds [`ConvGemm::max_cols`] (large maps): then one `(OC, C)` product per tap
    /// over all pixels of the shifted frame ([`shifted::grad_weight`]), which at 2x160², 256
    /// channels, 3x3 took 750–770 ms for both gradients against 860–890 ms with the unfold split
    /// in two channel blocks per image (`core/examples/conv_products`, 2 threads), and which the
    /// unfold beats where it fits whole (2x80²: even; 256x14²: 694 against 813 ms).
    ///
    /// When one image's columns fit [`ConvGemm::max_cols`] with room for more, images are
    /// unfolded in groups and each group is one GEMM (the mask head's hundreds of 14x14 RoIs: a
    /// few products with an inner dimension of thousands instead of one per RoI with 196).
    fn grad_weight<T: KernelFloat>(&self, d: &ConvDims, x: &[T], gy: &[T]) -> Vec<T> {
        if self.winograd(d) {
            return winograd::grad_weight(d, x, gy);
        }
        let (l, hw) = (d.l(), d.h * d.w);
        let chunks = self.channel_chunks(d.c, l);
        if chunks.len() > 1 && self.shifted(d) {
            return shifted::grad_weight(d, x, gy);
        }
        let mut gw = vec![T::zero(); d.oc * d.wc * d.taps];
        let per_image = (d.c * d.taps * l).max(1);
        let group = (self.max_cols / per_image).clamp(1, d.b.max(1));
        if chunks.len() == 1 && group > 1 {
            // dY as (OC, B, L): the rows of a group of images are then one strided view.
            let mut gyt = crate::kernel::zeroed(gy.len());
            gyt.par_chunks_mut(d.b * l)
                .enumerate()
                .for_each(|(o, dst)| {
                    for i in 0..d.b {
                        dst[i * l..][..l].copy_from_slice(&gy[(i * d.oc + o) * l..][..l]);
                    }
                });
            let mut cols = vec![T::zero(); group * per_image];
            for (k, i0) in (0..d.b).step_by(group).enumerate() {
                let m = group.min(d.b - i0);
                let g = Geom { b: m, ..d.g1 };
                let cols = &mut cols[..m * per_image];
                unfold_into(&g, &x[i0 * d.c * hw..][..m * d.c * hw], cols);
                gemm_into(
                    &mut gw,
                    d.w_block(0, d.c),
                    k > 0,
                    &gyt,
                    MatView::rows_of(d.oc, m * l, i0 * l, d.b * l),
                    cols,
                    MatView::rows_of(d.c * d.taps, m * l, 0, m * l).t(),
                );
            }
            return gw;
        }
        let mut cols = vec![T::zero(); chunks[0].1 * d.taps * l];
        for i in 0..d.b {
            for &(c0, n) in &chunks {
                let g = d.block(n);
                let cols = &mut cols[..n * d.taps * l];
                unfold_into(&g, &x[(i * d.c + c0) * hw..][..n * hw], cols);
                gemm_into(
                    &mut gw,
                    d.w_block(c0, n),
                    i > 0,
                    gy,
                    MatView::rows_of(d.oc, l, i * d.oc * l, l),
                    cols,
                    MatView::rows_of(n * d.taps, l, 0, l).t(),
                );
            }
        }
        gw
    }
}

/// Which product of the convolution a [`ConvGemmOp`] computes from its two operands. `c_off`:
/// the input meets the weight's input channels `c_off..` (see [`conv2d_gemm_cat`]).
#[derive(Debug, Clone, Copy)]
enum ConvProduct {
    /// `(x, w) → y`.
    Forward { c_off: usize },
    /// `(w, dY) → dX` for an input of the given `(B, C, H, W)`.
    GradInput {
        x: (usize, usize, usize, usize),
        c_off: usize,
    },
    /// `(x, dY) → dW` for a weight of the given `(OC, WC, KH, KW)`.
    GradWeight {
        w: (usize, usize, usize, usize),
        c_off: usize,
    },
}

/// One of the three products of [`ConvGemm`] as a candle op (only the forward one has a
/// backward).
struct ConvGemmOp {
    conv: ConvGemm,
    product: ConvProduct,
}

fn check_grad_len(gy: usize, d: &ConvDims, l: &Layout) -> Result<()> {
    if gy != d.b * d.oc * d.l() {
        candle_core::bail!("conv2d_gemm backward: output gradient {:?}", l.shape());
    }
    Ok(())
}

impl ConvGemmOp {
    fn run<T: KernelFloat>(
        &self,
        a: &[T],
        b: &[T],
        la: &Layout,
        lb: &Layout,
    ) -> Result<(Vec<T>, Shape)> {
        let p = self.conv.p;
        Ok(match self.product {
            ConvProduct::Forward { c_off } => {
                let d = ConvDims::new(la.shape().dims4()?, lb.shape().dims4()?, c_off, p)?;
                let y = self.conv.forward(&d, a, b, None);
                (y, Shape::from((d.b, d.oc, d.g1.oh, d.g1.ow)))
            }
            ConvProduct::GradInput { x, c_off } => {
                let d = ConvDims::new(x, la.shape().dims4()?, c_off, p)?;
                check_grad_len(b.len(), &d, lb)?;
                let gx = self.conv.grad_input(&d, a, b);
                (gx, Shape::from(x))
            }
            ConvProduct::GradWeight { w, c_off } => {
                let d = ConvDims::new(la.shape().dims4()?, w, c_off, p)?;
                check_grad_len(b.len(), &d, lb)?;
                let gw = self.conv.grad_weight(&d, a, b);
                (gw, Shape::from(w))
            }
        })
    }
}

/// The gradients of a convolution with input `x` and weight `w` (channels from `c_off`).
fn conv_grads(
    conv: ConvGemm,
    c_off: usize,
    x: &Tensor,
    w: &Tensor,
    grad: &Tensor,
) -> Result<(Tensor, Tensor)> {
    let (x, w) = (x.detach(), w.detach());
    let grad = grad.detach().contiguous()?;
    let gx = w.apply_op2_no_bwd(
        &grad,
        &ConvGemmOp {
            conv,
            product: ConvProduct::GradInput {
                x: x.dims4()?,
                c_off,
            },
        },
    )?;
    let gw = x.apply_op2_no_bwd(
        &grad,
        &ConvGemmOp {
            conv,
            product: ConvProduct::GradWeight {
                w: w.dims4()?,
                c_off,
            },
        },
    )?;
    Ok((gx, gw))
}

impl candle_core::CustomOp2 for ConvGemmOp {
    fn name(&self) -> &'static str {
        "conv2d-gemm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        crate::cpu_float!(raw "conv2d_gemm"; a = (s1, l1), b = (s2, l2) => {
            let (v, s) = self.run(a, b, l1, l2)?;
            Ok((crate::kernel::owned(v), s))
        })
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let c_off = match self.product {
            ConvProduct::Forward { c_off } => c_off,
            _ => candle_core::bail!("conv2d_gemm: gradient products have no backward"),
        };
        let (gx, gw) = conv_grads(self.conv, c_off, x, w, grad)?;
        Ok((Some(gx), Some(gw)))
    }
}

/// `acc + conv(x, w[:, c_off..c_off + C_x])`: one part of a convolution over a channel
/// concatenation, added to the sum of the parts before it.
struct ConvAccumulate {
    conv: ConvGemm,
    c_off: usize,
    /// `Some((H, W, align_corners))`: the part is first resized bilinearly to `(H, W)` (not kept;
    /// recomputed in the backward).
    resize: Option<(usize, usize, bool)>,
}

impl ConvAccumulate {
    fn run<T: KernelFloat + num_traits::Float>(
        &self,
        acc: &[T],
        x: &[T],
        w: &[T],
        lx: &Layout,
        lw: &Layout,
    ) -> Result<(Vec<T>, Shape)> {
        let (b, c, h, wd) = lx.shape().dims4()?;
        let resized;
        let (x, lx) = match self.resize {
            Some((oh, ow, ac)) if (oh, ow) != (h, wd) => {
                let r = super::resample::Resample::bilinear(h, wd, oh, ow, ac);
                resized = r.forward(x, b * c);
                (&resized[..], Layout::contiguous((b, c, oh, ow)))
            }
            _ => (x, lx.clone()),
        };
        let lx = &lx;
        let d = ConvDims::new(
            lx.shape().dims4()?,
            lw.shape().dims4()?,
            self.c_off,
            self.conv.p,
        )?;
        if acc.len() != d.b * d.oc * d.l() {
            candle_core::bail!(
                "conv2d_gemm_cat: part of {} elements, expected ({}, {}, {}, {})",
                acc.len(),
                d.b,
                d.oc,
                d.g1.oh,
                d.g1.ow
            );
        }
        let y = self.conv.forward(&d, x, w, Some(acc));
        Ok((y, Shape::from((d.b, d.oc, d.g1.oh, d.g1.ow))))
    }
}

impl candle_core::CustomOp3 for ConvAccumulate {
    fn name(&self) -> &'static str {
        "conv2d-gemm-accumulate"
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
        crate::cpu_float!(raw "conv2d_gemm_cat"; a = (s1, l1), x = (s2, l2), w = (s3, l3) => {
            let (v, s) = self.run(a, x, w, l2, l3)?;
            Ok((crate::kernel::owned(v), s))
        })
    }

    fn bwd(
        &self,
        _acc: &Tensor,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (_, _, h, wd) = x.dims4()?;
        match self.resize {
            Some((oh, ow, ac)) if (oh, ow) != (h, wd) => {
                let xr = super::resample::resize_bilinear(&x.detach(), oh, ow, ac)?;
                let (gxr, gw) = conv_grads(self.conv, self.c_off, &xr, w, grad)?;
                drop(xr);
                let gx = super::resample::resize_bilinear_adjoint(&gxr, h, wd, ac)?;
                Ok((Some(grad.detach()), Some(gx), Some(gw)))
            }
            _ => {
                let (gx, gw) = conv_grads(self.conv, self.c_off, x, w, grad)?;
                Ok((Some(grad.detach()), Some(gx), Some(gw)))
            }
        }
    }
}

/// [`conv2d_gemm`] of the channel concatenation of `xs` (each `(B, C_j, H, W)`, `Σ C_j` = the
/// weight's input channels) without building it: `Σ_j conv(x_j, w[:, channels of j])`, one
/// accumulating op per part. Equal to `conv2d_gemm(&Tensor::cat(xs, 1)?, w, ..)` in value and
/// gradients; the graph keeps the parts (which a `cat` keeps too) and `(B, C_out, OH, OW)`
/// partial sums instead of the concatenation, and the backward never materialises the gradient
/// of the concatenation (for UperNet's `fpn_bottleneck` at 512², batch 2: 256 MB kept and three
/// 256 MB transients in the backward, the peak of the training step).
///
/// Errors: no parts; channel counts that do not add up to the weight's; the [`conv2d_gemm`]
/// errors.
pub fn conv2d_gemm_cat(
    xs: &[Tensor],
    w: &Tensor,
    stride: usize,
    padding: usize,
    dilation: usize,
) -> Result<Tensor> {
    cat_conv(
        &super::dispatch::CONV2D_GEMM_CAT,
        xs,
        None,
        w,
        stride,
        padding,
        dilation,
    )
}

/// [`conv2d_gemm_cat`] of the parts each resized bilinearly
/// ([`super::resample::resize_bilinear`] semantics) to `size = (H, W)` first: UperNet's
/// `fpn_bottleneck(cat([resize(o, size) for o in outs]))`. The resized parts are neither kept
/// nor built all at once: each is made inside its op, used and dropped, and made again in the
/// backward. Equal to resize + cat + conv in value and gradients.
///
/// Errors: as [`conv2d_gemm_cat`], plus the resize errors.
pub fn conv2d_gemm_cat_resized(
    xs: &[Tensor],
    size: (usize, usize),
    align_corners: bool,
    w: &Tensor,
    stride: usize,
    padding: usize,
    dilation: usize,
) -> Result<Tensor> {
    cat_conv(
        &super::dispatch::CONV2D_GEMM_CAT_RESIZED,
        xs,
        Some((size.0, size.1, align_corners)),
        w,
        stride,
        padding,
        dilation,
    )
}

fn cat_conv(
    op: &super::dispatch::Op,
    xs: &[Tensor],
    resize: Option<(usize, usize, bool)>,
    w: &Tensor,
    stride: usize,
    padding: usize,
    dilation: usize,
) -> Result<Tensor> {
    let (_, ic, kh, kw) = w.dims4()?;
    let total: usize = xs
        .iter()
        .map(|x| x.dims4().map(|d| d.1))
        .sum::<Result<usize>>()?;
    if xs.is_empty() || total != ic {
        candle_core::bail!(
            "conv2d_gemm_cat: parts with {total} channels in all, weight {:?} expects {ic}",
            w.dims()
        );
    }
    if !super::dispatch::select(op, &xs[0]).is_ours() {
        let parts = match resize {
            Some((h, wd, ac)) => xs
                .iter()
                .map(|x| super::resample::resize_bilinear(x, h, wd, ac))
                .collect::<Result<Vec<_>>>()?,
            None => xs.to_vec(),
        };
        return candle_conv2d(&Tensor::cat(&parts, 1)?, w, stride, padding, dilation, 1);
    }
    let conv = ConvGemm::new(UnfoldParams {
        kernel: (kh, kw),
        stride,
        padding,
        dilation,
    });
    let w = w.contiguous()?;
    let first = match resize {
        Some((h, wd, ac)) => super::resample::resize_bilinear(&xs[0], h, wd, ac)?,
        None => xs[0].clone(),
    };
    let mut y = first.contiguous()?.apply_op2(
        &w,
        ConvGemmOp {
            conv,
            product: ConvProduct::Forward { c_off: 0 },
        },
    )?;
    let mut c_off = xs[0].dim(1)?;
    for x in &xs[1..] {
        y = y.apply_op3(
            &x.contiguous()?,
            &w,
            ConvAccumulate {
                conv,
                c_off,
                resize,
            },
        )?;
        c_off += x.dim(1)?;
    }
    Ok(y)
}

/// Dense (`groups = 1`) 2-D convolution, `torch.nn.functional.conv2d` semantics, lowered to
/// `unfold` + GEMM, with both gradients GEMMs as well (the unfolded input is recomputed in the
/// backward rather than kept): `x (B, C_in, H, W)`, `w (C_out, C_in, KH, KW)` →
/// `(B, C_out, OH, OW)` (no bias). Input rows/columns that a stride leaves unread get a zero
/// gradient, as in PyTorch.
///
/// Errors: channel or dtype mismatch between `x` and `w`, and the geometry errors of `unfold`
/// (a kernel span larger than the padded input, zero stride or dilation).
pub fn conv2d_gemm(
    x: &Tensor,
    w: &Tensor,
    stride: usize,
    padding: usize,
    dilation: usize,
) -> Result<Tensor> {
    let c = x.dims4()?.1;
    let (_, ic, kh, kw) = w.dims4()?;
    if ic != c {
        candle_core::bail!(
            "conv2d_gemm: input has {c} channels, weight {:?} expects {ic}",
            w.dims()
        );
    }
    if !super::dispatch::select(&super::dispatch::CONV2D_GEMM, x).is_ours() {
        return candle_conv2d(x, w, stride, padding, dilation, 1);
    }
    let p = UnfoldParams {
        kernel: (kh, kw),
        stride,
        padding,
        dilation,
    };
    x.contiguous()?.apply_op2(
        &w.contiguous()?,
        ConvGemmOp {
            conv: ConvGemm::new(p),
            product: ConvProduct::Forward { c_off: 0 },
        },
    )
}

/// candle's `conv2d`, made safe for training when the stride leaves trailing input rows/columns
/// unread (`(L + 2p - span) % s != 0`, e.g. a 3x3/2 conv on an odd map): candle 0.11's backward
/// then produces a gradient of the wrong shape. Those rows never influence the output, so they are
/// cropped off first (explicit zero padding, then a narrow); the output is unchanged and the
/// gradient of the cropped rows is 0, as PyTorch computes it.
pub(crate) fn candle_conv2d(
    x: &Tensor,
    w: &Tensor,
    stride: usize,
    padding: usize,
    dilation: usize,
    groups: usize,
) -> Result<Tensor> {
    let (_, _, h, wd) = x.dims4()?;
    let k = w.dim(2)?;
    let span = dilation * (k - 1) + 1;
    let unread = |len: usize| {
        if len + 2 * padding >= span {
            (len + 2 * padding - span) % stride
        } else {
            0
        }
    };
    let (rh, rw) = (unread(h), unread(wd));
    if rh == 0 && rw == 0 {
        return x.conv2d(w, padding, stride, dilation, groups);
    }
    let xp = x
        .pad_with_zeros(2, padding, padding)?
        .pad_with_zeros(3, padding, padding)?;
    let xp = xp
        .narrow(2, 0, h + 2 * padding - rh)?
        .narrow(3, 0, wd + 2 * padding - rw)?;
    xp.conv2d(w, 0, stride, dilation, groups)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Var;

    fn randn(shape: &[usize], seed: u64) -> Tensor {
        densepred_testutil::randn(shape, seed, candle_core::DType::F64)
    }

    /// Forward equals candle's direct conv2d and gradients equal candle's conv2d backward (both in
    /// f64, where the only difference is summation order: 1e-10).
    #[test]
    fn matches_candle_conv2d_values_and_gradients() {
        for &(b, c, oc, h, w, k, s, p, d) in &[
            (
                2usize, 3usize, 4usize, 7usize, 9usize, 3usize, 1usize, 1usize, 1usize,
            ),
            (1, 2, 3, 8, 8, 3, 2, 1, 1),
            (2, 2, 2, 9, 7, 3, 2, 1, 1), // odd sizes: last row/col unread by the stride
            (1, 3, 2, 10, 10, 3, 1, 2, 2),
            (2, 2, 3, 6, 5, 1, 1, 0, 1),
            (1, 2, 2, 5, 5, 5, 1, 0, 1),
            // Several images sharing the shifted frame's zero rows, padding beyond the reach.
            (3, 2, 3, 4, 5, 3, 1, 1, 1),
            (2, 2, 2, 5, 4, 3, 1, 2, 1),
            // A 1x1 kernel with padding: the output is wider than the shared-padding row.
            (2, 2, 3, 4, 5, 1, 1, 1, 1),
            // Many small images: the shifted frame with the images innermost, dilated, and
            // with one GEMM per output row (OW·B ≥ 1024).
            (12, 2, 3, 4, 5, 3, 1, 1, 1),
            (6, 2, 2, 5, 5, 3, 1, 2, 2),
            (256, 2, 2, 3, 4, 3, 1, 1, 1),
            // One-pixel maps (a P6 level of a small image): one Winograd tile, mostly padding.
            (2, 2, 3, 1, 1, 3, 1, 1, 1),
            (1, 2, 2, 1, 5, 3, 1, 1, 1),
        ] {
            let x = Var::from_tensor(&randn(&[b, c, h, w], 1)).unwrap();
            let wt = Var::from_tensor(&randn(&[oc, c, k, k], 2)).unwrap();
            // Reference: candle's conv2d on an explicitly padded and cropped input (its own
            // backward mis-shapes gradients when the stride leaves rows unread).
            let span = d * (k - 1) + 1;
            let (rh, rw) = ((h + 2 * p - span) % s, (w + 2 * p - span) % s);
            let xp = x
                .pad_with_zeros(2, p, p)
                .unwrap()
                .pad_with_zeros(3, p, p)
                .unwrap()
                .narrow(2, 0, h + 2 * p - rh)
                .unwrap()
                .narrow(3, 0, w + 2 * p - rw)
                .unwrap();
            let refr = xp.conv2d(&wt, 0, s, d, 1).unwrap();
            // Both lowerings (the shifted GEMMs exist for stride 1 only).
            let mut lowerings = if s == 1 {
                vec![Lowering::Unfold, Lowering::Shifted]
            } else {
                vec![Lowering::Unfold]
            };
            if (k, s, p, d) == (3, 1, 1, 1) {
                lowerings.push(Lowering::Winograd);
            }
            for lowering in lowerings {
                let conv = ConvGemm {
                    lowering,
                    // The shifted lowering's own weight gradient runs where the unfold would be
                    // split over channels: force that with a one-element column budget.
                    max_cols: if lowering == Lowering::Shifted {
                        1
                    } else {
                        MAX_COLS
                    },
                    ..ConvGemm::new(UnfoldParams {
                        kernel: (k, k),
                        stride: s,
                        padding: p,
                        dilation: d,
                    })
                };
                let dims = ConvDims::new((b, c, h, w), (oc, c, k, k), 0, conv.p).unwrap();
                assert_eq!(conv.shifted(&dims), lowering == Lowering::Shifted);
                assert_eq!(conv.winograd(&dims), lowering == Lowering::Winograd);
                let ours = x
                    .as_tensor()
                    .apply_op2(
                        wt.as_tensor(),
                        ConvGemmOp {
                            conv,
                            product: ConvProduct::Forward { c_off: 0 },
                        },
                    )
                    .unwrap();
                assert_eq!(ours.dims(), refr.dims());
                densepred_testutil::assert_same_values_and_grads(
                    &ours,
                    &refr,
                    &[&x, &wt],
                    3,
                    1e-10,
                );
            }
        }
    }

    /// fold is the adjoint of unfold: <unfold(x), y> == <x, fold(y)>.
    /// Splitting the input channels into blocks (what large convolutions do) changes nothing:
    /// values and both gradients equal the single-block computation (f64, 1e-12).
    #[test]
    fn channel_blocks_match_single_block() {
        let p = UnfoldParams {
            kernel: (3, 3),
            stride: 1,
            padding: 1,
            dilation: 1,
        };
        let x = Var::from_tensor(&randn(&[2, 7, 6, 5], 3)).unwrap();
        let w = Var::from_tensor(&randn(&[4, 7, 3, 3], 4)).unwrap();
        let run = |max_cols: usize| {
            let y = x
                .as_tensor()
                .apply_op2(
                    w.as_tensor(),
                    ConvGemmOp {
                        conv: ConvGemm {
                            p,
                            max_cols,
                            lowering: Lowering::Unfold,
                        },
                        product: ConvProduct::Forward { c_off: 0 },
                    },
                )
                .unwrap();
            let loss = (&y * &y).unwrap().sum_all().unwrap();
            let g = loss.backward().unwrap();
            (
                y,
                g.get(x.as_tensor()).unwrap().clone(),
                g.get(w.as_tensor()).unwrap().clone(),
            )
        };
        let whole = run(MAX_COLS);
        // 3 channels' columns (3·9·30) per block: blocks of 3, 3 and 1 channels.
        let split = run(3 * 9 * 30);
        for (a, b) in [
            (&whole.0, &split.0),
            (&whole.1, &split.1),
            (&whole.2, &split.2),
        ] {
            let d = densepred_testutil::max_abs(&a, &b);
            assert!(d < 1e-12, "max diff {d}");
        }
    }

    /// The weight gradient over groups of images (two, then one) equals the one over all three
    /// images at once and the per-image one (f64, 1e-12).
    #[test]
    fn image_groups_match_one_group() {
        let p = UnfoldParams {
            kernel: (3, 3),
            stride: 1,
            padding: 1,
            dilation: 1,
        };
        let x = randn(&[3, 4, 5, 6], 7);
        let gy = randn(&[3, 2, 5, 6], 9);
        let per_image = 4 * 9 * 30;
        let grad_weight = |max_cols: usize| {
            let conv = ConvGemm {
                p,
                max_cols,
                lowering: Lowering::Unfold,
            };
            let d = ConvDims::new((3, 4, 5, 6), (2, 4, 3, 3), 0, p).unwrap();
            let flat = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f64>().unwrap();
            let gw = conv.grad_weight(&d, &flat(&x), &flat(&gy));
            Tensor::from_vec(gw, (2, 4, 3, 3), &candle_core::Device::Cpu).unwrap()
        };
        let all = grad_weight(3 * per_image);
        assert!(densepred_testutil::max_abs(&all, &all.zeros_like().unwrap()) > 0.1);
        for max_cols in [2 * per_image, per_image] {
            let d = densepred_testutil::max_abs(&all, &grad_weight(max_cols));
            assert!(d < 1e-12, "max_cols {max_cols}: max diff {d}");
        }
    }

    /// The convolution of a concatenation computed part by part equals the convolution of the
    /// built concatenation, in value and in the gradients of every part and of the weight (f64,
    /// 1e-12): 3 parts, strided and padded, and a single part.
    #[test]
    fn cat_convolution_matches_convolution_of_the_cat() {
        for (chans, k, s, p) in [
            (vec![2usize, 3, 1], 3usize, 2usize, 1usize),
            (vec![4], 3, 1, 1),
            (vec![1, 2], 1, 1, 0),
            // The first part on the shifted GEMMs, the second on the unfold (its channels are
            // below SHIFTED_MIN_CHANNELS): the accumulation crosses lowerings.
            (vec![SHIFTED_MIN_CHANNELS, 3], 3, 1, 1),
            // Two parts on Winograd's F(2x2, 3x3) (weight channels from an offset, the second
            // adding to the first's output), the third on the shifted GEMMs.
            (
                vec![
                    WINOGRAD_MIN_CHANNELS,
                    WINOGRAD_MIN_CHANNELS,
                    SHIFTED_MIN_CHANNELS,
                ],
                3,
                1,
                1,
            ),
        ] {
            let xs: Vec<Var> = chans
                .iter()
                .enumerate()
                .map(|(i, &c)| Var::from_tensor(&randn(&[2, c, 7, 6], 10 + i as u64)).unwrap())
                .collect();
            let total: usize = chans.iter().sum();
            let oc = if chans[0] >= WINOGRAD_MIN_CHANNELS {
                WINOGRAD_MIN_CHANNELS
            } else {
                5
            };
            let w = Var::from_tensor(&randn(&[oc, total, k, k], 3)).unwrap();
            let parts: Vec<Tensor> = xs.iter().map(|v| v.as_tensor().clone()).collect();
            let ours = conv2d_gemm_cat(&parts, &w, s, p, 1).unwrap();
            let refr = conv2d_gemm(&Tensor::cat(&parts, 1).unwrap(), &w, s, p, 1).unwrap();
            let wrt: Vec<&Tensor> = xs
                .iter()
                .map(|v| v.as_tensor())
                .chain([w.as_tensor()])
                .collect();
            densepred_testutil::assert_same_values_and_grads(&ours, &refr, &wrt, 4, 1e-12);
        }
        let bad = [randn(&[1, 2, 4, 4], 1)];
        assert!(conv2d_gemm_cat(&bad, &randn(&[3, 3, 3, 3], 2), 1, 1, 1).is_err());
    }

    /// Resizing the parts inside the concatenated convolution equals resize + cat + conv, and
    /// `add_resized` equals add + resize (values and gradients, f64, 1e-12); both
    /// `align_corners`, up- and same-size parts.
    #[test]
    fn resized_parts_match_resize_then_cat_convolution() {
        use crate::ops::{add_resized, resize_bilinear};
        for ac in [false, true] {
            let sizes = [(8usize, 10usize), (4, 5), (3, 3), (8, 10)];
            let xs: Vec<Var> = sizes
                .iter()
                .enumerate()
                .map(|(i, &(h, w))| Var::from_tensor(&randn(&[2, 2, h, w], 30 + i as u64)).unwrap())
                .collect();
            let w = Var::from_tensor(&randn(&[3, 8, 3, 3], 5)).unwrap();
            let parts: Vec<Tensor> = xs.iter().map(|v| v.as_tensor().clone()).collect();
            let ours = conv2d_gemm_cat_resized(&parts, (8, 10), ac, &w, 1, 1, 1).unwrap();
            let resized: Vec<Tensor> = parts
                .iter()
                .map(|p| resize_bilinear(p, 8, 10, ac).unwrap())
                .collect();
            let refr = conv2d_gemm(&Tensor::cat(&resized, 1).unwrap(), &w, 1, 1, 1).unwrap();
            // add_resized on top: (3 channels at 8x10) + (3 channels at 3x3) resized.
            let a = Tensor::cat(&[&parts[0], &parts[3].narrow(1, 0, 1).unwrap()], 1).unwrap();
            let small = Tensor::cat(&[&parts[2], &parts[2].narrow(1, 1, 1).unwrap()], 1).unwrap();
            let ours = (&ours + add_resized(&a, &small, ac).unwrap()).unwrap();
            let refr =
                (&refr + (&a + resize_bilinear(&small, 8, 10, ac).unwrap()).unwrap()).unwrap();
            let wrt: Vec<&Tensor> = xs
                .iter()
                .map(|v| v.as_tensor())
                .chain([w.as_tensor()])
                .collect();
            densepred_testutil::assert_same_values_and_grads(&ours, &refr, &wrt, 6, 1e-12);
        }
    }

    #[test]
    fn fold_is_adjoint_of_unfold() {
        let p = UnfoldParams {
            kernel: (3, 2),
            stride: 2,
            padding: 1,
            dilation: 2,
        };
        let x = randn(&[2, 3, 9, 8], 4);
        let u = unfold(&x, p).unwrap();
        let y = randn(u.dims(), 5);
        let g = Geom::new(2, 3, 9, 8, p).unwrap();
        let f = y.apply_op1_no_bwd(&Fold { g }).unwrap();
        let lhs = (&u * &y)
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f64>()
            .unwrap();
        let rhs = (&x * &f)
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f64>()
            .unwrap();
        assert!(
            (lhs - rhs).abs() < 1e-9 * lhs.abs().max(1.0),
            "{lhs} vs {rhs}"
        );
    }
}
