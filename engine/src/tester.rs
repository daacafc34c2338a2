//! Inference over a dataloader and COCO evaluation (mmengine's `ValLoop` / `TestLoop` with
//! mmdetection's `CocoMetric`).

use crate::runner::{
    build_loader, model_inputs, to_batch, BuiltModel, CandleContext, EngineError, EvaluatorConfig,
    Loader,
};
use candle_core::Device;
use densepred_datasets::config::DataloaderConfig;
use densepred_evaluation::coco::{
    evaluate_records, load_gt, to_coco_results, CocoIouType, CocoSummary, ImageDetections,
};
use indicatif::{ProgressBar, ProgressStyle};
use std::path::PathBuf;

/// Detections of one image with where it came from.
pub struct ImageResult {
    /// COCO image id.
    pub img_id: u64,
    /// Image file.
    pub img_path: PathBuf,
    /// Detections in original-image pixels.
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
    /// Class names of the dataset.
    pub classes: Vec<String>,
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

/// Runs `model` over `dl` and evaluates with `evaluator`.
///
/// Errors: data, model or evaluation errors; a metric other than `bbox`.
pub fn run_test(
    model: &BuiltModel,
    dl: &DataloaderConfig,
    evaluator: &EvaluatorConfig,
    seed: u64,
    device: &Device,
    show_progress: bool,
) -> Result<TestOutput, EngineError> {
    let Loader { loader, dataset } = build_loader(dl, seed, false)?;
    evaluate_loader(
        model,
        &loader,
        dataset.as_ref(),
        evaluator,
        device,
        show_progress,
    )
}

/// [`run_test`] on an already built loader.
pub fn evaluate_loader(
    model: &BuiltModel,
    loader: &densepred_datasets::loader::DataLoader,
    dataset: &dyn densepred_datasets::Dataset,
    evaluator: &EvaluatorConfig,
    device: &Device,
    show_progress: bool,
) -> Result<TestOutput, EngineError> {
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
    if metrics.iter().any(|m| m != "bbox") {
        return Err(EngineError::Config(format!(
            "evaluator.metric {metrics:?}: only \"bbox\" is available for one-stage detectors"
        )));
    }
    let meta = dataset.metainfo();
    let detector = model.inference_detector(model.detector.model_config())?;
    let pb = progress_bar(loader.num_batches() as u64, show_progress, "test");
    let mut images = Vec::new();
    let mut for_eval = Vec::new();
    for batch in loader.epoch(0) {
        let batch = to_batch(model, batch?, device)?;
        let (x, metas, _) = model_inputs(&batch);
        let dets = detector.predict(&x, &metas).ctx("inference")?;
        for (s, d) in batch.samples.iter().zip(dets) {
            for_eval.push(ImageDetections {
                image_id: s.img_id,
                boxes: d.bboxes.clone(),
                scores: d.scores.clone(),
                labels: d.labels.iter().map(|&l| l as usize).collect(),
                masks: None,
            });
            images.push(ImageResult {
                img_id: s.img_id,
                img_path: s.img_path.clone(),
                dets: d,
            });
        }
        pb.inc(1);
    }
    pb.finish_and_clear();
    let (records, _) = to_coco_results(&for_eval, &meta.cat_ids)?;
    let summary = if evaluator.format_only {
        None
    } else {
        let gt = load_gt(&evaluator.ann_file)?;
        Some(evaluate_records(&gt, &records, CocoIouType::Bbox)?)
    };
    if let Some(prefix) = &evaluator.outfile_prefix {
        densepred_evaluation::coco::dump_results(prefix, &records, None)?;
    }
    Ok(TestOutput {
        images,
        records,
        summary,
        classes: meta.classes.clone(),
    })
}

/// mmdetection's log keys for a bbox summary (`coco/bbox_mAP`, `coco/bbox_mAP_50`, ...).
pub fn mmdet_keys(s: &CocoSummary) -> serde_json::Map<String, serde_json::Value> {
    let names = [
        "bbox_mAP",
        "bbox_mAP_50",
        "bbox_mAP_75",
        "bbox_mAP_s",
        "bbox_mAP_m",
        "bbox_mAP_l",
    ];
    names
        .iter()
        .zip(s.stats)
        .map(|(n, v)| {
            (
                format!("coco/{n}"),
                serde_json::json!((v * 1000.0).round() / 1000.0),
            )
        })
        .collect()
}
