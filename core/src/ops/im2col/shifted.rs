//! The stride-1 dense convolution without an unfolded matrix: one GEMM per kernel tap on a
//! shifted view of the zero-padded input.
//!
//! The input is copied once into a padded, channel-major buffer (one row of length `n` per
//! channel) whose frame rows are `Wp = max(W + p, OW)` positions wide: each frame row holds `p`
//! zeros and then the image's `W` pixels (zeros after them up to `Wp`), and `p` zero rows sit above
//! the image's `H` rows and below them. The zero rows and columns are shared: the gap after a row
//! is the left padding of the next one, so a read up to `p` beyond the right edge wraps into the
//! next row's leading zeros. Frame position `(y, x)` of image `b` sits at
//! `b·sb + y·sy + x·sx`, in one of two layouts ([`Layout`]):
//!
//! - images outer: each image's rows follow the previous image's (`Hp = max(H + p, OH)` rows per
//!   image, the gap between images being the bottom padding of one and the top padding of the
//!   next): `(sb, sy, sx) = (Hp·Wp, Wp, 1)`;
//! - images inner: position-major with the image innermost, `(sb, sy, sx) = (1, Wp·B, B)`, so that
//!   one output row of all images is `OW·B` contiguous columns.
//!
//! With a stride of 1, output pixel `(oy, ox)` of image `b` sits at column `j = at(b, oy, ox)` and
//! reads at tap `(ky, kx)` column `j + off` with `off = (ky·sy + kx·sx)·d`, so for every tap the
//! input operand is the same `(C, ·)` matrix shifted by `off` columns, and
//! `Y_ext = Σ_taps W[:, :, ky, kx] @ X_pad[:, off_tap ..]` over the computed columns. Columns
//! between the output pixels (the `Wp − OW` gap after each row, and in the images-outer layout
//! the `Hp − OH` gap rows between images) are computed and dropped unless the layout lets the
//! GEMMs skip them: the images-inner layout with one GEMM per output row (`OW·B` columns each)
//! computes none. [`Frame::new`] picks the layout that computes fewer columns: images outer for a
//! few large maps (~1% dropped at 2x160²), images inner for many small ones (the mask head's
//! 14x14 RoIs: 15% dropped images-outer, none images-inner). The result is cropped into
//! `(B, OC, OH, OW)`. The input gradient is the adjoint GEMMs on the same views,
//! `dX_pad[:, off ..] += W_tapᵀ @ dY_ext` with `dY_ext` zero on the dropped columns (what lands
//! on the shared zeros is discarded). (The weight gradient stays on the unfold: see
//! `ConvGemm::grad_weight`.)
//!
//! Against unfold + one GEMM this writes `1x` the input instead of `KH·KW`x, touches no large
//! fresh buffer per call, and makes the batch one GEMM per tap (or per tap and output row) instead
//! of one per image. It is the "shifted GEMM" lowering of direct convolution on CPUs; the inner
//! dimension of each GEMM is `C` instead of `C·KH·KW`, which is why the caller keeps the unfold
//! for thin inputs (see `ConvGemm::shifted`).

use super::ConvDims;
use crate::kernel::{gemm_into, KernelFloat, MatView, SyncPtr};
use rayon::prelude::*;

/// Fewest columns (`OW·B`) of one output row for which the images-inner layout runs one GEMM per
/// output row instead of one over all rows and their gaps: narrower products run the GEMM
/// micro-kernels mostly on their edges.
const ROW_GEMM_MIN_COLS: usize = 1024;

/// Images per tile of the strided copies in and out of an images-inner frame.
const TILE: usize = 8;

/// Where the images sit in a channel's padded buffer (see the module documentation).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Layout {
    ImagesOuter,
    ImagesInner,
}

/// The padded frame of one convolution: the element strides of (image, frame row, frame column)
/// in a channel's buffer, the buffer's length, the computed column ranges and the column offset
/// of each tap.
struct Frame {
    /// Strides `(sb, sy, sx)`.
    sb: usize,
    sy: usize,
    sx: usize,
    /// Length of a channel's padded buffer: the row stride of the padded input and of the
    /// extended output (the leading `p` zero rows, the images with their gaps, and a last row for
    /// the reads that wrap past the end).
    n: usize,
    /// Column ranges `(start, len)` computed per tap; each output pixel lies in one of them.
    ranges: Vec<(usize, usize)>,
    offsets: Vec<usize>,
}

impl Frame {
    /// The layout computing fewer columns; images outer unless images inner saves more than 3%
    /// (its copies in and out of the frame are strided).
    fn new(d: &ConvDims) -> Self {
        let outer = Self::with_layout(d, Layout::ImagesOuter);
        let inner = Self::with_layout(d, Layout::ImagesInner);
        if inner.computed() * 100 < outer.computed() * 97 {
            inner
        } else {
            outer
        }
    }

    fn with_layout(d: &ConvDims, layout: Layout) -> Self {
        let g = &d.g1;
        let wp = (g.w + g.p).max(g.ow);
        let (sb, sy, sx, n) = match layout {
            Layout::ImagesOuter => {
                let hp = (g.h + g.p).max(g.oh);
                (hp * wp, wp, 1, (d.b * hp + g.p + 1) * wp)
            }
            Layout::ImagesInner => (1, wp * d.b, d.b, (g.h + 2 * g.p + 1) * wp * d.b),
        };
        let mut f = Self {
            sb,
            sy,
            sx,
            n,
            ranges: Vec::new(),
            offsets: (0..g.kh)
                .flat_map(|ky| (0..g.kw).map(move |kx| (ky * sy + kx * sx) * g.d))
                .collect(),
        };
        let last = f.at(d.b - 1, g.oh - 1, g.ow - 1) + 1;
        f.ranges = if layout == Layout::ImagesInner && g.ow * d.b >= ROW_GEMM_MIN_COLS {
            (0..g.oh).map(|oy| (f.at(0, oy, 0), g.ow * d.b)).collect()
        } else {
            vec![(0, last)]
        };
        f
    }

    /// Columns computed per tap.
    fn computed(&self) -> usize {
        self.ranges.iter().map(|r| r.1).sum()
    }

    /// Index of row `y`, column `x` of image `b`'s frame in a channel's buffer (input pixel
    /// `(y, x)` is at frame position `(y + p, x + p)`, output pixel `(oy, ox)` at `(oy, ox)`).
    fn at(&self, b: usize, y: usize, x: usize) -> usize {
        b * self.sb + y * self.sy + x * self.sx
    }

    /// The `(rows, len)` view of a `(rows, n)` buffer over the column range `(start, len)`,
    /// shifted `off` columns in.
    fn view(&self, rows: usize, (start, len): (usize, usize), off: usize) -> MatView {
        MatView::rows_of(rows, len, start + off, self.n)
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

/// `src (B, R, rows, cols)` → the zero `(R, n)` frame buffer with each image's maps at frame
/// position `(y0, x0)` (the padded input: `(p, p)`; the extended output gradient: `(0, 0)`).
fn to_frame<T: KernelFloat>(
    d: &ConvDims,
    f: &Frame,
    src: &[T],
    r: usize,
    (y0, x0): (usize, usize),
    (rows, cols): (usize, usize),
) -> Vec<T> {
    let hw = rows * cols;
    let mut out = crate::kernel::zeroed(r * f.n);
    out.par_chunks_mut(f.n).enumerate().for_each(|(ch, dst)| {
        let plane = |b: usize| &src[(b * r + ch) * hw..][..hw];
        for y in 0..rows {
            if f.sx == 1 {
                for b in 0..d.b {
                    let at = f.at(b, y0 + y, x0);
                    dst[at..][..cols].copy_from_slice(&plane(b)[y * cols..][..cols]);
                }
            } else {
                // Images inner: row `y` of all images is the `(cols, B)` block at `at`, the
                // transpose of their rows; in tiles of images so that the reads stay in L1
                // (the planes are a multiple of 4 KiB apart on the mask head's RoIs).
                let at = f.at(0, y0 + y, x0);
                for b0 in (0..d.b).step_by(TILE) {
                    let b1 = (b0 + TILE).min(d.b);
                    for x in 0..cols {
                        let o = &mut dst[at + x * f.sx + b0..][..b1 - b0];
                        for (o, b) in o.iter_mut().zip(b0..b1) {
                            *o = plane(b)[y * cols + x];
                        }
                    }
                }
            }
        }
    });
    out
}

/// `(R, n)` → `(B, R, rows, cols)`: the window starting at frame position `(y0, x0)` of each image
/// (`rows × cols` pixels), added to `init` when given. Parallel over the frame's channels, each
/// writing its own `(b, ch)` planes (the images-inner frame is then read once, in order).
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
    assert_eq!(out.len(), d.b * r * hw, "shifted conv: crop target");
    assert!(src.len() >= r * f.n, "shifted conv: frame buffer");
    let ptr = SyncPtr(out.as_mut_ptr());
    (0..r).into_par_iter().for_each(|ch| {
        let frame = &src[ch * f.n..][..f.n];
        // SAFETY: row `y` of plane `(b, ch)` lies inside `out` (length asserted above) and only
        // this task (channel `ch`) writes the planes of channel `ch`.
        let row = |b: usize, y: usize| unsafe {
            std::slice::from_raw_parts_mut(ptr.get().add((b * r + ch) * hw + y * cols), cols)
        };
        for y in 0..rows {
            for b0 in (0..d.b).step_by(TILE) {
                let b1 = (b0 + TILE).min(d.b);
                for b in b0..b1 {
                    let (o, at) = (row(b, y), f.at(b, y0 + y, x0));
                    if f.sx == 1 {
                        let s = &frame[at..][..cols];
                        if init.is_some() {
                            o.iter_mut().zip(s).for_each(|(o, &s)| *o += s);
                        } else {
                            o.copy_from_slice(s);
                        }
                    } else {
                        let s = frame[at..].iter().step_by(f.sx);
                        if init.is_some() {
                            o.iter_mut().zip(s).for_each(|(o, &s)| *o += s);
                        } else {
                            o.iter_mut().zip(s).for_each(|(o, &s)| *o = s);
                        }
                    }
                }
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
    let p = d.g1.p;
    let xp = to_frame(d, &f, x, d.c, (p, p), (d.h, d.w));
    let mut y_ext = crate::kernel::zeroed(d.oc * f.n);
    for (k, &off) in f.offsets.iter().enumerate() {
        for &range in &f.ranges {
            gemm_into(
                &mut y_ext,
                f.view(d.oc, range, 0),
                k > 0,
                w,
                tap_weight(d, k),
                &xp,
                f.view(d.c, range, off),
            );
        }
    }
    drop(xp);
    crop(d, &f, &y_ext, d.oc, (0, 0), (d.g1.oh, d.g1.ow), init)
}

/// `dX (B, C, H, W)` from `dY (B, OC, OH, OW)`.
pub(super) fn grad_input<T: KernelFloat>(d: &ConvDims, w: &[T], gy: &[T]) -> Vec<T> {
    let f = Frame::new(d);
    let gy_ext = to_frame(d, &f, gy, d.oc, (0, 0), (d.g1.oh, d.g1.ow));
    let mut gxp = crate::kernel::zeroed(d.c * f.n);
    for (k, &off) in f.offsets.iter().enumerate() {
        for &range in &f.ranges {
            gemm_into(
                &mut gxp,
                f.view(d.c, range, off),
                true,
                w,
                tap_weight(d, k).t(),
                &gy_ext,
                f.view(d.oc, range, 0),
            );
        }
    }
    drop(gy_ext);
    let p = d.g1.p;
    crop(d, &f, &gxp, d.c, (p, p), (d.h, d.w), None)
}

/// `dW (OC, WC, KH, KW)` from `x (B, C, H, W)` and `dY (B, OC, OH, OW)`, zero outside the
/// input's channels `c_off..c_off + C`: per tap, `dW[:, c_off.., ky, kx] = dY_ext @ X_pad[:, off ..]ᵀ`
/// over the computed columns (`dY_ext` is zero on the dropped ones).
pub(super) fn grad_weight<T: KernelFloat>(d: &ConvDims, x: &[T], gy: &[T]) -> Vec<T> {
    let f = Frame::new(d);
    let p = d.g1.p;
    let xp = to_frame(d, &f, x, d.c, (p, p), (d.h, d.w));
    let gy_ext = to_frame(d, &f, gy, d.oc, (0, 0), (d.g1.oh, d.g1.ow));
    let mut gw = vec![T::zero(); d.oc * d.wc * d.taps];
    for (k, &off) in f.offsets.iter().enumerate() {
        for (i, &range) in f.ranges.iter().enumerate() {
            gemm_into(
                &mut gw,
                tap_weight(d, k),
                i > 0,
                &gy_ext,
                f.view(d.oc, range, 0),
                &xp,
                f.view(d.c, range, off).t(),
            );
        }
    }
    gw
}

#[cfg(test)]
mod tests {
    use super::super::{ConvDims, UnfoldParams};
    use super::Frame;

    fn frame(b: usize, c: usize, h: usize, w: usize) -> (Frame, ConvDims) {
        let p = UnfoldParams {
            kernel: (3, 3),
            stride: 1,
            padding: 1,
            dilation: 1,
        };
        let d = ConvDims::new((b, c, h, w), (c, c, 3, 3), 0, p).unwrap();
        (Frame::new(&d), d)
    }

    /// The layout choice on the shapes it exists for: the mask head's 256 RoIs of 14x14 go
    /// images-inner with one GEMM per output row (no dropped column), two 160x160 maps stay
    /// images-outer (1.3% dropped).
    #[test]
    fn layout_choice() {
        let (f, d) = frame(256, 8, 14, 14);
        assert_eq!((f.sb, f.sx), (1, 256));
        assert_eq!(f.ranges.len(), 14);
        assert_eq!(f.computed(), d.b * 14 * 14);
        let (f, _) = frame(2, 8, 160, 160);
        assert_eq!((f.sb, f.sy, f.sx), (161 * 161, 161, 1));
        assert_eq!(f.ranges, vec![(0, 161 * 161 + 159 * 161 + 160)]);
    }
}
