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
/// [`set_default_thread_env`]) with [`WORKER_STACK_BYTES`] stacks. Returns `false` when the pool
/// already existed (someone used rayon first); it is then used as it is.
pub fn init_global_pool() -> bool {
    rayon::ThreadPoolBuilder::new()
        .stack_size(WORKER_STACK_BYTES)
        .build_global()
        .is_ok()
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
