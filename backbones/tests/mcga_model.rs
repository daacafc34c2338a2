//! MCGA (no official code exists, so the paper is the reference): the ImageNet classifier's
//! parameter count against the paper's 10.3M, the configuration checks, a golden test of our own
//! (fixed weights and input → stored outputs, `tests/data/mcga_golden.safetensors`) so that a
//! refactor cannot silently change the function, and the gradients against finite differences in
//! f64.
//!
//! Golden tolerance: 1e-5 of each output's largest magnitude (f32: the stage maps are O(1), the
//! logits O(10). A change of summation order moves them by ~1e-6 of that magnitude: the dense
//! convolutions' per-tap GEMMs of issue 20 moved the stage maps by 0.7–2.4e-6 and the logits by
//! 0.9e-6 relative, 1.24e-5 absolute. Any change of the function moves them by ≫ 1e-3).
//! Regenerate the file only for an intended change of the function:
//! `DENSEPRED_WRITE_GOLDEN=1 cargo test --workspace --test mcga_model golden`.

use candle_core::{DType, Device, Tensor};
use densepred_backbones::mcga::{Mcga, McgaConfig};
use densepred_backbones::{AnyBackbone, Backbone, BackboneConfig};
use densepred_core::params::SeededVarMap;
use std::path::PathBuf;

mod common;

fn parse(src: &str) -> McgaConfig {
    toml::from_str(src).unwrap()
}

fn count(cfg: &McgaConfig) -> usize {
    let vars = SeededVarMap::new(0);
    Mcga::new(vars.var_builder(DType::F32, &Device::Cpu), cfg).unwrap();
    vars.num_parameters()
}

#[test]
fn classifier_parameter_count_is_within_5_percent_of_the_paper() {
    let src = std::fs::read_to_string(
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../configs/backbones/mcga_in1k.toml"),
    )
    .unwrap();
    let table: toml::Table = toml::from_str(&src).unwrap();
    let cfg: BackboneConfig = table["backbone"].clone().try_into().unwrap();
    let vars = SeededVarMap::new(0);
    AnyBackbone::new(vars.var_builder(DType::F32, &Device::Cpu), &cfg).unwrap();
    let n = vars.num_parameters();
    // The count our decisions give (module doc), and the bound around the paper's 10.3M.
    assert_eq!(n, 10_702_632);
    assert!((n as f64 / 10.3e6 - 1.0).abs() <= 0.05, "{n}");
    // The alternatives of the open points change the count as designed.
    let base = count(&parse("num_classes = 1000"));
    assert_eq!(base, n);
    let d2: usize = [32usize, 64, 128, 256]
        .iter()
        .zip([2usize, 2, 6, 6])
        .map(|(d, k)| k * (2 * d * d + 2 * d))
        .sum();
    assert_eq!(
        count(&parse("num_classes = 1000\ncross_kv = \"shared\"")),
        n - d2
    );
    let d1: usize = [32usize, 64, 128, 256]
        .iter()
        .zip([2usize, 2, 6, 6])
        .map(|(d, k)| k * (d * d + d))
        .sum();
    assert_eq!(
        count(&parse("num_classes = 1000\nfusion = \"after_sum\"")),
        n - d1
    );
}

#[test]
fn configs_are_checked() {
    let err = |s: &str| {
        let c: McgaConfig = toml::from_str(s).unwrap();
        c.resolve().unwrap_err()
    };
    assert!(err("num_heads = [3, 2, 4, 8]").contains("divisible"));
    assert!(err("depths = [1, 2]").contains("depths"));
    assert!(err("out_indices = [4]").contains("out_indices"));
    assert!(err("num_groups = 0").contains("num_groups"));
    assert!(toml::from_str::<McgaConfig>("variant = \"small\"").is_err());
    assert!(toml::from_str::<McgaConfig>("fusion = \"concat\"").is_err());
    assert!(toml::from_str::<McgaConfig>("groups = 8").is_err());
}

fn small(extra: &str) -> McgaConfig {
    parse(&format!(
        "embed_dims = [8, 16, 16, 32]\ndepths = [1, 1, 2, 1]\nnum_heads = [2, 2, 2, 4]\n\
         mlp_ratios = [2, 2, 2, 2]\nnum_groups = 4\nnum_classes = 10\n{extra}"
    ))
}

/// Every alternative builds and runs, with the stage shapes that `out_shapes` announces.
#[test]
fn alternatives_run_with_announced_shapes() {
    for extra in [
        "head_hidden = 24",
        "patch_embed = \"patchify\"",
        "cross_kv = \"shared\"",
        "fusion = \"after_sum\"",
        "out_indices = [1, 3]\nhead_hidden = 0",
    ] {
        let vars = SeededVarMap::new(1);
        let m = Mcga::new(vars.var_builder(DType::F32, &Device::Cpu), &small(extra)).unwrap();
        let x = Tensor::randn(0f32, 1.0, (2, 3, 64, 96), &Device::Cpu).unwrap();
        let outs = m.forward(&x, true).unwrap();
        let shapes = m.out_shapes();
        assert_eq!(outs.len(), shapes.len(), "{extra}");
        for (o, s) in outs.iter().zip(&shapes) {
            assert_eq!(
                o.dims(),
                [2, s.channels, 64 / s.stride, 96 / s.stride],
                "{extra}"
            );
        }
        let all = m.forward_stages(&x, false).unwrap();
        assert_eq!(m.classify(&all[3]).unwrap().dims(), [2, 10], "{extra}");
    }
}

/// LayerNorm weights get values around 1 (`norm1`, `norm2`, `norm{i}`, the patch embeddings' and
/// the mixers' `norm`).
fn is_norm_weight(name: &str) -> bool {
    name.ends_with(".weight")
        && name
            .rsplit('.')
            .nth(1)
            .is_some_and(|m| m.starts_with("norm"))
}

fn golden_path() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data/mcga_golden.safetensors")
}

#[test]
fn golden_outputs_are_unchanged() {
    let vars = SeededVarMap::new(0);
    let m = Mcga::new(
        vars.var_builder(DType::F32, &Device::Cpu),
        &small("head_hidden = 24"),
    )
    .unwrap();
    common::set_uniform(&vars, is_norm_weight);
    let x = common::uniform(&[2, 3, 64, 96], 11)
        .to_dtype(DType::F32)
        .unwrap();
    let mut outs = m.forward_stages(&x, false).unwrap();
    let logits = m.classify(&outs[3]).unwrap();
    outs.push(logits);
    let names = ["stage1", "stage2", "stage3", "stage4", "logits"];
    assert_eq!(outs.len(), names.len());
    if std::env::var("DENSEPRED_WRITE_GOLDEN").as_deref() == Ok("1") {
        let map: std::collections::HashMap<String, Tensor> = names
            .iter()
            .zip(&outs)
            .map(|(n, t)| (n.to_string(), t.clone()))
            .collect();
        candle_core::safetensors::save(&map, golden_path()).unwrap();
        eprintln!("wrote {}", golden_path().display());
    }
    let want = candle_core::safetensors::load(golden_path(), &Device::Cpu)
        .expect("tests/data/mcga_golden.safetensors (see the module doc to regenerate it)");
    assert_eq!(want.len(), names.len());
    for (n, got) in names.iter().zip(&outs) {
        let w = &want[*n];
        assert_eq!(got.dims(), w.dims(), "{n}");
        let scale = densepred_testutil::max_abs_value(&w);
        assert!(scale > 0.1, "{n}: outputs too small to test ({scale})");
        let e = densepred_testutil::max_abs(&got, &w);
        assert!(
            e <= 1e-5 * scale,
            "{n}: max abs error {e} (tolerance 1e-5 of the largest magnitude {scale})"
        );
    }
}

/// Autograd through the whole network against central finite differences in f64
/// ([`common::assert_gradients_match_finite_differences`]), training mode without drop path.
#[test]
fn gradients_match_finite_differences_in_f64() {
    let cfg = parse(
        "embed_dims = [4, 8, 8, 8]\ndepths = [1, 1, 1, 1]\nnum_heads = [2, 2, 2, 2]\n\
         mlp_ratios = [2, 2, 2, 2]\nnum_groups = 3\nmixer_ratio = 2\nnum_classes = 3\nhead_hidden = 5\n",
    );
    let vars = SeededVarMap::new(3);
    let model = Mcga::new(vars.var_builder(DType::F64, &Device::Cpu), &cfg).unwrap();
    common::set_uniform(&vars, is_norm_weight);
    let outputs = |x: &Tensor| -> Vec<Tensor> {
        let mut s = model.forward_stages(x, true).unwrap();
        let l = model.classify(&s[3]).unwrap();
        s.push(l);
        s
    };
    let checked =
        common::assert_gradients_match_finite_differences(&vars, &outputs, &[1, 3, 40, 48]);
    assert!(checked > 80, "{checked} parameters checked");
}
