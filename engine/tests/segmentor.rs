//! UperNet on SMT built from the TOML model config: parameter counts equal mmsegmentation's
//! (`../shared/fixtures/models/head_param_counts.json`: backbone without classifier + decode +
//! auxiliary heads), and a tiny segmentor trains one step and predicts label maps.

mod common;
use candle_core::{DType, Device, Tensor};
use common::root;
use densepred_core::params::SeededVarMap;
use densepred_engine::config::{load_with_overrides, section};
use densepred_models::{ModelConfig, Segmentor};
use std::path::Path;

fn fixture_count(model: &str) -> usize {
    let p = root().join("../shared/fixtures/models/head_param_counts.json");
    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap();
    v["models"][model]["full_params"]
        .as_u64()
        .unwrap_or_else(|| panic!("no full_params for {model}")) as usize
}

fn build(path: &Path, overrides: &[String]) -> (SeededVarMap, Segmentor) {
    let cfg = load_with_overrides(path, overrides).unwrap();
    let model_cfg: ModelConfig = section(&cfg, "model", path).unwrap();
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

/// Window placement equals mmseg's `slide_inference` arithmetic (rows/columns
/// `max(H − crop + stride − 1, 0) // stride + 1`, last window moved back to the edge).
#[test]
fn slide_windows_follow_mmseg() {
    use densepred_models::slide_windows;
    // 512x683 ADE image, 512 crops every 341 px: one row, two columns, the second ending at 683.
    assert_eq!(
        slide_windows((512, 683), (512, 512), (341, 341)),
        vec![[0, 512, 0, 512], [0, 512, 171, 683]]
    );
    // 1024 px: three rows, the third moved back from 682..1194 to 512..1024.
    let rows: Vec<[usize; 2]> = slide_windows((1024, 100), (512, 512), (341, 341))
        .iter()
        .map(|w| [w[0], w[1]])
        .collect();
    assert_eq!(rows, vec![[0, 512], [341, 853], [512, 1024]]);
    // An image smaller than the crop: one window, the whole image.
    assert_eq!(
        slide_windows((300, 400), (512, 512), (341, 341)),
        vec![[0, 300, 0, 400]]
    );
}

/// Sliding-window inference assembles per-window logits: with non-overlapping windows it equals
/// `encode_decode` of each quadrant put in place; with overlapping windows, the overlap is the
/// mean of the windows covering it.
#[test]
fn slide_inference_assembles_windows() {
    let path = root().join("configs/_base_/models/upernet_smt-s.toml");
    let mut sets: Vec<String> = [
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
        "model.test_cfg.mode=\"slide\"",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    sets.push("model.test_cfg.crop_size=[32, 64]".into());
    sets.push("model.test_cfg.stride=[32, 64]".into());
    let (_, m) = build(&path, &sets);
    let dev = Device::Cpu;
    let x = Tensor::randn(0f32, 1.0, (1, 3, 64, 128), &dev).unwrap();
    let got = m.predict_logits(&x).unwrap();
    let quad = |y: usize, xx: usize| {
        m.encode_decode(&x.narrow(2, y, 32).unwrap().narrow(3, xx, 64).unwrap())
            .unwrap()
    };
    let top = Tensor::cat(&[quad(0, 0), quad(0, 64)], 3).unwrap();
    let bottom = Tensor::cat(&[quad(32, 0), quad(32, 64)], 3).unwrap();
    let want = Tensor::cat(&[top, bottom], 2).unwrap();
    let diff = densepred_testutil::max_abs(&got, &want);
    // Same kernels on the same crops: only the summation order of the assembly differs.
    assert!(diff < 1e-5, "max diff {diff}");

    // Overlap: windows of 64 columns every 32 on 128 columns → columns 32..96 are averaged.
    let n = sets.len();
    sets[n - 2] = "model.test_cfg.crop_size=[64, 64]".into();
    sets[n - 1] = "model.test_cfg.stride=[64, 32]".into();
    let (_, m) = build(&path, &sets);
    let got = m.predict_logits(&x).unwrap();
    let win = |xx: usize| m.encode_decode(&x.narrow(3, xx, 64).unwrap()).unwrap();
    let (a, b, c) = (win(0), win(32), win(64));
    let mid =
        ((a.narrow(3, 32, 32).unwrap() + b.narrow(3, 0, 32).unwrap()).unwrap() / 2.0).unwrap();
    let mid2 =
        ((b.narrow(3, 32, 32).unwrap() + c.narrow(3, 0, 32).unwrap()).unwrap() / 2.0).unwrap();
    let want = Tensor::cat(
        &[
            a.narrow(3, 0, 32).unwrap(),
            mid,
            mid2,
            c.narrow(3, 32, 32).unwrap(),
        ],
        3,
    )
    .unwrap();
    let diff = densepred_testutil::max_abs(&got, &want);
    assert!(diff < 1e-5, "max diff {diff}");
}
