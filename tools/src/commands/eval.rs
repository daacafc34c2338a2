//! `densepred eval`: offline evaluation of saved results.

use anyhow::Result;
use densepred_evaluation::{coco, semseg};
use std::path::PathBuf;

#[derive(clap::Subcommand)]
pub enum Eval {
    /// COCO bbox / segm evaluation of a results JSON (pycocotools' numbers).
    Coco {
        /// Ground-truth instances JSON.
        #[arg(long)]
        gt: PathBuf,
        /// Results JSON: a list of {image_id, category_id, bbox | segmentation, score}.
        #[arg(long)]
        results: PathBuf,
        /// bbox or segm.
        #[arg(long, default_value = "bbox")]
        iou_type: coco::CocoIouType,
        /// Write {"AP", "AP50", ..., "ARl"} (fractions, −1 where undefined) to this file.
        #[arg(long)]
        json_out: Option<PathBuf>,
    },
    /// Semantic segmentation metrics of 8-bit PNG label maps paired by file stem.
    Seg {
        /// Ground-truth label maps.
        #[arg(long)]
        gt_dir: PathBuf,
        /// Predicted label maps (same label convention as the ground truth).
        #[arg(long)]
        pred_dir: PathBuf,
        /// Number of classes.
        #[arg(long)]
        num_classes: usize,
        /// ADE20K convention in both folders: value v is class v − 1, 0 (other) is ignored.
        #[arg(long)]
        reduce_zero_label: bool,
        /// Write {"mIoU", "mAcc", "aAcc", "IoU": [...], "Acc": [...]} (fractions, NaN as null).
        #[arg(long)]
        json_out: Option<PathBuf>,
    },
}

/// Writes `text` to `path` atomically (see `densepred_core::io::write_atomic`).
fn write_atomic(path: &std::path::Path, text: &str) -> Result<()> {
    densepred_core::io::write_atomic(path, |tmp| {
        std::fs::write(tmp, text).map_err(|e| e.to_string())
    })
    .map_err(anyhow::Error::msg)
}

pub fn run(e: Eval) -> Result<()> {
    match e {
        Eval::Coco {
            gt,
            results,
            iou_type,
            json_out,
        } => {
            let g = coco::load_gt(&gt)?;
            let s = coco::evaluate_results_file(&g, &results, iou_type)?;
            for l in &s.summary_lines {
                println!("{l}");
            }
            println!("\n{}", s.per_category_table());
            if let Some(p) = json_out {
                write_atomic(&p, &serde_json::to_string_pretty(&s.stats_json())?)?;
            }
        }
        Eval::Seg {
            gt_dir,
            pred_dir,
            num_classes,
            reduce_zero_label,
            json_out,
        } => {
            let m = semseg::evaluate_folders(&gt_dir, &pred_dir, num_classes, reduce_zero_label)?;
            print!("{}", m.table(None));
            if let Some(p) = json_out {
                write_atomic(&p, &serde_json::to_string_pretty(&m.to_json())?)?;
            }
        }
    }
    Ok(())
}
