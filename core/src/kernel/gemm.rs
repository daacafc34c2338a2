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
    Copy + Send + Sync + num_traits::Zero + num_traits::One + std::ops::AddAssign + 'static
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
/// one of many parallel jobs).
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
    let threads = rayon::current_num_threads();
    let par = if parallel && threads > 1 {
        gemm::Parallelism::Rayon(threads)
    } else {
        gemm::Parallelism::None
    };
    // SAFETY: every index the three views reach lies inside its slice (asserted above), `dst`
    // is borrowed mutably and does not alias `a` or `b`, and T is f32 or f64 (KernelFloat).
    unsafe {
        gemm::gemm(
            dv.rows,
            dv.cols,
            av.cols,
            dst.as_mut_ptr().add(dv.offset),
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
}
