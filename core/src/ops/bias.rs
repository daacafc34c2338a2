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
