//! Time of a dense convolution through `ops::conv2d_gemm` (the lowering every dense `Conv2d`
//! uses): forward, and forward + backward (input and weight gradients) of `sum(y · g)`, f32, on
//! the rayon pool. Prints the median and minimum of the timed runs and the GFLOP/s of the useful
//! products (2 FLOP per multiply-add, forward `2·B·OC·C·KH·KW·OH·OW`, backward twice that).
//!
//! `cargo run --release -p densepred-core --example conv_products -- B C OC H W K [ITERS]`, e.g.
//! `256 256 256 14 14 3` (the Mask R-CNN mask head's convolutions on 256 positive RoIs) or
//! `2 256 256 160 160 3` (FPN / RPN at P2 for two 640x640 images). Run with
//! `MIMALLOC_PURGE_DELAY=-1` to keep freed memory as the CLI does.
use candle_core::{Device, Tensor, Var};
use std::time::Instant;

// The CLI's allocator: large buffers are reused instead of faulted in again on every call.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn median_min(mut ts: Vec<f64>) -> (f64, f64) {
    ts.sort_by(|a, b| a.total_cmp(b));
    (ts[ts.len() / 2], ts[0])
}

fn main() -> candle_core::Result<()> {
    densepred_core::threads::set_default_thread_env();
    densepred_core::threads::init_global_pool();
    densepred_core::threads::run_on_pool(|| {
        let a: Vec<usize> = std::env::args()
            .skip(1)
            .map(|s| s.parse().expect("B C OC H W K [ITERS]: integers"))
            .collect();
        let (b, c, oc, h, w, k) = match a[..] {
            [b, c, oc, h, w, k, ..] => (b, c, oc, h, w, k),
            _ => panic!("usage: conv_products B C OC H W K [ITERS]"),
        };
        let iters = a.get(6).copied().unwrap_or(10);
        let dev = Device::Cpu;
        let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (b, c, h, w), &dev)?)?;
        let wt = Var::from_tensor(&Tensor::randn(0f32, 0.05, (oc, c, k, k), &dev)?)?;
        let p = k / 2;
        let g = Tensor::randn(0f32, 1.0, (b, oc, h, w), &dev)?;
        let fwd_flop = 2.0 * (b * oc * c * k * k * h * w) as f64;
        let (mut tf, mut tb) = (Vec::new(), Vec::new());
        for i in 0..iters + 2 {
            let s = Instant::now();
            let y = densepred_core::ops::conv2d_gemm(x.as_tensor(), wt.as_tensor(), 1, p, 1)?;
            let f = s.elapsed().as_secs_f64();
            let grads = (y * &g)?.sum_all()?.backward()?;
            let t = s.elapsed().as_secs_f64();
            assert!(grads.get(&x).is_some() && grads.get(&wt).is_some());
            if i >= 2 {
                tf.push(f * 1e3);
                tb.push(t * 1e3);
            }
        }
        let ((fm, fmin), (bm, bmin)) = (median_min(tf), median_min(tb));
        println!(
            "conv {b}x{c}x{h}x{w} -> {oc}, {k}x{k}: forward median {fm:.1} ms (min {fmin:.1}, {:.0} GFLOP/s), forward+backward {bm:.1} ms (min {bmin:.1}, {:.0} GFLOP/s)",
            fwd_flop / fm / 1e6,
            3.0 * fwd_flop / bm / 1e6
        );
        Ok(())
    })
}
