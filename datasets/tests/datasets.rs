//! Datasets, transforms and loader on the embedded real data (`assets/`), plus crafted bad inputs.

use densepred_datasets::ade::Ade20kDataset;
use densepred_datasets::coco::{segmentation_to_mask, CocoDataset, CocoOptions};
use densepred_datasets::config::DataloaderConfig;
use densepred_datasets::loader::{collate, DataLoader, Normalization};
use densepred_datasets::transforms::{target_size, Pipeline, TransformConfig};
use densepred_datasets::{DataError, Dataset};
use rand::SeedableRng;
use std::path::{Path, PathBuf};

fn assets() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../assets")
}

fn mini_coco(split: &str, opts: &CocoOptions) -> CocoDataset {
    let root = assets().join("mini_coco");
    CocoDataset::load(
        &root.join(format!("annotations/instances_{split}.json")),
        &root.join("images"),
        opts,
    )
    .unwrap()
}

#[test]
fn coco_reader_maps_categories_and_crowds() {
    let ds = mini_coco("train", &CocoOptions::default());
    assert_eq!(ds.len(), 72);
    let m = ds.metainfo();
    assert_eq!(m.classes.len(), 80);
    assert_eq!(m.classes[0], "person");
    // Non-contiguous ids: the last COCO id 90 ("toothbrush") is label 79.
    assert_eq!(ds.label_of(90), Some(79));
    assert_eq!(m.cat_ids[79], 90);
    let (mut crowd, mut total) = (0, 0);
    for i in 0..ds.len() {
        let s = ds.sample(i);
        for inst in &s.ann_instances {
            assert!(inst.bbox[2] > inst.bbox[0] && inst.bbox[3] > inst.bbox[1]);
            assert!(inst.bbox[2] <= s.ori_shape.1 as f32 && inst.bbox[3] <= s.ori_shape.0 as f32);
            crowd += inst.ignore as usize;
            total += 1;
        }
    }
    assert_eq!(crowd, 6, "README: 6 crowd annotations in train");
    assert!(total > 500);
    // filter_empty_gt drops images without non-crowd objects, and nothing else.
    let filtered = mini_coco(
        "train",
        &CocoOptions {
            filter_empty_gt: true,
            ..Default::default()
        },
    );
    let empty = (0..ds.len())
        .filter(|&i| !ds.sample(i).ann_instances.iter().any(|x| !x.ignore))
        .count();
    assert_eq!(filtered.len(), ds.len() - empty);
}

/// Rasterisation equals pycocotools. The eval fixtures' ground truth stores, as `area`, the
/// pycocotools mask area of each polygon / RLE (their README), so every mask's pixel count must
/// equal it exactly; the masks' tight boxes fix the row/column orientation.
#[test]
fn masks_match_pycocotools_areas() {
    let (mut checked, mut rle_crowds) = (0, 0);
    for case in ["bbox", "segm", "edge_segm"] {
        let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../../shared/fixtures/eval/coco")
            .join(case)
            .join("gt.json");
        let raw: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        let sizes: std::collections::HashMap<u64, (u32, u32)> = raw["images"]
            .as_array()
            .unwrap()
            .iter()
            .map(|i| {
                (
                    i["id"].as_u64().unwrap(),
                    (
                        i["height"].as_u64().unwrap() as u32,
                        i["width"].as_u64().unwrap() as u32,
                    ),
                )
            })
            .collect();
        for a in raw["annotations"].as_array().unwrap() {
            let Some(segv) = a.get("segmentation") else {
                continue;
            };
            let seg: hotcoco::types::Segmentation = serde_json::from_value(segv.clone()).unwrap();
            let (h, w) = sizes[&a["image_id"].as_u64().unwrap()];
            let m = segmentation_to_mask(&seg, h, w).unwrap();
            assert_eq!(m.dim(), (h as usize, w as usize));
            let px: u64 = m.iter().map(|&v| v as u64).sum();
            assert_eq!(
                px as f64,
                a["area"].as_f64().unwrap(),
                "{case} annotation {}",
                a["id"]
            );
            rle_crowds +=
                matches!(seg, hotcoco::types::Segmentation::UncompressedRle { .. }) as usize;
            if a["iscrowd"].as_u64() == Some(0) {
                let bbox: Vec<f64> = a["bbox"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|v| v.as_f64().unwrap())
                    .collect();
                let ys: Vec<usize> = (0..h as usize)
                    .filter(|&y| m.row(y).iter().any(|&v| v > 0))
                    .collect();
                let xs: Vec<usize> = (0..w as usize)
                    .filter(|&x| m.column(x).iter().any(|&v| v > 0))
                    .collect();
                // Orientation only (a transposed mask is off by hundreds of pixels); a sharp polygon
                // vertex may cover no pixel of its row, hence 2 px. Exactness is the area check above.
                assert!(
                    (ys[0] as f64 - bbox[1]).abs() <= 2.0 && (xs[0] as f64 - bbox[0]).abs() <= 2.0,
                    "{case} annotation {} orientation: rows {}..{} cols {}..{} bbox {bbox:?}",
                    a["id"],
                    ys[0],
                    ys[ys.len() - 1],
                    xs[0],
                    xs[xs.len() - 1]
                );
            }
            checked += 1;
        }
    }
    assert!(checked > 100);
    assert!(
        rle_crowds >= 6,
        "uncompressed-RLE crowds covered: {rle_crowds}"
    );
}

fn pipeline(toml_src: &str) -> Pipeline {
    #[derive(serde::Deserialize)]
    struct P {
        pipeline: Vec<TransformConfig>,
    }
    Pipeline(toml::from_str::<P>(toml_src).unwrap().pipeline)
}

#[test]
fn resize_flip_pad_move_boxes_and_masks_with_the_image() {
    assert_eq!(target_size((640, 480), [1333.0, 800.0], true), (1067, 800));
    // Portrait w = 480, h = 640: factor min(1333/640, 800/480) = 5/3.
    assert_eq!(target_size((480, 640), [1333.0, 800.0], true), (800, 1067));
    assert_eq!(target_size((640, 480), [320.0, 320.0], false), (320, 320));
    let ds = mini_coco("val", &CocoOptions::default());
    let i = (0..ds.len())
        .find(|&i| ds.sample(i).ann_instances.len() >= 2)
        .unwrap();
    let p = pipeline(
        r#"
[[pipeline]]
type = "LoadImageFromFile"
[[pipeline]]
type = "LoadAnnotations"
with_bbox = true
with_mask = true
[[pipeline]]
type = "Resize"
scale = [320, 320]
keep_ratio = true
[[pipeline]]
type = "RandomFlip"
prob = 1.0
[[pipeline]]
type = "Pad"
size_divisor = 32
[[pipeline]]
type = "PackDetInputs"
"#,
    );
    let src = ds.sample(i);
    let mut rng = rand::rngs::StdRng::seed_from_u64(0);
    let s = p.apply(src.clone(), &mut rng).unwrap();
    let (h, w) = s.img_shape;
    assert_eq!(h.max(w), 320);
    assert_eq!((s.pad_shape.0 % 32, s.pad_shape.1 % 32), (0, 0));
    assert_eq!(
        s.img.as_ref().unwrap().dim(),
        (s.pad_shape.0, s.pad_shape.1, 3)
    );
    assert!(s.flip);
    let (fx, fy) = s.scale_factor;
    let masks = s.masks.as_ref().unwrap();
    assert_eq!(s.instances.len(), src.ann_instances.len());
    assert_eq!(masks.len(), s.instances.len());
    for ((a, b), m) in src.ann_instances.iter().zip(&s.instances).zip(masks) {
        // Flipped and scaled: x1' = W − x2·fx.
        assert!((b.bbox[0] - (w as f32 - a.bbox[2] * fx as f32)).abs() < 1e-3);
        assert!((b.bbox[3] - a.bbox[3] * fy as f32).abs() < 1e-3);
        assert_eq!(m.dim(), s.pad_shape);
        if !a.ignore {
            // The mask's pixels lie inside the transformed box (nearest resampling: ±2 px).
            for ((y, x), &v) in m.indexed_iter() {
                if v > 0 {
                    assert!(
                        x as f32 >= b.bbox[0] - 2.0
                            && x as f32 <= b.bbox[2] + 2.0
                            && y as f32 >= b.bbox[1] - 2.0
                            && y as f32 <= b.bbox[3] + 2.0
                    );
                }
            }
        }
    }
    // Flipping back restores the pixels.
    let again = pipeline("[[pipeline]]\ntype = \"RandomFlip\"\nprob = 1.0\n")
        .apply(s.clone(), &mut rng)
        .unwrap();
    let (ph, pw) = s.pad_shape;
    let a = again.img.unwrap();
    let o = s.img.unwrap();
    assert_eq!(a[(3, pw - 1 - 5, 1)], o[(3, 5, 1)]);
    assert_eq!(a.dim(), (ph, pw, 3));
}

#[test]
fn segmentation_pipeline_crop_photometric_normalize() {
    let root = assets().join("mini_ade");
    let ds = Ade20kDataset::load(
        &root,
        &root.join("images/training"),
        &root.join("annotations/training"),
        None,
        true,
    )
    .unwrap();
    assert_eq!(ds.len(), 50);
    assert_eq!(ds.metainfo().classes.len(), 133);
    let p = pipeline(
        r#"
[[pipeline]]
type = "LoadImageFromFile"
[[pipeline]]
type = "LoadAnnotations"
reduce_zero_label = true
[[pipeline]]
type = "RandomResize"
scale = [512, 128]
ratio_range = [0.5, 2.0]
keep_ratio = true
[[pipeline]]
type = "RandomCrop"
crop_size = [96, 96]
cat_max_ratio = 0.75
[[pipeline]]
type = "RandomFlip"
prob = 0.5
[[pipeline]]
type = "PhotoMetricDistortion"
[[pipeline]]
type = "Normalize"
mean = [123.675, 116.28, 103.53]
std = [58.395, 57.12, 57.375]
[[pipeline]]
type = "Pad"
size = [96, 96]
[[pipeline]]
type = "PackSegInputs"
"#,
    );
    let mut rng = rand::rngs::StdRng::seed_from_u64(1);
    for i in 0..5 {
        let s = p.apply(ds.sample(i), &mut rng).unwrap();
        let seg = s.gt_seg_map.as_ref().unwrap();
        assert_eq!(seg.dim(), (96, 96));
        assert!(
            seg.iter().all(|&v| v < 133 || v == 255),
            "labels reduced into 0..133 or ignored"
        );
        let img = s.img.as_ref().unwrap();
        assert_eq!(img.dim(), (96, 96, 3));
        let max = img.iter().cloned().fold(f32::MIN, f32::max);
        assert!(max < 3.0, "normalised values, got max {max}");
    }
}

#[test]
fn loader_is_deterministic_and_batches() {
    let cfg: DataloaderConfig = toml::from_str(&format!(
        r#"
batch_size = 3
num_workers = 2
[sampler]
type = "DefaultSampler"
shuffle = true
[dataset]
type = "CocoDataset"
data_root = "{}"
ann_file = "annotations/instances_val.json"
data_prefix = {{ img = "images" }}
[[dataset.pipeline]]
type = "LoadImageFromFile"
[[dataset.pipeline]]
type = "LoadAnnotations"
[[dataset.pipeline]]
type = "RandomResize"
scale = [[160, 96], [160, 128]]
keep_ratio = true
[[dataset.pipeline]]
type = "RandomFlip"
"#,
        assets().join("mini_coco").display()
    ))
    .unwrap();
    let (ds, pipe, skip) = cfg.dataset.build().unwrap();
    let mk = |workers: usize| DataLoader {
        dataset: ds.clone(),
        pipeline: pipe.clone(),
        batch_size: cfg.batch_size,
        num_workers: workers,
        shuffle: true,
        drop_last: false,
        seed: 7,
        prefetch: 2,
        skip_invalid: skip,
        aspect_groups: None,
        skipped: Default::default(),
        shard: Default::default(),
    };
    let summary = |l: &DataLoader, epoch: u64| -> Vec<(u64, (usize, usize), bool)> {
        l.epoch(epoch)
            .flat_map(|b| b.unwrap())
            .map(|s| (s.img_id, s.img_shape, s.flip))
            .collect()
    };
    let a = summary(&mk(2), 0);
    assert_eq!(a.len(), 32);
    assert_eq!(a, summary(&mk(0), 0), "same result with 0 and 2 workers");
    assert_ne!(a, summary(&mk(2), 1), "another epoch, another order");
    let l = mk(2);
    assert_eq!(l.num_batches(), 11);
    let batch = l.epoch(0).next().unwrap().unwrap();
    let norm = Normalization {
        mean: [123.675, 116.28, 103.53],
        std: [58.395, 57.12, 57.375],
    };
    let b = collate(batch, Some(&norm), 32, &candle_core::Device::Cpu).unwrap();
    let d = b.images.dims().to_vec();
    assert_eq!((d[0], d[1], d[2] % 32, d[3] % 32), (3, 3, 0, 0));
    assert_eq!(b.samples.len(), 3);
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

fn coco_json(anns: &str) -> String {
    format!(
        r#"{{"images": [{{"id": 1, "file_name": "a.jpg", "height": 40, "width": 50}}], "categories": [{{"id": 3, "name": "car"}}], "annotations": [{anns}]}}"#
    )
}

/// Bad input: each case is an error naming the file, the record and the field — or, with
/// `skip_invalid`, skipped and counted.
#[test]
fn bad_annotations_are_named_errors() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        (
            r#"{"id": 11, "image_id": 1, "category_id": 3, "bbox": [60, 45, 5, 5], "area": 25}"#,
            "annotation id 11",
            "bbox",
            "outside",
        ),
        (
            r#"{"id": 12, "image_id": 1, "category_id": 3, "bbox": [1, 1, -5, 5], "area": 25}"#,
            "annotation id 12",
            "bbox",
            "non-positive",
        ),
        (
            r#"{"id": 16, "image_id": 1, "category_id": 3, "bbox": [1, 1, 0, 5], "area": 25}"#,
            "annotation id 16",
            "bbox",
            "non-positive",
        ),
        (
            r#"{"id": 13, "image_id": 1, "category_id": 3, "bbox": [1, 1, 5, 5], "area": 25, "segmentation": [[1, 1, 2, 2]]}"#,
            "annotation id 13",
            "segmentation",
            "polygon",
        ),
        (
            r#"{"id": 14, "image_id": 9, "category_id": 3, "bbox": [1, 1, 5, 5], "area": 25}"#,
            "annotation id 14",
            "image_id",
            "no image",
        ),
        (
            r#"{"id": 15, "image_id": 1, "category_id": 77, "bbox": [1, 1, 5, 5], "area": 25}"#,
            "annotation id 15",
            "category_id",
            "no category",
        ),
    ];
    for (ann, record, field, what) in cases {
        let f = write(dir.path(), "ann.json", &coco_json(ann));
        let err = CocoDataset::load(&f, dir.path(), &CocoOptions::default()).unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, DataError::Record { .. }), "{msg}");
        assert!(
            msg.contains("ann.json")
                && msg.contains(record)
                && msg.contains(field)
                && msg.contains(what),
            "{msg}"
        );
    }
    // skip_invalid: warning, skipped and counted (box/polygon problems).
    let f = write(
        dir.path(),
        "ann.json",
        &coco_json(
            &[
                cases[0].0,
                cases[1].0,
                r#"{"id": 20, "image_id": 1, "category_id": 3, "bbox": [1, 1, 5, 5], "area": 25}"#,
            ]
            .join(","),
        ),
    );
    let ds = CocoDataset::load(
        &f,
        dir.path(),
        &CocoOptions {
            skip_invalid: true,
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(ds.skipped, 2);
    assert_eq!(ds.dropped_tiny, 0);
    assert_eq!(ds.sample(0).ann_instances.len(), 1);
    // Malformed JSON and a missing file.
    let f = write(dir.path(), "broken.json", "{\"images\": [");
    assert!(CocoDataset::load(&f, dir.path(), &CocoOptions::default())
        .unwrap_err()
        .to_string()
        .contains("broken.json"));
    assert!(CocoDataset::load(
        &dir.path().join("nope.json"),
        dir.path(),
        &CocoOptions::default()
    )
    .unwrap_err()
    .to_string()
    .contains("nope.json"));
}

#[test]
fn bad_files_are_named_errors() {
    let dir = tempfile::tempdir().unwrap();
    // A truncated JPEG.
    let bytes = std::fs::read(assets().join("mini_coco/images/000000000009.jpg")).unwrap();
    std::fs::write(dir.path().join("a.jpg"), &bytes[..bytes.len() / 3]).unwrap();
    let f = write(
        dir.path(),
        "ann.json",
        &coco_json(
            r#"{"id": 20, "image_id": 1, "category_id": 3, "bbox": [1, 1, 5, 5], "area": 25}"#,
        ),
    );
    let ds = CocoDataset::load(&f, dir.path(), &CocoOptions::default()).unwrap();
    let p = pipeline("[[pipeline]]\ntype = \"LoadImageFromFile\"\n");
    let mut rng = rand::rngs::StdRng::seed_from_u64(0);
    let e = p.apply(ds.sample(0), &mut rng).unwrap_err().to_string();
    assert!(e.contains("a.jpg") && e.contains("truncated"), "{e}");
    // Garbage bytes.
    std::fs::write(dir.path().join("a.jpg"), b"not an image at all").unwrap();
    let e = p.apply(ds.sample(0), &mut rng).unwrap_err().to_string();
    assert!(e.contains("a.jpg"), "{e}");
    // Missing image file.
    std::fs::remove_file(dir.path().join("a.jpg")).unwrap();
    let e = p.apply(ds.sample(0), &mut rng).unwrap_err().to_string();
    assert!(e.contains("a.jpg"), "{e}");
    // A label map whose size differs from its image.
    let seg_root = dir.path().join("ade");
    std::fs::create_dir_all(seg_root.join("img")).unwrap();
    std::fs::create_dir_all(seg_root.join("ann")).unwrap();
    std::fs::copy(
        assets().join("ade20k_samples/images/validation/ADE_val_00000001.jpg"),
        seg_root.join("img/x.jpg"),
    )
    .unwrap();
    image::GrayImage::new(7, 5)
        .save(seg_root.join("ann/x.png"))
        .unwrap();
    let ds = Ade20kDataset::load(
        &seg_root,
        &seg_root.join("img"),
        &seg_root.join("ann"),
        None,
        true,
    )
    .unwrap();
    let p = pipeline(
        "[[pipeline]]\ntype = \"LoadImageFromFile\"\n[[pipeline]]\ntype = \"LoadAnnotations\"\n",
    );
    let e = p.apply(ds.sample(0), &mut rng).unwrap_err().to_string();
    assert!(e.contains("x.png") && e.contains("7x5"), "{e}");
    // An image without a label map.
    std::fs::remove_file(seg_root.join("ann/x.png")).unwrap();
    let e = Ade20kDataset::load(
        &seg_root,
        &seg_root.join("img"),
        &seg_root.join("ann"),
        None,
        true,
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("x.png") && e.contains("no label map"), "{e}");
    // A typo in a transform is a config error naming the key.
    #[derive(serde::Deserialize, Debug)]
    #[allow(dead_code)]
    struct P {
        pipeline: Vec<TransformConfig>,
    }
    let e = toml::from_str::<P>("[[pipeline]]\ntype = \"Resize\"\nscal = [1, 2]\n")
        .unwrap_err()
        .to_string();
    assert!(e.contains("scal"), "{e}");
}

/// mmdet / mmseg test pipelines load annotations after `Resize`: they stay at the file's scale.
#[test]
fn annotations_loaded_after_resize_stay_at_original_scale() {
    let ds = mini_coco("val", &CocoOptions::default());
    let p = pipeline("[[pipeline]]\ntype = \"LoadImageFromFile\"\n[[pipeline]]\ntype = \"Resize\"\nscale = [160, 160]\nkeep_ratio = true\n[[pipeline]]\ntype = \"LoadAnnotations\"\n");
    let src = ds.sample(0);
    let s = p
        .apply(src.clone(), &mut rand::rngs::StdRng::seed_from_u64(0))
        .unwrap();
    assert!(s.img_shape.0.max(s.img_shape.1) == 160 && s.scale_factor.0 < 1.0);
    assert_eq!(s.instances, src.ann_instances);
    let root = assets().join("mini_ade");
    let ade = Ade20kDataset::load(
        &root,
        &root.join("images/validation"),
        &root.join("annotations/validation"),
        None,
        true,
    )
    .unwrap();
    let s = p
        .apply(ade.sample(0), &mut rand::rngs::StdRng::seed_from_u64(0))
        .unwrap();
    assert_eq!(s.gt_seg_map.unwrap().dim(), s.ori_shape);
}

/// The resize keeps a constant image constant and maps a horizontal ramp to the ramp sampled at
/// half-pixel centres (bilinear interpolation, OpenCV's convention).
#[test]
fn bilinear_resize_conventions() {
    use densepred_datasets::transforms::resize_bilinear;
    let flat = ndarray::Array3::from_elem((10, 12, 3), 77.0f32);
    assert!(resize_bilinear(&flat, 5, 7)
        .unwrap()
        .iter()
        .all(|&v| (v - 77.0).abs() < 1e-3));
    let ramp = ndarray::Array3::from_shape_fn((4, 8, 3), |(_, x, _)| x as f32);
    let up = resize_bilinear(&ramp, 4, 16).unwrap();
    // Output pixel x samples input coordinate (x + 0.5) / 2 − 0.5, clamped at the borders.
    for x in 0..16 {
        let want = (((x as f32 + 0.5) / 2.0) - 0.5).clamp(0.0, 7.0);
        assert!(
            (up[(1, x, 0)] - want).abs() < 1e-3,
            "x {x}: {} vs {want}",
            up[(1, x, 0)]
        );
    }
    assert!(resize_bilinear(&ndarray::Array3::zeros((3, 3, 1)), 2, 2).is_err());
}

/// mmengine's `DefaultSampler` across ranks: every rank draws the same epoch order (seeded by
/// seed and epoch), padded by repeating its head to a multiple of the world size; rank `r` takes
/// every `world`-th index from `r`. The shards of one epoch are disjoint apart from the padding
/// and together cover the dataset; the order changes with the epoch.
#[test]
fn shards_of_an_epoch_are_disjoint_and_cover_the_dataset() {
    use densepred_datasets::loader::Shard;
    for (n, world) in [(10usize, 2usize), (11, 2), (7, 3), (5, 8), (12, 1)] {
        let order: Vec<usize> = (0..n).rev().collect();
        let shards: Vec<Vec<usize>> = (0..world)
            .map(|rank| Shard::train(rank, world).take(&order))
            .collect();
        let per = n.div_ceil(world);
        assert!(shards.iter().all(|s| s.len() == per), "{n} {world}");
        // Interleaved back together: the order, then the padding from its head.
        let mut joined = Vec::new();
        for i in 0..per {
            for s in &shards {
                joined.push(s[i]);
            }
        }
        let padded: Vec<usize> = (0..per * world).map(|i| order[i % n]).collect();
        assert_eq!(joined, padded, "{n} {world}");
        let mut all: Vec<usize> = joined[..n].to_vec();
        all.sort_unstable();
        assert_eq!(
            all,
            (0..n).collect::<Vec<_>>(),
            "{n} {world}: cover without overlap"
        );
        // Evaluation shards: no padding, each index exactly once, `len` is each rank's count.
        let eval: Vec<Vec<usize>> = (0..world)
            .map(|rank| Shard::eval(rank, world).take(&order))
            .collect();
        for (rank, s) in eval.iter().enumerate() {
            assert_eq!(
                s.len(),
                Shard::eval(rank, world).len(n),
                "{n} {world} {rank}"
            );
        }
        let mut all: Vec<usize> = eval.concat();
        assert_eq!(all.len(), n, "{n} {world}");
        all.sort_unstable();
        assert_eq!(all, (0..n).collect::<Vec<_>>(), "{n} {world}");
    }
}
