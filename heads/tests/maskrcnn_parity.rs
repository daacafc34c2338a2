//! Mask R-CNN's RPNHead and StandardRoIHead against mmdetection 3.3
//! (`../shared/fixtures/models/maskrcnn_{rpn,roi_loss,roi_predict}`): forward outputs, anchors,
//! assignment, targets (with the fixture's stored random samples), per-level losses, their
//! gradients w.r.t. the raw outputs, proposals, RoI features, mask targets and final detections
//! with masks.
//!
//! Tolerances: forward 1e-5 abs (sidecar f32-vs-f64 spread ≤ 7e-6); losses 1e-5 relative;
//! gradients 1e-4 of the largest gradient (f32 summation order); proposals and detections: same
//! count, order and labels (the fixture guarantees margins at every cut), scores 1e-5 abs, boxes
//! 1e-4 relative; mask pixels exact except those the fixture lists within 1e-4 of the threshold.

mod common;

use candle_core::{DType, Device, Tensor};
use common::*;
use densepred_core::params::SeededVarMap;
use densepred_heads::dense::rpn_head::keep_samples;
use densepred_heads::dense::{RpnHead, RpnHeadConfig, RpnProposalConfig, RpnTrainConfig};

fn rpn_cfg(f: &Fixture) -> (RpnHeadConfig, RpnTrainConfig, RpnProposalConfig) {
    let mut c = f.meta["config"]["rpn_head"].clone();
    let o = c.as_object_mut().unwrap();
    o.remove("type");
    let train = serde_json::from_value(o.remove("train_cfg").unwrap()).unwrap();
    let test = serde_json::from_value(o.remove("test_cfg").unwrap()).unwrap();
    (serde_json::from_value(c).unwrap(), train, test)
}

fn inds(f: &Fixture, key: &str) -> Vec<usize> {
    f.t[key]
        .to_vec1::<i64>()
        .unwrap()
        .into_iter()
        .map(|v| v as usize)
        .collect()
}

#[test]
fn rpn_head_matches_mmdet() {
    let f = fixture("maskrcnn_rpn");
    let (cfg, train, test) = rpn_cfg(&f);
    let vars = SeededVarMap::new(0);
    let head = RpnHead::new(vars.var_builder(DType::F32, &Device::Cpu), &cfg).unwrap();
    load_prefix(&f, &vars, "rpn_head.");
    let feats: Vec<Tensor> = (0..LEVELS)
        .map(|l| f.t[&format!("input.feats.{l}")].clone())
        .collect();
    check_forward(&f, &head.forward(&feats).unwrap());

    let (outs, out_vars) = fixture_outputs(&f, false);
    let anchors = head.anchors(&outs).unwrap();
    for l in 0..LEVELS {
        assert_eq!(
            max_abs(&anchors.levels[l], &f.t[&format!("anchors.{l}")]),
            0.0,
            "anchors level {l}"
        );
    }
    // Assignment, then the fixture's stored random samples instead of our own draw.
    let mut targets = head.assign(&anchors, &metas(&f), &gts(&f), &train).unwrap();
    let labels = f.t["target.labels"].to_vec2::<i64>().unwrap();
    let weights = f.t["target.label_weights"].to_vec2::<f32>().unwrap();
    assert_eq!(targets.len(), 2);
    for (i, t) in targets.iter_mut().enumerate() {
        assert_eq!(
            t.assign.gt_inds,
            fixture_gt_inds(&f, i),
            "image {i} gt_inds"
        );
        let pos = inds(&f, &format!("sample.{i}.pos_inds"));
        let neg = inds(&f, &format!("sample.{i}.neg_inds"));
        // The stored samples must be drawn from our candidates.
        let (cp, cn) = densepred_heads::dense::rpn_head::candidates(t);
        assert!(pos.iter().all(|p| cp.contains(p)), "image {i}: positives");
        assert!(
            neg.iter().all(|n| cn.binary_search(n).is_ok()),
            "image {i}: negatives"
        );
        keep_samples(t, &pos, &neg);
        assert_eq!(t.labels, labels[i], "image {i} labels");
        assert_eq!(t.label_weights, weights[i], "image {i} label weights");
        assert_eq!(t.pos_inds, pos, "image {i} positives");
    }
    check_losses(
        &f,
        &head.loss_from_targets(&outs, &anchors, &targets).unwrap(),
        &out_vars,
    );

    let props = head.predict_by_feat(&outs, &metas(&f), &test).unwrap();
    assert_eq!(props.len(), 2);
    for (i, p) in props.iter().enumerate() {
        let wb = f.t[&format!("proposals.{i}.bboxes")]
            .to_vec2::<f32>()
            .unwrap();
        let ws = f.t[&format!("proposals.{i}.scores")]
            .to_vec1::<f32>()
            .unwrap();
        assert_eq!(p.scores.len(), ws.len(), "image {i}: number of proposals");
        assert_eq!(p.bboxes.len(), wb.len());
        for k in 0..ws.len() {
            assert!(
                (p.scores[k] - ws[k]).abs() <= 1e-5,
                "image {i} proposal {k} score"
            );
            for c in 0..4 {
                assert!(
                    (p.bboxes[k][c] - wb[k][c]).abs() <= 1e-4 * wb[k][c].abs().max(1.0),
                    "image {i} proposal {k}: {:?} vs {:?}",
                    p.bboxes[k],
                    wb[k]
                );
            }
        }
    }
}

fn roi_cfg(
    f: &Fixture,
) -> (
    densepred_heads::roi::RoIHeadConfig,
    densepred_heads::roi::RcnnTrainConfig,
    densepred_heads::roi::RcnnTestConfig,
) {
    let mut c = f.meta["config"]["roi_head"].clone();
    let o = c.as_object_mut().unwrap();
    let train = serde_json::from_value(o.remove("train_cfg").unwrap()).unwrap();
    let test = serde_json::from_value(o.remove("test_cfg").unwrap()).unwrap();
    (serde_json::from_value(c).unwrap(), train, test)
}

fn roi_head(f: &Fixture) -> densepred_heads::roi::StandardRoIHead {
    let (cfg, _, _) = roi_cfg(f);
    let vars = SeededVarMap::new(0);
    let head = densepred_heads::roi::StandardRoIHead::new(
        vars.var_builder(DType::F32, &Device::Cpu),
        &cfg,
    )
    .unwrap();
    load_prefix(f, &vars, "roi_head.");
    head
}

fn roi_feats(f: &Fixture) -> Vec<Tensor> {
    (0..4)
        .map(|l| f.t[&format!("input.feats.{l}")].clone())
        .collect()
}

fn boxes(f: &Fixture, key: &str) -> Vec<[f32; 4]> {
    f.t[key]
        .to_vec2::<f32>()
        .unwrap()
        .into_iter()
        .map(|r| [r[0], r[1], r[2], r[3]])
        .collect()
}

fn assert_close(got: &Tensor, want: &Tensor, tol: f64, what: &str) {
    assert_eq!(got.dims(), want.dims(), "{what}: shape");
    let e = max_abs(got, want);
    assert!(e <= tol, "{what}: max abs error {e} > {tol}");
}

#[test]
fn roi_head_loss_matches_mmdet() {
    let f = fixture("maskrcnn_roi_loss");
    let (_, train, _) = roi_cfg(&f);
    let head = roi_head(&f);
    let feats = roi_feats(&f);
    let props: Vec<Vec<[f32; 4]>> = (0..2)
        .map(|i| boxes(&f, &format!("proposals.{i}.bboxes")))
        .collect();
    let gts = gts(&f);
    // Every candidate fits the sampler's quotas, so the draw is deterministic (see README).
    let mut rng = <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(0);
    let samples = head.sample(&props, &gts, &train, &mut rng).unwrap();
    assert_eq!(samples.len(), 2);
    for (i, s) in samples.iter().enumerate() {
        // The stored assignment is over the proposals, before the sampler prepends the GTs.
        let added = s.sampling.num_gts_added;
        assert_eq!(
            added,
            gts[i].bboxes.len(),
            "image {i}: GTs added as proposals"
        );
        assert_eq!(
            s.assign.gt_inds[added..],
            f.t[&format!("assign.{i}.gt_inds")]
                .to_vec1::<i64>()
                .unwrap()[..],
            "image {i} gt_inds"
        );
        assert_eq!(
            s.sampling.pos_inds,
            inds(&f, &format!("sample.{i}.pos_inds")),
            "image {i} pos"
        );
        assert_eq!(
            s.sampling.neg_inds,
            inds(&f, &format!("sample.{i}.neg_inds")),
            "image {i} neg"
        );
        assert_eq!(
            s.pos_gt_inds,
            inds(&f, &format!("sample.{i}.pos_assigned_gt_inds")),
            "image {i} assigned gts"
        );
    }
    let rows: Vec<[f32; 4]> = samples.iter().flat_map(|s| s.boxes.clone()).collect();
    let want_rois = f.t["sampled_rois"].to_vec2::<f32>().unwrap();
    assert_eq!(rows.len(), want_rois.len(), "number of sampled RoIs");
    for (k, (g, w)) in rows.iter().zip(&want_rois).enumerate() {
        assert_eq!(g[..], w[1..], "sampled RoI {k}");
    }
    // Mask targets, image by image (positives in order).
    let mut targets = Vec::new();
    for (s, g) in samples.iter().zip(&gts) {
        targets.push(
            densepred_heads::roi::standard_roi_head::mask_targets(
                &s.boxes[..s.num_pos],
                &s.pos_gt_inds,
                g.masks.as_ref().unwrap(),
                train.mask_size,
            )
            .unwrap(),
        );
    }
    let t = Tensor::cat(&targets, 0).unwrap();
    assert_close(&t, &f.t["target.mask_targets"], 0.0, "mask targets");

    let (losses, outs) = head
        .loss_from_samples(&feats, &samples, &gts, &train)
        .unwrap();
    assert_close(&outs.cls_score, &f.t["output.cls_score"], 1e-5, "cls_score");
    assert_close(&outs.bbox_pred, &f.t["output.bbox_pred"], 1e-5, "bbox_pred");
    let mp = outs.mask_preds.as_ref().unwrap();
    assert_close(mp, &f.t["output.mask_preds"], 1e-5, "mask_preds");
    let want = &f.meta["losses"];
    let mut total: Option<Tensor> = None;
    assert_eq!(losses.losses.len(), 3, "loss_cls, loss_bbox, loss_mask");
    for (name, v) in &losses.losses {
        let w = want[name].as_f64().unwrap();
        let g = scalar(v) as f64;
        assert!((g - w).abs() <= 1e-5 * w.abs(), "{name}: {g} vs {w}");
        total = Some(match total {
            None => v.clone(),
            Some(t) => (t + v).unwrap(),
        });
    }
    let acc = want["acc"].as_f64().unwrap();
    assert!(
        (losses.acc as f64 - acc).abs() <= 1e-4,
        "acc {} vs {acc}",
        losses.acc
    );
    let total = total.unwrap();
    let want_total = f.meta["loss_total"].as_f64().unwrap();
    assert!(
        (scalar(&total) as f64 - want_total).abs() <= 1e-5 * want_total,
        "total"
    );

    // Gradients w.r.t. the raw outputs: the losses again, on variables holding mmdet's outputs.
    let vars: Vec<(&str, candle_core::Var)> = ["cls_score", "bbox_pred", "mask_preds"]
        .into_iter()
        .map(|n| {
            (
                n,
                candle_core::Var::from_tensor(&f.t[&format!("output.{n}")]).unwrap(),
            )
        })
        .collect();
    let outs = densepred_heads::roi::standard_roi_head::RoiOutputs {
        cls_score: vars[0].1.as_tensor().clone(),
        bbox_pred: vars[1].1.as_tensor().clone(),
        mask_preds: Some(vars[2].1.as_tensor().clone()),
    };
    let l = head.loss_by_outputs(&outs, &samples, &gts, &train).unwrap();
    let mut it = l.losses.iter().map(|(_, t)| t.clone());
    let first = it.next().unwrap();
    let total = it.fold(first, |a, b| (a + b).unwrap());
    assert!(
        (scalar(&total) as f64 - want_total).abs() <= 1e-5 * want_total,
        "total on mmdet outputs"
    );
    let grads = total.backward().unwrap();
    for (name, v) in &vars {
        let want = &f.t[&format!("grad.{name}")];
        let scale = densepred_testutil::max_abs_value(want).max(1e-12);
        let got = grads.get(v.as_tensor()).expect("gradient of a head output");
        let e = max_abs(got, want);
        assert!(e <= 1e-4 * scale, "grad {name}: {e} (max |grad| {scale})");
    }
}

#[test]
fn roi_head_predict_matches_mmdet() {
    let f = fixture("maskrcnn_roi_predict");
    let (_, _, test) = roi_cfg(&f);
    let head = roi_head(&f);
    let feats = roi_feats(&f);
    let props: Vec<Vec<[f32; 4]>> = (0..2)
        .map(|i| boxes(&f, &format!("proposals.{i}.bboxes")))
        .collect();
    let rois = densepred_heads::roi::bbox2roi(&props, &Device::Cpu).unwrap();
    assert_close(&rois, &f.t["rois"], 0.0, "rois");
    let mut ex_cfg = f.meta["config"]["roi_head"]["bbox_roi_extractor"].clone();
    ex_cfg.as_object_mut().unwrap().remove("type");
    let ex =
        densepred_heads::roi::SingleRoIExtractor::new(&serde_json::from_value(ex_cfg).unwrap())
            .unwrap();
    let lv: Vec<i64> = ex
        .levels(&rois)
        .unwrap()
        .into_iter()
        .map(|l| l as i64)
        .collect();
    assert_eq!(
        lv,
        f.t["roi_levels"].to_vec1::<i64>().unwrap(),
        "roi levels"
    );
    let extra: Vec<i64> = ex
        .levels(&f.t["extra.map_levels.rois"])
        .unwrap()
        .into_iter()
        .map(|l| l as i64)
        .collect();
    assert_eq!(
        extra,
        f.t["extra.map_levels.levels"].to_vec1::<i64>().unwrap(),
        "level boundaries"
    );
    let (bf, cls, reg) = head.forward_bbox(&feats, &rois).unwrap();
    assert_close(&bf, &f.t["output.bbox_feats"], 1e-5, "bbox_feats");
    assert_close(&cls, &f.t["output.cls_score"], 1e-5, "cls_score");
    assert_close(&reg, &f.t["output.bbox_pred"], 1e-5, "bbox_pred");

    let dets = head.predict(&feats, &props, &metas(&f), &test).unwrap();
    assert_eq!(dets.len(), 2);
    check_predictions(&f, &dets);
    for (i, d) in dets.iter().enumerate() {
        // Masks: every pixel equal except those the fixture lists within 1e-4 of the threshold.
        let wm = &f.t[&format!("pred.{i}.masks")];
        let (n, h, w) = wm.dims3().unwrap();
        let masks = d.masks.as_ref().expect("masks");
        assert_eq!(
            (masks.len(), masks.size),
            (n, (h, w)),
            "image {i}: mask shape"
        );
        let want: Vec<u8> = wm.flatten_all().unwrap().to_vec1().unwrap();
        let near: Vec<Vec<i64>> = f.t[&format!("pred.{i}.mask_near_thr_idx")]
            .to_vec2()
            .unwrap();
        let mut skipped = 0;
        let mut wrong = Vec::new();
        for k in 0..n {
            for p in 0..h * w {
                if masks.masks[k][p] != want[k * h * w + p] {
                    let at = vec![k as i64, (p / w) as i64, (p % w) as i64];
                    if near.contains(&at) {
                        skipped += 1;
                    } else {
                        wrong.push(at);
                    }
                }
            }
        }
        assert!(
            wrong.is_empty(),
            "image {i}: {} mask pixels differ, first {:?}",
            wrong.len(),
            &wrong[..wrong.len().min(5)]
        );
        assert!(skipped <= near.len());
    }
}
