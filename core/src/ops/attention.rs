//! Scaled dot-product attention that keeps no `N × N` matrix for the backward.
//!
//! `softmax(q kᵀ · scale) v` composed of candle ops keeps the scores and the probabilities of
//! every attention layer alive until the backward ends (candle's graph holds each op's inputs):
//! for SMT-T's stage-3 MSA blocks at 640², batch 2, that is 2 × 164 MB per block. This op stores
//! only its inputs and output and recomputes the probabilities in the backward, the memory
//! behaviour of FlashAttention (Dao et al. 2022, §3.1 "recomputation") without its tiling. Its
//! gradient follows the same derivation: with `P = softmax(S)`, `O = P V`, `dO` given,
//! `dV = Pᵀ dO`, `dP = dO Vᵀ`, `dS = P ⊙ (dP − rowsum(dO ⊙ O))`, `dQ = scale · dS K`,
//! `dK = scale · dSᵀ Q`.

use super::{softmax_last_dim, transpose_last2};
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor, D};

struct Sdpa {
    scale: f64,
}

/// A CPU operand as a standalone (copied) tensor, so candle's kernels can run inside `cpu_fwd`.
fn operand(s: &CpuStorage, l: &Layout, what: &str) -> Result<Tensor> {
    let dev = candle_core::Device::Cpu;
    match s {
        CpuStorage::F32(v) => Tensor::from_slice(super::contiguous(v, l, what)?, l.shape(), &dev),
        CpuStorage::F64(v) => Tensor::from_slice(super::contiguous(v, l, what)?, l.shape(), &dev),
        _ => candle_core::bail!("{what}: expected f32 or f64, got {:?}", s.dtype()),
    }
}

impl Sdpa {
    /// Probabilities `(B', N, M)` for one batch slice; `q` `(B', N, d)`, `k` `(B', M, d)`.
    fn probs(&self, q: &Tensor, k: &Tensor) -> Result<Tensor> {
        softmax_last_dim(&(q * self.scale)?.matmul(&transpose_last2(k)?)?)
    }
}

impl CustomOp3 for Sdpa {
    fn name(&self) -> &'static str {
        "scaled-dot-product-attention"
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
        let q = operand(s1, l1, "attention: q")?;
        let k = operand(s2, l2, "attention: k")?;
        let v = operand(s3, l3, "attention: v")?;
        let (b, h, n, _) = q.dims4()?;
        let dv = v.dim(3)?;
        // One batch element at a time bounds the transient N × M matrices.
        let outs = (0..b)
            .map(|i| {
                let (qi, ki, vi) = (q.get(i)?, k.get(i)?, v.get(i)?);
                self.probs(&qi, &ki)?.matmul(&vi)
            })
            .collect::<Result<Vec<_>>>()?;
        let o = Tensor::stack(&outs, 0)?.flatten_all()?;
        let st = match o.dtype() {
            candle_core::DType::F32 => CpuStorage::F32(o.to_vec1::<f32>()?),
            candle_core::DType::F64 => CpuStorage::F64(o.to_vec1::<f64>()?),
            d => candle_core::bail!("attention: expected f32 or f64, got {d:?}"),
        };
        Ok((st, Shape::from((b, h, n, dv))))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        out: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (q, k, v, out) = (q.detach(), k.detach(), v.detach(), out.detach());
        let grad = grad.contiguous()?;
        let b = q.dim(0)?;
        let (mut gq, mut gk, mut gv) = (Vec::new(), Vec::new(), Vec::new());
        for i in 0..b {
            let (qi, ki, vi, oi, go) = (q.get(i)?, k.get(i)?, v.get(i)?, out.get(i)?, grad.get(i)?);
            let p = self.probs(&qi, &ki)?; // (h, N, M)
                                           // Transposes only on the thin (·, d) operands: gemm on a transposed N × M view is slow.
            gv.push(transpose_last2(&transpose_last2(&go)?.matmul(&p)?)?);
            let dp = go.matmul(&transpose_last2(&vi)?)?;
            let row = (&go * &oi)?.sum_keepdim(D::Minus1)?; // (h, N, 1)
            let ds = (p * dp.broadcast_sub(&row)?)?;
            gq.push((ds.matmul(&ki)? * self.scale)?);
            gk.push((transpose_last2(&transpose_last2(&qi)?.matmul(&ds)?)? * self.scale)?);
        }
        Ok((
            Some(Tensor::stack(&gq, 0)?),
            Some(Tensor::stack(&gk, 0)?),
            Some(Tensor::stack(&gv, 0)?),
        ))
    }
}

/// `softmax(q kᵀ · scale) v` per batch element and head: `q` `(B, heads, N, d)`, `k`
/// `(B, heads, M, d)`, `v` `(B, heads, M, d_v)` → `(B, heads, N, d_v)`, f32 or f64.
/// Same values as the composed candle ops (to summation order); differentiable in all three
/// inputs, with the `N × M` probabilities recomputed in the backward instead of stored.
///
/// Errors: non-4-D operands, mismatched batch/head/length/feature dims, non-float dtypes.
pub fn scaled_dot_product_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
) -> Result<Tensor> {
    let (b, h, _, d) = q.dims4()?;
    let (bk, hk, m, dk) = k.dims4()?;
    let (bv, hv, mv, _) = v.dims4()?;
    if (bk, hk, dk) != (b, h, d) || (bv, hv, mv) != (b, h, m) {
        candle_core::bail!(
            "attention: shapes q {:?}, k {:?}, v {:?} do not match",
            q.dims(),
            k.dims(),
            v.dims()
        );
    }
    if q.dtype() != k.dtype() || q.dtype() != v.dtype() {
        candle_core::bail!("attention: q, k, v dtypes differ");
    }
    if !q.device().is_cpu() || !matches!(q.dtype(), DType::F32 | DType::F64) {
        return composed(q, k, v, scale);
    }
    q.contiguous()?
        .apply_op3(&k.contiguous()?, &v.contiguous()?, Sdpa { scale })
}

/// The same attention from candle ops (keeps the scores and probabilities for the backward):
/// the path on devices without a kernel of ours, and the reference of the tests.
fn composed(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64) -> Result<Tensor> {
    let s = (q.matmul(&k.transpose(D::Minus2, D::Minus1)?.contiguous()?)? * scale)?;
    candle_nn::ops::softmax(&s, D::Minus1)?.matmul(&v.contiguous()?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn randn(shape: &[usize], seed: u64) -> Tensor {
        let n: usize = shape.iter().product();
        let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15).wrapping_add(7);
        let v: Vec<f64> = (0..n)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((s >> 11) as f64 / (1u64 << 53) as f64) * 2.0 - 1.0
            })
            .collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    /// Values and all three gradients equal the composed candle ops (f64: 1e-10, only summation
    /// order differs).
    #[test]
    fn matches_composed_ops() {
        let q = Var::from_tensor(&randn(&[2, 3, 5, 4], 1)).unwrap();
        let k = Var::from_tensor(&randn(&[2, 3, 7, 4], 2)).unwrap();
        let v = Var::from_tensor(&randn(&[2, 3, 7, 6], 3)).unwrap();
        let scale = 0.5;
        let ours = scaled_dot_product_attention(&q, &k, &v, scale).unwrap();
        // The fallback of other devices is the reference.
        let refr = composed(&q, &k, &v, scale).unwrap();
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
        assert!(err(&ours, &refr) < 1e-10);
        let proj = randn(ours.dims(), 4);
        let go = (&ours * &proj)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let gr = (&refr * &proj)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        for t in [&q, &k, &v] {
            assert!(
                err(go.get(t).unwrap(), gr.get(t).unwrap()) < 1e-10,
                "{:?}",
                t.dims()
            );
        }
    }

    #[test]
    fn rejects_mismatched_shapes() {
        let q = randn(&[1, 2, 3, 4], 1);
        let k = randn(&[1, 2, 3, 5], 2);
        assert!(scaled_dot_product_attention(&q, &k, &k, 1.0).is_err());
    }
}
