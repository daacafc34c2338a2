//! Time of `Y = X Wᵀ` (`X` `(M, K)`, `W` `(N, K)`, row-major, f32) through the `gemm` crate on the
//! rayon pool, with `W` read as stored and with a transposed copy `Wᵀ` `(K, N)` (what
//! `ops::bias::linear_fwd` uses), plus the two gradient products of a linear layer for reference.
//!
//! `cargo run --release -p densepred-core --example gemm_orient -- M K N`, e.g. `392 256 1024`
//! (SMT-T stage-3 fc1, batch 2). Prints the median and minimum of 50 runs per product.
use std::time::Instant;

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
) {
    let par = gemm::Parallelism::Rayon(rayon::current_num_threads());
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
        ];
        for (case, name) in cases.iter().enumerate() {
            let mut ts = Vec::new();
            for _ in 0..50 {
                let s = Instant::now();
                match case {
                    0 => product((m, n, k), &mut y, (1, ni), &x, (1, ki), &w, (ki, 1)),
                    1 => product((m, n, k), &mut y, (1, ni), &x, (1, ki), &wt, (1, ni)),
                    2 => product((n, k, m), &mut gw, (1, ki), &y, (ni, 1), &x, (1, ki)),
                    _ => product((m, k, n), &mut gx, (1, ki), &y, (1, ni), &w, (1, ki)),
                }
                ts.push(s.elapsed().as_secs_f64() * 1e3);
            }
            ts.sort_by(|a, b| a.total_cmp(b));
            println!(
                "{name:24} median {:.3} ms (min {:.3})",
                ts[ts.len() / 2],
                ts[0]
            );
        }
    })
}
