//! Row reductions written with 8 independent accumulators so that the compiler vectorises them
//! (a plain `fold` is a serial dependency chain: float addition is not reassociated).

use num_traits::Float;

const LANES: usize = 8;

#[inline(always)]
fn lanes<T: Float>(x: &[T], init: T, f: impl Fn(T, T) -> T) -> T {
    let mut acc = [init; LANES];
    let chunks = x.chunks_exact(LANES);
    let rest = chunks.remainder();
    for c in chunks {
        for i in 0..LANES {
            acc[i] = f(acc[i], c[i]);
        }
    }
    let mut r = init;
    for &a in &acc {
        r = f(r, a);
    }
    for &v in rest {
        r = f(r, v);
    }
    r
}

/// Sum of `x`.
#[inline]
pub fn sum<T: Float>(x: &[T]) -> T {
    lanes(x, T::zero(), |a, b| a + b)
}

/// Maximum of `x` (−∞ for an empty slice).
#[inline]
pub fn max<T: Float>(x: &[T]) -> T {
    lanes(x, T::neg_infinity(), |a, b| if b > a { b } else { a })
}

/// `Σ (x − m)²`.
#[inline]
pub fn sum_sq_dev<T: Float>(x: &[T], m: T) -> T {
    let mut acc = [T::zero(); LANES];
    let chunks = x.chunks_exact(LANES);
    let rest = chunks.remainder();
    for c in chunks {
        for i in 0..LANES {
            let d = c[i] - m;
            acc[i] = acc[i] + d * d;
        }
    }
    let mut r = acc.iter().fold(T::zero(), |a, &b| a + b);
    for &v in rest {
        r = r + (v - m) * (v - m);
    }
    r
}

/// `Σ a[i]·b[i]` over the shorter length.
#[inline]
pub fn dot<T: Float>(a: &[T], b: &[T]) -> T {
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let mut acc = [T::zero(); LANES];
    let (ca, cb) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for i in 0..LANES {
            acc[i] = acc[i] + x[i] * y[i];
        }
    }
    let mut r = acc.iter().fold(T::zero(), |s, &v| s + v);
    for (&x, &y) in ra.iter().zip(rb) {
        r = r + x * y;
    }
    r
}
