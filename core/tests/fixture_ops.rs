//! Parity of the detection ops with torchvision / mmdetection on `../shared/fixtures/ops/`
//! (see its README for every convention). Tolerances: float32 results are compared with the
//! fixture's float32 output within 1e-5 relative to magnitude (the README: f32 and f64 differ by
//! ≤ ~5e-6 on these ops); index outputs must match exactly.

use candle_core::{DType, Device, Tensor};
use densepred_core::ops::iou::{
    bbox_overlaps, box_area, box_iou, complete_box_iou, distance_box_iou, generalized_box_iou,
    OverlapMode,
};
use densepred_core::ops::{batched_nms, nms};
use densepred_testutil::max_rel;
use std::collections::HashMap;

fn fixture(name: &str) -> HashMap<String, Tensor> {
    densepred_testutil::fixture_tensors("ops", name)
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
        (
            "mmdet_bbox_overlaps_iou",
            bbox_overlaps(a, b, OverlapMode::Iou, false, 1e-6).unwrap(),
        ),
        (
            "mmdet_bbox_overlaps_iof",
            bbox_overlaps(a, b, OverlapMode::Iof, false, 1e-6).unwrap(),
        ),
        (
            "mmdet_bbox_overlaps_giou",
            bbox_overlaps(a, b, OverlapMode::Giou, false, 1e-6).unwrap(),
        ),
        (
            "mmdet_bbox_overlaps_iou_aligned",
            bbox_overlaps(
                a,
                &b.narrow(0, 0, 17).unwrap(),
                OverlapMode::Iou,
                true,
                1e-6,
            )
            .unwrap(),
        ),
        (
            "mmdet_bbox_overlaps_giou_aligned",
            bbox_overlaps(
                a,
                &b.narrow(0, 0, 17).unwrap(),
                OverlapMode::Giou,
                true,
                1e-6,
            )
            .unwrap(),
        ),
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
        assert_eq!(
            keep(nms(&f["boxes"], &f["scores"], thr).unwrap()),
            keep(f[&format!("nms_keep_thr{tag}")].clone()),
            "nms {thr}"
        );
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

mod losses {
    use super::*;
    use candle_core::Var;
    use densepred_core::losses::*;

    #[test]
    fn sigmoid_focal_loss_matches_torchvision() {
        let f = fixture("sigmoid_focal_loss.safetensors");
        let x = Var::from_tensor(&f["logits"]).unwrap();
        let el = sigmoid_focal_loss_elementwise(&x, &f["targets"], 2.0, 0.25).unwrap();
        assert!(max_rel(&el, &f["loss_none"]) <= TOL, "loss_none");
        let sum = el.sum_all().unwrap();
        assert!(
            max_rel(&sum.reshape(1).unwrap(), &f["loss_sum"]) <= TOL,
            "loss_sum"
        );
        let g = sum.backward().unwrap();
        let err = max_rel(g.get(&x).unwrap(), &f["grad_logits"]);
        assert!(err <= TOL, "grad {err}");
        // f64 path against the f64 reference, tighter.
        let x64 = Var::from_tensor(&f["logits"].to_dtype(DType::F64).unwrap()).unwrap();
        let s64 = sigmoid_focal_loss_elementwise(&x64, &f["targets"], 2.0, 0.25)
            .unwrap()
            .sum_all()
            .unwrap();
        assert!(max_rel(&s64.reshape(1).unwrap(), &f["loss_sum_f64"]) < 1e-12);
        let g64 = s64.backward().unwrap();
        assert!(max_rel(g64.get(&x64).unwrap(), &f["grad_logits_f64"]) < 1e-12);
    }

    #[test]
    fn focal_loss_from_labels_uses_background_index_and_avg_factor() {
        let f = fixture("sigmoid_focal_loss.safetensors");
        let t: Vec<Vec<f32>> = f["targets"].to_vec2().unwrap();
        // Rows with exactly one 1 become labels; all-zero rows are background (label C = 5).
        let rows: Vec<usize> = (0..t.len())
            .filter(|&i| t[i].iter().sum::<f32>() <= 1.0)
            .collect();
        let labels: Vec<i64> = rows
            .iter()
            .map(|&i| {
                t[i].iter()
                    .position(|&v| v == 1.0)
                    .map(|p| p as i64)
                    .unwrap_or(5)
            })
            .collect();
        let idx = Tensor::new(
            rows.iter()
                .map(|&i| i as u32)
                .collect::<Vec<_>>()
                .as_slice(),
            &Device::Cpu,
        )
        .unwrap();
        let logits = f["logits"].index_select(&idx, 0).unwrap();
        let num_pos = labels.iter().filter(|&&l| l < 5).count() as f64;
        let loss = sigmoid_focal_loss(
            &logits,
            &Tensor::new(labels.as_slice(), &Device::Cpu).unwrap(),
            2.0,
            0.25,
            None,
            Reduction::Mean,
            Some(num_pos),
        )
        .unwrap();
        let want = f["loss_none"]
            .index_select(&idx, 0)
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap() as f64
            / (num_pos + AVG_FACTOR_EPS);
        assert!((loss.to_scalar::<f32>().unwrap() as f64 - want).abs() < 1e-5 * want.max(1.0));
    }

    fn fd(x: &Tensor, g: &Tensor, f: &dyn Fn(&Tensor) -> f64) {
        let base: Vec<f64> = x.flatten_all().unwrap().to_vec1().unwrap();
        let grad: Vec<f64> = g.flatten_all().unwrap().to_vec1().unwrap();
        for i in 0..base.len() {
            let mut p = base.clone();
            p[i] += 1e-6;
            let fp = f(&Tensor::from_vec(p.clone(), x.shape(), x.device()).unwrap());
            p[i] -= 2e-6;
            let fm = f(&Tensor::from_vec(p, x.shape(), x.device()).unwrap());
            let num = (fp - fm) / 2e-6;
            assert!(
                (num - grad[i]).abs() < 1e-6 * grad[i].abs().max(1.0),
                "element {i}: numeric {num} analytic {}",
                grad[i]
            );
        }
    }

    /// Values in [-2, 2).
    fn rand(shape: &[usize], seed: u64) -> Tensor {
        (densepred_testutil::randn(shape, seed, candle_core::DType::F64) * 2.0).unwrap()
    }

    /// Every loss's gradient against central finite differences (f64).
    #[test]
    fn loss_gradients_match_finite_differences() {
        let x = Var::from_tensor(&rand(&[6, 4], 1)).unwrap();
        let t = rand(&[6, 4], 2);
        let w = rand(&[6, 4], 3).abs().unwrap();
        type L = Box<dyn Fn(&Tensor) -> Tensor>;
        let (t1, t2, t3, t4, w1) = (t.clone(), t.clone(), t.clone(), t.clone(), w.clone());
        let probs = ((rand(&[6, 4], 9) + 2.0).unwrap() / 4.0).unwrap();
        let cases: Vec<(&str, L)> = vec![
            (
                "l1",
                Box::new(move |x| l1_loss(x, &t1, Some(&w1), Reduction::Mean, Some(3.0)).unwrap()),
            ),
            (
                "smooth_l1",
                Box::new(move |x| smooth_l1_loss(x, &t2, 0.5, None, Reduction::Sum, None).unwrap()),
            ),
            (
                "bce",
                Box::new(move |x| {
                    binary_cross_entropy_with_logits(x, &probs, None, Reduction::Mean, None)
                        .unwrap()
                }),
            ),
            (
                "focal",
                Box::new(move |x| {
                    sigmoid_focal_loss_elementwise(
                        x,
                        &((&t3 + 2.0).unwrap() / 4.0).unwrap(),
                        2.0,
                        0.25,
                    )
                    .unwrap()
                    .sum_all()
                    .unwrap()
                }),
            ),
            (
                "focal_gamma1.5",
                Box::new(move |x| {
                    sigmoid_focal_loss_elementwise(
                        x,
                        &((&t4 + 2.0).unwrap() / 4.0).unwrap(),
                        1.5,
                        -1.0,
                    )
                    .unwrap()
                    .sum_all()
                    .unwrap()
                }),
            ),
        ];
        for (name, f) in cases {
            let g = f(&x).backward().unwrap();
            let g = g.get(&x).unwrap_or_else(|| panic!("{name}: no gradient"));
            fd(&x, g, &|xp| f(xp).to_scalar::<f64>().unwrap());
        }
        // Cross-entropy with ignore_index and class weights, (N, C, H, W) layout.
        let logits = Var::from_tensor(&rand(&[2, 3, 2, 2], 4)).unwrap();
        let labels =
            Tensor::new(&[[[0i64, 2], [255, 1]], [[1, 1], [2, 255]]], &Device::Cpu).unwrap();
        let cw = Tensor::new(&[1.0f64, 2.0, 0.5], &Device::Cpu).unwrap();
        let ce = |l: &Tensor| {
            cross_entropy(
                l,
                &labels,
                Some(&cw),
                Some(255),
                None,
                Reduction::Mean,
                None,
                true,
            )
            .unwrap()
        };
        let g = ce(&logits).backward().unwrap();
        fd(&logits, g.get(&logits).unwrap(), &|lp| {
            ce(lp).to_scalar::<f64>().unwrap()
        });
        // GIoU loss on boxes (pred = target + perturbation, so boxes stay valid).
        let target = Tensor::new(
            &[[0f64, 0., 10., 10.], [5., 5., 20., 12.], [1., 2., 3., 9.]],
            &Device::Cpu,
        )
        .unwrap();
        let pred =
            Var::from_tensor(&(&target + (rand(&[3, 4], 5) * 0.3).unwrap()).unwrap()).unwrap();
        let gl = |p: &Tensor| giou_loss(p, &target, None, Reduction::Mean, None, 1e-6).unwrap();
        let g = gl(&pred).backward().unwrap();
        fd(&pred, g.get(&pred).unwrap(), &|pp| {
            gl(pp).to_scalar::<f64>().unwrap()
        });
    }

    /// Cross-entropy values from first principles: −log softmax, ignore and class weights.
    #[test]
    fn cross_entropy_conventions() {
        let logits = Tensor::new(
            &[[2.0f64, 0.0, -1.0], [0.5, 0.5, 0.5], [1.0, 3.0, 0.0]],
            &Device::Cpu,
        )
        .unwrap();
        let labels = Tensor::new(&[0i64, 255, 1], &Device::Cpu).unwrap();
        let nll = |row: [f64; 3], k: usize| -> f64 {
            -(row[k].exp() / row.iter().map(|v| v.exp()).sum::<f64>()).ln()
        };
        let (a, c) = (nll([2.0, 0.0, -1.0], 0), nll([1.0, 3.0, 0.0], 1));
        let mean_all = cross_entropy(
            &logits,
            &labels,
            None,
            Some(255),
            None,
            Reduction::Mean,
            None,
            false,
        )
        .unwrap()
        .to_scalar::<f64>()
        .unwrap();
        assert!(
            (mean_all - (a + c) / 3.0).abs() < 1e-12,
            "ignored elements count in the mean by default"
        );
        let mean_valid = cross_entropy(
            &logits,
            &labels,
            None,
            Some(255),
            None,
            Reduction::Mean,
            None,
            true,
        )
        .unwrap()
        .to_scalar::<f64>()
        .unwrap();
        // avg_non_ignore becomes an avg_factor, which mmdet divides by with float32 eps added.
        assert!((mean_valid - (a + c) / (2.0 + AVG_FACTOR_EPS)).abs() < 1e-12);
        let cw = Tensor::new(&[2.0f64, 3.0, 1.0], &Device::Cpu).unwrap();
        let s = cross_entropy(
            &logits,
            &labels,
            Some(&cw),
            Some(255),
            None,
            Reduction::Sum,
            None,
            false,
        )
        .unwrap()
        .to_scalar::<f64>()
        .unwrap();
        assert!((s - (2.0 * a + 3.0 * c)).abs() < 1e-12);
        let bad = Tensor::new(&[0i64, 7, 1], &Device::Cpu).unwrap();
        assert!(cross_entropy(
            &logits,
            &bad,
            None,
            Some(255),
            None,
            Reduction::Mean,
            None,
            false
        )
        .is_err());
        assert!(weight_reduce_loss(&logits, None, Reduction::Sum, Some(2.0)).is_err());
    }
}

mod roi {
    use super::*;
    use candle_core::Var;
    use densepred_core::ops::{map_roi_levels, roi_align, RoiAlignParams};

    /// Forward and backward against torchvision for strides 4 and 16, sampling 0 (adaptive) and 2,
    /// outputs 7 and 14; the fixture's f32/f64 spread is ~5e-6 (outputs) and ~2e-5 (gradients),
    /// so the gate is 2e-5 relative on outputs and 5e-5 on gradients.
    #[test]
    fn roi_align_matches_torchvision() {
        for s in [4usize, 16] {
            let f = fixture(&format!("roi_align_s{s}.safetensors"));
            let feat = Var::from_tensor(&f[&format!("s{s}_features")]).unwrap();
            let rois = &f[&format!("s{s}_rois")];
            for sr in [0usize, 2] {
                for o in [7usize, 14] {
                    let key = format!("s{s}_sr{sr}_o{o}");
                    let p = RoiAlignParams {
                        output_size: (o, o),
                        spatial_scale: 1.0 / s as f32,
                        sampling_ratio: sr,
                        aligned: true,
                    };
                    let out = roi_align(&feat, rois, p).unwrap();
                    let e = max_rel(&out, &f[&format!("{key}_output")]);
                    assert!(e <= 2e-5, "{key} output {e}");
                    let up = &f[&format!("{key}_upstream_grad")];
                    let g = densepred_testutil::grads_of_dot(&out, &up);
                    let e = max_rel(g.get(&feat).unwrap(), &f[&format!("{key}_grad_features")]);
                    assert!(e <= 5e-5, "{key} grad {e}");
                }
            }
        }
    }

    #[test]
    fn roi_levels_and_errors() {
        // level = floor(log2(sqrt(area) / 56 + 1e-6)): sqrt(area) 56 → log2(1) = 0 → 0; 112 → 1;
        // 224 → 2; 448 → 3; 2000 → 5, clamped to 3; 10 → negative, clamped to 0.
        let rois = Tensor::new(
            &[
                [0f32, 0., 0., 56., 56.],
                [0., 0., 0., 112., 112.],
                [0., 0., 0., 224., 224.],
                [0., 0., 0., 448., 448.],
                [0., 0., 0., 2000., 2000.],
                [0., 0., 0., 10., 10.],
            ],
            &Device::Cpu,
        )
        .unwrap();
        assert_eq!(
            map_roi_levels(&rois, 4, 56.0).unwrap(),
            vec![0, 1, 2, 3, 3, 0]
        );
        let feat = Tensor::zeros((1, 2, 8, 8), DType::F32, &Device::Cpu).unwrap();
        let p = RoiAlignParams {
            output_size: (2, 2),
            spatial_scale: 1.0,
            sampling_ratio: 0,
            aligned: true,
        };
        let bad = Tensor::new(&[[1f32, 0., 0., 4., 4.]], &Device::Cpu).unwrap();
        assert!(roi_align(&feat, &bad, p)
            .unwrap_err()
            .to_string()
            .contains("batch index"));
    }
}

mod roi_fd {
    use super::*;
    use candle_core::Var;
    use densepred_core::ops::{roi_align, RoiAlignParams};

    /// The backward pass against finite differences. RoIAlign is linear in the features, so the
    /// central difference with a unit step is the exact derivative up to f32 rounding (1e-4).
    #[test]
    fn roi_align_backward_matches_finite_differences() {
        let f = fixture("roi_align_s4.safetensors");
        let feat = Var::from_tensor(&f["s4_features"]).unwrap();
        let rois = &f["s4_rois"];
        let p = RoiAlignParams {
            output_size: (7, 7),
            spatial_scale: 0.25,
            sampling_ratio: 0,
            aligned: false,
        };
        let r = &f["s4_sr0_o7_upstream_grad"];
        let loss = |x: &Tensor| {
            (roi_align(x, rois, p).unwrap() * r)
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap() as f64
        };
        let g: Vec<f32> = {
            let out = roi_align(&feat, rois, p).unwrap();
            let gs = densepred_testutil::grads_of_dot(&out, &r);
            gs.get(&feat)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap()
        };
        let base: Vec<f32> = feat.flatten_all().unwrap().to_vec1().unwrap();
        let mut nonzero = 0;
        for i in (0..base.len()).step_by(7) {
            let mut v = base.clone();
            v[i] += 1.0;
            let fp = loss(&Tensor::from_vec(v.clone(), feat.shape(), &Device::Cpu).unwrap());
            v[i] -= 2.0;
            let fm = loss(&Tensor::from_vec(v, feat.shape(), &Device::Cpu).unwrap());
            let num = (fp - fm) / 2.0;
            assert!(
                (num - g[i] as f64).abs() < 1e-4 * num.abs().max(1.0),
                "element {i}: numeric {num}, analytic {}",
                g[i]
            );
            nonzero += (num.abs() > 1e-6) as usize;
        }
        assert!(nonzero > 20, "the check covers sampled pixels");
    }
}

#[test]
fn paste_masks_matches_mmdet() {
    let f = fixture("paste_masks.safetensors");
    let got = densepred_core::ops::paste_masks(&f["masks"], &f["boxes"], 60, 80).unwrap();
    let err = max_rel(&got, &f["mmdet_do_paste_mask"]);
    assert!(err <= 1e-5, "{err}");
    // Binarised at 0.5 the same pixels are set (f32 rounding could only flip values within 1e-5 of
    // the threshold; count those as agreeing).
    let a: Vec<f32> = got.flatten_all().unwrap().to_vec1().unwrap();
    let b: Vec<f32> = f["mmdet_do_paste_mask"]
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    assert_eq!(a.len(), b.len(), "pasted mask sizes");
    let flips = a
        .iter()
        .zip(&b)
        .filter(|(x, y)| (**x >= 0.5) != (**y >= 0.5) && (**y - 0.5).abs() > 1e-5)
        .count();
    assert_eq!(flips, 0);
}

#[test]
fn filter_nms_applies_score_threshold_top_k_and_max_num() {
    use densepred_core::ops::filter_nms;
    let f = fixture("nms.safetensors");
    let (b, s, c) = (&f["boxes"], &f["scores"], &f["idxs"]);
    // Without filtering it is batched NMS.
    let all = filter_nms(b, s, c, f32::NEG_INFINITY, None, 0.5, None).unwrap();
    assert_eq!(
        keep(all.clone()),
        keep(f["batched_nms_keep_thr0p5"].clone())
    );
    // A score threshold keeps only strictly higher scores, in the same order.
    let sv: Vec<f32> = s.to_vec1().unwrap();
    let thr = 0.5f32;
    let want: Vec<i64> = keep(all.clone())
        .into_iter()
        .filter(|&i| sv[i as usize] > thr)
        .collect();
    let got = keep(filter_nms(b, s, c, thr, None, 0.5, None).unwrap());
    assert!(got.iter().all(|&i| sv[i as usize] > thr));
    assert!(
        want.iter().all(|i| got.contains(i)),
        "every kept box above the threshold stays kept"
    );
    // max_num truncates the best-first list.
    assert_eq!(
        keep(filter_nms(b, s, c, f32::NEG_INFINITY, None, 0.5, Some(5)).unwrap()),
        keep(all).into_iter().take(5).collect::<Vec<_>>()
    );
    // pre_top_k = 1 keeps only the single best box.
    let best = (0..sv.len())
        .max_by(|&i, &j| sv[i].total_cmp(&sv[j]).then(j.cmp(&i)))
        .unwrap() as i64;
    assert_eq!(
        keep(filter_nms(b, s, c, f32::NEG_INFINITY, Some(1), 0.5, None).unwrap()),
        vec![best]
    );
}

#[test]
fn boxes_conversions_clip_scale_flip() {
    use densepred_core::structures::Boxes;
    let b = Boxes::new(
        Tensor::new(&[[10f32, 20., 30., 60.], [-5., -5., 5., 5.]], &Device::Cpu).unwrap(),
    )
    .unwrap();
    assert_eq!(b.len(), 2);
    assert_eq!(
        b.area().unwrap().to_vec1::<f32>().unwrap(),
        vec![800., 100.]
    );
    let xywh = b.to_xywh().unwrap();
    assert_eq!(xywh.to_vec2::<f32>().unwrap()[0], vec![10., 20., 20., 40.]);
    assert_eq!(
        Boxes::from_xywh(&xywh)
            .unwrap()
            .tensor()
            .to_vec2::<f32>()
            .unwrap(),
        b.tensor().to_vec2::<f32>().unwrap()
    );
    let c = b.to_cxcywh().unwrap();
    assert_eq!(c.to_vec2::<f32>().unwrap()[0], vec![20., 40., 20., 40.]);
    assert_eq!(
        Boxes::from_cxcywh(&c)
            .unwrap()
            .tensor()
            .to_vec2::<f32>()
            .unwrap(),
        b.tensor().to_vec2::<f32>().unwrap()
    );
    assert_eq!(
        b.clip(50.0, 25.0)
            .unwrap()
            .tensor()
            .to_vec2::<f32>()
            .unwrap(),
        vec![vec![10., 20., 25., 50.], vec![0., 0., 5., 5.]]
    );
    assert_eq!(
        b.scale(2.0, 0.5)
            .unwrap()
            .tensor()
            .to_vec2::<f32>()
            .unwrap()[0],
        vec![20., 10., 60., 30.]
    );
    assert_eq!(
        b.flip_horizontal(100.0)
            .unwrap()
            .tensor()
            .to_vec2::<f32>()
            .unwrap()[0],
        vec![70., 20., 90., 60.]
    );
    assert_eq!(
        b.flip_vertical(100.0)
            .unwrap()
            .tensor()
            .to_vec2::<f32>()
            .unwrap()[0],
        vec![10., 40., 30., 80.]
    );
    assert!(Boxes::new(Tensor::zeros((3, 5), DType::F32, &Device::Cpu).unwrap()).is_err());
}

#[test]
fn mask_cross_entropy_picks_the_class_channel() {
    use densepred_core::losses::{binary_cross_entropy_with_logits, mask_cross_entropy, Reduction};
    let pred = Tensor::new(
        &[
            [[[1f64, -1.], [0.5, 2.]], [[-3., 0.], [1., 1.]]],
            [[[0., 0.], [0., 0.]], [[2., -2.], [3., -1.]]],
        ],
        &Device::Cpu,
    )
    .unwrap();
    let target = Tensor::new(
        &[[[1f64, 0.], [1., 1.]], [[0., 1.], [1., 0.]]],
        &Device::Cpu,
    )
    .unwrap();
    let labels = Tensor::new(&[1u32, 0], &Device::Cpu).unwrap();
    let got = mask_cross_entropy(&pred, &target, &labels, None)
        .unwrap()
        .to_scalar::<f64>()
        .unwrap();
    // RoI 0 uses channel 1, RoI 1 channel 0.
    let sel = Tensor::stack(
        &[
            pred.get(0).unwrap().get(1).unwrap(),
            pred.get(1).unwrap().get(0).unwrap(),
        ],
        0,
    )
    .unwrap();
    let want = binary_cross_entropy_with_logits(&sel, &target, None, Reduction::Mean, None)
        .unwrap()
        .to_scalar::<f64>()
        .unwrap();
    assert!((got - want).abs() < 1e-12);
    // BCE with logits from first principles at one element: x = 2, t = 1 → log(1 + e^-2).
    let one = binary_cross_entropy_with_logits(
        &Tensor::new(&[2f64], &Device::Cpu).unwrap(),
        &Tensor::new(&[1f64], &Device::Cpu).unwrap(),
        None,
        Reduction::Sum,
        None,
    )
    .unwrap();
    assert!((one.to_scalar::<f64>().unwrap() - (1.0 + (-2f64).exp()).ln()).abs() < 1e-12);
}
