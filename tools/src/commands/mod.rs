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

use densepred_engine::dist::{Dist, Launcher};
use densepred_engine::runner::EngineError;
use std::sync::Arc;

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
