//! `CocoDataset`: COCO instances JSON (mmdetection `CocoDataset` semantics).
//!
//! * category ids (non-contiguous, e.g. 1..90) map to contiguous labels in ascending id order (or
//!   in the order of a configured class subset);
//! * `iscrowd = 1` objects become ignored instances (mmdet's `ignore_flag`), polygons and RLE (both
//!   the compressed and the uncompressed form) are kept for `LoadAnnotations(with_mask=True)`;
//! * boxes `[x, y, w, h]` become xyxy; a box with non-positive width or height, or lying entirely
//!   outside its image, is an error naming the annotation (or, with `skip_invalid`, a warning and the
//!   annotation is skipped and counted); annotations whose area or size is 0 are skipped as mmdet
//!   does;
//! * `filter_empty_gt` drops training images without non-crowd objects.

use crate::{DataError, Dataset, Instance, MetaInfo, Sample};
use hotcoco::types::{Annotation, Segmentation};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// One image and its annotations.
#[derive(Debug, Clone)]
struct Entry {
    img_id: u64,
    path: PathBuf,
    height: u32,
    width: u32,
    instances: Vec<Instance>,
    segmentations: Vec<Option<Segmentation>>,
}

/// COCO instances dataset.
#[derive(Debug, Clone)]
pub struct CocoDataset {
    entries: Vec<Entry>,
    meta: MetaInfo,
    /// Annotations skipped because invalid (with `skip_invalid`).
    pub skipped: usize,
    /// Annotations under 1 px or of zero area, dropped as mmdetection does (logged).
    pub dropped_tiny: usize,
    /// The annotation file.
    pub ann_file: PathBuf,
}

/// Options of [`CocoDataset::load`].
#[derive(Debug, Clone, Default)]
pub struct CocoOptions {
    /// Keep only these classes (names), in this label order.
    pub classes: Option<Vec<String>>,
    /// Drop images without non-crowd objects.
    pub filter_empty_gt: bool,
    /// Drop images whose shorter side is below this.
    pub min_size: u32,
    /// Invalid annotations become warnings (skipped and counted) instead of errors.
    pub skip_invalid: bool,
}

impl CocoDataset {
    /// Reads `ann_file`; image files are `img_prefix / file_name`.
    ///
    /// Errors: unreadable / malformed JSON, an annotation naming an unknown image or category, an
    /// invalid box or polygon (unless `skip_invalid`), an unknown class in `classes`.
    pub fn load(ann_file: &Path, img_prefix: &Path, opts: &CocoOptions) -> Result<Self, DataError> {
        let file_err = |reason: String| DataError::File {
            path: ann_file.to_path_buf(),
            reason,
        };
        let text = std::fs::read_to_string(ann_file).map_err(|e| file_err(e.to_string()))?;
        let ds: hotcoco::types::Dataset =
            serde_json::from_str(&text).map_err(|e| file_err(format!("invalid COCO JSON: {e}")))?;
        let mut cats = ds.categories.clone();
        cats.sort_by_key(|c| c.id);
        let (classes, cat_ids): (Vec<String>, Vec<u64>) = match &opts.classes {
            Some(names) => {
                let mut ids = Vec::new();
                for n in names {
                    let c = cats.iter().find(|c| &c.name == n).ok_or_else(|| {
                        DataError::Config(format!(
                            "class {n:?} is not a category of {}",
                            ann_file.display()
                        ))
                    })?;
                    ids.push(c.id);
                }
                (names.clone(), ids)
            }
            None => (
                cats.iter().map(|c| c.name.clone()).collect(),
                cats.iter().map(|c| c.id).collect(),
            ),
        };
        let label_of: HashMap<u64, usize> =
            cat_ids.iter().enumerate().map(|(l, &id)| (id, l)).collect();
        let known_cats: std::collections::HashSet<u64> = cats.iter().map(|c| c.id).collect();
        let mut by_img: HashMap<u64, Vec<&Annotation>> = HashMap::new();
        let img_ids: std::collections::HashSet<u64> = ds.images.iter().map(|i| i.id).collect();
        for a in &ds.annotations {
            let rec = || format!("annotation id {} (image id {})", a.id, a.image_id);
            if !img_ids.contains(&a.image_id) {
                return Err(DataError::Record {
                    path: ann_file.into(),
                    record: rec(),
                    field: "image_id".into(),
                    reason: "no image with this id".into(),
                });
            }
            if !known_cats.contains(&a.category_id) {
                return Err(DataError::Record {
                    path: ann_file.into(),
                    record: rec(),
                    field: "category_id".into(),
                    reason: "no category with this id".into(),
                });
            }
            by_img.entry(a.image_id).or_default().push(a);
        }
        let mut skipped = 0;
        let mut dropped_tiny = 0;
        let mut entries = Vec::new();
        for img in &ds.images {
            if img.width == 0 || img.height == 0 {
                return Err(DataError::Record {
                    path: ann_file.into(),
                    record: format!("image id {}", img.id),
                    field: "width/height".into(),
                    reason: "missing or zero".into(),
                });
            }
            let mut e = Entry {
                img_id: img.id,
                path: img_prefix.join(&img.file_name),
                height: img.height,
                width: img.width,
                instances: vec![],
                segmentations: vec![],
            };
            for a in by_img.get(&img.id).map(|v| v.as_slice()).unwrap_or(&[]) {
                let Some(&label) = label_of.get(&a.category_id) else {
                    continue;
                };
                match check_annotation(a, img.width, img.height) {
                    Ok(None) => {
                        dropped_tiny += 1;
                        continue;
                    }
                    Ok(Some(bbox)) => {
                        e.instances.push(Instance {
                            bbox,
                            label,
                            ignore: a.iscrowd,
                            ann_id: a.id,
                        });
                        e.segmentations.push(a.segmentation.clone());
                    }
                    Err((field, reason)) => {
                        let err = DataError::Record {
                            path: ann_file.into(),
                            record: format!("annotation id {} (image id {})", a.id, a.image_id),
                            field: field.into(),
                            reason,
                        };
                        if opts.skip_invalid {
                            tracing::warn!("skipping: {err}");
                            skipped += 1;
                        } else {
                            return Err(err);
                        }
                    }
                }
            }
            if opts.filter_empty_gt && !e.instances.iter().any(|i| !i.ignore) {
                continue;
            }
            if img.width.min(img.height) < opts.min_size {
                continue;
            }
            entries.push(e);
        }
        if dropped_tiny > 0 {
            tracing::info!("{}: dropped {dropped_tiny} annotations under 1 px or of zero area (as mmdetection does)", ann_file.display());
        }
        if skipped > 0 {
            tracing::warn!(
                "{}: skipped {skipped} invalid annotations",
                ann_file.display()
            );
        }
        Ok(Self {
            entries,
            meta: MetaInfo { classes, cat_ids },
            skipped,
            dropped_tiny,
            ann_file: ann_file.to_path_buf(),
        })
    }

    /// Label of a COCO category id.
    pub fn label_of(&self, cat_id: u64) -> Option<usize> {
        self.meta.cat_ids.iter().position(|&c| c == cat_id)
    }
}

/// `Ok(Some(xyxy))` for a usable object, `Ok(None)` for one mmdet silently drops (zero area or an
/// empty box), `Err((field, reason))` for a malformed one.
fn check_annotation(
    a: &Annotation,
    w: u32,
    h: u32,
) -> Result<Option<[f32; 4]>, (&'static str, String)> {
    let Some([x, y, bw, bh]) = a.bbox else {
        return Err(("bbox", "missing".into()));
    };
    if ![x, y, bw, bh].iter().all(|v| v.is_finite()) {
        return Err(("bbox", format!("non-finite value in {:?}", [x, y, bw, bh])));
    }
    if bw <= 0.0 || bh <= 0.0 {
        return Err(("bbox", format!("non-positive size {bw}x{bh}")));
    }
    if a.area == Some(0.0) || bw < 1.0 || bh < 1.0 {
        // mmdet's parse_data_info drops boxes under 1 px and zero-area objects; counted and
        // reported by the caller.
        return Ok(None);
    }
    let x1 = x.max(0.0);
    let y1 = y.max(0.0);
    let x2 = (x + bw).min(w as f64);
    let y2 = (y + bh).min(h as f64);
    if x2 <= x1 || y2 <= y1 {
        return Err((
            "bbox",
            format!("{:?} lies outside the {w}x{h} image", [x, y, bw, bh]),
        ));
    }
    if let Some(Segmentation::Polygon(polys)) = &a.segmentation {
        if !a.iscrowd {
            for (i, p) in polys.iter().enumerate() {
                if p.len() < 6 || p.len() % 2 != 0 {
                    return Err((
                        "segmentation",
                        format!(
                            "polygon {i} has {} coordinates (needs an even number ≥ 6)",
                            p.len()
                        ),
                    ));
                }
            }
        }
    }
    Ok(Some([x1 as f32, y1 as f32, x2 as f32, y2 as f32]))
}

impl Dataset for CocoDataset {
    fn len(&self) -> usize {
        self.entries.len()
    }

    fn sample(&self, i: usize) -> Sample {
        let e = &self.entries[i];
        let mut s = Sample::new(e.path.clone(), e.img_id);
        s.ori_shape = (e.height as usize, e.width as usize);
        s.img_shape = s.ori_shape;
        s.ann_instances = e.instances.clone();
        s.segmentations = e.segmentations.clone();
        s
    }

    fn metainfo(&self) -> &MetaInfo {
        &self.meta
    }
}

/// Rasterises one COCO segmentation (polygons, either RLE form) to a row-major `(h, w)` 0/1 mask,
/// exactly as pycocotools (`frPyObjects` + `decode`) does.
///
/// Errors: an RLE whose counts do not sum to `h · w` or whose size differs from the image.
pub fn segmentation_to_mask(
    seg: &Segmentation,
    h: u32,
    w: u32,
) -> Result<ndarray::Array2<u8>, String> {
    let rle = match seg {
        Segmentation::Polygon(p) => hotcoco::mask::fr_polys(p, h, w).map_err(|e| e.to_string())?,
        Segmentation::Rect(b) => hotcoco::mask::fr_bbox(b, h, w).map_err(|e| e.to_string())?,
        Segmentation::CompressedRle { size, counts } => {
            if size != &[h, w] {
                return Err(format!(
                    "RLE size {size:?} differs from the image ({h}, {w})"
                ));
            }
            hotcoco::mask::rle_from_string(counts, h, w).map_err(|e| e.to_string())?
        }
        Segmentation::UncompressedRle { size, counts } => {
            if size != &[h, w] {
                return Err(format!(
                    "RLE size {size:?} differs from the image ({h}, {w})"
                ));
            }
            hotcoco::mask::check_counts(counts, h, w).map_err(|e| e.to_string())?;
            hotcoco::types::Rle {
                h,
                w,
                counts: counts.clone(),
            }
        }
        other => return Err(format!("unsupported segmentation form {other:?}")),
    };
    let col_major = hotcoco::mask::decode(&rle);
    // pycocotools' masks are column-major (Fortran order): transpose to (h, w) row-major.
    let a = ndarray::Array2::from_shape_vec((w as usize, h as usize), col_major)
        .map_err(|e| e.to_string())?;
    Ok(a.reversed_axes().as_standard_layout().to_owned())
}

/// The mask of one COCO results record whose `segmentation` is an RLE `{size: [h, w], counts}`
/// (what `densepred test --out` writes for instance segmentation), row-major `(h, w)` 0/1.
///
/// Errors: a record without an RLE `segmentation`, counts that do not fit the size.
pub fn result_record_mask(rec: &serde_json::Value) -> Result<ndarray::Array2<u8>, String> {
    let seg: Segmentation = serde_json::from_value(rec["segmentation"].clone())
        .map_err(|e| format!("segmentation: {e}"))?;
    let (h, w) = match &seg {
        Segmentation::CompressedRle { size, .. } | Segmentation::UncompressedRle { size, .. } => {
            (size[0], size[1])
        }
        _ => return Err("segmentation: expected an RLE with its size".into()),
    };
    segmentation_to_mask(&seg, h, w)
}
