//! Conv2Former and MCGA in every detector and segmentor that configs build: each mini config
//! (`*_conv2former-n_*mini-*.toml`, `*_mcga-tiny_*mini-*.toml`) trains a few iterations on two
//! real images with its loss falling, and `test` on the checkpoint gives the COCO summary (and
//! the segm summary for Mask R-CNN) / the mIoU table.

use candle_core::Device;
use common::root;
use densepred_engine::runner::RunConfig;
use densepred_engine::tester::{test_checkpoint, TestRun, TestRunOptions};
use densepred_engine::trainer::{train, TrainOptions};
use std::path::{Path, PathBuf};

mod common;

const ITERS: u64 = 12;

/// Trains `config` with `sets` for [`ITERS`] iterations (no validation, one checkpoint at the
/// end); returns the per-iteration total losses and the checkpoint.
fn train_briefly(config: &str, sets: Vec<String>, work: &Path) -> (RunConfig, Vec<f64>, PathBuf) {
    let mut sets = sets;
    sets.extend([
        "train_cfg={ type = \"IterBasedTrainLoop\", max_iters = 12, val_interval = 0 }".into(),
        "default_hooks.logger.interval=1".into(),
        "default_hooks.checkpoint={ type = \"CheckpointHook\", by_epoch = false, interval = 12 }"
            .into(),
    ]);
    let (cfg, table) = RunConfig::load(&root().join(config), &sets).unwrap();
    let opts = TrainOptions::new(work.to_path_buf());
    let s = train(&cfg, &table, &opts).unwrap_or_else(|e| panic!("{config}: {e}"));
    assert_eq!(s.iters, ITERS, "{config}");
    let text = std::fs::read_to_string(work.join("metrics.jsonl")).unwrap();
    let losses: Vec<f64> = text
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|v| v["mode"] == "train")
        .map(|v| v["loss"].as_f64().unwrap())
        .collect();
    assert_eq!(
        losses.len() as u64,
        ITERS,
        "{config}: one record per iteration"
    );
    (
        cfg,
        losses,
        s.last_checkpoint.expect("a checkpoint at the end"),
    )
}

/// The mean of the last three losses is below that of the first three.
fn assert_falls(config: &str, losses: &[f64]) {
    let n = losses.len();
    assert!(n >= 6);
    let first = losses[..3].iter().sum::<f64>() / 3.0;
    let last = losses[n - 3..].iter().sum::<f64>() / 3.0;
    assert!(last < first, "{config}: loss did not fall: {losses:?}");
}

#[test]
fn detectors_train_and_test() {
    let tmp = tempfile::tempdir().unwrap();
    let ann = tmp.path().join("two.json");
    common::coco_subset(&[263, 514], &ann);
    let a = ann.display();
    let data_root = root().join("assets/mini_coco");
    let r = data_root.display();
    for config in [
        "configs/retinanet/retinanet_conv2former-n_fpn_mini-coco.toml",
        "configs/atss/atss_conv2former-n_fpn_mini-coco.toml",
        "configs/mask_rcnn/mask_rcnn_conv2former-n_fpn_mini-coco.toml",
        "configs/retinanet/retinanet_mcga-tiny_fpn_mini-coco.toml",
        "configs/mask_rcnn/mask_rcnn_mcga-tiny_fpn_mini-coco.toml",
    ] {
        let mut sets = Vec::new();
        for split in ["train", "val", "test"] {
            sets.push(format!("{split}_dataloader.dataset.data_root={r}"));
            sets.push(format!("{split}_dataloader.dataset.ann_file={a}"));
        }
        sets.push(format!("test_evaluator.ann_file={a}"));
        // No flip: the same two images every iteration.
        sets.push("train_dataloader.dataset.pipeline.3.prob=0.0".into());
        let work = tmp.path().join(config.replace('/', "_"));
        let (cfg, losses, ck) = train_briefly(config, sets, &work);
        assert_falls(config, &losses);
        match test_checkpoint(&cfg, &ck, &TestRunOptions::default(), &Device::Cpu).unwrap() {
            TestRun::Detection(out) => {
                let s = out.summary.expect("a COCO summary");
                assert_eq!(s.summary_lines.len(), 12, "{config}");
                assert_eq!(out.images.len(), 2);
                if config.contains("mask_rcnn") {
                    let m = out.segm_summary.expect("a segm summary for Mask R-CNN");
                    assert_eq!(m.summary_lines.len(), 12, "{config}");
                }
            }
            TestRun::Segmentation(_) => panic!("{config} is a detector"),
        }
    }
}

#[test]
fn segmentors_train_and_test() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let src = root().join("assets/mini_ade");
    for d in ["images/training", "annotations/training"] {
        std::fs::create_dir_all(data.join(d)).unwrap();
    }
    for stem in ["000000003501", "000000007888"] {
        for (d, ext) in [("images/training", "jpg"), ("annotations/training", "png")] {
            let f = format!("{d}/{stem}.{ext}");
            std::fs::copy(src.join(&f), data.join(&f)).unwrap();
        }
    }
    std::fs::copy(src.join("classes.json"), data.join("classes.json")).unwrap();
    let d = data.display();
    for config in [
        "configs/upernet/upernet_conv2former-n_mini-ade.toml",
        "configs/sem_fpn/fpn_conv2former-n_mini-ade.toml",
        "configs/sem_fpn/fpn_mcga-tiny_mini-ade.toml",
    ] {
        let prefix = "{ img_path = \"images/training\", seg_map_path = \"annotations/training\" }";
        let mut sets = Vec::new();
        for split in ["train", "val", "test"] {
            sets.push(format!("{split}_dataloader.dataset.data_root={d}"));
            sets.push(format!("{split}_dataloader.dataset.data_prefix={prefix}"));
        }
        let work = tmp.path().join(config.replace('/', "_"));
        let (cfg, losses, ck) = train_briefly(config, sets, &work);
        assert_falls(config, &losses);
        match test_checkpoint(&cfg, &ck, &TestRunOptions::default(), &Device::Cpu).unwrap() {
            TestRun::Segmentation(out) => {
                let m = out.metrics.expect("mIoU over the label maps");
                assert!(m.to_json()["mIoU"].as_f64().is_some(), "{config}");
            }
            TestRun::Detection(_) => panic!("{config} is a segmentor"),
        }
    }
}
