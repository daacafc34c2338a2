//! The segmentation commands of the `densepred` binary, end to end on the three official ADE20K
//! validation images in `assets/ade20k_samples` (150 classes): train a tiny UperNet for two
//! iterations, `test` it (IoU table, label PNGs and overlays, aug test), read the PNGs back with
//! `eval seg` (same numbers), `infer` on a folder, and `analyze params` on the paper configs.

mod common;
use common::*;

fn pngs(dir: &std::path::Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".png"))
        .collect();
    v.sort();
    v
}

#[test]
fn segmentor_train_test_eval_infer_on_ade20k_samples() {
    let tmp = tempfile::tempdir().unwrap();
    let work = tmp.path().join("work");
    let cfg = "tests/configs/upernet_tiny_overfit.toml";
    let prefix = "{ img_path = \"images/validation\", seg_map_path = \"annotations/validation\" }";
    let sets: Vec<String> = vec![
        "train_dataloader.dataset.data_root=\"assets/ade20k_samples\"".into(),
        format!("train_dataloader.dataset.data_prefix={prefix}"),
        "val_dataloader.dataset.data_root=\"assets/ade20k_samples\"".into(),
        format!("val_dataloader.dataset.data_prefix={prefix}"),
        "test_dataloader.dataset.data_root=\"assets/ade20k_samples\"".into(),
        format!("test_dataloader.dataset.data_prefix={prefix}"),
        "model.decode_head.num_classes=150".into(),
        "model.auxiliary_head.num_classes=150".into(),
        "train_cfg.max_iters=2".into(),
        "train_cfg.val_interval=2".into(),
        "default_hooks.checkpoint.interval=2".into(),
    ];
    let with_sets = |args: &[&str]| -> Vec<String> {
        let mut v: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        for s in &sets {
            v.push("--set".into());
            v.push(s.clone());
        }
        v
    };
    let run = |args: Vec<String>| {
        let a: Vec<&str> = args.iter().map(String::as_str).collect();
        densepred(&a)
    };
    let (ok, _, err) = run(with_sets(&[
        "train",
        cfg,
        "--no-progress",
        "--work-dir",
        work.to_str().unwrap(),
    ]));
    assert!(ok, "{err}");
    // Validation printed the 150-class table.
    assert!(err.contains("mIoU") && err.contains("wall"), "{err}");
    let ck = work.join("iter_2.safetensors");
    assert!(ck.exists());

    let out_dir = tmp.path().join("out");
    let json = tmp.path().join("metrics.json");
    let (ok, out, err) = run(with_sets(&[
        "test",
        cfg,
        "--no-progress",
        "--checkpoint",
        ck.to_str().unwrap(),
        "--out-dir",
        out_dir.to_str().unwrap(),
        "--json-out",
        json.to_str().unwrap(),
    ]));
    assert!(ok, "{err}");
    for needle in ["Class", "IoU", "Acc", "wall", "mIoU", "mAcc", "aAcc"] {
        assert!(out.contains(needle), "{needle} missing from\n{out}");
    }
    let class_rows = out
        .lines()
        .filter(|l| l.ends_with("nan") || l.contains('.'))
        .count();
    assert!(class_rows >= 150, "expected a row per class:\n{out}");
    let names = vec![
        "ADE_val_00000001.png".to_string(),
        "ADE_val_00000002.png".into(),
        "ADE_val_00000003.png".into(),
    ];
    assert_eq!(pngs(&out_dir.join("labels")), names);
    assert_eq!(pngs(&out_dir.join("overlays")), names);
    // Label PNGs have the image's size and the ADE20K value convention (class + 1).
    let lab = image::open(out_dir.join("labels/ADE_val_00000001.png"))
        .unwrap()
        .to_luma8();
    let img =
        image::open(root().join("assets/ade20k_samples/images/validation/ADE_val_00000001.jpg"))
            .unwrap();
    assert_eq!((lab.width(), lab.height()), (img.width(), img.height()));
    assert!(lab.pixels().all(|p| (1..=150).contains(&p.0[0])));

    // `eval seg` on the written PNGs reproduces the test's metrics.
    let json2 = tmp.path().join("metrics2.json");
    let (ok, _, err) = densepred(&[
        "eval",
        "seg",
        "--gt-dir",
        "assets/ade20k_samples/annotations/validation",
        "--pred-dir",
        out_dir.join("labels").to_str().unwrap(),
        "--num-classes",
        "150",
        "--reduce-zero-label",
        "--json-out",
        json2.to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    let a: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let b: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json2).unwrap()).unwrap();
    assert_eq!(a, b);

    // Multi-scale + flip test runs and reports the same table layout.
    let (ok, out, err) = run(with_sets(&[
        "test",
        cfg,
        "--no-progress",
        "--aug-test",
        "--checkpoint",
        ck.to_str().unwrap(),
    ]));
    assert!(ok, "{err}");
    assert!(out.contains("mIoU"), "{out}");

    // Detector-only flags are refused with a clear message.
    let (ok, _, err) = run(with_sets(&[
        "test",
        cfg,
        "--checkpoint",
        ck.to_str().unwrap(),
        "--show-dir",
        "x",
    ]));
    assert!(!ok && err.contains("--out-dir"), "{err}");

    // `infer` on a folder writes a label map and an overlay per image.
    let inf = tmp.path().join("infer");
    let (ok, out, err) = run(with_sets(&[
        "infer",
        cfg,
        "--checkpoint",
        ck.to_str().unwrap(),
        "assets/ade20k_samples/images/validation",
        "--out-dir",
        inf.to_str().unwrap(),
    ]));
    assert!(ok, "{err}");
    assert!(out.contains("ADE_val_00000002.jpg"), "{out}");
    assert_eq!(pngs(&inf.join("labels")), names);
    assert_eq!(pngs(&inf.join("overlays")), names);
}

/// `analyze params` on the UperNet configs equals mmsegmentation's count of the official configs
/// (`../shared/fixtures/models/head_param_counts.json`, auxiliary head included).
#[test]
fn analyze_params_matches_mmseg_for_upernet() {
    let fx: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(root().join("../shared/fixtures/models/head_param_counts.json"))
            .unwrap(),
    )
    .unwrap();
    for (cfg, key, paper) in [
        (
            "configs/upernet/upernet_smt-s_512x512_160k_ade20k.toml",
            "upernet_smt_s",
            52_345_580u64,
        ),
        (
            "configs/upernet/upernet_smt-b_512x512_160k_ade20k.toml",
            "upernet_smt_b",
            61_831_980,
        ),
    ] {
        let (ok, text, err) = densepred(&["analyze", "params", cfg]);
        assert!(ok, "{err}");
        let total = params_total(&text);
        assert_eq!(
            total,
            fx["models"][key]["full_params"].as_u64().unwrap(),
            "{cfg}\n{text}"
        );
        assert_eq!(total, paper);
        assert!(
            text.contains("auxiliary_head") && text.contains("decode_head"),
            "{text}"
        );
    }
}
