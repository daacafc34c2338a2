//! End-to-end training on real images: a tiny RetinaNet must fit a handful of mini_coco train
//! images (bbox AP50 ≥ 0.5 on those same images), which shows that targets, losses, gradients,
//! the optimizer and post-processing work together.

use candle_core::Device;
use densepred_engine::runner::RunConfig;
use densepred_engine::trainer::{train, TrainOptions};
use std::path::{Path, PathBuf};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Writes the annotations of `ids` (all their instances, all categories) to `out`.
fn subset(ids: &[u64], out: &Path) {
    let src = root().join("assets/mini_coco/annotations/instances_train.json");
    let mut d: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(src).unwrap()).unwrap();
    let keep = |v: &serde_json::Value, key: &str| ids.contains(&v[key].as_u64().unwrap());
    let images: Vec<_> = d["images"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|v| keep(v, "id"))
        .cloned()
        .collect();
    let anns: Vec<_> = d["annotations"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|v| keep(v, "image_id"))
        .cloned()
        .collect();
    assert_eq!(images.len(), ids.len());
    d["images"] = images.into();
    d["annotations"] = anns.into();
    std::fs::write(out, d.to_string()).unwrap();
}

#[test]
fn tiny_retinanet_overfits_four_images() {
    let tmp = tempfile::tempdir().unwrap();
    let ann = tmp.path().join("four.json");
    // Four train images with one or two large objects each (7 boxes, 6 classes).
    subset(&[263, 36, 514, 42], &ann);
    let a = ann.display().to_string();
    let r = root();
    let over = [
        format!("train_dataloader.dataset.ann_file={a}"),
        format!("val_dataloader.dataset.ann_file={a}"),
        format!("val_evaluator.ann_file={a}"),
        format!(
            "train_dataloader.dataset.data_root={}",
            r.join("assets/mini_coco").display()
        ),
        format!(
            "val_dataloader.dataset.data_root={}",
            r.join("assets/mini_coco").display()
        ),
    ];
    let (cfg, table) =
        RunConfig::load(&r.join("tests/configs/retinanet_tiny_overfit.toml"), &over).unwrap();
    let opts = TrainOptions {
        work_dir: tmp.path().join("work"),
        resume: false,
        load_from: None,
        device: Device::Cpu,
        progress: false,
        interrupt: None,
    };
    let s = train(&cfg, &table, &opts).unwrap();
    assert_eq!(s.iters, 300);
    let val = s.last_val.expect("validation ran at the end");
    let ap50 = val["coco/bbox_mAP_50"].as_f64().unwrap();
    assert!(
        ap50 >= 0.5,
        "AP50 on the training images = {ap50} (metrics: {val:?})"
    );
    // The run left its artefacts.
    for f in [
        "metrics.jsonl",
        "loss_curve.png",
        "iter_300.safetensors",
        "iter_300.json",
        "last_checkpoint",
        "config.toml",
    ] {
        assert!(opts.work_dir.join(f).exists(), "{f} missing");
    }
}
