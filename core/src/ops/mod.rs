//! Tensor kernels that candle lacks or runs too slowly, as candle custom ops (see DESIGN.md,
//! "Kernels").

pub mod activation;
pub mod attention;
pub mod batch_norm;
pub mod bias;
#[cfg(feature = "cuda")]
mod cuda;
pub mod deconv;
pub mod dispatch;
pub mod dwconv;
pub mod dwconv_nhwc;
pub mod im2col;
pub mod iou;
pub mod layer_norm;
pub mod nms;
pub mod paste_mask;
pub mod resample;
pub mod resize;
pub mod roi_align;
pub mod softmax;
pub mod transpose;

pub use activation::gelu_erf;
pub use attention::{scaled_dot_product_attention, token_attention};
pub use batch_norm::{batch_norm_relu_train, batch_norm_train};
pub use bias::{add_bias_channels, add_bias_last, mul_scale_channels, mul_scale_last};
pub use deconv::conv_transpose2x2;
pub use dwconv::{depthwise_conv2d, depthwise_conv2d_reference, DwConvParams};
pub use dwconv_nhwc::{token_dwconv, LocalMode};
pub use im2col::{
    conv2d_gemm, conv2d_gemm_bias_act, conv2d_gemm_cat, conv2d_gemm_cat_resized, UnfoldParams,
};
pub use layer_norm::{layer_norm, layer_norm_channels};
pub use nms::{batched_nms, filter_nms, nms};
pub use paste_mask::paste_masks;
pub use resample::{adaptive_avg_pool2d, add_resized, flip_last_dim, resize_bilinear};
pub use resize::resize_nearest;
pub use roi_align::{map_roi_levels, roi_align, RoiAlignParams};
pub use softmax::softmax_last_dim;
pub use transpose::transpose_last2;
