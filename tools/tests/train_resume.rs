//! `densepred train` killed after a checkpoint and restarted with `--resume` logs the same
//! per-iteration losses as an uninterrupted run (seeded data order, augmentation, weights and
//! stochastic layers; optimizer state and iteration restored from the checkpoint).
//!
//! No timing is assumed: the run to kill is given 1000 iterations (it cannot finish first), it is
//! killed once a checkpoint is on disk, and the comparison length follows from that checkpoint.
//! The config's schedule (LinearLR over iterations 0–20) does not depend on `max_iters`.

mod common;
use common::*;
use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn train_cmd(work_dir: &Path, resume: bool, max_iters: u64) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_densepred"));
    c.current_dir(root())
        .arg("train")
        .arg("tests/configs/retinanet_tiny_overfit.toml")
        .arg("--work-dir")
        .arg(work_dir)
        .arg("--no-progress");
    c.arg("--set")
        .arg(format!("train_cfg.max_iters={max_iters}"));
    for s in [
        "train_cfg.val_interval=0",
        "default_hooks.checkpoint.interval=2",
        "default_hooks.logger.interval=1",
    ] {
        c.arg("--set").arg(s);
    }
    if resume {
        c.arg("--resume");
    }
    c.stdout(Stdio::null()).stderr(Stdio::null());
    c
}

/// The last logged record of every iteration (a resumed run re-logs nothing twice, but keep the
/// newest to be safe).
fn losses(work_dir: &Path) -> BTreeMap<u64, (f64, f64, f64)> {
    let text = std::fs::read_to_string(work_dir.join("metrics.jsonl")).unwrap();
    let mut out = BTreeMap::new();
    for line in text.lines() {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        if v["mode"] == "train" {
            let f = |k: &str| v[k].as_f64().unwrap();
            out.insert(
                v["iter"].as_u64().unwrap(),
                (f("loss"), f("loss_cls"), f("loss_bbox")),
            );
        }
    }
    out
}

#[test]
fn resume_after_kill_reproduces_the_losses() {
    let tmp = tempfile::tempdir().unwrap();
    let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));

    // Kill a long run as soon as its first checkpoint is on disk.
    let mut child = train_cmd(&b, false, 1000).spawn().unwrap();
    let t0 = Instant::now();
    while !b.join("last_checkpoint").exists() {
        assert!(
            t0.elapsed() < Duration::from_secs(300),
            "no checkpoint written"
        );
        assert!(
            child.try_wait().unwrap().is_none(),
            "training ended before writing a checkpoint"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let stem = std::fs::read_to_string(b.join("last_checkpoint")).unwrap();
    let saved: u64 = stem
        .trim()
        .strip_prefix("iter_")
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("checkpoint stem {stem:?}"));
    let killed_at = losses(&b).keys().copied().max().unwrap_or(0);
    assert!(killed_at < 1000, "the run finished before the kill");
    assert!(saved >= 2, "first checkpoint at iteration 2, got {saved}");

    // Resume to four iterations past the checkpoint; an uninterrupted run of the same length is
    // the reference.
    let n = saved + 4;
    assert!(train_cmd(&a, false, n).status().unwrap().success());
    let full = losses(&a);
    assert_eq!(
        full.keys().copied().collect::<Vec<_>>(),
        (1..=n).collect::<Vec<u64>>()
    );
    assert!(train_cmd(&b, true, n).status().unwrap().success());
    // Records past `n` come from the killed run; the resumed run re-logged saved+1..=n.
    let resumed: BTreeMap<u64, (f64, f64, f64)> =
        losses(&b).into_iter().filter(|(it, _)| *it <= n).collect();
    assert_eq!(
        resumed.keys().copied().collect::<Vec<_>>(),
        (1..=n).collect::<Vec<u64>>(),
        "resumed from {stem}"
    );
    for (it, want) in &full {
        let got = resumed[it];
        for (g, w) in [(got.0, want.0), (got.1, want.1), (got.2, want.2)] {
            // CPU runs are deterministic: the same values up to f32 printing (1e-6 relative).
            assert!(
                (g - w).abs() <= 1e-6 * w.abs().max(1e-6),
                "iteration {it}: {got:?} vs uninterrupted {want:?} (resumed from {})",
                stem.trim()
            );
        }
    }
}
