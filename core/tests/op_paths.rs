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

use candle_core::{DType, Result, Tensor, Var};
use densepred_core::ops::{self, dispatch, DwConvParams, LocalMode};
use densepred_testutil::{max_abs, randn};

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
    // Built on `nms`.
    "batched_nms",
    "filter_nms",
    // `index_select` with reversed indices.
    "flip_last_dim",
    // `batch_norm_train_synced` without a group, without / with the ReLU.
    "batch_norm_train",
    "batch_norm_relu_train",
];

/// `(name, signature)` of every `pub fn` in `src`, the signature running to its body's `{`.
fn public_fns(src: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut rest = src;
    while let Some(i) = rest.find("\npub fn ") {
        let after = &rest[i + "\npub fn ".len()..];
        let name: String = after
            .chars()
            .take_while(|c| c.is_alphanumeric() || *c == '_')
            .collect();
        let sig_end = after.find('{').unwrap_or(after.len());
        out.push((name, after[..sig_end].to_string()));
        rest = after;
    }
    out
}

#[test]
fn every_tensor_op_is_listed() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/src/ops");
    let mut found = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        let src = std::fs::read_to_string(&path).unwrap();
        for (name, sig) in public_fns(&src) {
            let ret = sig.split("->").nth(1).unwrap_or("");
            if ret.contains("Tensor") {
                found.push((
                    name,
                    path.file_name().unwrap().to_string_lossy().to_string(),
                ));
            }
        }
    }
    assert!(found.len() >= 30, "the scan found only {found:?}");
    let listed: Vec<&str> = dispatch::OPS.iter().map(|o| o.name).collect();
    let unlisted: Vec<_> = found
        .iter()
        .filter(|(n, _)| !listed.contains(&n.as_str()) && !COMPOSITIONS.contains(&n.as_str()))
        .collect();
    assert!(
        unlisted.is_empty(),
        "tensor ops without an entry in ops::dispatch::OPS (so without a known CUDA path): \
         {unlisted:?}"
    );
    let names: Vec<&str> = found.iter().map(|(n, _)| n.as_str()).collect();
    let stale: Vec<_> = listed
        .iter()
        .chain(COMPOSITIONS)
        .filter(|n| !names.contains(n))
        .collect();
    assert!(
        stale.is_empty(),
        "listed but not found in core/src/ops: {stale:?}"
    );
    for op in dispatch::OPS {
        println!("{:32} cuda: {}", op.name, op.cuda_path());
    }
}

/// One op call on `inputs` (the first decides the dispatch), returning its outputs.
type Run = Box<dyn Fn(&[Tensor]) -> Result<Vec<Tensor>>>;

struct Case {
    op: &'static str,
    inputs: Vec<Tensor>,
    run: Run,
}

fn case(op: &'static str, shapes: &[&[usize]], run: Run) -> Case {
    let inputs = shapes
        .iter()
        .enumerate()
        .map(|(i, s)| randn(s, 100 + i as u64, DType::F64))
        .collect();
    Case { op, inputs, run }
}

/// A positive `(C,)` vector around 1 (norm weights, scales).
fn around_one(t: &Tensor) -> Tensor {
    ((t * 0.25).unwrap() + 1.0).unwrap()
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
                t(ops::detail_ffn(
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
                t(ops::pre_norm_ffn_residual(
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
            "multi_head_mixed_conv",
            &[&[2, 4, 6, 5], &[2, 1, 3, 3], &[2], &[2, 1, 5, 5], &[2]],
            Box::new(move |x| {
                t(ops::multi_head_mixed_conv(
                    &x[0],
                    &[x[1].clone(), x[3].clone()],
                    &[x[2].clone(), x[4].clone()],
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

/// The outputs of `c` and the gradients of `Σ_k Σ y_k·r_k` with respect to each input.
fn run(c: &Case) -> (Vec<Tensor>, Vec<Tensor>) {
    let vars: Vec<Var> = c
        .inputs
        .iter()
        .map(|x| Var::from_tensor(x).unwrap())
        .collect();
    let xs: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
    let ys = (c.run)(&xs).unwrap_or_else(|e| panic!("{}: {e}", c.op));
    let mut loss = Tensor::zeros((), ys[0].dtype(), ys[0].device()).unwrap();
    for (k, y) in ys.iter().enumerate() {
        let r = randn(y.dims(), 900 + k as u64, y.dtype());
        loss = (loss + (y * r).unwrap().sum_all().unwrap()).unwrap();
    }
    let grads = loss.backward().unwrap();
    let gs = xs
        .iter()
        .map(|x| match grads.get(x) {
            Some(g) => g.clone(),
            None => x.zeros_like().unwrap(),
        })
        .collect();
    (ys, gs)
}

#[test]
fn candle_fallbacks_match_our_kernels() {
    let cases = cases();
    let tested: Vec<&str> = cases.iter().map(|c| c.op).collect();
    let untested: Vec<&str> = dispatch::OPS
        .iter()
        .filter(|o| o.fallback == dispatch::Fallback::Candle && !tested.contains(&o.name))
        .map(|o| o.name)
        .collect();
    assert!(
        untested.is_empty(),
        "ops with a candle fallback but no case here: {untested:?}"
    );
    let mut failures = Vec::new();
    for c in &cases {
        let op = dispatch::OPS.iter().find(|o| o.name == c.op).unwrap();
        assert_eq!(
            dispatch::select(op, &c.inputs[0]),
            dispatch::Impl::Cpu,
            "{}",
            c.op
        );
        dispatch::with_fallback(|| {
            assert_eq!(dispatch::select(op, &c.inputs[0]), dispatch::Impl::Candle);
        });
        let (y_ours, g_ours) = run(c);
        let (y_fb, g_fb) = dispatch::with_fallback(|| run(c));
        let tol = if c.inputs[0].dtype() == DType::F32 {
            2e-6
        } else {
            1e-9
        };
        assert_eq!(y_ours.len(), y_fb.len(), "{}", c.op);
        assert_eq!(g_ours.len(), g_fb.len(), "{}", c.op);
        let mut worst = 0f64;
        for (a, b) in y_ours.iter().zip(&y_fb).chain(g_ours.iter().zip(&g_fb)) {
            worst = worst.max(max_abs(a, b));
        }
        println!("{:32} max |ours - fallback| = {worst:.2e}", c.op);
        if worst.is_nan() || worst > tol {
            failures.push(format!("{}: {worst:e} > {tol:e}", c.op));
        }
        // The gradients are not all zero (the case exercises the backward).
        let gmax = g_ours
            .iter()
            .map(|g| {
                g.abs()
                    .unwrap()
                    .max_all()
                    .unwrap()
                    .to_dtype(DType::F64)
                    .unwrap()
            })
            .map(|g| g.to_scalar::<f64>().unwrap())
            .fold(0f64, f64::max);
        assert!(gmax > 0.0, "{}: all gradients are zero", c.op);
    }
    assert!(failures.is_empty(), "fallbacks differ: {failures:?}");
}
