//! End-to-end tests of the `densepred` binary on the official SMT fixture.

mod common;
use candle_core::{Device, Tensor};
use common::*;
use densepred_testutil::max_abs;
use std::path::{Path, PathBuf};

fn fixture() -> PathBuf {
    let p = root().join("../shared/fixtures/backbones/smt_small.safetensors");
    assert!(
        p.exists(),
        "missing {} (../shared must sit beside the checkout)",
        p.display()
    );
    p
}

fn load(p: &Path) -> std::collections::HashMap<String, Tensor> {
    candle_core::safetensors::load(p, &Device::Cpu).unwrap()
}

/// `features` reproduces the official outputs (the ≤ 2.5e-5 gate of `smt_parity.rs`) from both a
/// safetensors file and a PyTorch `.pth` checkpoint with the state dict under `model`.
#[test]
fn features_match_official_outputs_from_safetensors_and_pth() {
    let dir = tempfile::tempdir().unwrap();
    let want = load(&fixture());
    for weights in [fixture(), root().join("tests/data/smt_small_model.pth")] {
        let out = dir.path().join("out.safetensors");
        let (ok, stdout, stderr) = densepred(&[
            "features",
            "--backbone",
            "tests/data/smt_small.toml",
            "--weights",
            weights.to_str().unwrap(),
            "--input",
            fixture().to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ]);
        assert!(ok, "{stdout}{stderr}");
        let got = load(&out);
        for k in [
            "__stage1__",
            "__stage2__",
            "__stage3__",
            "__stage4__",
            "__logits__",
        ] {
            let err = max_abs(&got[k], &want[k]);
            assert!(err <= 2.5e-5, "{}: {k} differs by {err}", weights.display());
        }
    }
}

/// README's first command writes into a folder that a fresh checkout does not have yet.
#[test]
fn features_on_an_image_creates_the_output_folder() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("work_dirs/sub/features.safetensors");
    let (ok, stdout, stderr) = densepred(&[
        "features",
        "--backbone",
        "tests/data/smt_small.toml",
        "--image",
        "assets/mini_coco/images/000000000009.jpg",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(ok, "{stdout}{stderr}");
    let t = load(&out);
    // 640x480 image: stage 1 is (1, 16, 120, 160) for this config.
    assert_eq!(t["__stage1__"].dims(), &[1, 16, 120, 160]);
    assert_eq!(t["__logits__"].dims(), &[1, 10]);
}

#[test]
fn convert_pth_to_safetensors_keeps_every_tensor() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("w.safetensors");
    let (ok, stdout, stderr) = densepred(&[
        "convert",
        "pth2safetensors",
        "tests/data/smt_small_model.pth",
        out.to_str().unwrap(),
    ]);
    assert!(ok, "{stdout}{stderr}");
    let got = load(&out);
    let want = load(&fixture());
    let params: Vec<_> = want.keys().filter(|k| !k.starts_with("__")).collect();
    assert_eq!(got.len(), params.len());
    for k in params {
        let (a, b) = (&got[k], &want[k]);
        assert_eq!(a.dtype(), b.dtype(), "{k}");
        let d = (a.to_dtype(candle_core::DType::F64).unwrap()
            - b.to_dtype(candle_core::DType::F64).unwrap())
        .unwrap();
        assert_eq!(
            d.abs()
                .unwrap()
                .flatten_all()
                .unwrap()
                .max(0)
                .unwrap()
                .to_scalar::<f64>()
                .unwrap(),
            0.0,
            "{k}"
        );
    }
}

#[test]
fn analyze_params_prints_official_total() {
    let (ok, stdout, stderr) =
        densepred(&["analyze", "params", "configs/backbones/smt-t_in1k.toml"]);
    assert!(ok, "{stderr}");
    assert_eq!(stdout.lines().last().unwrap(), "total 11506536");
    assert!(stdout.contains("patch_embed1") && stdout.contains("head"));
}

#[test]
fn benchmark_json_is_the_last_line() {
    let (ok, stdout, stderr) = densepred(&[
        "benchmark",
        "backbone",
        "tests/data/smt_small.toml",
        "--shape",
        "64x64",
        "--iters",
        "2",
        "--train",
        "--json",
    ]);
    assert!(ok, "{stderr}");
    let v: serde_json::Value = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
    assert!(v["median_ms"].as_f64().unwrap() > 0.0);
    assert!(v["peak_mb"].as_f64().unwrap() > 0.0);
    // The official model's parameters: every fixture tensor except buffers and `__*__` extras.
    let want: usize = load(&fixture())
        .iter()
        .filter(|(k, _)| !k.starts_with("__") && !densepred_core::params::is_buffer(k))
        .map(|(_, t)| t.elem_count())
        .sum();
    assert_eq!(v["params"].as_u64().unwrap() as usize, want);
}

/// Bad input is a clear error naming the file and the problem, never a panic.
#[test]
fn bad_input_gives_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("o.safetensors");
    let o = out.to_str().unwrap();
    let f = fixture();
    let fx = f.to_str().unwrap();
    // Missing weights file.
    let (ok, _, err) = densepred(&[
        "features",
        "--backbone",
        "tests/data/smt_small.toml",
        "--weights",
        "nope.pth",
        "--input",
        fx,
        "--out",
        o,
    ]);
    assert!(
        !ok && err.contains("nope.pth") && err.contains("no such file"),
        "{err}"
    );
    // Misspelled config key.
    let cfg = dir.path().join("bad.toml");
    std::fs::write(
        &cfg,
        "[backbone]\ntype = \"SMT\"\nvariant = \"t\"\ndepth = [1, 1, 1, 1]\n",
    )
    .unwrap();
    let (ok, _, err) = densepred(&["analyze", "params", cfg.to_str().unwrap()]);
    assert!(
        !ok && err.contains("bad.toml") && err.contains("depth"),
        "{err}"
    );
    // Weights of another model: the first shape mismatches listed by name, then a count.
    let (ok, _, err) = densepred(&[
        "features",
        "--backbone",
        "configs/backbones/smt-t.toml",
        "--weights",
        fx,
        "--input",
        fx,
        "--out",
        o,
    ]);
    assert!(
        !ok && err
            .contains("shape mismatch for block1.0.attn.bn.bias: model [128], checkpoint [32]")
            && err.contains("more shape mismatches"),
        "{err}"
    );
    // An input file without __input__.
    let (ok, _, err) = densepred(&[
        "features",
        "--backbone",
        "tests/data/smt_small.toml",
        "--input",
        "tests/data/smt_small_model.pth",
        "--out",
        o,
    ]);
    assert!(!ok && err.contains("smt_small_model.pth"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
}

fn eval_dir() -> PathBuf {
    root().join("../shared/fixtures/eval")
}

/// `eval coco --json-out` writes the 12 stats under their names, equal to pycocotools'.
#[test]
fn eval_coco_json_out_matches_pycocotools() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("s.json");
    let case = eval_dir().join("coco/segm");
    let (ok, stdout, stderr) = densepred(&[
        "eval",
        "coco",
        "--gt",
        case.join("gt.json").to_str().unwrap(),
        "--results",
        case.join("dets.json").to_str().unwrap(),
        "--iou-type",
        "segm",
        "--json-out",
        out.to_str().unwrap(),
    ]);
    assert!(ok, "{stderr}");
    assert!(
        stdout.contains("Average Precision  (AP) @[ IoU=0.50:0.95")
            || stdout.contains("Average Precision (AP) @[ IoU=0.50:0.95"),
        "{stdout}"
    );
    let got: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
    let expected: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(case.join("expected.json")).unwrap())
            .unwrap();
    let want = expected["segm"]["pycocotools"]["stats"].as_array().unwrap();
    let names = [
        "AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl",
    ];
    assert_eq!(names.len(), want.len(), "pycocotools stats");
    for (name, w) in names.iter().zip(want) {
        let g = got[*name]
            .as_f64()
            .unwrap_or_else(|| panic!("{name} missing"));
        assert!((g - w.as_f64().unwrap()).abs() < 1e-6, "{name}: {g} vs {w}");
    }
    assert_eq!(got.as_object().unwrap().len(), 12);
}

#[test]
fn eval_errors_name_file_record_and_field() {
    let dir = tempfile::tempdir().unwrap();
    let case = eval_dir().join("coco/bbox");
    let bad = dir.path().join("bad.json");
    std::fs::write(&bad, r#"[{"image_id": 101, "category_id": 1, "bbox": [1, 2, 3, 4], "score": 0.5}, {"image_id": 999999, "category_id": 1, "bbox": [1, 2, 3, 4], "score": 0.5}]"#).unwrap();
    let (ok, _, err) = densepred(&[
        "eval",
        "coco",
        "--gt",
        case.join("gt.json").to_str().unwrap(),
        "--results",
        bad.to_str().unwrap(),
    ]);
    assert!(
        !ok && err.contains("bad.json") && err.contains("image_id") && err.contains("999999"),
        "{err}"
    );
    let (ok, _, err) = densepred(&[
        "eval",
        "coco",
        "--gt",
        "missing.json",
        "--results",
        bad.to_str().unwrap(),
    ]);
    assert!(!ok && err.contains("missing.json"), "{err}");
    std::fs::write(&bad, "{ not json").unwrap();
    let (ok, _, err) = densepred(&[
        "eval",
        "coco",
        "--gt",
        bad.to_str().unwrap(),
        "--results",
        bad.to_str().unwrap(),
    ]);
    assert!(!ok && err.contains("bad.json"), "{err}");
    assert!(!err.contains("panicked"));
}

/// `eval seg` on PNG folders in the ADE20K convention: predictions equal to the ground truth give
/// mIoU 1 over the classes present; a size mismatch is an error naming the file.
#[test]
fn eval_seg_on_png_folders() {
    let dir = tempfile::tempdir().unwrap();
    let gt_dir = root().join("assets/ade20k_samples/annotations/validation");
    let pred = dir.path().join("pred");
    std::fs::create_dir(&pred).unwrap();
    for e in std::fs::read_dir(&gt_dir).unwrap() {
        let p = e.unwrap().path();
        // A perfect prediction: the ground truth with "other" (0) replaced by class 1 (value 1).
        let img = image::open(&p).unwrap().to_luma8();
        let fixed = image::ImageBuffer::from_fn(img.width(), img.height(), |x, y| {
            image::Luma([img.get_pixel(x, y)[0].max(1)])
        });
        fixed.save(pred.join(p.file_name().unwrap())).unwrap();
    }
    let out = dir.path().join("m.json");
    let (ok, stdout, stderr) = densepred(&[
        "eval",
        "seg",
        "--gt-dir",
        gt_dir.to_str().unwrap(),
        "--pred-dir",
        pred.to_str().unwrap(),
        "--num-classes",
        "150",
        "--reduce-zero-label",
        "--json-out",
        out.to_str().unwrap(),
    ]);
    assert!(ok, "{stderr}");
    assert!(stdout.contains("mIoU"));
    let m: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
    assert_eq!(m["mIoU"].as_f64().unwrap(), 1.0);
    assert_eq!(m["aAcc"].as_f64().unwrap(), 1.0);
    assert_eq!(m["IoU"].as_array().unwrap().len(), 150);
    assert!(
        m["IoU"].as_array().unwrap().iter().any(|v| v.is_null()),
        "absent classes are null"
    );
    // Size mismatch.
    let first = std::fs::read_dir(&pred)
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    image::GrayImage::new(3, 3).save(&first).unwrap();
    let (ok, _, err) = densepred(&[
        "eval",
        "seg",
        "--gt-dir",
        gt_dir.to_str().unwrap(),
        "--pred-dir",
        pred.to_str().unwrap(),
        "--num-classes",
        "150",
        "--reduce-zero-label",
    ]);
    assert!(
        !ok && err.contains(first.file_name().unwrap().to_str().unwrap())
            && err.contains("differs"),
        "{err}"
    );
}

#[test]
fn browse_dataset_writes_pngs_and_names_config_errors() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("vis");
    let (ok, stdout, stderr) = densepred(&[
        "browse-dataset",
        "configs/_base_/datasets/mini_coco_detection.toml",
        "--out-dir",
        out.to_str().unwrap(),
        "--limit",
        "2",
        "--set",
        "train_dataloader.dataset.pipeline.1.with_mask=true",
    ]);
    assert!(ok, "{stderr}");
    assert!(stdout.contains("wrote 2 images"));
    let pngs: Vec<_> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(pngs.len(), 2);
    let img = image::open(&pngs[0]).unwrap();
    assert_eq!(
        img.width().max(img.height()),
        320,
        "the pipeline's Resize was applied"
    );
    // A misspelled key in an override is reported with the table and key.
    let (ok, _, err) = densepred(&[
        "browse-dataset",
        "configs/_base_/datasets/mini_coco_detection.toml",
        "--out-dir",
        out.to_str().unwrap(),
        "--set",
        "train_dataloader.dataset.ann_fil=x.json",
    ]);
    assert!(
        !ok && err.contains("train_dataloader") && err.contains("ann_fil"),
        "{err}"
    );
    let (ok, _, err) = densepred(&[
        "browse-dataset",
        "configs/backbones/smt-t.toml",
        "--out-dir",
        out.to_str().unwrap(),
    ]);
    assert!(!ok && err.contains("train_dataloader"), "{err}");
}

/// `analyze params` on the paper's detector configs equals mmdetection's count of the official
/// configs (`../shared/fixtures/models/head_param_counts.json`).
#[test]
fn analyze_params_matches_mmdet_for_paper_detectors() {
    let fx: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(root().join("../shared/fixtures/models/head_param_counts.json"))
            .unwrap(),
    )
    .unwrap();
    for (cfg, key) in [
        (
            "configs/retinanet/retinanet_smt-s_fpn_3x_coco.toml",
            "retinanet_smt_s",
        ),
        ("configs/atss/atss_smt-s_fpn_3x_coco.toml", "atss_smt_s"),
    ] {
        let (ok, text, err) = densepred(&["analyze", "params", cfg]);
        assert!(ok, "{err}");
        let total = params_total(&text);
        assert_eq!(
            total,
            fx["models"][key]["full_params"].as_u64().unwrap(),
            "{cfg}\n{text}"
        );
    }
}

/// `--device` on every command that runs a model: a CUDA device that does not open (no GPU here,
/// or a CPU-only build) and a misspelt device are clean errors naming what was asked, never a
/// panic; the config's `device` key is read the same way and the flag overrides it.
#[test]
fn device_flags_fail_cleanly_without_a_gpu() {
    let r = root();
    let cfg = r.join("configs/retinanet/retinanet_smt-t_fpn_mini-coco.toml");
    let cfg = cfg.to_str().unwrap();
    let bb = r.join("configs/backbones/smt-t.toml");
    let bb = bb.to_str().unwrap();
    let img = r.join("assets/mini_coco/images/000000000009.jpg");
    let img = img.to_str().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("f.safetensors");
    let runs: Vec<Vec<&str>> = vec![
        vec!["train", cfg, "--device", "cuda:4096"],
        vec![
            "test",
            cfg,
            "--checkpoint",
            "missing.safetensors",
            "--device",
            "cuda:4096",
        ],
        vec![
            "infer",
            cfg,
            "--checkpoint",
            "missing.safetensors",
            img,
            "--out-dir",
            "x",
            "--device",
            "cuda:4096",
        ],
        vec!["benchmark", "train", cfg, "--device", "cuda:4096"],
        vec!["benchmark", "infer", cfg, "--device", "cuda:4096"],
        vec!["benchmark", "backbone", bb, "--device", "cuda:4096"],
        vec![
            "features",
            "--backbone",
            bb,
            "--image",
            img,
            "--out",
            out.to_str().unwrap(),
            "--device",
            "cuda:4096",
        ],
        vec!["train", cfg, "--set", "device=\"cuda:4096\""],
    ];
    for args in runs {
        let (ok, _, err) = densepred(&args);
        assert!(!ok, "{args:?} succeeded");
        assert!(
            err.contains("CUDA device 4096 did not open"),
            "{args:?}: {err}"
        );
        assert!(!err.contains("panicked"), "{args:?}: {err}");
    }
    let (ok, _, err) = densepred(&["train", cfg, "--device", "gpu0"]);
    assert!(
        !ok && err.contains("cpu, cuda or cuda:N") && err.contains("gpu0"),
        "{err}"
    );
    // The flag wins over the config key: a CPU run reaches the next error (a missing checkpoint).
    let (ok, _, err) = densepred(&[
        "test",
        cfg,
        "--checkpoint",
        "missing.safetensors",
        "--set",
        "device=\"cuda:4096\"",
        "--device",
        "cpu",
    ]);
    assert!(!ok && err.contains("missing.safetensors"), "{err}");
}
