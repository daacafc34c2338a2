//! `densepred analyze`: model inspection.

use anyhow::Result;
use candle_core::Device;
use densepred_core::params::is_buffer;
use densepred_engine::backbone as backbone_config;
use std::collections::BTreeMap;
use std::path::PathBuf;

#[derive(clap::Subcommand)]
pub enum Analyze {
    /// Print the trainable parameter count of every top-level module, then `total N` (buffers such
    /// as BatchNorm running statistics excluded, as PyTorch's `parameters()`).
    Params {
        /// Config with a `[backbone]` (or `[model.backbone]`) table.
        config: PathBuf,
    },
    /// Count the multiply-accumulates of one forward pass of a backbone config (batch 1, eval
    /// mode, classifier included when the config has one) with fvcore's rules
    /// (`densepred_core::flops`): one line per kind in GMACs, the total with the attention
    /// products (fvcore's figure), then `total_gmacs X` without them (ptflops's figure, which
    /// the SMT and MCGA papers report).
    Flops {
        /// Backbone config (a `[backbone]` table).
        config: PathBuf,
        /// Input `HxW`.
        #[arg(long, default_value = "224x224")]
        shape: String,
    },
}

pub fn run(a: Analyze) -> Result<()> {
    match a {
        Analyze::Flops { config, shape } => {
            let (h, w) = super::benchmark::parse_shape(&shape)?;
            let loaded = backbone_config::build_backbone(&config, None, &Device::Cpu)?;
            let x =
                candle_core::Tensor::zeros((1, 3, h, w), candle_core::DType::F32, &Device::Cpu)?;
            let (out, counts) = densepred_core::flops::measure(|| -> candle_core::Result<()> {
                let stages = loaded.inference.forward_stages(&x, false)?;
                loaded.inference.classify(&stages[3])?;
                Ok(())
            });
            out?;
            let g = |v: u64| v as f64 / 1e9;
            for (k, v) in &counts {
                println!("{k:<12} {:>9.4}", g(*v));
            }
            let all: u64 = counts.values().sum();
            let matmul = counts
                .get(densepred_core::flops::MATMUL)
                .copied()
                .unwrap_or(0);
            println!("total_gmacs_with_attention_matmul {:.4}", g(all));
            println!("total_gmacs {:.4}", g(all - matmul));
            Ok(())
        }
        Analyze::Params { config } => {
            let table = densepred_engine::config::load(&config)?;
            if table.contains_key("model") {
                // A whole detector / segmentor config: parameters per component, as mmdetection and
                // mmsegmentation count them.
                let (cfg, _) = densepred_engine::runner::RunConfig::load(&config, &[])?;
                let m = densepred_engine::runner::build_model(&cfg.model, 0, &Device::Cpu)?;
                let mut per: BTreeMap<String, usize> = BTreeMap::new();
                for (name, var) in m.vars.named_vars() {
                    if !is_buffer(&name) {
                        *per.entry(name.split('.').next().unwrap_or(&name).to_string())
                            .or_default() += var.elem_count();
                    }
                }
                for (k, v) in &per {
                    println!("{k:<14} {v:>12}");
                }
                println!("{:<14} {:>12}", "total", per.values().sum::<usize>());
                return Ok(());
            }
            let loaded = backbone_config::build_backbone(&config, None, &Device::Cpu)?;
            let mut per_module: BTreeMap<String, usize> = BTreeMap::new();
            for (name, var) in loaded.vars.named_vars() {
                if is_buffer(&name) {
                    continue;
                }
                let top = name.split('.').next().unwrap_or(&name).to_string();
                *per_module.entry(top).or_default() += var.elem_count();
            }
            let width = per_module.keys().map(|k| k.len()).max().unwrap_or(0);
            // Natural order: patch_embed1, block1, norm1, patch_embed2, ...
            let mut rows: Vec<_> = per_module.into_iter().collect();
            rows.sort_by_key(|(k, _)| {
                let digits: String = k.chars().filter(|c| c.is_ascii_digit()).collect();
                let kind = ["patch_embed", "block", "norm"]
                    .iter()
                    .position(|p| k.starts_with(p))
                    .unwrap_or(3);
                (
                    digits.parse::<usize>().unwrap_or(usize::MAX),
                    kind,
                    k.clone(),
                )
            });
            let mut total = 0;
            for (k, n) in rows {
                println!("{k:<width$}  {n:>12}");
                total += n;
            }
            println!("total {total}");
            Ok(())
        }
    }
}
