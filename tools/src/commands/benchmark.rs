//! `densepred benchmark`: median time per iteration and peak memory.

use crate::backbone_config;
use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};
use densepred_backbones::Backbone;
use std::path::PathBuf;
use std::time::Instant;

#[derive(clap::Subcommand)]
pub enum Benchmark {
    /// Backbone forward (eval) or forward + backward (`--train`) on a random input.
    Backbone(BackboneArgs),
    /// A single kernel against candle's own implementation of the same operation.
    Op(OpArgs),
}

/// Operations that `benchmark op` knows.
#[derive(Clone, Copy, clap::ValueEnum)]
pub enum OpName {
    /// Depthwise conv2d, stride 1, "same" padding: ours vs candle's grouped `conv2d`.
    DepthwiseConv,
}

#[derive(clap::Args)]
pub struct OpArgs {
    /// Which operation.
    op: OpName,
    /// Input shape `BxCxHxW`.
    #[arg(long, default_value = "1x64x56x56")]
    shape: String,
    /// Square kernel size.
    #[arg(long, default_value_t = 7)]
    kernel: usize,
    /// Timed iterations (after 3 warm-up iterations).
    #[arg(long, default_value_t = 20)]
    iters: usize,
    /// Also time the backward pass (gradients of input and weight).
    #[arg(long)]
    train: bool,
}

fn median_ms(iters: usize, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    for _ in 0..3 {
        f()?;
    }
    let mut times = Vec::with_capacity(iters);
    for _ in 0..iters.max(1) {
        let t = Instant::now();
        f()?;
        times.push(t.elapsed().as_secs_f64() * 1e3);
    }
    times.sort_by(|x, y| x.total_cmp(y));
    Ok(times[times.len() / 2])
}

fn op(a: OpArgs) -> Result<()> {
    let dims: Vec<usize> = a
        .shape
        .split(['x', 'X'])
        .map(|v| v.trim().parse::<usize>())
        .collect::<std::result::Result<_, _>>()
        .with_context(|| format!("--shape must be BxCxHxW, got {:?}", a.shape))?;
    let [b, c, h, w] = dims[..] else { bail!("--shape must be BxCxHxW, got {:?}", a.shape) };
    let dev = Device::Cpu;
    let x = candle_core::Var::from_tensor(&Tensor::randn(0f32, 1.0, (b, c, h, w), &dev)?)?;
    let k = candle_core::Var::from_tensor(&Tensor::randn(0f32, 0.1, (c, 1, a.kernel, a.kernel), &dev)?)?;
    let p = densepred_core::ops::DwConvParams::same(a.kernel / 2);
    match a.op {
        OpName::DepthwiseConv => {
            let ours = |train: bool| -> Result<()> {
                let y = densepred_core::ops::depthwise_conv2d(&x, &k, None, p)?;
                if train {
                    y.sum_all()?.backward()?;
                }
                Ok(())
            };
            let theirs = |train: bool| -> Result<()> {
                let y = densepred_core::ops::depthwise_conv2d_reference(&x, &k, p)?;
                if train {
                    y.sum_all()?.backward()?;
                }
                Ok(())
            };
            let threads = rayon::current_num_threads();
            let what = if a.train { "forward+backward" } else { "forward" };
            let m1 = median_ms(a.iters, || ours(a.train))?;
            let m2 = median_ms(a.iters.min(5), || theirs(a.train))?;
            println!("depthwise conv {b}x{c}x{h}x{w} k{} {what}, {threads} threads: densepred {m1:.3} ms, candle conv2d(groups=C) {m2:.3} ms", a.kernel);
        }
    }
    Ok(())
}

#[derive(clap::Args)]
pub struct BackboneArgs {
    /// Config with a `[backbone]` table.
    config: PathBuf,
    /// Input size `HxW` in pixels.
    #[arg(long, default_value = "224x224")]
    shape: String,
    /// Batch size.
    #[arg(long, default_value_t = 1)]
    batch: usize,
    /// Timed iterations (after 3 warm-up iterations).
    #[arg(long, default_value_t = 10)]
    iters: usize,
    /// Time forward + backward of the sum of the outputs in training mode.
    #[arg(long)]
    train: bool,
    /// Print one JSON object `{"median_ms", "peak_mb", "params"}` as the last line.
    #[arg(long)]
    json: bool,
}

/// Parses `HxW`.
pub fn parse_shape(s: &str) -> Result<(usize, usize)> {
    let (h, w) = s.split_once(['x', 'X']).with_context(|| format!("--shape must be HxW, got {s:?}"))?;
    let h: usize = h.trim().parse().with_context(|| format!("--shape: bad height in {s:?}"))?;
    let w: usize = w.trim().parse().with_context(|| format!("--shape: bad width in {s:?}"))?;
    if h == 0 || w == 0 {
        bail!("--shape must be positive, got {s:?}");
    }
    Ok((h, w))
}

/// Peak resident set size of this process in MiB (`VmHWM` of `/proc/self/status`; 0 where
/// unavailable).
pub fn peak_rss_mb() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse::<f64>().ok()))
        })
        .map(|kb| kb / 1024.0)
        .unwrap_or(0.0)
}

pub fn run(b: Benchmark) -> Result<()> {
    match b {
        Benchmark::Backbone(a) => backbone(a),
        Benchmark::Op(a) => op(a),
    }
}

fn backbone(a: BackboneArgs) -> Result<()> {
    let (h, w) = parse_shape(&a.shape)?;
    let device = Device::Cpu;
    let loaded = backbone_config::build(&a.config, None, &device)?;
    let params = loaded.vars.num_parameters();
    let x = Tensor::randn(0f32, 1.0, (a.batch, 3, h, w), &device)?;
    let step = || -> Result<()> {
        let model = if a.train { &loaded.model } else { &loaded.inference };
        let outs = model.forward(&x, a.train)?;
        if a.train {
            let mut loss = outs[0].mean_all()?;
            for o in &outs[1..] {
                loss = (loss + o.mean_all()?)?;
            }
            loss.backward()?;
        }
        Ok(())
    };
    for _ in 0..3 {
        step()?;
    }
    let mut times = Vec::with_capacity(a.iters);
    for _ in 0..a.iters.max(1) {
        let t = Instant::now();
        step()?;
        times.push(t.elapsed().as_secs_f64() * 1e3);
    }
    times.sort_by(|x, y| x.total_cmp(y));
    let median = times[times.len() / 2];
    let peak = peak_rss_mb();
    println!(
        "{} {}x{} batch {} ({}), {} threads: median {:.2} ms over {} iters (min {:.2}, max {:.2}), peak RSS {:.0} MiB, {} params",
        a.config.display(),
        h,
        w,
        a.batch,
        if a.train { "forward+backward" } else { "forward" },
        rayon::current_num_threads(),
        median,
        times.len(),
        times[0],
        times[times.len() - 1],
        peak,
        params
    );
    if a.json {
        println!("{}", serde_json::json!({"median_ms": median, "peak_mb": peak, "params": params}));
    }
    Ok(())
}
