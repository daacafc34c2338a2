//! `conv(x, w) + b`, optionally followed by a ReLU, as one op (mmcv's `ConvModule` without a
//! norm layer: the RPN conv, the FCN mask head's convs).
//!
//! As a composition (conv, then [`crate::ops::add_bias_channels`], then `relu`) the graph keeps
//! three `(B, C_out, OH, OW)` tensors per layer: the product, the biased map and the activation,
//! although the backward needs none but the last (the ReLU's mask is `y > 0` of its own output).
//! This op keeps only its inputs and its output, as PyTorch's in-place ReLU after a conv does:
//! for Mask R-CNN's mask head on 256 RoIs that is two 51 MB maps fewer per conv layer.

use super::{candle_conv2d, conv_grads, ConvDims, ConvGemm, UnfoldParams};
use crate::kernel::KernelFloat;
use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

struct ConvBiasAct {
    conv: ConvGemm,
    relu: bool,
}

impl ConvBiasAct {
    fn run<T: KernelFloat + num_traits::Float>(
        &self,
        x: &[T],
        w: &[T],
        b: &[T],
        lx: &Layout,
        lw: &Layout,
    ) -> Result<(Vec<T>, Shape)> {
        let d = ConvDims::new(lx.shape().dims4()?, lw.shape().dims4()?, 0, self.conv.p)?;
        if b.len() != d.oc {
            candle_core::bail!(
                "conv2d_gemm_bias_act: bias of {} elements for {} output channels",
                b.len(),
                d.oc
            );
        }
        let mut y = self.conv.forward(&d, x, w, None);
        y.par_chunks_mut(d.l().max(1))
            .enumerate()
            .for_each(|(i, plane)| {
                let bias = b[i % d.oc];
                if self.relu {
                    plane
                        .iter_mut()
                        .for_each(|v| *v = (*v + bias).max(T::zero()));
                } else {
                    plane.iter_mut().for_each(|v| *v = *v + bias);
                }
            });
        Ok((y, Shape::from((d.b, d.oc, d.g1.oh, d.g1.ow))))
    }
}

impl CustomOp3 for ConvBiasAct {
    fn name(&self) -> &'static str {
        "conv2d-gemm-bias-act"
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
        crate::cpu_float!(raw "conv2d_gemm_bias_act"; x = (s1, l1), w = (s2, l2), b = (s3, l3) => {
            let (v, s) = self.run(x, w, b, l1, l2)?;
            Ok((crate::kernel::owned(v), s))
        })
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _b: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let g = if self.relu {
            grad.contiguous()?
                .apply_op2_no_bwd(&res.detach(), &ReluMask)?
        } else {
            grad.detach().contiguous()?
        };
        let gb = g.sum(3)?.sum(2)?.sum(0)?;
        let (gx, gw) = conv_grads(self.conv, 0, x, w, &g)?;
        Ok((Some(gx), Some(gw), Some(gb)))
    }
}

/// `(dY, Y) → dY · [Y > 0]`: the gradient through a ReLU from its output.
struct ReluMask;

impl CustomOp2 for ReluMask {
    fn name(&self) -> &'static str {
        "relu-mask"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        if l1.shape() != l2.shape() {
            candle_core::bail!(
                "relu mask: gradient {:?}, output {:?}",
                l1.shape(),
                l2.shape()
            );
        }
        crate::cpu_float!(raw "relu_mask"; g = (s1, l1), y = (s2, l2) => {
            let v = crate::kernel::map_binary(g, y, |g, y| {
                if y > num_traits::Zero::zero() { g } else { num_traits::Zero::zero() }
            });
            Ok((crate::kernel::owned(v), l1.shape().clone()))
        })
    }
}

/// `conv(x, w) + b[c]`, then `max(·, 0)` when `relu`, for a dense (`groups = 1`) convolution with
/// `torch.nn.functional.conv2d` semantics: `x (B, C_in, H, W)`, `w (C_out, C_in, KH, KW)`,
/// `b (C_out,)` → `(B, C_out, OH, OW)`. Same values and gradients as [`super::conv2d_gemm`]
/// followed by [`crate::ops::add_bias_channels`] and `relu` (which is what runs where our kernel
/// does not), keeping only the output for the backward.
///
/// Errors: as [`super::conv2d_gemm`], plus a bias whose length is not `C_out`.
pub fn conv2d_gemm_bias_act(
    x: &Tensor,
    w: &Tensor,
    b: &Tensor,
    (stride, padding, dilation): (usize, usize, usize),
    relu: bool,
) -> Result<Tensor> {
    let c = x.dims4()?.1;
    let (oc, ic, kh, kw) = w.dims4()?;
    if ic != c || b.dims() != [oc] {
        candle_core::bail!(
            "conv2d_gemm_bias_act: input {:?}, weight {:?}, bias {:?}",
            x.dims(),
            w.dims(),
            b.dims()
        );
    }
    if !crate::ops::dispatch::select(&crate::ops::dispatch::CONV2D_GEMM_BIAS_ACT, x).is_ours() {
        let y = candle_conv2d(x, w, stride, padding, dilation, 1)?;
        let y = crate::ops::add_bias_channels(&y, b)?;
        return if relu { y.relu() } else { Ok(y) };
    }
    let p = UnfoldParams {
        kernel: (kh, kw),
        stride,
        padding,
        dilation,
    };
    x.contiguous()?.apply_op3(
        &w.contiguous()?,
        &b.contiguous()?,
        ConvBiasAct {
            conv: ConvGemm::new(p),
            relu,
        },
    )
}
