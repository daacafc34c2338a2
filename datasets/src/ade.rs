//! `ADE20KDataset` (mmsegmentation semantics): `img_path/*.jpg` paired with `seg_map_path/*.png`
//! by file stem; 150 classes with `reduce_zero_label = true` for ADE20K proper (0 = "other" is
//! ignored, value v is class v − 1); the class list from a `classes.json` beside the data when
//! present (the 133-class `mini_ade` layout), else the 150 ADE20K names.

use crate::{DataError, Dataset, MetaInfo, Sample};
use std::path::{Path, PathBuf};

/// A semantic segmentation dataset in the ADE20K folder layout.
#[derive(Debug, Clone)]
pub struct Ade20kDataset {
    pairs: Vec<(PathBuf, PathBuf)>,
    meta: MetaInfo,
    reduce_zero_label: bool,
}

impl Ade20kDataset {
    /// Pairs every image in `img_dir` with `seg_dir/<stem>.png`. `classes`: explicit class names;
    /// otherwise `data_root/classes.json` (a JSON list of names) when it exists.
    ///
    /// Errors: unreadable folders, an image without a label map (named), a malformed classes file.
    pub fn load(
        data_root: &Path,
        img_dir: &Path,
        seg_dir: &Path,
        classes: Option<Vec<String>>,
        reduce_zero_label: bool,
    ) -> Result<Self, DataError> {
        let rd = std::fs::read_dir(img_dir).map_err(|e| DataError::File {
            path: img_dir.into(),
            reason: e.to_string(),
        })?;
        let mut imgs: Vec<PathBuf> = rd
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                p.extension().and_then(|x| x.to_str()).is_some_and(|x| {
                    ["jpg", "jpeg", "png"].contains(&x.to_ascii_lowercase().as_str())
                })
            })
            .collect();
        imgs.sort();
        let mut pairs = Vec::with_capacity(imgs.len());
        for i in imgs {
            let stem = i.file_stem().unwrap_or_default();
            let seg = seg_dir.join(stem).with_extension("png");
            if !seg.exists() {
                return Err(DataError::File {
                    path: seg,
                    reason: format!("no label map for image {}", i.display()),
                });
            }
            pairs.push((i, seg));
        }
        let classes = match classes {
            Some(c) => c,
            None => {
                let f = data_root.join("classes.json");
                if f.exists() {
                    let t = std::fs::read_to_string(&f).map_err(|e| DataError::File {
                        path: f.clone(),
                        reason: e.to_string(),
                    })?;
                    serde_json::from_str::<Vec<String>>(&t).map_err(|e| DataError::File {
                        path: f,
                        reason: format!("expected a JSON list of class names: {e}"),
                    })?
                } else {
                    ADE20K_CLASSES.iter().map(|s| s.to_string()).collect()
                }
            }
        };
        Ok(Self {
            pairs,
            meta: MetaInfo {
                classes,
                cat_ids: vec![],
            },
            reduce_zero_label,
        })
    }
}

impl Dataset for Ade20kDataset {
    fn len(&self) -> usize {
        self.pairs.len()
    }

    fn sample(&self, i: usize) -> Sample {
        let (img, seg) = &self.pairs[i];
        let mut s = Sample::new(img.clone(), i as u64);
        s.seg_map_path = Some(seg.clone());
        s.reduce_zero_label = self.reduce_zero_label;
        s
    }

    fn metainfo(&self) -> &MetaInfo {
        &self.meta
    }
}

/// The 150 ADE20K (SceneParsing) class names in label order, as `assets/ade20k_samples/classes.json`
/// (the benchmark's `objectInfo150` names, first synonym).
pub const ADE20K_CLASSES: [&str; 150] = [
    "wall",
    "building",
    "sky",
    "floor",
    "tree",
    "ceiling",
    "road",
    "bed",
    "windowpane",
    "grass",
    "cabinet",
    "sidewalk",
    "person",
    "earth",
    "door",
    "table",
    "mountain",
    "plant",
    "curtain",
    "chair",
    "car",
    "water",
    "painting",
    "sofa",
    "shelf",
    "house",
    "sea",
    "mirror",
    "rug",
    "field",
    "armchair",
    "seat",
    "fence",
    "desk",
    "rock",
    "wardrobe",
    "lamp",
    "bathtub",
    "railing",
    "cushion",
    "base",
    "box",
    "column",
    "signboard",
    "chest",
    "counter",
    "sand",
    "sink",
    "skyscraper",
    "fireplace",
    "refrigerator",
    "grandstand",
    "path",
    "stairs",
    "runway",
    "case",
    "pool",
    "pillow",
    "screen",
    "stairway",
    "river",
    "bridge",
    "bookcase",
    "blind",
    "coffee",
    "toilet",
    "flower",
    "book",
    "hill",
    "bench",
    "countertop",
    "stove",
    "palm",
    "kitchen",
    "computer",
    "swivel",
    "boat",
    "bar",
    "arcade",
    "hovel",
    "bus",
    "towel",
    "light",
    "truck",
    "tower",
    "chandelier",
    "awning",
    "streetlight",
    "booth",
    "television",
    "airplane",
    "dirt",
    "apparel",
    "pole",
    "land",
    "bannister",
    "escalator",
    "ottoman",
    "bottle",
    "buffet",
    "poster",
    "stage",
    "van",
    "ship",
    "fountain",
    "conveyer",
    "canopy",
    "washer",
    "plaything",
    "swimming",
    "stool",
    "barrel",
    "basket",
    "waterfall",
    "tent",
    "bag",
    "minibike",
    "cradle",
    "oven",
    "ball",
    "food",
    "step",
    "tank",
    "trade",
    "microwave",
    "pot",
    "animal",
    "bicycle",
    "lake",
    "dishwasher",
    "screen",
    "blanket",
    "sculpture",
    "hood",
    "sconce",
    "vase",
    "traffic",
    "tray",
    "ashcan",
    "fan",
    "pier",
    "crt",
    "plate",
    "monitor",
    "bulletin",
    "shower",
    "radiator",
    "glass",
    "clock",
    "flag",
];
