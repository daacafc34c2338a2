//! Per-channel bias and scale with backward passes that reduce quickly.
//!
//! With candle's `broadcast_add` / `broadcast_mul`, the gradient of a `(C,)` bias is a reduction
//! over the leading dimensions, which candle 0.11 runs single-threaded with two integer divisions
//! per element (`ReduceSum` off its fast path): 15% of an SMT training step. These ops compute the
//! same values, and reduce their gradients over trailing dimensions (candle's fast path) or with a
//! gemm against a ones vector.

use candle_core::{
    backend::BackendStorage, CpuStorage, CustomOp2, DType, Layout, Result, Shape, Tensor,
};
use rayon::prelude::*;

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
    let mut out = vec![T::zero(); x.len()];
    let block = c * inner;
    out.par_chunks_mut(block)
        .zip(x.par_chunks(block))
        .for_each(|(o, x)| {
            for ch in 0..c {
                let v = p[ch];
                let (os, xs) = if inner == 1 {
                    (&mut o[ch..ch + 1], &x[ch..ch + 1])
                } else {
                    (
                        &mut o[ch * inner..(ch + 1) * inner],
                        &x[ch * inner..(ch + 1) * inner],
                    )
                };
                match kind {
                    Kind::Add => os.iter_mut().zip(xs).for_each(|(o, &x)| *o = x + v),
                    Kind::Mul => os.iter_mut().zip(xs).for_each(|(o, &x)| *o = x * v),
                }
            }
        });
    out
}

fn kernel_last<T: num_traits::Float + Send + Sync>(
    x: &[T],
    p: &[T],
    c: usize,
    kind: Kind,
) -> Vec<T> {
    let mut out = vec![T::zero(); x.len()];
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
        let out = match (s1, s2) {
            (CpuStorage::F32(x), CpuStorage::F32(p)) => CpuStorage::F32(self.run(
                super::contiguous(x, l1, "channel op: x")?,
                super::contiguous(p, l2, "channel op: parameter")?,
                c,
                inner,
            )),
            (CpuStorage::F64(x), CpuStorage::F64(p)) => CpuStorage::F64(self.run(
                super::contiguous(x, l1, "channel op: x")?,
                super::contiguous(p, l2, "channel op: parameter")?,
                c,
                inner,
            )),
            _ => candle_core::bail!(
                "channel op: expected matching f32/f64 tensors, got {:?}",
                s1.dtype()
            ),
        };
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
    if x.device().is_cpu() && matches!(x.dtype(), DType::F32 | DType::F64) {
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
        let dev = candle_core::Device::Cpu;
        let (rows, _) = l1.shape().dims2()?;
        let (out_f, _) = l2.shape().dims2()?;
        let what = "linear";
        let res = match (s1, s2, s3) {
            (CpuStorage::F32(x), CpuStorage::F32(w), CpuStorage::F32(b)) => {
                let x = Tensor::from_slice(super::contiguous(x, l1, what)?, l1.shape(), &dev)?;
                let w = Tensor::from_slice(super::contiguous(w, l2, what)?, l2.shape(), &dev)?;
                let y = x.matmul(&w.t()?)?.flatten_all()?.to_vec1::<f32>()?;
                CpuStorage::F32(kernel_last(
                    &y,
                    super::contiguous(b, l3, what)?,
                    out_f,
                    Kind::Add,
                ))
            }
            (CpuStorage::F64(x), CpuStorage::F64(w), CpuStorage::F64(b)) => {
                let x = Tensor::from_slice(super::contiguous(x, l1, what)?, l1.shape(), &dev)?;
                let w = Tensor::from_slice(super::contiguous(w, l2, what)?, l2.shape(), &dev)?;
                let y = x.matmul(&w.t()?)?.flatten_all()?.to_vec1::<f64>()?;
                CpuStorage::F64(kernel_last(
                    &y,
                    super::contiguous(b, l3, what)?,
                    out_f,
                    Kind::Add,
                ))
            }
            _ => candle_core::bail!("linear: expected matching f32/f64, got {:?}", s1.dtype()),
        };
        Ok((res, Shape::from((rows, out_f))))
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
        let rows = x.dim(0)?;
        let gx = gy.matmul(&w)?;
        let gw = gy.t()?.matmul(&x)?;
        let ones = Tensor::ones((1, rows), gy.dtype(), gy.device())?;
        let gb = ones.matmul(&gy)?.flatten_all()?;
        Ok((Some(gx), Some(gw), Some(gb)))
    }
}

/// Fully connected layer with bias, `torch.nn.functional.linear`: `x` `(rows, in)`, `w`
/// `(out, in)`, `b` `(out,)` → `(rows, out)`. On CPU (f32/f64) one op that stores no pre-bias
/// intermediate; elsewhere `matmul` + [`add_bias_last`].
///
/// Errors: shape mismatches (`in` of `x` vs `w`, `out` vs `b`), unsupported dtypes.
pub fn linear_bias(x: &Tensor, w: &Tensor, b: &Tensor) -> Result<Tensor> {
    let (_, in_f) = x.dims2()?;
    let (out_f, in_w) = w.dims2()?;
    if in_f != in_w || b.elem_count() != out_f {
        candle_core::bail!(
            "linear: input {:?}, weight {:?}, bias {:?} do not match",
            x.dims(),
            w.dims(),
            b.dims()
        );
    }
    if x.device().is_cpu() && matches!(x.dtype(), DType::F32 | DType::F64) {
        return x
            .contiguous()?
            .apply_op3(&w.contiguous()?, &b.contiguous()?, LinearBias);
    }
    add_bias_last(&x.matmul(&w.t()?)?, b)
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
        let err = |a: &Tensor, b: &Tensor| {
            (a - b)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f64>()
                .unwrap()
        };
        assert!(err(&y, &r) < 1e-10);
        let proj = Tensor::randn(0f64, 1.0, (7, 3), &dev).unwrap();
        let gy = (&y * &proj).unwrap().sum_all().unwrap().backward().unwrap();
        let gr = (&r * &proj).unwrap().sum_all().unwrap().backward().unwrap();
        for t in [&x, &w, &b] {
            assert!(
                err(gy.get(t).unwrap(), gr.get(t).unwrap()) < 1e-10,
                "{:?}",
                t.dims()
            );
        }
        assert!(linear_bias(&x, &w.t().unwrap(), &b).is_err());
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
        let err = |a: &Tensor, b: &Tensor| {
            (a - b)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f64>()
                .unwrap()
        };
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
            assert!(err(&y, &r) < 1e-10);
            let proj = Tensor::randn(0f64, 1.0, (b, cout, h, w), &dev).unwrap();
            let gy = (&y * &proj).unwrap().sum_all().unwrap().backward().unwrap();
            let gr = (&r * &proj).unwrap().sum_all().unwrap().backward().unwrap();
            for t in [&x, &wt] {
                assert!(
                    err(gy.get(t).unwrap(), gr.get(t).unwrap()) < 1e-10,
                    "{:?}",
                    t.dims()
                );
            }
            if with_bias {
                assert!(err(gy.get(&bias).unwrap(), gr.get(&bias).unwrap()) < 1e-10);
            }
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

impl PointwiseConv {
    fn forward(x: &Tensor, w: &Tensor) -> Result<Tensor> {
        let (b, _, hw) = x.dims3()?;
        let (g, og, ig) = w.dims3()?;
        let per_image = (0..b)
            .map(|i| {
                w.matmul(&x.get(i)?.reshape((g, ig, hw))?)?
                    .reshape((g * og, hw))
            })
            .collect::<Result<Vec<_>>>()?;
        Tensor::stack(&per_image, 0)
    }
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
        let dev = candle_core::Device::Cpu;
        let (b, _, hw) = l1.shape().dims3()?;
        let (g, og, _) = l2.shape().dims3()?;
        let what = "pointwise conv";
        macro_rules! run {
            ($x:expr, $w:expr, $bias:expr, $t:ty) => {{
                let x = Tensor::from_slice(super::contiguous($x, l1, what)?, l1.shape(), &dev)?;
                let w = Tensor::from_slice(super::contiguous($w, l2, what)?, l2.shape(), &dev)?;
                let y = Self::forward(&x, &w)?.flatten_all()?.to_vec1::<$t>()?;
                if self.has_bias {
                    kernel(
                        &y,
                        super::contiguous($bias, l3, what)?,
                        g * og,
                        hw,
                        Kind::Add,
                    )
                } else {
                    y
                }
            }};
        }
        let res = match (s1, s2, s3) {
            (CpuStorage::F32(x), CpuStorage::F32(w), CpuStorage::F32(bb)) => {
                CpuStorage::F32(run!(x, w, bb, f32))
            }
            (CpuStorage::F64(x), CpuStorage::F64(w), CpuStorage::F64(bb)) => {
                CpuStorage::F64(run!(x, w, bb, f64))
            }
            _ => candle_core::bail!("{what}: expected matching f32/f64, got {:?}", s1.dtype()),
        };
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
        let (b, _, hw) = x.dims3()?;
        let (g, og, ig) = w.dims3()?;
        let wt = super::transpose_last2(&w)?; // (G, ig, og)
        let mut gx = Vec::with_capacity(b);
        let mut gw: Option<Tensor> = None;
        for i in 0..b {
            let gyi = gy.get(i)?.reshape((g, og, hw))?;
            gx.push(wt.matmul(&gyi)?.reshape((g * ig, hw))?);
            let xi = x.get(i)?.reshape((g, ig, hw))?;
            let gwi = gyi.matmul(&xi.transpose(1, 2)?)?;
            gw = Some(match gw {
                None => gwi,
                Some(a) => (a + gwi)?,
            });
        }
        let gb = if self.has_bias {
            Some(gy.sum(2)?.sum(0)?)
        } else {
            None
        };
        Ok((Some(Tensor::stack(&gx, 0)?), gw, gb))
    }
}

/// 1x1 convolution (optionally grouped) with optional bias, `x` `(B, C_in, H·W)`, `w`
/// `(groups, C_out/groups, C_in/groups)`, `b` `(C_out,)` → `(B, C_out, H·W)`; output channel
/// `o` of group `o / (C_out/groups)` reads that group's input channels, as PyTorch's grouped
/// conv. CPU f32/f64 only (callers fall back to matmul elsewhere).
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
