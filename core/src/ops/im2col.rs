//! im2col / col2im and the dense convolution built on them.
//!
//! candle 0.11's CPU `conv2d` backward computes the input gradient with a direct
//! `conv_transpose2d` (one dot product per output pixel and tap) and the weight gradient as a
//! convolution with the batch as channels; for the 3x3 256-channel towers of RetinaNet/ATSS heads
//! that is several times slower than the forward. Here a dense convolution is
//! `W (C_out, C_in·K·K) @ unfold(x) (C_in·K·K, B·OH·OW)`: forward and both gradients become GEMMs
//! (candle's `matmul`, parallel `gemm`) plus an `unfold` whose backward is `fold` (col2im).
//! This is the lowering PyTorch's CPU `slow_conv2d` uses too (`aten/src/ATen/native/ConvolutionMM2d.cpp`).

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

/// Geometry of an unfold: input `(B, C, H, W)`, square-or-not kernel `(KH, KW)`, equal stride,
/// padding and dilation on both axes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UnfoldParams {
    /// Kernel height and width in taps.
    pub kernel: (usize, usize),
    /// Stride in input pixels.
    pub stride: usize,
    /// Zero padding on each side, in input pixels.
    pub padding: usize,
    /// Spacing between kernel taps, in input pixels.
    pub dilation: usize,
}

#[derive(Debug, Clone, Copy)]
struct Geom {
    b: usize,
    c: usize,
    h: usize,
    w: usize,
    kh: usize,
    kw: usize,
    oh: usize,
    ow: usize,
    s: usize,
    p: usize,
    d: usize,
}

impl Geom {
    fn new(b: usize, c: usize, h: usize, w: usize, p: UnfoldParams) -> Result<Self> {
        let (kh, kw) = p.kernel;
        if p.stride == 0 || p.dilation == 0 || kh == 0 || kw == 0 {
            candle_core::bail!("unfold: kernel, stride and dilation must be >= 1, got {p:?}");
        }
        let out = |len: usize, k: usize, axis: &str| -> Result<usize> {
            let span = p.dilation * (k - 1) + 1;
            if len + 2 * p.padding < span {
                candle_core::bail!(
                    "unfold: kernel span {span} exceeds padded input {} along {axis}",
                    len + 2 * p.padding
                );
            }
            Ok((len + 2 * p.padding - span) / p.stride + 1)
        };
        Ok(Self {
            b,
            c,
            h,
            w,
            kh,
            kw,
            oh: out(h, kh, "height")?,
            ow: out(w, kw, "width")?,
            s: p.stride,
            p: p.padding,
            d: p.dilation,
        })
    }

    fn rows(&self) -> usize {
        self.c * self.kh * self.kw
    }

    fn cols(&self) -> usize {
        self.b * self.oh * self.ow
    }

    /// Input coordinate read by output index `o` at tap `k` (None: in the zero padding).
    #[inline]
    fn src(&self, o: usize, k: usize, len: usize) -> Option<usize> {
        let pos = o * self.s + k * self.d;
        if pos < self.p || pos - self.p >= len {
            None
        } else {
            Some(pos - self.p)
        }
    }

    /// The output range `[lo, hi)` along an axis whose taps at `k` land inside the input.
    fn valid_range(&self, k: usize, len: usize, olen: usize) -> (usize, usize) {
        let lo = (0..olen).find(|&o| self.src(o, k, len).is_some());
        match lo {
            None => (0, 0),
            Some(lo) => {
                let hi = (lo..olen)
                    .take_while(|&o| self.src(o, k, len).is_some())
                    .last()
                    .map_or(lo, |o| o + 1);
                (lo, hi)
            }
        }
    }
}

/// `x (B,C,H,W)` contiguous → `cols (C·KH·KW, B·OH·OW)`, row `(c·KH + ky)·KW + kx`, column
/// `(b·OH + oy)·OW + ox`, zeros where the tap falls in the padding.
fn unfold_kernel<T: Copy + Send + Sync + num_traits::Zero>(g: &Geom, x: &[T]) -> Vec<T> {
    let (l, n) = (g.oh * g.ow, g.cols());
    let mut out = vec![T::zero(); g.rows() * n];
    out.par_chunks_mut(n).enumerate().for_each(|(row, dst)| {
        let c = row / (g.kh * g.kw);
        let ky = (row / g.kw) % g.kh;
        let kx = row % g.kw;
        let (x_lo, x_hi) = g.valid_range(kx, g.w, g.ow);
        for bi in 0..g.b {
            let plane = &x[(bi * g.c + c) * g.h * g.w..][..g.h * g.w];
            let dst_b = &mut dst[bi * l..][..l];
            for oy in 0..g.oh {
                let Some(iy) = g.src(oy, ky, g.h) else {
                    continue;
                };
                let src_row = &plane[iy * g.w..][..g.w];
                let dst_row = &mut dst_b[oy * g.ow..][..g.ow];
                if g.s == 1 {
                    if x_hi > x_lo {
                        let ix0 = x_lo + kx * g.d - g.p;
                        dst_row[x_lo..x_hi].copy_from_slice(&src_row[ix0..ix0 + (x_hi - x_lo)]);
                    }
                } else {
                    for ox in x_lo..x_hi {
                        dst_row[ox] = src_row[ox * g.s + kx * g.d - g.p];
                    }
                }
            }
        }
    });
    out
}

/// The adjoint of [`unfold_kernel`] (col2im): `cols (C·KH·KW, B·OH·OW)` → `(B,C,H,W)`, summing
/// every column entry into the input pixel it was read from.
fn fold_kernel<T>(g: &Geom, cols: &[T]) -> Vec<T>
where
    T: Copy + Send + Sync + num_traits::Zero + std::ops::AddAssign,
{
    let (l, n, hw) = (g.oh * g.ow, g.cols(), g.h * g.w);
    let taps = g.kh * g.kw;
    // Channel-major scratch so each thread owns whole channels; then transposed to (B, C, H, W).
    let mut by_c = vec![T::zero(); g.c * g.b * hw];
    by_c.par_chunks_mut(g.b * hw)
        .enumerate()
        .for_each(|(c, dst)| {
            for t in 0..taps {
                let (ky, kx) = (t / g.kw, t % g.kw);
                let src = &cols[(c * taps + t) * n..][..n];
                let (x_lo, x_hi) = g.valid_range(kx, g.w, g.ow);
                for bi in 0..g.b {
                    let src_b = &src[bi * l..][..l];
                    let dst_b = &mut dst[bi * hw..][..hw];
                    for oy in 0..g.oh {
                        let Some(iy) = g.src(oy, ky, g.h) else {
                            continue;
                        };
                        let s_row = &src_b[oy * g.ow..][..g.ow];
                        let d_row = &mut dst_b[iy * g.w..][..g.w];
                        for ox in x_lo..x_hi {
                            d_row[ox * g.s + kx * g.d - g.p] += s_row[ox];
                        }
                    }
                }
            }
        });
    if g.b == 1 {
        return by_c;
    }
    let mut out = vec![T::zero(); g.b * g.c * hw];
    out.par_chunks_mut(hw).enumerate().for_each(|(i, dst)| {
        let (bi, c) = (i / g.c, i % g.c);
        dst.copy_from_slice(&by_c[(c * g.b + bi) * hw..][..hw]);
    });
    out
}

struct Unfold {
    p: UnfoldParams,
}

struct Fold {
    g: Geom,
}

fn dims(l: &Layout) -> Result<(usize, usize, usize, usize)> {
    l.shape().dims4()
}

impl CustomOp1 for Unfold {
    fn name(&self) -> &'static str {
        "unfold"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (b, c, h, w) = dims(l)?;
        let g = Geom::new(b, c, h, w, self.p)?;
        let out = match s {
            CpuStorage::F32(x) => {
                CpuStorage::F32(unfold_kernel(&g, super::contiguous(x, l, "unfold: input")?))
            }
            CpuStorage::F64(x) => {
                CpuStorage::F64(unfold_kernel(&g, super::contiguous(x, l, "unfold: input")?))
            }
            _ => candle_core::bail!("unfold: expected f32 or f64, got {:?}", s.dtype()),
        };
        Ok((out, Shape::from((g.rows(), g.cols()))))
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let (b, c, h, w) = x.dims4()?;
        let g = Geom::new(b, c, h, w, self.p)?;
        Ok(Some(grad.contiguous()?.apply_op1_no_bwd(&Fold { g })?))
    }
}

impl CustomOp1 for Fold {
    fn name(&self) -> &'static str {
        "fold"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let g = self.g;
        if l.shape().dims() != [g.rows(), g.cols()] {
            candle_core::bail!(
                "fold: expected columns ({}, {}), got {:?}",
                g.rows(),
                g.cols(),
                l.shape()
            );
        }
        let out = match s {
            CpuStorage::F32(x) => {
                CpuStorage::F32(fold_kernel(&g, super::contiguous(x, l, "fold: input")?))
            }
            CpuStorage::F64(x) => {
                CpuStorage::F64(fold_kernel(&g, super::contiguous(x, l, "fold: input")?))
            }
            _ => candle_core::bail!("fold: expected f32 or f64, got {:?}", s.dtype()),
        };
        Ok((out, Shape::from((g.b, g.c, g.h, g.w))))
    }
}

/// im2col, `torch.nn.functional.unfold` up to the layout: `x (B, C, H, W)` →
/// `(C·KH·KW, B·OH·OW)` with row `(c·KH + ky)·KW + kx` (the order of a PyTorch conv weight's
/// trailing dims) and column `(b·OH + oy)·OW + ox`; taps in the zero padding read 0.
/// `OH = (H + 2p − d(KH−1) − 1) / s + 1`, likewise `OW`. Differentiable (backward = col2im).
///
/// Errors: a non-4-D or non-float input; kernel span larger than the padded input; zero stride,
/// dilation or kernel size.
pub fn unfold(x: &Tensor, p: UnfoldParams) -> Result<Tensor> {
    x.contiguous()?.apply_op1(Unfold { p })
}

/// The dense convolution as one op: `(x (B,C_in,H,W), w (C_out,C_in,KH,KW)) → (B,C_out,OH,OW)`.
/// Forward lowers to unfold + GEMM; the columns are dropped afterwards and rebuilt from `x` in
/// the backward, so the graph keeps only `x` and `w` (as PyTorch's autograd does for a
/// convolution) instead of a `(C_in·K·K, B·OH·OW)` matrix per layer: for the RetinaNet head at
/// 640² and batch 2 that is ~1.6 GB less memory in training.
struct ConvGemm {
    p: UnfoldParams,
    /// Column budget per block (elements); [`MAX_COLS`] outside tests.
    max_cols: usize,
}

/// Most elements of one unfolded column block (128 MiB of f32): larger convolutions are split
/// over input channels.
const MAX_COLS: usize = 32 << 20;

impl ConvGemm {
    /// Input-channel chunks `(start, len)` whose columns for one image stay within [`MAX_COLS`].
    fn channel_chunks(&self, c: usize, l: usize) -> Vec<(usize, usize)> {
        let (kh, kw) = self.p.kernel;
        let per_channel = (kh * kw * l).max(1);
        let n = (self.max_cols / per_channel).clamp(1, c.max(1));
        (0..c).step_by(n).map(|c0| (c0, n.min(c - c0))).collect()
    }

    /// `Σ_chunks W[:, chunk] (C_out, |chunk|·K·K) @ cols_i[chunk]` for each image `i`, stacked to
    /// `(B, C_out, OH·OW)`; all operands detached. One image and a bounded block of input channels
    /// at a time: unfolded whole, a 3x3 conv over 2048 channels at 128x128 (UperNet's
    /// `fpn_bottleneck` at 512²) needs 1.2 GB of columns per image. Each image's GEMM result is
    /// already in NCHW order.
    fn compute(&self, x: &Tensor, w: &Tensor) -> Result<Tensor> {
        let (b, c, h, wd) = x.dims4()?;
        let (oc, _, kh, kw) = w.dims4()?;
        let g = Geom::new(1, c, h, wd, self.p)?;
        let chunks = self.channel_chunks(c, g.oh * g.ow);
        let ws = chunks
            .iter()
            .map(|&(c0, n)| w.narrow(1, c0, n)?.contiguous()?.reshape((oc, n * kh * kw)))
            .collect::<Result<Vec<_>>>()?;
        let ys = (0..b)
            .map(|i| {
                let xi = x.narrow(0, i, 1)?;
                let mut y: Option<Tensor> = None;
                for (&(c0, n), wc) in chunks.iter().zip(&ws) {
                    let xc = if chunks.len() == 1 {
                        xi.clone()
                    } else {
                        xi.narrow(1, c0, n)?.contiguous()?
                    };
                    let cols = xc.apply_op1_no_bwd(&Unfold { p: self.p })?;
                    let part = wc.matmul(&cols)?; // (C_out, OH·OW)
                    y = Some(match y {
                        None => part,
                        Some(acc) => (acc + part)?,
                    });
                }
                Ok(y.expect("at least one channel chunk"))
            })
            .collect::<Result<Vec<_>>>()?;
        Tensor::stack(&ys, 0)
    }
}

/// A CPU operand of a custom op as a standalone (copied) tensor, so that candle's own kernels
/// (matmul) can run inside `cpu_fwd`.
fn storage_tensor(s: &CpuStorage, l: &Layout, what: &str) -> Result<Tensor> {
    let dev = candle_core::Device::Cpu;
    match s {
        CpuStorage::F32(v) => Tensor::from_slice(super::contiguous(v, l, what)?, l.shape(), &dev),
        CpuStorage::F64(v) => Tensor::from_slice(super::contiguous(v, l, what)?, l.shape(), &dev),
        _ => candle_core::bail!("{what}: expected f32 or f64, got {:?}", s.dtype()),
    }
}

/// The CPU storage of a contiguous tensor computed inside a custom op.
fn tensor_storage(t: &Tensor) -> Result<CpuStorage> {
    let t = t.flatten_all()?;
    Ok(match t.dtype() {
        candle_core::DType::F32 => CpuStorage::F32(t.to_vec1::<f32>()?),
        candle_core::DType::F64 => CpuStorage::F64(t.to_vec1::<f64>()?),
        d => candle_core::bail!("expected f32 or f64, got {d:?}"),
    })
}

impl candle_core::CustomOp2 for ConvGemm {
    fn name(&self) -> &'static str {
        "conv2d-gemm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        if s1.dtype() != s2.dtype() {
            candle_core::bail!(
                "conv2d_gemm: input {:?} and weight {:?} dtypes differ",
                s1.dtype(),
                s2.dtype()
            );
        }
        let x = storage_tensor(s1, l1, "conv2d_gemm: input")?;
        let w = storage_tensor(s2, l2, "conv2d_gemm: weight")?;
        let (b, c, h, wd) = x.dims4()?;
        let g = Geom::new(b, c, h, wd, self.p)?;
        let y = self.compute(&x, &w)?;
        Ok((tensor_storage(&y)?, Shape::from((b, w.dim(0)?, g.oh, g.ow))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (b, c, h, wd) = x.dims4()?;
        let (oc, _, kh, kw) = w.dims4()?;
        let l = {
            let g = Geom::new(1, c, h, wd, self.p)?;
            g.oh * g.ow
        };
        let chunks = self.channel_chunks(c, l);
        let x = x.detach();
        let w = w.detach();
        let grad = grad.detach();
        // Per image and channel chunk (see `compute`): dW[:, chunk] = Σ_i dY_i @ cols_i[chunk]ᵀ,
        // dX_i[chunk] = fold(W[:, chunk]ᵀ @ dY_i).
        let mut gws: Vec<Option<Tensor>> = vec![None; chunks.len()];
        let mut gxs = Vec::with_capacity(b);
        for i in 0..b {
            let gy = grad.narrow(0, i, 1)?.reshape((oc, l))?;
            let xi = x.narrow(0, i, 1)?;
            let mut parts = Vec::with_capacity(chunks.len());
            for (k, &(c0, n)) in chunks.iter().enumerate() {
                let xc = if chunks.len() == 1 {
                    xi.clone()
                } else {
                    xi.narrow(1, c0, n)?.contiguous()?
                };
                let cols = xc.apply_op1_no_bwd(&Unfold { p: self.p })?;
                let gwi = gy.matmul(&cols.t()?)?;
                drop(cols);
                gws[k] = Some(match gws[k].take() {
                    None => gwi,
                    Some(a) => (a + gwi)?,
                });
                let wc = w
                    .narrow(1, c0, n)?
                    .contiguous()?
                    .reshape((oc, n * kh * kw))?;
                let gcols = wc.t()?.matmul(&gy)?;
                let g = Geom::new(1, n, h, wd, self.p)?;
                parts.push(gcols.apply_op1_no_bwd(&Fold { g })?);
            }
            gxs.push(if parts.len() == 1 {
                parts.remove(0)
            } else {
                Tensor::cat(&parts, 1)?
            });
        }
        let gws = gws
            .into_iter()
            .zip(&chunks)
            .map(|(g, &(_, n))| {
                g.expect("a batch of at least one image")
                    .reshape((oc, n, kh, kw))
            })
            .collect::<Result<Vec<_>>>()?;
        let gw = if gws.len() == 1 {
            gws[0].clone()
        } else {
            Tensor::cat(&gws, 1)?
        };
        let gx = Tensor::cat(&gxs, 0)?;
        Ok((Some(gx), Some(gw)))
    }
}

/// Dense (`groups = 1`) 2-D convolution, `torch.nn.functional.conv2d` semantics, lowered to
/// [`unfold`] + GEMM, with both gradients GEMMs as well (the unfolded input is recomputed in the
/// backward rather than kept): `x (B, C_in, H, W)`, `w (C_out, C_in, KH, KW)` →
/// `(B, C_out, OH, OW)` (no bias). Input rows/columns that a stride leaves unread get a zero
/// gradient, as in PyTorch.
///
/// Errors: channel or dtype mismatch between `x` and `w`, and the [`unfold`] errors.
pub fn conv2d_gemm(
    x: &Tensor,
    w: &Tensor,
    stride: usize,
    padding: usize,
    dilation: usize,
) -> Result<Tensor> {
    let c = x.dims4()?.1;
    let (_, ic, kh, kw) = w.dims4()?;
    if ic != c {
        candle_core::bail!(
            "conv2d_gemm: input has {c} channels, weight {:?} expects {ic}",
            w.dims()
        );
    }
    let p = UnfoldParams {
        kernel: (kh, kw),
        stride,
        padding,
        dilation,
    };
    x.contiguous()?.apply_op2(
        &w.contiguous()?,
        ConvGemm {
            p,
            max_cols: MAX_COLS,
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn randn(shape: &[usize], seed: u64) -> Tensor {
        let n: usize = shape.iter().product();
        let mut s = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
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

    /// Forward equals candle's direct conv2d and gradients equal candle's conv2d backward (both in
    /// f64, where the only difference is summation order: 1e-10).
    #[test]
    fn matches_candle_conv2d_values_and_gradients() {
        for &(b, c, oc, h, w, k, s, p, d) in &[
            (
                2usize, 3usize, 4usize, 7usize, 9usize, 3usize, 1usize, 1usize, 1usize,
            ),
            (1, 2, 3, 8, 8, 3, 2, 1, 1),
            (2, 2, 2, 9, 7, 3, 2, 1, 1), // odd sizes: last row/col unread by the stride
            (1, 3, 2, 10, 10, 3, 1, 2, 2),
            (2, 2, 3, 6, 5, 1, 1, 0, 1),
            (1, 2, 2, 5, 5, 5, 1, 0, 1),
        ] {
            let x = Var::from_tensor(&randn(&[b, c, h, w], 1)).unwrap();
            let wt = Var::from_tensor(&randn(&[oc, c, k, k], 2)).unwrap();
            let ours = conv2d_gemm(&x, &wt, s, p, d).unwrap();
            // Reference: candle's conv2d on an explicitly padded and cropped input (its own
            // backward mis-shapes gradients when the stride leaves rows unread).
            let span = d * (k - 1) + 1;
            let (rh, rw) = ((h + 2 * p - span) % s, (w + 2 * p - span) % s);
            let xp = x
                .pad_with_zeros(2, p, p)
                .unwrap()
                .pad_with_zeros(3, p, p)
                .unwrap()
                .narrow(2, 0, h + 2 * p - rh)
                .unwrap()
                .narrow(3, 0, w + 2 * p - rw)
                .unwrap();
            let refr = xp.conv2d(&wt, 0, s, d, 1).unwrap();
            assert_eq!(ours.dims(), refr.dims());
            let diff = (&ours - &refr).unwrap().abs().unwrap().max_all().unwrap();
            assert!(diff.to_scalar::<f64>().unwrap() < 1e-10);
            let proj = randn(ours.dims(), 3);
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
            for v in [&x, &wt] {
                let a = go.get(v).unwrap();
                let r = gr.get(v).unwrap();
                let e = (a - r).unwrap().abs().unwrap().max_all().unwrap();
                assert!(
                    e.to_scalar::<f64>().unwrap() < 1e-10,
                    "grad mismatch for {:?} case {:?}",
                    v.dims(),
                    (b, c, oc, h, w, k, s, p, d)
                );
            }
        }
    }

    /// fold is the adjoint of unfold: <unfold(x), y> == <x, fold(y)>.
    /// Splitting the input channels into blocks (what large convolutions do) changes nothing:
    /// values and both gradients equal the single-block computation (f64, 1e-12).
    #[test]
    fn channel_blocks_match_single_block() {
        let p = UnfoldParams {
            kernel: (3, 3),
            stride: 1,
            padding: 1,
            dilation: 1,
        };
        let x = Var::from_tensor(&randn(&[2, 7, 6, 5], 3)).unwrap();
        let w = Var::from_tensor(&randn(&[4, 7, 3, 3], 4)).unwrap();
        let run = |max_cols: usize| {
            let y = x
                .as_tensor()
                .apply_op2(w.as_tensor(), ConvGemm { p, max_cols })
                .unwrap();
            let loss = (&y * &y).unwrap().sum_all().unwrap();
            let g = loss.backward().unwrap();
            (
                y,
                g.get(x.as_tensor()).unwrap().clone(),
                g.get(w.as_tensor()).unwrap().clone(),
            )
        };
        let whole = run(MAX_COLS);
        // 3 channels' columns (3·9·30) per block: blocks of 3, 3 and 1 channels.
        let split = run(3 * 9 * 30);
        for (a, b) in [
            (&whole.0, &split.0),
            (&whole.1, &split.1),
            (&whole.2, &split.2),
        ] {
            let d = (a - b)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f64>()
                .unwrap();
            assert!(d < 1e-12, "max diff {d}");
        }
    }

    #[test]
    fn fold_is_adjoint_of_unfold() {
        let p = UnfoldParams {
            kernel: (3, 2),
            stride: 2,
            padding: 1,
            dilation: 2,
        };
        let x = randn(&[2, 3, 9, 8], 4);
        let u = unfold(&x, p).unwrap();
        let y = randn(u.dims(), 5);
        let g = Geom::new(2, 3, 9, 8, p).unwrap();
        let f = y.apply_op1_no_bwd(&Fold { g }).unwrap();
        let lhs = (&u * &y)
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f64>()
            .unwrap();
        let rhs = (&x * &f)
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f64>()
            .unwrap();
        assert!(
            (lhs - rhs).abs() < 1e-9 * lhs.abs().max(1.0),
            "{lhs} vs {rhs}"
        );
    }
}
