//! Semantic segmentation metrics with mmsegmentation 1.x `IoUMetric` conventions: intersections,
//! unions, prediction and label areas are summed over the whole dataset first, then
//! `IoU = I / U`, `Acc = I / label` per class (NaN where the denominator is 0, left out of the
//! means), `aAcc = ΣI / Σlabel`; ground-truth pixels equal to `ignore_index` (255) are dropped.
//! The counting is hotcoco's `SemanticEval` (a port of mmseg's `IoUMetric`).

use crate::EvalError;
use hotcoco::semantic::SemanticEval;
use serde::Serialize;
use std::path::{Path, PathBuf};

/// Dataset-level results; fractions in [0, 1], NaN for classes without a denominator.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SegMetrics {
    /// Overall pixel accuracy.
    #[serde(rename = "aAcc")]
    pub a_acc: f64,
    /// Mean IoU over classes with a union.
    #[serde(rename = "mIoU")]
    pub m_iou: f64,
    /// Mean accuracy over classes with ground truth.
    #[serde(rename = "mAcc")]
    pub m_acc: f64,
    /// Per-class IoU.
    #[serde(rename = "IoU")]
    pub iou: Vec<f64>,
    /// Per-class accuracy (recall).
    #[serde(rename = "Acc")]
    pub acc: Vec<f64>,
}

impl SegMetrics {
    /// The `--json-out` object: NaN written as `null`.
    pub fn to_json(&self) -> serde_json::Value {
        let n = |v: f64| {
            if v.is_nan() {
                serde_json::Value::Null
            } else {
                serde_json::json!(v)
            }
        };
        serde_json::json!({
            "mIoU": n(self.m_iou), "mAcc": n(self.m_acc), "aAcc": n(self.a_acc),
            "IoU": self.iou.iter().map(|&v| n(v)).collect::<Vec<_>>(),
            "Acc": self.acc.iter().map(|&v| n(v)).collect::<Vec<_>>(),
        })
    }

    /// The per-class table (percentages, 2 decimals, as mmseg prints it).
    pub fn table(&self, class_names: Option<&[String]>) -> String {
        let name = |i: usize| {
            class_names
                .and_then(|c| c.get(i).cloned())
                .unwrap_or_else(|| i.to_string())
        };
        let w = (0..self.iou.len())
            .map(|i| name(i).len())
            .max()
            .unwrap_or(5)
            .max(5);
        let p = |v: f64| {
            if v.is_nan() {
                "nan".to_string()
            } else {
                format!("{:.2}", v * 100.0)
            }
        };
        let mut s = format!("{:<w$}  {:>6}  {:>6}\n", "Class", "IoU", "Acc");
        for i in 0..self.iou.len() {
            s += &format!(
                "{:<w$}  {:>6}  {:>6}\n",
                name(i),
                p(self.iou[i]),
                p(self.acc[i])
            );
        }
        s += &format!(
            "aAcc {}  mIoU {}  mAcc {}\n",
            p(self.a_acc),
            p(self.m_iou),
            p(self.m_acc)
        );
        s
    }
}

/// Accumulates label maps and computes [`SegMetrics`]. Serialisable, so that the ranks of a
/// distributed test send their counts to rank 0 ([`IoUMetric::merge`]).
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct IoUMetric {
    inner: SemanticEval,
    num_classes: usize,
}

impl IoUMetric {
    /// `num_classes` classes, ground-truth pixels equal to `ignore_index` left out.
    pub fn new(num_classes: usize, ignore_index: u64) -> Self {
        Self {
            inner: SemanticEval::new(num_classes).ignore_index(Some(ignore_index)),
            num_classes,
        }
    }

    /// Adds one image: `gt` and `pred` flat maps of equal length (same pixel order), labels in
    /// `[0, num_classes)` or the ignore index (ground truth only).
    ///
    /// Errors: different lengths, labels out of range (naming the pixel).
    pub fn update(&mut self, gt: &[u8], pred: &[u8]) -> Result<(), EvalError> {
        self.inner
            .update(gt, pred)
            .map_err(|e| EvalError::Invalid(e.to_string()))
    }

    /// Adds `other`'s counts (another shard of the same split), as hotcoco's
    /// `SemanticEval::merge`.
    ///
    /// Errors: a different number of classes or ignore index.
    pub fn merge(&mut self, other: &IoUMetric) -> Result<(), EvalError> {
        self.inner
            .merge(&other.inner)
            .map_err(|e| EvalError::Invalid(e.to_string()))
    }

    /// The metrics over everything added so far.
    pub fn compute(&self) -> SegMetrics {
        let s = self.inner.scores();
        let nan = |v: f64| {
            if hotcoco::metrics::is_computed(v) {
                v
            } else {
                f64::NAN
            }
        };
        SegMetrics {
            a_acc: nan(s.aacc),
            m_iou: nan(s.miou),
            m_acc: nan(s.macc),
            iou: s.per_class.iter().map(|c| nan(c.iou)).collect(),
            acc: s.per_class.iter().map(|c| nan(c.acc)).collect(),
        }
    }

    /// Number of classes.
    pub fn num_classes(&self) -> usize {
        self.num_classes
    }
}

pub use densepred_core::structures::label_map::reduce_zero_label;

/// Reads an 8-bit single-channel PNG label map: `(pixels, (height, width))`.
///
/// Errors: [`EvalError::File`] for an unreadable file or an image that is not 8-bit grayscale /
/// palette-indexed.
pub fn read_label_png(path: &Path) -> Result<(Vec<u8>, (usize, usize)), EvalError> {
    densepred_core::structures::label_map::read_label_png(path).map_err(|reason| EvalError::File {
        path: path.into(),
        reason,
    })
}

/// Pairs `*.png` files of `gt_dir` and `pred_dir` by file stem and evaluates them. With
/// `reduce_zero_label`, both files use the ADE20K convention (value v = class v − 1, 0 = other) and
/// are reduced; the ground truth's 0 is then ignored.
///
/// Errors: an empty `gt_dir`, a ground-truth file without a prediction (named), maps of different
/// sizes (named), labels out of range.
pub fn evaluate_folders(
    gt_dir: &Path,
    pred_dir: &Path,
    num_classes: usize,
    reduce_zero: bool,
) -> Result<SegMetrics, EvalError> {
    let list = |d: &Path| -> Result<Vec<PathBuf>, EvalError> {
        let rd = std::fs::read_dir(d).map_err(|e| EvalError::File {
            path: d.into(),
            reason: e.to_string(),
        })?;
        let mut v: Vec<PathBuf> = rd
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "png"))
            .collect();
        v.sort();
        Ok(v)
    };
    let gts = list(gt_dir)?;
    if gts.is_empty() {
        return Err(EvalError::File {
            path: gt_dir.into(),
            reason: "no .png label maps".into(),
        });
    }
    let mut metric = IoUMetric::new(num_classes, 255);
    for g in gts {
        let stem = g.file_stem().unwrap_or_default();
        let p = pred_dir.join(stem).with_extension("png");
        if !p.exists() {
            return Err(EvalError::File {
                path: p,
                reason: format!("no prediction for ground truth {}", g.display()),
            });
        }
        let (mut gm, gs) = read_label_png(&g)?;
        let (mut pm, ps) = read_label_png(&p)?;
        if gs != ps {
            return Err(EvalError::File {
                path: p,
                reason: format!(
                    "size {}x{} differs from ground truth {} ({}x{})",
                    ps.1,
                    ps.0,
                    g.display(),
                    gs.1,
                    gs.0
                ),
            });
        }
        if reduce_zero {
            if let Some(i) = pm.iter().position(|&v| v == 0) {
                return Err(EvalError::File {
                    path: p,
                    reason: format!("pixel {i} (row {}, col {}): value 0 is no class under --reduce-zero-label (classes are 1..={num_classes})", i / ps.1, i % ps.1),
                });
            }
            reduce_zero_label(&mut gm);
            reduce_zero_label(&mut pm);
        }
        metric.update(&gm, &pm).map_err(|e| EvalError::File {
            path: p.clone(),
            reason: e.to_string(),
        })?;
    }
    Ok(metric.compute())
}
