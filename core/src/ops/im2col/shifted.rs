//! The stride-1 dense convolution without an unfolded matrix: one GEMM per kernel tap on a
//! shifted view of the zero-padded input.
//!
//! The input is copied once into a padded, channel-major buffer of rows `Wp = W + p` wide: `p`
//! zero rows, then each image's `H` rows followed by `p` zero rows (`Hp = H + p` rows per image),
//! each row holding `p` zeros and then the image's `W` pixels; pixel `(y, x)` of image `b` sits
//! at `(p + b·Hp + y)·Wp + p + x`. The zero rows and columns are shared: the gap after a row (or
//! an image) is the left (top) padding of the next one, and a read `p` beyond the right edge
//! wraps into the next row's leading zeros. With a stride of 1, output pixel `(oy, ox)` of image
//! `b` at tap `(ky, kx)` reads column `j + off` with `j = (b·Hp + oy)·Wp + ox` and
//! `off = (ky·Wp + kx)·d` (its reads span the `p` zero rows and columns around the image), so for
//! every tap the input operand is the same `(C, ·)` matrix shifted by `off` columns, and
//! `Y_ext = Σ_taps W[:, :, ky, kx] @ X_pad[:, off_tap ..]` over the columns `j`. Columns with
//! `ox ≥ OW` or `oy ≥ OH` are computed and dropped (a `p/Wp + p/Hp` overhead, ~1% at 160² and
//! 15% on 14² RoIs, where separate `(H + 2p) × (W + 2p)` frames cost 31%); the result is cropped
//! into `(B, OC, OH, OW)`. The input gradient is the adjoint GEMMs on the same views,
//! `dX_pad[:, off ..] += W_tapᵀ @ dY_ext` with `dY_ext` zero on the dropped columns (what lands
//! on the shared zeros is discarded). (The weight gradient stays on the unfold: see
//! `ConvGemm::grad_weight`.)
//!
//! Against unfold + one GEMM this writes `1x` the input instead of `KH·KW`x, touches no large
//! fresh buffer per call, and makes the batch one GEMM (the mask head's hundreds of 14x14 RoIs:
//! one product per tap instead of one per RoI). It is the "shifted GEMM" lowering of direct
//! convolution on CPUs; the inner dimension of each GEMM is `C` instead of `C·KH·KW`, which is
//! why the caller keeps the unfold for thin inputs (see `ConvGemm::shifted`).

use super::ConvDims;
use crate::kernel::{gemm_into, KernelFloat, MatView};
use rayon::prelude::*;

/// The padded frame of one convolution: `(Hp, Wp)`, the length of a channel's padded buffer,
/// the computed columns and the column offset of each tap.
struct Frame {
    hp: usize,
    wp: usize,
    /// `(B·Hp + p + 1)·Wp`: the row stride of the padded input and of the extended output (the
    /// leading `p` zero rows, the images with their gaps, and a last row for the reads that wrap
    /// past the end).
    n: usize,
    /// Columns computed per tap: `(B−1)·Hp·Wp + (OH−1)·Wp + OW`, through the last output pixel
    /// (the last tap's view then ends `p` columns into the buffer's last row).
    cols: usize,
    offsets: Vec<usize>,
}

impl Frame {
    fn new(d: &ConvDims) -> Self {
        let g = &d.g1;
        let (hp, wp) = (g.h + g.p, g.w + g.p);
        let n = (d.b * hp + g.p + 1) * wp;
        let cols = (d.b - 1) * hp * wp + (g.oh - 1) * wp + g.ow;
        let offsets = (0..g.kh)
            .flat_map(|ky| (0..g.kw).map(move |kx| (ky * wp + kx) * g.d))
            .collect();
        Self {
            hp,
            wp,
            n,
            cols,
            offsets,
        }
    }

    /// Index of row `y`, column `x` of image `b`'s frame in a channel's buffer (input pixel
    /// `(y, x)` is at frame position `(y + p, x + p)`, output pixel `(oy, ox)` at `(oy, ox)`).
    fn at(&self, b: usize, y: usize, x: usize) -> usize {
        (b * self.hp + y) * self.wp + x
    }

    /// The `(rows, cols)` view of a `(rows, n)` buffer starting `off` columns in.
    fn view(&self, rows: usize, off: usize) -> MatView {
        MatView::rows_of(rows, self.cols, off, self.n)
    }
}

/// The `(OC, C)` weight slice of tap `k`: element `(o, c)` of `(OC, WC, KH·KW)` at
/// `o·WC·taps + (c_off + c)·taps + k`.
fn tap_weight(d: &ConvDims, k: usize) -> MatView {
    MatView {
        rows: d.oc,
        cols: d.c,
        offset: d.c_off * d.taps + k,
        rs: d.wc * d.taps,
        cs: d.taps,
    }
}

/// `x (B, C, H, W)` → the zero-padded `(C, n)` buffer.
fn pad<T: KernelFloat>(d: &ConvDims, f: &Frame, x: &[T]) -> Vec<T> {
    let (h, w, p) = (d.h, d.w, d.g1.p);
    let mut out = crate::kernel::zeroed(d.c * f.n);
    out.par_chunks_mut(f.n).enumerate().for_each(|(c, dst)| {
        for b in 0..d.b {
            let plane = &x[(b * d.c + c) * h * w..][..h * w];
            for y in 0..h {
                dst[f.at(b, y + p, p)..][..w].copy_from_slice(&plane[y * w..][..w]);
            }
        }
    });
    out
}

/// `(R, n)` → `(B, R, rows, cols)`: the window starting at frame position `(y0, x0)` of each image
/// (`rows × cols` pixels), added to `init` when given.
#[allow(clippy::too_many_arguments)]
fn crop<T: KernelFloat>(
    d: &ConvDims,
    f: &Frame,
    src: &[T],
    r: usize,
    (y0, x0): (usize, usize),
    (rows, cols): (usize, usize),
    init: Option<&[T]>,
) -> Vec<T> {
    let hw = rows * cols;
    let mut out = match init {
        Some(v) => v.to_vec(),
        None => crate::kernel::zeroed(d.b * r * hw),
    };
    out.par_chunks_mut(hw).enumerate().for_each(|(i, dst)| {
        let (b, ch) = (i / r, i % r);
        let plane = &src[ch * f.n..];
        for y in 0..rows {
            let s = &plane[f.at(b, y0 + y, x0)..][..cols];
            let o = &mut dst[y * cols..][..cols];
            if init.is_some() {
                o.iter_mut().zip(s).for_each(|(o, &s)| *o += s);
            } else {
                o.copy_from_slice(s);
            }
        }
    });
    out
}

/// `dY (B, OC, OH, OW)` → `(OC, n)` with the computed-and-dropped columns zero.
fn extend<T: KernelFloat>(d: &ConvDims, f: &Frame, gy: &[T]) -> Vec<T> {
    let (oh, ow) = (d.g1.oh, d.g1.ow);
    let mut out = crate::kernel::zeroed(d.oc * f.n);
    out.par_chunks_mut(f.n).enumerate().for_each(|(o, dst)| {
        for b in 0..d.b {
            let plane = &gy[(b * d.oc + o) * oh * ow..][..oh * ow];
            for y in 0..oh {
                dst[f.at(b, y, 0)..][..ow].copy_from_slice(&plane[y * ow..][..ow]);
            }
        }
    });
    out
}

/// `conv(x, w[:, c_off..])`, `(B, OC, OH, OW)`, added to a copy of `init` when given.
pub(super) fn forward<T: KernelFloat>(
    d: &ConvDims,
    x: &[T],
    w: &[T],
    init: Option<&[T]>,
) -> Vec<T> {
    let f = Frame::new(d);
    let xp = pad(d, &f, x);
    let mut y_ext = crate::kernel::zeroed(d.oc * f.n);
    for (k, &off) in f.offsets.iter().enumerate() {
        gemm_into(
            &mut y_ext,
            f.view(d.oc, 0),
            k > 0,
            w,
            tap_weight(d, k),
            &xp,
            f.view(d.c, off),
        );
    }
    drop(xp);
    crop(d, &f, &y_ext, d.oc, (0, 0), (d.g1.oh, d.g1.ow), init)
}

/// `dX (B, C, H, W)` from `dY (B, OC, OH, OW)`.
pub(super) fn grad_input<T: KernelFloat>(d: &ConvDims, w: &[T], gy: &[T]) -> Vec<T> {
    let f = Frame::new(d);
    let gy_ext = extend(d, &f, gy);
    let mut gxp = crate::kernel::zeroed(d.c * f.n);
    for (k, &off) in f.offsets.iter().enumerate() {
        gemm_into(
            &mut gxp,
            f.view(d.c, off),
            true,
            w,
            tap_weight(d, k).t(),
            &gy_ext,
            f.view(d.oc, 0),
        );
    }
    drop(gy_ext);
    let p = d.g1.p;
    crop(d, &f, &gxp, d.c, (p, p), (d.h, d.w), None)
}
