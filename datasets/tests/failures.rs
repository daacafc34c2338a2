//! Failures reach the caller by name: loader workers that fail or panic, transforms with
//! nonsensical parameters, palette label maps, mmdet's `AspectRatioBatchSampler`.

use densepred_datasets::config::DataloaderConfig;
use densepred_datasets::loader::{aspect_ratio_groups, DataLoader};
use densepred_datasets::transforms::{load_label, Pipeline, ScaleSpec, TransformConfig};
use densepred_datasets::{DataError, Dataset, MetaInfo, Sample};
use std::path::{Path, PathBuf};
use std::sync::Arc;

fn assets() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../assets")
}

/// `n` copies of one real mini-COCO image with the given `(h, w)` sizes in its "annotations";
/// `sample(panic_at)` panics (a bug outside the pipeline).
struct Images {
    sizes: Vec<(usize, usize)>,
    panic_at: Option<usize>,
    meta: MetaInfo,
}

impl Images {
    fn new(sizes: Vec<(usize, usize)>, panic_at: Option<usize>) -> Self {
        Self {
            sizes,
            panic_at,
            meta: MetaInfo {
                classes: vec!["thing".into()],
                cat_ids: vec![1],
            },
        }
    }
}

impl Dataset for Images {
    fn len(&self) -> usize {
        self.sizes.len()
    }
    fn sample(&self, i: usize) -> Sample {
        assert!(self.panic_at != Some(i), "sample {i} is broken");
        let mut s = Sample::new(
            assets().join("mini_coco/images/000000000009.jpg"),
            i as u64 + 100,
        );
        s.ori_shape = self.sizes[i];
        s
    }
    fn metainfo(&self) -> &MetaInfo {
        &self.meta
    }
}

fn loader(
    ds: Images,
    pipeline: Vec<TransformConfig>,
    batch_size: usize,
    workers: usize,
) -> DataLoader {
    DataLoader {
        dataset: Arc::new(ds),
        pipeline: Pipeline(pipeline),
        batch_size,
        num_workers: workers,
        shuffle: false,
        drop_last: false,
        seed: 0,
        prefetch: 1,
        skip_invalid: false,
        aspect_groups: None,
        skipped: Default::default(),
        shard: Default::default(),
    }
}

#[test]
fn a_panicking_transform_is_an_error_naming_image_and_transform() {
    // A reversed ratio range (refused when a config is read, built here directly) makes the
    // random draw panic inside the worker.
    let bad = TransformConfig::RandomResize {
        scale: ScaleSpec::One([100.0, 100.0]),
        ratio_range: Some([2.0, 1.0]),
        keep_ratio: true,
    };
    for workers in [0, 2] {
        let l = loader(
            Images::new(vec![(10, 10); 4], None),
            vec![bad.clone()],
            2,
            workers,
        );
        let items: Vec<_> = l.epoch(0).collect();
        assert_eq!(items.len(), 1, "the epoch ends at the first error");
        let err = items.into_iter().next().unwrap().unwrap_err();
        let msg = err.to_string();
        match &err {
            DataError::Sample {
                img_path,
                img_id,
                step,
                transform,
                source,
            } => {
                assert!(img_path.ends_with("000000000009.jpg"), "{msg}");
                assert!(*img_id == 100 || *img_id == 101, "{msg}");
                assert_eq!((*step, *transform), (0, "RandomResize"));
                assert!(matches!(**source, DataError::Panic(_)), "{msg}");
            }
            other => panic!("expected a Sample error, got {other:?}"),
        }
        assert!(
            msg.contains("000000000009.jpg") && msg.contains("RandomResize"),
            "{msg}"
        );
    }
}

#[test]
fn a_transform_error_names_image_and_transform() {
    // Size (0, 0): unknown before decoding, so LoadImageFromFile takes the file's.
    let mut l = loader(Images::new(vec![(0, 0)], None), vec![], 1, 0);
    // A Resize without scale fails at run time (a config would be refused earlier).
    l.pipeline = Pipeline(vec![
        TransformConfig::LoadImageFromFile {
            to_float32: false,
            backend_args: None,
        },
        TransformConfig::Resize {
            scale: None,
            scale_factor: None,
            keep_ratio: true,
            clip_object_border: true,
        },
    ]);
    let err = l.epoch(0).next().unwrap().unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains("image id 100") && msg.contains("pipeline step 1 (Resize)"),
        "{msg}"
    );
}

#[test]
fn a_loading_thread_that_dies_is_an_error_not_a_short_epoch() {
    // sample(3) panics outside the pipeline: the producer thread dies after batch 1 of 3.
    let l = loader(Images::new(vec![(10, 10); 6], Some(3)), vec![], 2, 0);
    let items: Vec<_> = l.epoch(0).collect();
    assert_eq!(items.len(), 2, "one good batch, then the error");
    assert!(items[0].is_ok());
    let err = items[1].as_ref().unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, DataError::Loader(_)), "{msg}");
    assert!(
        msg.contains("after 1 of 3 batches") && msg.contains("sample 3 is broken"),
        "{msg}"
    );
    // A whole epoch still ends cleanly.
    let ok = loader(Images::new(vec![(10, 10); 5], None), vec![], 2, 2);
    let sizes: Vec<usize> = ok.epoch(0).map(|b| b.unwrap().len()).collect();
    assert_eq!(sizes, vec![2, 2, 1]);
}

#[test]
fn aspect_ratio_batch_sampler_groups_by_orientation_as_mmdet() {
    // Portrait (w < h) = group 0, landscape or square = group 1.
    let sizes = vec![
        (20, 10), // 0 portrait
        (10, 20), // 1 landscape
        (20, 10), // 2 portrait
        (10, 10), // 3 square → landscape
        (10, 20), // 4 landscape
        (20, 10), // 5 portrait
        (20, 10), // 6 portrait
    ];
    let ds = Images::new(sizes, None);
    let groups = aspect_ratio_groups(&ds).unwrap();
    assert_eq!(groups, vec![0, 1, 0, 1, 1, 0, 0]);
    let mut l = loader(ds, vec![], 2, 0);
    l.aspect_groups = Some(Arc::new(groups));
    // mmdet's AspectRatioBatchSampler over the order 0..7: a bucket is yielded when it fills;
    // the leftovers (portrait first) end the epoch.
    assert_eq!(
        l.batches(0),
        vec![vec![0, 2], vec![1, 3], vec![5, 6], vec![4]]
    );
    assert_eq!(l.num_batches(), 4);
    let ids: Vec<Vec<u64>> = l
        .epoch(0)
        .map(|b| b.unwrap().iter().map(|s| s.img_id - 100).collect())
        .collect();
    assert_eq!(ids, vec![vec![0, 2], vec![1, 3], vec![5, 6], vec![4]]);
    l.drop_last = true;
    assert_eq!(l.batches(0).len(), 3);
    assert_eq!(l.num_batches(), 3);
    // Shuffled epochs: every sample once, each full batch of one orientation.
    l.drop_last = false;
    l.shuffle = true;
    let g = l.aspect_groups.clone().unwrap();
    for epoch in 0..5 {
        let b = l.batches(epoch);
        assert_eq!(b.len(), l.num_batches());
        let mut all: Vec<usize> = b.iter().flatten().copied().collect();
        all.sort();
        assert_eq!(all, (0..7).collect::<Vec<_>>());
        let full = b.iter().filter(|x| x.len() == 2).count();
        assert_eq!(full, 3);
        for x in b.iter().take(full) {
            assert_eq!(g[x[0]], g[x[1]], "epoch {epoch}: {b:?}");
        }
    }
    // Sizes unknown before decoding: refused by name.
    let unknown = Images::new(vec![(0, 0)], None);
    let err = aspect_ratio_groups(&unknown).unwrap_err().to_string();
    assert!(
        err.contains("AspectRatioBatchSampler") && err.contains("image id 100"),
        "{err}"
    );
}

fn dataloader_toml(pipeline: &str) -> Result<(), (String, String)> {
    let text = format!(
        "batch_size = 1\n[dataset]\ntype = \"CocoDataset\"\nann_file = \"a.json\"\n{pipeline}"
    );
    let cfg: DataloaderConfig = toml::from_str(&text).unwrap();
    cfg.validate()
}

#[test]
fn nonsensical_transform_parameters_are_refused_with_their_key() {
    let cases = [
        (
            "{ type = \"RandomResize\", scale = [100, 100], ratio_range = [2.0, 0.5] }",
            "ratio_range",
        ),
        (
            "{ type = \"RandomResize\", scale = [0, 100], ratio_range = [0.5, 2.0] }",
            "scale",
        ),
        (
            "{ type = \"PhotoMetricDistortion\", brightness_delta = -1 }",
            "brightness_delta",
        ),
        (
            "{ type = \"PhotoMetricDistortion\", hue_delta = -3 }",
            "hue_delta",
        ),
        (
            "{ type = \"PhotoMetricDistortion\", contrast_range = [1.5, 0.5] }",
            "contrast_range",
        ),
        (
            "{ type = \"PhotoMetricDistortion\", saturation_range = [1.5, 0.5] }",
            "saturation_range",
        ),
        ("{ type = \"Resize\", scale = [-5, 100] }", "scale"),
        ("{ type = \"Resize\", scale_factor = 0.0 }", "scale_factor"),
        ("{ type = \"RandomFlip\", prob = 1.5 }", "prob"),
        ("{ type = \"RandomChoiceResize\", scales = [] }", "scales"),
        ("{ type = \"Pad\", size = [0, 4] }", "size"),
        (
            "{ type = \"Normalize\", mean = [0, 0, 0], std = [1, 0, 1] }",
            "std",
        ),
        (
            "{ type = \"AutoAugment\", policies = [[{ type = \"RandomFlip\", prob = -1 }]] }",
            "policies.0.0.prob",
        ),
    ];
    for (t, key) in cases {
        let pipeline = format!("pipeline = [{{ type = \"LoadImageFromFile\" }}, {t}]");
        let (at, why) = dataloader_toml(&pipeline).expect_err(t);
        assert_eq!(at, format!("dataset.pipeline.1.{key}"), "{t}: {why}");
    }
    // The defaults and mmdet's usual values pass.
    dataloader_toml(
        "pipeline = [{ type = \"PhotoMetricDistortion\" }, { type = \"RandomResize\", \
         scale = [2048, 512], ratio_range = [0.5, 2.0], keep_ratio = true }]",
    )
    .unwrap();
}

fn write_png(
    path: &Path,
    color: png::ColorType,
    depth: png::BitDepth,
    w: u32,
    h: u32,
    data: &[u8],
) {
    let f = std::fs::File::create(path).unwrap();
    let mut e = png::Encoder::new(std::io::BufWriter::new(f), w, h);
    e.set_color(color);
    e.set_depth(depth);
    if color == png::ColorType::Indexed {
        // A palette whose colours differ from the indices: reading colours would be wrong.
        let palette: Vec<u8> = (0..=255u8).flat_map(|i| [255 - i, i / 2, 7]).collect();
        e.set_palette(palette);
    }
    e.write_header().unwrap().write_image_data(data).unwrap();
}

#[test]
fn palette_label_maps_read_as_indices() {
    let dir = tempfile::tempdir().unwrap();
    // 8-bit palette ("P" mode), 3x2.
    let p8 = dir.path().join("p8.png");
    write_png(
        &p8,
        png::ColorType::Indexed,
        png::BitDepth::Eight,
        3,
        2,
        &[0, 1, 2, 3, 255, 17],
    );
    let m = load_label(&p8).unwrap();
    assert_eq!(m.dim(), (2, 3));
    assert_eq!(
        m.iter().copied().collect::<Vec<_>>(),
        vec![0, 1, 2, 3, 255, 17]
    );
    // 4-bit palette, width 3 (rows padded to whole bytes): indices 1 2 3 / 4 5 15.
    let p4 = dir.path().join("p4.png");
    write_png(
        &p4,
        png::ColorType::Indexed,
        png::BitDepth::Four,
        3,
        2,
        &[0x12, 0x30, 0x45, 0xF0],
    );
    let m = load_label(&p4).unwrap();
    assert_eq!(
        m.iter().copied().collect::<Vec<_>>(),
        vec![1, 2, 3, 4, 5, 15]
    );
    // Grayscale still reads as is.
    let g = dir.path().join("g.png");
    write_png(
        &g,
        png::ColorType::Grayscale,
        png::BitDepth::Eight,
        2,
        1,
        &[9, 150],
    );
    assert_eq!(
        load_label(&g).unwrap().iter().copied().collect::<Vec<_>>(),
        vec![9, 150]
    );
    // RGB is refused, naming the file and the colour type.
    let rgb = dir.path().join("rgb.png");
    write_png(
        &rgb,
        png::ColorType::Rgb,
        png::BitDepth::Eight,
        1,
        1,
        &[1, 2, 3],
    );
    let err = load_label(&rgb).unwrap_err().to_string();
    assert!(err.contains("rgb.png") && err.contains("Rgb"), "{err}");
}

/// A sample of a real image with one instance whose raw segmentation is `seg`.
fn sample_with_segmentation(seg: Option<serde_json::Value>) -> Sample {
    let mut s = Sample::new(assets().join("mini_coco/images/000000000009.jpg"), 9);
    s.ann_instances = vec![densepred_datasets::Instance {
        bbox: [10.0, 10.0, 50.0, 50.0],
        label: 0,
        ignore: false,
        ann_id: 4242,
    }];
    s.segmentations = vec![seg.map(|v| serde_json::from_value(v).unwrap())];
    s
}

fn load_masks(s: Sample) -> Result<Sample, DataError> {
    let p: Vec<TransformConfig> = serde_json::from_value(serde_json::json!([
        {"type": "LoadImageFromFile"},
        {"type": "LoadAnnotations", "with_bbox": true, "with_mask": true},
    ]))
    .unwrap();
    Pipeline(p).apply(
        s,
        &mut <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(0),
    )
}

#[test]
fn bad_instance_masks_are_errors_naming_file_image_and_annotation() {
    // No segmentation at all.
    let e = load_masks(sample_with_segmentation(None))
        .unwrap_err()
        .to_string();
    for want in [
        "000000000009.jpg",
        "image id 9",
        "annotation id 4242",
        "segmentation",
        "missing",
    ] {
        assert!(e.contains(want), "{want:?} not in {e:?}");
    }
    // An RLE whose size disagrees with the image (480x640).
    let rle = serde_json::json!({"size": [10, 10], "counts": [100]});
    let e = load_masks(sample_with_segmentation(Some(rle)))
        .unwrap_err()
        .to_string();
    for want in [
        "000000000009.jpg",
        "image id 9",
        "annotation id 4242",
        "RLE size",
    ] {
        assert!(e.contains(want), "{want:?} not in {e:?}");
    }
    // A valid polygon rasterises.
    let poly = serde_json::json!([[10.0, 10.0, 50.0, 10.0, 50.0, 50.0]]);
    let s = load_masks(sample_with_segmentation(Some(poly))).unwrap();
    let m = &s.masks.as_ref().unwrap()[0];
    assert_eq!(m.dim(), (480, 640));
    assert!(m.iter().filter(|&&v| v == 1).count() > 500);
}
