//! End-to-end segmentation training on real images: a tiny UperNet must fit four mini_ade
//! training images (mIoU ≥ 50% over the classes present, on those same images), which shows that
//! label loading, padding, the losses, gradients, the optimizer and inference work together. Then
//! the tester writes label maps at each image's original size.

mod common;
use candle_core::Device;
use common::root;
use densepred_engine::runner::{build_loader, build_model, load_weights, RunConfig};
use densepred_engine::tester::{evaluate_seg_loader, SegTestOptions};
use densepred_engine::trainer::{train, TrainOptions};

#[test]
fn tiny_upernet_overfits_four_images() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let src = root().join("assets/mini_ade");
    // Four training images whose classes each cover at least 2% of the image (10 classes).
    for d in ["images/training", "annotations/training"] {
        std::fs::create_dir_all(data.join(d)).unwrap();
    }
    for stem in [
        "000000003501",
        "000000007888",
        "000000009448",
        "000000001675",
    ] {
        for (d, ext) in [("images/training", "jpg"), ("annotations/training", "png")] {
            let f = format!("{d}/{stem}.{ext}");
            std::fs::copy(src.join(&f), data.join(&f)).unwrap();
        }
    }
    std::fs::copy(src.join("classes.json"), data.join("classes.json")).unwrap();
    let d = data.display().to_string();
    let over = [
        format!("train_dataloader.dataset.data_root={d}"),
        format!("val_dataloader.dataset.data_root={d}"),
    ];
    let path = root().join("tests/configs/upernet_tiny_overfit.toml");
    let (cfg, table) = RunConfig::load(&path, &over).unwrap();
    let opts = TrainOptions::new(tmp.path().join("work"));
    let s = train(&cfg, &table, &opts).unwrap();
    assert_eq!(s.iters, 150);
    let val = s.last_val.expect("validation ran at the end");
    let miou = val["mIoU"].as_f64().unwrap();
    assert!(
        miou >= 50.0,
        "mIoU on the training images = {miou}% ({val:?})"
    );
    for f in [
        "metrics.jsonl",
        "loss_curve.png",
        "iter_150.safetensors",
        "last_checkpoint",
    ] {
        assert!(opts.work_dir.join(f).exists(), "{f} missing");
    }

    // The checkpoint reloads into a fresh model and gives the same metrics; predictions have each
    // image's original size.
    let model = build_model(&cfg.model, 1, &Device::Cpu).unwrap();
    load_weights(&model, &opts.work_dir.join("iter_150.safetensors"), true).unwrap();
    let l = build_loader(cfg.val_dataloader.as_ref().unwrap(), 0, false).unwrap();
    let out = evaluate_seg_loader(
        &model,
        &l.loader,
        l.dataset.as_ref(),
        cfg.val_evaluator.as_ref().unwrap(),
        &Device::Cpu,
        &SegTestOptions {
            keep_predictions: true,
            ..Default::default()
        },
        &densepred_engine::dist::Dist::single(),
    )
    .unwrap();
    let m = out.metrics.unwrap();
    assert!(
        (m.m_iou * 100.0 - miou).abs() < 0.01,
        "reloaded mIoU {} vs {miou}",
        m.m_iou * 100.0
    );
    assert_eq!(out.images.len(), 4);
    for r in &out.images {
        let (w, h) = image::image_dimensions(&r.img_path).unwrap();
        assert_eq!(
            r.pred.dim(),
            (h as usize, w as usize),
            "{}",
            r.img_path.display()
        );
    }
}
