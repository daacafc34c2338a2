//! Every tensor op has a path on every device, and the candle compositions that GPUs without a
//! kernel of ours run compute what our CPU kernels compute.
//!
//! - `every_tensor_op_is_listed`: each public function of `core/src/ops` that returns tensors is
//!   either an entry of `ops::dispatch::OPS` (which names its CUDA path: our kernel, a candle
//!   composition or a host copy) or one of the compositions listed below, which are made of
//!   listed ops or of candle ops alone. A new op without an entry fails here.
//! - `candle_fallbacks_match_our_kernels`: each op whose fallback is a candle composition runs
//!   twice on the CPU, with our kernel and under `dispatch::with_fallback` (the path of a device
//!   without our kernel), in f64 (GELU: f32, the only dtype of its kernel); values and the
//!   gradients of `Σ y·r` (fixed random `r`) with respect to every input must agree. Tolerance:
//!   1e-9 absolute in f64 on values of order 1 (the two paths differ in summation order only, so
//!   they agree to about 1e-14; an indexing or formula error is O(1)); GELU 2e-6 in f32 (our
//!   erf's error is ≤ 1.5e-7 and the gradient formula is evaluated separately).

use candle_core::{DType, Result, Tensor};
use densepred_core::ops::{self, dispatch, DwConvParams, LocalMode};
use densepred_testutil::op_paths::{around_one, assert_fallbacks_match, assert_listed, case, Case};
use densepred_testutil::randn;

/// Public functions of `core/src/ops` that return tensors but are not ops with an entry: each is
/// built from listed ops or from candle ops only, so it runs wherever they run.
const COMPOSITIONS: &[&str] = &[
    // Box geometry from candle's elementwise ops.
    "columns",
    "box_area",
    "box_iou",
    "generalized_box_iou",
    "distance_box_iou",
    "complete_box_iou",
    "bbox_overlaps",
    // candle's grouped conv2d: the reference of `depthwise_conv2d` and its fallback.
    "depthwise_conv2d_reference",
    // `layer_norm` between two permutes.
    "layer_norm_channels_permuted",
    // Built on `batched_nms` (`nms`: one class for all boxes).
    "nms",
    "filter_nms",
    // `index_select` with reversed indices.
    "flip_last_dim",
    // `batch_norm_train_synced` without a group, without / with the ReLU.
    "batch_norm_train",
    "batch_norm_relu_train",
];

#[test]
fn every_tensor_op_is_listed() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/src/ops");
    assert_listed(dir, dispatch::OPS, COMPOSITIONS, 30);
}

fn cases() -> Vec<Case> {
    let t = |r: Result<Tensor>| r.map(|y| vec![y]);
    let mut v = vec![
        Case {
            op: "gelu_erf",
            inputs: vec![(randn(&[3, 50], 1, DType::F32) * 4.0).unwrap()],
            run: Box::new(move |x| t(ops::gelu_erf(&x[0]))),
        },
        case(
            "scaled_dot_product_attention",
            &[&[2, 2, 5, 4], &[2, 2, 7, 4], &[2, 2, 7, 3]],
            Box::new(move |x| t(ops::scaled_dot_product_attention(&x[0], &x[1], &x[2], 0.5))),
        ),
        case(
            "token_attention",
            &[&[2, 5, 6], &[2, 4, 12]],
            Box::new(move |x| t(ops::token_attention(&x[0], &x[1], 2, 0.4))),
        ),
        case(
            "add_bias_last",
            &[&[2, 3, 5], &[5]],
            Box::new(move |x| t(ops::add_bias_last(&x[0], &x[1]))),
        ),
        case(
            "mul_scale_last",
            &[&[2, 3, 5], &[5]],
            Box::new(move |x| t(ops::mul_scale_last(&x[0], &x[1]))),
        ),
        case(
            "add_bias_channels",
            &[&[2, 3, 4, 5], &[3]],
            Box::new(move |x| t(ops::add_bias_channels(&x[0], &x[1]))),
        ),
        case(
            "mul_scale_channels",
            &[&[2, 3, 4, 5], &[3]],
            Box::new(move |x| t(ops::mul_scale_channels(&x[0], &x[1]))),
        ),
        case(
            "linear_bias",
            &[&[2, 3, 6], &[4, 6], &[4]],
            Box::new(move |x| t(ops::bias::linear_bias(&x[0], &x[1], &x[2]))),
        ),
        case(
            "pointwise_conv_bias",
            &[&[2, 6, 10], &[2, 4, 3], &[8]],
            Box::new(move |x| {
                let with = ops::bias::pointwise_conv_bias(&x[0], &x[1], Some(&x[2]))?;
                let without = ops::bias::pointwise_conv_bias(&x[0], &x[1], None)?;
                Ok(vec![with, without])
            }),
        ),
        case(
            "depthwise_conv2d",
            &[&[2, 3, 9, 7], &[3, 1, 3, 3], &[3]],
            Box::new(move |x| {
                let same = ops::depthwise_conv2d(&x[0], &x[1], Some(&x[2]), DwConvParams::same(1))?;
                // Stride 2 on odd sizes leaves no row unread; on the even width 8 it would.
                let strided = DwConvParams {
                    stride: (2, 2),
                    padding: (1, 1),
                    dilation: (1, 1),
                };
                let s = ops::depthwise_conv2d(&x[0].narrow(3, 0, 6)?, &x[1], None, strided)?;
                Ok(vec![same, s])
            }),
        ),
        case(
            "token_dwconv",
            &[&[2, 20, 3], &[3, 1, 3, 3], &[3]],
            Box::new(move |x| {
                let plain = ops::token_dwconv(&x[0], &x[1], &x[2], (4, 5), LocalMode::Plain)?;
                let gelu = ops::token_dwconv(&x[0], &x[1], &x[2], (4, 5), LocalMode::ResidualGelu)?;
                Ok(vec![plain, gelu])
            }),
        ),
        case(
            "conv2d_gemm",
            &[&[2, 3, 9, 8], &[4, 3, 3, 3]],
            Box::new(move |x| {
                // Stride 2 on the even width leaves a column unread (candle's backward needs
                // the crop of `candle_conv2d` there).
                let strided = ops::conv2d_gemm(&x[0], &x[1], 2, 1, 1)?;
                let dilated = ops::conv2d_gemm(&x[0], &x[1], 1, 2, 2)?;
                Ok(vec![strided, dilated])
            }),
        ),
        case(
            "conv2d_gemm_bias_act",
            &[&[2, 3, 9, 8], &[4, 3, 3, 3], &[4]],
            Box::new(move |x| {
                let biased = ops::conv2d_gemm_bias_act(&x[0], &x[1], &x[2], (2, 1, 1), false)?;
                let relu = ops::conv2d_gemm_bias_act(&x[0], &x[1], &x[2], (1, 1, 1), true)?;
                Ok(vec![biased, relu])
            }),
        ),
        case(
            "conv_transpose2x2",
            &[&[3, 4, 3, 5], &[4, 6, 2, 2], &[6]],
            Box::new(move |x| {
                let linear = ops::conv_transpose2x2(&x[0], &x[1], &x[2], false)?;
                let relu = ops::conv_transpose2x2(&x[0], &x[1], &x[2], true)?;
                Ok(vec![linear, relu])
            }),
        ),
        case(
            "conv2d_gemm_cat",
            &[&[2, 2, 6, 5], &[2, 3, 6, 5], &[4, 5, 3, 3]],
            Box::new(move |x| t(ops::conv2d_gemm_cat(&x[..2], &x[2], 1, 1, 1))),
        ),
        case(
            "conv2d_gemm_cat_resized",
            &[&[2, 2, 6, 5], &[2, 3, 3, 3], &[4, 5, 3, 3]],
            Box::new(move |x| {
                t(ops::conv2d_gemm_cat_resized(
                    &x[..2],
                    (6, 5),
                    false,
                    &x[2],
                    1,
                    1,
                    1,
                ))
            }),
        ),
        case(
            "layer_norm",
            &[&[2, 3, 6], &[6], &[6]],
            Box::new(move |x| t(ops::layer_norm(&x[0], &around_one(&x[1]), &x[2], 1e-6))),
        ),
        case(
            "layer_norm_channels",
            &[&[2, 6, 3, 4], &[6], &[6]],
            Box::new(move |x| {
                t(ops::layer_norm_channels(
                    &x[0],
                    &around_one(&x[1]),
                    &x[2],
                    1e-6,
                ))
            }),
        ),
        case(
            "resize_bilinear",
            &[&[2, 3, 5, 7]],
            Box::new(move |x| {
                Ok(vec![
                    ops::resize_bilinear(&x[0], 9, 13, false)?,
                    ops::resize_bilinear(&x[0], 9, 13, true)?,
                    ops::resize_bilinear(&x[0], 3, 4, false)?,
                ])
            }),
        ),
        case(
            "add_resized",
            &[&[2, 3, 9, 13], &[2, 3, 5, 7]],
            Box::new(move |x| t(ops::add_resized(&x[0], &x[1], false))),
        ),
        case(
            "adaptive_avg_pool2d",
            &[&[2, 3, 7, 10]],
            Box::new(move |x| {
                Ok(vec![
                    ops::adaptive_avg_pool2d(&x[0], 1, 1)?,
                    ops::adaptive_avg_pool2d(&x[0], 3, 6)?,
                    ops::adaptive_avg_pool2d(&x[0], 9, 12)?,
                ])
            }),
        ),
        case(
            "resize_nearest",
            &[&[2, 3, 7, 9]],
            Box::new(move |x| {
                Ok(vec![
                    ops::resize_nearest(&x[0], 13, 17)?,
                    ops::resize_nearest(&x[0], 4, 5)?,
                ])
            }),
        ),
        case(
            "softmax_last_dim",
            &[&[2, 3, 7]],
            Box::new(move |x| t(ops::softmax_last_dim(&(&x[0] * 3.0)?))),
        ),
        case(
            "transpose_last2",
            &[&[2, 3, 7]],
            Box::new(move |x| t(ops::transpose_last2(&x[0]))),
        ),
    ];
    v.push(case(
        "batch_norm_train_synced",
        &[&[3, 4, 5, 2], &[4], &[4]],
        Box::new(move |x| {
            let mut out = Vec::new();
            for relu in [false, true] {
                let (y, mean, var, _) = ops::batch_norm::batch_norm_train_synced(
                    &x[0],
                    &around_one(&x[1]),
                    &x[2],
                    1e-5,
                    relu,
                    None,
                )?;
                let dev = x[0].device();
                out.extend([y, Tensor::new(mean, dev)?, Tensor::new(var, dev)?]);
            }
            Ok(out)
        }),
    ));
    v
}

#[test]
fn candle_fallbacks_match_our_kernels() {
    assert_fallbacks_match(dispatch::OPS, &cases());
}
