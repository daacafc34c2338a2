//! Parity of the detection ops with torchvision / mmdetection on `../shared/fixtures/ops/`
//! (see its README for every convention). Tolerances: float32 results are compared with the
//! fixture's float32 output within 1e-5 relative to magnitude (the README: f32 and f64 differ by
//! ≤ ~5e-6 on these ops); index outputs must match exactly.

use candle_core::{DType, Device, Tensor};
use densepred_core::ops::iou::{bbox_overlaps, box_area, box_iou, complete_box_iou, distance_box_iou, generalized_box_iou, OverlapMode};
use densepred_core::ops::{batched_nms, nms};
use std::collections::HashMap;
use std::path::PathBuf;

pub fn fixture(name: &str) -> HashMap<String, Tensor> {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared/fixtures/ops").join(name);
    assert!(p.exists(), "missing fixture {} (../shared must sit beside the checkout)", p.display());
    candle_core::safetensors::load(&p, &Device::Cpu).unwrap()
}

/// max |a − b| / max(1, |b|), elementwise, over all elements (NaN where both are NaN counts as 0).
pub fn max_rel(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.dims(), b.dims());
    let a: Vec<f64> = a.flatten_all().unwrap().to_dtype(DType::F64).unwrap().to_vec1().unwrap();
    let b: Vec<f64> = b.flatten_all().unwrap().to_dtype(DType::F64).unwrap().to_vec1().unwrap();
    a.iter()
        .zip(&b)
        .map(|(x, y)| if x.is_nan() && y.is_nan() { 0.0 } else { (x - y).abs() / y.abs().max(1.0) })
        .fold(0.0, f64::max)
}

const TOL: f64 = 1e-5;

#[test]
fn iou_family_matches_torchvision_and_mmdet() {
    let f = fixture("box_iou.safetensors");
    let (a, b) = (&f["boxes1"], &f["boxes2"]);
    let cases: Vec<(&str, Tensor)> = vec![
        ("box_area1", box_area(a).unwrap()),
        ("box_iou", box_iou(a, b).unwrap()),
        ("generalized_box_iou", generalized_box_iou(a, b).unwrap()),
        ("distance_box_iou", distance_box_iou(a, b, 1e-7).unwrap()),
        ("complete_box_iou", complete_box_iou(a, b, 1e-7).unwrap()),
        ("mmdet_bbox_overlaps_iou", bbox_overlaps(a, b, OverlapMode::Iou, false, 1e-6).unwrap()),
        ("mmdet_bbox_overlaps_iof", bbox_overlaps(a, b, OverlapMode::Iof, false, 1e-6).unwrap()),
        ("mmdet_bbox_overlaps_giou", bbox_overlaps(a, b, OverlapMode::Giou, false, 1e-6).unwrap()),
        ("mmdet_bbox_overlaps_iou_aligned", bbox_overlaps(a, &b.narrow(0, 0, 17).unwrap(), OverlapMode::Iou, true, 1e-6).unwrap()),
        ("mmdet_bbox_overlaps_giou_aligned", bbox_overlaps(a, &b.narrow(0, 0, 17).unwrap(), OverlapMode::Giou, true, 1e-6).unwrap()),
    ];
    for (name, got) in cases {
        let err = max_rel(&got, &f[name]);
        assert!(err <= TOL, "{name}: {err}");
    }
}

fn keep(t: Tensor) -> Vec<i64> {
    t.to_vec1().unwrap()
}

#[test]
fn nms_keep_lists_match_torchvision_exactly() {
    let f = fixture("nms.safetensors");
    for (thr, tag) in [(0.3f32, "0p3"), (0.5, "0p5"), (0.7, "0p7")] {
        assert_eq!(keep(nms(&f["boxes"], &f["scores"], thr).unwrap()), keep(f[&format!("nms_keep_thr{tag}")].clone()), "nms {thr}");
        assert_eq!(
            keep(batched_nms(&f["boxes"], &f["scores"], &f["idxs"], thr).unwrap()),
            keep(f[&format!("batched_nms_keep_thr{tag}")].clone()),
            "batched_nms {thr}"
        );
    }
}

#[test]
fn nms_edge_cases() {
    let empty = Tensor::zeros((0, 4), DType::F32, &Device::Cpu).unwrap();
    let none = Tensor::zeros(0, DType::F32, &Device::Cpu).unwrap();
    assert_eq!(nms(&empty, &none, 0.5).unwrap().dims(), &[0]);
    let b = Tensor::new(&[[0f32, 0., 10., 10.]], &Device::Cpu).unwrap();
    assert!(nms(&b, &Tensor::new(&[1f32, 2.], &Device::Cpu).unwrap(), 0.5).is_err());
}
