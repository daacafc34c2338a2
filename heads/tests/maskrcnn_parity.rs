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
            f.t[&format!("assign.{i}.gt_inds")]
                .to_vec1::<i64>()
                .unwrap(),
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
