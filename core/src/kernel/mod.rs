//! The bottom layer of densepred's CPU kernels: what every custom op's CPU code is built from,
//! and nothing that knows about an op.
//!
//! - [`storage`]: operand access (contiguous slices of candle's CPU storage), the one f32/f64
//!   dispatch ([`crate::cpu_float!`]), output allocation ([`zeroed`]) and disjoint parallel
//!   writes ([`SyncPtr`]);
//! - [`gemm`]: strided matrix views and products on them (the `gemm` crate behind candle's CPU
//!   `matmul`);
//! - [`reduce`]: vectorisable row reductions.
//!
//! The layers run one way: `kernel` ← [`crate::ops`] (generic ops, each choosing its
//! implementation in [`crate::ops::dispatch`]) ← the model crates' fused ops (SMT's in
//! `backbones/src/smt/`), which use this module and the ops' public row kernels, as mmdetection's
//! ops use mmcv's. Nothing here imports from `ops`.

pub mod gemm;
pub mod reduce;
pub mod storage;

pub use gemm::{gemm_into, gemm_into_ex, KernelFloat, MatView};
pub use storage::{
    contiguous, cpu, dtype_error, map_binary, map_unary, owned, zeroed, CpuStorage, SyncPtr,
};
