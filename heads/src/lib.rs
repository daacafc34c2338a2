//! densepred-heads: detection / segmentation heads and mmdetection's task modules.

pub mod dense;
pub mod seg;
pub mod task;
