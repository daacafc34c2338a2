//! Helpers shared by the backbone tests: deterministic O(1) values and the f64 finite-difference
//! check of a whole network's gradients.
#![allow(dead_code)]

use candle_core::{Device, Tensor};
use densepred_core::params::SeededVarMap;

/// Deterministic values in [-1, 1) of `shape` (f64).
pub fn uniform(shape: &[usize], seed: u64) -> Tensor {
    let n: usize = shape.iter().product();
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let v: Vec<f64> = (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0
        })
        .collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

/// Sets every variable of `vars` to deterministic values in [-1, 1) (`positive(name)`: in
/// [0.75, 1.25) instead, for norm weights and running variances), in the variables' dtype.
pub fn set_uniform(vars: &SeededVarMap, positive: impl Fn(&str) -> bool) {
    for (i, (name, v)) in vars.named_vars().iter().enumerate() {
        let t = uniform(v.as_tensor().dims(), 100 + i as u64);
        let t = if positive(name) {
            t.affine(0.25, 1.0).unwrap()
        } else {
            t
        };
        v.set(&t.to_dtype(v.as_tensor().dtype()).unwrap()).unwrap();
    }
}

/// The gradient of `Σ_i <out_i, P_i>` (fixed random probes `P_i`, one per tensor that `outputs`
/// returns) with respect to an input of `x_shape` and to every parameter of `vars` (six spread
/// elements of each; running statistics skipped), autograd against central finite differences
/// in f64. Step 1e-5: the truncation error (~h²) and rounding (~1e-16/h) are both far below the
/// gate, 1e-6 relative to the largest gradient entry of the tensor, while an indexing or sign
/// error is O(1). Returns how many parameters were checked.
pub fn assert_gradients_match_finite_differences(
    vars: &SeededVarMap,
    outputs: &dyn Fn(&Tensor) -> Vec<Tensor>,
    x_shape: &[usize],
) -> usize {
    let named = vars.named_vars();
    let x = candle_core::Var::from_tensor(&uniform(x_shape, 7)).unwrap();
    let probes: Vec<Tensor> = outputs(x.as_tensor())
        .iter()
        .enumerate()
        .map(|(i, t)| uniform(t.dims(), 50 + i as u64))
        .collect();
    let loss = |input: &Tensor| -> Tensor {
        let outs = outputs(input);
        assert_eq!(outs.len(), probes.len(), "outputs");
        outs.iter()
            .zip(&probes)
            .map(|(t, p)| (t * p).unwrap().sum_all().unwrap())
            .reduce(|a, b| (a + b).unwrap())
            .unwrap()
    };
    let grads = loss(x.as_tensor()).backward().unwrap();
    let h = 1e-5;
    let check = |what: &str, var: &candle_core::Var, input: bool| {
        let g = grads
            .get(var.as_tensor())
            .unwrap_or_else(|| panic!("{what}: no gradient"));
        let ana: Vec<f64> = g.flatten_all().unwrap().to_vec1().unwrap();
        let base = var.as_tensor().copy().unwrap();
        let flat: Vec<f64> = base.flatten_all().unwrap().to_vec1().unwrap();
        assert_eq!(ana.len(), flat.len(), "{what}");
        let scale = ana.iter().fold(1e-3f64, |m, v| m.max(v.abs()));
        let n = flat.len();
        let picks: Vec<usize> = if n <= 6 {
            (0..n).collect()
        } else {
            (0..6).map(|k| k * (n - 1) / 5).collect()
        };
        let eval = |vals: Vec<f64>| -> f64 {
            let t = Tensor::from_vec(vals, base.dims(), &Device::Cpu).unwrap();
            if input {
                loss(&t).to_scalar::<f64>().unwrap()
            } else {
                var.set(&t).unwrap();
                let v = loss(x.as_tensor()).to_scalar::<f64>().unwrap();
                var.set(&base).unwrap();
                v
            }
        };
        for i in picks {
            let mut p = flat.clone();
            p[i] += h;
            let fp = eval(p.clone());
            p[i] -= 2.0 * h;
            let fm = eval(p);
            let num = (fp - fm) / (2.0 * h);
            assert!(
                (num - ana[i]).abs() <= 1e-6 * scale,
                "{what}[{i}]: autograd {} vs finite difference {num} (scale {scale})",
                ana[i]
            );
        }
    };
    check("input", &x, true);
    let mut checked = 0;
    for (name, v) in &named {
        if name.contains("running_") {
            continue; // buffers
        }
        check(name, v, false);
        checked += 1;
    }
    checked
}
