//! RetinaHead and ATSSHead against mmdetection 3.3 (`../shared/fixtures/models/{retina,atss}_head`):
//! forward outputs, anchors, targets, per-level losses, their gradients w.r.t. the raw outputs, and
//! the final detections.
//!
//! Tolerances: forward 1e-5 abs (sidecar f32-vs-f64 spread ≤ 7e-6); losses 1e-5 relative (sums of
//! a few thousand f32 terms); gradients 1e-4 of the largest gradient (f32 summation order);
//! detections: same count, order and labels (the fixture guarantees margins at every cut), scores
//! 1e-5 abs, boxes 1e-4 relative (pixel values up to ~240, rescaled in f32).

use candle_core::{DType, Device, Tensor, Var};
use densepred_core::params::SeededVarMap;
use densepred_core::structures::{GtInstances, ImageMeta};
use densepred_core::weights::{load_into, read_checkpoint};
use densepred_heads::dense::{
    AtssHead, AtssHeadConfig, DenseOutputs, DenseTestConfig, DenseTrainConfig, RetinaHead,
    RetinaHeadConfig,
};
use std::collections::BTreeMap;
use std::path::PathBuf;

struct Fixture {
    t: BTreeMap<String, Tensor>,
    meta: serde_json::Value,
    path: PathBuf,
}

fn fixture(name: &str) -> Fixture {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared/fixtures/models");
    let path = dir.join(format!("{name}.safetensors"));
    let meta =
        serde_json::from_str(&std::fs::read_to_string(dir.join(format!("{name}.json"))).unwrap())
            .unwrap();
    Fixture {
        t: read_checkpoint(&path).unwrap(),
        meta,
        path,
    }
}

fn head_cfg<T: serde::de::DeserializeOwned>(f: &Fixture) -> (T, DenseTrainConfig, DenseTestConfig) {
    let mut c = f.meta["config"].clone();
    let o = c.as_object_mut().unwrap();
    o.remove("type");
    let train: DenseTrainConfig = serde_json::from_value(o.remove("train_cfg").unwrap()).unwrap();
    let test: DenseTestConfig = serde_json::from_value(o.remove("test_cfg").unwrap()).unwrap();
    (serde_json::from_value(c).unwrap(), train, test)
}

fn load(f: &Fixture, vars: &SeededVarMap) {
    let params: BTreeMap<String, Tensor> =
        f.t.iter()
            .filter(|(k, _)| k.starts_with("bbox_head."))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
    let r = load_into(
        vars,
        &params,
        &|k| k.strip_prefix("bbox_head.").map(String::from),
        true,
        &f.path,
    )
    .unwrap();
    assert!(r.is_exact(), "{r}");
}

fn metas(f: &Fixture) -> Vec<ImageMeta> {
    f.meta["img_metas"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            let p = |k: &str| {
                (
                    m[k][0].as_u64().unwrap() as usize,
                    m[k][1].as_u64().unwrap() as usize,
                )
            };
            ImageMeta {
                ori_shape: p("ori_shape"),
                img_shape: p("img_shape"),
                pad_shape: p("pad_shape"),
                scale_factor: (
                    m["scale_factor"][0].as_f64().unwrap(),
                    m["scale_factor"][1].as_f64().unwrap(),
                ),
            }
        })
        .collect()
}

fn gts(f: &Fixture) -> Vec<GtInstances> {
    (0..2)
        .map(|i| GtInstances {
            bboxes: f.t[&format!("gt.{i}.bboxes")]
                .to_vec2::<f32>()
                .unwrap()
                .into_iter()
                .map(|r| [r[0], r[1], r[2], r[3]])
                .collect(),
            labels: f.t[&format!("gt.{i}.labels")].to_vec1::<i64>().unwrap(),
            ignored: vec![],
        })
        .collect()
}

fn max_abs(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

fn scalar(t: &Tensor) -> f32 {
    t.to_dtype(DType::F32).unwrap().to_scalar::<f32>().unwrap()
}

const LEVELS: usize = 5;

fn check_forward(f: &Fixture, outs: &DenseOutputs) {
    for l in 0..LEVELS {
        assert!(
            max_abs(&outs.cls_scores[l], &f.t[&format!("output.cls_scores.{l}")]) <= 1e-5,
            "cls level {l}"
        );
        assert!(
            max_abs(&outs.bbox_preds[l], &f.t[&format!("output.bbox_preds.{l}")]) <= 1e-5,
            "reg level {l}"
        );
        if let Some(c) = &outs.centernesses {
            assert!(
                max_abs(&c[l], &f.t[&format!("output.centernesses.{l}")]) <= 1e-5,
                "ctr level {l}"
            );
        }
    }
}

/// The fixture's raw outputs as variables, so losses and gradients are checked independently of
/// the forward pass.
fn fixture_outputs(f: &Fixture, with_ctr: bool) -> (DenseOutputs, Vec<(String, Var)>) {
    let mut vars = Vec::new();
    let mut get = |name: &str| -> Vec<Tensor> {
        (0..LEVELS)
            .map(|l| {
                let key = format!("{name}.{l}");
                let v = Var::from_tensor(&f.t[&format!("output.{key}")]).unwrap();
                let t = v.as_tensor().clone();
                vars.push((key, v));
                t
            })
            .collect()
    };
    let cls_scores = get("cls_scores");
    let bbox_preds = get("bbox_preds");
    let centernesses = if with_ctr {
        Some(get("centernesses"))
    } else {
        None
    };
    (
        DenseOutputs {
            cls_scores,
            bbox_preds,
            centernesses,
        },
        vars,
    )
}

fn check_losses(f: &Fixture, losses: &densepred_heads::dense::LevelLosses, vars: &[(String, Var)]) {
    let mut total: Option<Tensor> = None;
    let mut names: Vec<&str> = losses.iter().map(|(n, _)| n.as_str()).collect();
    let mut want_names: Vec<&str> = f.meta["losses"]
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    names.sort();
    want_names.sort();
    assert_eq!(names, want_names, "loss names");
    assert!(!vars.is_empty(), "no parameters to compare gradients of");
    for (name, per_level) in losses {
        let want: Vec<f64> = f.meta["losses"][name]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap())
            .collect();
        assert_eq!(per_level.len(), want.len(), "{name}");
        for (l, (got, w)) in per_level.iter().zip(&want).enumerate() {
            let g = scalar(got) as f64;
            assert!(
                (g - w).abs() <= 1e-5 * w.abs().max(1e-3),
                "{name} level {l}: {g} vs {w}"
            );
            total = Some(match total {
                None => got.clone(),
                Some(t) => (t + got).unwrap(),
            });
        }
    }
    let total = total.unwrap();
    let want_total = f.meta["loss_total"].as_f64().unwrap();
    assert!(
        (scalar(&total) as f64 - want_total).abs() <= 1e-5 * want_total,
        "total"
    );
    let grads = total.backward().unwrap();
    for (key, v) in vars {
        let want = &f.t[&format!("grad.{key}")];
        let scale = want
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
            .max(1e-12);
        let got = grads.get(v).cloned().unwrap_or(v.zeros_like().unwrap());
        let err = max_abs(&got, want);
        assert!(
            err <= 1e-4 * scale,
            "grad {key}: {err} (max |grad| {scale})"
        );
    }
}

fn check_predictions(f: &Fixture, dets: &[densepred_core::structures::Detections]) {
    for (i, d) in dets.iter().enumerate() {
        let wb = f.t[&format!("pred.{i}.bboxes")].to_vec2::<f32>().unwrap();
        let ws = f.t[&format!("pred.{i}.scores")].to_vec1::<f32>().unwrap();
        let wl = f.t[&format!("pred.{i}.labels")].to_vec1::<i64>().unwrap();
        assert_eq!(d.len(), ws.len(), "image {i}: number of detections");
        assert_eq!(d.labels, wl, "image {i}: labels");
        for k in 0..ws.len() {
            assert!(
                (d.scores[k] - ws[k]).abs() <= 1e-5,
                "image {i} det {k}: score {} vs {}",
                d.scores[k],
                ws[k]
            );
            for c in 0..4 {
                assert!(
                    (d.bboxes[k][c] - wb[k][c]).abs() <= 1e-4 * wb[k][c].abs().max(1.0),
                    "image {i} det {k}: box {:?} vs {:?}",
                    d.bboxes[k],
                    wb[k]
                );
            }
        }
    }
}

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
            f.t[&format!("assign.{i}.gt_inds")]
                .to_vec1::<i64>()
                .unwrap(),
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
