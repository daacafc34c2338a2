//! `densepred train CONFIG`: mmdetection's `tools/train.py`.

use anyhow::{Context, Result};
use clap::Parser;
use densepred_engine::runner::work_dir_for;
use densepred_engine::trainer::{train, TrainOptions};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// Train a model from a config.
#[derive(Parser)]
pub struct Args {
    /// Config file (TOML, `_base_` inheritance).
    pub config: PathBuf,
    /// Output folder (default: the config's `work_dir`, else `work_dirs/<config name>`).
    #[arg(long)]
    pub work_dir: Option<PathBuf>,
    /// Continue from the work dir's last checkpoint.
    #[arg(long)]
    pub resume: bool,
    /// Start from these weights (a detector checkpoint, or a backbone checkpoint such as the
    /// official SMT ImageNet `.pth`).
    #[arg(long)]
    pub load_from: Option<PathBuf>,
    #[command(flatten)]
    pub run: super::RunArgs,
}

pub fn run(a: Args) -> Result<()> {
    super::as_rank(a.run.launcher, |dist| run_rank(a, dist))
}

fn run_rank(a: Args, dist: Arc<densepred_engine::dist::Dist>) -> Result<()> {
    let (cfg, table) = a.run.load(&a.config)?;
    let work_dir = work_dir_for(&cfg, &a.config, a.work_dir.as_deref());
    let flag = Arc::new(AtomicBool::new(false));
    let f2 = flag.clone();
    ctrlc::set_handler(move || {
        if f2.swap(true, Ordering::SeqCst) {
            std::process::exit(130);
        }
        eprintln!("\ninterrupt: stopping after this iteration (Ctrl-C again to abort now)");
    })
    .context("installing the Ctrl-C handler")?;
    let opts = TrainOptions {
        work_dir: work_dir.clone(),
        resume: a.resume || cfg.resume,
        load_from: a.load_from,
        device: a.run.device(&cfg)?,
        progress: !a.run.no_progress,
        interrupt: Some(flag),
        dist: Some(dist.clone()),
    };
    tracing::info!("work dir: {}", work_dir.display());
    if dist.world > 1 {
        tracing::info!(
            "rank {} of {} (local rank {})",
            dist.rank,
            dist.world,
            dist.local_rank
        );
    }
    let s = train(&cfg, &table, &opts)?;
    if !dist.is_main() {
        return Ok(());
    }
    if let Some(c) = &s.last_checkpoint {
        println!("checkpoint: {}", c.display());
    }
    println!("metrics: {}", work_dir.join("metrics.jsonl").display());
    println!("curves: {}", work_dir.join("loss_curve.png").display());
    Ok(())
}
