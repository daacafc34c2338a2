//! Operand access and output allocation for CPU kernels, and the one f32/f64 dispatch of
//! candle's CPU storage.

use candle_core::backend::BackendStorage;
pub use candle_core::CpuStorage;

/// The elements of a CPU buffer that a contiguous `layout` covers: what every CPU kernel of our
/// custom ops reads its operands through.
///
/// Errors: a non-contiguous layout, with `what` (op and operand) in the message.
pub fn contiguous<'a, T>(
    data: &'a [T],
    layout: &candle_core::Layout,
    what: &str,
) -> candle_core::Result<&'a [T]> {
    match layout.contiguous_offsets() {
        Some((a, b)) => Ok(&data[a..b]),
        None => candle_core::bail!("{what} must be contiguous"),
    }
}

/// The error of a kernel given operands that are not all f32 or all f64: names `what` (the op)
/// and the dtypes it got.
pub fn dtype_error(what: &str, operands: &[&CpuStorage]) -> candle_core::Error {
    let dtypes: Vec<_> = operands.iter().map(|s| s.dtype()).collect();
    candle_core::Error::Msg(format!(
        "{what}: expected f32 or f64 operands of one dtype, got {dtypes:?}"
    ))
}

/// Runs a CPU kernel on f32 or on f64 operands: the one dispatch of candle's CPU storage by
/// dtype for every custom op.
///
/// `cpu_float!(what; x = (s1, l1), w = (s2, l2) => body)` binds each name to the contiguous
/// slice of its `(&CpuStorage, &Layout)` (as [`contiguous`]) and evaluates `body` once per float
/// type, so `body` is usually a call of a generic kernel. The value is `body`'s `Vec<T>` wrapped
/// as the matching `CpuStorage`; with `raw` before `what` it is `body` itself (for kernels
/// returning something else). Must be used in a function returning `candle_core::Result`:
/// operands that are not all f32 or all f64, or a non-contiguous layout, return the error
/// (naming `what`).
#[macro_export]
macro_rules! cpu_float {
    (@arms $what:expr, $wrap:path; $($x:ident = ($s:expr, $l:expr)),+ => $body:expr) => {
        match ($($s,)+) {
            ($($crate::kernel::CpuStorage::F32($x),)+) => {
                $(let $x = $crate::kernel::contiguous($x, $l, $what)?;)+
                $wrap($body)
            }
            ($($crate::kernel::CpuStorage::F64($x),)+) => {
                $(let $x = $crate::kernel::contiguous($x, $l, $what)?;)+
                $wrap($body)
            }
            _ => return Err($crate::kernel::dtype_error($what, &[$($s),+])),
        }
    };
    (raw $what:expr; $($x:ident = ($s:expr, $l:expr)),+ $(,)? => $body:expr) => {
        $crate::cpu_float!(@arms $what, ::std::convert::identity; $($x = ($s, $l)),+ => $body)
    };
    ($what:expr; $($x:ident = ($s:expr, $l:expr)),+ $(,)? => $body:expr) => {
        $crate::cpu_float!(@arms $what, $crate::kernel::owned; $($x = ($s, $l)),+ => $body)
    };
}

/// [`crate::cpu_float!`] on tensors instead of storages, for backward passes that run a kernel
/// on graph tensors: `cpu_float_tensors!(what; xv = x, gv = gy => body)` reads each tensor in
/// place through its storage lock (no copy; the tensor must be contiguous) and binds the name
/// to its slice; `body` is evaluated once per float type and its value returned as it is (it
/// usually builds the result tensors with `Tensor::from_vec`). The locks are held until `body`
/// ends. Errors as [`crate::cpu_float!`], and for a tensor not on the CPU ([`cpu`]).
#[macro_export]
macro_rules! cpu_float_tensors {
    (@lock $what:expr; [$($done:tt)*] => $body:expr) => {
        $crate::cpu_float!(raw $what; $($done)* => $body)
    };
    (@lock $what:expr; [$($done:tt)*] $x:ident = $t:expr $(, $rx:ident = $rt:expr)* => $body:expr) => {{
        let guard = $t.storage_and_layout();
        $crate::cpu_float_tensors!(@lock $what;
            [$($done)* $x = ($crate::kernel::cpu(&guard.0, $what)?, guard.1),]
            $($rx = $rt),* => $body)
    }};
    ($what:expr; $($x:ident = $t:expr),+ $(,)? => $body:expr) => {
        $crate::cpu_float_tensors!(@lock $what; [] $($x = $t),+ => $body)
    };
}

/// A kernel's output as candle CPU storage of its element type.
pub fn owned<T: candle_core::WithDType>(v: Vec<T>) -> CpuStorage {
    T::to_cpu_storage_owned(v)
}

/// The CPU storage behind a tensor's storage lock (`Tensor::storage_and_layout`), for kernels
/// that read graph tensors in place in a backward pass.
///
/// Errors: a tensor on another device, naming `what`.
pub fn cpu<'a>(s: &'a candle_core::Storage, what: &str) -> candle_core::Result<&'a CpuStorage> {
    match s {
        candle_core::Storage::Cpu(c) => Ok(c),
        _ => candle_core::bail!("{what}: expected CPU tensors"),
    }
}

/// Elements per task of [`zeroed`]; buffers below twice this are zeroed on the calling thread.
const ZERO_CHUNK: usize = 1 << 15;

/// Raw pointer for disjoint writes from rayon tasks (each task owns its own index range).
#[derive(Clone, Copy)]
pub struct SyncPtr<T>(pub *mut T);
// SAFETY: only used for writes to disjoint ranges, each by one task.
unsafe impl<T> Send for SyncPtr<T> {}
unsafe impl<T> Sync for SyncPtr<T> {}

impl<T> SyncPtr<T> {
    /// The pointer (a method, so that closures capture the whole `Sync` wrapper).
    pub fn get(self) -> *mut T {
        self.0
    }
}

/// A zero-filled buffer of `n` elements for a kernel's output, zeroed by all rayon workers when
/// it is large: `vec![0; n]` zeroes on the calling thread, and with mimalloc reusing freed
/// blocks that memset ran alone for every op output of a training step (about 3% of an SMT-T
/// step in `perf`, with the other worker idle).
pub fn zeroed<T: Copy + Send + Sync + num_traits::Zero>(n: usize) -> Vec<T> {
    use rayon::prelude::*;
    if n < 2 * ZERO_CHUNK {
        return vec![T::zero(); n];
    }
    let mut v = Vec::with_capacity(n);
    v.spare_capacity_mut()[..n]
        .par_chunks_mut(ZERO_CHUNK)
        .for_each(|c| {
            for e in c {
                e.write(T::zero());
            }
        });
    // SAFETY: the loop above initialised all `n` elements, and the capacity is at least `n`.
    unsafe { v.set_len(n) };
    v
}

/// Elements per parallel task of [`map_unary`] and [`map_binary`].
const MAP_CHUNK: usize = 1 << 14;

/// `f(x)` for every element of `x`, in parallel chunks, written once into a fresh buffer.
///
/// For element-wise kernels: the inner loop is a plain zip of slices, which the compiler
/// vectorises when `f` inlines to straight-line code (rayon's `par_iter().map().collect()` runs
/// `f` element by element through its iterator adapters instead).
pub fn map_unary<T, U, F>(x: &[T], f: F) -> Vec<U>
where
    T: Copy + Sync,
    U: Send,
    F: Fn(T) -> U + Sync,
{
    use rayon::prelude::*;
    let n = x.len();
    let mut v = Vec::with_capacity(n);
    v.spare_capacity_mut()[..n]
        .par_chunks_mut(MAP_CHUNK)
        .zip(x.par_chunks(MAP_CHUNK))
        .for_each(|(o, x)| {
            for (o, &x) in o.iter_mut().zip(x) {
                o.write(f(x));
            }
        });
    // SAFETY: the output and input chunks have the same lengths (both slices have `n`
    // elements, cut at the same size), so every one of the `n` elements was written.
    unsafe { v.set_len(n) };
    v
}

/// `f(a, b)` for every pair of elements of `a` and `b`, as [`map_unary`].
///
/// Panics if `a` and `b` differ in length (a caller's shape check failed).
pub fn map_binary<T, U, F>(a: &[T], b: &[T], f: F) -> Vec<U>
where
    T: Copy + Sync,
    U: Send,
    F: Fn(T, T) -> U + Sync,
{
    use rayon::prelude::*;
    assert_eq!(
        a.len(),
        b.len(),
        "map_binary: operands of different lengths"
    );
    let n = a.len();
    let mut v = Vec::with_capacity(n);
    v.spare_capacity_mut()[..n]
        .par_chunks_mut(MAP_CHUNK)
        .zip(a.par_chunks(MAP_CHUNK))
        .zip(b.par_chunks(MAP_CHUNK))
        .for_each(|((o, a), b)| {
            for ((o, &a), &b) in o.iter_mut().zip(a).zip(b) {
                o.write(f(a, b));
            }
        });
    // SAFETY: as in `map_unary`: three slices of `n` elements cut into chunks of one size.
    unsafe { v.set_len(n) };
    v
}

#[cfg(test)]
mod tests {
    use candle_core::{Layout, Shape};

    /// Both paths of `zeroed` (serial below `2 * ZERO_CHUNK`, parallel chunks with a partial
    /// last one above) give exactly `n` zeros.
    #[test]
    fn zeroed_gives_n_zeros_on_both_paths() {
        for n in [0, 1, 2 * super::ZERO_CHUNK - 1, 5 * super::ZERO_CHUNK + 7] {
            let v = super::zeroed::<f32>(n);
            assert_eq!(v.len(), n);
            assert!(v.iter().all(|&x| x == 0.0));
        }
    }

    /// Both maps give `f` of every element, in order, across chunk boundaries.
    #[test]
    fn maps_cover_every_element_in_order() {
        let n = 3 * super::MAP_CHUNK + 5;
        let a: Vec<f32> = (0..n).map(|i| i as f32).collect();
        let b: Vec<f32> = (0..n).map(|i| 2.0 * i as f32).collect();
        let u = super::map_unary(&a, |x| x + 1.0);
        let s = super::map_binary(&a, &b, |x, y| y - x);
        assert_eq!(u.len(), n);
        assert_eq!(s.len(), n);
        for i in 0..n {
            assert_eq!(u[i], i as f32 + 1.0);
            assert_eq!(s[i], i as f32);
        }
        assert!(super::map_unary::<f32, f32, _>(&[], |x| x).is_empty());
    }

    fn double(s: &super::CpuStorage, l: &Layout) -> candle_core::Result<super::CpuStorage> {
        Ok(crate::cpu_float!("double"; x = (s, l) => x.iter().map(|&v| v + v).collect()))
    }

    /// The dispatch keeps the dtype, reads the layout's window, and names the op and the
    /// dtypes on a mismatch.
    #[test]
    fn cpu_float_dispatches_by_dtype_and_names_mismatches() {
        let l = Layout::contiguous_with_offset(Shape::from(2), 1);
        match double(&super::CpuStorage::F64(vec![9.0, 1.0, 2.0]), &l).unwrap() {
            super::CpuStorage::F64(v) => assert_eq!(v, vec![2.0, 4.0]),
            _ => panic!("dtype changed"),
        }
        match double(&super::CpuStorage::F32(vec![9.0, 1.5, 2.5]), &l).unwrap() {
            super::CpuStorage::F32(v) => assert_eq!(v, vec![3.0, 5.0]),
            _ => panic!("dtype changed"),
        }
        let e = double(&super::CpuStorage::U8(vec![1, 2, 3]), &l).unwrap_err();
        assert!(e.to_string().contains("double: expected f32 or f64"), "{e}");
        assert!(e.to_string().contains("U8"), "{e}");
    }
}
