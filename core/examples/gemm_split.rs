//! Time of a row-major product `D (M, N) = A (M, K) @ B (K, N)`, f32, three ways: the `gemm`
//! crate's own threading on rayon's pool, `kernel::gemm_into` (which cuts products with small
//! outputs into one single-threaded call per thread, `kernel/gemm.rs`), and one thread. Prints the
//! median of 41 runs (after 5 warm-ups) and the GFLOP/s (2 FLOP per multiply-add).
//!
//! `cargo run --release -p densepred-core --example gemm_split -- M K N`, e.g. `512 2048 49`
//! (Conv2Former-N's stage-4 fc2 at 224²: `(C, 4C) @ (4C, H·W)`) or `256 256 196` (its stage-3
//! 1×1 convolutions).
use densepred_core::kernel::{gemm_into, MatView};
use std::time::Instant;

// The CLI's allocator.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn median_ms(f: &mut dyn FnMut()) -> f64 {
    for _ in 0..5 {
        f();
    }
    let mut ts: Vec<f64> = (0..41)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64() * 1e3
        })
        .collect();
    ts.sort_by(|a, b| a.total_cmp(b));
    ts[ts.len() / 2]
}

/// The `gemm` crate called directly on the dense row-major operands.
fn crate_gemm(
    m: usize,
    k: usize,
    n: usize,
    d: &mut [f32],
    a: &[f32],
    b: &[f32],
    par: gemm::Parallelism,
) {
    assert!(d.len() >= m * n && a.len() >= m * k && b.len() >= k * n);
    // SAFETY: the three buffers hold the dense row-major matrices the strides describe.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            d.as_mut_ptr(),
            1,
            n as isize,
            false,
            a.as_ptr(),
            1,
            k as isize,
            b.as_ptr(),
            1,
            n as isize,
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
        let v: Vec<usize> = std::env::args()
            .skip(1)
            .map(|s| s.parse().expect("M K N: integers"))
            .collect();
        let [m, k, n] = v[..] else {
            panic!("usage: gemm_split M K N")
        };
        let a: Vec<f32> = (0..m * k).map(|i| (i % 5) as f32 * 0.1).collect();
        let b: Vec<f32> = (0..k * n).map(|i| (i % 7) as f32 * 0.1).collect();
        let mut d = vec![0f32; m * n];
        let flop = 2.0 * (m * k * n) as f64;
        let threads = rayon::current_num_threads();
        let report = |what: &str, f: &mut dyn FnMut()| {
            let ms = median_ms(f);
            println!("{what:36} {ms:8.3} ms {:6.0} GFLOP/s", flop / ms / 1e6);
        };
        report(&format!("gemm crate, Rayon({threads})"), &mut || {
            crate_gemm(m, k, n, &mut d, &a, &b, gemm::Parallelism::Rayon(threads))
        });
        let (dv, av, bv) = (
            MatView::rows_of(m, n, 0, n),
            MatView::rows_of(m, k, 0, k),
            MatView::rows_of(k, n, 0, n),
        );
        report("kernel::gemm_into", &mut || {
            gemm_into(&mut d, dv, false, &a, av, &b, bv)
        });
        report("gemm crate, one thread", &mut || {
            crate_gemm(m, k, n, &mut d, &a, &b, gemm::Parallelism::None)
        });
    });
}
