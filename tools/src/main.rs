//! `densepred`: the command-line entry point (see `densepred --help`).

mod commands;
mod visualize;

use clap::{Parser, Subcommand};

// Tensor ops allocate and free multi-megabyte buffers at a high rate; glibc's malloc hands those
// back to the kernel on every free, so each new buffer costs page faults (a quarter of the SMT
// forward time in a profile). mimalloc keeps them for reuse.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// `mi_option_purge_delay` in mimalloc's `mi_option_e` (the same index in its v2 and v3 headers;
/// the Rust binding exports no constant for it).
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// Keeps freed memory in the process instead of returning it to the kernel 10 ms later: a training
/// step frees and re-allocates the same ~1 GB of activations, and re-faulting those pages cost a
/// quarter of the step (kernel page zeroing) in a profile.
fn keep_freed_memory() {
    if std::env::var_os("MIMALLOC_PURGE_DELAY").is_some() {
        return;
    }
    // SAFETY: setting an option of the allocator in use; mimalloc documents options as settable at
    // any time.
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, -1) };
}

/// Dense prediction (detection, instance and semantic segmentation) in one native binary.
#[derive(Parser)]
#[command(name = "densepred", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Train a model from a config (mmdetection's tools/train.py).
    Train(commands::train::Args),
    /// Evaluate a checkpoint on the test split (mmdetection's tools/test.py).
    Test(commands::test::Args),
    /// Detect objects in images and draw them.
    Infer(commands::infer::Args),
    /// Print a config after `_base_` merging and `--set` overrides.
    PrintConfig(commands::print_config::Args),
    /// Run a backbone on an input tensor or image and write its stage feature maps.
    Features(commands::features::Args),
    /// Convert checkpoints between formats.
    #[command(subcommand)]
    Convert(commands::convert::Convert),
    /// Measure speed and peak memory.
    #[command(subcommand)]
    Benchmark(commands::benchmark::Benchmark),
    /// Draw a split's pipeline output with its ground truth (mmdet's browse_dataset).
    BrowseDataset(commands::browse::Args),
    /// Evaluate saved results (COCO bbox/segm, semantic segmentation).
    #[command(subcommand)]
    Eval(commands::eval::Eval),
    /// Inspect a model (parameter counts).
    #[command(subcommand)]
    Analyze(commands::analyze::Analyze),
}

fn main() {
    keep_freed_memory();
    // candle's thread counts (CANDLE_NUM_THREADS=1, RAYON_NUM_THREADS fixed) unless the user
    // chose them; before any candle call.
    densepred_core::threads::set_default_thread_env();
    densepred_core::threads::init_global_pool();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    // All work runs on a rayon worker: parallel ops then split work with the other workers
    // instead of handing it over and sleeping (densepred_core::threads::run_on_pool).
    let res = densepred_core::threads::run_on_pool(move || match cli.command {
        Command::Train(a) => commands::train::run(a),
        Command::Test(a) => commands::test::run(a),
        Command::Infer(a) => commands::infer::run(a),
        Command::PrintConfig(a) => commands::print_config::run(a),
        Command::Features(a) => commands::features::run(a),
        Command::Convert(c) => commands::convert::run(c),
        Command::Benchmark(b) => commands::benchmark::run(b),
        Command::Analyze(a) => commands::analyze::run(a),
        Command::Eval(e) => commands::eval::run(e),
        Command::BrowseDataset(a) => commands::browse::run(a),
    });
    if let Err(e) = res {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
