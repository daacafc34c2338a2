//! Data-parallel runs (mmengine's launchers and `MMDistributedDataParallel`, on MPI): the rank
//! and world of this process, the broadcast of the starting weights from rank 0, and the
//! averaging of the gradients across ranks in flat buckets. Without the `mpi` cargo feature
//! only the single-process launcher exists.

use crate::runner::{CandleContext, EngineError};
use candle_core::{backprop::GradStore, DType, Tensor};
use densepred_core::params::SeededVarMap;
use densepred_datasets::loader::Shard;

/// `--launcher` (mmengine's `launcher`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Launcher {
    /// One process.
    #[default]
    None,
    /// The ranks of `mpirun -np N` or Slurm's `srun --mpi=pmix`.
    Mpi,
}

impl std::str::FromStr for Launcher {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "none" => Ok(Self::None),
            "mpi" => Ok(Self::Mpi),
            o => Err(format!("launcher must be none or mpi, got {o:?}")),
        }
    }
}

/// Gradients are all-reduced in flat buckets of at most this many values (25 M floats = 100 MB,
/// PyTorch DDP's default bucket of 25 MB is in bytes; larger buckets mean fewer calls).
pub const BUCKET: usize = 25 << 20;

/// This process's place in a data-parallel run.
pub struct Dist {
    /// Rank, `0..world`.
    pub rank: usize,
    /// Number of ranks.
    pub world: usize,
    /// Rank among the processes of this machine (the GPU a rank takes).
    pub local_rank: usize,
    #[cfg(feature = "mpi")]
    universe: Option<mpi::environment::Universe>,
    /// NCCL over the ranks' GPUs, joined by [`Dist::rank_device`] for CUDA runs.
    #[cfg(feature = "nccl")]
    nccl: std::sync::OnceLock<crate::nccl::Nccl>,
}

impl std::fmt::Debug for Dist {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Dist {{ rank: {}, world: {} }}", self.rank, self.world)
    }
}

impl Dist {
    /// A single process (rank 0 of 1).
    pub fn single() -> Self {
        Self {
            rank: 0,
            world: 1,
            local_rank: 0,
            #[cfg(feature = "mpi")]
            universe: None,
            #[cfg(feature = "nccl")]
            nccl: std::sync::OnceLock::new(),
        }
    }

    /// Joins the run that `launcher` starts.
    ///
    /// Errors: `mpi` in a build without the `mpi` feature, or an MPI that does not initialise.
    pub fn init(launcher: Launcher) -> Result<Self, EngineError> {
        match launcher {
            Launcher::None => Ok(Self::single()),
            #[cfg(feature = "mpi")]
            Launcher::Mpi => {
                use mpi::traits::Communicator;
                let universe = mpi::initialize().ok_or_else(|| {
                    EngineError::Config("--launcher mpi: MPI was already initialised".into())
                })?;
                let world = universe.world();
                let local_rank = std::env::var("OMPI_COMM_WORLD_LOCAL_RANK")
                    .or_else(|_| std::env::var("SLURM_LOCALID"))
                    .ok()
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(0);
                if world.size() > 1 {
                    // SyncBN layers sum their statistics over all ranks.
                    densepred_core::nn::set_sync_bn_group(Some(std::sync::Arc::new(
                        |buf: &mut [f64]| {
                            use mpi::collective::SystemOperation;
                            use mpi::traits::CommunicatorCollectives;
                            let send = buf.to_vec();
                            mpi::topology::SimpleCommunicator::world().all_reduce_into(
                                &send[..],
                                buf,
                                SystemOperation::sum(),
                            );
                            Ok(())
                        },
                    )));
                }
                Ok(Self {
                    rank: world.rank() as usize,
                    world: world.size() as usize,
                    local_rank,
                    universe: Some(universe),
                    #[cfg(feature = "nccl")]
                    nccl: std::sync::OnceLock::new(),
                })
            }
            #[cfg(not(feature = "mpi"))]
            Launcher::Mpi => Err(EngineError::Config(
                "--launcher mpi needs a build with the `mpi` feature (cargo build --release -p \
                 densepred-cli --features mpi)"
                    .into(),
            )),
        }
    }

    /// Whether this rank writes logs, metrics and checkpoints (rank 0).
    pub fn is_main(&self) -> bool {
        self.rank == 0
    }

    /// Sums `buf` over the ranks in place.
    fn all_reduce_sum(&self, buf: &mut [f32]) {
        #[cfg(feature = "mpi")]
        if let Some(u) = &self.universe {
            use mpi::collective::SystemOperation;
            use mpi::traits::CommunicatorCollectives;
            let send = buf.to_vec();
            u.world()
                .all_reduce_into(&send[..], buf, SystemOperation::sum());
        }
        let _ = buf;
    }

    /// Overwrites `buf` with rank 0's values.
    fn broadcast(&self, buf: &mut [f32]) {
        #[cfg(feature = "mpi")]
        if let Some(u) = &self.universe {
            use mpi::traits::{Communicator, Root};
            u.world().process_at_rank(0).broadcast_into(buf);
        }
        let _ = buf;
    }

    /// Stops every rank after this one failed with `e` (MPI_Abort), so that no rank waits
    /// forever in a collective; a no-op in a single-process run.
    pub fn abort_on(&self, e: &EngineError) {
        #[cfg(feature = "mpi")]
        if let Some(u) = &self.universe {
            use mpi::traits::Communicator;
            eprintln!("rank {} of {}: {e}", self.rank, self.world);
            u.world().abort(1);
        }
        let _ = e;
    }

    /// Makes every rank start from rank 0's parameters and buffers (mmengine broadcasts them
    /// before the first step), in one flat buffer in name order.
    ///
    /// Errors: candle errors.
    pub fn broadcast_vars(&self, vars: &SeededVarMap) -> Result<(), EngineError> {
        if self.world == 1 {
            return Ok(());
        }
        let mut named = vars.named_vars();
        named.sort_by(|a, b| a.0.cmp(&b.0));
        let mut flat = Vec::new();
        for (_, v) in &named {
            let t = v.as_tensor().to_dtype(DType::F32).ctx("broadcast")?;
            flat.extend(
                t.flatten_all()
                    .ctx("broadcast")?
                    .to_vec1::<f32>()
                    .ctx("broadcast")?,
            );
        }
        self.broadcast(&mut flat);
        let mut at = 0;
        for (_, v) in &named {
            let t = v.as_tensor();
            let n = t.elem_count();
            let new = Tensor::from_slice(&flat[at..at + n], t.shape(), t.device())
                .and_then(|x| x.to_dtype(t.dtype()))
                .ctx("broadcast")?;
            v.set(&new).ctx("broadcast")?;
            at += n;
        }
        Ok(())
    }

    /// The device this rank trains on, given the run's `dev`: with several ranks on CUDA, GPU
    /// `local_rank` (mmengine's rule: one GPU per process of a machine), joined to the others'
    /// GPUs by NCCL in builds with the `nccl` feature (otherwise gradients are averaged over MPI
    /// through host memory). Other devices, and one process, keep `dev`.
    ///
    /// Errors: a GPU `local_rank` that does not open; NCCL errors.
    pub fn rank_device(
        &self,
        dev: candle_core::Device,
    ) -> Result<candle_core::Device, EngineError> {
        if self.world == 1 || !dev.is_cuda() {
            return Ok(dev);
        }
        let dev = candle_core::Device::new_cuda(self.local_rank).map_err(|e| {
            EngineError::Config(format!(
                "rank {} of {}: GPU {} (its local rank) did not open: {e}",
                self.rank, self.world, self.local_rank
            ))
        })?;
        #[cfg(feature = "nccl")]
        if self.nccl.get().is_none() {
            let candle_core::Device::Cuda(cuda) = &dev else {
                unreachable!("opened as CUDA above")
            };
            let comm = crate::nccl::Nccl::new(cuda, self.rank, self.world, |id| {
                let mut buf: Vec<f32> = id.iter().map(|&b| b as f32).collect();
                self.broadcast(&mut buf);
                for (b, v) in id.iter_mut().zip(buf) {
                    *b = v as u8;
                }
            })?;
            let _ = self.nccl.set(comm);
            tracing::info!(
                "rank {}: gradients averaged by NCCL on GPU {}",
                self.rank,
                self.local_rank
            );
        }
        #[cfg(not(feature = "nccl"))]
        tracing::warn!(
            "rank {}: CUDA without the `nccl` feature: gradients are averaged over MPI through host memory",
            self.rank
        );
        Ok(dev)
    }

    /// Replaces each gradient in `grads` of `params` by its mean over the ranks (a rank without
    /// a gradient for a parameter contributes zeros), all-reduced in buckets of at most
    /// [`BUCKET`] values. Returns the number of values all-reduced.
    ///
    /// Errors: candle errors.
    pub fn average_gradients(
        &self,
        params: &[&Tensor],
        grads: &mut GradStore,
    ) -> Result<usize, EngineError> {
        if self.world == 1 {
            return Ok(0);
        }
        #[cfg(feature = "nccl")]
        if let (Some(n), true) = (
            self.nccl.get(),
            params.first().is_some_and(|p| p.device().is_cuda()),
        ) {
            return average_on_gpus(n, params, grads);
        }
        let mut total = 0;
        for bucket in buckets(params) {
            let ps = &params[bucket];
            let mut flat = Vec::new();
            for p in ps {
                match grads.get(p) {
                    Some(g) => flat.extend(
                        g.to_dtype(DType::F32)
                            .and_then(|g| g.flatten_all())
                            .and_then(|g| g.to_vec1::<f32>())
                            .ctx("gradient all-reduce")?,
                    ),
                    None => flat.extend(std::iter::repeat_n(0f32, p.elem_count())),
                }
            }
            self.all_reduce_sum(&mut flat);
            let inv = 1.0 / self.world as f32;
            let mut at = 0;
            for p in ps {
                let k = p.elem_count();
                let avg: Vec<f32> = flat[at..at + k].iter().map(|v| v * inv).collect();
                let g = Tensor::from_vec(avg, p.shape(), p.device())
                    .and_then(|g| g.to_dtype(p.dtype()))
                    .ctx("gradient all-reduce")?;
                grads.insert(p, g);
                at += k;
            }
            total += flat.len();
        }
        Ok(total)
    }

    /// The evaluation shard of this rank: every image once ([`Shard::eval`]).
    pub fn eval_shard(&self) -> Shard {
        Shard::eval(self.rank, self.world)
    }

    /// Gathers every rank's `mine` on rank 0 (mmengine's `collect_results`, over MPI): `Some`
    /// with one buffer per rank in rank order on rank 0, `None` on the others; a single
    /// process gets `Some(vec![mine])`.
    ///
    /// Errors: a buffer of 2 GiB or more (MPI counts are 32-bit).
    pub fn gather_bytes(&self, mine: Vec<u8>) -> Result<Option<Vec<Vec<u8>>>, EngineError> {
        if i32::try_from(mine.len()).is_err() {
            return Err(EngineError::Config(format!(
                "rank {}: {} bytes of results to gather, more than MPI's 2 GiB per message",
                self.rank,
                mine.len()
            )));
        }
        #[cfg(feature = "mpi")]
        if let Some(u) = &self.universe {
            use mpi::datatype::PartitionMut;
            use mpi::traits::{Communicator, Root};
            use mpi::Count;
            let world = u.world();
            let root = world.process_at_rank(0);
            let n = mine.len() as Count;
            if self.rank != 0 {
                root.gather_into(&n);
                root.gather_varcount_into(&mine[..]);
                return Ok(None);
            }
            let mut counts = vec![0 as Count; self.world];
            root.gather_into_root(&n, &mut counts[..]);
            let displs: Vec<Count> = counts
                .iter()
                .scan(0 as Count, |at, &c| {
                    let d = *at;
                    *at += c;
                    Some(d)
                })
                .collect();
            let total: usize = counts.iter().map(|&c| c as usize).sum();
            let mut buf = vec![0u8; total];
            {
                let mut part = PartitionMut::new(&mut buf[..], &counts[..], &displs[..]);
                root.gather_varcount_into_root(&mine[..], &mut part);
            }
            let parts = counts
                .iter()
                .zip(&displs)
                .map(|(&c, &d)| buf[d as usize..(d + c) as usize].to_vec())
                .collect();
            return Ok(Some(parts));
        }
        Ok(Some(vec![mine]))
    }

    /// [`Dist::gather_bytes`] of a JSON value.
    ///
    /// Errors: as [`Dist::gather_bytes`]; a rank's buffer that is not JSON.
    pub fn gather_json(
        &self,
        mine: &serde_json::Value,
    ) -> Result<Option<Vec<serde_json::Value>>, EngineError> {
        let bytes = serde_json::to_vec(mine)
            .map_err(|e| EngineError::Config(format!("results of rank {}: {e}", self.rank)))?;
        let Some(parts) = self.gather_bytes(bytes)? else {
            return Ok(None);
        };
        parts
            .iter()
            .enumerate()
            .map(|(r, p)| {
                serde_json::from_slice(p).map_err(|e| {
                    EngineError::Config(format!("results gathered from rank {r}: {e}"))
                })
            })
            .collect::<Result<Vec<_>, _>>()
            .map(Some)
    }
}

/// [`Dist::average_gradients`] with NCCL on the GPUs: each bucket concatenated on the device,
/// averaged in place of a copy, split back (no host copies).
#[cfg(feature = "nccl")]
fn average_on_gpus(
    n: &crate::nccl::Nccl,
    params: &[&Tensor],
    grads: &mut GradStore,
) -> Result<usize, EngineError> {
    let mut total = 0;
    for bucket in buckets(params) {
        let ps = &params[bucket];
        let parts = ps
            .iter()
            .map(|p| match grads.get(p) {
                Some(g) => g.to_dtype(DType::F32)?.flatten_all(),
                None => Tensor::zeros(p.elem_count(), DType::F32, p.device()),
            })
            .collect::<candle_core::Result<Vec<_>>>()
            .ctx("gradient all-reduce")?;
        let avg = n
            .average(&Tensor::cat(&parts, 0).ctx("gradient all-reduce")?)
            .ctx("gradient all-reduce (NCCL)")?;
        let mut at = 0;
        for p in ps {
            let k = p.elem_count();
            let g = avg
                .narrow(0, at, k)
                .and_then(|g| g.reshape(p.shape())?.to_dtype(p.dtype()))
                .ctx("gradient all-reduce")?;
            grads.insert(p, g);
            at += k;
        }
        total += at;
    }
    Ok(total)
}

/// Consecutive ranges of `params` holding at most [`BUCKET`] values each (a larger tensor gets
/// a bucket of its own): the all-reduce calls of one step.
fn buckets(params: &[&Tensor]) -> Vec<std::ops::Range<usize>> {
    let counts: Vec<usize> = params.iter().map(|p| p.elem_count()).collect();
    ranges_of_at_most(&counts, BUCKET)
}

/// Consecutive ranges of `counts` whose sums stay within `cap` (an item over `cap` alone).
fn ranges_of_at_most(counts: &[usize], cap: usize) -> Vec<std::ops::Range<usize>> {
    let mut out = Vec::new();
    let mut start = 0;
    while start < counts.len() {
        let mut end = start;
        let mut n = 0;
        while end < counts.len() && (n == 0 || n + counts[end] <= cap) {
            n += counts[end];
            end += 1;
        }
        out.push(start..end);
        start = end;
    }
    out
}

#[cfg(test)]
mod tests {
    /// Buckets fill up to the cap, an oversized tensor stands alone, nothing is left out.
    #[test]
    fn buckets_cover_every_tensor_within_the_cap() {
        let r = super::ranges_of_at_most(&[9, 2, 15, 1, 4, 5, 3], 10);
        assert_eq!(r, vec![0..1, 1..2, 2..3, 3..6, 6..7]);
        assert!(super::ranges_of_at_most(&[], 10).is_empty());
    }
}
