//! Per-image detection metadata, ground truth and results, shared by heads, models, the engine
//! and the evaluators. Coordinates are xyxy in absolute pixels (no +1), as mmdetection 3.x.

/// Geometry of one image through the pipeline (mmdetection's `img_metas`). Shapes are `(h, w)`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ImageMeta {
    /// Size of the file as decoded.
    pub ori_shape: (usize, usize),
    /// Size after the resize transforms (the image content inside the batch tensor).
    pub img_shape: (usize, usize),
    /// Size after per-image padding (anchors outside it are invalid).
    pub pad_shape: (usize, usize),
    /// `(w_scale, h_scale)` = resized / original.
    pub scale_factor: (f64, f64),
}

/// Ground truth of one image in the `img_shape` frame: boxes `(N, 4)` xyxy pixels with 0-based
/// labels, plus crowd / ignored boxes (used only by assigners with `ignore_iof_thr > 0`).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct GtInstances {
    /// xyxy boxes in pixels of the resized image.
    pub bboxes: Vec<[f32; 4]>,
    /// 0-based class index per box.
    pub labels: Vec<i64>,
    /// Ignored (crowd) boxes, xyxy pixels.
    pub ignored: Vec<[f32; 4]>,
    /// Instance masks parallel to `bboxes`, in the `img_shape` frame (any size at least as large
    /// as `img_shape`, e.g. `pad_shape`; pixels outside the stored size read 0), when loaded.
    pub masks: Option<BitmapMasks>,
}

/// Detections of one image: boxes xyxy in pixels of the **original** image (after rescale),
/// scores in `[0, 1]`, 0-based labels; sorted by descending score.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Detections {
    /// `(N, 4)` xyxy pixels.
    pub bboxes: Vec<[f32; 4]>,
    /// `(N,)` confidence.
    pub scores: Vec<f32>,
    /// `(N,)` 0-based class index.
    pub labels: Vec<i64>,
    /// Binary instance masks in the original image (`ori_shape`), for instance segmentation.
    pub masks: Option<BitmapMasks>,
}

impl Detections {
    /// Number of detections.
    pub fn len(&self) -> usize {
        self.scores.len()
    }

    /// True without detections.
    pub fn is_empty(&self) -> bool {
        self.scores.is_empty()
    }
}

/// Binary instance masks of one image (detectron2's `BitMasks`, mmdetection's `BitmapMasks`):
/// `N` row-major `(h, w)` planes of 0/1 bytes.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct BitmapMasks {
    /// `(h, w)` of every plane.
    pub size: (usize, usize),
    /// One `h·w` plane per instance.
    pub masks: Vec<Vec<u8>>,
}

impl BitmapMasks {
    /// Number of masks.
    pub fn len(&self) -> usize {
        self.masks.len()
    }

    /// True without masks.
    pub fn is_empty(&self) -> bool {
        self.masks.is_empty()
    }

    /// The masks zero-extended at the bottom and right to at least `(h, w)` (mmdetection pads GT
    /// masks to the batch's padded size, `pad_mask = True`).
    pub fn padded(&self, h: usize, w: usize) -> Self {
        let (mh, mw) = self.size;
        let (nh, nw) = (mh.max(h), mw.max(w));
        if (nh, nw) == (mh, mw) {
            return self.clone();
        }
        let masks = self
            .masks
            .iter()
            .map(|m| {
                let mut out = vec![0u8; nh * nw];
                for y in 0..mh {
                    out[y * nw..y * nw + mw].copy_from_slice(&m[y * mw..(y + 1) * mw]);
                }
                out
            })
            .collect();
        Self {
            size: (nh, nw),
            masks,
        }
    }

    /// The masks with index `keep` in that order.
    pub fn select(&self, keep: &[usize]) -> Self {
        Self {
            size: self.size,
            masks: keep.iter().map(|&k| self.masks[k].clone()).collect(),
        }
    }
}
