//! Data structures shared by heads, evaluators and the pipeline.

pub mod boxes;
pub mod det;
pub mod label_map;

pub use boxes::Boxes;
pub use det::{BitmapMasks, Detections, GtInstances, ImageMeta};
