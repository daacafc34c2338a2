//! Data-parallel training over MPI (`train --launcher mpi` under `mpirun -np 2`), built only with
//! the `mpi` feature (`bash tools/mpi/test.sh` runs it; needs Open MPI's `mpirun`).
//!
//! * Equivalence: 2 ranks × batch 1 for 5 iterations end with the weights of 1 process × batch 2.
//!   The model is the tiny RetinaNet with a BN-free backbone (MCGA: batch statistics would
//!   differ between a batch of 1 and of 2) and SGD (Adam's normalisation turns f32 noise in
//!   near-zero gradients into lr-sized steps). The two images are copies of one COCO image, so
//!   each rank's loss normaliser (its number of positive anchors, as mmdetection's per-GPU
//!   `avg_factor`) equals half the single process's. Bound: per tensor, max |Δ| ≤ 1e-5 ·
//!   max(max |w|, 1) (biases start at 0, hence the floor; the f32 summation-order difference
//!   measured 7.5e-9).
//! * Faults: a rank whose image is missing stops the whole job, with that rank's error, in well
//!   under 30 s (MPI_Abort), instead of leaving the other rank waiting in the all-reduce; so does
//!   a loss that overflows.
//! * `--resume` with the same world size continues as if uninterrupted; SyncBN over 2 ranks × 1
//!   image equals BN over one process's 2 images.
//! * Evaluation: `test` over 2 ranks (each its unpadded shard, rank 0 gathers) gives the results
//!   file, metrics and label maps of one process, for a detector and a segmentor; a segmentor's
//!   validation during a 2-rank training merges both ranks' IoU counts.
#![cfg(feature = "mpi")]

mod common;
use candle_core::Device;
use common::*;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// Two copies of mini_coco image 263 (ids 263 and 100263), all its instances; with
/// `missing_second`, the copy points at a file that does not exist.
fn twin_images(out: &Path, missing_second: bool) {
    let src = root().join("assets/mini_coco/annotations/instances_train.json");
    let mut d: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(src).unwrap()).unwrap();
    let img = d["images"]
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["id"] == 263)
        .unwrap()
        .clone();
    let anns: Vec<serde_json::Value> = d["annotations"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|a| a["image_id"] == 263)
        .cloned()
        .collect();
    let mut img2 = img.clone();
    img2["id"] = 100263.into();
    if missing_second {
        img2["file_name"] = "no_such_image.jpg".into();
    }
    let mut all = anns.clone();
    for a in &anns {
        let mut a2 = a.clone();
        a2["id"] = (a["id"].as_u64().unwrap() + 1_000_000_000).into();
        a2["image_id"] = 100263.into();
        all.push(a2);
    }
    d["images"] = vec![img, img2].into();
    d["annotations"] = all.into();
    std::fs::write(out, d.to_string()).unwrap();
}

fn train_args(ann: &Path, work: &Path, batch: usize) -> Vec<String> {
    let data_root = root().join("assets/mini_coco");
    [
        "train",
        root().join("tests/configs/retinanet_tiny_overfit.toml").to_str().unwrap(),
        "--work-dir",
        work.to_str().unwrap(),
        "--no-progress",
    ]
    .iter()
    .map(|s| s.to_string())
    .chain(
        [
            format!("train_dataloader.dataset.ann_file={}", ann.display()),
            format!("train_dataloader.dataset.data_root={}", data_root.display()),
            format!("train_dataloader.batch_size={batch}"),
            "train_dataloader.sampler.shuffle=false".into(),
            "train_cfg.max_iters=5".into(),
            "train_cfg.val_interval=0".into(),
            "default_hooks.checkpoint.interval=5".into(),
            "default_hooks.logger.interval=1".into(),
            "model.backbone={ type = \"MCGA\", embed_dims = [16, 32, 64, 128], depths = [1, 1, 1, 1], num_heads = [1, 2, 2, 4], num_groups = 4 }".into(),
            "optim_wrapper.optimizer={ type = \"SGD\", lr = 0.01, momentum = 0.9 }".into(),
        ]
        .into_iter()
        .flat_map(|s| ["--set".to_string(), s]),
    )
    .collect()
}

/// `mpirun -np 2 densepred ARGS --launcher mpi` (root allowed, as CI runs as root), from the
/// repository root.
fn mpirun(args: &[String]) -> std::process::Output {
    Command::new("mpirun")
        .current_dir(root())
        .args(["-np", "2", "--oversubscribe"])
        .arg(env!("CARGO_BIN_EXE_densepred"))
        .args(args)
        .args(["--launcher", "mpi"])
        .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
        .output()
        .expect("mpirun (Open MPI: apt-get install openmpi-bin libopenmpi-dev)")
}

#[test]
fn two_ranks_of_batch_1_equal_one_process_of_batch_2() {
    let tmp = tempfile::tempdir().unwrap();
    let ann = tmp.path().join("twin.json");
    twin_images(&ann, false);
    let out = mpirun(&train_args(&ann, &tmp.path().join("ranks"), 1));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let single = Command::new(env!("CARGO_BIN_EXE_densepred"))
        .args(train_args(&ann, &tmp.path().join("single"), 2))
        .output()
        .unwrap();
    assert!(
        single.status.success(),
        "{}",
        String::from_utf8_lossy(&single.stderr)
    );
    assert_same_weights(
        &tmp.path().join("single/iter_5.safetensors"),
        &tmp.path().join("ranks/iter_5.safetensors"),
    );
    // Only rank 0 wrote the work dir's log: one record per iteration, not two.
    let log = std::fs::read_to_string(tmp.path().join("ranks/metrics.jsonl")).unwrap();
    assert_eq!(
        log.lines().filter(|l| l.contains("\"train\"")).count(),
        5,
        "{log}"
    );
}

/// Every tensor of checkpoint `a` equals `b`'s: max |Δ| ≤ 1e-5 · max(max |w|, 1) per tensor
/// (see the module docs).
fn assert_same_weights(a: &Path, b: &Path) {
    let load = |p: &Path| candle_core::safetensors::load(p, &Device::Cpu).unwrap();
    let (a, b) = (load(a), load(b));
    assert_eq!(a.len(), b.len());
    assert!(a.len() > 100, "{} tensors", a.len());
    for (k, ta) in &a {
        let diff = densepred_testutil::max_abs(ta, &b[k]);
        let scale = densepred_testutil::max_abs_value(ta).max(1.0);
        assert!(diff <= 1e-5 * scale, "{k}: max |Δ| {diff}");
    }
}

#[test]
fn a_failing_rank_stops_the_job_with_its_error() {
    let tmp = tempfile::tempdir().unwrap();
    let ann = tmp.path().join("twin.json");
    twin_images(&ann, true);
    let t = Instant::now();
    let out = mpirun(&train_args(&ann, &tmp.path().join("ranks"), 1));
    assert_stopped(&out, t.elapsed(), "no_such_image.jpg");
}

/// The job failed within 30 s, with `needle` in its error output.
fn assert_stopped(out: &std::process::Output, took: Duration, needle: &str) {
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(needle), "{err}");
    assert!(took < Duration::from_secs(30), "stopped after {took:?}");
}

#[test]
fn a_nan_loss_stops_every_rank() {
    let tmp = tempfile::tempdir().unwrap();
    let ann = tmp.path().join("twin.json");
    twin_images(&ann, false);
    let mut args = train_args(&ann, &tmp.path().join("ranks"), 1);
    // A learning rate that blows the weights up: a loss of the third iteration overflows f32.
    args.extend([
        "--set".to_string(),
        "optim_wrapper.optimizer={ type = \"SGD\", lr = 1e38, momentum = 0.9 }".to_string(),
    ]);
    let t = Instant::now();
    let out = mpirun(&args);
    assert_stopped(&out, t.elapsed(), "(diverged)");
}

/// `densepred ARGS` in one process, from the repository root; asserts it succeeded.
fn densepred(args: &[String]) -> std::process::Output {
    let out = Command::new(env!("CARGO_BIN_EXE_densepred"))
        .current_dir(root())
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// `ARGS` followed by `--set S` for each of `sets`.
fn with_sets(args: &[&str], sets: &[String]) -> Vec<String> {
    let mut v: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    for s in sets {
        v.push("--set".into());
        v.push(s.clone());
    }
    v
}

/// A JSON file as a value.
fn json(p: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

/// A detector's `test` split over 2 ranks (16 of the 32 mini_coco validation images each;
/// rank 0 gathers) writes the same results file, record for record, and the same COCO metrics
/// as one process.
#[test]
fn a_two_rank_detection_test_equals_one_process() {
    let tmp = tempfile::tempdir().unwrap();
    let ann = tmp.path().join("twin.json");
    twin_images(&ann, false);
    densepred(&train_args(&ann, &tmp.path().join("train"), 2));
    let ck = tmp.path().join("train/iter_5.safetensors");
    let coco = root().join("assets/mini_coco");
    let val = coco.join("annotations/instances_val.json");
    let sets = [
        format!("val_dataloader.dataset.data_root={}", coco.display()),
        "val_dataloader.dataset.ann_file=annotations/instances_val.json".into(),
        format!("val_evaluator.ann_file={}", val.display()),
        "model.test_cfg.score_thr=0.0".into(),
        // One image per batch: a batch pads its images to a common size, so detections depend
        // on which images share a batch, and the ranks' batches differ from one process's.
        "val_dataloader.batch_size=1".into(),
        "model.backbone={ type = \"MCGA\", embed_dims = [16, 32, 64, 128], depths = [1, 1, 1, 1], num_heads = [1, 2, 2, 4], num_groups = 4 }".into(),
    ];
    let test = |tag: &str| {
        let dir = tmp.path().join(tag);
        with_sets(
            &[
                "test",
                "tests/configs/retinanet_tiny_overfit.toml",
                "--checkpoint",
                ck.to_str().unwrap(),
                "--no-progress",
                "--out",
                dir.join("results.bbox.json").to_str().unwrap(),
                "--json-out",
                dir.join("metrics.json").to_str().unwrap(),
            ],
            &sets,
        )
    };
    densepred(&test("single"));
    let out = mpirun(&test("ranks"));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let single = json(&tmp.path().join("single/results.bbox.json"));
    let ranks = json(&tmp.path().join("ranks/results.bbox.json"));
    let (a, b) = (single.as_array().unwrap(), ranks.as_array().unwrap());
    assert!(
        a.len() > 100,
        "only {} detections: the test compares too little",
        a.len()
    );
    assert_eq!(a.len(), b.len(), "numbers of detections differ");
    if let Some(i) = (0..a.len()).find(|&i| a[i] != b[i]) {
        panic!("results differ at record {i}: {} vs {}", a[i], b[i]);
    }
    let (ms, mr) = (
        json(&tmp.path().join("single/metrics.json")),
        json(&tmp.path().join("ranks/metrics.json")),
    );
    assert!(ms.get("AP").is_some(), "{ms}");
    assert_eq!(ms, mr);
}

/// A segmentor trained by 2 ranks validates over both (rank 0 merges the IoU counts), and its
/// `test` over 2 ranks (2 and 1 of the three ADE20K samples) prints the metrics and writes the
/// label maps of a one-process test.
#[test]
fn a_two_rank_segmentation_validation_and_test_equal_one_process() {
    let tmp = tempfile::tempdir().unwrap();
    let prefix = "{ img_path = \"images/validation\", seg_map_path = \"annotations/validation\" }";
    let mut sets: Vec<String> = Vec::new();
    for split in ["train", "val", "test"] {
        sets.push(format!(
            "{split}_dataloader.dataset.data_root=\"assets/ade20k_samples\""
        ));
        sets.push(format!("{split}_dataloader.dataset.data_prefix={prefix}"));
    }
    sets.extend([
        "model.decode_head.num_classes=150".into(),
        "model.auxiliary_head.num_classes=150".into(),
        // Two images per rank (the three padded to four): BatchNorm over the 1x1 pooled map of
        // the PPM needs two values per channel (without SyncBN).
        "train_dataloader.batch_size=2".into(),
        "train_cfg.max_iters=2".into(),
        "train_cfg.val_interval=2".into(),
        "default_hooks.checkpoint.interval=2".into(),
    ]);
    let cfg = "tests/configs/upernet_tiny_overfit.toml";
    let work = tmp.path().join("work");
    let out = mpirun(&with_sets(
        &[
            "train",
            cfg,
            "--no-progress",
            "--work-dir",
            work.to_str().unwrap(),
        ],
        &sets,
    ));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("mIoU"), "no validation table: {err}");
    let log = std::fs::read_to_string(work.join("metrics.jsonl")).unwrap();
    assert!(
        log.lines()
            .any(|l| l.contains("\"val\"") && l.contains("mIoU")),
        "{log}"
    );
    let ck = work.join("iter_2.safetensors");
    let test = |tag: &str| {
        let dir = tmp.path().join(tag);
        with_sets(
            &[
                "test",
                cfg,
                "--checkpoint",
                ck.to_str().unwrap(),
                "--no-progress",
                "--out-dir",
                dir.join("out").to_str().unwrap(),
                "--json-out",
                dir.join("metrics.json").to_str().unwrap(),
            ],
            &sets,
        )
    };
    densepred(&test("single"));
    let out = mpirun(&test("ranks"));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (ms, mr) = (
        json(&tmp.path().join("single/metrics.json")),
        json(&tmp.path().join("ranks/metrics.json")),
    );
    assert!(ms.get("mIoU").is_some(), "{ms}");
    assert_eq!(ms, mr);
    let files = |tag: &str| {
        let mut v: Vec<(String, Vec<u8>)> =
            std::fs::read_dir(tmp.path().join(tag).join("out/labels"))
                .unwrap()
                .map(|e| e.unwrap().path())
                .filter(|p| p.extension().is_some_and(|x| x == "png"))
                .map(|p| {
                    (
                        p.file_name().unwrap().to_string_lossy().into_owned(),
                        std::fs::read(&p).unwrap(),
                    )
                })
                .collect();
        v.sort();
        v
    };
    let (fs, fr) = (files("single"), files("ranks"));
    assert_eq!(
        fs.len(),
        3,
        "{:?}",
        fs.iter().map(|f| &f.0).collect::<Vec<_>>()
    );
    assert_eq!(fs, fr, "label maps differ");
}

/// SyncBN: a tiny UperNet (BN-free MCGA backbone, SyncBN in both heads) trained by 2 ranks ×
/// batch 1 ends with the weights and running statistics of 1 process × batch 2, as the batch
/// statistics are the whole batch's on every rank. The two images are an ADE20K sample and its
/// mirror image (different statistics, the same number of labelled pixels, so each rank's mean
/// loss is half the process's). With plain BN a rank would normalise its one image alone, and
/// the PPM's 1x1 pooled maps could not be normalised at all.
#[test]
fn sync_bn_over_two_ranks_equals_one_process() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    for d in ["images", "annotations"] {
        std::fs::create_dir_all(data.join(d)).unwrap();
    }
    let src = root().join("assets/ade20k_samples");
    let img = image::open(src.join("images/validation/ADE_val_00000001.jpg")).unwrap();
    let lab = image::open(src.join("annotations/validation/ADE_val_00000001.png")).unwrap();
    img.save(data.join("images/a.png")).unwrap();
    lab.save(data.join("annotations/a.png")).unwrap();
    img.fliph().save(data.join("images/b.png")).unwrap();
    lab.fliph().save(data.join("annotations/b.png")).unwrap();
    let train = |work: &str, batch: usize| {
        with_sets(
            &[
                "train",
                "tests/configs/upernet_tiny_overfit.toml",
                "--no-progress",
                "--work-dir",
                tmp.path().join(work).to_str().unwrap(),
            ],
            &[
                format!("train_dataloader.dataset.data_root=\"{}\"", data.display()),
                "train_dataloader.dataset.data_prefix={ img_path = \"images\", seg_map_path = \"annotations\" }".into(),
                format!("train_dataloader.batch_size={batch}"),
                "train_dataloader.sampler.shuffle=false".into(),
                "model.decode_head.num_classes=150".into(),
                "model.auxiliary_head.num_classes=150".into(),
                "model.backbone={ type = \"MCGA\", embed_dims = [16, 32, 64, 128], depths = [1, 1, 1, 1], num_heads = [1, 2, 2, 4], num_groups = 4 }".into(),
                "model.decode_head.norm_cfg={ type = \"SyncBN\", requires_grad = true }".into(),
                "model.auxiliary_head.norm_cfg={ type = \"SyncBN\", requires_grad = true }".into(),
                "optim_wrapper.optimizer={ type = \"SGD\", lr = 0.01, momentum = 0.9 }".into(),
                "train_cfg.max_iters=3".into(),
                "train_cfg.val_interval=0".into(),
                "default_hooks.checkpoint.interval=3".into(),
            ],
        )
    };
    let out = mpirun(&train("ranks", 1));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    densepred(&train("single", 2));
    assert_same_weights(
        &tmp.path().join("single/iter_3.safetensors"),
        &tmp.path().join("ranks/iter_3.safetensors"),
    );
}

/// `--resume` under MPI with the same world size: 2 ranks stopped after 3 iterations and resumed
/// to 5 end with the weights of 2 ranks that ran 5 iterations at once (every rank reads the
/// checkpoint rank 0 wrote: weights, optimizer state, iteration).
#[test]
fn resuming_two_ranks_equals_an_uninterrupted_run() {
    let tmp = tempfile::tempdir().unwrap();
    let ann = tmp.path().join("twin.json");
    twin_images(&ann, false);
    let run = |work: &str, iters: usize, resume: bool| {
        let mut args = train_args(&ann, &tmp.path().join(work), 1);
        args.extend(with_sets(
            &[],
            &[
                format!("train_cfg.max_iters={iters}"),
                "default_hooks.checkpoint.interval=1".into(),
            ],
        ));
        if resume {
            args.push("--resume".into());
        }
        let out = mpirun(&args);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    run("straight", 5, false);
    run("resumed", 3, false);
    assert!(!tmp.path().join("resumed/iter_5.safetensors").exists());
    run("resumed", 5, true);
    assert_same_weights(
        &tmp.path().join("straight/iter_5.safetensors"),
        &tmp.path().join("resumed/iter_5.safetensors"),
    );
}
