//! The harness of the op-path tests (`core/tests/op_paths.rs` for core's ops,
//! `backbones/tests/fused_op_paths.rs` for the backbones' fused ops): every public tensor op of
//! a source folder has a dispatch entry, and each op whose fallback is a candle composition
//! computes what our CPU kernel computes, in values and gradients.

use crate::{max_abs, max_abs_value, randn};
use candle_core::{DType, Result, Tensor, Var};
use densepred_core::ops::dispatch::{self, Fallback, Impl, Op};

/// One op call on `inputs` (the first decides the dispatch), returning its outputs.
pub type Run = Box<dyn Fn(&[Tensor]) -> Result<Vec<Tensor>>>;

/// One checked call of the op named `op`.
pub struct Case {
    /// The op's dispatch name ([`Op::name`]).
    pub op: &'static str,
    /// Its inputs (all tracked for gradients).
    pub inputs: Vec<Tensor>,
    /// The call.
    pub run: Run,
}

/// A case on f64 inputs of `shapes`, drawn by [`randn`] with seeds 100, 101, ….
pub fn case(op: &'static str, shapes: &[&[usize]], run: Run) -> Case {
    let inputs = shapes
        .iter()
        .enumerate()
        .map(|(i, s)| randn(s, 100 + i as u64, DType::F64))
        .collect();
    Case { op, inputs, run }
}

/// A positive vector around 1 made of `t` (norm weights, scales): `1 + t/4`.
pub fn around_one(t: &Tensor) -> Tensor {
    ((t * 0.25).unwrap() + 1.0).unwrap()
}

/// `(name, file)` of every `pub fn` of the `.rs` files in `dir` and its subdirectories whose
/// return type names `Tensor`.
///
/// # Panics
/// When `dir` cannot be read.
pub fn public_tensor_fns(dir: &str) -> Vec<(String, String)> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap_or_else(|e| panic!("{dir}: {e}")) {
        let path = entry.unwrap().path();
        if path.is_dir() {
            found.extend(public_tensor_fns(&path.to_string_lossy()));
            continue;
        }
        let src = std::fs::read_to_string(&path).unwrap();
        let mut rest = src.as_str();
        while let Some(i) = rest.find("\npub fn ") {
            let after = &rest[i + "\npub fn ".len()..];
            let name: String = after
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_')
                .collect();
            let sig = &after[..after.find('{').unwrap_or(after.len())];
            if sig.split("->").nth(1).unwrap_or("").contains("Tensor") {
                let file = path.file_name().unwrap().to_string_lossy().to_string();
                found.push((name, file));
            }
            rest = after;
        }
    }
    found
}

/// Asserts that the tensor ops found in `dir` are exactly those `listed` in a dispatch table
/// plus the `compositions` (functions made only of listed ops or candle ops), and that at least
/// `min_found` were found (so a broken scan cannot pass).
///
/// # Panics
/// On an unlisted op, a listed name not found, or too few found.
pub fn assert_listed(dir: &str, listed: &[Op], compositions: &[&str], min_found: usize) {
    let found = public_tensor_fns(dir);
    assert!(
        found.len() >= min_found,
        "the scan of {dir} found only {found:?}"
    );
    let names: Vec<&str> = listed.iter().map(|o| o.name).collect();
    let unlisted: Vec<_> = found
        .iter()
        .filter(|(n, _)| !names.contains(&n.as_str()) && !compositions.contains(&n.as_str()))
        .collect();
    assert!(
        unlisted.is_empty(),
        "tensor ops without a dispatch entry (so without a known CUDA path): {unlisted:?}"
    );
    let found_names: Vec<&str> = found.iter().map(|(n, _)| n.as_str()).collect();
    let stale: Vec<_> = names
        .iter()
        .chain(compositions)
        .filter(|n| !found_names.contains(n))
        .collect();
    assert!(stale.is_empty(), "listed but not found in {dir}: {stale:?}");
    for op in listed {
        println!("{:32} cuda: {}", op.name, op.cuda_path());
    }
}

/// The outputs of `c` and the gradients of `Σ_k Σ y_k·r_k` (fixed random `r_k`) with respect
/// to each input (zeros where an input gets none).
///
/// # Panics
/// When the op fails (naming it) or on candle errors.
pub fn outputs_and_grads(c: &Case) -> (Vec<Tensor>, Vec<Tensor>) {
    let vars: Vec<Var> = c
        .inputs
        .iter()
        .map(|x| Var::from_tensor(x).unwrap())
        .collect();
    let xs: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
    let ys = (c.run)(&xs).unwrap_or_else(|e| panic!("{}: {e}", c.op));
    let mut loss = Tensor::zeros((), ys[0].dtype(), ys[0].device()).unwrap();
    for (k, y) in ys.iter().enumerate() {
        let r = randn(y.dims(), 900 + k as u64, y.dtype());
        loss = (loss + (y * r).unwrap().sum_all().unwrap()).unwrap();
    }
    let grads = loss.backward().unwrap();
    let gs = xs
        .iter()
        .map(|x| match grads.get(x) {
            Some(g) => g.clone(),
            None => x.zeros_like().unwrap(),
        })
        .collect();
    (ys, gs)
}

/// Runs every case with our CPU kernel and under [`dispatch::with_fallback`] and asserts that
/// outputs and gradients agree: 1e-9 absolute in f64 on values of order 1 (the two paths
/// differ in summation order only, so they agree to about 1e-14; an indexing or formula error
/// is O(1)), 2e-6 in f32 (GELU, the only f32-only kernel: our erf's error is ≤ 1.5e-7). Also
/// asserts that every op of `ops` with a candle fallback has a case, and that each case's
/// gradients are not all zero.
///
/// # Panics
/// On any of those failures (all differing ops named together).
pub fn assert_fallbacks_match(ops: &[Op], cases: &[Case]) {
    let tested: Vec<&str> = cases.iter().map(|c| c.op).collect();
    let untested: Vec<&str> = ops
        .iter()
        .filter(|o| o.fallback == Fallback::Candle && !tested.contains(&o.name))
        .map(|o| o.name)
        .collect();
    assert!(
        untested.is_empty(),
        "ops with a candle fallback but no case: {untested:?}"
    );
    let mut failures = Vec::new();
    for c in cases {
        let op = ops
            .iter()
            .find(|o| o.name == c.op)
            .unwrap_or_else(|| panic!("{}: not in the op list", c.op));
        assert_eq!(dispatch::select(op, &c.inputs[0]), Impl::Cpu, "{}", c.op);
        dispatch::with_fallback(|| {
            assert_eq!(dispatch::select(op, &c.inputs[0]), Impl::Candle, "{}", c.op);
        });
        let (y_ours, g_ours) = outputs_and_grads(c);
        let (y_fb, g_fb) = dispatch::with_fallback(|| outputs_and_grads(c));
        let tol = if c.inputs[0].dtype() == DType::F32 {
            2e-6
        } else {
            1e-9
        };
        assert_eq!(y_ours.len(), y_fb.len(), "{}", c.op);
        assert_eq!(g_ours.len(), g_fb.len(), "{}", c.op);
        let mut worst = 0f64;
        for (a, b) in y_ours.iter().zip(&y_fb).chain(g_ours.iter().zip(&g_fb)) {
            worst = worst.max(max_abs(a, b));
        }
        println!("{:32} max |ours - fallback| = {worst:.2e}", c.op);
        if worst.is_nan() || worst > tol {
            failures.push(format!("{}: {worst:e} > {tol:e}", c.op));
        }
        let gmax = g_ours.iter().map(max_abs_value).fold(0f64, f64::max);
        assert!(gmax > 0.0, "{}: all gradients are zero", c.op);
    }
    assert!(failures.is_empty(), "fallbacks differ: {failures:?}");
}
