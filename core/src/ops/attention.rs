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

use super::softmax::{softmax_in_place, softmax_last_dim, FastExp};
use super::transpose::transpose_last2;
use crate::kernel::{gemm_into_ex, KernelFloat, MatView};
use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor, D};
use rayon::prelude::*;

struct Sdpa {
    scale: f64,
}

/// A CPU operand as a standalone (copied) tensor, so candle's kernels can run inside `cpu_fwd`.
fn operand(s: &CpuStorage, l: &Layout, what: &str) -> Result<Tensor> {
    let dev = candle_core::Device::Cpu;
    crate::cpu_float!(raw what; v = (s, l) => Tensor::from_slice(v, l.shape(), &dev))
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
    if !super::dispatch::select(&super::dispatch::SCALED_DOT_PRODUCT_ATTENTION, q).is_ours() {
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

/// Sizes of a token attention: batch, query and key tokens, heads, head width.
#[derive(Debug, Clone, Copy)]
struct TokGeo {
    b: usize,
    n: usize,
    m: usize,
    heads: usize,
    d: usize,
}

impl TokGeo {
    fn c(&self) -> usize {
        self.heads * self.d
    }
    /// Head `h` of image `bi` in `q` `(B, N, C)`: an `N × d` view with row stride `C`.
    fn q(&self, bi: usize, h: usize) -> MatView {
        MatView::rows_of(
            self.n,
            self.d,
            bi * self.n * self.c() + h * self.d,
            self.c(),
        )
    }
    /// Keys of head `h` in `kv` `(B, M, 2C)`: `M × d`, row stride `2C`.
    fn k(&self, bi: usize, h: usize) -> MatView {
        MatView::rows_of(
            self.m,
            self.d,
            bi * self.m * 2 * self.c() + h * self.d,
            2 * self.c(),
        )
    }
    /// Values of head `h` in `kv`: the second half of each row.
    fn v(&self, bi: usize, h: usize) -> MatView {
        MatView::rows_of(
            self.m,
            self.d,
            bi * self.m * 2 * self.c() + self.c() + h * self.d,
            2 * self.c(),
        )
    }
}

/// Multi-head attention on token layouts, `softmax(scale · Q Kᵀ) V` per head, reading the heads
/// as strided views of `q` `(B, N, C)` and `kv` `(B, M, 2C)` (keys in the first `C` channels,
/// values in the last, head `h` at channels `h·d..(h+1)·d` of each) and writing `(B, N, C)`: no
/// head-split copies of the inputs or head-merge copy of the output. Keeps no `N × M` matrix for
/// the backward (recomputed there, as [`Sdpa`]).
struct TokenAttention {
    heads: usize,
    scale: f64,
}

impl TokenAttention {
    fn geo(&self, q: &Shape, kv: &Shape) -> Result<TokGeo> {
        let (b, n, c) = q.dims3()?;
        let (bk, m, c2) = kv.dims3()?;
        if self.heads == 0 || c % self.heads != 0 || bk != b || c2 != 2 * c {
            candle_core::bail!(
                "token attention: q {:?}, kv {:?} with {} heads (need kv (B, M, 2C), C divisible by heads)",
                q.dims(),
                kv.dims(),
                self.heads
            );
        }
        Ok(TokGeo {
            b,
            n,
            m,
            heads: self.heads,
            d: c / self.heads,
        })
    }

    /// `P = softmax(scale · Q Kᵀ)` of one head, `(N, M)`.
    fn probs<T: KernelFloat + FastExp>(
        &self,
        g: &TokGeo,
        q: &[T],
        kv: &[T],
        bi: usize,
        h: usize,
    ) -> Vec<T> {
        let mut p = vec![T::zero(); g.n * g.m];
        gemm_into_ex(
            &mut p,
            MatView::rows_of(g.n, g.m, 0, g.m),
            false,
            q,
            g.q(bi, h),
            kv,
            g.k(bi, h).t(),
            T::from(self.scale).unwrap_or_else(T::one),
            false,
        );
        p.chunks_mut(g.m).for_each(softmax_in_place);
        p
    }

    fn forward<T: KernelFloat + FastExp>(&self, g: &TokGeo, q: &[T], kv: &[T]) -> Vec<T> {
        let c = g.c();
        let heads: Vec<Vec<T>> = (0..g.b * g.heads)
            .into_par_iter()
            .map(|j| {
                let (bi, h) = (j / g.heads, j % g.heads);
                let p = self.probs(g, q, kv, bi, h);
                let mut o = vec![T::zero(); g.n * g.d];
                gemm_into_ex(
                    &mut o,
                    MatView::rows_of(g.n, g.d, 0, g.d),
                    false,
                    &p,
                    MatView::rows_of(g.n, g.m, 0, g.m),
                    kv,
                    g.v(bi, h),
                    T::one(),
                    false,
                );
                o
            })
            .collect();
        let mut out = crate::kernel::zeroed(g.b * g.n * c);
        out.par_chunks_mut(c).enumerate().for_each(|(r, row)| {
            let (bi, t) = (r / g.n, r % g.n);
            for h in 0..g.heads {
                row[h * g.d..(h + 1) * g.d]
                    .copy_from_slice(&heads[bi * g.heads + h][t * g.d..(t + 1) * g.d]);
            }
        });
        out
    }

    /// `(dq (B, N, C), dkv (B, M, 2C))` for the output `o` and its gradient `go`, both `(B, N, C)`.
    fn backward<T: KernelFloat + FastExp>(
        &self,
        g: &TokGeo,
        q: &[T],
        kv: &[T],
        o: &[T],
        go: &[T],
    ) -> (Vec<T>, Vec<T>) {
        let c = g.c();
        let scale = T::from(self.scale).unwrap_or_else(T::one);
        let dn = MatView::rows_of(g.n, g.d, 0, g.d);
        let dm = MatView::rows_of(g.m, g.d, 0, g.d);
        let nm = MatView::rows_of(g.n, g.m, 0, g.m);
        let per_head: Vec<(Vec<T>, Vec<T>, Vec<T>)> = (0..g.b * g.heads)
            .into_par_iter()
            .map(|j| {
                let (bi, h) = (j / g.heads, j % g.heads);
                let gov = g.q(bi, h); // dO and O of this head share q's layout
                let p = self.probs(g, q, kv, bi, h);
                // dV = Pᵀ dO.
                let mut dv = vec![T::zero(); g.m * g.d];
                gemm_into_ex(&mut dv, dm, false, &p, nm.t(), go, gov, T::one(), false);
                // dP = dO Vᵀ; dS = P ⊙ (dP − rowsum(dO ⊙ O)).
                let mut ds = vec![T::zero(); g.n * g.m];
                gemm_into_ex(
                    &mut ds,
                    nm,
                    false,
                    go,
                    gov,
                    kv,
                    g.v(bi, h).t(),
                    T::one(),
                    false,
                );
                for t in 0..g.n {
                    let at = gov.offset + t * gov.rs;
                    let mut r = T::zero();
                    for e in 0..g.d {
                        r = r + go[at + e] * o[at + e];
                    }
                    let (dr, pr) = (&mut ds[t * g.m..(t + 1) * g.m], &p[t * g.m..(t + 1) * g.m]);
                    for (x, &pv) in dr.iter_mut().zip(pr) {
                        *x = pv * (*x - r);
                    }
                }
                // dQ = scale · dS K; dK = scale · dSᵀ Q.
                let mut dq = vec![T::zero(); g.n * g.d];
                gemm_into_ex(&mut dq, dn, false, &ds, nm, kv, g.k(bi, h), scale, false);
                let mut dk = vec![T::zero(); g.m * g.d];
                gemm_into_ex(&mut dk, dm, false, &ds, nm.t(), q, g.q(bi, h), scale, false);
                (dq, dk, dv)
            })
            .collect();
        let mut dq = crate::kernel::zeroed(g.b * g.n * c);
        dq.par_chunks_mut(c).enumerate().for_each(|(r, row)| {
            let (bi, t) = (r / g.n, r % g.n);
            for h in 0..g.heads {
                row[h * g.d..(h + 1) * g.d]
                    .copy_from_slice(&per_head[bi * g.heads + h].0[t * g.d..(t + 1) * g.d]);
            }
        });
        let mut dkv = crate::kernel::zeroed(g.b * g.m * 2 * c);
        dkv.par_chunks_mut(2 * c).enumerate().for_each(|(r, row)| {
            let (bi, t) = (r / g.m, r % g.m);
            for h in 0..g.heads {
                let ph = &per_head[bi * g.heads + h];
                row[h * g.d..(h + 1) * g.d].copy_from_slice(&ph.1[t * g.d..(t + 1) * g.d]);
                row[c + h * g.d..c + (h + 1) * g.d].copy_from_slice(&ph.2[t * g.d..(t + 1) * g.d]);
            }
        });
        (dq, dkv)
    }
}

impl CustomOp2 for TokenAttention {
    fn name(&self) -> &'static str {
        "token-attention"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let g = self.geo(l1.shape(), l2.shape())?;
        let what = "token attention";
        let out = crate::cpu_float!(what; q = (s1, l1), kv = (s2, l2) => self.forward(&g, q, kv));
        Ok((out, l1.shape().clone()))
    }

    fn bwd(
        &self,
        q: &Tensor,
        kv: &Tensor,
        out: &Tensor,
        go: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let g = self.geo(q.shape(), kv.shape())?;
        let go = go.contiguous()?;
        let what = "token attention backward";
        // Read through the storage locks: no copies of the saved tensors.
        let (dq, dkv) = crate::cpu_float_tensors!(what; qv = q, kvv = kv, ov = out, gv = go => {
            let (dq, dkv) = self.backward(&g, qv, kvv, ov, gv);
            (
                Tensor::from_vec(dq, q.shape(), q.device())?,
                Tensor::from_vec(dkv, kv.shape(), kv.device())?,
            )
        });
        Ok((Some(dq), Some(dkv)))
    }
}

/// Multi-head attention on tokens, as the official SMT / PVT `Attention` computes it from its
/// `q` and `kv` projections: `q` `(B, N, C)`, `kv` `(B, M, 2C)` (the `kv` linear's output: keys
/// in channels `0..C`, values in `C..2C`, head `h` at `h·d..(h+1)·d`, `d = C / heads`);
/// returns `(B, N, C)`, the heads' `softmax(scale · q kᵀ) v` side by side (the official
/// `(attn @ v).transpose(1, 2).reshape(B, N, C)`).
///
/// On the CPU (f32/f64) one op on the strided heads; elsewhere the head split and
/// [`scaled_dot_product_attention`].
///
/// Errors: `kv` not `(B, M, 2C)`, `C` not divisible by `heads`, mismatched dtypes.
pub fn token_attention(q: &Tensor, kv: &Tensor, heads: usize, scale: f64) -> Result<Tensor> {
    let op = TokenAttention { heads, scale };
    op.geo(q.shape(), kv.shape())?;
    if q.dtype() != kv.dtype() {
        candle_core::bail!("token attention: q and kv dtypes differ");
    }
    if super::dispatch::select(&super::dispatch::TOKEN_ATTENTION, q).is_ours() {
        return q.contiguous()?.apply_op2(&kv.contiguous()?, op);
    }
    token_attention_composed(q, kv, heads, scale)
}

/// The head split / merge around [`scaled_dot_product_attention`] (reference and non-CPU path).
fn token_attention_composed(q: &Tensor, kv: &Tensor, heads: usize, scale: f64) -> Result<Tensor> {
    let (b, n, c) = q.dims3()?;
    let m = kv.dim(1)?;
    let d = c / heads;
    let qh = q.reshape((b, n, heads, d))?.transpose(1, 2)?.contiguous()?;
    let kvh = kv.reshape((b, m, 2, heads, d))?.permute((2, 0, 3, 1, 4))?;
    let k = kvh.get(0)?.contiguous()?;
    let v = kvh.get(1)?.contiguous()?;
    let o = scaled_dot_product_attention(&qh, &k, &v, scale)?;
    o.transpose(1, 2)?.reshape((b, n, c))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Var};

    fn randn(shape: &[usize], seed: u64) -> Tensor {
        densepred_testutil::randn(shape, seed, DType::F64)
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
        densepred_testutil::assert_same_values_and_grads(&ours, &refr, &[&q, &k, &v], 4, 1e-10);
    }

    /// The token op against the head split + [`Sdpa`] composition, in f64 (values and the
    /// gradients of `q` and `kv`), with N ≠ M and 3 heads: the same sums in another order, 1e-10.
    #[test]
    fn token_attention_matches_head_split() {
        let (b, n, m, heads, d) = (2, 5, 7, 3, 4);
        let q = Var::from_tensor(&randn(&[b, n, heads * d], 11)).unwrap();
        let kv = Var::from_tensor(&randn(&[b, m, 2 * heads * d], 12)).unwrap();
        let ours = token_attention(&q, &kv, heads, 0.7).unwrap();
        let refr = token_attention_composed(&q, &kv, heads, 0.7).unwrap();
        densepred_testutil::assert_same_values_and_grads(&ours, &refr, &[&q, &kv], 13, 1e-10);
        assert!(token_attention(&q, &q, heads, 1.0).is_err());
    }

    #[test]
    fn rejects_mismatched_shapes() {
        let q = randn(&[1, 2, 3, 4], 1);
        let k = randn(&[1, 2, 3, 5], 2);
        assert!(scaled_dot_product_attention(&q, &k, &k, 1.0).is_err());
    }
}
