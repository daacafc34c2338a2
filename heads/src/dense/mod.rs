//! Dense (single-shot) detection heads: RetinaHead and ATSSHead, with mmdetection 3.x semantics.

pub mod atss_head;
pub mod common;
pub mod retina_head;

pub use atss_head::{AtssHead, AtssHeadConfig};
pub use common::{DenseTestConfig, DenseTrainConfig};
pub use retina_head::{DenseOutputs, LevelLosses, RetinaHead, RetinaHeadConfig};
