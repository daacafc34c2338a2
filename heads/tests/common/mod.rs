//! Helpers shared by the head parity tests: fixture loading, metas / GT from the sidecar, and the
//! loss, gradient and detection comparisons (tolerances are stated where each is used).
#![allow(dead_code)]

use candle_core::{DType, Tensor, Var};
use densepred_core::params::SeededVarMap;
use densepred_core::structures::{BitmapMasks, GtInstances, ImageMeta};
use densepred_core::weights::{load_into, read_checkpoint};
use densepred_heads::dense::{DenseOutputs, DenseTestConfig, DenseTrainConfig};
use std::collections::BTreeMap;
use std::path::PathBuf;

pub struct Fixture {
    pub t: BTreeMap<String, Tensor>,
    pub meta: serde_json::Value,
    pub path: PathBuf,
}

pub fn fixture(name: &str) -> Fixture {
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

pub fn head_cfg<T: serde::de::DeserializeOwned>(
    f: &Fixture,
) -> (T, DenseTrainConfig, DenseTestConfig) {
    let mut c = f.meta["config"].clone();
    let o = c.as_object_mut().unwrap();
    o.remove("type");
    let train: DenseTrainConfig = serde_json::from_value(o.remove("train_cfg").unwrap()).unwrap();
    let test: DenseTestConfig = serde_json::from_value(o.remove("test_cfg").unwrap()).unwrap();
    (serde_json::from_value(c).unwrap(), train, test)
}

pub fn load(f: &Fixture, vars: &SeededVarMap) {
    load_prefix(f, vars, "bbox_head.")
}

/// Loads the fixture's parameters under `prefix` (stripped) into `vars`, exactly.
pub fn load_prefix(f: &Fixture, vars: &SeededVarMap, prefix: &str) {
    let params: BTreeMap<String, Tensor> =
        f.t.iter()
            .filter(|(k, _)| k.starts_with(prefix))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
    let r = load_into(
        vars,
        &params,
        &|k| k.strip_prefix(prefix).map(String::from),
        true,
        &f.path,
    )
    .unwrap();
    assert!(r.is_exact(), "{r}");
}

pub fn metas(f: &Fixture) -> Vec<ImageMeta> {
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

pub fn gts(f: &Fixture) -> Vec<GtInstances> {
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
            masks: f.t.get(&format!("gt.{i}.masks")).map(|m| {
                let (_, h, w) = m.dims3().unwrap();
                let flat = m.flatten_all().unwrap().to_vec1::<u8>().unwrap();
                BitmapMasks {
                    size: (h, w),
                    masks: flat.chunks(h * w).map(|c| c.to_vec()).collect(),
                }
            }),
        })
        .collect()
}

pub use densepred_testutil::max_abs;

pub fn scalar(t: &Tensor) -> f32 {
    t.to_dtype(DType::F32).unwrap().to_scalar::<f32>().unwrap()
}

pub const LEVELS: usize = 5;

pub fn check_forward(f: &Fixture, outs: &DenseOutputs) {
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
pub fn fixture_outputs(f: &Fixture, with_ctr: bool) -> (DenseOutputs, Vec<(String, Var)>) {
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

pub fn check_losses(
    f: &Fixture,
    losses: &densepred_heads::dense::LevelLosses,
    vars: &[(String, Var)],
) {
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
        let scale = densepred_testutil::max_abs_value(want).max(1e-12);
        let got = grads.get(v).cloned().unwrap_or(v.zeros_like().unwrap());
        let err = max_abs(&got, want);
        assert!(
            err <= 1e-4 * scale,
            "grad {key}: {err} (max |grad| {scale})"
        );
    }
}

/// The fixture's assigned GT index per prior of image `i` (`assign.{i}.gt_inds`: 0 negative,
/// −1 ignored, k + 1 the k-th GT).
pub fn fixture_gt_inds(f: &Fixture, i: usize) -> Vec<i64> {
    f.t[&format!("assign.{i}.gt_inds")]
        .to_vec1::<i64>()
        .unwrap()
}

pub fn check_predictions(f: &Fixture, dets: &[densepred_core::structures::Detections]) {
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
