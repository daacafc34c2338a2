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
