//! Data transforms with mmdetection 3.x / mmsegmentation 1.x names and behaviour, configured as the
//! `pipeline` list of a dataloader (`[[train_dataloader.dataset.pipeline]] type = "Resize" ...`).
//! Boxes, instance masks and label maps move with the image.

use crate::coco::segmentation_to_mask;
use crate::{DataError, Sample};
use densepred_core::config::defaults as d;
use ndarray::{s, Array2, Array3, Axis};
use rand::{Rng, RngCore};
use serde::{Deserialize, Serialize};

fn horizontal() -> String {
    "horizontal".into()
}
fn bd() -> f64 {
    32.0
}
fn range05() -> [f64; 2] {
    [0.5, 1.5]
}
fn hue() -> f64 {
    18.0
}

/// Padding values: image and segmentation map.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PadVal {
    /// Image padding value.
    #[serde(default)]
    pub img: f32,
    /// Label-map padding value (ignored label).
    #[serde(default = "d::ignore_255")]
    pub seg: u8,
}

impl Default for PadVal {
    fn default() -> Self {
        Self { img: 0.0, seg: 255 }
    }
}

/// A transform table of the `pipeline` list (tag `type`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", deny_unknown_fields)]
pub enum TransformConfig {
    /// Decode the image file to RGB f32 (grayscale files are expanded to 3 channels).
    LoadImageFromFile {
        /// Either value gives the same model input: images are decoded to f32 here, and mmdet
        /// converts `uint8` images to float in its data preprocessor.
        #[serde(default)]
        to_float32: bool,
        /// Only `{}` (local files).
        #[serde(default)]
        backend_args: Option<toml_value::Empty>,
    },
    /// Load boxes (already parsed), instance masks and/or the label map.
    LoadAnnotations {
        /// Boxes and labels (always present for detection datasets).
        #[serde(default = "d::yes")]
        with_bbox: bool,
        /// Labels (mmdet's `with_label`).
        #[serde(default = "d::yes")]
        with_label: bool,
        /// Rasterise instance masks from polygons / RLE.
        #[serde(default)]
        with_mask: bool,
        /// Load the semantic label map (mmseg's `LoadAnnotations` always does).
        #[serde(default)]
        with_seg: bool,
        /// mmseg: 0 → 255, v → v − 1 (overrides the dataset's setting when given).
        #[serde(default)]
        reduce_zero_label: Option<bool>,
        /// Polygons are rasterised to bitmaps (mmdet's default `true`); `false` (keeping
        /// `PolygonMasks`) is not supported and refused.
        #[serde(
            default = "d::yes",
            deserialize_with = "densepred_core::config::only_true"
        )]
        poly2mask: bool,
    },
    /// Resize to `scale = [w, h]` (with `keep_ratio`: as large as fits `max(scale)` on the long
    /// edge and `min(scale)` on the short edge), or by `scale_factor`.
    Resize {
        /// Target `[w, h]`.
        #[serde(default)]
        scale: Option<[f64; 2]>,
        /// Alternative to `scale`: multiply both sides.
        #[serde(default)]
        scale_factor: Option<f64>,
        /// Keep the aspect ratio.
        #[serde(default)]
        keep_ratio: bool,
        /// Clip boxes to the resized image.
        #[serde(default = "d::yes")]
        clip_object_border: bool,
    },
    /// Random scale, then `Resize`: with `ratio_range`, `scale · U(ratio_range)`; with two scales
    /// `[[w0, h0], [w1, h1]]`, each edge drawn uniformly (integers) between the two.
    RandomResize {
        /// `[w, h]` (with `ratio_range`) or two `[w, h]` bounds.
        scale: ScaleSpec,
        /// `[lo, hi]` ratio range.
        #[serde(default)]
        ratio_range: Option<[f64; 2]>,
        /// Keep the aspect ratio.
        #[serde(default)]
        keep_ratio: bool,
    },
    /// `Resize` to one of `scales`, chosen uniformly.
    RandomChoiceResize {
        /// Candidate `[w, h]` scales.
        scales: Vec<[f64; 2]>,
        /// Keep the aspect ratio.
        #[serde(default)]
        keep_ratio: bool,
    },
    /// Horizontal flip with probability `prob`.
    RandomFlip {
        /// Flip probability.
        #[serde(default = "d::half")]
        prob: f64,
        /// Only `"horizontal"` is supported.
        #[serde(default = "horizontal")]
        direction: String,
    },
    /// Random `crop_size = [h, w]` crop (mmseg; boxes are shifted, clipped, and dropped when empty,
    /// as mmdet). With `cat_max_ratio < 1`, up to 10 tries to find a crop where no single class
    /// covers more than that share of the labelled pixels.
    RandomCrop {
        /// `[h, w]`.
        crop_size: [usize; 2],
        /// Maximum share of one class in the crop.
        #[serde(default = "d::one_f64")]
        cat_max_ratio: f64,
        /// Label ignored in that count.
        #[serde(default = "d::ignore_255")]
        ignore_index: u8,
        /// mmdet's `crop_type`: `"absolute"` (the default: `crop_size` as is) or
        /// `"absolute_range"` (`crop_size = [lo, hi]`: height and width drawn uniformly from
        /// `lo..=min(side, hi)`).
        #[serde(default)]
        crop_type: Option<String>,
        /// mmdet: keep crops without any box (only `true` is supported; with `false` mmdet
        /// re-samples another image, which a per-sample pipeline cannot do).
        #[serde(default)]
        allow_negative_crop: Option<bool>,
    },
    /// Random brightness, contrast, saturation and hue (SSD's photometric distortion, mmdet/mmseg).
    PhotoMetricDistortion {
        /// Brightness shift range ±delta.
        #[serde(default = "bd")]
        brightness_delta: f64,
        /// Contrast factor range.
        #[serde(default = "range05")]
        contrast_range: [f64; 2],
        /// Saturation factor range.
        #[serde(default = "range05")]
        saturation_range: [f64; 2],
        /// Hue shift range ±delta (degrees).
        #[serde(default = "hue")]
        hue_delta: f64,
    },
    /// `(img − mean) / std` per channel (RGB order; `to_rgb = false` means the mean/std are in BGR
    /// order, as for images loaded BGR).
    Normalize {
        /// Channel means.
        mean: [f32; 3],
        /// Channel standard deviations.
        std: [f32; 3],
        /// Whether mean/std are given for RGB.
        #[serde(default = "d::yes")]
        to_rgb: bool,
    },
    /// Pad bottom/right to `size = [h, w]` or to a multiple of `size_divisor`.
    Pad {
        /// Fixed `[h, w]`.
        #[serde(default)]
        size: Option<[usize; 2]>,
        /// Pad each side up to a multiple of this.
        #[serde(default)]
        size_divisor: Option<usize>,
        /// Padding values.
        #[serde(default)]
        pad_val: PadVal,
        /// mmseg's name for the label-map padding value.
        #[serde(default)]
        seg_pad_val: Option<u8>,
    },
    /// mmdet's `AutoAugment`: one of `policies` (each a transform list), chosen uniformly.
    AutoAugment {
        /// Candidate transform lists.
        policies: Vec<Vec<TransformConfig>>,
    },
    /// Marks the end of a detection pipeline (mmdet `PackDetInputs`); no-op here.
    PackDetInputs {
        /// Which metadata mmdet packs; every sample here carries all of it (paths, shapes,
        /// scale factor, flip), so any list gives the same model input.
        #[serde(default)]
        meta_keys: Option<Vec<String>>,
    },
    /// Marks the end of a segmentation pipeline (mmseg `PackSegInputs`); no-op here.
    PackSegInputs {
        /// As `PackDetInputs.meta_keys`.
        #[serde(default)]
        meta_keys: Option<Vec<String>>,
    },
}

/// `scale` of `RandomResize`: one `[w, h]` or two bounds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum ScaleSpec {
    /// One scale (used with `ratio_range`).
    One([f64; 2]),
    /// Two bounds.
    Range([[f64; 2]; 2]),
}

/// `backend_args`: only `{}` (or absent), mmdetection's default of reading local files; any
/// key (a storage backend) is refused as unknown.
pub mod toml_value {
    pub use densepred_core::config::EmptyTable as Empty;
}

/// A compiled pipeline.
#[derive(Debug, Clone, PartialEq)]
pub struct Pipeline(pub Vec<TransformConfig>);

impl Pipeline {
    /// Runs every transform in order on `s` with randomness from `rng`.
    ///
    /// Errors: unreadable or corrupt files, label maps whose size differs from the image, invalid
    /// masks; each names the file.
    /// Errors and panics of a transform come back as [`DataError::Sample`], naming the image
    /// (file and id) and the transform (its position in the list and its `type`).
    pub fn apply(&self, mut s: Sample, rng: &mut dyn RngCore) -> Result<Sample, DataError> {
        for (step, t) in self.0.iter().enumerate() {
            let (img_path, img_id) = (s.img_path.clone(), s.img_id);
            let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| apply_one(t, s, rng)));
            let source = match r {
                Ok(Ok(next)) => {
                    s = next;
                    continue;
                }
                Ok(Err(e)) => e,
                Err(payload) => DataError::Panic(crate::panic_message(payload.as_ref())),
            };
            return Err(DataError::Sample {
                img_path,
                img_id,
                step,
                transform: t.name(),
                source: Box::new(source),
            });
        }
        Ok(s)
    }
}

/// A config value check: `Err((key, reason))`, `key` relative to the transform's table.
type Check = Result<(), (String, String)>;

fn positive(key: &str, v: &[f64]) -> Check {
    match v.iter().find(|x| !(x.is_finite() && **x > 0.0)) {
        Some(x) => Err((key.into(), format!("must be positive, got {x}"))),
        None => Ok(()),
    }
}

fn non_negative(key: &str, v: f64) -> Check {
    if v.is_finite() && v >= 0.0 {
        Ok(())
    } else {
        Err((
            key.into(),
            format!("must be a non-negative number, got {v}"),
        ))
    }
}

fn low_high(key: &str, [lo, hi]: [f64; 2], min: f64) -> Check {
    if lo.is_finite() && hi.is_finite() && min <= lo && lo <= hi {
        Ok(())
    } else {
        Err((
            key.into(),
            format!("must be [low, high] with {min} <= low <= high, got [{lo}, {hi}]"),
        ))
    }
}

impl TransformConfig {
    /// Checks the values that would make the transform fail or draw from an empty range at run
    /// time (reversed ranges, negative deltas, zero scales, probabilities outside `[0, 1]`), so
    /// that a config is refused when it is read.
    ///
    /// Errors: `(key, reason)` with `key` relative to this transform's table (`ratio_range`,
    /// `policies.0.2.prob` inside `AutoAugment`).
    pub fn validate(&self) -> Result<(), (String, String)> {
        use TransformConfig as T;
        match self {
            T::Resize {
                scale,
                scale_factor,
                ..
            } => {
                if scale.is_none() && scale_factor.is_none() {
                    return Err((
                        "scale".into(),
                        "Resize needs `scale` or `scale_factor`".into(),
                    ));
                }
                if let Some(sc) = scale {
                    positive("scale", sc)?;
                }
                if let Some(f) = scale_factor {
                    positive("scale_factor", &[*f])?;
                }
            }
            T::RandomResize {
                scale, ratio_range, ..
            } => {
                match scale {
                    ScaleSpec::One(sc) => positive("scale", sc)?,
                    ScaleSpec::Range([a, b]) => {
                        positive("scale", a)?;
                        positive("scale", b)?;
                    }
                }
                if let Some(r) = ratio_range {
                    low_high("ratio_range", *r, f64::MIN_POSITIVE)?;
                }
            }
            T::RandomChoiceResize { scales, .. } => {
                if scales.is_empty() {
                    return Err(("scales".into(), "must list at least one scale".into()));
                }
                for (i, sc) in scales.iter().enumerate() {
                    positive(&format!("scales.{i}"), sc)?;
                }
            }
            T::RandomFlip { prob, direction } => {
                if !(0.0..=1.0).contains(prob) {
                    return Err(("prob".into(), format!("must be in [0, 1], got {prob}")));
                }
                if direction != "horizontal" {
                    return Err((
                        "direction".into(),
                        format!("{direction:?} is not supported (only \"horizontal\")"),
                    ));
                }
            }
            T::RandomCrop {
                crop_size,
                cat_max_ratio,
                crop_type,
                allow_negative_crop,
                ..
            } => {
                if crop_size.contains(&0) {
                    return Err(("crop_size".into(), "sides must be positive".into()));
                }
                if !(*cat_max_ratio > 0.0 && *cat_max_ratio <= 1.0) {
                    return Err((
                        "cat_max_ratio".into(),
                        format!("must be in (0, 1], got {cat_max_ratio}"),
                    ));
                }
                match crop_type.as_deref() {
                    None | Some("absolute") => {}
                    Some("absolute_range") if crop_size[0] <= crop_size[1] => {}
                    Some("absolute_range") => {
                        return Err((
                            "crop_size".into(),
                            "with crop_type = \"absolute_range\" it is [low, high], low <= high"
                                .into(),
                        ))
                    }
                    Some(o) => {
                        return Err((
                            "crop_type".into(),
                            format!("{o:?} is not supported (absolute, absolute_range)"),
                        ))
                    }
                }
                if *allow_negative_crop == Some(false) {
                    return Err((
                        "allow_negative_crop".into(),
                        "false is not supported (set it to true)".into(),
                    ));
                }
            }
            T::PhotoMetricDistortion {
                brightness_delta,
                contrast_range,
                saturation_range,
                hue_delta,
            } => {
                non_negative("brightness_delta", *brightness_delta)?;
                low_high("contrast_range", *contrast_range, 0.0)?;
                low_high("saturation_range", *saturation_range, 0.0)?;
                non_negative("hue_delta", *hue_delta)?;
            }
            T::Normalize { std, .. } => {
                let s: Vec<f64> = std.iter().map(|&x| x as f64).collect();
                positive("std", &s)?;
            }
            T::Pad {
                size, size_divisor, ..
            } => match (size, size_divisor) {
                (Some(sz), _) if sz.contains(&0) => {
                    return Err(("size".into(), "sides must be positive".into()))
                }
                (Some(_), _) => {}
                (None, Some(d)) if *d > 0 => {}
                _ => {
                    return Err((
                        "size_divisor".into(),
                        "Pad needs `size` or a positive `size_divisor`".into(),
                    ))
                }
            },
            T::AutoAugment { policies } => {
                if policies.is_empty() {
                    return Err(("policies".into(), "must list at least one policy".into()));
                }
                for (i, p) in policies.iter().enumerate() {
                    for (j, t) in p.iter().enumerate() {
                        t.validate()
                            .map_err(|(k, why)| (format!("policies.{i}.{j}.{k}"), why))?;
                    }
                }
            }
            T::LoadImageFromFile { .. }
            | T::LoadAnnotations { .. }
            | T::PackDetInputs { .. }
            | T::PackSegInputs { .. } => {}
        }
        Ok(())
    }

    /// The transform's `type` as a config writes it.
    pub fn name(&self) -> &'static str {
        use TransformConfig as T;
        match self {
            T::LoadImageFromFile { .. } => "LoadImageFromFile",
            T::LoadAnnotations { .. } => "LoadAnnotations",
            T::Resize { .. } => "Resize",
            T::RandomResize { .. } => "RandomResize",
            T::RandomChoiceResize { .. } => "RandomChoiceResize",
            T::RandomFlip { .. } => "RandomFlip",
            T::RandomCrop { .. } => "RandomCrop",
            T::PhotoMetricDistortion { .. } => "PhotoMetricDistortion",
            T::Normalize { .. } => "Normalize",
            T::Pad { .. } => "Pad",
            T::AutoAugment { .. } => "AutoAugment",
            T::PackDetInputs { .. } => "PackDetInputs",
            T::PackSegInputs { .. } => "PackSegInputs",
        }
    }
}

fn apply_one(
    t: &TransformConfig,
    mut s: Sample,
    rng: &mut dyn RngCore,
) -> Result<Sample, DataError> {
    use TransformConfig as T;
    match t {
        T::LoadImageFromFile { .. } => {
            let img = load_rgb(&s.img_path)?;
            if s.ori_shape != (0, 0) && s.ori_shape != (img.dim().0, img.dim().1) {
                return Err(DataError::File {
                    path: s.img_path.clone(),
                    reason: format!(
                        "image is {}x{} but its annotation says {}x{}",
                        img.dim().1,
                        img.dim().0,
                        s.ori_shape.1,
                        s.ori_shape.0
                    ),
                });
            }
            s.ori_shape = (img.dim().0, img.dim().1);
            s.img_shape = s.ori_shape;
            s.pad_shape = s.ori_shape;
            s.img = Some(img);
        }
        T::LoadAnnotations {
            with_bbox,
            with_mask,
            with_seg,
            reduce_zero_label,
            ..
        } => {
            // Annotations come at the file's resolution (mmdet / mmseg): a LoadAnnotations placed
            // after Resize leaves them there, for evaluation against the original image.
            let (h, w) = s.ori_shape;
            if *with_bbox || *with_mask {
                s.instances = s.ann_instances.clone();
            }
            if *with_mask {
                let mut masks = Vec::with_capacity(s.instances.len());
                if s.segmentations.len() != s.instances.len() {
                    return Err(DataError::Config(format!(
                        "{}: LoadAnnotations(with_mask): {} instances but {} segmentations",
                        s.img_path.display(),
                        s.instances.len(),
                        s.segmentations.len()
                    )));
                }
                for (inst, seg) in s.instances.iter().zip(&s.segmentations) {
                    let record = || format!("image id {}, annotation id {}", s.img_id, inst.ann_id);
                    // mmdetection fails on an instance without a mask as well (KeyError).
                    let seg = seg.as_ref().ok_or_else(|| DataError::Record {
                        path: s.img_path.clone(),
                        record: record(),
                        field: "segmentation".into(),
                        reason: "missing, and LoadAnnotations has with_mask = true".into(),
                    })?;
                    let m = segmentation_to_mask(seg, h as u32, w as u32).map_err(|reason| {
                        DataError::Record {
                            path: s.img_path.clone(),
                            record: record(),
                            field: "segmentation".into(),
                            reason,
                        }
                    })?;
                    masks.push(m);
                }
                s.masks = Some(masks);
            }
            if *with_seg || s.seg_map_path.is_some() {
                let p = s.seg_map_path.clone().ok_or_else(|| {
                    DataError::Config(format!(
                        "{}: LoadAnnotations(with_seg) on a sample without a label map",
                        s.img_path.display()
                    ))
                })?;
                let mut m = load_label(&p)?;
                if m.dim() != (h, w) {
                    return Err(DataError::File {
                        path: p,
                        reason: format!(
                            "label map is {}x{} but image {} is {}x{}",
                            m.dim().1,
                            m.dim().0,
                            s.img_path.display(),
                            w,
                            h
                        ),
                    });
                }
                if reduce_zero_label.unwrap_or(s.reduce_zero_label) {
                    let pixels = m
                        .as_slice_mut()
                        .expect("freshly decoded maps are in standard layout");
                    densepred_core::structures::label_map::reduce_zero_label(pixels);
                }
                s.gt_seg_map = Some(m);
            }
        }
        T::Resize {
            scale,
            scale_factor,
            keep_ratio,
            clip_object_border,
        } => {
            let (h, w) = s.img_shape;
            let (nw, nh) = match (scale, scale_factor) {
                (Some(sc), _) => target_size((w, h), *sc, *keep_ratio),
                (None, Some(f)) => ((w as f64 * f + 0.5) as usize, (h as f64 * f + 0.5) as usize),
                (None, None) => {
                    return Err(DataError::Config(
                        "Resize needs `scale` or `scale_factor`".into(),
                    ))
                }
            };
            resize(&mut s, nh.max(1), nw.max(1), *clip_object_border)?;
        }
        T::RandomResize {
            scale,
            ratio_range,
            keep_ratio,
        } => {
            let sc = match (scale, ratio_range) {
                (ScaleSpec::One([sw, sh]), Some([lo, hi])) => {
                    let r = rng.random_range(*lo..=*hi);
                    [(sw * r).trunc(), (sh * r).trunc()]
                }
                (ScaleSpec::One(one), None) => *one,
                (ScaleSpec::Range([a, b]), _) => {
                    let e0 = rng.random_range(a[0].min(b[0]) as i64..=a[0].max(b[0]) as i64) as f64;
                    let e1 = rng.random_range(a[1].min(b[1]) as i64..=a[1].max(b[1]) as i64) as f64;
                    [e0, e1]
                }
            };
            let (h, w) = s.img_shape;
            let (nw, nh) = target_size((w, h), sc, *keep_ratio);
            resize(&mut s, nh.max(1), nw.max(1), true)?;
        }
        T::RandomChoiceResize { scales, keep_ratio } => {
            if scales.is_empty() {
                return Err(DataError::Config(
                    "RandomChoiceResize: empty `scales`".into(),
                ));
            }
            let sc = scales[rng.random_range(0..scales.len())];
            let (h, w) = s.img_shape;
            let (nw, nh) = target_size((w, h), sc, *keep_ratio);
            resize(&mut s, nh.max(1), nw.max(1), true)?;
        }
        T::RandomFlip { prob, direction } => {
            if direction != "horizontal" {
                return Err(DataError::Config(format!(
                    "RandomFlip: direction {direction:?} is not supported (only \"horizontal\")"
                )));
            }
            if rng.random::<f64>() < *prob {
                flip_horizontal(&mut s);
            }
        }
        T::RandomCrop {
            crop_size,
            cat_max_ratio,
            ignore_index,
            crop_type,
            allow_negative_crop,
        } => {
            if *allow_negative_crop == Some(false) {
                return Err(DataError::Config(
                    "RandomCrop: allow_negative_crop = false is not supported (set it to true)"
                        .into(),
                ));
            }
            let size = match crop_type.as_deref() {
                None | Some("absolute") => *crop_size,
                Some("absolute_range") => {
                    let (h, w) = s.img_shape;
                    let [lo, hi] = *crop_size;
                    let ch = rng.random_range(lo.min(h)..=hi.min(h).max(lo.min(h)));
                    let cw = rng.random_range(lo.min(w)..=hi.min(w).max(lo.min(w)));
                    [ch, cw]
                }
                Some(o) => {
                    return Err(DataError::Config(format!(
                        "RandomCrop: crop_type {o:?} is not supported (absolute, absolute_range)"
                    )))
                }
            };
            random_crop(&mut s, size, *cat_max_ratio, *ignore_index, rng)
        }
        T::PhotoMetricDistortion {
            brightness_delta,
            contrast_range,
            saturation_range,
            hue_delta,
        } => {
            if let Some(img) = s.img.as_mut() {
                photometric(
                    img,
                    *brightness_delta,
                    *contrast_range,
                    *saturation_range,
                    *hue_delta,
                    rng,
                );
            }
        }
        T::Normalize { mean, std, to_rgb } => {
            if let Some(img) = s.img.as_mut() {
                normalize(img, mean, std, *to_rgb);
            }
        }
        T::Pad {
            size,
            size_divisor,
            pad_val,
            seg_pad_val,
        } => {
            let (h, w) = current_size(&s);
            let (th, tw) = match (size, size_divisor) {
                (Some([ph, pw]), _) => ((*ph).max(h), (*pw).max(w)),
                (None, Some(d)) if *d > 0 => (h.div_ceil(*d) * d, w.div_ceil(*d) * d),
                _ => {
                    return Err(DataError::Config(
                        "Pad needs `size` or a positive `size_divisor`".into(),
                    ))
                }
            };
            pad(
                &mut s,
                th,
                tw,
                pad_val.img,
                seg_pad_val.unwrap_or(pad_val.seg),
            );
        }
        T::AutoAugment { policies } => {
            if policies.is_empty() {
                return Err(DataError::Config("AutoAugment: empty `policies`".into()));
            }
            let p = &policies[rng.random_range(0..policies.len())];
            for t in p {
                s = apply_one(t, s, rng)?;
            }
        }
        T::PackDetInputs { .. } | T::PackSegInputs { .. } => {}
    }
    Ok(s)
}

/// mmcv `rescale_size` / `imresize`: with `keep_ratio`, factor `min(max(scale)/max(h, w),
/// min(scale)/min(h, w))` and `int(side · f + 0.5)`; otherwise exactly `scale = [w, h]`.
pub fn target_size((w, h): (usize, usize), scale: [f64; 2], keep_ratio: bool) -> (usize, usize) {
    if keep_ratio {
        let (long, short) = (scale[0].max(scale[1]), scale[0].min(scale[1]));
        let f = (long / w.max(h) as f64).min(short / w.min(h) as f64);
        ((w as f64 * f + 0.5) as usize, (h as f64 * f + 0.5) as usize)
    } else {
        (scale[0] as usize, scale[1] as usize)
    }
}

/// Decodes an image file to `(H, W, 3)` RGB f32 (grayscale and palette images expanded).
pub fn load_rgb(path: &std::path::Path) -> Result<Array3<f32>, DataError> {
    check_not_truncated(path)?;
    let img = image::ImageReader::open(path)
        .map_err(|e| DataError::File {
            path: path.into(),
            reason: format!("cannot open image: {e}"),
        })?
        .with_guessed_format()
        .map_err(|e| DataError::File {
            path: path.into(),
            reason: e.to_string(),
        })?
        .decode()
        .map_err(|e| DataError::File {
            path: path.into(),
            reason: format!("cannot decode image: {e}"),
        })?
        .to_rgb8();
    let (w, h) = (img.width() as usize, img.height() as usize);
    let data: Vec<f32> = img.into_raw().into_iter().map(f32::from).collect();
    Array3::from_shape_vec((h, w, 3), data).map_err(|e| DataError::File {
        path: path.into(),
        reason: e.to_string(),
    })
}

/// JPEG decoders fill a truncated file's missing rows silently; a JPEG must end with its
/// end-of-image marker `FF D9` (trailing padding bytes allowed).
fn check_not_truncated(path: &std::path::Path) -> Result<(), DataError> {
    let is_jpeg = path
        .extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| e.eq_ignore_ascii_case("jpg") || e.eq_ignore_ascii_case("jpeg"));
    if !is_jpeg {
        return Ok(());
    }
    let bytes = std::fs::read(path).map_err(|e| DataError::File {
        path: path.into(),
        reason: format!("cannot open image: {e}"),
    })?;
    let end = bytes
        .iter()
        .rposition(|&b| b != 0 && !b.is_ascii_whitespace())
        .map(|i| i + 1)
        .unwrap_or(0);
    if end < 2 || bytes[end - 2..end] != [0xFF, 0xD9] {
        return Err(DataError::File {
            path: path.into(),
            reason: "cannot decode image: truncated JPEG (no end-of-image marker)".into(),
        });
    }
    Ok(())
}

/// Reads an 8-bit label map PNG (grayscale or palette index) to `(H, W)`.
pub fn load_label(path: &std::path::Path) -> Result<Array2<u8>, DataError> {
    let file_err = |reason: String| DataError::File {
        path: path.into(),
        reason,
    };
    let (pixels, dims) =
        densepred_core::structures::label_map::read_label_png(path).map_err(file_err)?;
    Array2::from_shape_vec(dims, pixels).map_err(|e| file_err(e.to_string()))
}

/// Bilinear resize of an `(H, W, 3)` f32 image by `fast_image_resize`'s fixed-kernel bilinear
/// interpolation (half-pixel centres, no antialiasing: OpenCV's `INTER_LINEAR`, which mmcv's
/// `imresize` uses).
///
/// Errors: an image that is not 3-channel or has a zero side.
pub fn resize_bilinear(img: &Array3<f32>, nh: usize, nw: usize) -> Result<Array3<f32>, String> {
    use fast_image_resize::{
        images::Image, FilterType, PixelType, ResizeAlg, ResizeOptions, Resizer,
    };
    let (h, w, c) = img.dim();
    if c != 3 || h == 0 || w == 0 || nh == 0 || nw == 0 {
        return Err(format!("cannot resize a {h}x{w}x{c} image to {nh}x{nw}"));
    }
    let mut src: Vec<f32> = img.as_standard_layout().iter().copied().collect();
    let mut dst = vec![0f32; nh * nw * 3];
    let src_img = Image::from_slice_u8(
        w as u32,
        h as u32,
        bytemuck::cast_slice_mut(&mut src),
        PixelType::F32x3,
    )
    .map_err(|e| e.to_string())?;
    let mut dst_img = Image::from_slice_u8(
        nw as u32,
        nh as u32,
        bytemuck::cast_slice_mut(&mut dst),
        PixelType::F32x3,
    )
    .map_err(|e| e.to_string())?;
    let opts = ResizeOptions::new().resize_alg(ResizeAlg::Interpolation(FilterType::Bilinear));
    Resizer::new()
        .resize(&src_img, &mut dst_img, &opts)
        .map_err(|e| e.to_string())?;
    Array3::from_shape_vec((nh, nw, 3), dst).map_err(|e| e.to_string())
}

/// Nearest-neighbour resize of an `(H, W)` map (label maps and masks; mmcv `nearest`).
pub fn resize_nearest(m: &Array2<u8>, nh: usize, nw: usize) -> Array2<u8> {
    let (h, w) = m.dim();
    Array2::from_shape_fn((nh, nw), |(y, x)| {
        let sy = ((y as f64 * h as f64 / nh as f64) as usize).min(h - 1);
        let sx = ((x as f64 * w as f64 / nw as f64) as usize).min(w - 1);
        m[(sy, sx)]
    })
}

fn resize(s: &mut Sample, nh: usize, nw: usize, clip: bool) -> Result<(), DataError> {
    let (h, w) = s.img_shape;
    if let Some(img) = s.img.as_ref() {
        s.img = Some(
            resize_bilinear(img, nh, nw).map_err(|reason| DataError::File {
                path: s.img_path.clone(),
                reason,
            })?,
        );
    }
    let (fx, fy) = (nw as f64 / w as f64, nh as f64 / h as f64);
    for inst in &mut s.instances {
        let b = &mut inst.bbox;
        *b = [
            (b[0] as f64 * fx) as f32,
            (b[1] as f64 * fy) as f32,
            (b[2] as f64 * fx) as f32,
            (b[3] as f64 * fy) as f32,
        ];
        if clip {
            b[0] = b[0].clamp(0.0, nw as f32);
            b[2] = b[2].clamp(0.0, nw as f32);
            b[1] = b[1].clamp(0.0, nh as f32);
            b[3] = b[3].clamp(0.0, nh as f32);
        }
    }
    if let Some(ms) = s.masks.as_mut() {
        for m in ms.iter_mut() {
            *m = resize_nearest(m, nh, nw);
        }
    }
    if let Some(m) = s.gt_seg_map.as_ref() {
        s.gt_seg_map = Some(resize_nearest(m, nh, nw));
    }
    s.scale_factor = (s.scale_factor.0 * fx, s.scale_factor.1 * fy);
    s.img_shape = (nh, nw);
    s.pad_shape = (nh, nw);
    Ok(())
}

fn flip_horizontal(s: &mut Sample) {
    let w = s.img_shape.1 as f32;
    if let Some(img) = s.img.as_mut() {
        img.invert_axis(Axis(1));
        *img = img.as_standard_layout().to_owned();
    }
    for inst in &mut s.instances {
        let b = inst.bbox;
        inst.bbox = [w - b[2], b[1], w - b[0], b[3]];
    }
    if let Some(ms) = s.masks.as_mut() {
        for m in ms.iter_mut() {
            m.invert_axis(Axis(1));
            *m = m.as_standard_layout().to_owned();
        }
    }
    if let Some(m) = s.gt_seg_map.as_mut() {
        m.invert_axis(Axis(1));
        *m = m.as_standard_layout().to_owned();
    }
    s.flip = !s.flip;
}

fn random_crop(
    s: &mut Sample,
    [ch, cw]: [usize; 2],
    cat_max_ratio: f64,
    ignore: u8,
    rng: &mut dyn RngCore,
) {
    let (h, w) = s.img_shape;
    let pick = |rng: &mut dyn RngCore| -> (usize, usize) {
        let (mh, mw) = (h.saturating_sub(ch), w.saturating_sub(cw));
        (rng.random_range(0..=mh), rng.random_range(0..=mw))
    };
    let mut off = pick(rng);
    if cat_max_ratio < 1.0 {
        if let Some(seg) = s.gt_seg_map.as_ref() {
            for _ in 0..10 {
                let crop = seg.slice(s![off.0..(off.0 + ch).min(h), off.1..(off.1 + cw).min(w)]);
                let mut counts = [0usize; 256];
                for &v in crop.iter() {
                    counts[v as usize] += 1;
                }
                counts[ignore as usize] = 0;
                let nonzero = counts.iter().filter(|&&c| c > 0).count();
                let total: usize = counts.iter().sum();
                let max = counts.iter().copied().max().unwrap_or(0);
                if nonzero > 1 && (max as f64) / (total as f64) < cat_max_ratio {
                    break;
                }
                off = pick(rng);
            }
        }
    }
    let (y0, x0) = off;
    let (y1, x1) = ((y0 + ch).min(h), (x0 + cw).min(w));
    if let Some(img) = s.img.as_ref() {
        s.img = Some(img.slice(s![y0..y1, x0..x1, ..]).to_owned());
    }
    if let Some(m) = s.gt_seg_map.as_ref() {
        s.gt_seg_map = Some(m.slice(s![y0..y1, x0..x1]).to_owned());
    }
    let (nh, nw) = (y1 - y0, x1 - x0);
    let mut keep = Vec::with_capacity(s.instances.len());
    for inst in &mut s.instances {
        let b = &mut inst.bbox;
        b[0] = (b[0] - x0 as f32).clamp(0.0, nw as f32);
        b[2] = (b[2] - x0 as f32).clamp(0.0, nw as f32);
        b[1] = (b[1] - y0 as f32).clamp(0.0, nh as f32);
        b[3] = (b[3] - y0 as f32).clamp(0.0, nh as f32);
        keep.push(b[2] > b[0] && b[3] > b[1]);
    }
    let mut k = keep.iter();
    s.instances.retain(|_| *k.next().unwrap_or(&false));
    let mut k = keep.iter();
    s.segmentations.retain(|_| *k.next().unwrap_or(&false));
    if let Some(ms) = s.masks.as_mut() {
        let mut k = keep.iter();
        ms.retain(|_| *k.next().unwrap_or(&false));
        for m in ms.iter_mut() {
            *m = m.slice(s![y0..y1, x0..x1]).to_owned();
        }
    }
    s.img_shape = (nh, nw);
    s.pad_shape = (nh, nw);
}

fn rgb_to_hsv(r: f32, g: f32, b: f32) -> (f32, f32, f32) {
    let max = r.max(g).max(b);
    let min = r.min(g).min(b);
    let d = max - min;
    let s = if max > 0.0 { d / max } else { 0.0 };
    let h = if d == 0.0 {
        0.0
    } else if max == r {
        60.0 * ((g - b) / d)
    } else if max == g {
        60.0 * ((b - r) / d) + 120.0
    } else {
        60.0 * ((r - g) / d) + 240.0
    };
    (if h < 0.0 { h + 360.0 } else { h }, s, max)
}

/// HSV (hue in degrees, saturation and value in the units of the result) → RGB.
pub fn hsv_to_rgb(h: f32, s: f32, v: f32) -> (f32, f32, f32) {
    let c = v * s;
    let hp = (h / 60.0).rem_euclid(6.0);
    let x = c * (1.0 - ((hp % 2.0) - 1.0).abs());
    let (r, g, b) = match hp as u32 {
        0 => (c, x, 0.0),
        1 => (x, c, 0.0),
        2 => (0.0, c, x),
        3 => (0.0, x, c),
        4 => (x, 0.0, c),
        _ => (c, 0.0, x),
    };
    let m = v - c;
    (r + m, g + m, b + m)
}

/// mmdet's `PhotoMetricDistortion` on a float image: each step applied with probability 1/2 —
/// brightness `+U(±delta)`, contrast `×U(range)` (before or after the HSV steps, 50/50),
/// saturation `×U(range)`, hue `+U(±delta)` degrees (wrapped) — then clamped to [0, 255].
fn photometric(
    img: &mut Array3<f32>,
    bdelta: f64,
    contrast: [f64; 2],
    sat: [f64; 2],
    hue: f64,
    rng: &mut dyn RngCore,
) {
    if rng.random::<bool>() {
        let d = rng.random_range(-bdelta..=bdelta) as f32;
        img.mapv_inplace(|v| v + d);
    }
    let contrast_first = rng.random::<bool>();
    let contrast_step = |img: &mut Array3<f32>, rng: &mut dyn RngCore| {
        if rng.random::<bool>() {
            let a = rng.random_range(contrast[0]..=contrast[1]) as f32;
            img.mapv_inplace(|v| v * a);
        }
    };
    if contrast_first {
        contrast_step(img, rng);
    }
    let sat_f = rng
        .random::<bool>()
        .then(|| rng.random_range(sat[0]..=sat[1]) as f32);
    let hue_d = rng
        .random::<bool>()
        .then(|| rng.random_range(-hue..=hue) as f32);
    if sat_f.is_some() || hue_d.is_some() {
        for mut px in img.lanes_mut(Axis(2)) {
            let (mut h, mut s, v) = rgb_to_hsv(px[0], px[1], px[2]);
            if let Some(f) = sat_f {
                s *= f;
            }
            if let Some(d) = hue_d {
                h = (h + d).rem_euclid(360.0);
            }
            let (r, g, b) = hsv_to_rgb(h, s, v);
            px[0] = r;
            px[1] = g;
            px[2] = b;
        }
    }
    if !contrast_first {
        contrast_step(img, rng);
    }
    img.mapv_inplace(|v| v.clamp(0.0, 255.0));
}

fn normalize(img: &mut Array3<f32>, mean: &[f32; 3], std: &[f32; 3], to_rgb: bool) {
    // Our images are RGB; mean/std given in BGR order (to_rgb = false) apply to reversed channels.
    let order: [usize; 3] = if to_rgb { [0, 1, 2] } else { [2, 1, 0] };
    for mut px in img.lanes_mut(Axis(2)) {
        for c in 0..3 {
            px[c] = (px[c] - mean[order[c]]) / std[order[c]];
        }
    }
}

/// `(H, W)` of the arrays as they are now: after an earlier `Pad` they are larger than
/// `img_shape` (mmcv pads the current image, whatever its size).
fn current_size(s: &Sample) -> (usize, usize) {
    match &s.img {
        Some(img) => (img.dim().0, img.dim().1),
        None if s.pad_shape != (0, 0) => s.pad_shape,
        None => s.img_shape,
    }
}

/// Pads the image, label map and masks bottom/right to `(th, tw)` (never below their current
/// size).
fn pad(s: &mut Sample, th: usize, tw: usize, img_val: f32, seg_val: u8) {
    let (ch, cw) = current_size(s);
    let (th, tw) = (th.max(ch), tw.max(cw));
    if let Some(img) = s.img.as_ref() {
        let (h, w, _) = img.dim();
        let mut out = Array3::from_elem((th.max(h), tw.max(w), 3), img_val);
        out.slice_mut(s![..h, ..w, ..]).assign(img);
        s.img = Some(out);
    }
    if let Some(m) = s.gt_seg_map.as_ref() {
        let (h, w) = m.dim();
        let mut out = Array2::from_elem((th.max(h), tw.max(w)), seg_val);
        out.slice_mut(s![..h, ..w]).assign(m);
        s.gt_seg_map = Some(out);
    }
    if let Some(ms) = s.masks.as_mut() {
        for m in ms.iter_mut() {
            let (h, w) = m.dim();
            let mut out = Array2::zeros((th.max(h), tw.max(w)));
            out.slice_mut(s![..h, ..w]).assign(m);
            *m = out;
        }
    }
    s.pad_shape = (th, tw);
}
