//! Helpers shared by the tests of densepred's crates (each takes it as a dev-dependency):
//! deterministic pseudo-random tensors, the largest elementwise difference of two tensors, and
//! the harness of the op-path tests ([`op_paths`]).

pub mod op_paths;

use candle_core::{DType, Device, Tensor};

/// A tensor of `shape` and `dtype` on the CPU with values in `[-1, 1)`, from a 64-bit LCG
/// seeded with `seed` (so no test depends on candle's unseeded RNG, and every run draws the
/// same values).
///
/// # Panics
/// On a dtype candle cannot convert f64 to (tests only).
pub fn randn(shape: &[usize], seed: u64, dtype: DType) -> Tensor {
    let n: usize = shape.iter().product();
    let mut s = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    let v: Vec<f64> = (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 11) as f64 / (1u64 << 53) as f64) * 2.0 - 1.0
        })
        .collect();
    Tensor::from_vec(v, shape, &Device::Cpu)
        .and_then(|t| t.to_dtype(dtype))
        .expect("a CPU tensor of a float dtype")
}

/// The largest `|a − b|` over all elements, in f64 (0 for empty tensors).
///
/// # Panics
/// When the shapes differ (named in the message), or on candle errors (tests only).
pub fn max_abs(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.dims(), b.dims(), "shapes differ");
    if a.elem_count() == 0 {
        return 0.0;
    }
    (a - b)
        .and_then(|d| d.abs()?.flatten_all()?.max(0)?.to_dtype(DType::F64))
        .and_then(|m| m.to_scalar::<f64>())
        .expect("a float difference")
}

/// The largest `|t|` over all elements, in f64 (0 for an empty tensor).
///
/// # Panics
/// On candle errors (tests only).
pub fn max_abs_value(t: &Tensor) -> f64 {
    if t.elem_count() == 0 {
        return 0.0;
    }
    t.abs()
        .and_then(|a| a.flatten_all()?.max(0)?.to_dtype(DType::F64))
        .and_then(|m| m.to_scalar::<f64>())
        .expect("a float tensor")
}

/// The gradients of `Σ y·r` with respect to every variable `y` depends on: the backward pass of
/// a fixed random projection `r` of `y`, what the gradient checks of the tests run.
///
/// # Panics
/// When the shapes differ or on candle errors (tests only).
pub fn grads_of_dot(y: &Tensor, r: &Tensor) -> candle_core::backprop::GradStore {
    (y * r)
        .and_then(|p| p.sum_all()?.backward())
        .expect("a differentiable product")
}

/// Asserts that `ours` equals `reference` within `tol` (largest absolute difference) and that
/// the gradients of `Σ y·r` (`r` a fixed random projection drawn with `seed`) with respect to
/// each tensor of `wrt` agree within `tol` too, the reference gradients not all zero (so the
/// backward is exercised). The check of a fused op against its composition.
///
/// # Panics
/// On a difference above `tol` (naming the output or the input's shape), a missing or zero
/// gradient.
pub fn assert_same_values_and_grads(
    ours: &Tensor,
    reference: &Tensor,
    wrt: &[&Tensor],
    seed: u64,
    tol: f64,
) {
    let d = max_abs(ours, reference);
    assert!(d <= tol, "values differ by {d:e} > {tol:e}");
    let r = randn(ours.dims(), seed, ours.dtype());
    let (go, gr) = (grads_of_dot(ours, &r), grads_of_dot(reference, &r));
    for (i, t) in wrt.iter().enumerate() {
        let a = go
            .get(t)
            .unwrap_or_else(|| panic!("input {i}: no gradient (ours)"));
        let e = gr
            .get(t)
            .unwrap_or_else(|| panic!("input {i}: no gradient (reference)"));
        assert!(
            max_abs_value(e) > 0.0,
            "input {i} {:?}: zero gradient",
            t.dims()
        );
        let d = max_abs(a, e);
        assert!(
            d <= tol,
            "input {i} {:?}: gradients differ by {d:e} > {tol:e}",
            t.dims()
        );
    }
}

/// `../shared/fixtures/<kind>` (`backbones`, `ops`, `models`, `eval`): the golden outputs beside
/// the checkout.
///
/// # Panics
/// When the folder is missing (the message says where `../shared` must be).
pub fn fixtures_dir(kind: &str) -> std::path::PathBuf {
    let p = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../shared/fixtures")
        .join(kind);
    assert!(
        p.is_dir(),
        "missing fixtures {} (../shared must sit beside the checkout)",
        p.display()
    );
    p
}

/// The tensors of the safetensors fixture `file` in [`fixtures_dir`]`(kind)`, on the CPU.
///
/// # Panics
/// When the file is missing or unreadable.
pub fn fixture_tensors(kind: &str, file: &str) -> std::collections::HashMap<String, Tensor> {
    let p = fixtures_dir(kind).join(file);
    assert!(p.exists(), "missing fixture {}", p.display());
    candle_core::safetensors::load(&p, &Device::Cpu)
        .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// `max |a − b| / max(1, |b|)` elementwise over all elements, in f64 (a NaN in both counts as 0):
/// the error measure of the fixture READMEs' relative tolerances.
///
/// # Panics
/// When the shapes differ, or on candle errors.
pub fn max_rel(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.dims(), b.dims(), "shapes differ");
    let v = |t: &Tensor| -> Vec<f64> {
        t.flatten_all()
            .and_then(|t| t.to_dtype(DType::F64)?.to_vec1())
            .expect("a float tensor")
    };
    let (a, b) = (v(a), v(b));
    assert_eq!(a.len(), b.len(), "element counts");
    a.iter()
        .zip(&b)
        .map(|(x, y)| {
            if x.is_nan() && y.is_nan() {
                0.0
            } else {
                (x - y).abs() / y.abs().max(1.0)
            }
        })
        .fold(0.0, f64::max)
}
