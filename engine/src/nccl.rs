//! Gradient averaging on GPUs with NCCL (feature `nccl`, which implies `mpi` and `cuda`), as
//! PyTorch DDP's NCCL backend: MPI starts the ranks and hands rank 0's NCCL unique id to the
//! others; each rank then averages its gradient buckets on its own GPU
//! (`ncclAllReduce` with `ncclAvg`), without copies to the host.
//!
//! Written against cudarc 0.19's NCCL bindings (the version candle 0.11 pins) and NCCL 2.28; it
//! builds with `tools/cuda/build.sh` but has **not run on a GPU yet** (none was lent to this
//! project's sessions).

use crate::runner::EngineError;
use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::nccl::{Comm, Id, ReduceOp};
use candle_core::{CpuStorage, CudaStorage, CustomOp1, Layout, Shape, Tensor};

/// A rank's NCCL communicator over all ranks of the run.
pub(crate) struct Nccl {
    comm: Comm,
}

// SAFETY: the communicator is used from the training thread only (one collective at a time on
// candle's stream of the rank's device); `Dist`, which holds it, is shared through an `Arc` only
// so that the CLI can abort from its error path.
unsafe impl Send for Nccl {}
unsafe impl Sync for Nccl {}

impl Nccl {
    /// Joins the communicator of `world` ranks on `dev` (this rank's GPU). `share_id` must give
    /// every rank rank 0's 128-byte unique id (an MPI broadcast).
    ///
    /// Errors: NCCL errors (named).
    pub(crate) fn new(
        dev: &candle_core::CudaDevice,
        rank: usize,
        world: usize,
        share_id: impl FnOnce(&mut [u8; 128]),
    ) -> Result<Self, EngineError> {
        let err = |what: &str, e: &dyn std::fmt::Debug| {
            EngineError::Config(format!("NCCL {what} (rank {rank} of {world}): {e:?}"))
        };
        let mut bytes = [0u8; 128];
        if rank == 0 {
            let id = Id::new().map_err(|e| err("unique id", &e))?;
            for (b, &c) in bytes.iter_mut().zip(id.internal().iter()) {
                *b = c as u8;
            }
        }
        share_id(&mut bytes);
        let mut internal = [0 as std::ffi::c_char; 128];
        for (c, &b) in internal.iter_mut().zip(bytes.iter()) {
            *c = b as std::ffi::c_char;
        }
        let comm = Comm::from_rank(dev.cuda_stream(), rank, world, Id::uninit(internal))
            .map_err(|e| err("communicator", &e))?;
        Ok(Self { comm })
    }

    /// The element-wise mean over the ranks of `flat` (a contiguous f32 vector on this rank's
    /// GPU), as a new tensor on the same device.
    ///
    /// Errors: a tensor that is not f32 on CUDA; NCCL errors.
    pub(crate) fn average(&self, flat: &Tensor) -> candle_core::Result<Tensor> {
        flat.contiguous()?
            .apply_op1_no_bwd(&AllReduceAvg { comm: &self.comm })
    }
}

/// `ncclAllReduce(…, ncclAvg)` of a CUDA f32 tensor into a new buffer.
struct AllReduceAvg<'a> {
    comm: &'a Comm,
}

impl CustomOp1 for AllReduceAvg<'_> {
    fn name(&self) -> &'static str {
        "nccl-all-reduce-avg"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        candle_core::bail!("the NCCL all-reduce takes CUDA tensors (CPU ranks use MPI)")
    }

    fn cuda_fwd(&self, s: &CudaStorage, l: &Layout) -> candle_core::Result<(CudaStorage, Shape)> {
        let (a, b) = l
            .contiguous_offsets()
            .ok_or_else(|| candle_core::Error::Msg("NCCL all-reduce: non-contiguous".into()))?;
        let src = s.as_cuda_slice::<f32>()?.slice(a..b);
        let dev = s.device().clone();
        let mut dst = dev.alloc_zeros::<f32>(b - a)?;
        self.comm
            .all_reduce(&src, &mut dst, &ReduceOp::Avg)
            .map_err(|e| candle_core::Error::Msg(format!("NCCL all-reduce: {e:?}")))?;
        Ok((CudaStorage::wrap_cuda_slice(dst, dev), l.shape().clone()))
    }
}
