//! Thread-count defaults for candle, set once at program start (CLI `main`, Python module init).

/// Sets the environment variables candle reads for its CPU thread counts, unless the user set
/// them:
///
/// - `CANDLE_NUM_THREADS=1`: candle's element-wise ops run on a spinning barrier pool of their own
///   beside rayon's (and gemm's) threads; on the 2-core machines this project targets the
///   spinning costs more than a second thread gains on memory-bound element-wise work
///   (BENCHMARKS.md, SMT-T forward 622 → 451 ms).
/// - `RAYON_NUM_THREADS` = `std::thread::available_parallelism()` (the count rayon's global pool
///   uses by default, so the pool is unchanged): without it candle 0.11 re-derives its thread
///   count on every `matmul` call by parsing `/proc/cpuinfo` (about 200 opens and parses per SMT-T
///   training step, seen as `show_cpuinfo` in `perf`).
///
/// Must run before the first candle or rayon call, while the process is single-threaded (setting
/// environment variables races with other threads reading them).
pub fn set_default_thread_env() {
    if std::env::var_os("CANDLE_NUM_THREADS").is_none() {
        std::env::set_var("CANDLE_NUM_THREADS", "1");
    }
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        let n = std::thread::available_parallelism().map_or(1, |n| n.get());
        std::env::set_var("RAYON_NUM_THREADS", n.to_string());
    }
}

/// Stack size of the global rayon pool's worker threads (see [`init_global_pool`]): the whole
/// computation runs on one of them ([`run_on_pool`]), and candle's backward pass and the drop of
/// a training graph recurse once per graph node (a few thousand for SMT-L), so the 2 MiB default
/// of spawned threads is too small. Only address space is reserved; pages are touched on use.
pub const WORKER_STACK_BYTES: usize = 256 << 20;

/// Builds rayon's global pool (thread count from `RAYON_NUM_THREADS`, see
/// [`set_default_thread_env`]) with [`WORKER_STACK_BYTES`] stacks, each worker flushing
/// subnormal floats to zero ([`flush_denormals_on_this_thread`]) unless `DENSEPRED_DENORMALS=keep`.
/// Returns `false` when the pool already existed (someone used rayon first); it is then used as it
/// is.
pub fn init_global_pool() -> bool {
    let flush = std::env::var("DENSEPRED_DENORMALS").map_or(true, |v| v != "keep");
    rayon::ThreadPoolBuilder::new()
        .stack_size(WORKER_STACK_BYTES)
        .start_handler(move |_| {
            if flush {
                flush_denormals_on_this_thread();
            }
        })
        .build_global()
        .is_ok()
}

/// Makes the calling thread's float arithmetic treat subnormal inputs as zero and flush subnormal
/// results to zero (x86-64 MXCSR `DAZ` and `FTZ`; a no-op on other architectures).
///
/// Why: x86 cores take a microcode assist of ~100 cycles for every operation that reads or
/// produces a subnormal. Gradients reach that range in ordinary training (a sigmoid loss on a
/// confident negative gives `σ(x) ≈ eˣ < 1.2e-38` for `x < −87`), and one such gradient map
/// through a 3x3 convolution's GEMMs made a Mask R-CNN training step take 50 s instead of 8 s
/// (`densepred benchmark train`, the RPN convolution on P2: 0.23 s → 21 s). Values below
/// `1.2e-38` (f32) or `2.2e-308` (f64) become 0; nothing else changes. PyTorch exposes the same
/// switch as `torch.set_flush_denormal(True)`.
pub fn flush_denormals_on_this_thread() {
    #[cfg(target_arch = "x86_64")]
    {
        const FTZ: u32 = 1 << 15;
        const DAZ: u32 = 1 << 6;
        let mut csr: u32 = 0;
        // SAFETY: `stmxcsr` / `ldmxcsr` read and write this thread's SSE control register
        // through a valid pointer to a local; only the rounding of subnormals changes.
        unsafe {
            std::arch::asm!("stmxcsr [{}]", in(reg) &mut csr, options(nostack, preserves_flags));
            csr |= FTZ | DAZ;
            std::arch::asm!("ldmxcsr [{}]", in(reg) &csr, options(nostack, preserves_flags));
        }
    }
}

/// Runs `f` on a worker thread of rayon's global pool and returns its result (the caller blocks
/// until then); runs it in place when already on a pool thread.
///
/// Why: a parallel op called from a thread outside the pool hands its job to the pool and puts the
/// caller to sleep until a worker wakes it, a two-way thread handoff per op. A training step runs
/// a few thousand ops, many of them small, and those handoffs (futex wake-ups, three runnable
/// threads on two cores) cost as much as the small ops themselves. Called from a worker, an op
/// splits its work with the other workers instead (rayon's work stealing): SMT-T stage-3 MSA
/// block forward + backward 13–15 → 10.5 ms (BENCHMARKS.md).
///
/// Panics in `f` propagate to the caller. `f` must not block waiting for work that it expects
/// other rayon jobs of the global pool to do when the pool has one thread.
pub fn run_on_pool<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    if rayon::current_thread_index().is_some() {
        return f();
    }
    rayon::scope(|_| f())
}

#[cfg(test)]
mod tests {
    /// A product whose exact value is subnormal (1e-40) keeps it on a fresh thread and becomes 0
    /// after [`super::flush_denormals_on_this_thread`] (x86-64), and a subnormal input is read as
    /// 0.
    #[test]
    #[cfg(target_arch = "x86_64")]
    fn flushes_subnormals_on_the_calling_thread_only() {
        use std::hint::black_box;
        let product = || black_box(1e-30f32) * black_box(1e-10f32);
        let tiny = f32::from_bits(1); // the smallest subnormal
        let before = std::thread::spawn(move || (product(), black_box(tiny) * 2.0))
            .join()
            .unwrap();
        assert!(
            before.0 > 0.0 && before.0 < f32::MIN_POSITIVE,
            "{}",
            before.0
        );
        assert_eq!(before.1, f32::from_bits(2));
        let after = std::thread::spawn(move || {
            super::flush_denormals_on_this_thread();
            (product(), black_box(tiny) * 2.0, black_box(1.5f32) * 2.0)
        })
        .join()
        .unwrap();
        assert_eq!(after, (0.0, 0.0, 3.0));
    }
}
