//! densepred-heads: detection / segmentation heads and mmdetection's task modules.

pub mod dense;
pub mod roi;
pub mod seg;
pub mod task;
