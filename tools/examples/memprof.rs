//! Live-heap profile of a segmentor's training step (a developer tool, not part of the CLI).
//!
//! `cargo run --release -p densepred-cli --example memprof -- CONFIG [SIZE]` runs `ITERS` (default
//! 3) steps on a random `(2, 3, SIZE, SIZE)` batch (SIZE default 512) with the config's optimizer
//! and prints, per step, the bytes the program holds (live) and the most it held (peak) after
//! the forward + losses, the backward and the optimizer step. The process's peak RSS minus the
//! peak live heap is what the allocator keeps on top. With `MEMPROF_TRACE=FILE`, the allocations
//! of ≥ 64 KiB of the second step are written to FILE (`a|f ADDRESS BYTES` per line) for
//! offline analysis.
use anyhow::Context;
use candle_core::{Device, Tensor};
use std::alloc::{GlobalAlloc, Layout};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::Relaxed};

/// Counts the bytes held, over mimalloc (the CLI's allocator).
struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);
const TRACE_CAP: usize = 1 << 20;
static TRACE_ON: AtomicBool = AtomicBool::new(false);
static TRACE_N: AtomicUsize = AtomicUsize::new(0);
/// Trace entries `(address, bytes | 1 << 63 for a free)`, written without allocating.
static TRACE: [(AtomicUsize, AtomicUsize); TRACE_CAP] =
    [const { (AtomicUsize::new(0), AtomicUsize::new(0)) }; TRACE_CAP];

fn note(p: *mut u8, size: usize, alloc: bool) {
    if alloc {
        let now = LIVE.fetch_add(size, Relaxed) + size;
        PEAK.fetch_max(now, Relaxed);
    } else {
        LIVE.fetch_sub(size, Relaxed);
    }
    if size >= 1 << 16 && TRACE_ON.load(Relaxed) {
        let i = TRACE_N.fetch_add(1, Relaxed);
        if i < TRACE_CAP {
            TRACE[i].0.store(p as usize, Relaxed);
            TRACE[i]
                .1
                .store(if alloc { size } else { size | 1 << 63 }, Relaxed);
        }
    }
}

// SAFETY: forwards every call to mimalloc unchanged; the counters do not allocate.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        let p = unsafe { mimalloc::MiMalloc.alloc(l) };
        note(p, l.size(), true);
        p
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        note(p, l.size(), false);
        unsafe { mimalloc::MiMalloc.dealloc(p, l) }
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, n: usize) -> *mut u8 {
        let q = unsafe { mimalloc::MiMalloc.realloc(p, l, n) };
        note(p, l.size(), false);
        note(q, n, true);
        q
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

fn report(what: &str) {
    let mib = |a: &AtomicUsize| a.load(Relaxed) as f64 / (1 << 20) as f64;
    println!(
        "{what:28} live {:7.0} MiB   peak {:7.0} MiB",
        mib(&LIVE),
        mib(&PEAK)
    );
}

fn main() -> anyhow::Result<()> {
    use densepred_engine::optim::{param_groups, Optimizer};
    use densepred_engine::runner::{build_model, RunConfig};
    // As the CLI: freed memory stays in the process (tools/src/main.rs).
    // SAFETY: setting mimalloc's purge_delay option (index 15), settable at any time.
    unsafe { libmimalloc_sys::mi_option_set(15, -1) };
    let args: Vec<String> = std::env::args().collect();
    let config = args.get(1).context("usage: memprof CONFIG [SIZE]")?;
    let size: usize = args.get(2).map_or(Ok(512), |s| s.parse())?;
    let iters: usize = std::env::var("ITERS").map_or(Ok(3), |s| s.parse())?;
    let (cfg, _) = RunConfig::load(std::path::Path::new(config), &[])?;
    let model = build_model(&cfg.model, cfg.seed(), &Device::Cpu)?;
    let seg = model.segmentor()?;
    let ow = cfg.optim_wrapper.as_ref().context("no optim_wrapper")?;
    let mut opt = Optimizer::new(
        ow.optimizer.clone(),
        param_groups(
            model.vars.named_vars(),
            ow.paramwise_cfg.as_ref(),
            &|_| false,
            &[],
        ),
    );
    let x = Tensor::randn(0f32, 1.0, (2, 3, size, size), &Device::Cpu)?;
    let k = model.num_classes().max(1);
    let lab: Vec<u8> = (0..2 * size * size)
        .map(|i| ((i % size) * 7 / size % k) as u8)
        .collect();
    let labels = Tensor::from_vec(lab, (2, size, size), &Device::Cpu)?;
    for it in 0..iters {
        TRACE_ON.store(it == 1, Relaxed);
        PEAK.store(LIVE.load(Relaxed), Relaxed);
        println!("-- step {it}");
        let t = std::time::Instant::now();
        let losses = seg.loss(&x, &labels)?;
        report("forward + losses");
        let total = losses
            .into_iter()
            .map(|(_, v)| v)
            .reduce(|a, b| (a + b).expect("scalar sum"))
            .context("no loss")?;
        let grads = total.backward()?;
        report("backward");
        drop(total);
        let lr = opt.config().lr();
        opt.step(&grads, lr, 1.0)?;
        drop(grads);
        report("optimizer step");
        println!("step {:.2} s", t.elapsed().as_secs_f64());
    }
    TRACE_ON.store(false, Relaxed);
    if let Some(path) = std::env::var_os("MEMPROF_TRACE") {
        let n = TRACE_N.load(Relaxed).min(TRACE_CAP);
        let mut out = String::new();
        for (p, s) in &TRACE[..n] {
            let (p, s) = (p.load(Relaxed), s.load(Relaxed));
            let kind = if s >> 63 == 1 { "f" } else { "a" };
            out.push_str(&format!("{kind} {p} {}\n", s & !(1 << 63)));
        }
        std::fs::write(&path, out).with_context(|| format!("writing {path:?}"))?;
    }
    Ok(())
}
