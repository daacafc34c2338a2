//! `densepred train` killed after a checkpoint and restarted with `--resume` logs the same
//! per-iteration losses as an uninterrupted run (seeded data order, augmentation, weights and
//! stochastic layers; optimizer state and iteration restored from the checkpoint).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn train_cmd(work_dir: &Path, resume: bool) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_densepred"));
    c.current_dir(root())
        .arg("train")
        .arg("tests/configs/retinanet_tiny_overfit.toml")
        .arg("--work-dir")
        .arg(work_dir)
        .arg("--no-progress");
    for s in [
        "train_cfg.max_iters=10",
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
    assert!(train_cmd(&a, false).status().unwrap().success());
    let full = losses(&a);
    assert_eq!(
        full.keys().copied().collect::<Vec<_>>(),
        (1..=10).collect::<Vec<u64>>()
    );

    // Kill the second run as soon as its first checkpoint exists.
    let mut child = train_cmd(&b, false).spawn().unwrap();
    let t0 = Instant::now();
    while !b.join("last_checkpoint").exists() {
        assert!(
            t0.elapsed() < Duration::from_secs(300),
            "no checkpoint written"
        );
        assert!(
            child.try_wait().unwrap().is_none(),
            "training ended before it could be killed"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let stem = std::fs::read_to_string(b.join("last_checkpoint")).unwrap();
    let killed_at = losses(&b).keys().copied().max().unwrap_or(0);
    assert!(
        killed_at < 10,
        "the run finished before the kill ({killed_at} iterations)"
    );

    assert!(train_cmd(&b, true).status().unwrap().success());
    let resumed = losses(&b);
    assert_eq!(
        resumed.keys().copied().collect::<Vec<_>>(),
        (1..=10).collect::<Vec<u64>>(),
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
