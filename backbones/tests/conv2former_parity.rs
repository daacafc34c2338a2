//! Conv2Former against the official code on the golden fixture
//! `../shared/fixtures/backbones/conv2former_small.*` (official `Conv2Former` class at commit
//! 94fd1c4 with O(1) re-initialised weights, eval mode; README §2), and the variant presets
//! against the official factories' parameter counts (`param_counts.json`).
//!
//! Gate: max abs error ≤ 2.5e-5 in f32 on every stage output and on the logits, the issue's
//! bound (the same as SMT's; the fixture README measured that a port's usual mistakes, e.g. a
//! LayerNorm eps of 1e-5 instead of 1e-6, exceed it).

use candle_core::{DType, Device, Tensor};
use densepred_backbones::conv2former::{map_checkpoint_key, Conv2Former, Conv2FormerConfig};
use densepred_backbones::{AnyBackbone, Backbone, BackboneConfig};
use densepred_core::params::SeededVarMap;
use densepred_core::weights::{load_into, read_checkpoint};
use std::path::PathBuf;

const TOL: f32 = 2.5e-5;

fn fixture_dir() -> PathBuf {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared/fixtures/backbones");
    assert!(
        p.is_dir(),
        "fixtures not found at {} (../shared must sit beside the checkout)",
        p.display()
    );
    p
}

fn json(name: &str) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(fixture_dir().join(name)).unwrap()).unwrap()
}

fn max_abs(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims(), "shape mismatch");
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

#[test]
fn stage_outputs_and_logits_match_the_official_code() {
    let meta = json("conv2former_small.json");
    let cfg: Conv2FormerConfig =
        serde_json::from_value(meta["constructor_kwargs"].clone()).unwrap();
    let path = fixture_dir().join("conv2former_small.safetensors");
    let tensors = read_checkpoint(&path).unwrap();
    let vars = SeededVarMap::new(0);
    let model = Conv2Former::new(vars.var_builder(DType::F32, &Device::Cpu), &cfg).unwrap();
    // Strict: every parameter and buffer of the official state dict, nothing else.
    let report = load_into(
        &vars,
        &tensors,
        &|k| Some(map_checkpoint_key(k)),
        true,
        &path,
    )
    .unwrap();
    assert!(report.is_exact(), "{report}");
    let x = &tensors["__input__"];
    let stages = model.forward_stages(x, false).unwrap();
    assert_eq!(stages.len(), 4);
    for (i, s) in stages.iter().enumerate() {
        let want = &tensors[&format!("__stage{}__", i + 1)];
        let err = max_abs(s, want);
        assert!(err <= TOL, "stage {}: max abs error {err}", i + 1);
    }
    let logits = model.classify(&stages[3]).unwrap();
    let err = max_abs(&logits, &tensors["__logits__"]);
    assert!(err <= TOL, "logits: max abs error {err}");
    // The backbone interface returns the same raw maps (out_norm off).
    let outs = model.forward(x, false).unwrap();
    assert_eq!(outs.len(), 4);
    for (a, b) in outs.iter().zip(&stages) {
        assert_eq!(max_abs(a, b), 0.0);
    }
}

fn count(toml_src: &str) -> usize {
    #[derive(serde::Deserialize)]
    struct File {
        backbone: BackboneConfig,
    }
    let cfg = toml::from_str::<File>(toml_src).unwrap().backbone;
    let vars = SeededVarMap::new(0);
    AnyBackbone::new(vars.var_builder(DType::F32, &Device::Cpu), &cfg).unwrap();
    vars.num_parameters()
}

/// Each preset has exactly the official factory's parameter count, with the 1000-class
/// classifier and without it (no `head` / `pred`).
#[test]
fn variant_presets_match_official_parameter_counts() {
    let counts = json("param_counts.json");
    for v in ["n", "t", "s", "b", "b_22k", "l"] {
        let official = &counts["Conv2Former"][format!("conv2former_{v}")];
        let with_head = count(&format!(
            "[backbone]\ntype = \"Conv2Former\"\nvariant = \"{v}\"\nnum_classes = 1000\n"
        ));
        assert_eq!(
            with_head as u64,
            official["params"].as_u64().unwrap(),
            "Conv2Former-{v} with classifier"
        );
        let without = count(&format!(
            "[backbone]\ntype = \"Conv2Former\"\nvariant = \"{v}\"\n"
        ));
        assert_eq!(
            without as u64,
            official["params_without_head_and_pred"].as_u64().unwrap(),
            "Conv2Former-{v} backbone"
        );
    }
}

#[test]
fn configs_are_checked() {
    let err = |s: &str| -> String {
        let c: Conv2FormerConfig = toml::from_str(s).unwrap();
        c.resolve().unwrap_err()
    };
    assert!(err("dims = [64, 128, 256, 512]").contains("kernel_size"));
    assert!(err("kernel_size = 8").contains("odd"));
    assert!(err("variant = \"n\"\ndepths = [1, 2]").contains("depths"));
    assert!(err("variant = \"n\"\nout_indices = [4]").contains("out_indices"));
    assert!(toml::from_str::<Conv2FormerConfig>("variant = \"x\"").is_err());
    assert!(toml::from_str::<Conv2FormerConfig>("variant = \"n\"\nkernel = 7").is_err());
}

/// Deterministic values in [-1, 1) of `shape` (f64).
fn uniform(shape: &[usize], seed: u64) -> Tensor {
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

/// The backward pass of the whole network (autograd through our ops) against central finite
/// differences in f64: the gradient of `Σ_i <stage_i, P_i> + <logits, P>` (fixed random `P`)
/// with respect to the input and to every parameter (a spread of elements of each), in eval
/// mode. Step 1e-5: the truncation error (~h²) and rounding (~1e-16/h) are both far below the
/// gate, 1e-6 relative to the largest gradient entry of the tensor, while an indexing or sign
/// error is O(1).
#[test]
fn gradients_match_finite_differences_in_f64() {
    let cfg: Conv2FormerConfig = toml::from_str(
        "kernel_size = 3\ndims = [4, 6, 8, 8]\ndepths = [1, 1, 1, 1]\nmlp_ratios = [2, 2, 2, 2]\n\
         num_classes = 3\n",
    )
    .unwrap();
    let vars = SeededVarMap::new(3);
    let model = Conv2Former::new(vars.var_builder(DType::F64, &Device::Cpu), &cfg).unwrap();
    // O(1) values everywhere (layer scales start at 1e-6, which would hide the branches).
    let named = vars.named_vars();
    for (i, (name, v)) in named.iter().enumerate() {
        let t = uniform(v.as_tensor().dims(), 100 + i as u64);
        let t = if name.contains("running_var") || name.ends_with("norm.weight") {
            t.affine(0.25, 1.0).unwrap()
        } else {
            t
        };
        v.set(&t).unwrap();
    }
    let x = candle_core::Var::from_tensor(&uniform(&[1, 3, 40, 48], 7)).unwrap();
    let probes: Vec<Tensor> = {
        let s = model.forward_stages(x.as_tensor(), false).unwrap();
        let l = model.classify(&s[3]).unwrap();
        s.iter()
            .chain(std::iter::once(&l))
            .enumerate()
            .map(|(i, t)| uniform(t.dims(), 50 + i as u64))
            .collect()
    };
    let loss = |input: &Tensor| -> Tensor {
        let s = model.forward_stages(input, false).unwrap();
        let l = model.classify(&s[3]).unwrap();
        s.iter()
            .chain(std::iter::once(&l))
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
    assert!(checked > 40, "{checked} parameters checked");
}
