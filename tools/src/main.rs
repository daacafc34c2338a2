//! `densepred`: the command-line entry point (see `densepred --help`).

mod backbone_config;
mod commands;

use clap::{Parser, Subcommand};

// Tensor ops allocate and free multi-megabyte buffers at a high rate; glibc's malloc hands those
// back to the kernel on every free, so each new buffer costs page faults (a quarter of the SMT
// forward time in a profile). mimalloc keeps them for reuse.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Dense prediction (detection, instance and semantic segmentation) in one native binary.
#[derive(Parser)]
#[command(name = "densepred", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a backbone on an input tensor or image and write its stage feature maps.
    Features(commands::features::Args),
    /// Convert checkpoints between formats.
    #[command(subcommand)]
    Convert(commands::convert::Convert),
    /// Measure speed and peak memory.
    #[command(subcommand)]
    Benchmark(commands::benchmark::Benchmark),
    /// Inspect a model (parameter counts).
    #[command(subcommand)]
    Analyze(commands::analyze::Analyze),
}

fn main() {
    // candle's element-wise ops run on a spinning barrier pool of its own beside rayon's and gemm's
    // threads; on the 2-core machines this project targets, that pool's spinning costs ~15% of a
    // backbone forward (BENCHMARKS.md). Memory-bound element-wise work gains little from a second
    // thread, so default it to one unless the user chose otherwise. Set before any candle call
    // starts the pool.
    if std::env::var_os("CANDLE_NUM_THREADS").is_none() {
        std::env::set_var("CANDLE_NUM_THREADS", "1");
    }
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let res = match cli.command {
        Command::Features(a) => commands::features::run(a),
        Command::Convert(c) => commands::convert::run(c),
        Command::Benchmark(b) => commands::benchmark::run(b),
        Command::Analyze(a) => commands::analyze::run(a),
    };
    if let Err(e) = res {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
