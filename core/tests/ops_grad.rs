//! Depthwise convolution and LayerNorm: forward against candle's own (slow) ops, backward against
//! central finite differences in f64.

use candle_core::{DType, Device, Tensor, Var, D};
use densepred_core::ops::{
    depthwise_conv2d, depthwise_conv2d_reference, layer_norm, softmax_last_dim, DwConvParams,
};
use densepred_testutil::{max_abs, randn};

/// Central-difference gradient of `f` (a scalar function) with respect to every element of `x`
/// (f64, step 1e-6): the analytic gradient must agree within 1e-7 relative to its scale, far
/// below any indexing or sign error (which are O(1)).
fn check_fd(x: &Tensor, analytic: &Tensor, f: &dyn Fn(&Tensor) -> f64) {
    let h = 1e-6;
    let base: Vec<f64> = x.flatten_all().unwrap().to_vec1().unwrap();
    let grad: Vec<f64> = analytic.flatten_all().unwrap().to_vec1().unwrap();
    let scale = grad.iter().fold(1.0f64, |m, v| m.max(v.abs()));
    for i in 0..base.len() {
        let mut p = base.clone();
        p[i] += h;
        let fp = f(&Tensor::from_vec(p.clone(), x.shape(), x.device()).unwrap());
        p[i] -= 2.0 * h;
        let fm = f(&Tensor::from_vec(p, x.shape(), x.device()).unwrap());
        let num = (fp - fm) / (2.0 * h);
        assert!(
            (num - grad[i]).abs() <= 1e-7 * scale.max(1.0) + 1e-8,
            "element {i}: numeric {num}, analytic {}",
            grad[i]
        );
    }
}

#[test]
fn dwconv_forward_matches_candle_conv2d() {
    // (kernel, stride, padding, dilation) including even kernels, stride 2, dilation 2 and a
    // padding larger than the kernel's half.
    for &(k, s, p, d) in &[
        (3, 1, 1, 1),
        (7, 1, 3, 1),
        (5, 2, 2, 1),
        (3, 2, 0, 1),
        (3, 1, 2, 2),
        (2, 2, 0, 1),
        (9, 1, 4, 1),
        (3, 3, 4, 1),
    ] {
        let x = randn(&[2, 5, 13, 11], 1, DType::F32);
        let w = randn(&[5, 1, k, k], 2, DType::F32);
        let prm = DwConvParams {
            stride: (s, s),
            padding: (p, p),
            dilation: (d, d),
        };
        let ours = depthwise_conv2d(&x, &w, None, prm).unwrap();
        let reference = depthwise_conv2d_reference(&x, &w, prm).unwrap();
        let err = max_abs(&ours, &reference);
        // f32 sums of at most 81 products of O(1) values: rounding ~1e-6.
        assert!(err < 1e-5, "k{k} s{s} p{p} d{d}: {err}");
    }
}

/// The register-blocked stride-1 path (forward and input gradient) on rows wide enough for its
/// 32- and 8-column blocks and the single-column tail, with odd and even kernels, "same",
/// smaller and zero padding: values and both gradients equal candle's grouped `conv2d` (f64,
/// 1e-10: the same products summed in another order).
#[test]
fn dwconv_unit_stride_blocks_match_candle_conv2d() {
    for &(k, p, width) in &[(11, 5, 75), (7, 3, 70), (3, 0, 41), (4, 1, 33), (5, 4, 9)] {
        let x = Var::from_tensor(&randn(&[2, 3, 9, width], 7, DType::F64)).unwrap();
        let w = Var::from_tensor(&randn(&[3, 1, k, k], 8, DType::F64)).unwrap();
        let prm = DwConvParams {
            stride: (1, 1),
            padding: (p, p),
            dilation: (1, 1),
        };
        let ours = depthwise_conv2d(&x, &w, None, prm).unwrap();
        let reference = depthwise_conv2d_reference(&x, &w, prm).unwrap();
        densepred_testutil::assert_same_values_and_grads(&ours, &reference, &[&x, &w], 9, 1e-10);
    }
}

#[test]
fn dwconv_bias_and_shapes() {
    let x = randn(&[1, 4, 6, 6], 3, DType::F32);
    let w = Tensor::zeros((4, 1, 3, 3), DType::F32, &Device::Cpu).unwrap();
    let b = Tensor::new(&[1f32, 2., 3., 4.], &Device::Cpu).unwrap();
    let y = depthwise_conv2d(&x, &w, Some(&b), DwConvParams::same(1)).unwrap();
    assert_eq!(y.dims(), &[1, 4, 6, 6]);
    let per_channel: Vec<f32> = y.mean((0, 2, 3)).unwrap().to_vec1().unwrap();
    assert_eq!(per_channel, vec![1., 2., 3., 4.]);
    // A weight that is not (C,1,k,k) is an error, not a panic.
    let bad = Tensor::zeros((3, 1, 3, 3), DType::F32, &Device::Cpu).unwrap();
    assert!(depthwise_conv2d(&x, &bad, None, DwConvParams::same(1)).is_err());
    // So is a kernel larger than the padded input.
    let big = Tensor::zeros((4, 1, 9, 9), DType::F32, &Device::Cpu).unwrap();
    assert!(depthwise_conv2d(&x, &big, None, DwConvParams::same(0)).is_err());
}

#[test]
fn dwconv_backward_matches_finite_differences() {
    for &(k, s, p, d) in &[(3, 1, 1, 1), (5, 2, 1, 1), (3, 1, 2, 2), (4, 1, 2, 1)] {
        let prm = DwConvParams {
            stride: (s, s),
            padding: (p, p),
            dilation: (d, d),
        };
        let x = Var::from_tensor(&randn(&[2, 3, 7, 6], 4, DType::F64)).unwrap();
        let w = Var::from_tensor(&randn(&[3, 1, k, k], 5, DType::F64)).unwrap();
        // A random linear functional of the output makes every output position matter.
        let out_shape = depthwise_conv2d(&x, &w, None, prm).unwrap().dims().to_vec();
        let r = randn(&out_shape, 6, DType::F64);
        let loss = |x: &Tensor, w: &Tensor| -> Tensor {
            (depthwise_conv2d(x, w, None, prm).unwrap() * &r)
                .unwrap()
                .sum_all()
                .unwrap()
        };
        let grads = loss(x.as_tensor(), w.as_tensor()).backward().unwrap();
        let gx = grads.get(x.as_tensor()).unwrap();
        let gw = grads.get(w.as_tensor()).unwrap();
        check_fd(x.as_tensor(), gx, &|xp| {
            loss(xp, w.as_tensor()).to_scalar::<f64>().unwrap()
        });
        check_fd(w.as_tensor(), gw, &|wp| {
            loss(x.as_tensor(), wp).to_scalar::<f64>().unwrap()
        });
        // And the same gradients as candle's differentiable grouped conv2d (stride 1 only: candle
        // 0.11's conv2d backward fails with a shape error when a stride leaves input rows unread).
        if s != 1 {
            continue;
        }
        let lr = |x: &Tensor, w: &Tensor| {
            (depthwise_conv2d_reference(x, w, prm).unwrap() * &r)
                .unwrap()
                .sum_all()
                .unwrap()
        };
        let g2 = lr(x.as_tensor(), w.as_tensor()).backward().unwrap();
        assert!(max_abs(gx, g2.get(x.as_tensor()).unwrap()) < 1e-12);
        assert!(max_abs(gw, g2.get(w.as_tensor()).unwrap()) < 1e-12);
    }
}

fn layer_norm_reference(x: &Tensor, g: &Tensor, b: &Tensor, eps: f64) -> Tensor {
    let mean = x.mean_keepdim(D::Minus1).unwrap();
    let xc = x.broadcast_sub(&mean).unwrap();
    let var = xc.sqr().unwrap().mean_keepdim(D::Minus1).unwrap();
    xc.broadcast_div(&(var + eps).unwrap().sqrt().unwrap())
        .unwrap()
        .broadcast_mul(g)
        .unwrap()
        .broadcast_add(b)
        .unwrap()
}

#[test]
fn layer_norm_forward_and_backward() {
    let x = Var::from_tensor(&(randn(&[3, 4, 9], 7, DType::F64) * 3.0).unwrap()).unwrap();
    let g = Var::from_tensor(&(randn(&[9], 8, DType::F64) + 1.0).unwrap()).unwrap();
    let b = Var::from_tensor(&randn(&[9], 9, DType::F64)).unwrap();
    let eps = 1e-6;
    let ours = layer_norm(&x, &g, &b, eps).unwrap();
    assert!(max_abs(&ours, &layer_norm_reference(&x, &g, &b, eps)) < 1e-12);
    let r = randn(&[3, 4, 9], 10, DType::F64);
    let loss = |x: &Tensor, g: &Tensor, b: &Tensor| {
        (layer_norm(x, g, b, eps).unwrap() * &r)
            .unwrap()
            .sum_all()
            .unwrap()
    };
    let grads = loss(&x, &g, &b).backward().unwrap();
    check_fd(&x, grads.get(&x).unwrap(), &|xp| {
        loss(xp, &g, &b).to_scalar::<f64>().unwrap()
    });
    check_fd(&g, grads.get(&g).unwrap(), &|gp| {
        loss(&x, gp, &b).to_scalar::<f64>().unwrap()
    });
    check_fd(&b, grads.get(&b).unwrap(), &|bp| {
        loss(&x, &g, bp).to_scalar::<f64>().unwrap()
    });
    // f32 path agrees with the f64 one.
    let y32 = layer_norm(
        &x.to_dtype(DType::F32).unwrap(),
        &g.to_dtype(DType::F32).unwrap(),
        &b.to_dtype(DType::F32).unwrap(),
        eps,
    )
    .unwrap();
    assert!(max_abs(&y32.to_dtype(DType::F64).unwrap(), &ours) < 1e-5);
}

/// The fused backward kernel splits rows into blocks of 64, each with its own `dgamma`/`dbeta`
/// partial sums: with 2·150 rows (five blocks, the last one partial) its gradients must equal
/// autograd through the composed reference ops (f64; 1e-10 leaves room for summation order).
#[test]
fn layer_norm_backward_matches_composed_ops_over_many_row_blocks() {
    let x = Var::from_tensor(&(randn(&[2, 150, 24], 21, DType::F64) * 2.0).unwrap()).unwrap();
    let g = Var::from_tensor(&(randn(&[24], 22, DType::F64) + 1.0).unwrap()).unwrap();
    let b = Var::from_tensor(&randn(&[24], 23, DType::F64)).unwrap();
    let r = randn(&[2, 150, 24], 24, DType::F64);
    let eps = 1e-5;
    let ours = (layer_norm(&x, &g, &b, eps).unwrap() * &r)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    let refs = (layer_norm_reference(&x, &g, &b, eps) * &r)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    for v in [&x, &g, &b] {
        let d = max_abs(ours.get(v).unwrap(), refs.get(v).unwrap());
        assert!(d < 1e-10, "gradient differs by {d}");
    }
}

#[test]
fn softmax_forward_and_backward() {
    let x = Var::from_tensor(&(randn(&[2, 3, 7], 11, DType::F64) * 4.0).unwrap()).unwrap();
    let y = softmax_last_dim(&x).unwrap();
    let reference = candle_nn::ops::softmax(&x, D::Minus1).unwrap();
    assert!(max_abs(&y, &reference) < 1e-14);
    let r = randn(&[2, 3, 7], 12, DType::F64);
    let loss = |x: &Tensor| {
        (softmax_last_dim(x).unwrap() * &r)
            .unwrap()
            .sum_all()
            .unwrap()
    };
    let grads = loss(&x).backward().unwrap();
    check_fd(&x, grads.get(&x).unwrap(), &|xp| {
        loss(xp).to_scalar::<f64>().unwrap()
    });
}

#[test]
fn channel_bias_and_scale_ops_match_broadcasts_and_finite_differences() {
    use densepred_core::ops::{
        add_bias_channels, add_bias_last, mul_scale_channels, mul_scale_last,
    };
    let x4 = Var::from_tensor(&randn(&[2, 3, 4, 5], 21, DType::F64)).unwrap();
    let x3 = Var::from_tensor(&randn(&[2, 6, 3], 22, DType::F64)).unwrap();
    let p3 = Var::from_tensor(&randn(&[3], 23, DType::F64)).unwrap();
    type Op = fn(&Tensor, &Tensor) -> candle_core::Result<Tensor>;
    let cases: Vec<(&str, Op, &Var, Tensor)> = vec![
        (
            "add_bias_channels",
            add_bias_channels,
            &x4,
            x4.broadcast_add(&p3.reshape((1, 3, 1, 1)).unwrap())
                .unwrap(),
        ),
        (
            "mul_scale_channels",
            mul_scale_channels,
            &x4,
            x4.broadcast_mul(&p3.reshape((1, 3, 1, 1)).unwrap())
                .unwrap(),
        ),
        (
            "add_bias_last",
            add_bias_last,
            &x3,
            x3.broadcast_add(p3.as_tensor()).unwrap(),
        ),
        (
            "mul_scale_last",
            mul_scale_last,
            &x3,
            x3.broadcast_mul(p3.as_tensor()).unwrap(),
        ),
    ];
    for (name, op, x, reference) in cases {
        let y = op(x, &p3).unwrap();
        assert!(max_abs(&y, &reference) < 1e-14, "{name}");
        let r = randn(y.dims(), 24, DType::F64);
        let loss = |x: &Tensor, p: &Tensor| (op(x, p).unwrap() * &r).unwrap().sum_all().unwrap();
        let grads = loss(x, &p3).backward().unwrap();
        check_fd(x, grads.get(x).unwrap(), &|xp| {
            loss(xp, &p3).to_scalar::<f64>().unwrap()
        });
        check_fd(&p3, grads.get(&p3).unwrap(), &|pp| {
            loss(x, pp).to_scalar::<f64>().unwrap()
        });
    }
}

#[test]
fn fast_gelu_matches_exact_gelu() {
    use densepred_core::ops::gelu_erf;
    // Values over the whole useful range, including the clamped tails.
    let v: Vec<f32> = (-2000..=2000).map(|i| i as f32 * 0.005).collect();
    let x = Var::from_tensor(&Tensor::new(v.as_slice(), &Device::Cpu).unwrap()).unwrap();
    let ours = gelu_erf(&x).unwrap();
    let exact = x.to_dtype(DType::F64).unwrap().gelu_erf().unwrap();
    // erf approximation error ≤ 1.5e-7 times |x|/2 ≤ 5, plus f32 rounding of values up to 10.
    assert!(max_abs(&ours.to_dtype(DType::F64).unwrap(), &exact) < 2e-6);
    let g_ours = ours.sum_all().unwrap().backward().unwrap();
    let x64 = Var::from_tensor(&x.to_dtype(DType::F64).unwrap()).unwrap();
    let g_exact = x64
        .gelu_erf()
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    let d = max_abs(
        &g_ours.get(&x).unwrap().to_dtype(DType::F64).unwrap(),
        g_exact.get(&x64).unwrap(),
    );
    assert!(d < 2e-6, "gelu gradient differs by {d}");
}

#[test]
fn fast_exp_relative_error() {
    use densepred_core::ops::activation::exp_f32;
    for i in -8700..=8800 {
        let x = i as f32 * 0.01;
        let (a, e) = (exp_f32(x) as f64, (x as f64).exp());
        assert!(((a - e) / e).abs() < 5e-7, "exp({x}): {a} vs {e}");
    }
    assert_eq!(exp_f32(-1000.0), exp_f32(-87.3));
}

#[test]
fn transpose_last2_matches_candle_and_backpropagates() {
    use densepred_core::ops::transpose_last2;
    let x = Var::from_tensor(&randn(&[2, 37, 70], 31, DType::F64)).unwrap();
    let y = transpose_last2(&x).unwrap();
    assert_eq!(y.dims(), &[2, 70, 37]);
    assert_eq!(
        max_abs(&y, &x.transpose(1, 2).unwrap().contiguous().unwrap()),
        0.0
    );
    let r = randn(&[2, 70, 37], 32, DType::F64);
    let g = densepred_testutil::grads_of_dot(&y, &r);
    assert_eq!(
        max_abs(
            g.get(&x).unwrap(),
            &r.transpose(1, 2).unwrap().contiguous().unwrap()
        ),
        0.0
    );
    assert!(transpose_last2(&Tensor::new(&[1f32, 2.], &Device::Cpu).unwrap()).is_err());
}

/// The channels-last token convolution equals the NCHW route (transpose, depthwise conv, bias,
/// transpose, residual, exact GELU), and its backward matches finite differences.
#[test]
fn token_dwconv_matches_nchw_route_and_finite_differences() {
    use densepred_core::ops::{token_dwconv, LocalMode};
    let (b, h, w, c) = (2, 5, 6, 4);
    for k in [3usize, 5] {
        let x = Var::from_tensor(&randn(&[b, h * w, c], 41, DType::F64)).unwrap();
        let wt = Var::from_tensor(&randn(&[c, 1, k, k], 42, DType::F64)).unwrap();
        let bias = Var::from_tensor(&randn(&[c], 43, DType::F64)).unwrap();
        for mode in [LocalMode::Plain, LocalMode::ResidualGelu] {
            let ours = token_dwconv(&x, &wt, &bias, (h, w), mode).unwrap();
            let map = x.transpose(1, 2).unwrap().reshape((b, c, h, w)).unwrap();
            let conv = depthwise_conv2d(&map, &wt, Some(&bias), DwConvParams::same(k / 2)).unwrap();
            let mut reference = conv
                .reshape((b, c, h * w))
                .unwrap()
                .transpose(1, 2)
                .unwrap()
                .contiguous()
                .unwrap();
            if mode == LocalMode::ResidualGelu {
                reference = (reference + x.as_tensor()).unwrap().gelu_erf().unwrap();
            }
            assert!(max_abs(&ours, &reference) < 1e-12, "k{k} {mode:?}");
            let r = randn(&[b, h * w, c], 44, DType::F64);
            let loss = |x: &Tensor, wt: &Tensor, bias: &Tensor| {
                (token_dwconv(x, wt, bias, (h, w), mode).unwrap() * &r)
                    .unwrap()
                    .sum_all()
                    .unwrap()
            };
            let g = loss(&x, &wt, &bias).backward().unwrap();
            check_fd(&x, g.get(&x).unwrap(), &|xp| {
                loss(xp, &wt, &bias).to_scalar::<f64>().unwrap()
            });
            check_fd(&wt, g.get(&wt).unwrap(), &|wp| {
                loss(&x, wp, &bias).to_scalar::<f64>().unwrap()
            });
            check_fd(&bias, g.get(&bias).unwrap(), &|bp| {
                loss(&x, &wt, bp).to_scalar::<f64>().unwrap()
            });
        }
    }
}

#[test]
fn resize_nearest_matches_candle_and_backpropagates_for_any_factor() {
    use densepred_core::ops::resize_nearest;
    let x = Var::from_tensor(&randn(&[2, 3, 7, 9], 51, DType::F64)).unwrap();
    for (oh, ow) in [(13, 17), (14, 18), (7, 9), (25, 34)] {
        let ours = resize_nearest(&x, oh, ow).unwrap();
        assert_eq!(
            max_abs(&ours, &x.upsample_nearest2d(oh, ow).unwrap()),
            0.0,
            "{oh}x{ow}"
        );
        let r = randn(&[2, 3, oh, ow], 52, DType::F64);
        let loss = |x: &Tensor| {
            (resize_nearest(x, oh, ow).unwrap() * &r)
                .unwrap()
                .sum_all()
                .unwrap()
        };
        let g = loss(&x).backward().unwrap();
        check_fd(&x, g.get(&x).unwrap(), &|xp| {
            loss(xp).to_scalar::<f64>().unwrap()
        });
    }
}

/// The fused dense softmax cross-entropy (used by `cross_entropy` for `(N, C, H, W)` logits on the
/// CPU) equals the composed classes-last formula on the same data — with class weights, ignored
/// pixels, a spatial size that is not a multiple of the kernel's 256-pixel block, and both `Mean`
/// and `avg_non_ignore` — in value and in gradient (f64: agreement to rounding, 1e-12).
#[test]
fn fused_dense_cross_entropy_matches_composed() {
    use densepred_core::losses::{cross_entropy, Reduction};
    let (n, c, h, w) = (2, 7, 13, 29);
    let x = Var::from_tensor(&(randn(&[n, c, h, w], 11, DType::F64) * 4.0).unwrap()).unwrap();
    let labels: Vec<i64> = (0..n * h * w)
        .map(|i| {
            if i % 11 == 3 {
                255
            } else {
                ((i * 7 + i / 5) % c) as i64
            }
        })
        .collect();
    let lab = Tensor::from_vec(labels, (n, h, w), &Device::Cpu).unwrap();
    let cw = Tensor::new(&[1.0f64, 0.5, 2.0, 1.5, 0.25, 1.0, 3.0], &Device::Cpu).unwrap();
    for (class_weight, avg_non_ignore) in [(None, false), (Some(&cw), false), (Some(&cw), true)] {
        let fused = cross_entropy(
            x.as_tensor(),
            &lab,
            class_weight,
            Some(255),
            None,
            Reduction::Mean,
            None,
            avg_non_ignore,
        )
        .unwrap();
        // Composed path: classes moved last by hand, (M, C) logits.
        let xm = x
            .as_tensor()
            .flatten_from(2)
            .unwrap()
            .transpose(1, 2)
            .unwrap()
            .flatten_to(1)
            .unwrap();
        let composed = cross_entropy(
            &xm,
            &lab.flatten_all().unwrap(),
            class_weight,
            Some(255),
            None,
            Reduction::Mean,
            None,
            avg_non_ignore,
        )
        .unwrap();
        assert_same_loss_and_grad(&fused, &composed, &x);
    }
    // Out-of-range labels are reported with their position.
    let bad = Tensor::from_vec(vec![9i64; n * h * w], (n, h, w), &Device::Cpu).unwrap();
    let e = cross_entropy(
        x.as_tensor(),
        &bad,
        None,
        Some(255),
        None,
        Reduction::Mean,
        None,
        false,
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("label 9 at element 0"), "{e}");
}

/// Two scalar f64 losses of `x` agree in value and in their gradient with respect to `x`, which
/// is not zero (1e-12: the same arithmetic in another order).
fn assert_same_loss_and_grad(a: &Tensor, b: &Tensor, x: &Var) {
    let (va, vb) = (a.to_scalar::<f64>().unwrap(), b.to_scalar::<f64>().unwrap());
    assert!((va - vb).abs() < 1e-12, "loss {va} vs {vb}");
    let ga = a.backward().unwrap().get(x).unwrap().clone();
    let gb = b.backward().unwrap().get(x).unwrap().clone();
    let d = max_abs(&ga, &gb);
    assert!(d < 1e-12, "gradient differs by {d}");
    assert!(
        densepred_testutil::max_abs_value(&ga) > 1e-3,
        "zero gradient"
    );
}

/// `cross_entropy_resized` (the resize to the label size fused into the loss, resized logits not
/// kept) equals `resize_bilinear` followed by `cross_entropy` — up- and down-sampling, both
/// `align_corners`, class weights, ignored pixels, `avg_non_ignore` — in value and in gradient
/// (f64: the same arithmetic in another order, 1e-12).
#[test]
fn resized_cross_entropy_matches_resize_then_cross_entropy() {
    use densepred_core::losses::{cross_entropy, cross_entropy_resized, Reduction};
    use densepred_core::ops::resize_bilinear;
    let (n, c) = (2, 5);
    let cw = Tensor::new(&[1.0f64, 0.5, 2.0, 1.5, 0.25], &Device::Cpu).unwrap();
    for ((h, w), (oh, ow), ac, class_weight, avg_non_ignore) in [
        ((7, 9), (29, 31), false, None, false),
        ((7, 9), (29, 31), true, Some(&cw), true),
        ((16, 12), (10, 7), false, Some(&cw), false),
    ] {
        let x = Var::from_tensor(&(randn(&[n, c, h, w], 21, DType::F64) * 3.0).unwrap()).unwrap();
        let labels: Vec<i64> = (0..n * oh * ow)
            .map(|i| {
                if i % 13 == 5 {
                    255
                } else {
                    ((i * 3 + i / 7) % c) as i64
                }
            })
            .collect();
        let lab = Tensor::from_vec(labels, (n, oh, ow), &Device::Cpu).unwrap();
        let fused = cross_entropy_resized(
            x.as_tensor(),
            &lab,
            class_weight,
            Some(255),
            None,
            Reduction::Mean,
            None,
            avg_non_ignore,
            ac,
        )
        .unwrap();
        let up = resize_bilinear(x.as_tensor(), oh, ow, ac).unwrap();
        let reference = cross_entropy(
            &up,
            &lab,
            class_weight,
            Some(255),
            None,
            Reduction::Mean,
            None,
            avg_non_ignore,
        )
        .unwrap();
        assert_same_loss_and_grad(&fused, &reference, &x);
    }
}
