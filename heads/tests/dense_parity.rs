//! RetinaHead and ATSSHead against mmdetection 3.3 (`../shared/fixtures/models/{retina,atss}_head`):
//! forward outputs, anchors, targets, per-level losses, their gradients w.r.t. the raw outputs, and
//! the final detections.
//!
//! Tolerances: forward 1e-5 abs (sidecar f32-vs-f64 spread ≤ 7e-6); losses 1e-5 relative (sums of
//! a few thousand f32 terms); gradients 1e-4 of the largest gradient (f32 summation order);
//! detections: same count, order and labels (the fixture guarantees margins at every cut), scores
//! 1e-5 abs, boxes 1e-4 relative (pixel values up to ~240, rescaled in f32).

mod common;

use candle_core::{DType, Device, Tensor};
use common::*;
use densepred_core::params::SeededVarMap;
use densepred_heads::dense::{AnchorHead, AtssHead, AtssHeadConfig, RetinaHead, RetinaHeadConfig};

fn check_targets(
    f: &Fixture,
    targets: &[densepred_heads::dense::common::ImageTargets],
    anchors: &densepred_heads::dense::common::Anchors,
) {
    for l in 0..LEVELS {
        assert_eq!(
            max_abs(&anchors.levels[l], &f.t[&format!("anchors.{l}")]),
            0.0,
            "anchors level {l}"
        );
    }
    let labels = f.t["target.labels"].to_vec2::<i64>().unwrap();
    let weights = f.t["target.label_weights"].to_vec2::<f32>().unwrap();
    for (i, t) in targets.iter().enumerate() {
        assert_eq!(
            t.assign.gt_inds,
            fixture_gt_inds(&f, i),
            "image {i} gt_inds"
        );
        assert_eq!(t.labels, labels[i], "image {i} labels");
        assert_eq!(t.label_weights, weights[i], "image {i} label weights");
        assert_eq!(
            t.pos_inds.len() as u64,
            f.meta["num_pos_per_image"][i].as_u64().unwrap()
        );
    }
}

#[test]
fn retina_head_matches_mmdet() {
    let f = fixture("retina_head");
    let (cfg, train, test): (RetinaHeadConfig, _, _) = head_cfg(&f);
    let vars = SeededVarMap::new(0);
    let head = RetinaHead::new(vars.var_builder(DType::F32, &Device::Cpu), &cfg).unwrap();
    load(&f, &vars);
    let feats: Vec<Tensor> = (0..LEVELS)
        .map(|l| f.t[&format!("input.feats.{l}")].clone())
        .collect();
    check_forward(&f, &head.forward(&feats).unwrap());

    let (outs, out_vars) = fixture_outputs(&f, false);
    let anchors = head.anchors(&outs).unwrap();
    let targets = head
        .get_targets(&anchors, &metas(&f), &gts(&f), &train)
        .unwrap();
    check_targets(&f, &targets, &anchors);
    check_losses(
        &f,
        &head.loss_from_targets(&outs, &anchors, &targets).unwrap(),
        &out_vars,
    );
    check_predictions(&f, &head.predict_by_feat(&outs, &metas(&f), &test).unwrap());
}

#[test]
fn atss_head_matches_mmdet() {
    let f = fixture("atss_head");
    let (cfg, train, test): (AtssHeadConfig, _, _) = head_cfg(&f);
    let vars = SeededVarMap::new(0);
    let head = AtssHead::new(vars.var_builder(DType::F32, &Device::Cpu), &cfg).unwrap();
    load(&f, &vars);
    let feats: Vec<Tensor> = (0..LEVELS)
        .map(|l| f.t[&format!("input.feats.{l}")].clone())
        .collect();
    check_forward(&f, &head.forward(&feats).unwrap());

    let (outs, out_vars) = fixture_outputs(&f, true);
    let anchors = head.anchors(&outs).unwrap();
    let targets = head
        .get_targets(&anchors, &metas(&f), &gts(&f), &train)
        .unwrap();
    check_targets(&f, &targets, &anchors);
    check_losses(
        &f,
        &head.loss_from_targets(&outs, &anchors, &targets).unwrap(),
        &out_vars,
    );
    check_predictions(&f, &head.predict_by_feat(&outs, &metas(&f), &test).unwrap());
}
