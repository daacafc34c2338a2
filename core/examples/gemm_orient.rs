//! Time of `Y = X Wᵀ` (`X` `(M, K)`, `W` `(N, K)`, row-major, f32) through the `gemm` crate on the
//! rayon pool, with `W` read as stored and with a transposed copy `Wᵀ` `(K, N)` (what
//! `ops::bias::linear_fwd` uses), plus the two gradient products of a linear layer for reference;
//! then the `Wᵀ`-copy product (a row-major `(M, K) @ (K, N)`) through `kernel::gemm_into`, whose
//! dispatch cuts products with small outputs into row bands (`kernel/gemm.rs`), and on one thread.
//!
//! `cargo run --release -p densepred-core --example gemm_orient -- M K N`, e.g. `392 256 1024`
//! (SMT-T stage-3 fc1, batch 2) or `512 2048 49` (Conv2Former-N stage-4 fc2 at 224² as
//! `(C, 4C) @ (4C, H·W)`). Prints the median and minimum of 50 runs per product and its GFLOP/s
//! (2 FLOP per multiply-add).
use densepred_core::kernel::{gemm_into, MatView};
use std::time::Instant;

// The CLI's allocator.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// `dst (m, n) = lhs (m, k) · rhs (k, n)`, each as (column stride, row stride).
#[allow(clippy::too_many_arguments)]
fn product(
    (m, n, k): (usize, usize, usize),
    dst: &mut [f32],
    (dcs, drs): (isize, isize),
    lhs: &[f32],
    (lcs, lrs): (isize, isize),
    rhs: &[f32],
    (rcs, rrs): (isize, isize),
    par: gemm::Parallelism,
) {
    // SAFETY: the callers' strides keep every index inside the three slices.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            dcs,
            drs,
            false,
            lhs.as_ptr(),
            lcs,
            lrs,
            rhs.as_ptr(),
            rcs,
            rrs,
            0.0,
            1.0,
            false,
            false,
            false,
            par,
        )
    }
}

fn main() {
    densepred_core::threads::set_default_thread_env();
    densepred_core::threads::init_global_pool();
    densepred_core::threads::run_on_pool(|| {
        let a: Vec<usize> = std::env::args()
            .skip(1)
            .map(|s| s.parse().expect("M K N: integers"))
            .collect();
        let [m, k, n] = a[..] else {
            panic!("usage: gemm_orient M K N")
        };
        let x: Vec<f32> = (0..m * k).map(|i| (i % 7) as f32 * 0.1).collect();
        let w: Vec<f32> = (0..n * k).map(|i| (i % 5) as f32 * 0.1).collect();
        let mut wt = vec![0f32; k * n];
        for r in 0..n {
            for c in 0..k {
                wt[c * n + r] = w[r * k + c];
            }
        }
        let mut y = vec![0f32; m * n];
        let mut gw = vec![0f32; n * k];
        let mut gx = vec![0f32; m * k];
        let (ki, ni) = (k as isize, n as isize);
        let cases = [
            "Y = X·Wᵀ, W as stored",
            "Y = X·Wᵀ, Wᵀ copy",
            "dW = Yᵀ·X",
            "dX = Y·W",
            "Wᵀ copy, gemm_into",
            "Wᵀ copy, one thread",
        ];
        let rayon = gemm::Parallelism::Rayon(rayon::current_num_threads());
        let one = gemm::Parallelism::None;
        let (yv, xv, wtv) = (
            MatView::rows_of(m, n, 0, n),
            MatView::rows_of(m, k, 0, k),
            MatView::rows_of(k, n, 0, n),
        );
        let flop = 2.0 * (m * k * n) as f64;
        for (case, name) in cases.iter().enumerate() {
            let mut ts = Vec::new();
            for _ in 0..50 {
                let s = Instant::now();
                match case {
                    0 => product((m, n, k), &mut y, (1, ni), &x, (1, ki), &w, (ki, 1), rayon),
                    1 => product((m, n, k), &mut y, (1, ni), &x, (1, ki), &wt, (1, ni), rayon),
                    2 => product((n, k, m), &mut gw, (1, ki), &y, (ni, 1), &x, (1, ki), rayon),
                    3 => product((m, k, n), &mut gx, (1, ki), &y, (1, ni), &w, (1, ki), rayon),
                    4 => gemm_into(&mut y, yv, false, &x, xv, &wt, wtv),
                    _ => product((m, n, k), &mut y, (1, ni), &x, (1, ki), &wt, (1, ni), one),
                }
                ts.push(s.elapsed().as_secs_f64() * 1e3);
            }
            ts.sort_by(|a, b| a.total_cmp(b));
            let med = ts[ts.len() / 2];
            println!(
                "{name:24} median {med:.3} ms (min {:.3}), {:.0} GFLOP/s",
                ts[0],
                flop / med / 1e6
            );
        }
    })
}
