//! End-to-end training on real images: a tiny RetinaNet must fit a handful of mini_coco train
//! images (bbox AP50 ≥ 0.5 on those same images), and a tiny Mask R-CNN as well (bbox AP50 ≥ 0.5
//! and segm AP50 ≥ 0.4), which shows that targets, losses, gradients, the optimizer and
//! post-processing work together.

use common::root;
use densepred_engine::runner::RunConfig;
use densepred_engine::trainer::{train, TrainOptions};
use std::path::Path;

mod common;

/// The overrides that point a tiny overfit config at the images `ids` of mini_coco's train split
/// (annotations written under `tmp`).
fn four_image_overrides(tmp: &Path, ids: &[u64]) -> Vec<String> {
    let ann = tmp.join("four.json");
    common::coco_subset(ids, &ann);
    let a = ann.display().to_string();
    let data_root = root().join("assets/mini_coco").display().to_string();
    vec![
        format!("train_dataloader.dataset.ann_file={a}"),
        format!("val_dataloader.dataset.ann_file={a}"),
        format!("val_evaluator.ann_file={a}"),
        format!("train_dataloader.dataset.data_root={data_root}"),
        format!("val_dataloader.dataset.data_root={data_root}"),
    ]
}

fn train_options(tmp: &Path) -> TrainOptions {
    TrainOptions::new(tmp.join("work"))
}

#[test]
fn tiny_retinanet_overfits_four_images() {
    let tmp = tempfile::tempdir().unwrap();
    // Four train images with one or two large objects each (7 boxes, 6 classes).
    let over = four_image_overrides(tmp.path(), &[263, 36, 514, 42]);
    let r = root();
    let (cfg, table) =
        RunConfig::load(&r.join("tests/configs/retinanet_tiny_overfit.toml"), &over).unwrap();
    let opts = train_options(tmp.path());
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

#[test]
fn tiny_mask_rcnn_overfits_four_images() {
    let tmp = tempfile::tempdir().unwrap();
    // The same four images, with their polygon masks.
    let over = four_image_overrides(tmp.path(), &[263, 36, 514, 42]);
    let (cfg, table) = RunConfig::load(
        &root().join("tests/configs/mask_rcnn_tiny_overfit.toml"),
        &over,
    )
    .unwrap();
    let opts = train_options(tmp.path());
    let s = train(&cfg, &table, &opts).unwrap();
    assert_eq!(s.iters, 300);
    let val = s.last_val.expect("validation ran at the end");
    let bbox = val["coco/bbox_mAP_50"].as_f64().unwrap();
    let segm = val["coco/segm_mAP_50"].as_f64().unwrap();
    assert!(
        bbox >= 0.5,
        "bbox AP50 on the training images = {bbox} ({val:?})"
    );
    assert!(
        segm >= 0.4,
        "segm AP50 on the training images = {segm} ({val:?})"
    );
}
