//! `densepred benchmark`: median time per iteration and peak memory.

use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};
use densepred_backbones::Backbone;
use densepred_engine::backbone as backbone_config;
use std::path::PathBuf;
use std::time::Instant;

#[derive(clap::Subcommand)]
pub enum Benchmark {
    /// Backbone forward (eval) or forward + backward (`--train`) on a random input.
    Backbone(BackboneArgs),
    /// A single kernel against candle's own implementation of the same operation.
    Op(OpArgs),
    /// One full training iteration of a detector or segmentor config (data in memory; forward
    /// with losses, backward, optimizer step).
    Train(ModelArgs),
    /// Detector or segmentor inference (forward and post-processing) on one batch.
    Infer(ModelArgs),
}

/// `benchmark train|infer` options.
#[derive(clap::Args)]
pub struct ModelArgs {
    /// Detector or segmentor config (its `model` and `optim_wrapper` are used).
    config: PathBuf,
    /// Input size `HxW`.
    #[arg(long, default_value = "640x640")]
    shape: String,
    /// Images per batch (default: 2 for train, 1 for infer).
    #[arg(long)]
    batch: Option<usize>,
    /// Timed iterations (after one warm-up iteration).
    #[arg(long, default_value_t = 3)]
    iters: usize,
    /// Print one JSON object `{"median_ms", "peak_mb", "params"}` as the last line.
    #[arg(long)]
    json: bool,
    /// `cpu`, or `cuda` / `cuda:N` (a binary built with `--features cuda`); default: the
    /// config's `device` key, else `cpu`.
    #[arg(long)]
    device: Option<String>,
}

/// Runs the model of `a.config` on a random batch: per iteration either a training step
/// (AdamW/SGD from the config; detectors: 8 fixed GT boxes per image, each filled as its mask; segmentors: a fixed label
/// map of class bands) or inference (segmentors: the config's `test_cfg` mode, argmax included).
fn model_bench(a: ModelArgs, train: bool) -> Result<()> {
    use densepred_core::structures::{GtInstances, ImageMeta};
    use densepred_engine::optim::{param_groups, Optimizer};
    use densepred_engine::runner::{build_model, RunConfig};
    let (h, w) = parse_shape(&a.shape)?;
    let batch = a.batch.unwrap_or(if train { 2 } else { 1 });
    let (cfg, _) = RunConfig::load(&a.config, &[])?;
    let device = densepred_engine::device::resolve_device(a.device.as_deref(), &cfg)?;
    let model = build_model(&cfg.model, cfg.seed(), &device)?;
    let params = model.vars.num_parameters();
    let x = Tensor::randn(0f32, 1.0, (batch, 3, h, w), &device)?;
    let meta = ImageMeta {
        ori_shape: (h, w),
        img_shape: (h, w),
        pad_shape: (h, w),
        scale_factor: (1.0, 1.0),
    };
    let metas = vec![meta; batch];
    let (fh, fw) = (h as f32, w as f32);
    let gt = GtInstances {
        bboxes: (0..8)
            .map(|i| {
                let f = i as f32 / 8.0;
                [
                    fw * f * 0.5,
                    fh * f * 0.4,
                    fw * (0.3 + f * 0.6),
                    fh * (0.35 + f * 0.6),
                ]
            })
            .collect(),
        labels: (0..8).collect(),
        ignored: vec![],
        masks: None,
    };
    // Each box filled as its mask (read only by detectors with a mask head).
    let masks = densepred_core::structures::BitmapMasks {
        size: (h, w),
        masks: gt
            .bboxes
            .iter()
            .map(|b| {
                (0..h * w)
                    .map(|i| {
                        let (y, x) = ((i / w) as f32 + 0.5, (i % w) as f32 + 0.5);
                        u8::from(x >= b[0] && x < b[2] && y >= b[1] && y < b[3])
                    })
                    .collect()
            })
            .collect(),
    };
    let gt = GtInstances {
        masks: Some(masks),
        ..gt
    };
    let gts = vec![gt; batch];
    let mut opt = if train {
        let ow = cfg
            .optim_wrapper
            .as_ref()
            .context("the config has no optim_wrapper")?;
        Some(Optimizer::new(
            ow.optimizer.clone(),
            param_groups(
                model.vars.named_vars(),
                ow.paramwise_cfg.as_ref(),
                &|_| false,
                &[],
            ),
        ))
    } else {
        None
    };
    let seg_labels = if model.is_segmentor() {
        // A fixed label map: vertical bands of classes, with an ignored border (255).
        let k = model.num_classes().max(1);
        let lab: Vec<u8> = (0..batch * h * w)
            .map(|i| {
                let (y, x) = ((i / w) % h, i % w);
                if y < 4 || x < 4 {
                    255
                } else {
                    ((x * 7 / w.max(1) + y * 3 / h.max(1)) % k) as u8
                }
            })
            .collect();
        Some(Tensor::from_vec(lab, (batch, h, w), &device)?)
    } else {
        None
    };
    let (inference, seg_inference) = match (train, model.is_segmentor()) {
        (true, _) => (None, None),
        (false, false) => (Some(model.inference_detector()?), None),
        (false, true) => (None, Some(model.inference_segmentor()?)),
    };
    let step = || -> Result<()> {
        if let Some(opt) = opt.as_mut() {
            let losses = match &seg_labels {
                Some(l) => model.segmentor()?.loss(&x, l)?,
                None => model.detector()?.loss(&x, &metas, &gts)?,
            };
            let total = losses
                .iter()
                .map(|(_, v)| v.clone())
                .reduce(|p, q| (p + q).expect("scalar sum"))
                .context("no loss")?;
            let grads = total.backward()?;
            let lr = opt.config().lr();
            opt.step(&grads, lr, 1.0)?;
        } else if let Some(seg) = &seg_inference {
            seg.predict(&x, &vec![(h, w); batch], &vec![(h, w); batch])?;
        } else {
            inference
                .as_ref()
                .expect("built for infer")
                .predict(&x, &metas)?;
        }
        Ok(())
    };
    let times = timed_ms(1, a.iters, step)?;
    let median = times[times.len() / 2];
    let peak = peak_rss_mb();
    println!("{} {}x{} batch {batch}: median {median:.1} ms over {} iterations (min {:.1}), peak RSS {peak:.0} MiB, {params} parameters", if train { "train" } else { "infer" }, h, w, times.len(), times[0]);
    if a.json {
        println!(
            "{}",
            serde_json::json!({"median_ms": median, "peak_mb": peak, "params": params})
        );
    }
    Ok(())
}

/// Operations that `benchmark op` knows.
#[derive(Clone, Copy, clap::ValueEnum)]
pub enum OpName {
    /// Depthwise conv2d, stride 1, "same" padding: ours vs candle's grouped `conv2d`.
    DepthwiseConv,
    /// RoIAlign of 1000 random boxes on `(2, 256, 200, 336)` (stride 4), 7x7, sampling 2, aligned
    /// (`--train`: forward + backward).
    RoiAlign,
    /// NMS (IoU 0.5) of 10 000 random boxes in clusters.
    Nms,
    /// RetinaNet anchors (P3–P7) for a 1333x800 image padded to 1344x800, plus MaxIoU assignment
    /// (pos 0.5, neg 0.4, low-quality matches) to 50 random gt boxes.
    AnchorsAssign,
}

/// Random xyxy boxes inside `w x h`: `n` boxes around `clusters` centres (so NMS has work).
fn random_boxes(
    n: usize,
    w: f32,
    h: f32,
    clusters: usize,
    rng: &mut impl rand::Rng,
) -> Vec<[f32; 4]> {
    let centres: Vec<(f32, f32, f32)> = (0..clusters.max(1))
        .map(|_| {
            (
                rng.random_range(0.0..w),
                rng.random_range(0.0..h),
                rng.random_range(16.0..256.0),
            )
        })
        .collect();
    (0..n)
        .map(|i| {
            let (cx, cy, s) = centres[i % centres.len()];
            let (x, y) = (
                cx + rng.random_range(-0.2..0.2) * s,
                cy + rng.random_range(-0.2..0.2) * s,
            );
            let (bw, bh) = (
                s * rng.random_range(0.6..1.4),
                s * rng.random_range(0.6..1.4),
            );
            [
                (x - bw / 2.0).clamp(0.0, w - 2.0),
                (y - bh / 2.0).clamp(0.0, h - 2.0),
                (x + bw / 2.0).clamp(2.0, w),
                (y + bh / 2.0).clamp(2.0, h),
            ]
        })
        .collect()
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

/// Runs `f` `warmup` times, then `iters` (≥ 1) timed times: the times in ms, sorted.
fn timed_ms(warmup: usize, iters: usize, mut f: impl FnMut() -> Result<()>) -> Result<Vec<f64>> {
    for _ in 0..warmup {
        f()?;
    }
    let mut times = Vec::with_capacity(iters.max(1));
    for _ in 0..iters.max(1) {
        let t = Instant::now();
        f()?;
        times.push(t.elapsed().as_secs_f64() * 1e3);
    }
    times.sort_by(|x, y| x.total_cmp(y));
    Ok(times)
}

fn median_ms(iters: usize, f: impl FnMut() -> Result<()>) -> Result<f64> {
    let times = timed_ms(3, iters, f)?;
    Ok(times[times.len() / 2])
}

fn op(a: OpArgs) -> Result<()> {
    let dims: Vec<usize> = a
        .shape
        .split(['x', 'X'])
        .map(|v| v.trim().parse::<usize>())
        .collect::<std::result::Result<_, _>>()
        .with_context(|| format!("--shape must be BxCxHxW, got {:?}", a.shape))?;
    let [b, c, h, w] = dims[..] else {
        bail!("--shape must be BxCxHxW, got {:?}", a.shape)
    };
    let dev = Device::Cpu;
    let x = candle_core::Var::from_tensor(&Tensor::randn(0f32, 1.0, (b, c, h, w), &dev)?)?;
    let k = candle_core::Var::from_tensor(&Tensor::randn(
        0f32,
        0.1,
        (c, 1, a.kernel, a.kernel),
        &dev,
    )?)?;
    let p = densepred_core::ops::DwConvParams::same(a.kernel / 2);
    let threads = rayon::current_num_threads();
    let mut rng = <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(0);
    let to_tensor = |b: &[[f32; 4]]| Tensor::from_vec(b.concat(), (b.len(), 4), &dev);
    match a.op {
        OpName::RoiAlign => {
            let feat = candle_core::Var::from_tensor(&Tensor::randn(
                0f32,
                1.0,
                (2, 256, 200, 336),
                &dev,
            )?)?;
            let boxes = random_boxes(1000, 1344.0, 800.0, 1000, &mut rng);
            let rois: Vec<f32> = boxes
                .iter()
                .enumerate()
                .flat_map(|(i, b)| [(i % 2) as f32, b[0], b[1], b[2], b[3]])
                .collect();
            let rois = Tensor::from_vec(rois, (1000, 5), &dev)?;
            let p = densepred_core::ops::RoiAlignParams {
                output_size: (7, 7),
                spatial_scale: 0.25,
                sampling_ratio: 2,
                aligned: true,
            };
            let fwd = median_ms(a.iters, || {
                densepred_core::ops::roi_align(&feat, &rois, p)?;
                Ok(())
            })?;
            let up = Tensor::randn(0f32, 1.0, (1000, 256, 7, 7), &dev)?;
            let both = median_ms(a.iters, || {
                let y = densepred_core::ops::roi_align(&feat, &rois, p)?;
                (y * &up)?.sum_all()?.backward()?;
                Ok(())
            })?;
            println!("roi_align 1000 boxes on 2x256x200x336, 7x7, sampling 2, aligned, {threads} threads: forward {fwd:.2} ms, forward+backward {both:.2} ms");
        }
        OpName::Nms => {
            let boxes = to_tensor(&random_boxes(10_000, 1344.0, 800.0, 2000, &mut rng))?;
            let scores = Tensor::rand(0f32, 1.0, 10_000, &dev)?;
            let mut kept = 0;
            let m = median_ms(a.iters, || {
                kept = densepred_core::ops::nms(&boxes, &scores, 0.5)?.dim(0)?;
                Ok(())
            })?;
            println!("nms 10000 boxes, IoU 0.5, {threads} threads: {m:.2} ms ({kept} kept)");
        }
        OpName::AnchorsAssign => {
            let gen: densepred_heads::task::prior_generator::AnchorGenerator = toml::from_str(
                "strides = [8, 16, 32, 64, 128]\nratios = [0.5, 1.0, 2.0]\noctave_base_scale = 4\nscales_per_octave = 3\n",
            )?;
            let assigner = densepred_heads::task::assigner::MaxIoUAssigner {
                pos_iou_thr: 0.5,
                neg_iou_thr: densepred_heads::task::assigner::NegIouThr::Below(0.4),
                min_pos_iou: 0.0,
                gt_max_assign_all: true,
                ignore_iof_thr: -1.0,
                ignore_wrt_candidates: true,
                match_low_quality: true,
            };
            let gt = to_tensor(&random_boxes(50, 1333.0, 800.0, 50, &mut rng))?;
            let labels: Vec<i64> = (0..50).map(|i| i % 80).collect();
            let sizes: Vec<(usize, usize)> = [8usize, 16, 32, 64, 128]
                .iter()
                .map(|s| (800usize.div_ceil(*s), 1344usize.div_ceil(*s)))
                .collect();
            let mut n = 0;
            let m = median_ms(a.iters, || {
                let priors = Tensor::cat(&gen.grid_priors(&sizes, &dev)?, 0)?;
                let r = assigner.assign(&priors, &gt, &labels, None)?;
                n = r.gt_inds.len();
                Ok(())
            })?;
            println!("anchors (P3-P7, 1344x800) + MaxIoU assignment to 50 gts, {threads} threads: {m:.2} ms ({n} anchors)");
        }
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
            let what = if a.train {
                "forward+backward"
            } else {
                "forward"
            };
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
    /// `cpu`, or `cuda` / `cuda:N` (a binary built with `--features cuda`); on CUDA each
    /// iteration ends with a device synchronisation, and peak memory is the host's.
    #[arg(long, default_value = "cpu")]
    device: String,
}

/// Parses `cpu`, `cuda` or `cuda:N` ([`densepred_engine::device::parse_device`]).
///
/// Errors: another spelling, or a CUDA device that does not open.
pub fn parse_device(s: &str) -> Result<Device> {
    Ok(densepred_engine::device::parse_device(s)?)
}

/// Parses `HxW`.
pub fn parse_shape(s: &str) -> Result<(usize, usize)> {
    let (h, w) = s
        .split_once(['x', 'X'])
        .with_context(|| format!("--shape must be HxW, got {s:?}"))?;
    let h: usize = h
        .trim()
        .parse()
        .with_context(|| format!("--shape: bad height in {s:?}"))?;
    let w: usize = w
        .trim()
        .parse()
        .with_context(|| format!("--shape: bad width in {s:?}"))?;
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
            s.lines().find(|l| l.starts_with("VmHWM:")).and_then(|l| {
                l.split_whitespace()
                    .nth(1)
                    .and_then(|v| v.parse::<f64>().ok())
            })
        })
        .map(|kb| kb / 1024.0)
        .unwrap_or(0.0)
}

pub fn run(b: Benchmark) -> Result<()> {
    match b {
        Benchmark::Backbone(a) => backbone(a),
        Benchmark::Op(a) => op(a),
        Benchmark::Train(a) => model_bench(a, true),
        Benchmark::Infer(a) => model_bench(a, false),
    }
}

fn backbone(a: BackboneArgs) -> Result<()> {
    let (h, w) = parse_shape(&a.shape)?;
    let device = parse_device(&a.device)?;
    let loaded = backbone_config::build_backbone(&a.config, None, &device)?;
    let params = loaded.vars.num_parameters();
    let x = Tensor::randn(0f32, 1.0, (a.batch, 3, h, w), &device)?;
    let step = || -> Result<()> {
        let model = if a.train {
            &loaded.model
        } else {
            &loaded.inference
        };
        let outs = model.forward(&x, a.train)?;
        if a.train {
            let mut loss = outs[0].mean_all()?;
            for o in &outs[1..] {
                loss = (loss + o.mean_all()?)?;
            }
            loss.backward()?;
        }
        device.synchronize()?;
        Ok(())
    };
    let times = timed_ms(3, a.iters, step)?;
    let median = times[times.len() / 2];
    let peak = peak_rss_mb();
    println!(
        "{} {}x{} batch {} ({}) on {:?}, {} threads: median {:.2} ms over {} iters (min {:.2}, max {:.2}), peak RSS {:.0} MiB, {} params",
        a.config.display(),
        h,
        w,
        a.batch,
        if a.train { "forward+backward" } else { "forward" },
        device,
        rayon::current_num_threads(),
        median,
        times.len(),
        times[0],
        times[times.len() - 1],
        peak,
        params
    );
    if a.json {
        println!(
            "{}",
            serde_json::json!({"median_ms": median, "peak_mb": peak, "params": params})
        );
    }
    Ok(())
}
