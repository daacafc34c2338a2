//! `densepred infer CONFIG --checkpoint CK IMAGE_OR_DIR... --out-dir D`: detections on arbitrary
//! images (mmdetection's `demo/image_demo.py`), drawn as PNGs plus one COCO-style JSON.

use crate::visualize::{draw_detections, save_png};
use anyhow::{bail, Context, Result};
use candle_core::Device;
use clap::Parser;
use densepred_datasets::config::DatasetConfig;
use densepred_datasets::transforms::{Pipeline, TransformConfig};
use densepred_datasets::Sample;
use densepred_engine::runner::{build_model, load_weights, model_inputs, to_batch, RunConfig};
use rand::SeedableRng;
use std::path::{Path, PathBuf};

/// Detect objects in images.
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
    let dl = cfg
        .test_dataloader
        .as_ref()
        .or(cfg.val_dataloader.as_ref())
        .context(
            "config has neither test_dataloader nor val_dataloader (its pipeline is needed)",
        )?;
    let (pipeline, classes) = match &dl.dataset {
        DatasetConfig::CocoDataset {
            pipeline, metainfo, ..
        } => (
            pipeline.clone(),
            metainfo.as_ref().map(|m| m.classes.clone()),
        ),
        _ => bail!("infer: the test dataset must be a CocoDataset"),
    };
    let classes = match classes {
        Some(c) => c,
        None => dl.dataset.build()?.0.metainfo().classes.clone(),
    };
    // Annotations do not exist for arbitrary images.
    let pipeline = Pipeline(
        pipeline
            .into_iter()
            .filter(|t| !matches!(t, TransformConfig::LoadAnnotations { .. }))
            .collect(),
    );
    let dev = Device::Cpu;
    let model = build_model(&cfg.model, cfg.seed(), &dev)?;
    load_weights(&model, &a.checkpoint, false)?;
    let detector = model.inference_detector(&cfg.model)?;
    std::fs::create_dir_all(&a.out_dir)
        .with_context(|| format!("creating {}", a.out_dir.display()))?;
    let mut records = Vec::new();
    for (i, path) in collect_images(&a.inputs)?.iter().enumerate() {
        let s = pipeline.apply(
            Sample::new(path.clone(), i as u64),
            &mut rand::rngs::StdRng::seed_from_u64(0),
        )?;
        let batch = to_batch(&model, vec![s], &dev)?;
        let (x, metas, _) = model_inputs(&batch);
        let dets = detector.predict(&x, &metas)?.remove(0);
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
