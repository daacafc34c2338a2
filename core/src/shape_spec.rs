//! `ShapeSpec`: what a feature map looks like, so that necks and heads take their input channels and
//! strides from the backbone instead of repeating them in configs (detectron2's `ShapeSpec`).

use serde::{Deserialize, Serialize};

/// Channels and stride of one feature map.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShapeSpec {
    /// Number of channels `C` of the `(B, C, H, W)` map.
    pub channels: usize,
    /// Ratio of input pixels to map pixels (4 for `H/4`).
    pub stride: usize,
}
