//! Exact-GELU with a vectorisable kernel, and a fast `exp` used by the softmax kernel.
//!
//! candle's `gelu_erf` calls libm's scalar `erff` per element (~2 ns each, 8 ms for the 4M
//! activations of one SMT-T stage-1 FFN at 512²). Here `erf` is evaluated with the rational
//! approximation of Abramowitz & Stegun 7.1.26 refined to the one used by Eigen/XLA for f32
//! (`erf(x) ≈ x·P(x²)/Q(x²)` on `|x| ≤ 4`, clamped beyond), whose error is ≤ 1.5e-7 absolute —
//! below f32's rounding of the GELU output for |x| ≤ 4 and far below the 2.5e-5 parity gate —
//! and in straight-line code the compiler vectorises. f64 inputs use the scalar libm `erf`.

use candle_core::{backend::BackendStorage, CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};
use num_traits::Float;

/// `erf(x)` for f32, rational approximation (Eigen's `generic_fast_erf_float` coefficients),
/// max abs error ~1.5e-7 on the whole real line.
#[inline(always)]
pub fn erf_f32(x: f32) -> f32 {
    let x = x.clamp(-4.0, 4.0);
    let x2 = x * x;
    // Numerator polynomial (odd), in x^2.
    let mut p = -2.726_142_3e-10f32;
    p = p * x2 + 2.770_681_4e-8;
    p = p * x2 + -2.101_024e-6;
    p = p * x2 + -5.692_506_5e-5;
    p = p * x2 + -7.349_906_4e-4;
    p = p * x2 + -2.954_600_5e-3;
    p = p * x2 + -1.609_603_8e-2;
    p *= x;
    // Denominator polynomial, in x^2.
    let mut q = -1.456_607e-5f32;
    q = q * x2 + -2.133_740_5e-4;
    q = q * x2 + -1.682_827_6e-3;
    q = q * x2 + -7.373_329e-3;
    q = q * x2 + -1.426_474_7e-2;
    p / q
}

/// `exp(x)` for f32 with range reduction `x = k·ln2 + r` and a degree-6 polynomial on
/// `|r| ≤ ln2/2`: relative error ≤ 2e-7; returns 0 below −87.3 (underflow), as softmax needs.
#[inline(always)]
pub fn exp_f32(x: f32) -> f32 {
    let x = x.clamp(-87.3, 88.7);
    // Round to nearest by adding and subtracting 1.5·2²³ (no libm call, vectorises).
    const MAGIC: f32 = 12_582_912.0;
    let k = (x * std::f32::consts::LOG2_E + MAGIC) - MAGIC;
    let r = x - k * 0.693_145_75 - k * 1.428_606_8e-6;
    let mut p = 1.987_569_1e-4f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 0.166_666_66;
    p = p * r + 0.5;
    p = p * r * r + r + 1.0;
    f32::from_bits(((k as i32 + 127) as u32) << 23) * p
}

/// Exact (erf) GELU and its derivative, vectorisable in f32 (`torch.nn.GELU()`'s default).
pub trait Act: Float + Send + Sync {
    /// `x·Φ(x)`.
    fn gelu(self) -> Self;
    /// `Φ(x) + x·φ(x)`.
    fn gelu_grad(self) -> Self;
}

impl Act for f32 {
    #[inline(always)]
    fn gelu(self) -> f32 {
        0.5 * self * (1.0 + erf_f32(self * std::f32::consts::FRAC_1_SQRT_2))
    }
    #[inline(always)]
    fn gelu_grad(self) -> f32 {
        let cdf = 0.5 * (1.0 + erf_f32(self * std::f32::consts::FRAC_1_SQRT_2));
        cdf + self * exp_f32(-0.5 * self * self) * 0.398_942_3
    }
}

impl Act for f64 {
    #[inline(always)]
    fn gelu(self) -> f64 {
        0.5 * self * (1.0 + libm::erf(self * std::f64::consts::FRAC_1_SQRT_2))
    }
    #[inline(always)]
    fn gelu_grad(self) -> f64 {
        let cdf = 0.5 * (1.0 + libm::erf(self * std::f64::consts::FRAC_1_SQRT_2));
        cdf + self * (-0.5 * self * self).exp() / (2.0 * std::f64::consts::PI).sqrt()
    }
}

struct GeluErf;

// The outputs are written once (not zeroed first: the zeroing was a separate pass over memory
// in a profile of a Conv2Former step), by plain loops over chunks that the compiler vectorises:
// as a rayon `zip().map().collect()` the gradient ran element by element through the iterator
// adapters, 14% of a Conv2Former-N training step.
fn gelu_f32(v: &[f32]) -> Vec<f32> {
    crate::kernel::map_unary(v, Act::gelu)
}

fn gelu_grad_f32(v: &[f32], g: &[f32]) -> Vec<f32> {
    crate::kernel::map_binary(v, g, |x: f32, g| g * x.gelu_grad())
}

impl CustomOp1 for GeluErf {
    fn name(&self) -> &'static str {
        "gelu-erf-fast"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        match s {
            CpuStorage::F32(v) => Ok((
                CpuStorage::F32(gelu_f32(crate::kernel::contiguous(v, l, "gelu: input")?)),
                l.shape().clone(),
            )),
            _ => candle_core::bail!("gelu: fast kernel is f32 only, got {:?}", s.dtype()),
        }
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, dy: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(x.apply_op2_no_bwd(&dy.contiguous()?, &GeluErfGrad)?))
    }
}

struct GeluErfGrad;

impl candle_core::CustomOp2 for GeluErfGrad {
    fn name(&self) -> &'static str {
        "gelu-erf-fast-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        match (s1, s2) {
            (CpuStorage::F32(x), CpuStorage::F32(g)) => Ok((
                CpuStorage::F32(gelu_grad_f32(
                    crate::kernel::contiguous(x, l1, "gelu grad: x")?,
                    crate::kernel::contiguous(g, l2, "gelu grad: dy")?,
                )),
                l1.shape().clone(),
            )),
            _ => candle_core::bail!("gelu grad: expected f32, got {:?}", s1.dtype()),
        }
    }
}

/// Exact GELU `x·Φ(x) = 0.5·x·(1 + erf(x/√2))` (`torch.nn.GELU()` default), differentiable.
/// CPU f32 uses the vectorisable kernel (erf error ≤ 1.5e-7); elsewhere it is composed from
/// candle's `erf`, whose backward is exact (candle's fused `gelu_erf` rounds `1/√(2π)` to
/// 0.398942 in its backward, a 7e-7 relative error in every gradient).
pub fn gelu_erf(x: &Tensor) -> Result<Tensor> {
    if super::dispatch::select(&super::dispatch::GELU_ERF, x).is_ours() {
        x.contiguous()?.apply_op1(GeluErf)
    } else {
        let cdf = ((x * std::f64::consts::FRAC_1_SQRT_2)?.erf()? + 1.0)?;
        (x * cdf)? * 0.5
    }
}
