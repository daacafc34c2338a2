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
use densepred_testutil::max_abs;

mod common;

const TOL: f64 = 2.5e-5;

fn json(name: &str) -> serde_json::Value {
    serde_json::from_str(
        &std::fs::read_to_string(densepred_testutil::fixtures_dir("backbones").join(name)).unwrap(),
    )
    .unwrap()
}

#[test]
fn stage_outputs_and_logits_match_the_official_code() {
    let meta = json("conv2former_small.json");
    let cfg: Conv2FormerConfig =
        serde_json::from_value(meta["constructor_kwargs"].clone()).unwrap();
    let path = densepred_testutil::fixtures_dir("backbones").join("conv2former_small.safetensors");
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

/// The backward pass of the whole network (autograd through our ops) against central finite
/// differences in f64 ([`common::assert_gradients_match_finite_differences`]), in eval mode.
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
    common::set_uniform(&vars, |name| {
        name.contains("running_var") || name.ends_with("norm.weight")
    });
    let outputs = |x: &Tensor| -> Vec<Tensor> {
        let mut s = model.forward_stages(x, false).unwrap();
        let l = model.classify(&s[3]).unwrap();
        s.push(l);
        s
    };
    let checked =
        common::assert_gradients_match_finite_differences(&vars, &outputs, &[1, 3, 40, 48]);
    assert!(checked > 40, "{checked} parameters checked");
}
