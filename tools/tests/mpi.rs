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
//!   under 30 s (MPI_Abort), instead of leaving the other rank waiting in the all-reduce.
#![cfg(feature = "mpi")]

use candle_core::Device;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

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

/// `mpirun -np 2 densepred ARGS --launcher mpi` (root allowed, as CI runs as root).
fn mpirun(args: &[String]) -> std::process::Output {
    Command::new("mpirun")
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
    let load = |d: &str| {
        candle_core::safetensors::load(tmp.path().join(d).join("iter_5.safetensors"), &Device::Cpu)
            .unwrap()
    };
    let (a, b) = (load("single"), load("ranks"));
    assert_eq!(a.len(), b.len());
    assert!(a.len() > 100, "{} tensors", a.len());
    for (k, ta) in &a {
        let tb = &b[k];
        let fa = ta.to_dtype(candle_core::DType::F64).unwrap();
        let fb = tb.to_dtype(candle_core::DType::F64).unwrap();
        let diff = (&fa - &fb)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f64>()
            .unwrap();
        let scale = fa
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f64>()
            .unwrap()
            .max(1.0);
        assert!(diff <= 1e-5 * scale, "{k}: max |Δ| {diff}");
    }
    // Only rank 0 wrote the work dir's log: one record per iteration, not two.
    let log = std::fs::read_to_string(tmp.path().join("ranks/metrics.jsonl")).unwrap();
    assert_eq!(
        log.lines().filter(|l| l.contains("\"train\"")).count(),
        5,
        "{log}"
    );
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
    // A learning rate that makes the first step blow the weights up: the next loss is not finite.
    args.extend([
        "--set".to_string(),
        "optim_wrapper.optimizer={ type = \"SGD\", lr = 1e30, momentum = 0.9 }".to_string(),
    ]);
    let t = Instant::now();
    let out = mpirun(&args);
    assert_stopped(&out, t.elapsed(), "(diverged)");
}
