//! UperNet on SMT built from the TOML model config: parameter counts equal mmsegmentation's
//! (`../shared/fixtures/models/head_param_counts.json`: backbone without classifier + decode +
//! auxiliary heads), and a tiny segmentor trains one step and predicts label maps.

use candle_core::{DType, Device, Tensor};
use densepred_core::params::SeededVarMap;
use densepred_engine::config::{load_with_overrides, section};
use densepred_models::{SegModelConfig, Segmentor};
use std::path::{Path, PathBuf};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn fixture_count(model: &str) -> usize {
    let p = root().join("../shared/fixtures/models/head_param_counts.json");
    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap();
    v["models"][model]["full_params"]
        .as_u64()
        .unwrap_or_else(|| panic!("no full_params for {model}")) as usize
}

fn build(path: &Path, overrides: &[String]) -> (SeededVarMap, Segmentor) {
    let cfg = load_with_overrides(path, overrides).unwrap();
    let model_cfg: SegModelConfig = section(&cfg, "model", path).unwrap();
    let vars = SeededVarMap::new(0);
    let m = Segmentor::new(vars.var_builder(DType::F32, &Device::Cpu), &model_cfg).unwrap();
    (vars, m)
}

#[test]
fn upernet_smt_param_counts_match_mmseg() {
    let path = root().join("configs/_base_/models/upernet_smt-s.toml");
    let (vars, _) = build(&path, &[]);
    assert_eq!(vars.num_parameters(), fixture_count("upernet_smt_s"));
    assert_eq!(vars.num_parameters(), 52_345_580);
    let (vars_b, _) = build(&path, &["model.backbone.variant=\"b\"".into()]);
    assert_eq!(vars_b.num_parameters(), fixture_count("upernet_smt_b"));
    assert_eq!(vars_b.num_parameters(), 61_831_980);
}

/// A tiny UperNet-SMT (the overfit test's backbone widths) trains one step — both losses finite,
/// every parameter gets a gradient — and predicts label maps of each image's original size.
#[test]
fn tiny_upernet_trains_and_predicts() {
    let path = root().join("configs/_base_/models/upernet_smt-s.toml");
    let sets: Vec<String> = [
        "model.backbone.variant=\"t\"",
        "model.backbone.embed_dims=[16, 32, 64, 128]",
        "model.backbone.sa_num_heads=[-1, -1, 2, 4]",
        "model.backbone.depths=[1, 1, 2, 1]",
        "model.backbone.mlp_ratios=[2, 2, 2, 2]",
        "model.decode_head.in_channels=[16, 32, 64, 128]",
        "model.decode_head.channels=16",
        "model.decode_head.num_classes=5",
        "model.auxiliary_head.in_channels=64",
        "model.auxiliary_head.channels=8",
        "model.auxiliary_head.num_classes=5",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let (vars, m) = build(&path, &sets);
    let dev = Device::Cpu;
    let x = Tensor::randn(0f32, 1.0, (2, 3, 64, 96), &dev).unwrap();
    // Labels 0..4 with an ignored band.
    let lab: Vec<u8> = (0..2 * 64 * 96)
        .map(|i| {
            if (i / 96) % 64 < 8 {
                255
            } else {
                (i % 5) as u8
            }
        })
        .collect();
    let labels = Tensor::from_vec(lab, (2, 64, 96), &dev).unwrap();
    let losses = m.loss(&x, &labels).unwrap();
    let names: Vec<&str> = losses.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, ["decode.loss_ce", "aux.loss_ce"]);
    let mut total = losses[0].1.clone();
    for (_, l) in &losses[1..] {
        total = (total + l).unwrap();
    }
    let v = total.to_scalar::<f32>().unwrap();
    assert!(v.is_finite() && v > 0.0, "loss {v}");
    let grads = total.backward().unwrap();
    for (name, var) in vars.named_vars() {
        if densepred_core::params::is_buffer(&name) {
            continue;
        }
        assert!(grads.get(&var).is_some(), "no gradient for {name}");
    }
    let preds = m
        .predict(&x, &[(64, 96), (60, 90)], &[(32, 48), (120, 180)])
        .unwrap();
    assert_eq!(preds[0].dims(), &[32, 48]);
    assert_eq!(preds[1].dims(), &[120, 180]);
    let mx = preds[1].max_all().unwrap().to_scalar::<u32>().unwrap();
    assert!(mx < 5);
}
