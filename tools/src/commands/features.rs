//! `densepred features`: backbone feature extraction in eval mode.

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use densepred_backbones::Backbone;
use densepred_datasets::loader::{collate, Normalization};
use densepred_datasets::transforms::load_rgb;
use densepred_datasets::Sample;
use densepred_engine::backbone as backbone_config;
use std::collections::BTreeMap;
use std::path::PathBuf;

/// Run a backbone (eval mode) and write `__stage1__` … `__stage4__` (and `__logits__` when the config
/// has a classification head) to a safetensors file.
#[derive(clap::Args)]
pub struct Args {
    /// TOML file with a `[backbone]` table (`type = "SMT"`, ...).
    #[arg(long)]
    backbone: PathBuf,
    /// Weights with the official key names (safetensors or PyTorch `.pth`); default: random init.
    #[arg(long)]
    weights: Option<PathBuf>,
    /// safetensors file holding `__input__` `(B, 3, H, W)` float32.
    #[arg(long, conflicts_with = "image")]
    input: Option<PathBuf>,
    /// An image file instead (RGB, normalised with the ImageNet mean/std that mmdetection uses).
    #[arg(long)]
    image: Option<PathBuf>,
    /// Output safetensors file.
    #[arg(long)]
    out: PathBuf,
    /// `cpu`, `cuda` or `cuda:N` (CUDA needs a binary built with `--features cuda`).
    #[arg(long, default_value = "cpu")]
    pub device: String,
}

/// mmdetection's default `data_preprocessor` normalisation (RGB mean / std, 0–255 pixels).
const IMAGENET: Normalization = Normalization {
    mean: [123.675, 116.28, 103.53],
    std: [58.395, 57.12, 57.375],
};

/// `(1, 3, H, W)` normalised tensor of an image file, decoded and normalised exactly as the data
/// pipeline does (`LoadImageFromFile`, then the data preprocessor).
fn image_tensor(path: &std::path::Path, device: &Device) -> Result<Tensor> {
    let mut sample = Sample::new(path.to_path_buf(), 0);
    sample.img = Some(load_rgb(path)?);
    Ok(collate(vec![sample], Some(&IMAGENET), 1, device)?.images)
}

pub fn run(a: Args) -> Result<()> {
    let device = densepred_engine::device::parse_device(&a.device)?;
    let loaded = backbone_config::build_backbone(&a.backbone, a.weights.as_deref(), &device)?;
    if let Some(r) = &loaded.report {
        eprintln!("weights: {}", r.to_string().trim_end());
    }
    let x = match (&a.input, &a.image) {
        (Some(p), None) => {
            let t = candle_core::safetensors::load(p, &device)
                .with_context(|| format!("{}: cannot read safetensors", p.display()))?;
            let x = t
                .get("__input__")
                .with_context(|| format!("{}: no tensor named __input__", p.display()))?;
            if x.rank() != 4 || x.dim(1)? != 3 {
                bail!(
                    "{}: __input__ must be (B, 3, H, W), got {:?}",
                    p.display(),
                    x.dims()
                );
            }
            x.to_dtype(DType::F32)?
        }
        (None, Some(p)) => image_tensor(p, &device)?,
        _ => bail!("give exactly one of --input or --image"),
    };
    let stages = loaded.inference.forward_stages(&x, false)?;
    let mut out = BTreeMap::new();
    for (i, s) in stages.iter().enumerate() {
        println!(
            "__stage{}__ {:?} mean {:.6} std {:.6}",
            i + 1,
            s.dims(),
            s.mean_all()?.to_scalar::<f32>()?,
            s.flatten_all()?.var(0)?.sqrt()?.to_scalar::<f32>()?
        );
        out.insert(format!("__stage{}__", i + 1), s.clone());
    }
    if let Some(l) = loaded.inference.classify(&stages[3])? {
        println!(
            "__logits__ {:?} argmax {:?}",
            l.dims(),
            l.argmax(1)?.to_vec1::<u32>()?
        );
        out.insert("__logits__".to_string(), l);
    }
    densepred_core::weights::save_safetensors_atomic(&out, &a.out)?;
    println!("wrote {}", a.out.display());
    let shapes = loaded.inference.out_shapes();
    println!(
        "out_shapes (channels, stride): {:?}",
        shapes
            .iter()
            .map(|s| (s.channels, s.stride))
            .collect::<Vec<_>>()
    );
    Ok(())
}
