//! The backbones' fused ops (SMT's in `backbones/src/smt/`, Conv2Former's in
//! `backbones/src/conv2former/`) have a path on every device, and the candle compositions that
//! devices without our kernels run compute what our CPU kernels compute: the same checks and
//! tolerances as core's `core/tests/op_paths.rs` (see `densepred_testutil::op_paths`), on each
//! model's `FUSED_OPS`.

use candle_core::{Result, Tensor};
use densepred_backbones::{conv2former, smt};
use densepred_testutil::op_paths::{around_one, assert_fallbacks_match, assert_listed, case};

#[test]
fn every_fused_op_is_listed() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/src/smt");
    assert_listed(dir, smt::FUSED_OPS, &[], 3);
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/src/conv2former");
    assert_listed(dir, conv2former::FUSED_OPS, &[], 1);
}

#[test]
fn conv2former_fallbacks_match_our_kernels() {
    let t = |r: Result<Tensor>| r.map(|y| vec![y]);
    let cases = vec![case(
        "pos_gelu_residual",
        &[&[2, 3, 6, 11], &[3, 1, 3, 3], &[3]],
        Box::new(move |x| t(conv2former::pos_gelu_residual(&x[0], &x[1], &x[2]))),
    )];
    assert_fallbacks_match(conv2former::FUSED_OPS, &cases);
}

#[test]
fn smt_fallbacks_match_our_kernels() {
    let t = |r: Result<Tensor>| r.map(|y| vec![y]);
    let cases = vec![
        case(
            "detail_ffn",
            &[
                &[2, 12, 4],
                &[8, 4],
                &[8],
                &[8, 1, 3, 3],
                &[8],
                &[5, 8],
                &[5],
            ],
            Box::new(move |x| {
                t(smt::detail_ffn(
                    &x[0],
                    &x[1],
                    &x[2],
                    &x[3],
                    &x[4],
                    &x[5],
                    &x[6],
                    (3, 4),
                ))
            }),
        ),
        case(
            "pre_norm_ffn_residual",
            &[
                &[2, 12, 4],
                &[4],
                &[4],
                &[8, 4],
                &[8],
                &[8, 1, 3, 3],
                &[8],
                &[4, 8],
                &[4],
            ],
            Box::new(move |x| {
                t(smt::pre_norm_ffn_residual(
                    &x[0],
                    &around_one(&x[1]),
                    &x[2],
                    1e-6,
                    &x[3],
                    &x[4],
                    &x[5],
                    &x[6],
                    &x[7],
                    &x[8],
                    (3, 4),
                ))
            }),
        ),
        case(
            "multi_head_mixed_conv",
            &[&[2, 4, 6, 5], &[2, 1, 3, 3], &[2], &[2, 1, 5, 5], &[2]],
            Box::new(move |x| {
                t(smt::multi_head_mixed_conv(
                    &x[0],
                    &[x[1].clone(), x[3].clone()],
                    &[x[2].clone(), x[4].clone()],
                ))
            }),
        ),
    ];
    assert_fallbacks_match(smt::FUSED_OPS, &cases);
}
