//! The one place where each op chooses what runs: our CPU kernel, our CUDA kernel, a composition
//! of candle ops, or our CPU kernel on a host copy.
//!
//! Every tensor op of [`crate::ops`] has an [`Op`] entry in [`OPS`] and calls [`select`] once with
//! it; models never test the device themselves. The rule:
//!
//! - a CPU tensor of a dtype in [`Op::dtypes`] runs our CPU kernel ([`Impl::Cpu`]);
//! - a CUDA tensor of such a dtype runs our CUDA kernel where the op has one
//!   ([`Op::cuda_kernel`], `core/kernels/densepred.cu`, feature `cuda`) ([`Impl::Cuda`]);
//! - everything else takes the op's [`Fallback`]: a composition of candle ops, which candle runs
//!   on every device, or the CPU kernel on a host copy for host-side logic on small inputs (NMS
//!   sweeps, pasting masks).
//!
//! [`with_fallback`] forces the fallbacks on the calling thread, so that the path a GPU without
//! our kernel takes is tested on the CPU against our kernel (`core/tests/op_paths.rs`: values and
//! gradients), and a test there fails when a tensor op of `core/src/ops` has no entry here.

use candle_core::{DType, Tensor};
use std::cell::Cell;

/// What an op runs where our kernels do not apply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fallback {
    /// A composition of candle ops on the tensor's own device, differentiable through candle's
    /// autograd.
    Candle,
    /// Our CPU kernel on a host copy, the result copied back to the input's device.
    Host,
}

/// One tensor op and its implementations.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Op {
    /// The public function (`crate::ops::…`) this entry describes.
    pub name: &'static str,
    /// Dtypes our kernels take (others take the fallback).
    pub dtypes: &'static [DType],
    /// Whether `core/kernels/densepred.cu` has a kernel for it.
    pub cuda_kernel: bool,
    /// What runs elsewhere.
    pub fallback: Fallback,
}

/// The implementation [`select`] chose for one call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Impl {
    /// Our CPU kernel.
    Cpu,
    /// Our CUDA kernel (only with the `cuda` feature).
    Cuda,
    /// The candle composition.
    Candle,
    /// The CPU kernel on a host copy.
    Host,
}

impl Impl {
    /// Whether one of our kernels runs on the tensor's own device ([`Impl::Cpu`] or
    /// [`Impl::Cuda`]).
    pub fn is_ours(self) -> bool {
        matches!(self, Impl::Cpu | Impl::Cuda)
    }
}

impl Op {
    /// An op whose kernels are CPU-only and whose fallback is a candle composition (what most
    /// ops are; model crates declare their fused ops with it).
    pub const fn candle(name: &'static str, dtypes: &'static [DType]) -> Self {
        Op {
            name,
            dtypes,
            cuda_kernel: false,
            fallback: Fallback::Candle,
        }
    }

    /// What this op runs on a CUDA device: `"kernel"`, `"candle"` or `"host"`.
    pub fn cuda_path(&self) -> &'static str {
        match (self.cuda_kernel, self.fallback) {
            (true, _) => "kernel",
            (false, Fallback::Candle) => "candle",
            (false, Fallback::Host) => "host",
        }
    }
}

/// f32 and f64: the dtypes of most of our kernels.
pub const FLOAT: &[DType] = &[DType::F32, DType::F64];
const F32: &[DType] = &[DType::F32];

pub const GELU_ERF: Op = Op::candle("gelu_erf", F32);
pub const SCALED_DOT_PRODUCT_ATTENTION: Op = Op::candle("scaled_dot_product_attention", FLOAT);
pub const TOKEN_ATTENTION: Op = Op::candle("token_attention", FLOAT);
pub const BATCH_NORM_TRAIN_SYNCED: Op = Op::candle("batch_norm_train_synced", FLOAT);
pub const ADD_BIAS_LAST: Op = Op::candle("add_bias_last", FLOAT);
pub const MUL_SCALE_LAST: Op = Op::candle("mul_scale_last", FLOAT);
pub const ADD_BIAS_CHANNELS: Op = Op::candle("add_bias_channels", FLOAT);
pub const MUL_SCALE_CHANNELS: Op = Op::candle("mul_scale_channels", FLOAT);
pub const LINEAR_BIAS: Op = Op::candle("linear_bias", FLOAT);
pub const POINTWISE_CONV_BIAS: Op = Op::candle("pointwise_conv_bias", FLOAT);
pub const DEPTHWISE_CONV2D: Op = Op {
    name: "depthwise_conv2d",
    dtypes: FLOAT,
    cuda_kernel: true,
    fallback: Fallback::Candle,
};
pub const TOKEN_DWCONV: Op = Op::candle("token_dwconv", FLOAT);
pub const CONV2D_GEMM: Op = Op::candle("conv2d_gemm", FLOAT);
pub const CONV2D_GEMM_BIAS_ACT: Op = Op::candle("conv2d_gemm_bias_act", FLOAT);
pub const CONV2D_GEMM_CAT: Op = Op::candle("conv2d_gemm_cat", FLOAT);
pub const CONV_TRANSPOSE2X2: Op = Op::candle("conv_transpose2x2", FLOAT);
pub const CONV2D_GEMM_CAT_RESIZED: Op = Op::candle("conv2d_gemm_cat_resized", FLOAT);
pub const LAYER_NORM: Op = Op::candle("layer_norm", FLOAT);
pub const LAYER_NORM_CHANNELS: Op = Op::candle("layer_norm_channels", FLOAT);
pub const BATCHED_NMS: Op = Op {
    name: "batched_nms",
    dtypes: FLOAT,
    cuda_kernel: true,
    fallback: Fallback::Host,
};
pub const PASTE_MASKS: Op = Op {
    name: "paste_masks",
    dtypes: FLOAT,
    cuda_kernel: false,
    fallback: Fallback::Host,
};
pub const RESIZE_BILINEAR: Op = Op::candle("resize_bilinear", FLOAT);
pub const ADD_RESIZED: Op = Op::candle("add_resized", FLOAT);
pub const ADAPTIVE_AVG_POOL2D: Op = Op::candle("adaptive_avg_pool2d", FLOAT);
pub const RESIZE_NEAREST: Op = Op::candle("resize_nearest", FLOAT);
pub const ROI_ALIGN: Op = Op {
    name: "roi_align",
    dtypes: FLOAT,
    cuda_kernel: true,
    fallback: Fallback::Host,
};
pub const SOFTMAX_LAST_DIM: Op = Op::candle("softmax_last_dim", FLOAT);
pub const TRANSPOSE_LAST2: Op = Op::candle("transpose_last2", FLOAT);

/// Every tensor op of [`crate::ops`] with its implementations (what `densepred` runs on each
/// device; `core/tests/op_paths.rs` checks the list is complete). Model crates list their own
/// fused ops beside the model (SMT's: `densepred_backbones::smt::FUSED_OPS`).
pub const OPS: &[Op] = &[
    GELU_ERF,
    SCALED_DOT_PRODUCT_ATTENTION,
    TOKEN_ATTENTION,
    BATCH_NORM_TRAIN_SYNCED,
    ADD_BIAS_LAST,
    MUL_SCALE_LAST,
    ADD_BIAS_CHANNELS,
    MUL_SCALE_CHANNELS,
    LINEAR_BIAS,
    POINTWISE_CONV_BIAS,
    DEPTHWISE_CONV2D,
    TOKEN_DWCONV,
    CONV2D_GEMM,
    CONV2D_GEMM_BIAS_ACT,
    CONV2D_GEMM_CAT,
    CONV_TRANSPOSE2X2,
    CONV2D_GEMM_CAT_RESIZED,
    LAYER_NORM,
    LAYER_NORM_CHANNELS,
    BATCHED_NMS,
    PASTE_MASKS,
    RESIZE_BILINEAR,
    ADD_RESIZED,
    ADAPTIVE_AVG_POOL2D,
    RESIZE_NEAREST,
    ROI_ALIGN,
    SOFTMAX_LAST_DIM,
    TRANSPOSE_LAST2,
];

thread_local! {
    static FORCE_FALLBACK: Cell<bool> = const { Cell::new(false) };
}

/// The implementation of `op` for an input like `x` (its device and dtype; see the module docs).
pub fn select(op: &Op, x: &Tensor) -> Impl {
    if FORCE_FALLBACK.with(Cell::get) {
        return fallback(op);
    }
    let dtype_ok = op.dtypes.contains(&x.dtype());
    if dtype_ok && x.device().is_cpu() {
        Impl::Cpu
    } else if dtype_ok && op.cuda_kernel && cfg!(feature = "cuda") && x.device().is_cuda() {
        Impl::Cuda
    } else {
        fallback(op)
    }
}

fn fallback(op: &Op) -> Impl {
    match op.fallback {
        Fallback::Candle => Impl::Candle,
        Fallback::Host => Impl::Host,
    }
}

/// Runs `f` with every op on its [`Fallback`] on the calling thread (restored afterwards, also
/// on a panic): the path a device without our kernels takes, for testing it on the CPU.
pub fn with_fallback<R>(f: impl FnOnce() -> R) -> R {
    struct Restore(bool);
    impl Drop for Restore {
        fn drop(&mut self) {
            FORCE_FALLBACK.with(|c| c.set(self.0));
        }
    }
    let _restore = Restore(FORCE_FALLBACK.with(|c| c.replace(true)));
    f()
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn cpu_float_runs_ours_and_with_fallback_does_not() {
        let x = Tensor::zeros(4, DType::F32, &Device::Cpu).unwrap();
        let h = Tensor::zeros(4, DType::F16, &Device::Cpu).unwrap();
        assert_eq!(select(&LAYER_NORM, &x), Impl::Cpu);
        assert_eq!(select(&LAYER_NORM, &h), Impl::Candle);
        assert_eq!(select(&BATCHED_NMS, &h), Impl::Host);
        with_fallback(|| {
            assert_eq!(select(&LAYER_NORM, &x), Impl::Candle);
            assert_eq!(select(&ROI_ALIGN, &x), Impl::Host);
        });
        assert_eq!(select(&LAYER_NORM, &x), Impl::Cpu);
        let names: std::collections::HashSet<_> = OPS.iter().map(|o| o.name).collect();
        assert_eq!(names.len(), OPS.len(), "an op is listed twice");
    }
}
