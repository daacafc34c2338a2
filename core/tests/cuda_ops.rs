//! CUDA kernels of our custom ops against their CPU kernels (feature `cuda`).
//!
//! Build and run on a GPU machine (see `../shared/notes/cuda_build.md` for the toolchain):
//! `DENSEPRED_REQUIRE_CUDA=1 cargo test -p densepred-core --features cuda --test cuda_ops`.
//! Without a CUDA device each test prints that it was skipped, unless `DENSEPRED_REQUIRE_CUDA=1`,
//! which turns a missing device into a failure (so a GPU run cannot pass vacuously).
//!
//! Tolerances: the kernels evaluate the same sums as the CPU kernels in a different order (and
//! RoIAlign's backward scatters with atomics), so f32 results agree to rounding: 1e-5 relative to
//! the largest magnitude; f64 to 1e-12. NMS keep lists must be equal.
#![cfg(feature = "cuda")]

use candle_core::{DType, Device, Tensor, Var};
use densepred_core::ops::{
    batched_nms, depthwise_conv2d, nms, roi_align, DwConvParams, RoiAlignParams,
};

fn gpu() -> Option<Device> {
    match Device::new_cuda(0) {
        Ok(d) => Some(d),
        Err(e) => {
            assert!(
                std::env::var_os("DENSEPRED_REQUIRE_CUDA").is_none(),
                "DENSEPRED_REQUIRE_CUDA is set but no CUDA device opened: {e}"
            );
            eprintln!("no CUDA device ({e}): skipped");
            None
        }
    }
}

/// Max |a − b| / max(1, max |b|), both brought to the CPU.
fn rel_err(a: &Tensor, b: &Tensor) -> f64 {
    let cpu = |t: &Tensor| t.to_device(&Device::Cpu).unwrap();
    let (a, b) = (cpu(a), cpu(b));
    densepred_testutil::max_abs(&a, &b) / densepred_testutil::max_abs_value(&b).max(1.0)
}

#[test]
fn depthwise_conv_forward_and_backward_match_cpu() {
    let Some(gpu) = gpu() else { return };
    let cases = [
        (
            (2, 8, 13, 11),
            (3, 5),
            DwConvParams {
                stride: (2, 1),
                padding: (1, 2),
                dilation: (1, 2),
            },
        ),
        ((1, 16, 28, 28), (7, 7), DwConvParams::same(3)),
        (
            (2, 4, 9, 10),
            (3, 3),
            DwConvParams {
                stride: (2, 2),
                padding: (0, 1),
                dilation: (2, 1),
            },
        ),
    ];
    for (dtype, tol) in [(DType::F32, 1e-5), (DType::F64, 1e-12)] {
        for (xs, (kh, kw), p) in cases {
            let c = xs.1;
            let x = Tensor::randn(0f64, 1.0, xs, &Device::Cpu)
                .unwrap()
                .to_dtype(dtype)
                .unwrap();
            let w = Tensor::randn(0f64, 1.0, (c, 1, kh, kw), &Device::Cpu)
                .unwrap()
                .to_dtype(dtype)
                .unwrap();
            let run = |dev: &Device| {
                let xv = Var::from_tensor(&x.to_device(dev).unwrap()).unwrap();
                let wv = Var::from_tensor(&w.to_device(dev).unwrap()).unwrap();
                let y = depthwise_conv2d(&xv, &wv, None, p).unwrap();
                // A non-uniform upstream gradient: weights by position.
                let proj = Tensor::arange(0f64, y.elem_count() as f64, dev)
                    .unwrap()
                    .to_dtype(dtype)
                    .unwrap()
                    .reshape(y.dims())
                    .unwrap()
                    .sin()
                    .unwrap();
                let g = densepred_testutil::grads_of_dot(&y, &proj);
                (
                    y.clone(),
                    g.get(&xv).unwrap().clone(),
                    g.get(&wv).unwrap().clone(),
                )
            };
            let (yc, gxc, gwc) = run(&Device::Cpu);
            let (yg, gxg, gwg) = run(&gpu);
            assert!(yg.device().is_cuda());
            for (what, a, b) in [("y", &yg, &yc), ("dx", &gxg, &gxc), ("dw", &gwg, &gwc)] {
                let e = rel_err(a, b);
                assert!(
                    e <= tol,
                    "{dtype:?} {xs:?} k=({kh},{kw}) {p:?}: {what} error {e}"
                );
            }
        }
    }
}

#[test]
fn roi_align_forward_and_backward_match_cpu() {
    let Some(gpu) = gpu() else { return };
    let feat = Tensor::randn(0f32, 1.0, (2, 5, 20, 24), &Device::Cpu).unwrap();
    // Inside, partly outside, degenerate and tiny boxes on both images; stride 4 (scale 1/4).
    let rois = Tensor::new(
        &[
            [0f32, 4.0, 6.0, 60.0, 50.0],
            [1.0, -10.0, -8.0, 30.0, 20.0],
            [0.0, 70.0, 60.0, 120.0, 100.0],
            [1.0, 33.0, 33.0, 33.0, 33.0],
            [0.0, 10.5, 11.25, 12.0, 13.0],
            [1.0, 0.0, 0.0, 96.0, 80.0],
        ],
        &Device::Cpu,
    )
    .unwrap();
    for aligned in [true, false] {
        for sampling_ratio in [0, 2] {
            let p = RoiAlignParams {
                output_size: (7, 6),
                spatial_scale: 0.25,
                sampling_ratio,
                aligned,
            };
            let run = |dev: &Device| {
                let f = Var::from_tensor(&feat.to_device(dev).unwrap()).unwrap();
                let y = roi_align(&f, &rois.to_device(dev).unwrap(), p).unwrap();
                let proj = Tensor::arange(0f32, y.elem_count() as f32, dev)
                    .unwrap()
                    .reshape(y.dims())
                    .unwrap()
                    .cos()
                    .unwrap();
                let g = densepred_testutil::grads_of_dot(&y, &proj);
                (y.clone(), g.get(&f).unwrap().clone())
            };
            let (yc, gc) = run(&Device::Cpu);
            let (yg, gg) = run(&gpu);
            assert!(yg.device().is_cuda() && gg.device().is_cuda());
            let (ey, eg) = (rel_err(&yg, &yc), rel_err(&gg, &gc));
            assert!(
                ey <= 1e-5 && eg <= 1e-5,
                "{p:?}: forward {ey}, backward {eg}"
            );
        }
    }
}

#[test]
fn nms_keep_lists_match_cpu() {
    let Some(gpu) = gpu() else { return };
    let n = 1500;
    let xy = Tensor::rand(0f32, 1.0, (n, 2), &Device::Cpu)
        .unwrap()
        .affine(300.0, 0.0)
        .unwrap();
    let wh = Tensor::rand(0f32, 1.0, (n, 2), &Device::Cpu)
        .unwrap()
        .affine(60.0, 1.0)
        .unwrap();
    let boxes = Tensor::cat(&[&xy, &(&xy + &wh).unwrap()], 1).unwrap();
    // Scores rounded to 1/16 so that many tie: ties must break by index on both devices.
    let scores = (Tensor::rand(0f32, 1.0, n, &Device::Cpu).unwrap() * 16.0)
        .unwrap()
        .floor()
        .unwrap()
        .affine(1.0 / 16.0, 0.0)
        .unwrap();
    let classes = (Tensor::rand(0f32, 1.0, n, &Device::Cpu).unwrap() * 5.0)
        .unwrap()
        .floor()
        .unwrap()
        .to_dtype(DType::I64)
        .unwrap();
    let on = |t: &Tensor| t.to_device(&gpu).unwrap();
    let list = |t: Tensor| {
        assert_eq!(t.dtype(), DType::I64);
        t.to_device(&Device::Cpu).unwrap().to_vec1::<i64>().unwrap()
    };
    for thr in [0.3f32, 0.5, 0.7] {
        let cpu = list(nms(&boxes, &scores, thr).unwrap());
        let cuda = nms(&on(&boxes), &on(&scores), thr).unwrap();
        assert!(cuda.device().is_cuda());
        assert_eq!(list(cuda), cpu, "nms at {thr}");
        let cpu = list(batched_nms(&boxes, &scores, &classes, thr).unwrap());
        let cuda = list(batched_nms(&on(&boxes), &on(&scores), &on(&classes), thr).unwrap());
        assert_eq!(cuda, cpu, "batched_nms at {thr}");
        assert!(
            cpu.len() > 10 && cpu.len() < n,
            "threshold {thr} kept {}",
            cpu.len()
        );
    }
    // No boxes.
    let empty = Tensor::zeros((0, 4), DType::F32, &gpu).unwrap();
    let none = Tensor::zeros(0, DType::F32, &gpu).unwrap();
    assert_eq!(nms(&empty, &none, 0.5).unwrap().dims(), [0]);
}
