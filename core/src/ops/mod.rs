//! Tensor kernels that candle lacks or runs too slowly, as candle custom ops (see DESIGN.md,
//! "Kernels").

pub mod activation;
pub mod bias;
pub mod dwconv;
pub mod dwconv_nhwc;
pub mod iou;
pub mod layer_norm;
pub mod nms;
pub mod paste_mask;
mod reduce;
pub mod resize;
pub mod roi_align;
pub mod softmax;
pub mod transpose;

pub use dwconv::{depthwise_conv2d, depthwise_conv2d_reference, DwConvParams};
pub use layer_norm::{layer_norm, layer_norm_channels};
pub use softmax::softmax_last_dim;
pub use activation::gelu_erf;
pub use transpose::transpose_last2;
pub use bias::{add_bias_channels, add_bias_last, mul_scale_channels, mul_scale_last};
pub use nms::{batched_nms, filter_nms, nms};
pub use roi_align::{map_roi_levels, roi_align, RoiAlignParams};
pub use paste_mask::paste_masks;
pub use dwconv_nhwc::{token_dwconv, LocalMode};
pub use resize::resize_nearest;
