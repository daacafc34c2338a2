//! Fuzz targets (property tests with random inputs), ignored by default: the TOML config parser
//! with `_base_` and `--set`, the COCO annotation loader, the results-JSON loader and the
//! transform pipeline. Each must return a value or an error for any input, never panic.
//!
//! Run each for a time budget (seconds, default 10) on fresh random seeds:
//!
//! ```text
//! DENSEPRED_FUZZ_SECS=600 cargo test --release -p densepred-engine --test fuzz -- --ignored --test-threads 1
//! ```
//!
//! A failure prints the shrunk input that panicked.

mod common;
use common::root;
use densepred_datasets::coco::{CocoDataset, CocoOptions};
use densepred_datasets::transforms::{Pipeline, TransformConfig};
use densepred_datasets::{DataError, Dataset};
use densepred_engine::runner::RunConfig;
use densepred_evaluation::coco::{evaluate_results_file, load_gt, CocoIouType};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};
use rand::SeedableRng;
use serde_json::Value;
use std::time::{Duration, Instant};

/// Runs `test` on inputs from `strategy` until the time budget is spent, panicking (with the
/// shrunk input) on the first failure.
fn fuzz<S: Strategy>(name: &str, strategy: S, test: impl Fn(S::Value) -> Result<(), TestCaseError>)
where
    S::Value: std::fmt::Debug,
{
    let secs: u64 = std::env::var("DENSEPRED_FUZZ_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(10);
    let deadline = Instant::now() + Duration::from_secs(secs);
    let mut cases = 0u64;
    while Instant::now() < deadline {
        let mut runner = TestRunner::new(Config {
            cases: 64,
            failure_persistence: None,
            ..Config::default()
        });
        if let Err(e) = runner.run(&strategy, &test) {
            panic!("{name}: {e}");
        }
        cases += 64;
    }
    eprintln!("{name}: {cases} cases in {secs} s, no panic");
}

/// A JSON value of any shape, with numbers that break naive code (negative, huge, fractional).
fn any_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        prop_oneof![Just(0.0), Just(-1.0), Just(1e300), Just(-0.5), any::<f64>()].prop_map(|f| {
            serde_json::Number::from_f64(f)
                .map(Value::Number)
                .unwrap_or(Value::Null)
        }),
        "[a-z0-9_./]{0,8}".prop_map(Value::String),
    ];
    leaf.prop_recursive(2, 8, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..5).prop_map(Value::Array),
            prop::collection::vec(("[a-z_]{1,6}", inner), 0..3)
                .prop_map(|kv| Value::Object(kv.into_iter().collect())),
        ]
    })
}

const CONFIGS: &[&str] = &[
    "configs/retinanet/retinanet_smt-t_fpn_mini-coco.toml",
    "configs/atss/atss_smt-t_fpn_mini-coco.toml",
    "configs/upernet/upernet_smt-t_mini-ade.toml",
    "configs/sem_fpn/fpn_smt-t_mini-ade.toml",
    "configs/retinanet/retinanet_smt-s_fpn_3x_coco.toml",
];

const KEYS: &[&str] = &[
    "model",
    "backbone",
    "neck",
    "bbox_head",
    "decode_head",
    "train_cfg",
    "test_cfg",
    "train_dataloader",
    "val_dataloader",
    "test_dataloader",
    "dataset",
    "pipeline",
    "0",
    "1",
    "3",
    "type",
    "scale",
    "ratio_range",
    "batch_size",
    "optim_wrapper",
    "optimizer",
    "lr",
    "param_scheduler",
    "default_hooks",
    "_base_",
    "_delete_",
    "assigner",
    "num_classes",
    "x",
];

const VALUES: &[&str] = &[
    "3",
    "-1",
    "0",
    "1e400",
    "nan",
    "inf",
    "-inf",
    "true",
    "\"x\"",
    "[1, [2]]",
    "[]",
    "{}",
    "{ type = \"Resize\" }",
    "{ type = \"X\", a = 1 }",
    "[0.5, 2.0]",
    "[2.0, 0.5]",
    "",
    "=",
    "a.b",
    "\"../missing.toml\"",
    "[\"../missing.toml\"]",
    "18446744073709551616",
];

#[test]
#[ignore]
fn fuzz_config_parser_with_bases_and_overrides() {
    let dir = tempfile::tempdir().unwrap();
    // Each config with its `_base_` paths made absolute, so a copy loads from anywhere.
    let texts: Vec<String> = CONFIGS
        .iter()
        .map(|c| {
            let p = root().join(c);
            let text = std::fs::read_to_string(&p).unwrap();
            text.replace("\"../", &format!("\"{}/../", p.parent().unwrap().display()))
        })
        .collect();
    let edit = (
        any::<prop::sample::Index>(),
        0u8..3,
        "[\\[\\]=\".,{}a-z0-9_ \\n#-]{0,4}",
    );
    let set = (
        prop::collection::vec(prop::sample::select(KEYS), 1..5),
        prop::sample::select(VALUES),
    );
    let strategy = (
        0..texts.len(),
        prop::collection::vec(edit, 0..4),
        prop::collection::vec(set, 0..4),
    );
    fuzz("config parser", strategy, |(which, edits, sets)| {
        let mut text = texts[which].clone().into_bytes();
        for (at, op, s) in edits {
            let i = at.index(text.len() + 1);
            match op {
                0 => {
                    let end = (i + s.len()).min(text.len());
                    text.drain(i..end);
                }
                1 => {
                    text.splice(i..i, s.bytes());
                }
                _ => {
                    let end = (i + s.len()).min(text.len());
                    text.splice(i..end, s.bytes());
                }
            }
        }
        let path = dir.path().join("c.toml");
        std::fs::write(&path, &text).unwrap();
        let sets: Vec<String> = sets
            .into_iter()
            .map(|(k, v)| format!("{}={v}", k.join(".")))
            .collect();
        let _ = RunConfig::load(&path, &sets);
        Ok(())
    });
}

/// Sections and keys of a COCO instances file that the mutations replace.
const COCO_KEYS: &[(&str, &str)] = &[
    ("images", "id"),
    ("images", "width"),
    ("images", "height"),
    ("images", "file_name"),
    ("annotations", "id"),
    ("annotations", "image_id"),
    ("annotations", "category_id"),
    ("annotations", "bbox"),
    ("annotations", "area"),
    ("annotations", "iscrowd"),
    ("annotations", "segmentation"),
    ("categories", "id"),
    ("categories", "name"),
];

#[test]
#[ignore]
fn fuzz_coco_annotation_loader() {
    let dir = tempfile::tempdir().unwrap();
    let src = root().join("assets/mini_coco/annotations/instances_val.json");
    let base: Value = serde_json::from_str(&std::fs::read_to_string(src).unwrap()).unwrap();
    let mutation = (
        prop::sample::select(COCO_KEYS),
        any::<prop::sample::Index>(),
        prop::option::weighted(0.9, any_json()),
    );
    let strategy = (
        prop::collection::vec(mutation, 1..6),
        any::<bool>(),
        any::<bool>(),
    );
    fuzz(
        "COCO loader",
        strategy,
        |(mutations, skip_invalid, whole)| {
            let mut d = base.clone();
            for ((section, key), at, value) in mutations {
                let list = d[section].as_array_mut().unwrap();
                if list.is_empty() {
                    continue;
                }
                let i = at.index(list.len());
                if whole {
                    list[i] = value.clone().unwrap_or(Value::Null);
                }
                let rec = list[i].as_object_mut();
                if let Some(rec) = rec {
                    match value {
                        Some(v) => rec.insert(key.to_string(), v),
                        None => rec.remove(key),
                    };
                }
            }
            let path = dir.path().join("ann.json");
            std::fs::write(&path, d.to_string()).unwrap();
            let opts = CocoOptions {
                skip_invalid,
                ..CocoOptions::default()
            };
            if let Ok(ds) = CocoDataset::load(&path, dir.path(), &opts) {
                for i in 0..ds.len() {
                    let _ = ds.sample(i);
                }
            }
            Ok(())
        },
    );
}

#[test]
#[ignore]
fn fuzz_results_json_loader() {
    let dir = tempfile::tempdir().unwrap();
    let gt_path = root().join("assets/mini_coco/annotations/instances_val.json");
    let gt = load_gt(&gt_path).unwrap();
    let gt_json: Value = serde_json::from_str(&std::fs::read_to_string(&gt_path).unwrap()).unwrap();
    let image_ids: Vec<u64> = gt_json["images"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["id"].as_u64().unwrap())
        .collect();
    let number = prop_oneof![
        Just(0.0),
        Just(-3.0),
        Just(1e12),
        0.0f64..700.0,
        any::<f64>(),
    ];
    let record = (
        prop::sample::select(image_ids),
        prop_oneof![1u64..91, any::<u64>()],
        prop::collection::vec(number.clone(), 0..6),
        number,
        prop::option::weighted(0.2, ("[a-z_]{1,12}", any_json())),
    );
    let strategy = (
        prop::collection::vec(record, 0..40),
        any::<bool>(),
        prop::option::weighted(0.1, any_json()),
    );
    fuzz(
        "results loader",
        strategy,
        |(records, segm, replace_all)| {
            let list: Vec<Value> = records
                .into_iter()
                .map(|(img, cat, bbox, score, extra)| {
                    let mut r = serde_json::json!({
                        "image_id": img, "category_id": cat, "score": score,
                    });
                    let nums = |v: Vec<f64>| -> Value {
                        v.into_iter()
                            .map(|f| {
                                serde_json::Number::from_f64(f)
                                    .map(Value::Number)
                                    .unwrap_or(Value::Null)
                            })
                            .collect()
                    };
                    if segm {
                        r["segmentation"] = Value::Array(vec![nums(bbox)]);
                    } else {
                        r["bbox"] = nums(bbox);
                    }
                    if let Some((k, v)) = extra {
                        r[k] = v;
                    }
                    r
                })
                .collect();
            let doc = replace_all.unwrap_or(Value::Array(list));
            let path = dir.path().join("results.json");
            std::fs::write(&path, doc.to_string()).unwrap();
            let t = if segm {
                CocoIouType::Segm
            } else {
                CocoIouType::Bbox
            };
            let _ = evaluate_results_file(&gt, &path, t);
            Ok(())
        },
    );
}

/// One transform as TOML with parameters from ranges wide enough to reach the edge cases
/// (zero, negative, reversed), capped so that an image stays below ~4k pixels a side.
fn transform_toml() -> impl Strategy<Value = String> {
    let f = || prop_oneof![8 => 0.05f64..3.0, 1 => Just(0.0), 1 => -2.0f64..0.0];
    let side = || prop_oneof![8 => 1i64..1400, 1 => Just(0i64), 1 => Just(-5)];
    prop_oneof![
        (side(), side(), any::<bool>()).prop_map(|(w, h, k)| format!(
            "{{ type = \"Resize\", scale = [{w}, {h}], keep_ratio = {k} }}"
        )),
        f().prop_map(|s| format!("{{ type = \"Resize\", scale_factor = {s} }}")),
        (side(), side(), f(), f()).prop_map(|(w, h, a, b)| format!(
            "{{ type = \"RandomResize\", scale = [{w}, {h}], ratio_range = [{a}, {b}], keep_ratio = true }}"
        )),
        (side(), side(), side(), side()).prop_map(|(a, b, c, d)| format!(
            "{{ type = \"RandomResize\", scale = [[{a}, {b}], [{c}, {d}]], keep_ratio = true }}"
        )),
        (side(), side()).prop_map(|(w, h)| format!(
            "{{ type = \"RandomChoiceResize\", scales = [[{w}, {h}]], keep_ratio = true }}"
        )),
        f().prop_map(|p| format!("{{ type = \"RandomFlip\", prob = {p} }}")),
        (side(), side(), f(), any::<bool>()).prop_map(|(h, w, r, range)| format!(
            "{{ type = \"RandomCrop\", crop_size = [{}, {}], cat_max_ratio = {r}{} }}",
            h.max(0), w.max(0),
            if range { ", crop_type = \"absolute_range\", allow_negative_crop = true" } else { "" }
        )),
        (f(), f(), f(), f(), f(), f()).prop_map(|(b, c0, c1, s0, s1, h)| format!(
            "{{ type = \"PhotoMetricDistortion\", brightness_delta = {}, contrast_range = [{c0}, {c1}], \
             saturation_range = [{s0}, {s1}], hue_delta = {} }}",
            b * 20.0, h * 10.0
        )),
        (f(), f()).prop_map(|(m, s)| format!(
            "{{ type = \"Normalize\", mean = [{m}, 1, 2], std = [{s}, 1, 1] }}"
        )),
        (side(), side(), 0usize..64).prop_map(|(h, w, d)| format!(
            "{{ type = \"Pad\", size = [{}, {}] }}\n{{ type = \"Pad\", size_divisor = {d} }}",
            h.max(0), w.max(0)
        )),
    ]
}

/// Pipelines that passed validation and ran (the others are refused when a config is read).
static RAN: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

#[test]
#[ignore]
fn fuzz_transform_pipeline() {
    let coco = root().join("assets/mini_coco");
    let ds = CocoDataset::load(
        &coco.join("annotations/instances_val.json"),
        &coco.join("images"),
        &CocoOptions::default(),
    )
    .unwrap();
    let strategy = (
        prop::collection::vec(transform_toml(), 1..5),
        0..ds.len(),
        any::<u64>(),
        any::<bool>(),
    );
    fuzz("transform pipeline", strategy, |(ts, i, seed, masks)| {
        let mut list = vec![TransformConfig::LoadImageFromFile {
            to_float32: false,
            backend_args: None,
        }];
        let text = format!(
            "p = [{{ type = \"LoadAnnotations\", with_mask = {masks} }}, {}]",
            ts.join(", ").replace('\n', ", ")
        );
        #[derive(serde::Deserialize)]
        struct P {
            p: Vec<TransformConfig>,
        }
        // Parameters that a config would refuse are out of scope: the pipeline need only
        // handle what passes parsing and validation.
        let Ok(parsed) = toml::from_str::<P>(&text) else {
            return Ok(());
        };
        if parsed.p.iter().any(|t| t.validate().is_err()) {
            return Ok(());
        }
        list.extend(parsed.p);
        RAN.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        if let Err(e) = Pipeline(list).apply(ds.sample(i), &mut rng) {
            prop_assert!(
                !matches!(e.root(), DataError::Panic(_)),
                "a transform panicked: {e}"
            );
        }
        Ok(())
    });
    eprintln!(
        "transform pipeline: {} pipelines passed validation and ran",
        RAN.load(std::sync::atomic::Ordering::Relaxed)
    );
}
