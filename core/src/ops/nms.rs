//! Non-maximum suppression with torchvision's semantics (`torchvision.ops.nms` /
//! `batched_nms`), as a candle custom op with a CPU kernel.
//!
//! * boxes `(N, 4)` xyxy, IoU without +1;
//! * boxes are visited in descending score order, ties broken by ascending index (torchvision's
//!   stable sort); a box is suppressed when its IoU with a kept box is **strictly greater** than the
//!   threshold;
//! * the output is the kept indices `(K,)` int64 in that visiting order;
//! * `batched_nms` suppresses only within the same class index (the set and order torchvision's
//!   coordinate-offset trick produces).

use candle_core::{
    backend::BackendStorage, CpuStorage, CustomOp3, DType, Device, Layout, Result, Shape, Tensor,
};
use rayon::prelude::*;

/// Above this many candidates per kept box, the suppression sweep runs in parallel.
const PAR_MIN: usize = 4096;

/// The visiting order: descending score, ties by ascending index; NaN scores last.
fn score_order(scores: &[f32]) -> Vec<usize> {
    let mut order: Vec<usize> = (0..scores.len()).collect();
    order.sort_by(|&a, &b| {
        let (sa, sb) = (scores[a], scores[b]);
        sb.partial_cmp(&sa)
            .unwrap_or_else(|| sa.is_nan().cmp(&sb.is_nan()))
            .then(a.cmp(&b))
    });
    order
}

fn kernel(boxes: &[f32], scores: &[f32], classes: &[i64], thr: f32) -> Vec<i64> {
    let n = scores.len();
    let order = score_order(scores);
    let area: Vec<f32> = (0..n)
        .map(|i| (boxes[4 * i + 2] - boxes[4 * i]) * (boxes[4 * i + 3] - boxes[4 * i + 1]))
        .collect();
    let iou = |i: usize, j: usize| -> f32 {
        let xx1 = boxes[4 * i].max(boxes[4 * j]);
        let yy1 = boxes[4 * i + 1].max(boxes[4 * j + 1]);
        let xx2 = boxes[4 * i + 2].min(boxes[4 * j + 2]);
        let yy2 = boxes[4 * i + 3].min(boxes[4 * j + 3]);
        let inter = (xx2 - xx1).max(0.0) * (yy2 - yy1).max(0.0);
        inter / (area[i] + area[j] - inter)
    };
    let same_class = |i: usize, j: usize| classes[i] == classes[j];
    let mut suppressed = vec![false; n];
    let mut keep = Vec::new();
    for (oi, &i) in order.iter().enumerate() {
        if suppressed[i] {
            continue;
        }
        keep.push(i as i64);
        let rest = &order[oi + 1..];
        if rest.len() >= PAR_MIN {
            let hits: Vec<usize> = rest
                .par_iter()
                .copied()
                .filter(|&j| !suppressed[j] && same_class(i, j) && iou(i, j) > thr)
                .collect();
            for j in hits {
                suppressed[j] = true;
            }
        } else {
            for &j in rest {
                if !suppressed[j] && same_class(i, j) && iou(i, j) > thr {
                    suppressed[j] = true;
                }
            }
        }
    }
    keep
}

fn f32_slice<'a>(s: &'a CpuStorage, l: &Layout, what: &str) -> Result<&'a [f32]> {
    match s {
        CpuStorage::F32(v) => crate::kernel::contiguous(v, l, &format!("nms: {what}")),
        _ => candle_core::bail!("nms: {what} must be f32, got {:?}", s.dtype()),
    }
}

/// NMS on CUDA, torchvision's scheme: the visiting order is sorted on the host, the pairwise
/// suppression mask (the O(N²) IoU part) is computed by the `nms_mask_f32` kernel, and the greedy
/// sweep over the mask runs on the host. Returns the kept indices as an int64 device tensor.
#[cfg(feature = "cuda")]
fn cuda_nms(
    boxes: (&candle_core::CudaStorage, &Layout),
    scores: (&candle_core::CudaStorage, &Layout),
    classes: (&candle_core::CudaStorage, &Layout),
    thr: f32,
) -> Result<(candle_core::CudaStorage, Shape)> {
    use super::cuda::{to_device, to_host, view};
    use candle_core::cuda_backend::CudaDType;
    let dev = boxes.0.device().clone();
    let b = to_host(&dev, &view::<f32>(boxes.0, boxes.1, "nms: boxes")?)?;
    let s = to_host(&dev, &view::<f32>(scores.0, scores.1, "nms: scores")?)?;
    let c = to_host(
        &dev,
        &view::<i64>(classes.0, classes.1, "batched_nms: idxs")?,
    )?;
    let order = score_order(&s);
    let sorted_boxes: Vec<f32> = order
        .iter()
        .flat_map(|&i| b[4 * i..4 * i + 4].iter().copied())
        .collect();
    let sorted_classes: Vec<i64> = order.iter().map(|&i| c[i]).collect();
    let mask = super::cuda::nms_mask(&dev, &sorted_boxes, Some(&sorted_classes), thr)?;
    let words = order.len().div_ceil(64);
    let mut removed = vec![0u64; words];
    let mut keep: Vec<i64> = Vec::new();
    for (r, &i) in order.iter().enumerate() {
        if removed[r / 64] >> (r % 64) & 1 == 0 {
            keep.push(i as i64);
            let row = &mask[r * words..(r + 1) * words];
            for (acc, &m) in removed.iter_mut().zip(row) {
                *acc |= m;
            }
        }
    }
    let k = keep.len();
    let out = if k == 0 {
        dev.alloc_zeros::<i64>(0)?
    } else {
        to_device(&dev, &keep)?
    };
    Ok((i64::wrap_cuda_slice(out, dev), Shape::from(k)))
}

struct BatchedNms {
    thr: f32,
}

impl CustomOp3 for BatchedNms {
    fn name(&self) -> &'static str {
        "batched-nms"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let classes = match s3 {
            CpuStorage::I64(v) => crate::kernel::contiguous(v, l3, "batched_nms: idxs")?,
            _ => candle_core::bail!("batched_nms: idxs must be i64, got {:?}", s3.dtype()),
        };
        let keep = kernel(
            f32_slice(s1, l1, "boxes")?,
            f32_slice(s2, l2, "scores")?,
            classes,
            self.thr,
        );
        let k = keep.len();
        Ok((CpuStorage::I64(keep), Shape::from(k)))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        cuda_nms((s1, l1), (s2, l2), (s3, l3), self.thr)
    }
}

fn check(boxes: &Tensor, scores: &Tensor) -> Result<(Tensor, Tensor)> {
    let n = scores.dims1()?;
    if boxes.dims() != [n, 4] {
        candle_core::bail!(
            "nms: boxes must be (N, 4) for {n} scores, got {:?}",
            boxes.dims()
        );
    }
    // Our CUDA kernel runs on CUDA inputs' device; everything else goes to the CPU.
    let dev = match super::dispatch::select(&super::dispatch::BATCHED_NMS, boxes) {
        super::dispatch::Impl::Cuda => boxes.device().clone(),
        _ => Device::Cpu,
    };
    let b = boxes.to_device(&dev)?.to_dtype(DType::F32)?.contiguous()?;
    let s = scores.to_device(&dev)?.to_dtype(DType::F32)?.contiguous()?;
    Ok((b, s))
}

/// Greedy NMS: `boxes` `(N, 4)` xyxy, `scores` `(N,)` → kept indices `(K,)` int64 (on the input's
/// device), highest score first. Runs on the CPU, or with the `cuda` feature on CUDA inputs'
/// device (suppression mask on the GPU, greedy sweep on the host); other devices are copied.
///
/// Errors: shape mismatch between `boxes` and `scores`.
pub fn nms(boxes: &Tensor, scores: &Tensor, iou_threshold: f32) -> Result<Tensor> {
    let one_class = Tensor::zeros(scores.dims1()?, DType::I64, scores.device())?;
    batched_nms(boxes, scores, &one_class, iou_threshold)
}

/// Per-class NMS: as [`nms`], but boxes only suppress boxes of the same `idxs` `(N,)` (any integer
/// dtype) value.
///
/// Errors: shape mismatches.
pub fn batched_nms(
    boxes: &Tensor,
    scores: &Tensor,
    idxs: &Tensor,
    iou_threshold: f32,
) -> Result<Tensor> {
    let (b, s) = check(boxes, scores)?;
    if idxs.dims() != scores.dims() {
        candle_core::bail!(
            "batched_nms: idxs {:?} must match scores {:?}",
            idxs.dims(),
            scores.dims()
        );
    }
    let c = idxs
        .to_device(b.device())?
        .to_dtype(DType::I64)?
        .contiguous()?;
    b.apply_op3_no_bwd(&s, &c, &BatchedNms { thr: iou_threshold })?
        .to_device(boxes.device())
}

/// Post-processing of mmdetection's dense heads, after decoding: drop scores below
/// `score_thr`, keep the `pre_top_k` best (if set), per-class NMS at `iou_threshold`, then at most
/// `max_num` (if set). Returns indices `(K,)` into the inputs, best first.
///
/// `boxes` `(N, 4)`, `scores` `(N,)`, `labels` `(N,)` integer class ids.
///
/// Errors: shape mismatches.
pub fn filter_nms(
    boxes: &Tensor,
    scores: &Tensor,
    labels: &Tensor,
    score_thr: f32,
    pre_top_k: Option<usize>,
    iou_threshold: f32,
    max_num: Option<usize>,
) -> Result<Tensor> {
    let dev = boxes.device().clone();
    let s: Vec<f32> = scores
        .to_device(&Device::Cpu)?
        .to_dtype(DType::F32)?
        .to_vec1()?;
    let mut cand: Vec<u32> = (0..s.len() as u32)
        .filter(|&i| s[i as usize] > score_thr)
        .collect();
    if let Some(k) = pre_top_k {
        cand.sort_by(|&a, &b| s[b as usize].total_cmp(&s[a as usize]).then(a.cmp(&b)));
        cand.truncate(k);
        cand.sort_unstable();
    }
    if cand.is_empty() {
        return Tensor::zeros(0, DType::I64, &dev);
    }
    let idx = Tensor::new(cand.as_slice(), &Device::Cpu)?;
    let cpu = |t: &Tensor| t.to_device(&Device::Cpu);
    let keep = batched_nms(
        &cpu(boxes)?.index_select(&idx, 0)?,
        &cpu(scores)?.index_select(&idx, 0)?,
        &cpu(labels)?.to_dtype(DType::I64)?.index_select(&idx, 0)?,
        iou_threshold,
    )?;
    let keep = match max_num {
        Some(m) if keep.dim(0)? > m => keep.narrow(0, 0, m)?,
        _ => keep,
    };
    idx.to_dtype(DType::I64)?
        .index_select(&keep, 0)?
        .to_device(&dev)
}
