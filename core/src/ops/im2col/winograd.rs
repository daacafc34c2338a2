//! The 3x3, stride-1, padding-1 dense convolution by Winograd's minimal filtering algorithm
//! `F(2x2, 3x3)` (Lavin & Gray, "Fast Algorithms for Convolutional Neural Networks", CVPR 2016,
//! Section 4.1 and eq. 8; the transform matrices `Bᵀ`, `G`, `Aᵀ` of its Section 5.1).
//!
//! The output is cut into 2x2 tiles; tile `(ty, tx)` reads the 4x4 input window starting at
//! input pixel `(2ty − 1, 2tx − 1)` (zero outside the image). With `V = Bᵀ d B` (the transformed
//! window, per input channel), `U = G w Gᵀ` (the transformed 3x3 filter, per output and input
//! channel) and `M = Σ_c U ⊙ V` (element-wise over the 16 positions `ξ` of the 4x4 transform),
//! the tile is `Y = Aᵀ M A`. The channel sum is 16 GEMMs, one per position:
//! `M_ξ (OC, T) = U_ξ (OC, C) @ V_ξ (C, T)` over the `T` tiles of the batch. A 3x3 convolution
//! costs `9` multiply-adds per output pixel and channel pair; these products cost `16 / 4 = 4`,
//! 2.25x fewer, for transforms that are additions over the input and output (memory-bound).
//!
//! The gradients are the adjoints of the same three linear steps: `dM = A dY Aᵀ` (per output
//! tile), then
//! - input: `dV_ξ = U_ξᵀ @ dM_ξ` and `dX += B dV Bᵀ` over each tile's 4x4 window (windows of
//!   neighbouring tiles overlap by two pixels; each channel's task adds its tiles in order, so
//!   the sums do not depend on the thread count);
//! - weight: `dU_ξ = dM_ξ @ V_ξᵀ` summed over the tiles, then `dW = Gᵀ dU G`.
//!
//! Tiles are processed in chunks of whole tile rows whose transformed operands stay within
//! [`CHUNK_ELEMS`]; the 16 products of a chunk run as single-threaded GEMMs shared over rayon's
//! threads (each product's summation order depends on its shape only). `F(2x2, 3x3)` keeps the
//! rounding close to the direct sum (its transforms have entries 0, ±1 and ±1/2), which is why
//! it, and not the larger `F(4x4, 3x3)`, is the one used here.

use super::ConvDims;
use crate::kernel::{gemm_into_ex, KernelFloat, MatView, SyncPtr};
use rayon::prelude::*;

/// Positions of a transformed 4x4 tile.
const XI: usize = 16;

/// Most elements of one chunk's transformed operand (`channels · 16 · tiles`, 64 MiB of f32):
/// large maps are processed a band of tile rows at a time.
const CHUNK_ELEMS: usize = 1 << 24;

/// Whether `d` is a convolution this module computes: 3x3 kernel, stride 1, padding 1,
/// dilation 1 (then `OH = H`, `OW = W`).
pub(super) fn applies(d: &ConvDims) -> bool {
    let g = &d.g1;
    (g.kh, g.kw, g.s, g.p, g.d) == (3, 3, 1, 1, 1) && d.b > 0 && g.oh == d.h && g.ow == d.w
}

/// `[v0 − v2, v1 + v2, v2 − v1, v1 − v3]`: `Bᵀ v`.
#[inline(always)]
fn bt<T: KernelFloat>(v: [T; 4]) -> [T; 4] {
    [v[0] - v[2], v[1] + v[2], v[2] - v[1], v[1] - v[3]]
}

/// `B v`, the adjoint of [`bt`].
#[inline(always)]
fn b_mul<T: KernelFloat>(v: [T; 4]) -> [T; 4] {
    [v[0], v[1] - v[2] + v[3], v[1] + v[2] - v[0], -v[3]]
}

/// `G w` for a 3-tap filter row.
#[inline(always)]
fn g_mul<T: KernelFloat>(w: [T; 3]) -> [T; 4] {
    let h = <T as num_traits::NumCast>::from(0.5).unwrap();
    [
        w[0],
        (w[0] + w[1] + w[2]) * h,
        (w[0] - w[1] + w[2]) * h,
        w[2],
    ]
}

/// `Gᵀ u`, the adjoint of [`g_mul`].
#[inline(always)]
fn gt<T: KernelFloat>(u: [T; 4]) -> [T; 3] {
    let h = <T as num_traits::NumCast>::from(0.5).unwrap();
    [
        u[0] + (u[1] + u[2]) * h,
        (u[1] - u[2]) * h,
        (u[1] + u[2]) * h + u[3],
    ]
}

/// `Aᵀ m`: two outputs of a tile row from its 4 transformed values.
#[inline(always)]
fn at<T: KernelFloat>(m: [T; 4]) -> [T; 2] {
    [m[0] + m[1] + m[2], m[1] - m[2] - m[3]]
}

/// `A g`, the adjoint of [`at`].
#[inline(always)]
fn a_mul<T: KernelFloat>(g: [T; 2]) -> [T; 4] {
    [g[0], g[0] + g[1], g[0] - g[1], -g[1]]
}

/// `F t Fᵀ` for the 1-D map `f` (`v ↦ F v`): `f` on every column of `t`, then on every row.
#[inline(always)]
fn both_axes<T: Copy, const I: usize, const O: usize>(
    t: [[T; I]; I],
    f: impl Fn([T; I]) -> [T; O],
) -> [[T; O]; O] {
    let cols: [[T; O]; I] = std::array::from_fn(|c| f(std::array::from_fn(|r| t[r][c])));
    std::array::from_fn(|r| f(std::array::from_fn(|c| cols[c][r])))
}

/// The output tiling of one convolution and its chunks of tile rows.
struct Tiles {
    /// Tile rows per image and tiles per tile row.
    th: usize,
    tw: usize,
    /// Tile rows of the batch (`B · th`); row `r` is tile row `r % th` of image `r / th`.
    rows: usize,
}

impl Tiles {
    fn new(d: &ConvDims) -> Self {
        let (th, tw) = (d.h.div_ceil(2), d.w.div_ceil(2));
        Self {
            th,
            tw,
            rows: d.b * th,
        }
    }

    /// Ranges of tile rows `(r0, r1)` whose operands of `channels · 16` rows stay within
    /// [`CHUNK_ELEMS`] (at least one tile row each), of equal size but the last.
    fn chunks(&self, channels: usize) -> Vec<(usize, usize)> {
        let per_row = (channels * XI * self.tw).max(1);
        let most = (CHUNK_ELEMS / per_row).max(1);
        let size = self.rows.div_ceil(self.rows.div_ceil(most));
        (0..self.rows)
            .step_by(size)
            .map(|r0| (r0, (r0 + size).min(self.rows)))
            .collect()
    }
}

/// The tiling of `d`, its chunks of tile rows ([`Tiles::chunks`]) and two scratch buffers
/// sized for the largest chunk: `(C, 16, tiles)` and `(OC, 16, tiles)` elements (the transformed
/// input or its gradient, and the transformed output or its gradient).
#[allow(clippy::type_complexity)]
fn plan<T: KernelFloat>(d: &ConvDims) -> (Tiles, Vec<(usize, usize)>, Vec<T>, Vec<T>) {
    let t = Tiles::new(d);
    let chunks = t.chunks(d.c.max(d.oc));
    let most = (chunks[0].1 - chunks[0].0) * t.tw;
    let by_input = crate::kernel::zeroed(d.c * XI * most);
    let by_output = crate::kernel::zeroed(d.oc * XI * most);
    (t, chunks, by_input, by_output)
}

/// `U = G w Gᵀ` for every filter, as `(OC, 16, C)`: `U_ξ` is the `(OC, C)` view at `ξ·C` with
/// row stride `16·C`. `w` is `(OC, WC, 3, 3)`; the input meets channels `c_off..c_off + C`.
fn weight_transform<T: KernelFloat>(d: &ConvDims, w: &[T]) -> Vec<T> {
    let mut u = vec![T::zero(); d.oc * XI * d.c];
    u.par_chunks_mut(XI * d.c).enumerate().for_each(|(o, u)| {
        for c in 0..d.c {
            let f = &w[(o * d.wc + d.c_off + c) * 9..][..9];
            let t = both_axes(
                [[f[0], f[1], f[2]], [f[3], f[4], f[5]], [f[6], f[7], f[8]]],
                g_mul,
            );
            for (xi, v) in t.iter().flatten().enumerate() {
                u[xi * d.c + c] = *v;
            }
        }
    });
    u
}

/// Four disjoint `len`-long slices of `buf` at `start + j·stride`, `j = 0..4` (`stride ≥ len`).
fn rows4<T>(buf: &mut [T], start: usize, stride: usize, len: usize) -> [&mut [T]; 4] {
    let (a, rest) = buf[start..].split_at_mut(stride);
    let (b, rest) = rest.split_at_mut(stride);
    let (c, d) = rest.split_at_mut(stride);
    [&mut a[..len], &mut b[..len], &mut c[..len], &mut d[..len]]
}

/// `f` on each column `k` of four equally long rows, written to four output rows:
/// `out[j][k] = f([a[0][k], a[1][k], a[2][k], a[3][k]])[j]` (a vectorisable loop over `k`).
#[inline(always)]
fn columns4<T: Copy>(out: [&mut [T]; 4], a: [&[T]; 4], f: impl Fn([T; 4]) -> [T; 4]) {
    let [o0, o1, o2, o3] = out;
    let len = o0.len();
    let (o1, o2, o3) = (&mut o1[..len], &mut o2[..len], &mut o3[..len]);
    let [a0, a1, a2, a3] = a.map(|a| &a[..len]);
    for k in 0..len {
        let v = f([a0[k], a1[k], a2[k], a3[k]]);
        (o0[k], o1[k], o2[k], o3[k]) = (v[0], v[1], v[2], v[3]);
    }
}

/// `(even, odd)` elements of `src`: `even[k] = src[2k]`, `odd[k] = src[2k + 1]` (zero past the
/// end of `src`).
fn deinterleave<T: KernelFloat>(src: &[T], even: &mut [T], odd: &mut [T]) {
    for (k, (e, o)) in even.iter_mut().zip(odd.iter_mut()).enumerate() {
        *e = src.get(2 * k).copied().unwrap_or_else(T::zero);
        *o = src.get(2 * k + 1).copied().unwrap_or_else(T::zero);
    }
}

/// `V = Bᵀ d B` for the tiles of tile rows `r0..r1` of every input channel, as `(C, 16, n)`
/// with `n = (r1 − r0)·tw` (tile `t` of the chunk at column `t`). Each tile row is transformed
/// as whole rows: `Bᵀ` down the four input rows, then `B` along them on their even and odd
/// pixels, so every loop runs over `tx` on contiguous data.
fn input_transform<T: KernelFloat>(
    d: &ConvDims,
    t: &Tiles,
    x: &[T],
    (r0, r1): (usize, usize),
    v: &mut [T],
) {
    let (n, hw, tw) = ((r1 - r0) * t.tw, d.h * d.w, t.tw);
    // Padded rows: column `j` holds pixel `j − 1`, so tile `tx` reads columns `2tx..2tx + 4`.
    let pw = 2 * tw + 2;
    v[..d.c * XI * n]
        .par_chunks_mut(XI * n)
        .enumerate()
        .for_each(|(c, v)| {
            let mut rows = vec![T::zero(); 4 * pw];
            let mut cols = vec![T::zero(); 4 * pw];
            let (mut e, mut o) = (vec![T::zero(); tw + 1], vec![T::zero(); tw + 1]);
            for r in r0..r1 {
                let (b, ty) = (r / t.th, r % t.th);
                let plane = &x[(b * d.c + c) * hw..][..hw];
                for (i, row) in rows.chunks_mut(pw).enumerate() {
                    row.fill(T::zero());
                    if let Some(y) = (2 * ty + i).checked_sub(1).filter(|&y| y < d.h) {
                        row[1..][..d.w].copy_from_slice(&plane[y * d.w..][..d.w]);
                    }
                }
                let rv: Vec<&[T]> = rows.chunks(pw).collect();
                columns4(
                    rows4(&mut cols, 0, pw, pw),
                    [rv[0], rv[1], rv[2], rv[3]],
                    bt,
                );
                let col0 = (r - r0) * tw;
                for (i, col) in cols.chunks(pw).enumerate() {
                    deinterleave(col, &mut e, &mut o);
                    columns4(
                        rows4(v, 4 * i * n + col0, n, tw),
                        [&e, &o, &e[1..], &o[1..]],
                        bt,
                    );
                }
            }
        });
}

/// `dM = A dY Aᵀ` for the tiles of tile rows `r0..r1` of every output channel, as
/// `(OC, 16, n)` (the output gradient is zero beyond the image's last row and column).
fn grad_output_transform<T: KernelFloat>(
    d: &ConvDims,
    t: &Tiles,
    gy: &[T],
    (r0, r1): (usize, usize),
    dm: &mut [T],
) {
    let (n, hw, tw) = ((r1 - r0) * t.tw, d.h * d.w, t.tw);
    dm[..d.oc * XI * n]
        .par_chunks_mut(XI * n)
        .enumerate()
        .for_each(|(o, dm)| {
            // h[i][j]: row i of the tile times Aᵀ (j = 0..4), over tx.
            let mut h = vec![T::zero(); 8 * tw];
            let (mut e, mut od) = (vec![T::zero(); tw], vec![T::zero(); tw]);
            for r in r0..r1 {
                let (b, ty) = (r / t.th, r % t.th);
                let plane = &gy[(b * d.oc + o) * hw..][..hw];
                for i in 0..2 {
                    let y = 2 * ty + i;
                    let row: &[T] = if y < d.h {
                        &plane[y * d.w..][..d.w]
                    } else {
                        &[]
                    };
                    deinterleave(row, &mut e, &mut od);
                    columns4(rows4(&mut h, 4 * i * tw, tw, tw), [&e, &od, &e, &od], |g| {
                        a_mul([g[0], g[1]])
                    });
                }
                let col0 = (r - r0) * tw;
                let (h0, h1) = h.split_at(4 * tw);
                for j in 0..4 {
                    let (a, b) = (&h0[j * tw..][..tw], &h1[j * tw..][..tw]);
                    columns4(rows4(dm, j * n + col0, 4 * n, tw), [a, b, a, b], |g| {
                        a_mul([g[0], g[1]])
                    });
                }
            }
        });
}

/// `dst_ξ (+)= a_ξ @ b_ξ` for the 16 positions, `dst` as `(16, rows, cols)`: one
/// single-threaded product per position, shared over rayon's threads.
#[allow(clippy::too_many_arguments)]
fn products<T: KernelFloat>(
    dst: &mut [T],
    (rows, cols): (usize, usize),
    accumulate: bool,
    a: &[T],
    av: impl Fn(usize) -> MatView + Sync,
    b: &[T],
    bv: impl Fn(usize) -> MatView + Sync,
) {
    dst[..XI * rows * cols]
        .par_chunks_mut(rows * cols)
        .enumerate()
        .for_each(|(xi, dst)| {
            gemm_into_ex(
                dst,
                MatView::rows_of(rows, cols, 0, cols),
                accumulate,
                a,
                av(xi),
                b,
                bv(xi),
                T::one(),
                false,
            )
        });
}

/// The `(rows, C)` view of position `ξ` of a `(rows, 16, C)` operand.
fn position_rows(rows: usize, c: usize, xi: usize) -> MatView {
    MatView::rows_of(rows, c, xi * c, XI * c)
}

/// Forward: `y (B, OC, H, W)` of `x (B, C, H, W)` and `w (OC, WC, 3, 3)`; with `init`, added to
/// a copy of it.
pub(super) fn forward<T: KernelFloat>(
    d: &ConvDims,
    x: &[T],
    w: &[T],
    init: Option<&[T]>,
) -> Vec<T> {
    let (t, chunks, mut v, mut m) = plan(d);
    let u = weight_transform(d, w);
    let hw = d.h * d.w;
    let mut y = match init {
        Some(v) => v.to_vec(),
        None => crate::kernel::zeroed(d.b * d.oc * hw),
    };
    assert_eq!(y.len(), d.b * d.oc * hw, "winograd conv: output");
    let ptr = SyncPtr(y.as_mut_ptr());
    for &(r0, r1) in &chunks {
        let n = (r1 - r0) * t.tw;
        input_transform(d, &t, x, (r0, r1), &mut v);
        products(
            &mut m,
            (d.oc, n),
            false,
            &u,
            |xi| position_rows(d.oc, d.c, xi),
            &v,
            |xi| position_rows(d.c, n, xi),
        );
        // Y = Aᵀ M A, one task per output channel: Aᵀ down the tile's rows, then along them.
        let m = &m;
        (0..d.oc).into_par_iter().for_each(|o| {
            // s[i][j] over tx: row i of Aᵀ M (i = 0, 1; rows 2 and 3 unused).
            let mut s = vec![T::zero(); 16 * t.tw];
            let mut eo = vec![T::zero(); 4 * t.tw];
            for r in r0..r1 {
                let (b, ty) = (r / t.th, r % t.th);
                let col0 = (r - r0) * t.tw;
                let mv = |i: usize, j: usize| &m[((4 * i + j) * d.oc + o) * n + col0..][..t.tw];
                for j in 0..4 {
                    columns4(
                        rows4(&mut s, j * t.tw, 4 * t.tw, t.tw),
                        [mv(0, j), mv(1, j), mv(2, j), mv(3, j)],
                        |m| {
                            let [a, b] = at(m);
                            [a, b, a, b]
                        },
                    );
                }
                // SAFETY: plane `(b, o)` lies inside `y` (length asserted above) and only this
                // task (channel `o`) writes the planes of channel `o`.
                let plane = unsafe {
                    std::slice::from_raw_parts_mut(ptr.get().add((b * d.oc + o) * hw), hw)
                };
                for (i, si) in s.chunks(4 * t.tw).take(2).enumerate() {
                    let yy = 2 * ty + i;
                    if yy >= d.h {
                        continue;
                    }
                    let sj: Vec<&[T]> = si.chunks(t.tw).collect();
                    columns4(
                        rows4(&mut eo, 0, t.tw, t.tw),
                        [sj[0], sj[1], sj[2], sj[3]],
                        |m| {
                            let [a, b] = at(m);
                            [a, b, a, b]
                        },
                    );
                    let (e, od) = eo.split_at(t.tw);
                    let row = &mut plane[yy * d.w..][..d.w];
                    for (x, out) in row.iter_mut().enumerate() {
                        let val = if x % 2 == 0 { e[x / 2] } else { od[x / 2] };
                        *out = if init.is_some() { *out + val } else { val };
                    }
                }
            }
        });
    }
    y
}

/// Input gradient `dX (B, C, H, W)` from `w (OC, WC, 3, 3)` and `dY (B, OC, H, W)`.
pub(super) fn grad_input<T: KernelFloat>(d: &ConvDims, w: &[T], gy: &[T]) -> Vec<T> {
    let (t, chunks, mut dv, mut dm) = plan(d);
    let u = weight_transform(d, w);
    let hw = d.h * d.w;
    let mut gx: Vec<T> = crate::kernel::zeroed(d.b * d.c * hw);
    let ptr = SyncPtr(gx.as_mut_ptr());
    for &(r0, r1) in &chunks {
        let n = (r1 - r0) * t.tw;
        grad_output_transform(d, &t, gy, (r0, r1), &mut dm);
        products(
            &mut dv,
            (d.c, n),
            false,
            &u,
            |xi| position_rows(d.oc, d.c, xi).t(),
            &dm,
            |xi| position_rows(d.oc, n, xi),
        );
        // dX += B dV Bᵀ over each tile's window, one task per input channel: B down the
        // tile's rows, then along them into a padded row (column `j` is pixel `j − 1`) where
        // the windows of neighbouring tiles overlap.
        let dv = &dv;
        let pw = 2 * t.tw + 2;
        (0..d.c).into_par_iter().for_each(|c| {
            // w[i][j] over tx: row i of B dV.
            let mut wv = vec![T::zero(); 16 * t.tw];
            let mut acc = vec![T::zero(); pw];
            for r in r0..r1 {
                let (b, ty) = (r / t.th, r % t.th);
                let col0 = (r - r0) * t.tw;
                let dvv = |i: usize, j: usize| &dv[((4 * i + j) * d.c + c) * n + col0..][..t.tw];
                for j in 0..4 {
                    columns4(
                        rows4(&mut wv, j * t.tw, 4 * t.tw, t.tw),
                        [dvv(0, j), dvv(1, j), dvv(2, j), dvv(3, j)],
                        b_mul,
                    );
                }
                // SAFETY: plane `(b, c)` lies inside `gx` and only this task (channel `c`)
                // writes the planes of channel `c`.
                let plane = unsafe {
                    std::slice::from_raw_parts_mut(ptr.get().add((b * d.c + c) * hw), hw)
                };
                for (i, wi) in wv.chunks(4 * t.tw).enumerate() {
                    let Some(y) = (2 * ty + i).checked_sub(1).filter(|&y| y < d.h) else {
                        continue;
                    };
                    // Times Bᵀ along the row: tile tx adds B w at padded columns 2tx..2tx + 4.
                    acc.fill(T::zero());
                    let wj: Vec<&[T]> = wi.chunks(t.tw).collect();
                    for k in 0..t.tw {
                        let v = b_mul([wj[0][k], wj[1][k], wj[2][k], wj[3][k]]);
                        for (a, v) in acc[2 * k..][..4].iter_mut().zip(v) {
                            *a += v;
                        }
                    }
                    for (p, &a) in plane[y * d.w..][..d.w].iter_mut().zip(&acc[1..]) {
                        *p += a;
                    }
                }
            }
        });
    }
    gx
}

/// Weight gradient `dW (OC, WC, 3, 3)` (zero outside the input's channels) from
/// `x (B, C, H, W)` and `dY (B, OC, H, W)`.
pub(super) fn grad_weight<T: KernelFloat>(d: &ConvDims, x: &[T], gy: &[T]) -> Vec<T> {
    let (t, chunks, mut v, mut dm) = plan(d);
    let mut du = vec![T::zero(); XI * d.oc * d.c];
    for (k, &(r0, r1)) in chunks.iter().enumerate() {
        let n = (r1 - r0) * t.tw;
        input_transform(d, &t, x, (r0, r1), &mut v);
        grad_output_transform(d, &t, gy, (r0, r1), &mut dm);
        products(
            &mut du,
            (d.oc, d.c),
            k > 0,
            &dm,
            |xi| position_rows(d.oc, n, xi),
            &v,
            |xi| position_rows(d.c, n, xi).t(),
        );
    }
    // dW = Gᵀ dU G, one task per output channel.
    let mut gw = vec![T::zero(); d.oc * d.wc * 9];
    let du = &du;
    gw.par_chunks_mut(d.wc * 9).enumerate().for_each(|(o, gw)| {
        for c in 0..d.c {
            let tu: [[T; 4]; 4] = std::array::from_fn(|i| {
                std::array::from_fn(|j| du[((i * 4 + j) * d.oc + o) * d.c + c])
            });
            let f = both_axes(tu, gt);
            gw[(d.c_off + c) * 9..][..9].copy_from_slice(&[
                f[0][0], f[0][1], f[0][2], f[1][0], f[1][1], f[1][2], f[2][0], f[2][1], f[2][2],
            ]);
        }
    });
    gw
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The 1-D transforms compute the 2-output, 3-tap correlation: `Aᵀ[(G w) ⊙ (Bᵀ d)]` equals
    /// `[d0 w0 + d1 w1 + d2 w2, d1 w0 + d2 w1 + d3 w2]`, and each adjoint pair satisfies
    /// `<F v, u> = <v, Fᵀ u>` (exact in f64 on these small integers).
    #[test]
    fn one_dimensional_transforms() {
        let (d, w) = ([3.0f64, -1.0, 4.0, 2.0], [5.0f64, -2.0, 7.0]);
        let (gw, bd) = (g_mul(w), bt(d));
        let y = at(std::array::from_fn(|i| gw[i] * bd[i]));
        assert_eq!(
            y,
            [
                d[0] * w[0] + d[1] * w[1] + d[2] * w[2],
                d[1] * w[0] + d[2] * w[1] + d[3] * w[2]
            ]
        );
        let dot = |a: &[f64], b: &[f64]| a.iter().zip(b).map(|(a, b)| a * b).sum::<f64>();
        let u = [1.5, -2.0, 0.25, 3.0];
        assert_eq!(dot(&bt(d), &u), dot(&d, &b_mul(u)));
        assert_eq!(dot(&g_mul(w), &u), dot(&w, &gt(u)));
        let g = [2.0, -3.0];
        assert_eq!(dot(&at(u), &g), dot(&u, &a_mul(g)));
    }

    /// Chunks cover every tile row once, in order, within the element budget.
    #[test]
    fn chunks_cover_the_tile_rows() {
        let t = Tiles {
            th: 7,
            tw: 7,
            rows: 256 * 7,
        };
        let chunks = t.chunks(256);
        assert!(chunks.len() > 1);
        assert_eq!(chunks[0].0, 0);
        assert_eq!(chunks.last().unwrap().1, t.rows);
        for (a, b) in chunks.iter().zip(&chunks[1..]) {
            assert_eq!(a.1, b.0);
        }
        for &(r0, r1) in &chunks {
            assert!(r1 > r0 && 256 * XI * (r1 - r0) * t.tw <= CHUNK_ELEMS);
        }
    }
}
