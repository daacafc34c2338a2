//! Tensor kernels that candle lacks or runs too slowly, as candle custom ops (see DESIGN.md,
//! "Kernels").

pub mod activation;
pub mod attention;
pub mod batch_norm;
pub mod bias;
#[cfg(feature = "cuda")]
mod cuda;
pub mod dispatch;
pub mod dwconv;
pub mod dwconv_nhwc;
pub mod ffn;
pub mod im2col;
pub mod iou;
pub mod layer_norm;
pub mod mhmc;
pub mod nms;
pub mod paste_mask;
mod reduce;
pub mod resample;
pub mod resize;
pub mod roi_align;
pub mod softmax;
pub mod transpose;

pub use dwconv::{depthwise_conv2d, depthwise_conv2d_reference, DwConvParams};
pub use im2col::{conv2d_gemm, conv2d_gemm_cat, conv2d_gemm_cat_resized, UnfoldParams};
pub use layer_norm::{layer_norm, layer_norm_channels};
pub use softmax::softmax_last_dim;
/// The elements of a CPU buffer that a contiguous `layout` covers: what every CPU kernel of our
/// custom ops reads its operands through.
///
/// Errors: a non-contiguous layout, with `what` (op and operand) in the message.
pub(crate) fn contiguous<'a, T>(
    data: &'a [T],
    layout: &candle_core::Layout,
    what: &str,
) -> candle_core::Result<&'a [T]> {
    match layout.contiguous_offsets() {
        Some((a, b)) => Ok(&data[a..b]),
        None => candle_core::bail!("{what} must be contiguous"),
    }
}

/// Elements per task of [`zeroed`]; buffers below twice this are zeroed on the calling thread.
const ZERO_CHUNK: usize = 1 << 15;

/// Raw pointer for disjoint writes from rayon tasks (each task owns its own index range).
#[derive(Clone, Copy)]
pub(crate) struct SyncPtr<T>(pub(crate) *mut T);
// SAFETY: only used for writes to disjoint ranges, each by one task.
unsafe impl<T> Send for SyncPtr<T> {}
unsafe impl<T> Sync for SyncPtr<T> {}

impl<T> SyncPtr<T> {
    /// The pointer (a method, so that closures capture the whole `Sync` wrapper).
    pub(crate) fn get(self) -> *mut T {
        self.0
    }
}

/// A zero-filled buffer of `n` elements for a kernel's output, zeroed by all rayon workers when
/// it is large: `vec![0; n]` zeroes on the calling thread, and with mimalloc reusing freed
/// blocks that memset ran alone for every op output of a training step (about 3% of an SMT-T
/// step in `perf`, with the other worker idle).
pub(crate) fn zeroed<T: Copy + Send + Sync + num_traits::Zero>(n: usize) -> Vec<T> {
    use rayon::prelude::*;
    if n < 2 * ZERO_CHUNK {
        return vec![T::zero(); n];
    }
    let mut v = Vec::with_capacity(n);
    v.spare_capacity_mut()[..n]
        .par_chunks_mut(ZERO_CHUNK)
        .for_each(|c| {
            for e in c {
                e.write(T::zero());
            }
        });
    // SAFETY: the loop above initialised all `n` elements, and the capacity is at least `n`.
    unsafe { v.set_len(n) };
    v
}

pub use activation::gelu_erf;
pub use attention::{scaled_dot_product_attention, token_attention};
pub use batch_norm::{batch_norm_relu_train, batch_norm_train};
pub use bias::{add_bias_channels, add_bias_last, mul_scale_channels, mul_scale_last};
pub use dwconv_nhwc::{token_dwconv, LocalMode};
pub use ffn::{detail_ffn, pre_norm_ffn_residual};
pub use mhmc::multi_head_mixed_conv;
pub use nms::{batched_nms, filter_nms, nms};
pub use paste_mask::paste_masks;
pub use resample::{adaptive_avg_pool2d, add_resized, flip_last_dim, resize_bilinear};
pub use resize::resize_nearest;
pub use roi_align::{map_roi_levels, roi_align, RoiAlignParams};
pub use transpose::transpose_last2;

#[cfg(test)]
mod tests {
    /// Both paths of `zeroed` (serial below `2 * ZERO_CHUNK`, parallel chunks with a partial
    /// last one above) give exactly `n` zeros.
    #[test]
    fn zeroed_gives_n_zeros_on_both_paths() {
        for n in [0, 1, 2 * super::ZERO_CHUNK - 1, 5 * super::ZERO_CHUNK + 7] {
            let v = super::zeroed::<f32>(n);
            assert_eq!(v.len(), n);
            assert!(v.iter().all(|&x| x == 0.0));
        }
    }
}
