//! Nothing a user writes is dropped without a word: config errors name their key path,
//! unsupported compatibility keys are refused, checkpoints load strictly by default, and a test
//! pass that lost images fails (or, with `skip_invalid`, says how many).

mod common;
use candle_core::{Device, Tensor};
use common::root;
use densepred_engine::inference::Inferencer;
use densepred_engine::runner::{build_model, RunConfig};
use densepred_engine::tester::{test_checkpoint, TestRun, TestRunOptions};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

fn shipped_run_configs() -> Vec<PathBuf> {
    let mut out = Vec::new();
    for dir in ["atss", "retinanet", "sem_fpn", "upernet"] {
        for e in std::fs::read_dir(root().join("configs").join(dir)).unwrap() {
            let p = e.unwrap().path();
            if p.extension().is_some_and(|x| x == "toml") {
                out.push(p);
            }
        }
    }
    out.sort();
    out
}

fn load_err(cfg: &Path, sets: &[&str]) -> String {
    let sets: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
    match RunConfig::load(cfg, &sets) {
        Ok(_) => panic!("{} with {sets:?} loaded", cfg.display()),
        Err(e) => e.to_string(),
    }
}

#[test]
fn every_shipped_config_has_a_test_split_that_set_can_change() {
    let configs = shipped_run_configs();
    assert!(configs.len() >= 10, "{configs:?}");
    for c in &configs {
        let (cfg, _) = RunConfig::load(c, &[]).unwrap_or_else(|e| panic!("{}: {e}", c.display()));
        assert!(
            cfg.test_dataloader.is_some() && cfg.test_evaluator.is_some(),
            "{}",
            c.display()
        );
        assert_eq!(cfg.test_dataloader, cfg.val_dataloader, "{}", c.display());
        let (cfg, _) = RunConfig::load(c, &["test_dataloader.dataset.data_root=D/".into()])
            .unwrap_or_else(|e| panic!("{}: {e}", c.display()));
        let text = format!("{:?}", cfg.test_dataloader.unwrap().dataset);
        assert!(
            text.contains("data_root: \"D/\""),
            "{}: {text}",
            c.display()
        );
    }
}

#[test]
fn config_errors_name_the_key_path() {
    let dir = tempfile::tempdir().unwrap();
    // A config without test_dataloader: `--set` builds a half table.
    let bare = dir.path().join("bare.toml");
    std::fs::write(
        &bare,
        format!(
            "_base_ = [\"{}\"]\n",
            root()
                .join("configs/_base_/models/retinanet_smt-t_fpn.toml")
                .display()
        ),
    )
    .unwrap();
    let e = load_err(&bare, &["test_dataloader.dataset.data_root=D"]);
    assert!(
        e.contains("test_dataloader.dataset: missing field `type`"),
        "{e}"
    );
    let retina = root().join("configs/retinanet/retinanet_smt-t_fpn_mini-coco.toml");
    let cases: &[(&str, &str)] = &[
        (
            "train_dataloader.batch_size=\"two\"",
            "train_dataloader.batch_size: invalid type",
        ),
        ("optim_wrapper.optimizer.lrr=1", "optim_wrapper.optimizer"),
        (
            "default_hooks.logger.intervall=5",
            "unknown field `intervall`",
        ),
        (
            "model.bbox_head.stacked_convs=\"four\"",
            "model.bbox_head.stacked_convs: invalid type",
        ),
        (
            "model.backbone.embed_dims=3",
            "model.backbone.embed_dims: invalid type",
        ),
        (
            "model.train_cfg.assigner.pos_iou_thr=\"x\"",
            "model.train_cfg.assigner.pos_iou_thr",
        ),
        (
            "model.neck.type=\"PAFPN\"",
            "model.neck.type: unknown variant `PAFPN`",
        ),
        (
            "train_dataloader.dataset.pipeline.2.ratio_range=[2.0, 0.5]",
            "train_dataloader.dataset.pipeline.2: unknown field `ratio_range`",
        ),
        (
            "test_dataloader.dataset.ann_fil=x.json",
            "test_dataloader.dataset.ann_fil: unknown field `ann_fil`",
        ),
    ];
    for (set, want) in cases {
        let e = load_err(&retina, &[set]);
        assert!(e.contains(want), "{set}: {e}");
    }
    // A value check after parsing: RandomResize with a reversed range.
    let e = load_err(
        &retina,
        &["train_dataloader.dataset.pipeline.2={ type = \"RandomResize\", scale = [320, 320], ratio_range = [2.0, 0.5] }"],
    );
    assert!(
        e.contains("train_dataloader.dataset.pipeline.2.ratio_range: must be [low, high]"),
        "{e}"
    );
    let e = load_err(
        &retina,
        &["train_dataloader.dataset.pipeline.3={ type = \"PhotoMetricDistortion\", hue_delta = -18 }"],
    );
    assert!(
        e.contains("train_dataloader.dataset.pipeline.3.hue_delta"),
        "{e}"
    );
}

#[test]
fn compatibility_keys_work_or_are_refused_by_name() {
    let retina = root().join("configs/retinanet/retinanet_smt-t_fpn_mini-coco.toml");
    let upernet = root().join("configs/upernet/upernet_smt-t_mini-ade.toml");
    let refused: &[(&Path, &str, &str)] = &[
        (
            &retina,
            "default_hooks.checkpoint.save_best=\"auto\"",
            "default_hooks.checkpoint.save_best",
        ),
        (&retina, "env_cfg={ cudnn_benchmark = false }", "env_cfg"),
        (
            &retina,
            "log_processor={ type = \"LogProcessor\", window_size = 50 }",
            "log_processor",
        ),
        (
            &retina,
            "vis_backends=[{ type = \"LocalVisBackend\" }]",
            "vis_backends",
        ),
        (
            &retina,
            "visualizer={ type = \"DetLocalVisualizer\" }",
            "visualizer",
        ),
        (
            &retina,
            "randomness.diff_rank_seed=true",
            "randomness.diff_rank_seed",
        ),
        (
            &upernet,
            "val_evaluator.nan_to_num=0",
            "val_evaluator.nan_to_num",
        ),
        (
            &retina,
            "model.bbox_head.init_cfg={ type = \"Normal\", std = 0.01 }",
            "model.bbox_head.init_cfg",
        ),
        (
            &retina,
            "train_dataloader.sampler.type=\"RepeatFactorSampler\"",
            "train_dataloader.sampler.type",
        ),
        (
            &retina,
            "train_dataloader.batch_sampler.type=\"GroupSampler\"",
            "train_dataloader.batch_sampler.type",
        ),
        (
            &retina,
            "default_hooks.timer.type=\"SomeTimer\"",
            "default_hooks.timer",
        ),
        (
            &retina,
            "default_hooks.timer.interval=3",
            "default_hooks.timer",
        ),
        (&retina, "val_cfg.type=\"MyLoop\"", "val_cfg"),
        (&retina, "log_level=\"DEBUG\"", "log_level"),
        (&retina, "default_scope=\"mmpose\"", "default_scope"),
        (
            &retina,
            "train_dataloader.dataset.backend_args={ backend = \"petrel\" }",
            "train_dataloader.dataset",
        ),
        (
            &retina,
            "model.train_cfg.sampler.type=\"RandomSampler\"",
            "model.train_cfg",
        ),
        (
            &upernet,
            "model.decode_head.norm_cfg.requires_grad=false",
            "model.decode_head: norm_cfg.requires_grad = false is not supported",
        ),
        (
            &upernet,
            "model.decode_head.pool_scale=[1, 2]",
            "model.decode_head",
        ),
    ];
    for (cfg, set, at) in refused {
        let e = load_err(cfg, &[set]);
        assert!(e.contains(at), "{set}: {e}");
        assert!(
            e.contains("not supported")
                || e.contains("unknown field")
                || e.contains("unknown variant")
                || e.contains("only `true`"),
            "{set}: {e}"
        );
    }
    // mmdet's train_dataloader.batch_sampler now groups by orientation.
    let (cfg, _) = RunConfig::load(
        &retina,
        &[
            "train_dataloader.batch_sampler={ type = \"AspectRatioBatchSampler\" }".into(),
            format!(
                "train_dataloader.dataset.data_root={}",
                root().join("assets/mini_coco").display()
            ),
        ],
    )
    .unwrap();
    let l = densepred_engine::runner::build_loader(cfg.train_dataloader.as_ref().unwrap(), 0, true)
        .unwrap();
    let groups = l
        .loader
        .aspect_groups
        .clone()
        .expect("batch_sampler builds the groups");
    assert_eq!(groups.len(), l.dataset.len());
    for b in l.loader.batches(0).iter().filter(|b| b.len() == 2).take(20) {
        assert_eq!(groups[b[0]], groups[b[1]]);
    }
}

fn tiny_retinanet() -> (RunConfig, PathBuf) {
    let c = root().join("tests/configs/retinanet_tiny_overfit.toml");
    let (cfg, _) = RunConfig::load(&c, &[]).unwrap();
    (cfg, c)
}

#[test]
fn checkpoints_load_strictly_unless_asked_not_to() {
    let dir = tempfile::tempdir().unwrap();
    let (cfg, _) = tiny_retinanet();
    let model = build_model(&cfg.model, 0, &Device::Cpu).unwrap();
    let mut w: BTreeMap<String, Tensor> = model
        .vars
        .named_vars()
        .into_iter()
        .map(|(k, v)| (k, v.as_tensor().clone()))
        .collect();
    let exact = dir.path().join("exact.safetensors");
    densepred_core::weights::save_safetensors_atomic(&w, &exact).unwrap();
    let gone = "bbox_head.retina_cls.bias".to_string();
    assert!(w.remove(&gone).is_some());
    w.insert(
        "bbox_head.extra.weight".into(),
        Tensor::zeros(3, candle_core::DType::F32, &Device::Cpu).unwrap(),
    );
    let bad = dir.path().join("bad.safetensors");
    densepred_core::weights::save_safetensors_atomic(&w, &bad).unwrap();

    assert!(Inferencer::new(&cfg, Some(&exact), true, &Device::Cpu).is_ok());
    let e = Inferencer::new(&cfg, Some(&bad), true, &Device::Cpu)
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("bad.safetensors") && e.contains(&gone) && e.contains("bbox_head.extra.weight"),
        "{e}"
    );
    let opts = TestRunOptions::default();
    let e = match test_checkpoint(&cfg, &bad, &opts, &Device::Cpu) {
        Err(e) => e.to_string(),
        Ok(_) => panic!("a mismatched checkpoint tested strictly"),
    };
    assert!(
        e.contains("missing keys (1)") && e.contains("unexpected keys (1)"),
        "{e}"
    );
    // Opting out loads what matches.
    assert!(Inferencer::new(&cfg, Some(&bad), false, &Device::Cpu).is_ok());
}

/// Three mini_coco val images; the second one's file is missing.
fn split_with_a_missing_image(dir: &Path) -> PathBuf {
    let src = root().join("assets/mini_coco/annotations/instances_val.json");
    let mut d: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(src).unwrap()).unwrap();
    let mut images: Vec<serde_json::Value> = d["images"]
        .as_array()
        .unwrap()
        .iter()
        .take(3)
        .cloned()
        .collect();
    assert_eq!(images.len(), 3);
    images[1]["file_name"] = "not_there.jpg".into();
    let ids: Vec<u64> = images.iter().map(|v| v["id"].as_u64().unwrap()).collect();
    let anns: Vec<serde_json::Value> = d["annotations"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|a| ids.contains(&a["image_id"].as_u64().unwrap()))
        .cloned()
        .collect();
    d["images"] = images.into();
    d["annotations"] = anns.into();
    let out = dir.join("val3.json");
    std::fs::write(&out, d.to_string()).unwrap();
    out
}

#[test]
fn a_test_pass_that_loses_images_fails_or_counts_them() {
    let dir = tempfile::tempdir().unwrap();
    let ann = split_with_a_missing_image(dir.path());
    let (_, c) = tiny_retinanet();
    let sets = |skip: bool| -> Vec<String> {
        vec![
            // The tiny config has no test split: `test` falls back to the validation one.
            format!("val_dataloader.dataset.ann_file={}", ann.display()),
            format!(
                "val_dataloader.dataset.data_root={}",
                root().join("assets/mini_coco").display()
            ),
            format!("val_evaluator.ann_file={}", ann.display()),
            format!("val_dataloader.dataset.skip_invalid={skip}"),
        ]
    };
    let model = build_model(&tiny_retinanet().0.model, 0, &Device::Cpu).unwrap();
    let ck = dir.path().join("w.safetensors");
    let w: BTreeMap<String, Tensor> = model
        .vars
        .named_vars()
        .into_iter()
        .map(|(k, v)| (k, v.as_tensor().clone()))
        .collect();
    densepred_core::weights::save_safetensors_atomic(&w, &ck).unwrap();
    let opts = TestRunOptions::default();

    let (cfg, _) = RunConfig::load(&c, &sets(false)).unwrap();
    let e = match test_checkpoint(&cfg, &ck, &opts, &Device::Cpu) {
        Err(e) => e.to_string(),
        Ok(_) => panic!("a missing image went unnoticed"),
    };
    assert!(e.contains("not_there.jpg"), "{e}");

    let (cfg, _) = RunConfig::load(&c, &sets(true)).unwrap();
    match test_checkpoint(&cfg, &ck, &opts, &Device::Cpu).unwrap() {
        TestRun::Detection(out) => {
            assert_eq!(out.skipped, 1);
            assert_eq!(out.images.len(), 2);
        }
        TestRun::Segmentation(_) => panic!("a detector config"),
    }
}

#[test]
fn fewer_images_than_the_split_is_an_error_without_skip_invalid() {
    use densepred_engine::tester::check_all_evaluated;
    let c = root().join("configs/retinanet/retinanet_smt-t_fpn_mini-coco.toml");
    let (cfg, _) = RunConfig::load(
        &c,
        &[format!(
            "val_dataloader.dataset.data_root={}",
            root().join("assets/mini_coco").display()
        )],
    )
    .unwrap();
    let mut l =
        densepred_engine::runner::build_loader(cfg.val_dataloader.as_ref().unwrap(), 0, false)
            .unwrap()
            .loader;
    assert_eq!(check_all_evaluated(&l, 4, 4).unwrap(), 0);
    let e = check_all_evaluated(&l, 3, 4).unwrap_err().to_string();
    assert!(e.contains("evaluated 3 of the 4 images"), "{e}");
    l.skip_invalid = true;
    assert_eq!(check_all_evaluated(&l, 3, 4).unwrap(), 1);
}
