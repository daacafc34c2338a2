//! `densepred test CONFIG --checkpoint CK`: mmdetection's / mmsegmentation's `tools/test.py`
//! (detectors: COCO bbox and, with masks, segm summaries and per-class AP; segmentors: per-class IoU / Acc table with
//! `mIoU`, `mAcc`, `aAcc`).

use crate::visualize::{draw_detections, save_png, write_seg_prediction};
use anyhow::{Context, Result};
use clap::Parser;
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
    /// Write the COCO bbox results (original-image xywh, original category ids) here; detectors
    /// with masks also write the segm results (RLE) beside it as `<stem>.segm.json`.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Draw the detections on each image into this folder.
    #[arg(long)]
    pub show_dir: Option<PathBuf>,
    /// Score threshold of the drawings.
    #[arg(long, default_value_t = 0.3)]
    pub show_score_thr: f32,
    /// Write the metrics as JSON here (detectors: the 12 COCO stats, prefixed `bbox_` / `segm_`
    /// when masks are evaluated too; segmentors: mIoU, mAcc, aAcc and the per-class IoU / Acc,
    /// fractions, NaN as null).
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
    #[command(flatten)]
    pub run: super::RunArgs,
}

pub fn run(a: Args) -> Result<()> {
    super::as_rank(a.run.launcher, |dist| run_rank(a, dist))
}

fn run_rank(a: Args, dist: std::sync::Arc<densepred_engine::dist::Dist>) -> Result<()> {
    let (cfg, _) = a.run.load(&a.config)?;
    let (dl, _) = cfg.test_split()?;
    let dev = a.run.device(&cfg)?;
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
            show_progress: !a.run.no_progress,
        },
        dist: Some(dist.clone()),
    };
    let run = test_checkpoint(&cfg, &a.checkpoint, &opts, &dev)?;
    if !dist.is_main() {
        // Rank 0 gathered this rank's results; it prints and writes.
        return Ok(());
    }
    let out = match run {
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
        write_json(p, &out.records)?;
        println!(
            "results: {} ({} detections)",
            p.display(),
            out.records.len()
        );
        if let Some(segm) = &out.segm_records {
            let sp = segm_path(p);
            write_json(&sp, segm)?;
            println!(
                "segm results: {} ({} masks; densepred eval coco --iou-type segm)",
                sp.display(),
                segm.len()
            );
        }
    }
    if let Some(dir) = &a.show_dir {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        // Masks come back from the RLE records (the test keeps no bitmaps), in detection order.
        let mut by_image: std::collections::HashMap<u64, Vec<&serde_json::Value>> =
            Default::default();
        for r in out.segm_records.iter().flatten() {
            by_image
                .entry(r["image_id"].as_u64().unwrap_or(u64::MAX))
                .or_default()
                .push(r);
        }
        for r in &out.images {
            let mut img = image::open(&r.img_path)
                .with_context(|| format!("reading {}", r.img_path.display()))?
                .to_rgb8();
            let mut dets = r.dets.clone();
            if let Some(recs) = by_image.get(&r.img_id) {
                let mut masks = densepred_core::structures::BitmapMasks::default();
                for rec in recs {
                    let m = densepred_datasets::coco::result_record_mask(rec)
                        .map_err(anyhow::Error::msg)?;
                    masks.size = m.dim();
                    masks.masks.push(m.into_raw_vec_and_offset().0);
                }
                dets.masks = Some(masks);
            }
            draw_detections(&mut img, &dets, &out.classes, a.show_score_thr);
            let name = r
                .img_path
                .file_stem()
                .map(|s| s.to_string_lossy().to_string())
                .unwrap_or_else(|| r.img_id.to_string());
            save_png(&img, &dir.join(format!("{name}.png")))?;
        }
        println!("drawings: {}", dir.display());
    }
    let mut keys = serde_json::Map::new();
    for s in out.summaries() {
        println!("Evaluate annotation type *{}*", s.iou_type.as_str());
        for l in &s.summary_lines {
            println!("{l}");
        }
        println!("\n{}", s.per_category_table());
        keys.extend(densepred_engine::tester::mmdet_keys(s));
    }
    if !keys.is_empty() {
        println!("{}", serde_json::Value::Object(keys));
    }
    if let (Some(p), Some(stats)) = (&a.json_out, out.stats_json()) {
        let text = serde_json::to_string_pretty(&stats)?;
        densepred_core::io::write_atomic(p, |t| {
            std::fs::write(t, &text).map_err(|e| e.to_string())
        })
        .map_err(anyhow::Error::msg)?;
    }
    Ok(())
}

/// Writes `value` as JSON to `path` atomically.
fn write_json<T: serde::Serialize>(path: &std::path::Path, value: &T) -> Result<()> {
    let text = serde_json::to_string(value)?;
    densepred_core::io::write_atomic(path, |t| {
        std::fs::write(t, &text).map_err(|e| e.to_string())
    })
    .map_err(anyhow::Error::msg)
}

/// `results.json` → `results.segm.json` (mmdetection's `<prefix>.segm.json` beside the boxes).
fn segm_path(p: &std::path::Path) -> PathBuf {
    let stem = p
        .file_stem()
        .map(|s| s.to_string_lossy().to_string())
        .unwrap_or_else(|| "results".into());
    p.with_file_name(format!("{stem}.segm.json"))
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
