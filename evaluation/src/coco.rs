//! COCO evaluation (`pycocotools.cocoeval.COCOeval` numbers) behind densepred's API, the way
//! mmdetection's `CocoMetric` reports it: the 12 standard stats and, per category, AP / AP50 / AP75
//! at area "all", 100 detections (mean of the precision entries > −1).

use crate::EvalError;
use hotcoco::params::IouType;
use hotcoco::{COCOeval, COCO};
use serde::Serialize;
use std::path::Path;

/// Names of the 12 `COCOeval.stats` entries, in order, as `densepred eval coco --json-out` writes them.
pub const STAT_NAMES: [&str; 12] = [
    "AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl",
];

/// `bbox` or `segm`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum CocoIouType {
    /// Box IoU.
    Bbox,
    /// Mask IoU on RLEs.
    Segm,
}

impl CocoIouType {
    /// `"bbox"` or `"segm"` (pycocotools' `iouType`).
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::Bbox => "bbox",
            Self::Segm => "segm",
        }
    }
}

impl std::str::FromStr for CocoIouType {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "bbox" => Ok(Self::Bbox),
            "segm" => Ok(Self::Segm),
            o => Err(format!("iou type must be bbox or segm, got {o:?}")),
        }
    }
}

/// AP of one category (fractions in [0, 1]; `None` where the category has no usable ground truth).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CategoryAp {
    /// COCO category id.
    pub id: u64,
    /// Category name.
    pub name: String,
    /// AP@[.50:.95].
    #[serde(rename = "AP")]
    pub ap: Option<f64>,
    /// AP at IoU 0.50.
    #[serde(rename = "AP50")]
    pub ap50: Option<f64>,
    /// AP at IoU 0.75.
    #[serde(rename = "AP75")]
    pub ap75: Option<f64>,
}

/// The outcome of one COCO evaluation.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CocoSummary {
    /// bbox or segm.
    pub iou_type: CocoIouType,
    /// The 12 stats in [`STAT_NAMES`] order (−1 where undefined).
    pub stats: [f64; 12],
    /// Per category, sorted by id.
    pub per_category: Vec<CategoryAp>,
    /// pycocotools' printed summary (12 lines).
    pub summary_lines: Vec<String>,
}

impl CocoSummary {
    /// `{"AP": .., ..., "ARl": ..}` (the `--json-out` object).
    pub fn stats_json(&self) -> serde_json::Value {
        let m: serde_json::Map<String, serde_json::Value> = STAT_NAMES
            .iter()
            .zip(self.stats)
            .map(|(k, v)| (k.to_string(), serde_json::json!(v)))
            .collect();
        serde_json::Value::Object(m)
    }

    /// The per-category table as text (mmdetection's `classwise` table layout).
    pub fn per_category_table(&self) -> String {
        let w = self
            .per_category
            .iter()
            .map(|c| c.name.len())
            .max()
            .unwrap_or(8)
            .max(8);
        let f = |v: Option<f64>| v.map(|x| format!("{x:.3}")).unwrap_or_else(|| "nan".into());
        let mut s = format!(
            "{:<w$}  {:>6}  {:>6}  {:>6}\n",
            "category", "AP", "AP50", "AP75"
        );
        for c in &self.per_category {
            s += &format!(
                "{:<w$}  {:>6}  {:>6}  {:>6}\n",
                c.name,
                f(c.ap),
                f(c.ap50),
                f(c.ap75)
            );
        }
        s
    }
}

fn file_err(path: &Path, e: impl std::fmt::Display) -> EvalError {
    EvalError::File {
        path: path.to_path_buf(),
        reason: e.to_string(),
    }
}

/// Loads a COCO ground-truth file.
///
/// Errors: unreadable or malformed JSON ([`EvalError::File`], with hotcoco's message naming the
/// record).
pub fn load_gt(path: &Path) -> Result<COCO, EvalError> {
    if !path.exists() {
        return Err(file_err(path, "no such file"));
    }
    COCO::new(path).map_err(|e| file_err(path, e))
}

/// Evaluates a COCO results file (a JSON list of `{image_id, category_id, bbox | segmentation,
/// score}`) against `gt`, as `COCOeval(gt, gt.loadRes(results), iou_type)`.
///
/// Errors: a results file that cannot be read, or that names an image or category absent from
/// the ground truth (the message names the record).
pub fn evaluate_results_file(
    gt: &COCO,
    results: &Path,
    iou_type: CocoIouType,
) -> Result<CocoSummary, EvalError> {
    if !results.exists() {
        return Err(file_err(results, "no such file"));
    }
    let dt = gt.load_res(results).map_err(|e| file_err(results, e))?;
    check_ids(gt, &dt, results)?;
    evaluate(gt.clone(), dt, iou_type)
}

fn check_ids(gt: &COCO, dt: &COCO, path: &Path) -> Result<(), EvalError> {
    for (i, a) in dt.dataset.annotations.iter().enumerate() {
        if gt.get_img(a.image_id).is_none() {
            return Err(file_err(
                path,
                format!(
                    "record {i}: field image_id: unknown image id {}",
                    a.image_id
                ),
            ));
        }
        if gt.get_cat(a.category_id).is_none() {
            return Err(file_err(
                path,
                format!(
                    "record {i}: field category_id: unknown category id {}",
                    a.category_id
                ),
            ));
        }
    }
    Ok(())
}

/// Runs evaluate → accumulate → summarize on loaded datasets.
pub fn evaluate(gt: COCO, dt: COCO, iou_type: CocoIouType) -> Result<CocoSummary, EvalError> {
    let it = match iou_type {
        CocoIouType::Bbox => IouType::Bbox,
        CocoIouType::Segm => IouType::Segm,
    };
    let names: Vec<(u64, String)> = {
        let mut v: Vec<_> = gt
            .dataset
            .categories
            .iter()
            .map(|c| (c.id, c.name.clone()))
            .collect();
        v.sort();
        v
    };
    let mut ev = COCOeval::new(gt, dt, it);
    ev.evaluate()
        .map_err(|e| EvalError::Invalid(e.to_string()))?;
    ev.accumulate();
    let summary_lines = ev.summarize_lines();
    let stats: [f64; 12] = ev
        .stats()
        .and_then(|s| s.try_into().ok())
        .ok_or_else(|| EvalError::Invalid("COCO evaluation produced no stats".into()))?;
    let acc = ev
        .accumulated()
        .ok_or_else(|| EvalError::Invalid("COCO evaluation did not accumulate".into()))?;
    let a = ev.params.all_area_idx();
    let m = ev.params.max_det_idx();
    let sh = &acc.shape;
    let mean_over = |k: usize, ts: &[usize]| -> Option<f64> {
        let mut vals = Vec::new();
        for &t in ts {
            for r in 0..sh.r {
                let v = acc.precision[acc.precision_idx(t, r, k, a, m)];
                if v > -1.0 {
                    vals.push(v);
                }
            }
        }
        (!vals.is_empty()).then(|| vals.iter().sum::<f64>() / vals.len() as f64)
    };
    let all_t: Vec<usize> = (0..sh.t).collect();
    let t50 = ev.params.iou_thr_idx(0.5);
    let t75 = ev.params.iou_thr_idx(0.75);
    let order: Vec<u64> = if acc.cat_ids.is_empty() {
        ev.params.cat_ids.clone()
    } else {
        acc.cat_ids.clone()
    };
    let per_category = order
        .iter()
        .enumerate()
        .map(|(k, &id)| CategoryAp {
            id,
            name: names
                .iter()
                .find(|(i, _)| *i == id)
                .map(|(_, n)| n.clone())
                .unwrap_or_default(),
            ap: mean_over(k, &all_t),
            ap50: t50.and_then(|t| mean_over(k, &[t])),
            ap75: t75.and_then(|t| mean_over(k, &[t])),
        })
        .collect();
    Ok(CocoSummary {
        iou_type,
        stats,
        per_category,
        summary_lines,
    })
}

/// One image's predictions in original-image pixels (what a detector's `predict` returns).
#[derive(Debug, Clone, PartialEq)]
pub struct ImageDetections {
    /// COCO image id.
    pub image_id: u64,
    /// `[x1, y1, x2, y2]` per detection.
    pub boxes: Vec<[f32; 4]>,
    /// Confidence per detection.
    pub scores: Vec<f32>,
    /// Contiguous label per detection (index into the dataset's `cat_ids`).
    pub labels: Vec<usize>,
    /// Binary masks `(h, w)` row-major per detection (instance segmentation), with `(h, w)`.
    pub masks: Option<(Vec<Vec<u8>>, (u32, u32))>,
}

/// COCO results records (`{image_id, category_id, bbox: [x, y, w, h], score}` and, with masks,
/// `{..., segmentation: {size, counts}}` as compressed RLE) from detections, mapping labels to
/// category ids with `cat_ids` (mmdetection's `CocoMetric.results2json`).
///
/// Errors: a label outside `cat_ids`, mismatched list lengths or mask sizes.
pub fn to_coco_results(
    dets: &[ImageDetections],
    cat_ids: &[u64],
) -> Result<(Vec<serde_json::Value>, Option<Vec<serde_json::Value>>), EvalError> {
    let mut bbox = Vec::new();
    let mut segm: Option<Vec<serde_json::Value>> = None;
    for d in dets {
        let n = d.boxes.len();
        if d.scores.len() != n || d.labels.len() != n {
            return Err(EvalError::Invalid(format!(
                "image {}: {} boxes, {} scores, {} labels",
                d.image_id,
                n,
                d.scores.len(),
                d.labels.len()
            )));
        }
        for i in 0..n {
            let cat = *cat_ids.get(d.labels[i]).ok_or_else(|| {
                EvalError::Invalid(format!(
                    "image {}: detection {i}: label {} has no category (of {})",
                    d.image_id,
                    d.labels[i],
                    cat_ids.len()
                ))
            })?;
            let b = d.boxes[i];
            let xywh = [
                b[0] as f64,
                b[1] as f64,
                (b[2] - b[0]) as f64,
                (b[3] - b[1]) as f64,
            ];
            bbox.push(serde_json::json!({"image_id": d.image_id, "category_id": cat, "bbox": xywh, "score": d.scores[i] as f64}));
            if let Some((masks, (h, w))) = &d.masks {
                let m = masks.get(i).ok_or_else(|| {
                    EvalError::Invalid(format!(
                        "image {}: {} masks for {n} detections",
                        d.image_id,
                        masks.len()
                    ))
                })?;
                if m.len() != (*h as usize) * (*w as usize) {
                    return Err(EvalError::Invalid(format!(
                        "image {}: mask {i} has {} pixels, expected {h}x{w}",
                        d.image_id,
                        m.len()
                    )));
                }
                // pycocotools encodes column-major (Fortran-order) masks.
                let mut col = vec![0u8; m.len()];
                for y in 0..*h as usize {
                    for x in 0..*w as usize {
                        col[x * *h as usize + y] = m[y * *w as usize + x];
                    }
                }
                let rle = hotcoco::mask::encode(&col, *h, *w)
                    .map_err(|e| EvalError::Invalid(e.to_string()))?;
                let counts = hotcoco::mask::rle_to_string(&rle);
                segm.get_or_insert_with(Vec::new).push(serde_json::json!({
                    "image_id": d.image_id, "category_id": cat, "bbox": xywh, "score": d.scores[i] as f64,
                    "segmentation": {"size": [h, w], "counts": counts},
                }));
            }
        }
    }
    Ok((bbox, segm))
}

/// Evaluates in-memory results records (from [`to_coco_results`]) against `gt`.
pub fn evaluate_records(
    gt: &COCO,
    records: &[serde_json::Value],
    iou_type: CocoIouType,
) -> Result<CocoSummary, EvalError> {
    let anns: Vec<hotcoco::types::Annotation> =
        serde_json::from_value(serde_json::Value::Array(records.to_vec()))
            .map_err(|e| EvalError::Invalid(format!("results: {e}")))?;
    let dt = gt
        .load_res_anns(anns)
        .map_err(|e| EvalError::Invalid(e.to_string()))?;
    check_ids(gt, &dt, Path::new("<detections>"))?;
    evaluate(gt.clone(), dt, iou_type)
}

/// Writes `<prefix>.bbox.json` (and `<prefix>.segm.json` when given) atomically; returns the paths.
pub fn dump_results(
    prefix: &Path,
    bbox: &[serde_json::Value],
    segm: Option<&[serde_json::Value]>,
) -> Result<Vec<std::path::PathBuf>, EvalError> {
    let mut out = Vec::new();
    let mut write = |suffix: &str, v: &[serde_json::Value]| -> Result<(), EvalError> {
        let path = std::path::PathBuf::from(format!("{}.{suffix}.json", prefix.display()));
        let text = serde_json::to_string(v).map_err(|e| EvalError::Invalid(e.to_string()))?;
        densepred_core::io::write_atomic(&path, |tmp| {
            std::fs::write(tmp, &text).map_err(|e| e.to_string())
        })
        .map_err(|e| file_err(&path, e))?;
        out.push(path);
        Ok(())
    };
    write("bbox", bbox)?;
    if let Some(s) = segm {
        write("segm", s)?;
    }
    Ok(out)
}
