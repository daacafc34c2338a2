//! Inference over a dataloader and its evaluation (mmengine's `ValLoop` / `TestLoop` with
//! mmdetection's `CocoMetric` for detectors, mmsegmentation's `IoUMetric` for segmentors).

use crate::dist::Dist;
use crate::runner::{
    build_loader, model_inputs, to_batch, BuiltModel, CandleContext, EngineError, EvaluatorConfig,
    Loader,
};
use candle_core::Device;
use candle_core::Tensor;
use densepred_datasets::config::DataloaderConfig;
use densepred_datasets::transforms::{Pipeline, TransformConfig};
use densepred_evaluation::coco::{
    evaluate_records, load_gt, to_coco_results, CocoIouType, CocoSummary, ImageDetections,
};
use densepred_evaluation::semseg::{IoUMetric, SegMetrics};
use indicatif::{ProgressBar, ProgressStyle};
use std::path::PathBuf;

/// Detections of one image with where it came from.
pub struct ImageResult {
    /// COCO image id.
    pub img_id: u64,
    /// Image file.
    pub img_path: PathBuf,
    /// Detections in original-image pixels. Masks are not kept here (they would hold a full
    /// image per detection for the whole split): they are in [`TestOutput::segm_records`], in
    /// the same order, as COCO RLE.
    pub dets: densepred_core::structures::Detections,
}

/// The outcome of a test run.
pub struct TestOutput {
    /// Per-image detections, in loader order.
    pub images: Vec<ImageResult>,
    /// COCO results records (xywh in original pixels, original category ids).
    pub records: Vec<serde_json::Value>,
    /// The COCO bbox summary (absent with `format_only`).
    pub summary: Option<CocoSummary>,
    /// Instance segmentation results records (`segmentation` as compressed RLE), for detectors
    /// with a mask head.
    pub segm_records: Option<Vec<serde_json::Value>>,
    /// The COCO segm summary, when the evaluator asks for `"segm"` (absent with `format_only`).
    pub segm_summary: Option<CocoSummary>,
    /// Class names of the dataset.
    pub classes: Vec<String>,
    /// Images left out because they failed to load (`skip_invalid`; otherwise 0).
    pub skipped: usize,
}

/// Checks that a test pass saw every image of the split: `evaluated` of `total`. Fewer is an
/// error unless the dataset sets `skip_invalid`; then the count of skipped images is returned and
/// logged.
///
/// Errors: [`EngineError::Data`] naming how many images were evaluated.
pub fn check_all_evaluated(
    loader: &densepred_datasets::loader::DataLoader,
    evaluated: usize,
    total: usize,
) -> Result<usize, EngineError> {
    if evaluated >= total {
        return Ok(0);
    }
    let skipped = total - evaluated;
    if !loader.skip_invalid {
        return Err(EngineError::Data(densepred_datasets::DataError::Loader(
            format!("evaluated {evaluated} of the {total} images of the split"),
        )));
    }
    tracing::warn!("skip_invalid: {skipped} of {total} images could not be loaded and were left out of the metrics");
    Ok(skipped)
}

/// A progress bar on stderr (hidden when `show` is false).
pub fn progress_bar(len: u64, show: bool, what: &str) -> ProgressBar {
    if !show {
        return ProgressBar::hidden();
    }
    let pb = ProgressBar::new(len);
    pb.set_style(
        ProgressStyle::with_template(
            "{prefix} [{bar:30}] {pos}/{len} {elapsed_precise} ETA {eta_precise} {msg}",
        )
        .expect("valid template")
        .progress_chars("=> "),
    );
    pb.set_prefix(what.to_string());
    pb
}

/// Runs `model` over `dl` and evaluates with `evaluator` (every rank of `dist` its
/// [`Dist::eval_shard`]; rank 0 gathers and evaluates, see [`evaluate_loader`]).
///
/// Errors: data, model or evaluation errors; a metric other than `bbox`.
pub fn run_test(
    model: &BuiltModel,
    dl: &DataloaderConfig,
    evaluator: &EvaluatorConfig,
    seed: u64,
    device: &Device,
    show_progress: bool,
    dist: &Dist,
) -> Result<TestOutput, EngineError> {
    let Loader { loader, dataset } = build_loader(dl, seed, false)?;
    evaluate_loader(
        model,
        &loader,
        dataset.as_ref(),
        evaluator,
        device,
        show_progress,
        dist,
    )
}

/// [`run_test`] on an already built loader. In a data-parallel run every rank predicts its
/// [`Dist::eval_shard`] of the split and rank 0 gathers the detections and evaluates
/// (mmengine's `collect_results`): the other ranks return an output without images, records or
/// summaries.
pub fn evaluate_loader(
    model: &BuiltModel,
    loader: &densepred_datasets::loader::DataLoader,
    dataset: &dyn densepred_datasets::Dataset,
    evaluator: &EvaluatorConfig,
    device: &Device,
    show_progress: bool,
    dist: &Dist,
) -> Result<TestOutput, EngineError> {
    let detector = model.inference_detector()?;
    if evaluator.kind != "CocoMetric" {
        return Err(EngineError::Config(format!(
            "evaluator type {:?} is not supported for detectors (CocoMetric)",
            evaluator.kind
        )));
    }
    let metrics: Vec<String> = match &evaluator.metric {
        None => vec!["bbox".into()],
        Some(toml::Value::String(s)) => vec![s.clone()],
        Some(toml::Value::Array(a)) => a
            .iter()
            .filter_map(|v| v.as_str().map(String::from))
            .collect(),
        Some(o) => {
            return Err(EngineError::Config(format!(
                "evaluator.metric: expected a string or list, got {o}"
            )))
        }
    };
    if let Some(m) = metrics.iter().find(|m| *m != "bbox" && *m != "segm") {
        return Err(EngineError::Config(format!(
            "evaluator.metric {m:?} is not supported (\"bbox\", \"segm\")"
        )));
    }
    let want_segm = metrics.iter().any(|m| m == "segm");
    if want_segm && !detector.with_mask() {
        return Err(EngineError::Config(
            "evaluator.metric \"segm\" needs a detector with a mask head (MaskRCNN)".into(),
        ));
    }
    let meta = dataset.metainfo();
    let mut loader = loader.clone();
    loader.shard = dist.eval_shard();
    let pb = progress_bar(
        loader.num_batches() as u64,
        show_progress && dist.is_main(),
        "test",
    );
    let mut images = Vec::new();
    let mut records = Vec::new();
    let mut segm_records: Option<Vec<serde_json::Value>> = None;
    for batch in loader.epoch(0) {
        let batch = to_batch(model, batch?, device, false)?;
        let (x, metas, _) = model_inputs(&batch);
        let dets = detector.predict(&x, &metas).ctx("inference")?;
        for (s, mut d) in batch.samples.iter().zip(dets) {
            // Masks become RLE records right away; the bitmaps are dropped.
            let masks = d.masks.take().map(|m| {
                let (h, w) = m.size;
                (m.masks, (h as u32, w as u32))
            });
            let (b, sg) = to_coco_results(
                &[ImageDetections {
                    image_id: s.img_id,
                    boxes: d.bboxes.clone(),
                    scores: d.scores.clone(),
                    labels: d.labels.iter().map(|&l| l as usize).collect(),
                    masks,
                }],
                &meta.cat_ids,
            )?;
            records.extend(b);
            if let Some(sg) = sg {
                segm_records.get_or_insert_with(Vec::new).extend(sg);
            } else if detector.with_mask() {
                segm_records.get_or_insert_with(Vec::new);
            }
            images.push(ImageResult {
                img_id: s.img_id,
                img_path: s.img_path.clone(),
                dets: d,
            });
        }
        pb.inc(1);
    }
    pb.finish_and_clear();
    let Some((images, records, segm_records)) =
        gather_detections(dist, images, records, segm_records)?
    else {
        return Ok(TestOutput {
            images: Vec::new(),
            records: Vec::new(),
            summary: None,
            segm_records: None,
            segm_summary: None,
            classes: meta.classes.clone(),
            skipped: 0,
        });
    };
    let skipped = check_all_evaluated(&loader, images.len(), dataset.len())?;
    let (summary, segm_summary) = if evaluator.format_only {
        (None, None)
    } else {
        let ann = evaluator.ann_file.as_ref().ok_or_else(|| {
            EngineError::Config(
                "CocoMetric needs ann_file (the ground-truth instances JSON)".into(),
            )
        })?;
        let gt = load_gt(ann)?;
        let bbox = if metrics.iter().any(|m| m == "bbox") {
            Some(evaluate_records(&gt, &records, CocoIouType::Bbox)?)
        } else {
            None
        };
        let segm = match (&segm_records, want_segm) {
            (Some(r), true) => Some(evaluate_records(&gt, r, CocoIouType::Segm)?),
            _ => None,
        };
        (bbox, segm)
    };
    if let Some(prefix) = &evaluator.outfile_prefix {
        densepred_evaluation::coco::dump_results(prefix, &records, segm_records.as_deref())?;
    }
    Ok(TestOutput {
        images,
        records,
        summary,
        segm_records,
        segm_summary,
        classes: meta.classes.clone(),
        skipped,
    })
}

/// The ranks' results back in the split's order: rank `r` of `world` held positions
/// `r, r + world, …` ([`Dist::eval_shard`]), so round `k` takes each rank's `k`-th item.
fn interleave<T>(mut per_rank: Vec<std::vec::IntoIter<T>>) -> Vec<T> {
    let mut out = Vec::new();
    loop {
        let before = out.len();
        out.extend(per_rank.iter_mut().filter_map(|it| it.next()));
        if out.len() == before {
            return out;
        }
    }
}

/// Field `k` of `v`, gathered from rank `r`.
///
/// Errors: a missing field or one of another type, naming the rank and the field.
fn field<T: serde::de::DeserializeOwned>(
    v: &serde_json::Value,
    k: &str,
    r: usize,
) -> Result<T, EngineError> {
    serde_json::from_value(v[k].clone())
        .map_err(|e| EngineError::Config(format!("results gathered from rank {r}: {k}: {e}")))
}

/// Rank 0's view of a data-parallel detection test: every rank's images (in the split's order:
/// rank `r` held positions `r, r + world, …`) and their results records, ordered by image;
/// `None` on the other ranks. One process returns its own.
///
/// Errors: MPI message limits, malformed gathered results.
#[allow(clippy::type_complexity)]
fn gather_detections(
    dist: &Dist,
    images: Vec<ImageResult>,
    records: Vec<serde_json::Value>,
    segm: Option<Vec<serde_json::Value>>,
) -> Result<
    Option<(
        Vec<ImageResult>,
        Vec<serde_json::Value>,
        Option<Vec<serde_json::Value>>,
    )>,
    EngineError,
> {
    if dist.world == 1 {
        return Ok(Some((images, records, segm)));
    }
    let mine = serde_json::json!({
        "images": images.iter().map(|i| serde_json::json!({
            "img_id": i.img_id,
            "img_path": i.img_path,
            "bboxes": i.dets.bboxes,
            "scores": i.dets.scores,
            "labels": i.dets.labels,
        })).collect::<Vec<_>>(),
        "records": records,
        "segm": segm,
    });
    let Some(parts) = dist.gather_json(&mine)? else {
        return Ok(None);
    };
    let bad = |r: usize, what: &str| {
        EngineError::Config(format!("results gathered from rank {r}: bad {what}"))
    };
    let mut per_rank = Vec::with_capacity(parts.len());
    let (mut records, mut segm_all) = (Vec::new(), None::<Vec<serde_json::Value>>);
    for (r, mut p) in parts.into_iter().enumerate() {
        let imgs: Vec<ImageResult> = p["images"]
            .as_array()
            .ok_or_else(|| bad(r, "images"))?
            .iter()
            .map(|v| {
                Ok(ImageResult {
                    img_id: field(v, "img_id", r)?,
                    img_path: field(v, "img_path", r)?,
                    dets: densepred_core::structures::Detections {
                        bboxes: field(v, "bboxes", r)?,
                        scores: field(v, "scores", r)?,
                        labels: field(v, "labels", r)?,
                        masks: None,
                    },
                })
            })
            .collect::<Result<_, EngineError>>()?;
        per_rank.push(imgs.into_iter());
        match p["records"].take() {
            serde_json::Value::Array(a) => records.extend(a),
            _ => return Err(bad(r, "records")),
        }
        match p["segm"].take() {
            serde_json::Value::Array(a) => segm_all.get_or_insert_with(Vec::new).extend(a),
            serde_json::Value::Null => {}
            _ => return Err(bad(r, "segm")),
        }
    }
    let images = interleave(per_rank);
    let pos: std::collections::HashMap<u64, usize> = images
        .iter()
        .enumerate()
        .map(|(i, im)| (im.img_id, i))
        .collect();
    let key = |r: &serde_json::Value| {
        r["image_id"]
            .as_u64()
            .and_then(|id| pos.get(&id).copied())
            .unwrap_or(usize::MAX)
    };
    records.sort_by_key(key);
    if let Some(s) = segm_all.as_mut() {
        s.sort_by_key(key);
    }
    Ok(Some((images, records, segm_all)))
}

impl TestOutput {
    /// The summaries present, bbox first.
    pub fn summaries(&self) -> Vec<&CocoSummary> {
        self.summary.iter().chain(&self.segm_summary).collect()
    }

    /// The `--json-out` / Python metrics object: the 12 stats (`{"AP": .., ..}`) of a bbox-only
    /// evaluation, or, with a segm summary, every stat prefixed by its IoU type (`bbox_AP`, ...,
    /// `segm_AP`, ...). `None` without any summary.
    pub fn stats_json(&self) -> Option<serde_json::Value> {
        match (&self.summary, &self.segm_summary) {
            (None, None) => None,
            (Some(b), None) => Some(b.stats_json()),
            _ => {
                let mut m = serde_json::Map::new();
                for s in self.summaries() {
                    if let serde_json::Value::Object(o) = s.stats_json() {
                        for (k, v) in o {
                            m.insert(format!("{}_{k}", s.iou_type.as_str()), v);
                        }
                    }
                }
                Some(serde_json::Value::Object(m))
            }
        }
    }
}

/// mmdetection's log keys for a bbox or segm summary (`coco/bbox_mAP`, `coco/bbox_mAP_50`, ...,
/// `coco/segm_mAP`, ...).
pub fn mmdet_keys(s: &CocoSummary) -> serde_json::Map<String, serde_json::Value> {
    let names = ["mAP", "mAP_50", "mAP_75", "mAP_s", "mAP_m", "mAP_l"];
    let prefix = s.iou_type.as_str();
    names
        .iter()
        .zip(s.stats)
        .map(|(n, v)| {
            (
                format!("coco/{prefix}_{n}"),
                serde_json::json!((v * 1000.0).round() / 1000.0),
            )
        })
        .collect()
}

/// How [`evaluate_seg_loader`] runs.
#[derive(Debug, Clone, Default)]
pub struct SegTestOptions {
    /// Multi-scale + flip test (mmseg `TestTimeAug`): every image at the test pipeline's resize
    /// scale times each of `aug_ratios`, unflipped and flipped; the softmax probabilities at the
    /// original size are averaged before the argmax.
    pub aug_test: bool,
    /// Scale ratios of the aug test (default 0.5, 0.75, 1.0, 1.25, 1.5, 1.75).
    pub aug_ratios: Option<Vec<f64>>,
    /// Keep every predicted label map in the output (for writing PNGs).
    pub keep_predictions: bool,
    /// Draw a progress bar.
    pub show_progress: bool,
}

/// The predicted label map of one image.
pub struct SegImageResult {
    /// Image file.
    pub img_path: PathBuf,
    /// `(H_ori, W_ori)` class indices in `[0, K)` (row-major).
    pub pred: ndarray::Array2<u8>,
    /// Whether the dataset uses `reduce_zero_label` (PNG value = class + 1).
    pub reduce_zero_label: bool,
}

/// The outcome of a segmentation test run.
pub struct SegTestOutput {
    /// Dataset-level metrics (absent when no image had a label map).
    pub metrics: Option<SegMetrics>,
    /// Predictions, in loader order (with `keep_predictions`).
    pub images: Vec<SegImageResult>,
    /// Class names of the dataset.
    pub classes: Vec<String>,
    /// Images left out because they failed to load (`skip_invalid`; otherwise 0).
    pub skipped: usize,
}

/// The test-time-augmentation pipeline for `ratio`: every `Resize` with a `scale` gets that scale
/// times `ratio` (mmseg 0.x `MultiScaleFlipAug` with `img_ratios`, the setting of the SMT paper's
/// multi-scale numbers); a `Resize` by `scale_factor`, or none, becomes a resize by `ratio` of
/// the original image (mmseg 1.x `TestTimeAug`).
fn aug_pipeline(p: &Pipeline, ratio: f64) -> Pipeline {
    let by_factor = |clip_object_border: bool| TransformConfig::Resize {
        scale: None,
        scale_factor: Some(ratio),
        keep_ratio: true,
        clip_object_border,
    };
    let has_resize =
        p.0.iter()
            .any(|t| matches!(t, TransformConfig::Resize { .. }));
    let mut out = Vec::new();
    for t in &p.0 {
        match t {
            TransformConfig::Resize {
                scale: Some([w, h]),
                keep_ratio,
                clip_object_border,
                ..
            } => out.push(TransformConfig::Resize {
                scale: Some([(w * ratio).trunc(), (h * ratio).trunc()]),
                scale_factor: None,
                keep_ratio: *keep_ratio,
                clip_object_border: *clip_object_border,
            }),
            TransformConfig::Resize {
                clip_object_border, ..
            } => out.push(by_factor(*clip_object_border)),
            TransformConfig::LoadImageFromFile { .. } if !has_resize => {
                out.push(t.clone());
                out.push(by_factor(true));
            }
            o => out.push(o.clone()),
        }
    }
    Pipeline(out)
}

/// Runs the segmentor of `model` over `loader` and computes mmseg's `IoUMetric` (`mIoU`,
/// `mAcc`, `aAcc`, per-class IoU / Acc) against the label maps the pipeline loads (at the
/// original image size: `LoadAnnotations` after `Resize`, mmseg's test pipeline). In a
/// data-parallel run every rank evaluates its [`Dist::eval_shard`] and rank 0 merges the counts
/// (and the kept predictions); the other ranks return no metrics and no images.
///
/// Errors: an evaluator other than `IoUMetric` / metrics other than `mIoU`; more than 255
/// classes; a label map whose size differs from its image (named); data and model errors.
pub fn evaluate_seg_loader(
    model: &BuiltModel,
    loader: &densepred_datasets::loader::DataLoader,
    dataset: &dyn densepred_datasets::Dataset,
    evaluator: &EvaluatorConfig,
    device: &Device,
    opts: &SegTestOptions,
    dist: &Dist,
) -> Result<SegTestOutput, EngineError> {
    let seg = model.inference_segmentor()?;
    if evaluator.kind != "IoUMetric" {
        return Err(EngineError::Config(format!(
            "evaluator type {:?} is not supported for segmentors (IoUMetric)",
            evaluator.kind
        )));
    }
    if let Some(m) = evaluator
        .iou_metrics
        .as_ref()
        .and_then(|v| v.iter().find(|m| *m != "mIoU"))
    {
        return Err(EngineError::Config(format!(
            "evaluator.iou_metrics: {m:?} is not implemented (mIoU)"
        )));
    }
    let k = seg.num_classes();
    if k > 255 {
        return Err(EngineError::Config(format!(
            "{k} classes: label maps are 8-bit, at most 255 classes"
        )));
    }
    let meta = dataset.metainfo();
    if meta.classes.len() != k {
        return Err(EngineError::Config(format!(
            "model.decode_head.num_classes = {k} but the dataset has {} classes",
            meta.classes.len()
        )));
    }
    let ignore = evaluator.ignore_index.unwrap_or(255);
    let mut metric = IoUMetric::new(k, ignore as u64);
    let mut any_gt = false;
    let ratios = if opts.aug_test {
        opts.aug_ratios
            .clone()
            .unwrap_or_else(|| vec![0.5, 0.75, 1.0, 1.25, 1.5, 1.75])
    } else {
        vec![]
    };
    let mut loader = loader.clone();
    loader.shard = dist.eval_shard();
    let loaders: Vec<densepred_datasets::loader::DataLoader> = if opts.aug_test {
        ratios
            .iter()
            .map(|&r| {
                let mut l = loader.clone();
                l.pipeline = aug_pipeline(&loader.pipeline, r);
                l.batch_size = 1;
                l
            })
            .collect()
    } else {
        vec![loader.clone()]
    };
    let n_batches = loaders[0].num_batches() as u64;
    let pb = progress_bar(n_batches, opts.show_progress && dist.is_main(), "test");
    let mut iters: Vec<_> = loaders.iter().map(|l| l.epoch(0)).collect();
    let mut images = Vec::new();
    let mut evaluated = 0usize;
    loop {
        // One batch per loader (the same images at every scale).
        let mut batches = Vec::with_capacity(iters.len());
        for it in iters.iter_mut() {
            match it.next() {
                Some(b) => batches.push(to_batch(model, b?, device, false)?),
                None => break,
            }
        }
        if batches.len() < iters.len() {
            break;
        }
        let first = &batches[0];
        let ori: Vec<(usize, usize)> = first.samples.iter().map(|s| s.ori_shape).collect();
        // Per-image (K, H_ori, W_ori) scores: logits without aug test, mean softmax with it.
        let mut scores: Vec<Tensor> = Vec::new();
        for b in &batches {
            let shapes: Vec<(usize, usize)> = b.samples.iter().map(|s| s.img_shape).collect();
            let flips: &[bool] = if opts.aug_test {
                &[false, true]
            } else {
                &[false]
            };
            for &flip in flips {
                let x = if flip {
                    densepred_core::ops::flip_last_dim(&b.images).ctx("flip")?
                } else {
                    b.images.clone()
                };
                let logits = seg.predict_logits(&x).ctx("inference")?;
                // A flipped padded batch has its padding on the left: crop from the right.
                let logits = if flip {
                    densepred_core::ops::flip_last_dim(&logits).ctx("flip")?
                } else {
                    logits
                };
                let per = seg
                    .postprocess(&logits, &shapes, &ori, false)
                    .ctx("postprocess")?;
                for (i, l) in per.into_iter().enumerate() {
                    let l = if opts.aug_test {
                        candle_nn::ops::softmax(&l, 0).ctx("softmax")?
                    } else {
                        l
                    };
                    if scores.len() <= i {
                        scores.push(l);
                    } else {
                        scores[i] = (&scores[i] + l).ctx("aug-test sum")?;
                    }
                }
            }
        }
        if scores.len() != first.samples.len() {
            return Err(EngineError::Config(format!(
                "{} score maps for a batch of {} images (with skip_invalid, the aug test's scales \
                 lost different images)",
                scores.len(),
                first.samples.len()
            )));
        }
        evaluated += first.samples.len();
        for (s, sc) in first.samples.iter().zip(scores) {
            let (oh, ow) = s.ori_shape;
            let pred: Vec<u8> = sc
                .argmax(0)
                .and_then(|p| p.flatten_all()?.to_dtype(candle_core::DType::U8)?.to_vec1())
                .ctx("argmax")?;
            if let Some(gt) = &s.gt_seg_map {
                if gt.dim() != (oh, ow) {
                    return Err(EngineError::File {
                        path: s.seg_map_path.clone().unwrap_or_else(|| s.img_path.clone()),
                        reason: format!(
                            "label map is {}x{} but its image {} is {}x{} (load annotations after Resize in the test pipeline)",
                            gt.dim().1, gt.dim().0, s.img_path.display(), ow, oh
                        ),
                    });
                }
                let g: Vec<u8> = gt.iter().copied().collect();
                metric.update(&g, &pred).map_err(|e| EngineError::File {
                    path: s.seg_map_path.clone().unwrap_or_else(|| s.img_path.clone()),
                    reason: e.to_string(),
                })?;
                any_gt = true;
            }
            if opts.keep_predictions {
                images.push(SegImageResult {
                    img_path: s.img_path.clone(),
                    pred: ndarray::Array2::from_shape_vec((oh, ow), pred).expect("h*w labels"),
                    reduce_zero_label: s.reduce_zero_label,
                });
            }
        }
        pb.inc(1);
    }
    pb.finish_and_clear();
    let Some((metric, any_gt, evaluated, images)) =
        gather_seg(dist, metric, any_gt, evaluated, images)?
    else {
        return Ok(SegTestOutput {
            metrics: None,
            images: Vec::new(),
            classes: meta.classes.clone(),
            skipped: 0,
        });
    };
    let skipped = check_all_evaluated(&loader, evaluated, dataset.len())?;
    Ok(SegTestOutput {
        metrics: any_gt.then(|| metric.compute()),
        images,
        classes: meta.classes.clone(),
        skipped,
    })
}

/// Rank 0's view of a data-parallel segmentation test: the merged `IoUMetric` counts, whether
/// any image had ground truth, the number of images evaluated and the kept predictions in the
/// split's order; `None` on the other ranks. One process returns its own. The predictions
/// travel as raw bytes after a JSON header (`[header length: u64 LE][header][maps…]`).
///
/// Errors: MPI message limits, malformed gathered results.
#[allow(clippy::type_complexity)]
fn gather_seg(
    dist: &Dist,
    metric: IoUMetric,
    any_gt: bool,
    evaluated: usize,
    images: Vec<SegImageResult>,
) -> Result<Option<(IoUMetric, bool, usize, Vec<SegImageResult>)>, EngineError> {
    if dist.world == 1 {
        return Ok(Some((metric, any_gt, evaluated, images)));
    }
    let header = serde_json::json!({
        "metric": metric,
        "any_gt": any_gt,
        "evaluated": evaluated,
        "images": images.iter().map(|i| serde_json::json!({
            "img_path": i.img_path,
            "h": i.pred.nrows(),
            "w": i.pred.ncols(),
            "reduce_zero_label": i.reduce_zero_label,
        })).collect::<Vec<_>>(),
    });
    let header = serde_json::to_vec(&header)
        .map_err(|e| EngineError::Config(format!("results of rank {}: {e}", dist.rank)))?;
    let mut buf = (header.len() as u64).to_le_bytes().to_vec();
    buf.extend_from_slice(&header);
    for i in &images {
        buf.extend(i.pred.iter().copied());
    }
    drop(images);
    let Some(parts) = dist.gather_bytes(buf)? else {
        return Ok(None);
    };
    let bad = |r: usize, what: &str| {
        EngineError::Config(format!("results gathered from rank {r}: bad {what}"))
    };
    let (mut merged, mut any, mut count) = (None::<IoUMetric>, false, 0usize);
    let mut per_rank = Vec::with_capacity(parts.len());
    for (r, p) in parts.iter().enumerate() {
        let n = p
            .get(..8)
            .map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")) as usize)
            .ok_or_else(|| bad(r, "header"))?;
        let h: serde_json::Value = p
            .get(8..8 + n)
            .and_then(|b| serde_json::from_slice(b).ok())
            .ok_or_else(|| bad(r, "header"))?;
        let m: IoUMetric =
            serde_json::from_value(h["metric"].clone()).map_err(|_| bad(r, "metric"))?;
        match merged.as_mut() {
            None => merged = Some(m),
            Some(acc) => acc.merge(&m).map_err(|e| bad(r, &format!("metric: {e}")))?,
        }
        any |= h["any_gt"].as_bool().ok_or_else(|| bad(r, "any_gt"))?;
        count += h["evaluated"].as_u64().ok_or_else(|| bad(r, "evaluated"))? as usize;
        let mut at = 8 + n;
        let mut imgs = Vec::new();
        for v in h["images"].as_array().ok_or_else(|| bad(r, "images"))? {
            let (hh, ww) = (
                v["h"].as_u64().ok_or_else(|| bad(r, "h"))? as usize,
                v["w"].as_u64().ok_or_else(|| bad(r, "w"))? as usize,
            );
            let px = p.get(at..at + hh * ww).ok_or_else(|| bad(r, "label map"))?;
            at += hh * ww;
            imgs.push(SegImageResult {
                img_path: serde_json::from_value(v["img_path"].clone())
                    .map_err(|_| bad(r, "img_path"))?,
                pred: ndarray::Array2::from_shape_vec((hh, ww), px.to_vec())
                    .map_err(|_| bad(r, "label map"))?,
                reduce_zero_label: v["reduce_zero_label"].as_bool().unwrap_or(false),
            });
        }
        per_rank.push(imgs.into_iter());
    }
    let images = interleave(per_rank);
    let metric = merged.ok_or_else(|| bad(0, "metric"))?;
    Ok(Some((metric, any, count, images)))
}

/// mmsegmentation's log keys of a result (`mIoU`, `mAcc`, `aAcc` in percent, 2 decimals).
pub fn mmseg_keys(m: &SegMetrics) -> serde_json::Map<String, serde_json::Value> {
    [("aAcc", m.a_acc), ("mIoU", m.m_iou), ("mAcc", m.m_acc)]
        .iter()
        .map(|(k, v)| {
            let v = if v.is_nan() {
                serde_json::Value::Null
            } else {
                serde_json::json!((v * 10000.0).round() / 100.0)
            };
            (k.to_string(), v)
        })
        .collect()
}

/// Validation of either kind of model: the lines to print and the metrics to log
/// (mmdetection's `coco/bbox_mAP...` keys or mmsegmentation's `mIoU`, `mAcc`, `aAcc`).
///
/// Errors: as [`evaluate_loader`] / [`evaluate_seg_loader`].
pub fn validate(
    model: &BuiltModel,
    loader: &densepred_datasets::loader::DataLoader,
    dataset: &dyn densepred_datasets::Dataset,
    evaluator: &EvaluatorConfig,
    device: &Device,
    dist: &Dist,
) -> Result<Option<(Vec<String>, serde_json::Map<String, serde_json::Value>)>, EngineError> {
    if model.is_segmentor() {
        let out = evaluate_seg_loader(
            model,
            loader,
            dataset,
            evaluator,
            device,
            &SegTestOptions::default(),
            dist,
        )?;
        Ok(out.metrics.map(|m| {
            let lines = m
                .table(Some(&out.classes))
                .lines()
                .map(String::from)
                .collect();
            (lines, mmseg_keys(&m))
        }))
    } else {
        let out = evaluate_loader(model, loader, dataset, evaluator, device, false, dist)?;
        let sums = out.summaries();
        if sums.is_empty() {
            return Ok(None);
        }
        let mut lines = Vec::new();
        let mut keys = serde_json::Map::new();
        for s in sums {
            lines.push(format!(
                "Evaluate annotation type *{}*",
                s.iou_type.as_str()
            ));
            lines.extend(s.summary_lines.iter().cloned());
            keys.extend(mmdet_keys(s));
        }
        Ok(Some((lines, keys)))
    }
}

/// How [`test_checkpoint`] runs.
#[derive(Debug, Clone)]
pub struct TestRunOptions {
    /// Load the checkpoint strictly (see [`crate::runner::load_checkpoint`]).
    pub strict: bool,
    /// Segmentors: aug test, predictions kept, progress bar (`show_progress` applies to both).
    pub seg: SegTestOptions,
    /// The data-parallel run this test is part of (`None`: one process). Every rank tests its
    /// shard; rank 0 gathers and evaluates, the others return empty outputs.
    pub dist: Option<std::sync::Arc<Dist>>,
}

impl Default for TestRunOptions {
    fn default() -> Self {
        Self {
            strict: true,
            seg: SegTestOptions::default(),
            dist: None,
        }
    }
}

/// The outcome of [`test_checkpoint`]: the detector's or the segmentor's test output.
pub enum TestRun {
    /// A detector: detections, COCO records and summary.
    Detection(TestOutput),
    /// A segmentor: metrics and (with `keep_predictions`) label maps.
    Segmentation(SegTestOutput),
}

/// mmdetection's / mmsegmentation's `tools/test.py` without the output files: builds the model of
/// `cfg` on `device`, loads `checkpoint` ([`crate::runner::load_checkpoint`]), and runs the test
/// split ([`RunConfig::test_split`]) through the detector's or the segmentor's evaluation. The
/// CLI's `test` and Python's `test` both call this.
///
/// Errors: config (no test split, unsupported evaluator), checkpoint (unreadable, or a mismatch
/// when strict), data, model and evaluation errors; fewer images evaluated than the split has
/// (unless `skip_invalid`).
pub fn test_checkpoint(
    cfg: &crate::runner::RunConfig,
    checkpoint: &std::path::Path,
    opts: &TestRunOptions,
    device: &Device,
) -> Result<TestRun, EngineError> {
    let (dl, ev) = cfg.test_split()?;
    let single = Dist::single();
    let dist = opts.dist.as_deref().unwrap_or(&single);
    let model = crate::runner::build_model(&cfg.model, cfg.seed(), device)?;
    crate::runner::load_checkpoint(&model, checkpoint, opts.strict)?;
    if model.is_segmentor() {
        let l = build_loader(dl, cfg.seed(), false)?;
        let out = evaluate_seg_loader(
            &model,
            &l.loader,
            l.dataset.as_ref(),
            ev,
            device,
            &opts.seg,
            dist,
        )?;
        return Ok(TestRun::Segmentation(out));
    }
    if opts.seg.aug_test {
        return Err(EngineError::Config(
            "the aug test is for segmentors; this config builds a detector".into(),
        ));
    }
    let out = run_test(
        &model,
        dl,
        ev,
        cfg.seed(),
        device,
        opts.seg.show_progress,
        dist,
    )?;
    Ok(TestRun::Detection(out))
}
