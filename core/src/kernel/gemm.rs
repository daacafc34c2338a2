//! Strided matrix views and GEMM products on them, for kernels that multiply blocks of their
//! operands in place (convolutions, attention, fused FFNs) instead of copying them into tensors.

/// A strided view of a row-major operand: element `(r, c)` at `offset + r·rs + c·cs`.
#[derive(Debug, Clone, Copy)]
pub struct MatView {
    /// Rows of the view.
    pub rows: usize,
    /// Columns of the view.
    pub cols: usize,
    /// Index of element `(0, 0)` in the slice.
    pub offset: usize,
    /// Elements between consecutive rows.
    pub rs: usize,
    /// Elements between consecutive columns.
    pub cs: usize,
}

impl MatView {
    /// A dense row-major `rows × cols` block with row stride `rs`, starting at `offset`.
    pub fn rows_of(rows: usize, cols: usize, offset: usize, rs: usize) -> Self {
        Self {
            rows,
            cols,
            offset,
            rs,
            cs: 1,
        }
    }

    /// The transposed view of the same elements.
    pub fn t(self) -> Self {
        Self {
            rows: self.cols,
            cols: self.rows,
            offset: self.offset,
            rs: self.cs,
            cs: self.rs,
        }
    }

    /// One past the largest element index the view touches.
    pub fn end(&self) -> usize {
        if self.rows == 0 || self.cols == 0 {
            self.offset
        } else {
            self.offset + (self.rows - 1) * self.rs + (self.cols - 1) * self.cs + 1
        }
    }
}

/// The element types of our CPU kernels: f32 and f64 (what `gemm` and every kernel support).
pub trait KernelFloat:
    Copy
    + Send
    + Sync
    + num_traits::Float
    + num_traits::Zero
    + num_traits::One
    + std::ops::AddAssign
    + 'static
{
}
impl KernelFloat for f32 {}
impl KernelFloat for f64 {}

/// `dst[d] (+)= a[av] @ b[bv]` with the `gemm` crate (the kernel behind candle's CPU `matmul`),
/// on rayon's threads; `accumulate` adds to `dst` instead of overwriting it.
///
/// Panics (internal invariant, checked before the unsafe call): mismatched inner dimensions or a
/// view reaching past its slice.
pub fn gemm_into<T: KernelFloat>(
    dst: &mut [T],
    dv: MatView,
    accumulate: bool,
    a: &[T],
    av: MatView,
    b: &[T],
    bv: MatView,
) {
    gemm_into_ex(dst, dv, accumulate, a, av, b, bv, T::one(), true)
}

/// [`gemm_into`] with a factor on the product, `dst (+)= scale · a @ b`, and a choice of running
/// on rayon's threads (`parallel`) or on the calling thread only (for products that are already
/// one of many parallel jobs). Parallel products with a small output run as one band of rows per
/// thread ([`split_over_threads`]), others on the `gemm` crate's threading.
#[allow(clippy::too_many_arguments)]
pub fn gemm_into_ex<T: KernelFloat>(
    dst: &mut [T],
    dv: MatView,
    accumulate: bool,
    a: &[T],
    av: MatView,
    b: &[T],
    bv: MatView,
    scale: T,
    parallel: bool,
) {
    assert!(
        av.cols == bv.rows && dv.rows == av.rows && dv.cols == bv.cols,
        "gemm_into: shapes {av:?} @ {bv:?} -> {dv:?}"
    );
    assert!(dv.end() <= dst.len() && av.end() <= a.len() && bv.end() <= b.len());
    if dv.rows == 0 || dv.cols == 0 {
        return;
    }
    if av.cols == 0 {
        if !accumulate {
            for r in 0..dv.rows {
                for c in 0..dv.cols {
                    dst[dv.offset + r * dv.rs + c * dv.cs] = T::zero();
                }
            }
        }
        return;
    }
    if let Some(band) = bands_of(dv, av.cols).filter(|_| parallel) {
        return split_over_threads(dst, dv, accumulate, a, av, b, bv, scale, band);
    }
    let threads = rayon::current_num_threads();
    let par = if parallel && threads > 1 {
        gemm::Parallelism::Rayon(threads)
    } else {
        gemm::Parallelism::None
    };
    // SAFETY: every index the three views reach lies inside its slice (asserted above), `dst`
    // is borrowed mutably and does not alias `a` or `b`, and T is f32 or f64 (KernelFloat).
    unsafe { gemm_raw(dst.as_mut_ptr(), dv, accumulate, a, av, b, bv, scale, par) }
}

/// Products of at most this many multiply-adds (`M·N·K`, about 0.5 GFLOP) may be split by
/// [`split_over_threads`]; larger ones use the `gemm` crate's own threading.
const SPLIT_MAX_WORK: usize = 1 << 28;

/// Products whose output has more elements than this (1 MiB of f32) keep the `gemm` crate's
/// threading, which shares its packed operands between the threads.
const SPLIT_MAX_DST: usize = 1 << 18;

/// The rows of each band when [`gemm_into_ex`] runs a parallel product
/// `dst[dv] (+)= (·, depth) @ (depth, ·)` through [`split_over_threads`], `None` when it does not:
/// outputs at least as tall as wide, of at most [`SPLIT_MAX_DST`] elements, with enough work for
/// the crate to thread at all, and at least two bands.
///
/// The bands depend on the shape only, never on the thread count: the `gemm` crate's summation
/// order depends on the shape it is given, so results stay bit-identical between 1 and N threads
/// (a one-process run and an MPI run of one thread per rank write the same detections). Bands of
/// at least [`BAND_MIN_ROWS`] rows, at most [`MAX_BANDS`] of them, in multiples of 16 rows (a
/// microkernel's width in f32 lanes).
fn bands_of(dv: MatView, depth: usize) -> Option<usize> {
    let work = dv.rows.saturating_mul(dv.cols).saturating_mul(depth);
    let fits = dv.rows >= dv.cols
        && dv.rows.saturating_mul(dv.cols) <= SPLIT_MAX_DST
        && (gemm::get_threading_threshold()..SPLIT_MAX_WORK).contains(&work);
    let band = BAND_MIN_ROWS.max(dv.rows.div_ceil(MAX_BANDS).div_ceil(16) * 16);
    (fits && dv.rows > band).then_some(band)
}

/// Fewest rows of a band of [`split_over_threads`].
const BAND_MIN_ROWS: usize = 64;

/// Most bands of [`split_over_threads`] (so at most this many threads share such a product).
const MAX_BANDS: usize = 8;

/// One single-threaded `gemm` call per band of `dst`'s rows (and of `a`'s; [`bands_of`]), the
/// bands shared out over rayon's threads, instead of the `gemm` crate's threading.
///
/// Why: the crate parallelises each depth block (`kc` of `K`) separately, packing and joining the
/// threads once per block, so a product with a small output spends a large share of its time in
/// that bookkeeping. `cargo run --release -p densepred-core --example gemm_orient -- M K N`, 2
/// threads, its "Wᵀ copy" line (crate threading) against "Wᵀ copy, gemm_into" (row bands):
/// `512 2048 49` (Conv2Former-N stage-4 fc2 at 224²) 141 → 167 GFLOP/s, `256 1024 196` 157 →
/// 199, `256 256 196` 155 → 207, `2048 512 49` 164 → 173. Bands of columns measured slower than
/// the crate on wide outputs (`64 6272 256` 220 → 169), so wide outputs are not split.
#[allow(clippy::too_many_arguments)]
fn split_over_threads<T: KernelFloat>(
    dst: &mut [T],
    dv: MatView,
    accumulate: bool,
    a: &[T],
    av: MatView,
    b: &[T],
    bv: MatView,
    scale: T,
    band: usize,
) {
    use rayon::prelude::*;
    let dptr = crate::kernel::SyncPtr(dst.as_mut_ptr());
    (0..dv.rows.div_ceil(band)).into_par_iter().for_each(|i| {
        let (start, rows) = (i * band, band.min(dv.rows - i * band));
        let d = MatView {
            offset: dv.offset + start * dv.rs,
            rows,
            ..dv
        };
        let a_band = MatView {
            offset: av.offset + start * av.rs,
            rows,
            ..av
        };
        // SAFETY: the bands are disjoint row blocks of the `dst` view checked by the caller (each
        // written by this task only), inside the views the caller checked against the slices.
        unsafe {
            gemm_raw(
                dptr.get(),
                d,
                accumulate,
                a,
                a_band,
                b,
                bv,
                scale,
                gemm::Parallelism::None,
            )
        }
    });
}

/// The `gemm` crate's call on our views: `dst[dv] = (dst[dv] if accumulate) + scale · a @ b`.
///
/// # Safety
/// `dst` must point to a buffer that holds `dv.end()` elements, none of which alias `a` or `b`,
/// and which no other thread touches inside `dv` during the call; `av` and `bv` must lie inside
/// `a` and `b`.
#[allow(clippy::too_many_arguments)]
unsafe fn gemm_raw<T: KernelFloat>(
    dst: *mut T,
    dv: MatView,
    accumulate: bool,
    a: &[T],
    av: MatView,
    b: &[T],
    bv: MatView,
    scale: T,
    par: gemm::Parallelism,
) {
    gemm::gemm(
        dv.rows,
        dv.cols,
        av.cols,
        dst.add(dv.offset),
        dv.cs as isize,
        dv.rs as isize,
        accumulate,
        a.as_ptr().add(av.offset),
        av.cs as isize,
        av.rs as isize,
        b.as_ptr().add(bv.offset),
        bv.cs as isize,
        bv.rs as isize,
        T::one(),
        scale,
        false,
        false,
        false,
        par,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `dst (+)= scale · a @ b` element by element, f64, on the same strided views.
    #[allow(clippy::too_many_arguments)]
    fn naive(
        dst: &mut [f64],
        dv: MatView,
        acc: bool,
        a: &[f64],
        av: MatView,
        b: &[f64],
        bv: MatView,
        scale: f64,
    ) {
        for r in 0..dv.rows {
            for c in 0..dv.cols {
                let s: f64 = (0..av.cols)
                    .map(|k| {
                        a[av.offset + r * av.rs + k * av.cs] * b[bv.offset + k * bv.rs + c * bv.cs]
                    })
                    .sum();
                let d = &mut dst[dv.offset + r * dv.rs + c * dv.cs];
                *d = if acc { *d + scale * s } else { scale * s };
            }
        }
    }

    fn values(n: usize, seed: u64) -> Vec<f64> {
        (0..n as u64)
            .map(|i| ((i * 2654435761 + seed) % 1000) as f64 / 500.0 - 1.0)
            .collect()
    }

    /// The banded products (bands not a multiple of the thread count, a last band shorter than
    /// the others, strided and transposed views, offsets, accumulation, a scale) against the naive
    /// product, on a 3-thread pool so that the split path runs whatever the machine's core count.
    #[test]
    fn split_products_match_naive() {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(3)
            .build()
            .unwrap();
        pool.install(|| {
            // (rows, cols, depth), rows >= cols: bands of 64 rows (3, 4 and 2 of them, the last
            // shorter) and 8 bands of 128 rows.
            let shapes = [
                (130usize, 37usize, 200usize),
                (200, 50, 100),
                (97, 97, 90),
                (1000, 60, 20),
            ];
            for &(m, n, k) in &shapes {
                assert!(
                    bands_of(MatView::rows_of(m, n, 0, n), k).is_some(),
                    "{m}x{n}x{k}"
                );
                // `a` stored transposed (k, m) after 5 leading elements; `b` row-major with a
                // padded row stride; `dst` with an offset and padded rows.
                let a = values(5 + k * m, 1);
                let av = MatView::rows_of(k, m, 5, m).t();
                let b = values(k * (n + 3), 2);
                let bv = MatView::rows_of(k, n, 0, n + 3);
                let dv = MatView::rows_of(m, n, 7, n + 2);
                for (acc, scale) in [(false, 1.0), (true, -0.5)] {
                    let start = values(7 + m * (n + 2), 3);
                    let (mut got, mut want) = (start.clone(), start);
                    gemm_into_ex(&mut got, dv, acc, &a, av, &b, bv, scale, true);
                    naive(&mut want, dv, acc, &a, av, &b, bv, scale);
                    assert_eq!(got.len(), want.len());
                    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                        // f64 sums of at most 200 products of magnitude <= 1 in another order.
                        assert!(
                            (g - w).abs() <= 1e-11,
                            "{m}x{n}x{k} acc {acc}: [{i}] {g} vs {w}"
                        );
                    }
                }
            }
        });
    }

    /// A banded product gives the same bits on 1 and on 3 threads: the bands depend on the shape
    /// only (what `tools/tests/mpi.rs` relies on when it compares a one-process run with ranks
    /// of one thread each).
    #[test]
    fn banded_products_do_not_depend_on_thread_count() {
        for &(m, n, k) in &[
            (300usize, 40usize, 700usize),
            (256, 64, 6272),
            (130, 100, 1500),
        ] {
            let dv = MatView::rows_of(m, n, 0, n);
            assert!(bands_of(dv, k).is_some(), "{m}x{n}x{k}");
            let a: Vec<f32> = values(m * k, 4).iter().map(|&v| v as f32).collect();
            let b: Vec<f32> = values(k * n, 5).iter().map(|&v| v as f32).collect();
            let run = |threads: usize| {
                let pool = rayon::ThreadPoolBuilder::new()
                    .num_threads(threads)
                    .build()
                    .unwrap();
                let mut d = vec![0f32; m * n];
                let (av, bv) = (MatView::rows_of(m, k, 0, k), MatView::rows_of(k, n, 0, n));
                pool.install(|| gemm_into(&mut d, dv, false, &a, av, &b, bv));
                d
            };
            let one = run(1);
            assert!(one.iter().any(|&v| v != 0.0));
            assert!(
                one == run(2) && one == run(3),
                "{m}x{n}x{k}: results depend on threads"
            );
        }
    }
}
