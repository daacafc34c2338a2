//! `densepred test CONFIG --checkpoint CK`: mmdetection's / mmsegmentation's `tools/test.py`
//! (detectors: COCO bbox summary and per-class AP; segmentors: per-class IoU / Acc table with
//! `mIoU`, `mAcc`, `aAcc`).

use crate::visualize::{draw_detections, save_png, write_seg_prediction};
use anyhow::{Context, Result};
use candle_core::Device;
use clap::Parser;
use densepred_engine::runner::RunConfig;
use densepred_engine::tester::{test_checkpoint, SegTestOptions, TestRun, TestRunOptions};
use std::path::PathBuf;

/// Evaluate a checkpoint on the test split.
#[derive(Parser)]
pub struct Args {
    /// Config file.
    pub config: PathBuf,
    /// Weights (`.safetensors` written by `densepred train`, or an mmdetection `.pth`).
    #[arg(long)]
    pub checkpoint: PathBuf,
    /// Write the COCO results (original-image xywh, original category ids) here.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Draw the detections on each image into this folder.
    #[arg(long)]
    pub show_dir: Option<PathBuf>,
    /// Score threshold of the drawings.
    #[arg(long, default_value_t = 0.3)]
    pub show_score_thr: f32,
    /// Write the metrics as JSON here (detectors: the 12 COCO stats; segmentors: mIoU, mAcc,
    /// aAcc and the per-class IoU / Acc, fractions, NaN as null).
    #[arg(long)]
    pub json_out: Option<PathBuf>,
    /// Segmentors: write label PNGs (`D/labels`, ADE20K value convention) and colour overlays
    /// (`D/overlays`) here.
    #[arg(long)]
    pub out_dir: Option<PathBuf>,
    /// Segmentors: multi-scale (0.5–1.75 × the test scale) and flip test, softmax averaged.
    #[arg(long)]
    pub aug_test: bool,
    /// Load the checkpoint strictly (`--strict false`: load what matches and warn about the rest).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set, value_name = "BOOL")]
    pub strict: bool,
    /// Override a config key (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub overrides: Vec<String>,
    /// No progress bar.
    #[arg(long)]
    pub no_progress: bool,
}

pub fn run(a: Args) -> Result<()> {
    let (cfg, _) = RunConfig::load(&a.config, &a.overrides)?;
    let (dl, _) = cfg.test_split()?;
    let dev = Device::Cpu;
    let is_segmentor = cfg.model.segmentor().is_some();
    if is_segmentor && (a.out.is_some() || a.show_dir.is_some()) {
        anyhow::bail!("--out and --show-dir are for detectors; segmentors use --out-dir");
    }
    if !is_segmentor && (a.out_dir.is_some() || a.aug_test) {
        anyhow::bail!(
            "--out-dir and --aug-test are for segmentors; detectors use --out and --show-dir"
        );
    }
    let opts = TestRunOptions {
        strict: a.strict,
        seg: SegTestOptions {
            aug_test: a.aug_test,
            aug_ratios: None,
            keep_predictions: a.out_dir.is_some(),
            show_progress: !a.no_progress,
        },
    };
    let out = match test_checkpoint(&cfg, &a.checkpoint, &opts, &dev)? {
        TestRun::Segmentation(out) => return report_seg(&a, dl, out),
        TestRun::Detection(out) => out,
    };
    if out.skipped > 0 {
        println!(
            "skip_invalid: {} images could not be loaded and are not in the metrics",
            out.skipped
        );
    }
    if let Some(p) = &a.out {
        let text = serde_json::to_string(&out.records)?;
        densepred_core::io::write_atomic(p, |t| {
            std::fs::write(t, &text).map_err(|e| e.to_string())
        })
        .map_err(anyhow::Error::msg)?;
        println!(
            "results: {} ({} detections)",
            p.display(),
            out.records.len()
        );
    }
    if let Some(dir) = &a.show_dir {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        for r in &out.images {
            let mut img = image::open(&r.img_path)
                .with_context(|| format!("reading {}", r.img_path.display()))?
                .to_rgb8();
            draw_detections(&mut img, &r.dets, &out.classes, a.show_score_thr);
            let name = r
                .img_path
                .file_stem()
                .map(|s| s.to_string_lossy().to_string())
                .unwrap_or_else(|| r.img_id.to_string());
            save_png(&img, &dir.join(format!("{name}.png")))?;
        }
        println!("drawings: {}", dir.display());
    }
    if let Some(s) = &out.summary {
        println!("Evaluate annotation type *bbox*");
        for l in &s.summary_lines {
            println!("{l}");
        }
        println!("\n{}", s.per_category_table());
        let keys = densepred_engine::tester::mmdet_keys(s);
        println!("{}", serde_json::Value::Object(keys));
        if let Some(p) = &a.json_out {
            let text = serde_json::to_string_pretty(&s.stats_json())?;
            densepred_core::io::write_atomic(p, |t| {
                std::fs::write(t, &text).map_err(|e| e.to_string())
            })
            .map_err(anyhow::Error::msg)?;
        }
    }
    Ok(())
}

/// The segmentation test's outputs: IoU table, metrics, optional label PNGs and overlays.
fn report_seg(
    a: &Args,
    dl: &densepred_datasets::config::DataloaderConfig,
    out: densepred_engine::tester::SegTestOutput,
) -> Result<()> {
    use densepred_engine::tester::mmseg_keys;
    if out.skipped > 0 {
        println!(
            "skip_invalid: {} images could not be loaded and are not in the metrics",
            out.skipped
        );
    }
    if let Some(dir) = &a.out_dir {
        let palette = dl.dataset.palette();
        for r in &out.images {
            write_seg_prediction(dir, &r.img_path, &r.pred, r.reduce_zero_label, palette)?;
        }
        println!(
            "predictions: {} label maps in {}, overlays in {}",
            out.images.len(),
            dir.join("labels").display(),
            dir.join("overlays").display()
        );
    }
    match &out.metrics {
        Some(m) => {
            println!("per class results:\n{}", m.table(Some(&out.classes)));
            println!("{}", serde_json::Value::Object(mmseg_keys(m)));
            if let Some(p) = &a.json_out {
                let text = serde_json::to_string_pretty(&m.to_json())?;
                densepred_core::io::write_atomic(p, |t| {
                    std::fs::write(t, &text).map_err(|e| e.to_string())
                })
                .map_err(anyhow::Error::msg)?;
            }
        }
        None => println!("no label maps in the test set: predictions only"),
    }
    Ok(())
}
