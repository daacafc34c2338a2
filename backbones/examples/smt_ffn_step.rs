//! Forward + backward time of one SMT FFN sub-block (`x + FFN(LN(x))`, batch 2) at a stage's
//! size, for comparing with PyTorch piece by piece (`benchmarks/pytorch_smt_parts.py ffn`).
//!
//! `cargo run --release -p densepred-backbones --example smt_ffn_step -- C HW RATIO` (e.g.
//! `64 56 4` for stage 1 of SMT-T); `FUSED=1` uses `smt::detail_ffn` (what SMT runs), otherwise
//! the three composed ops; `IT=N` iterations (first 5 untimed). Prints the median.
#[global_allocator]
static G: mimalloc::MiMalloc = mimalloc::MiMalloc;
use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use densepred_backbones::smt::detail_ffn;
use densepred_core::nn::{LayerNorm, Linear};
use densepred_core::ops::*;
use std::time::Instant;

fn med(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn main() {
    densepred_core::threads::set_default_thread_env();
    densepred_core::threads::init_global_pool();
    densepred_core::threads::run_on_pool(main2)
}
fn main2() {
    let d = Device::Cpu;
    let args: Vec<String> = std::env::args().collect();
    let (c, hw, r) = (
        args[1].parse::<usize>().unwrap(),
        args[2].parse::<usize>().unwrap(),
        args[3].parse::<usize>().unwrap(),
    );
    let vm = VarMap::new();
    let vb = VarBuilder::from_varmap(&vm, DType::F32, &d);
    let ln = LayerNorm::new(vb.pp("ln"), c, 1e-6).unwrap();
    let fc1 = Linear::new(vb.pp("fc1"), c, c * r, true).unwrap();
    let fc2 = Linear::new(vb.pp("fc2"), c * r, c, true).unwrap();
    let dww = Var::from_tensor(&Tensor::randn(0f32, 0.1, (c * r, 1, 3, 3), &d).unwrap()).unwrap();
    let dwb = Var::from_tensor(&Tensor::zeros(c * r, DType::F32, &d).unwrap()).unwrap();
    let x = Var::from_tensor(&Tensor::randn(0f32, 1., (2, hw * hw, c), &d).unwrap()).unwrap();
    let mut ts = vec![];
    let iters: usize = std::env::var("IT")
        .ok()
        .map(|s| s.parse().unwrap())
        .unwrap_or(25);
    for i in 0..iters {
        let s = Instant::now();
        let xn = ln.forward(&x).unwrap();
        let f = if std::env::var_os("FUSED").is_some() {
            detail_ffn(
                &xn,
                &fc1.weight,
                fc1.bias.as_ref().unwrap(),
                &dww,
                &dwb,
                &fc2.weight,
                fc2.bias.as_ref().unwrap(),
                (hw, hw),
            )
            .unwrap()
        } else {
            let h = fc1.forward(&xn).unwrap();
            let z = token_dwconv(&h, &dww, &dwb, (hw, hw), LocalMode::ResidualGelu).unwrap();
            fc2.forward(&z).unwrap()
        };
        let y = (f + x.as_tensor()).unwrap();
        let g = y.mean_all().unwrap().backward().unwrap();
        drop(g);
        if i >= 5 {
            ts.push(s.elapsed().as_secs_f64() * 1e3);
        }
    }
    println!("mlp c={c} hw={hw} r={r}: median {:.2} ms", med(ts));
}
