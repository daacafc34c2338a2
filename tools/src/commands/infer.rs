//! `densepred infer CONFIG --checkpoint CK IMAGE_OR_DIR... --out-dir D`: predictions on arbitrary
//! images (mmdetection's / mmsegmentation's `demo/image_demo.py`). Detectors: drawn boxes as PNGs
//! plus one COCO-style JSON; segmentors: label PNGs and colour overlays.

use crate::visualize::{draw_detections, save_png, write_seg_prediction};
use anyhow::{bail, Context, Result};
use clap::Parser;
use densepred_engine::inference::{ImageInput, Inferencer};
use densepred_engine::runner::RunConfig;
use std::path::{Path, PathBuf};

/// Detect objects in, or segment, images.
#[derive(Parser)]
pub struct Args {
    /// Config file (its test pipeline is used).
    pub config: PathBuf,
    /// Weights.
    #[arg(long)]
    pub checkpoint: PathBuf,
    /// Images or folders of images (`.jpg`, `.jpeg`, `.png`).
    #[arg(required = true)]
    pub inputs: Vec<PathBuf>,
    /// Output folder for the drawings and `results.json`.
    #[arg(long)]
    pub out_dir: PathBuf,
    /// Score threshold of the drawings (the JSON keeps every detection).
    #[arg(long, default_value_t = 0.3)]
    pub score_thr: f32,
    /// Override a config key (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub overrides: Vec<String>,
    /// Load the checkpoint strictly (`--strict false`: load what matches and warn about the rest).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set, value_name = "BOOL")]
    pub strict: bool,
    /// `cpu`, `cuda` or `cuda:N` (CUDA needs a binary built with `--features cuda`); default:
    /// the config's `device` key, else `cpu`.
    #[arg(long)]
    pub device: Option<String>,
}

fn collect_images(inputs: &[PathBuf]) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    let is_img = |p: &Path| {
        p.extension()
            .and_then(|e| e.to_str())
            .map(|e| matches!(e.to_ascii_lowercase().as_str(), "jpg" | "jpeg" | "png"))
            .unwrap_or(false)
    };
    for p in inputs {
        if p.is_dir() {
            let mut v: Vec<PathBuf> = std::fs::read_dir(p)
                .with_context(|| format!("reading {}", p.display()))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| is_img(p))
                .collect();
            v.sort();
            out.extend(v);
        } else if p.exists() {
            out.push(p.clone());
        } else {
            bail!("{}: no such file or folder", p.display());
        }
    }
    if out.is_empty() {
        bail!("no image among the inputs");
    }
    Ok(out)
}

pub fn run(a: Args) -> Result<()> {
    let (cfg, _) = RunConfig::load(&a.config, &a.overrides)?;
    let dev = densepred_engine::device::resolve_device(a.device.as_deref(), &cfg)?;
    let inf = Inferencer::new(&cfg, Some(&a.checkpoint), a.strict, &dev)?;
    let classes = inf.classes().to_vec();
    let images = collect_images(&a.inputs)?;
    if inf.is_segmentor() {
        for path in &images {
            let pred = inf
                .segment(&[ImageInput::Path(path.clone())])?
                .remove(0)
                .mapv(|v| v.min(255) as u8);
            let (h, w) = pred.dim();
            write_seg_prediction(
                &a.out_dir,
                path,
                &pred,
                inf.reduce_zero_label(),
                inf.palette(),
            )?;
            let mut counts = vec![0usize; classes.len().max(1)];
            for &v in pred.iter() {
                if let Some(c) = counts.get_mut(v as usize) {
                    *c += 1;
                }
            }
            let mut top: Vec<(usize, usize)> =
                counts.into_iter().enumerate().filter(|c| c.1 > 0).collect();
            top.sort_by(|p, q| q.1.cmp(&p.1));
            let desc: Vec<String> = top
                .iter()
                .take(5)
                .map(|&(c, n)| {
                    format!(
                        "{} {:.1}%",
                        classes.get(c).map(String::as_str).unwrap_or("?"),
                        100.0 * n as f64 / (h * w) as f64
                    )
                })
                .collect();
            println!("{}: {}", path.display(), desc.join(", "));
        }
        println!(
            "label maps: {}, overlays: {}",
            a.out_dir.join("labels").display(),
            a.out_dir.join("overlays").display()
        );
        return Ok(());
    }
    std::fs::create_dir_all(&a.out_dir)
        .with_context(|| format!("creating {}", a.out_dir.display()))?;
    let mut records = Vec::new();
    for (i, path) in images.iter().enumerate() {
        let dets = inf.detect(&[ImageInput::Path(path.clone())])?.remove(0);
        let mut img = image::open(path)
            .with_context(|| format!("reading {}", path.display()))?
            .to_rgb8();
        draw_detections(&mut img, &dets, &classes, a.score_thr);
        let stem = path
            .file_stem()
            .map(|s| s.to_string_lossy().to_string())
            .unwrap_or_else(|| i.to_string());
        save_png(&img, &a.out_dir.join(format!("{stem}.png")))?;
        for k in 0..dets.len() {
            let b = dets.bboxes[k];
            let l = dets.labels[k] as usize;
            records.push(serde_json::json!({
                "file_name": path.display().to_string(),
                "bbox": [b[0], b[1], b[2] - b[0], b[3] - b[1]],
                "score": dets.scores[k],
                "label": l,
                "class_name": classes.get(l).cloned().unwrap_or_default(),
            }));
        }
        println!("{}: {} detections", path.display(), dets.len());
    }
    let out = a.out_dir.join("results.json");
    let text = serde_json::to_string_pretty(&records)?;
    densepred_core::io::write_atomic(&out, |t| {
        std::fs::write(t, &text).map_err(|e| e.to_string())
    })
    .map_err(anyhow::Error::msg)?;
    println!("results: {}", out.display());
    Ok(())
}
