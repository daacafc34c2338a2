//! RoI heads of two-stage detectors (mmdetection's `roi_heads`): the RoI feature extractor, the
//! box head, the mask head and the `StandardRoIHead` that composes them.

pub mod bbox_head;
pub mod mask_head;
pub mod roi_extractor;
pub mod standard_roi_head;

pub use bbox_head::{BBoxHead, BBoxHeadConfig};
pub use mask_head::{MaskHead, MaskHeadConfig};
pub use roi_extractor::{bbox2roi, SingleRoIExtractor, SingleRoIExtractorConfig};
pub use standard_roi_head::{
    RcnnTestConfig, RcnnTrainConfig, RoIHeadConfig, RoiLosses, StandardRoIHead,
};
