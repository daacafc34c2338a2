pub mod analyze;
pub mod benchmark;
pub mod browse;
pub mod convert;
pub mod eval;
pub mod features;
pub mod infer;
pub mod print_config;
pub mod test;
pub mod train;

use candle_core::Device;
use densepred_engine::dist::{Dist, Launcher};
use densepred_engine::runner::EngineError;
use densepred_engine::runner::RunConfig;
use std::sync::Arc;

/// The run options `train` and `test` share (flattened into both commands' flags).
#[derive(clap::Args, Debug, Clone)]
pub struct RunArgs {
    /// Override a config key: `--set train_cfg.max_iters=20` (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub overrides: Vec<String>,
    /// No progress bar.
    #[arg(long)]
    pub no_progress: bool,
    /// `none` (one process) or `mpi` (every rank of `mpirun -np N` / `srun --mpi=pmix` runs on
    /// its shard of the data: training averages the gradients over the ranks, testing gathers
    /// the results on rank 0, which alone evaluates and writes). `mpi` needs a build with
    /// `--features mpi`.
    #[arg(long, default_value = "none")]
    pub launcher: Launcher,
    /// `cpu`, `cuda` or `cuda:N` (CUDA needs a binary built with `--features cuda`); default:
    /// the config's `device` key, else `cpu`.
    #[arg(long)]
    pub device: Option<String>,
}

impl RunArgs {
    /// Loads `config` with the `--set` overrides: the run config and the merged table.
    ///
    /// Errors: as [`RunConfig::load`].
    pub fn load(&self, config: &std::path::Path) -> anyhow::Result<(RunConfig, toml::Table)> {
        Ok(RunConfig::load(config, &self.overrides)?)
    }

    /// The device of the run (`--device`, else the config's).
    ///
    /// Errors: as [`densepred_engine::device::resolve_device`].
    pub fn device(&self, cfg: &RunConfig) -> anyhow::Result<Device> {
        Ok(densepred_engine::device::resolve_device(
            self.device.as_deref(),
            cfg,
        )?)
    }
}

/// Runs `f` as this process's rank of the run `launcher` starts (`train` and `test`). If it
/// fails in a run of several ranks, every rank stops (MPI_Abort) with its error instead of
/// waiting in the next collective.
///
/// Errors: what `f` returns; `--launcher mpi` in a build without the `mpi` feature.
pub fn as_rank(
    launcher: Launcher,
    f: impl FnOnce(Arc<Dist>) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    let dist = Arc::new(Dist::init(launcher)?);
    let r = f(dist.clone());
    if let Err(e) = &r {
        if let Some(e) = e.downcast_ref::<EngineError>() {
            dist.abort_on(e);
        } else if dist.world > 1 {
            dist.abort_on(&EngineError::Config(format!("{e:#}")));
        }
    }
    r
}
