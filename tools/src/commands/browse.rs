//! `densepred browse-dataset`: the configured pipeline's output with its ground truth drawn, as
//! mmdetection's `tools/analysis_tools/browse_dataset.py`.

use crate::visualize::{
    blend_label_map, blend_mask, draw_box, draw_text, palette, save_png, to_rgb8,
};
use anyhow::{Context, Result};
use densepred_datasets::config::DataloaderConfig;
use densepred_datasets::loader::DataLoader;
use std::path::PathBuf;

/// Write each image of a split, after the dataset pipeline, with its boxes (class names),
/// instance masks or label map drawn, as PNG files.
#[derive(clap::Args)]
pub struct Args {
    /// Config file (`train_dataloader` / `val_dataloader` / `test_dataloader` tables).
    config: PathBuf,
    /// Which dataloader.
    #[arg(long, default_value = "train", value_parser = ["train", "val", "test"])]
    split: String,
    /// Output folder.
    #[arg(long)]
    out_dir: PathBuf,
    /// At most this many images.
    #[arg(long)]
    limit: Option<usize>,
    /// Config overrides `key.path=value`.
    #[arg(long = "set")]
    overrides: Vec<String>,
}

pub fn run(a: Args) -> Result<()> {
    let cfg = densepred_engine::config::load_with_overrides(&a.config, &a.overrides)?;
    let dl: DataloaderConfig =
        densepred_engine::config::section(&cfg, &format!("{}_dataloader", a.split), &a.config)?;
    let (ds, pipeline, skip_invalid) = dl.dataset.build()?;
    let classes = ds.metainfo().classes.clone();
    let loader = DataLoader {
        dataset: ds,
        pipeline,
        batch_size: 1,
        num_workers: dl.num_workers,
        shuffle: false,
        drop_last: false,
        seed: 0,
        prefetch: 4,
        skip_invalid,
        aspect_groups: None,
        skipped: Default::default(),
        shard: Default::default(),
    };
    std::fs::create_dir_all(&a.out_dir)
        .with_context(|| format!("creating {}", a.out_dir.display()))?;
    let limit = a.limit.unwrap_or(usize::MAX);
    let mut written = 0;
    for batch in loader.epoch(0) {
        for s in batch? {
            if written >= limit {
                break;
            }
            let img = s.img.as_ref().with_context(|| {
                format!(
                    "{}: pipeline has no LoadImageFromFile",
                    s.img_path.display()
                )
            })?;
            let mut canvas = to_rgb8(img);
            if let Some(m) = &s.gt_seg_map {
                blend_label_map(&mut canvas, m, 255, 0.5);
            }
            if let Some(ms) = &s.masks {
                for (m, inst) in ms.iter().zip(&s.instances) {
                    blend_mask(&mut canvas, m, palette(inst.label), 0.45);
                }
            }
            for inst in &s.instances {
                let c = if inst.ignore {
                    [128, 128, 128]
                } else {
                    palette(inst.label)
                };
                draw_box(&mut canvas, inst.bbox, c);
                let name = classes.get(inst.label).map(String::as_str).unwrap_or("?");
                let text = if inst.ignore {
                    format!("{name} (crowd)")
                } else {
                    name.to_string()
                };
                draw_text(
                    &mut canvas,
                    inst.bbox[0] as i64,
                    (inst.bbox[1] as i64 - 9).max(0),
                    &text,
                    c,
                );
            }
            let stem = s
                .img_path
                .file_stem()
                .and_then(|x| x.to_str())
                .unwrap_or("image");
            save_png(&canvas, &a.out_dir.join(format!("{stem}.png")))?;
            written += 1;
        }
        if written >= limit {
            break;
        }
    }
    println!("wrote {written} images to {}", a.out_dir.display());
    Ok(())
}
