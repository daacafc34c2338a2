//! mmdetection task modules against `../shared/fixtures/ops/` (box coder, anchors, ATSS) and
//! against the rules that define them (MaxIoU assigner, samplers).
//!
//! Tolerance for float outputs: 1e-5 relative to max(1, |value|) — the fixture README gives an
//! f32/f64 spread of ≤ ~5e-6 on these ops; integer outputs must match exactly.

use candle_core::{DType, Device, Tensor};
use densepred_heads::task::assigner::{AtssAssigner, MaxIoUAssigner, NegIouThr};
use densepred_heads::task::coder::{DeltaXYWHBBoxCoder, WH_RATIO_CLIP};
use densepred_heads::task::prior_generator::AnchorGenerator;
use densepred_heads::task::sampler::{pseudo_sample, RandomSampler};
use densepred_testutil::max_rel;
use rand::SeedableRng;
use std::collections::HashMap;

fn fixture(name: &str) -> HashMap<String, Tensor> {
    densepred_testutil::fixture_tensors("ops", name)
}

#[test]
fn delta_xywh_coder_matches_mmdet() {
    let f = fixture("box_coder.safetensors");
    for (tag, stds) in [("rcnn", [0.1, 0.1, 0.2, 0.2]), ("unit", [1.0; 4])] {
        let c = DeltaXYWHBBoxCoder {
            target_stds: stds,
            ..Default::default()
        };
        let enc = c.encode(&f["proposals"], &f["gt_boxes"]).unwrap();
        assert!(
            max_rel(&enc, &f[&format!("mmdet_{tag}_encode")]) < 1e-5,
            "{tag} encode"
        );
        let clip = c
            .decode(
                &f["proposals"],
                &f["deltas_pred"],
                Some((200.0, 300.0)),
                WH_RATIO_CLIP,
            )
            .unwrap();
        assert!(
            max_rel(&clip, &f[&format!("mmdet_{tag}_decode_clip")]) < 1e-5,
            "{tag} decode clip"
        );
        let noclip = c
            .decode(&f["proposals"], &f["deltas_pred"], None, WH_RATIO_CLIP)
            .unwrap();
        assert!(
            max_rel(&noclip, &f[&format!("mmdet_{tag}_decode_noclip")]) < 1e-5,
            "{tag} decode"
        );
    }
}

fn retina_anchors() -> AnchorGenerator {
    toml::from_str(
        "strides = [8, 16, 32, 64, 128]\nratios = [0.5, 1.0, 2.0]\noctave_base_scale = 4\nscales_per_octave = 3\n",
    )
    .unwrap()
}

#[test]
fn anchor_generator_matches_mmdet_retinanet() {
    let f = fixture("anchors_mmdet_retinanet.safetensors");
    let g = retina_anchors();
    for (l, base) in g.base_anchors().unwrap().iter().enumerate() {
        let t = boxes(base);
        assert!(
            max_rel(&t, &f[&format!("base_anchors_level{l}")]) < 1e-6,
            "base level {l}"
        );
    }
    for input in ["in64x96", "in256x384"] {
        let sizes: Vec<Vec<i64>> = f[&format!("{input}_featmap_sizes")].to_vec2().unwrap();
        let sizes: Vec<(usize, usize)> = sizes
            .iter()
            .map(|r| (r[0] as usize, r[1] as usize))
            .collect();
        let (h, w) = if input == "in64x96" {
            (64, 96)
        } else {
            (256, 384)
        };
        let priors = g.grid_priors(&sizes, &Device::Cpu).unwrap();
        let flags = g.valid_flags(&sizes, (h, w), &Device::Cpu).unwrap();
        for l in 0..5 {
            assert!(
                max_rel(&priors[l], &f[&format!("{input}_level{l}")]) < 1e-6,
                "{input} level {l}"
            );
            let want: Vec<u8> = f[&format!("{input}_level{l}_valid_flags")]
                .to_vec1()
                .unwrap();
            assert_eq!(flags[l].to_vec1::<u8>().unwrap(), want, "{input} flags {l}");
        }
    }
}

#[test]
fn atss_assigner_matches_mmdet() {
    let f = fixture("atss_assigner.safetensors");
    let n: Vec<usize> = f["num_level_priors"]
        .to_vec1::<i64>()
        .unwrap()
        .iter()
        .map(|&v| v as usize)
        .collect();
    let labels: Vec<i64> = f["gt_labels"].to_vec1().unwrap();
    let a = AtssAssigner { topk: 9 };
    let r = a
        .assign(&f["priors"], &n, &f["gt_bboxes"], &labels)
        .unwrap();
    assert_eq!(r.gt_inds, f["assigned_gt_inds"].to_vec1::<i64>().unwrap());
    assert_eq!(r.labels, f["assigned_labels"].to_vec1::<i64>().unwrap());
    let mo = Tensor::new(r.max_overlaps.as_slice(), &Device::Cpu).unwrap();
    assert!(max_rel(&mo, &f["max_overlaps"]) < 1e-6);
    assert!(
        r.gt_inds.iter().any(|&g| g > 0),
        "the fixture has positives"
    );
    let empty = a
        .assign(
            &f["priors"],
            &n,
            &Tensor::zeros((0, 4), DType::F32, &Device::Cpu).unwrap(),
            &[],
        )
        .unwrap();
    assert_eq!(
        empty.gt_inds,
        f["empty_assigned_gt_inds"].to_vec1::<i64>().unwrap()
    );
    assert_eq!(
        empty.labels,
        f["empty_assigned_labels"].to_vec1::<i64>().unwrap()
    );
    assert_eq!(
        empty.max_overlaps,
        f["empty_max_overlaps"].to_vec1::<f32>().unwrap()
    );
}

fn boxes(v: &[[f32; 4]]) -> Tensor {
    Tensor::from_vec(v.concat(), (v.len(), 4), &Device::Cpu).unwrap()
}

/// RetinaNet's assigner on constructed cases: IoU 1 → positive, IoU 0 → negative, IoU in
/// [0.4, 0.5) → ignored, and a gt whose best prior has IoU < 0.5 still gets it (low-quality match).
#[test]
fn max_iou_assigner_rules() {
    let a = MaxIoUAssigner {
        pos_iou_thr: 0.5,
        neg_iou_thr: NegIouThr::Below(0.4),
        min_pos_iou: 0.0,
        gt_max_assign_all: true,
        ignore_iof_thr: -1.0,
        ignore_wrt_candidates: true,
        match_low_quality: true,
    };
    let gt = boxes(&[[0., 0., 10., 10.], [100., 100., 110., 110.]]);
    // prior 0 = gt 0; prior 1 overlaps nothing; prior 2 and prior 3 overlap gt 0 / gt 1 with the
    // IoUs computed below.
    let p = boxes(&[
        [0., 0., 10., 10.],
        [50., 50., 60., 60.],
        [0., 0., 10., 13.],
        [100., 100., 120., 110.],
    ]);
    let iou2 = 100.0 / 130.0; // prior 2: inter 100, union 130 → 0.77: positive
    let iou3 = 100.0 / 200.0; // prior 3: inter 100, union 200 → 0.5: positive (>=)
    assert!(iou2 >= 0.5 && iou3 >= 0.5);
    let r = a.assign(&p, &gt, &[7, 9], None).unwrap();
    assert_eq!(r.gt_inds, vec![1, 0, 1, 2]);
    assert_eq!(r.labels, vec![7, -1, 7, 9]);
    // Ignored band and low-quality match: gt 1's only overlapping prior has IoU 100 / 222.2 = 0.45.
    let p = boxes(&[[0., 0., 10., 10.], [100., 100., 110., 122.222_22]]);
    let r = a.assign(&p, &gt, &[7, 9], None).unwrap();
    assert_eq!(
        r.gt_inds,
        vec![1, 2],
        "low-quality match gives gt 1 its best prior"
    );
    let strict = MaxIoUAssigner {
        match_low_quality: false,
        ..a.clone()
    };
    let r = strict.assign(&p, &gt, &[7, 9], None).unwrap();
    assert_eq!(r.gt_inds, vec![1, -1], "IoU 0.45 is in the ignored band");
    // Crowd boxes: a prior mostly inside an ignore region is ignored.
    let crowd = boxes(&[[40., 40., 70., 70.]]);
    let ig = MaxIoUAssigner {
        ignore_iof_thr: 0.5,
        ..strict
    };
    let p = boxes(&[[50., 50., 60., 60.], [200., 200., 210., 210.]]);
    let r = ig.assign(&p, &gt, &[7, 9], Some(&crowd)).unwrap();
    assert_eq!(r.gt_inds, vec![-1, 0]);
    // No gts: all negative.
    let r = a
        .assign(
            &p,
            &Tensor::zeros((0, 4), DType::F32, &Device::Cpu).unwrap(),
            &[],
            None,
        )
        .unwrap();
    assert_eq!(r.gt_inds, vec![0, 0]);
}

#[test]
fn samplers() {
    let mut a = densepred_heads::task::assigner::AssignResult {
        num_gts: 2,
        gt_inds: (0..1000)
            .map(|i| {
                if i % 10 == 0 {
                    1 + (i / 10) % 2
                } else if i % 10 == 1 {
                    -1
                } else {
                    0
                }
            })
            .collect(),
        max_overlaps: vec![0.0; 1000],
        labels: vec![-1; 1000],
    };
    let p = pseudo_sample(&a);
    assert_eq!((p.pos_inds.len(), p.neg_inds.len()), (100, 800));
    assert_eq!(p.pos_assigned_gt_inds.len(), p.pos_inds.len());
    assert!(p
        .pos_inds
        .iter()
        .zip(&p.pos_assigned_gt_inds)
        .all(|(&i, &g)| a.gt_inds[i] == g as i64 + 1));
    let s = RandomSampler {
        num: 512,
        pos_fraction: 0.25,
        neg_pos_ub: -1.0,
        add_gt_as_proposals: true,
    };
    let mut rng = rand::rngs::StdRng::seed_from_u64(0);
    let r = s.sample(&mut a, &[3, 4], &mut rng);
    assert_eq!(r.num_gts_added, 2);
    assert_eq!(a.gt_inds.len(), 1002);
    assert_eq!(r.pos_inds.len(), 102.min(128));
    assert!(
        r.pos_inds.contains(&0) && r.pos_inds.contains(&1),
        "prepended gts are positives"
    );
    assert_eq!(r.neg_inds.len(), 512 - r.pos_inds.len());
    assert!(r.neg_inds.iter().all(|&i| a.gt_inds[i] == 0));
    let mut uniq = r.neg_inds.clone();
    uniq.sort();
    uniq.dedup();
    assert_eq!(uniq.len(), r.neg_inds.len());
    let capped = RandomSampler {
        neg_pos_ub: 3.0,
        add_gt_as_proposals: false,
        ..s
    };
    let r = capped.sample(&mut a.clone(), &[3, 4], &mut rng);
    assert_eq!(r.neg_inds.len(), 3 * r.pos_inds.len());
}
