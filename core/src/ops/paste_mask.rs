//! Pasting per-box mask predictions into the image, as mmdetection's `_do_paste_mask`
//! (detectron2's convention): every image pixel centre `(x + 0.5, y + 0.5)` is mapped into the box's
//! `M × M` mask grid in normalised coordinates and sampled bilinearly as
//! `F.grid_sample(align_corners=False, padding_mode="zeros")`; pixels outside the box read 0.
//! Callers binarise with `>= mask_thr_binary` (0.5).

use candle_core::{DType, Device, Result, Tensor};
use rayon::prelude::*;

/// Soft masks `(N, H, W)` f32 from `masks` `(N, M_h, M_w)` (probabilities) and `boxes` `(N, 4)`
/// xyxy in image pixels, for an `img_h × img_w` image. Runs on the CPU.
///
/// Errors: mismatched `N`, non-3-D masks.
pub fn paste_masks(masks: &Tensor, boxes: &Tensor, img_h: usize, img_w: usize) -> Result<Tensor> {
    let (n, mh, mw) = masks.dims3()?;
    if boxes.dims() != [n, 4] {
        candle_core::bail!(
            "paste_masks: boxes must be ({n}, 4), got {:?}",
            boxes.dims()
        );
    }
    let m: Vec<f32> = masks
        .to_device(&Device::Cpu)?
        .to_dtype(DType::F32)?
        .flatten_all()?
        .to_vec1()?;
    let b: Vec<f32> = boxes
        .to_device(&Device::Cpu)?
        .to_dtype(DType::F32)?
        .flatten_all()?
        .to_vec1()?;
    let mut out = vec![0f32; n * img_h * img_w];
    out.par_chunks_mut(img_h * img_w)
        .enumerate()
        .for_each(|(i, o)| {
            let (x0, y0, x1, y1) = (b[4 * i], b[4 * i + 1], b[4 * i + 2], b[4 * i + 3]);
            let mask = &m[i * mh * mw..(i + 1) * mh * mw];
            // Normalised grid coordinate of a pixel centre; inf (empty box) becomes 0 as in mmdet.
            let norm = |p: usize, lo: f32, hi: f32| -> f32 {
                let v = (p as f32 + 0.5 - lo) / (hi - lo) * 2.0 - 1.0;
                if v.is_infinite() {
                    0.0
                } else {
                    v
                }
            };
            // grid_sample's unnormalisation for align_corners=False.
            let unnorm = |g: f32, size: usize| ((g + 1.0) * size as f32 - 1.0) / 2.0;
            let xs: Vec<f32> = (0..img_w).map(|x| unnorm(norm(x, x0, x1), mw)).collect();
            for y in 0..img_h {
                let iy = unnorm(norm(y, y0, y1), mh);
                if iy.is_nan() {
                    continue;
                }
                let fy = iy.floor();
                let ty = iy - fy;
                let y_lo = fy as i64;
                let row = &mut o[y * img_w..(y + 1) * img_w];
                for (x, &ix) in xs.iter().enumerate() {
                    if ix.is_nan() {
                        continue;
                    }
                    let fx = ix.floor();
                    let tx = ix - fx;
                    let x_lo = fx as i64;
                    let tap = |yy: i64, xx: i64| -> f32 {
                        if yy >= 0 && xx >= 0 && (yy as usize) < mh && (xx as usize) < mw {
                            mask[yy as usize * mw + xx as usize]
                        } else {
                            0.0
                        }
                    };
                    row[x] = tap(y_lo, x_lo) * (1.0 - tx) * (1.0 - ty)
                        + tap(y_lo, x_lo + 1) * tx * (1.0 - ty)
                        + tap(y_lo + 1, x_lo) * (1.0 - tx) * ty
                        + tap(y_lo + 1, x_lo + 1) * tx * ty;
                }
            }
        });
    Tensor::from_vec(out, (n, img_h, img_w), masks.device())
}
