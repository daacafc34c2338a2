//! Launch helpers for the CUDA kernels of our custom ops (`core/kernels/densepred.cu`, compiled to
//! PTX by `core/build.rs`; feature `cuda`). The kernels are loaded once per device through
//! candle's `CudaDevice::get_or_load_custom_func` and run on candle's stream.

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{
    CudaSlice, CudaView, DeviceRepr, LaunchConfig, PushKernelArg,
};
use candle_core::cuda_backend::{CudaDType, WrapErr};
use candle_core::{CudaDevice, CudaStorage, DType, Layout, Result};

/// The PTX of `core/kernels/densepred.cu`.
const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/densepred_kernels.ptx"));
/// Name under which candle caches the loaded module.
const MODULE: &str = "densepred_kernels";

/// Threads per block of the element-wise (grid-stride) kernels.
pub(crate) const THREADS: u32 = 256;

/// One thread per element, at most 2^20 blocks (the kernels loop with a grid stride).
pub(crate) fn grid_1d(n: usize) -> LaunchConfig {
    let blocks = n.div_ceil(THREADS as usize).clamp(1, 1 << 20) as u32;
    LaunchConfig {
        grid_dim: (blocks, 1, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// The contiguous elements of `s` that `l` covers, as a device view.
///
/// Errors: a non-contiguous layout or a dtype other than `T` (named with `what`).
pub(crate) fn view<'a, T: CudaDType>(
    s: &'a CudaStorage,
    l: &Layout,
    what: &str,
) -> Result<CudaView<'a, T>> {
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(T::as_cuda_slice(s)?.slice(a..b)),
        None => candle_core::bail!("{what} must be contiguous"),
    }
}

/// Copies a device view back to the host (used for the small inputs that host-side logic needs:
/// RoI batch indices, NMS scores and boxes).
pub(crate) fn to_host<T: DeviceRepr>(dev: &CudaDevice, v: &CudaView<'_, T>) -> Result<Vec<T>> {
    dev.cuda_stream().clone_dtoh(v).w()
}

/// Copies a host slice to a new device buffer.
pub(crate) fn to_device<T: DeviceRepr>(dev: &CudaDevice, v: &[T]) -> Result<CudaSlice<T>> {
    dev.cuda_stream().clone_htod(v).w()
}

/// Whether a kernel's output starts as zeros (scatter-add kernels) or is fully written by it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Init {
    Zeros,
    Written,
}

/// Runs `{kernel}_{f32|f64}(a, b, out, geom)` on the device of `a` with a new `out` of `out_len`
/// elements, and returns `out`. `a` and `b` must share a float dtype; `f64` only where the kernel
/// has an f64 variant (`with_f64`).
///
/// Errors: mixed or unsupported dtypes, non-contiguous operands, CUDA driver errors.
#[allow(clippy::too_many_arguments)]
pub(crate) fn launch_binary<G: DeviceRepr>(
    kernel: &str,
    with_f64: bool,
    (a, la): (&CudaStorage, &Layout),
    (b, lb): (&CudaStorage, &Layout),
    out_len: usize,
    init: Init,
    cfg: LaunchConfig,
    geom: &G,
) -> Result<CudaStorage> {
    let dev = a.device().clone();
    macro_rules! go {
        ($t:ty, $suffix:literal) => {{
            let av = view::<$t>(a, la, kernel)?;
            let bv = view::<$t>(b, lb, kernel)?;
            let mut out = match init {
                Init::Zeros => dev.alloc_zeros::<$t>(out_len)?,
                // SAFETY: the kernel writes every element before anything reads it.
                Init::Written => unsafe { dev.alloc::<$t>(out_len)? },
            };
            if out_len > 0 && cfg.grid_dim.0 > 0 {
                let func =
                    dev.get_or_load_custom_func(&format!("{kernel}_{}", $suffix), MODULE, PTX)?;
                let mut builder = func.builder();
                builder.arg(&av);
                builder.arg(&bv);
                builder.arg(&mut out);
                builder.arg(geom);
                // SAFETY: the argument list matches the kernel's signature in densepred.cu
                // (two input pointers, one output pointer, the geometry struct by value) and
                // the caller sized `out` and `cfg` for that geometry.
                unsafe { builder.launch(cfg) }.w()?;
            }
            <$t as CudaDType>::wrap_cuda_slice(out, dev.clone())
        }};
    }
    Ok(match (a.dtype(), b.dtype()) {
        (DType::F32, DType::F32) => go!(f32, "f32"),
        (DType::F64, DType::F64) if with_f64 => go!(f64, "f64"),
        (x, y) => candle_core::bail!("{kernel}: unsupported dtypes {x:?}, {y:?} on CUDA"),
    })
}

/// The NMS suppression mask over boxes `(n, 4)` sorted by descending score (and their classes,
/// if any): `n × ceil(n/64)` words, bit `j` of row `i` set when box `j > i` is suppressed by box
/// `i`. See `nms_mask_f32` in densepred.cu.
pub(crate) fn nms_mask(
    dev: &CudaDevice,
    sorted_boxes: &[f32],
    sorted_classes: Option<&[i64]>,
    thr: f32,
) -> Result<Vec<u64>> {
    let n = sorted_boxes.len() / 4;
    let words = n.div_ceil(64);
    if n == 0 {
        return Ok(Vec::new());
    }
    let boxes = to_device(dev, sorted_boxes)?;
    let classes = to_device(dev, sorted_classes.unwrap_or(&[0i64]))?;
    let has_classes = i32::from(sorted_classes.is_some());
    let (n32, words32) = (n as i32, words as u32);
    let mut mask = dev.alloc_zeros::<u64>(n * words)?;
    let func = dev.get_or_load_custom_func("nms_mask_f32", MODULE, PTX)?;
    let mut builder = func.builder();
    builder.arg(&boxes);
    builder.arg(&classes);
    builder.arg(&has_classes);
    builder.arg(&n32);
    builder.arg(&thr);
    builder.arg(&mut mask);
    let cfg = LaunchConfig {
        grid_dim: (words32, words32, 1),
        block_dim: (64, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: arguments match `nms_mask_f32` (boxes, classes, has_classes, n, thr, mask); `mask`
    // holds n × words zeroed words and the grid covers words × words blocks of 64 boxes.
    unsafe { builder.launch(cfg) }.w()?;
    dev.cuda_stream().clone_dtoh(&mask).w()
}

/// Depthwise-convolution geometry as the kernels take it (`struct DwGeom` in densepred.cu).
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub(crate) struct DwGeom {
    pub b: i32,
    pub c: i32,
    pub h: i32,
    pub w: i32,
    pub kh: i32,
    pub kw: i32,
    pub oh: i32,
    pub ow: i32,
    pub sh: i32,
    pub sw: i32,
    pub ph: i32,
    pub pw: i32,
    pub dh: i32,
    pub dw: i32,
}

// SAFETY: plain `#[repr(C)]` integers, the layout of the C struct the kernels declare.
unsafe impl DeviceRepr for DwGeom {}

/// RoIAlign geometry as the kernels take it (`struct RoiGeom` in densepred.cu).
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub(crate) struct RoiGeom {
    pub k: i32,
    pub c: i32,
    pub h: i32,
    pub w: i32,
    pub oh: i32,
    pub ow: i32,
    pub sampling_ratio: i32,
    pub aligned: i32,
    pub spatial_scale: f32,
}

// SAFETY: plain `#[repr(C)]` scalars, the layout of the C struct the kernels declare.
unsafe impl DeviceRepr for RoiGeom {}

/// `v` as the kernels' `int`.
///
/// Errors: values above `i32::MAX` (named with `what`).
pub(crate) fn int(v: usize, what: &str) -> Result<i32> {
    i32::try_from(v).map_err(|_| candle_core::Error::Msg(format!("{what}: {v} exceeds i32")))
}
