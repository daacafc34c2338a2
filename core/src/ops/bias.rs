//! Per-channel bias and scale with backward passes that reduce quickly.
//!
//! With candle's `broadcast_add` / `broadcast_mul`, the gradient of a `(C,)` bias is a reduction
//! over the leading dimensions, which candle 0.11 runs single-threaded with two integer divisions
//! per element (`ReduceSum` off its fast path): 15% of an SMT training step. These ops compute the
//! same values, and reduce their gradients over trailing dimensions (candle's fast path) or with a
//! gemm against a ones vector.

use candle_core::{CpuStorage, CustomOp2, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use crate::kernel::{gemm_into, KernelFloat, MatView};

/// Where the channel axis is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Axis {
    /// `(..., C)`: channels last (tokens, linear outputs).
    Last,
    /// `(B, C, ...)`: channels second (NCHW maps).
    Second,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Add,
    Mul,
}

struct ChannelOp {
    axis: Axis,
    kind: Kind,
}

impl ChannelOp {
    /// `(outer, C, inner)` sizes of `shape` for this axis.
    fn split(&self, shape: &Shape) -> Result<(usize, usize, usize)> {
        let d = shape.dims();
        match self.axis {
            Axis::Last if !d.is_empty() => {
                let c = d[d.len() - 1];
                Ok((shape.elem_count() / c.max(1), c, 1))
            }
            Axis::Second if d.len() >= 2 => Ok((d[0], d[1], d[2..].iter().product())),
            _ => candle_core::bail!("channel op: unsupported shape {:?}", d),
        }
    }
}

fn kernel<T: num_traits::Float + Send + Sync>(
    x: &[T],
    p: &[T],
    c: usize,
    inner: usize,
    kind: Kind,
) -> Vec<T> {
    // Every channel row below is written from its `p` value: a short `p` would leave rows unset.
    assert!(
        p.len() >= c,
        "channel op: {} values for {c} channels",
        p.len()
    );
    let n = x.len();
    let mut out = Vec::with_capacity(n);
    let block = c * inner;
    out.spare_capacity_mut()[..n]
        .par_chunks_mut(block)
        .zip(x.par_chunks(block))
        .for_each(|(o, x)| {
            for ((os, xs), &v) in o.chunks_mut(inner).zip(x.chunks(inner)).zip(p) {
                match kind {
                    Kind::Add => os.iter_mut().zip(xs).for_each(|(o, &x)| {
                        o.write(x + v);
                    }),
                    Kind::Mul => os.iter_mut().zip(xs).for_each(|(o, &x)| {
                        o.write(x * v);
                    }),
                }
            }
        });
    // SAFETY: the output and input are cut into the same blocks and channel rows (both have `n`
    // elements; `p` holds one value per channel row of a block), so all `n` elements were written.
    unsafe { out.set_len(n) };
    out
}

fn kernel_last<T: num_traits::Float + Send + Sync>(
    x: &[T],
    p: &[T],
    c: usize,
    kind: Kind,
) -> Vec<T> {
    let mut out = crate::kernel::zeroed(x.len());
    out.par_chunks_mut(c * 64)
        .zip(x.par_chunks(c * 64))
        .for_each(|(o, x)| {
            for (orow, xrow) in o.chunks_mut(c).zip(x.chunks(c)) {
                match kind {
                    Kind::Add => orow
                        .iter_mut()
                        .zip(xrow)
                        .zip(p)
                        .for_each(|((o, &x), &v)| *o = x + v),
                    Kind::Mul => orow
                        .iter_mut()
                        .zip(xrow)
                        .zip(p)
                        .for_each(|((o, &x), &v)| *o = x * v),
                }
            }
        });
    out
}

impl ChannelOp {
    fn run<T: num_traits::Float + Send + Sync>(
        &self,
        x: &[T],
        p: &[T],
        c: usize,
        inner: usize,
    ) -> Vec<T> {
        match self.axis {
            Axis::Last => kernel_last(x, p, c, self.kind),
            Axis::Second => kernel(x, p, c, inner, self.kind),
        }
    }
}

impl CustomOp2 for ChannelOp {
    fn name(&self) -> &'static str {
        "channel-bias-scale"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (_, c, inner) = self.split(l1.shape())?;
        if l2.shape().elem_count() != c {
            candle_core::bail!(
                "channel op: parameter {:?} does not match {c} channels of {:?}",
                l2.shape(),
                l1.shape()
            );
        }
        let out =
            crate::cpu_float!("channel op"; x = (s1, l1), p = (s2, l2) => self.run(x, p, c, inner));
        Ok((out, l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        p: &Tensor,
        _res: &Tensor,
        gy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        // Detached: gradients built from graph-tracked inputs would keep the forward graph
        // (and these temporaries) alive in the GradStore until the whole backward ends.
        let (x, p) = (&x.detach(), &p.detach());
        let (outer, c, inner) = self.split(x.shape())?;
        let gy = gy.contiguous()?;
        let (gx, to_reduce) = match self.kind {
            Kind::Add => (gy.clone(), gy),
            Kind::Mul => (apply(&gy, p, self.axis, Kind::Mul)?, (&gy * x)?),
        };
        let gp = match self.axis {
            // Column sums of an (outer, C) matrix as a gemm: ones(1, outer) · M.
            Axis::Last => {
                let ones = Tensor::ones((1, outer), to_reduce.dtype(), to_reduce.device())?;
                ones.matmul(&to_reduce.reshape((outer, c))?)?.reshape(c)?
            }
            // Trailing-dimension sum (candle's fast path), then a small (B, C) sum.
            Axis::Second => to_reduce.reshape((outer, c, inner))?.sum(2)?.sum(0)?,
        };
        Ok((Some(gx), Some(gp)))
    }
}

fn apply(x: &Tensor, p: &Tensor, axis: Axis, kind: Kind) -> Result<Tensor> {
    use super::dispatch as d;
    let op = match (axis, kind) {
        (Axis::Last, Kind::Add) => &d::ADD_BIAS_LAST,
        (Axis::Last, Kind::Mul) => &d::MUL_SCALE_LAST,
        (Axis::Second, Kind::Add) => &d::ADD_BIAS_CHANNELS,
        (Axis::Second, Kind::Mul) => &d::MUL_SCALE_CHANNELS,
    };
    if d::select(op, x).is_ours() {
        return x
            .contiguous()?
            .apply_op2(&p.contiguous()?, ChannelOp { axis, kind });
    }
    let c = p.elem_count();
    let shape: Vec<usize> = match axis {
        Axis::Last => vec![c],
        Axis::Second => {
            let mut s = vec![1usize; x.rank()];
            s[1] = c;
            s
        }
    };
    let p = p.reshape(shape)?;
    match kind {
        Kind::Add => x.broadcast_add(&p),
        Kind::Mul => x.broadcast_mul(&p),
    }
}

/// `x + b` for `x` `(..., C)` and `b` `(C,)`; differentiable.
pub fn add_bias_last(x: &Tensor, b: &Tensor) -> Result<Tensor> {
    apply(x, b, Axis::Last, Kind::Add)
}

/// `x * g` for `x` `(..., C)` and `g` `(C,)` (layer scale); differentiable.
pub fn mul_scale_last(x: &Tensor, g: &Tensor) -> Result<Tensor> {
    apply(x, g, Axis::Last, Kind::Mul)
}

/// `x + b[c]` for `x` `(B, C, ...)` and `b` `(C,)` (convolution bias); differentiable.
pub fn add_bias_channels(x: &Tensor, b: &Tensor) -> Result<Tensor> {
    apply(x, b, Axis::Second, Kind::Add)
}

/// `x * s[c]` for `x` `(B, C, ...)` and `s` `(C,)` (normalisation scale); differentiable.
pub fn mul_scale_channels(x: &Tensor, s: &Tensor) -> Result<Tensor> {
    apply(x, s, Axis::Second, Kind::Mul)
}

/// `y = x Wᵀ + b` as one op: `x` `(rows, in)`, `W` `(out, in)`, `b` `(out,)` → `(rows, out)`.
/// A matmul followed by [`add_bias_last`] keeps the pre-bias product alive for the backward
/// although neither gradient needs it; this op keeps only `x`, `W`, `b` and `y` (as PyTorch's
/// `addmm`). Gradients: `dx = dy W`, `dW = dyᵀ x`, `db = 1ᵀ dy`.
struct LinearBias;

impl candle_core::CustomOp3 for LinearBias {
    fn name(&self) -> &'static str {
        "linear-bias"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (rows, in_f) = rows_last(l1.shape())?;
        let (out_f, _) = l2.shape().dims2()?;
        let what = "linear";
        let res = crate::cpu_float!(what; x = (s1, l1), w = (s2, l2), b = (s3, l3) =>
            linear_fwd(x, w, b, rows, in_f, out_f));
        Ok((res, with_last(l1.shape(), out_f)))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _b: &Tensor,
        _res: &Tensor,
        gy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let gy = gy.contiguous()?;
        let (x, w) = (x.detach(), w.detach());
        let (rows, out_f) = rows_last(gy.shape())?;
        let gx = gy.apply_op2_no_bwd(&w, &Product::LinearGradInput)?;
        let gw = gy.apply_op2_no_bwd(&x, &Product::LinearGradWeight)?;
        let ones = Tensor::ones((1, rows), gy.dtype(), gy.device())?;
        let gb = ones.matmul(&gy.reshape((rows, out_f))?)?.flatten_all()?;
        Ok((Some(gx), Some(gw), Some(gb)))
    }
}

/// `(rows, last)` of a shape `(..., last)`: the leading dimensions flattened.
fn rows_last(s: &Shape) -> Result<(usize, usize)> {
    match s.dims().last() {
        Some(&last) => Ok((s.elem_count() / last.max(1), last)),
        None => candle_core::bail!("linear: scalar operand"),
    }
}

/// `shape` with its last dimension replaced by `last`.
fn with_last(shape: &Shape, last: usize) -> Shape {
    let mut d = shape.dims().to_vec();
    if let Some(l) = d.last_mut() {
        *l = last;
    }
    Shape::from(d)
}

/// `y = x Wᵀ + b` on raw buffers: `y` starts as `b` on every row and the product accumulates
/// onto it, so no pre-bias copy of `y` is made. `x` `(rows, in_f)`, `w` `(out_f, in_f)`, `b`
/// `(out_f,)`, all row-major.
pub fn linear_fwd<T: KernelFloat>(
    x: &[T],
    w: &[T],
    b: &[T],
    rows: usize,
    in_f: usize,
    out_f: usize,
) -> Vec<T> {
    let mut y = crate::kernel::zeroed(rows * out_f);
    if out_f > 0 {
        y.par_chunks_mut(out_f * 64)
            .for_each(|blk| blk.chunks_mut(out_f).for_each(|r| r.copy_from_slice(b)));
    }
    // The product runs on a row-major copy of Wᵀ `(in_f, out_f)` rather than on a strided view
    // of `w`: `gemm` computes a row-major destination as `yᵀ = W xᵀ` and, with `W` read across
    // its rows, re-packs the whole of it on one thread for every block of tokens. With Wᵀ it
    // reads the weights in place. For the token counts of SMT's stages 3 and 4 (98–392 rows)
    // that halves the product's time (measured with `examples/gemm_orient`); the copy costs
    // `in_f · out_f` elements, nothing next to the product's `rows · in_f · out_f`.
    let wt = super::transpose::kernel(w, 1, out_f, in_f);
    gemm_into(
        &mut y,
        MatView::rows_of(rows, out_f, 0, out_f),
        true,
        x,
        MatView::rows_of(rows, in_f, 0, in_f),
        &wt,
        MatView::rows_of(in_f, out_f, 0, out_f),
    );
    y
}

/// The gradient products of [`LinearBias`] and [`PointwiseConv`], on the operands' buffers
/// (candle's `matmul` would copy the strided per-group operands and stack per-image results).
/// Used only inside backward passes: no gradient of their own.
#[derive(Debug, Clone, Copy)]
enum Product {
    /// `(gy (..., out), w (out, in)) → gy · w`, `(..., in)` (leading dimensions as rows).
    LinearGradInput,
    /// `(gy (..., out), x (..., in)) → gyᵀ · x`, `(out, in)` (leading dimensions as rows).
    LinearGradWeight,
    /// `(gy (B, G·og, HW), w (G, og, ig)) → (B, G·ig, HW)`, per image and group `W_gᵀ · gy_g`.
    PointwiseGradInput,
    /// `(gy (B, G·og, HW), x (B, G·ig, HW)) → (G, og, ig)`, per group `Σ_images gy_g · x_gᵀ`;
    /// needs the group count, so it carries it.
    PointwiseGradWeight { groups: usize },
}

impl Product {
    fn run<T: KernelFloat>(
        &self,
        a: &[T],
        b: &[T],
        la: &Layout,
        lb: &Layout,
    ) -> Result<(Vec<T>, Shape)> {
        match *self {
            Product::LinearGradInput => {
                let (rows, out_f) = rows_last(la.shape())?;
                let (_, in_f) = lb.shape().dims2()?;
                let mut gx = crate::kernel::zeroed(rows * in_f);
                gemm_into(
                    &mut gx,
                    MatView::rows_of(rows, in_f, 0, in_f),
                    false,
                    a,
                    MatView::rows_of(rows, out_f, 0, out_f),
                    b,
                    MatView::rows_of(out_f, in_f, 0, in_f),
                );
                Ok((gx, with_last(la.shape(), in_f)))
            }
            Product::LinearGradWeight => {
                let (rows, out_f) = rows_last(la.shape())?;
                let (rows_x, in_f) = rows_last(lb.shape())?;
                if rows_x != rows {
                    candle_core::bail!(
                        "linear backward: gradient {:?} and input {:?} differ in rows",
                        la.shape(),
                        lb.shape()
                    );
                }
                let mut gw = vec![T::zero(); out_f * in_f];
                gemm_into(
                    &mut gw,
                    MatView::rows_of(out_f, in_f, 0, in_f),
                    false,
                    a,
                    MatView::rows_of(rows, out_f, 0, out_f).t(),
                    b,
                    MatView::rows_of(rows, in_f, 0, in_f),
                );
                Ok((gw, Shape::from((out_f, in_f))))
            }
            Product::PointwiseGradInput => {
                let (bn, _, hw) = la.shape().dims3()?;
                let (g, og, ig) = lb.shape().dims3()?;
                let mut gx = crate::kernel::zeroed(bn * g * ig * hw);
                for i in 0..bn {
                    for gi in 0..g {
                        gemm_into(
                            &mut gx,
                            MatView::rows_of(ig, hw, (i * g + gi) * ig * hw, hw),
                            false,
                            b,
                            MatView::rows_of(og, ig, gi * og * ig, ig).t(),
                            a,
                            MatView::rows_of(og, hw, (i * g + gi) * og * hw, hw),
                        );
                    }
                }
                Ok((gx, Shape::from((bn, g * ig, hw))))
            }
            Product::PointwiseGradWeight { groups: g } => {
                let (bn, co, hw) = la.shape().dims3()?;
                let (_, ci, _) = lb.shape().dims3()?;
                let (og, ig) = (co / g, ci / g);
                let mut gw = vec![T::zero(); g * og * ig];
                for i in 0..bn {
                    for gi in 0..g {
                        gemm_into(
                            &mut gw,
                            MatView::rows_of(og, ig, gi * og * ig, ig),
                            i > 0,
                            a,
                            MatView::rows_of(og, hw, (i * co + gi * og) * hw, hw),
                            b,
                            MatView::rows_of(ig, hw, (i * ci + gi * ig) * hw, hw).t(),
                        );
                    }
                }
                Ok((gw, Shape::from((g, og, ig))))
            }
        }
    }
}

impl CustomOp2 for Product {
    fn name(&self) -> &'static str {
        "gemm-product"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        crate::cpu_float!(raw "gemm product"; a = (s1, l1), b = (s2, l2) => {
            let (v, s) = self.run(a, b, l1, l2)?;
            Ok((crate::kernel::owned(v), s))
        })
    }
}

/// Fully connected layer with bias, `torch.nn.functional.linear`: `x` `(..., in)`, `w`
/// `(out, in)`, `b` `(out,)` → `(..., out)`. On CPU (f32/f64) one op on the input as it is (no
/// reshape nodes, whose backward would each cost a zero-fill and an add of the full gradient in
/// candle's autograd) that stores no pre-bias intermediate; elsewhere `matmul` +
/// [`add_bias_last`] on the flattened rows.
///
/// Errors: shape mismatches (`in` of `x` vs `w`, `out` vs `b`), a scalar `x`, unsupported dtypes.
pub fn linear_bias(x: &Tensor, w: &Tensor, b: &Tensor) -> Result<Tensor> {
    let (rows, in_f) = rows_last(x.shape())?;
    let (out_f, in_w) = w.dims2()?;
    if in_f != in_w || b.elem_count() != out_f {
        candle_core::bail!(
            "linear: input {:?}, weight {:?}, bias {:?} do not match",
            x.dims(),
            w.dims(),
            b.dims()
        );
    }
    if super::dispatch::select(&super::dispatch::LINEAR_BIAS, x).is_ours() {
        return x
            .contiguous()?
            .apply_op3(&w.contiguous()?, &b.contiguous()?, LinearBias);
    }
    let y = add_bias_last(&x.reshape((rows, in_f))?.matmul(&w.t()?)?, b)?;
    y.reshape(with_last(x.shape(), out_f))
}

#[cfg(test)]
mod linear_tests {
    use super::*;
    use candle_core::{Device, Var};

    /// Values and the three gradients equal `matmul` + broadcast add in f64 (1e-10).
    #[test]
    fn linear_bias_matches_composed_ops() {
        let dev = Device::Cpu;
        let x = Var::from_tensor(&Tensor::randn(0f64, 1.0, (7, 5), &dev).unwrap()).unwrap();
        let w = Var::from_tensor(&Tensor::randn(0f64, 1.0, (3, 5), &dev).unwrap()).unwrap();
        let b = Var::from_tensor(&Tensor::randn(0f64, 1.0, 3, &dev).unwrap()).unwrap();
        let y = linear_bias(&x, &w, &b).unwrap();
        let r = x
            .matmul(&w.t().unwrap())
            .unwrap()
            .broadcast_add(&b)
            .unwrap();
        let err = |a: &Tensor, b: &Tensor| densepred_testutil::max_abs(&a, &b);
        densepred_testutil::assert_same_values_and_grads(&y, &r, &[&x, &w, &b], 7, 1e-10);
        assert!(linear_bias(&x, &w.t().unwrap(), &b).is_err());
        // Leading dimensions are rows: (2, 4, 5) gives what the (8, 5) rows give.
        let x3 = Var::from_tensor(&Tensor::randn(0f64, 1.0, (2, 4, 5), &dev).unwrap()).unwrap();
        let y3 = linear_bias(&x3, &w, &b).unwrap();
        assert_eq!(y3.dims(), [2, 4, 3]);
        let y2 = linear_bias(&x3.reshape((8, 5)).unwrap(), &w, &b).unwrap();
        assert!(err(&y3.reshape((8, 3)).unwrap(), &y2) < 1e-12);
        let proj3 = Tensor::randn(0f64, 1.0, (2, 4, 3), &dev).unwrap();
        let g3 = densepred_testutil::grads_of_dot(&y3, &proj3);
        let g2 = (&y2 * &proj3.reshape((8, 3)).unwrap())
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        assert_eq!(g3.get(&x3).unwrap().dims(), [2, 4, 5]);
        assert!(err(g3.get(&x3).unwrap(), g2.get(&x3).unwrap()) < 1e-12);
        assert!(err(g3.get(&w).unwrap(), g2.get(&w).unwrap()) < 1e-12);
        assert!(err(g3.get(&b).unwrap(), g2.get(&b).unwrap()) < 1e-12);
    }

    /// Grouped 1x1 conv with and without bias equals candle's grouped `conv2d` (+ bias), values
    /// and gradients, in f64 (1e-10).
    #[test]
    fn pointwise_conv_matches_candle_conv2d() {
        let dev = Device::Cpu;
        let (b, cin, cout, g, h, w) = (2, 6, 4, 2, 3, 5);
        let x = Var::from_tensor(&Tensor::randn(0f64, 1.0, (b, cin, h, w), &dev).unwrap()).unwrap();
        let wt = Var::from_tensor(&Tensor::randn(0f64, 1.0, (cout, cin / g, 1, 1), &dev).unwrap())
            .unwrap();
        let bias = Var::from_tensor(&Tensor::randn(0f64, 1.0, cout, &dev).unwrap()).unwrap();
        for with_bias in [true, false] {
            let wg = wt.reshape((g, cout / g, cin / g)).unwrap();
            let x3 = x.reshape((b, cin, h * w)).unwrap();
            let y = pointwise_conv_bias(&x3, &wg, with_bias.then_some(&*bias))
                .unwrap()
                .reshape((b, cout, h, w))
                .unwrap();
            let mut r = x.conv2d(&wt, 0, 1, 1, g).unwrap();
            if with_bias {
                r = r
                    .broadcast_add(&bias.reshape((1, cout, 1, 1)).unwrap())
                    .unwrap();
            }
            let wrt: Vec<&Tensor> = if with_bias {
                vec![&x, &wt, &bias]
            } else {
                vec![&x, &wt]
            };
            densepred_testutil::assert_same_values_and_grads(&y, &r, &wrt, 8, 1e-10);
        }
    }
}

/// 1x1 convolution with groups and bias as one op: `x` `(B, C_in, HW)`, `w`
/// `(groups, C_out/groups, C_in/groups)`, `b` `(C_out,)` → `(B, C_out, HW)`. Keeps only its
/// inputs and output for the backward (candle's matmul + bias keep the pre-bias product, and
/// candle's matmul backward gives the weight a gradient that holds the output gradient's graph).
struct PointwiseConv {
    has_bias: bool,
}

/// `y[i, g] = b + W_g · x[i, g]` per image `i` and group `g` on raw buffers (bias first, the
/// product accumulates onto it). `x` `(B, G·ig, HW)`, `w` `(G, og, ig)`, `bias` `(G·og,)` or
/// `None`.
fn pointwise_fwd<T: KernelFloat>(
    x: &[T],
    w: &[T],
    bias: Option<&[T]>,
    (bn, hw): (usize, usize),
    (g, og, ig): (usize, usize, usize),
) -> Vec<T> {
    let co = g * og;
    let n = bn * co * hw;
    let y = match bias {
        // The products accumulate onto the bias rows: the output is written once before them.
        Some(bias) if hw > 0 => {
            let mut y = Vec::with_capacity(n);
            y.spare_capacity_mut()[..n]
                .par_chunks_mut(hw)
                .enumerate()
                .for_each(|(r, row)| {
                    let v = bias[r % co];
                    row.iter_mut().for_each(|e| {
                        e.write(v);
                    });
                });
            // SAFETY: the `n / hw` rows of `hw` elements cover all `n` elements, each written.
            unsafe { y.set_len(n) };
            y
        }
        _ => crate::kernel::zeroed(n),
    };
    let mut y = y;
    for i in 0..bn {
        for gi in 0..g {
            gemm_into(
                &mut y,
                MatView::rows_of(og, hw, (i * co + gi * og) * hw, hw),
                bias.is_some(),
                w,
                MatView::rows_of(og, ig, gi * og * ig, ig),
                x,
                MatView::rows_of(ig, hw, (i * g + gi) * ig * hw, hw),
            );
        }
    }
    y
}

impl candle_core::CustomOp3 for PointwiseConv {
    fn name(&self) -> &'static str {
        "pointwise-conv"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (b, _, hw) = l1.shape().dims3()?;
        let (g, og, ig) = l2.shape().dims3()?;
        let what = "pointwise conv";
        let has_bias = self.has_bias;
        let res = crate::cpu_float!(what; x = (s1, l1), w = (s2, l2), bias = (s3, l3) =>
            pointwise_fwd(x, w, has_bias.then_some(bias), (b, hw), (g, og, ig)));
        Ok((res, Shape::from((b, g * og, hw))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _b: &Tensor,
        _res: &Tensor,
        gy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (x, w) = (x.detach(), w.detach());
        let gy = gy.contiguous()?;
        let groups = w.dim(0)?;
        let gx = gy.apply_op2_no_bwd(&w, &Product::PointwiseGradInput)?;
        let gw = gy.apply_op2_no_bwd(&x, &Product::PointwiseGradWeight { groups })?;
        let gb = if self.has_bias {
            Some(gy.sum(2)?.sum(0)?)
        } else {
            None
        };
        Ok((Some(gx), Some(gw), gb))
    }
}

/// 1x1 convolution (optionally grouped) with optional bias, `x` `(B, C_in, H·W)`, `w`
/// `(groups, C_out/groups, C_in/groups)`, `b` `(C_out,)` → `(B, C_out, H·W)`; output channel
/// `o` of group `o / (C_out/groups)` reads that group's input channels, as PyTorch's grouped
/// conv. Elsewhere (see [`super::dispatch`]) one grouped matmul per image plus the bias.
///
/// Errors: shape or dtype mismatches.
pub fn pointwise_conv_bias(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
    let (_, c, _) = x.dims3()?;
    let (g, og, ig) = w.dims3()?;
    if g * ig != c || b.is_some_and(|b| b.elem_count() != g * og) {
        candle_core::bail!(
            "pointwise conv: input {:?}, weight {:?}, bias {:?} do not match",
            x.dims(),
            w.dims(),
            b.map(|b| b.dims().to_vec())
        );
    }
    if !super::dispatch::select(&super::dispatch::POINTWISE_CONV_BIAS, x).is_ours() {
        return pointwise_conv_composed(x, w, b);
    }
    let zeros;
    let bias = match b {
        Some(b) => b.contiguous()?,
        None => {
            zeros = Tensor::zeros(g * og, x.dtype(), x.device())?;
            zeros.clone()
        }
    };
    x.contiguous()?.apply_op3(
        &w.contiguous()?,
        &bias,
        PointwiseConv {
            has_bias: b.is_some(),
        },
    )
}

/// [`pointwise_conv_bias`] from candle ops: one grouped matmul per image (a weight broadcast over
/// the batch would make its gradient a slow leading-dimension reduction in candle), then the
/// bias.
fn pointwise_conv_composed(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
    let (batch, c, hw) = x.dims3()?;
    let (g, og, ig) = w.dims3()?;
    let per_image = (0..batch)
        .map(|i| {
            w.matmul(&x.get(i)?.reshape((g, ig, hw))?)?
                .reshape((g * og, hw))
        })
        .collect::<Result<Vec<_>>>()?;
    debug_assert_eq!(g * ig, c);
    let y = Tensor::stack(&per_image, 0)?;
    match b {
        Some(b) => add_bias_channels(&y, b),
        None => Ok(y),
    }
}
