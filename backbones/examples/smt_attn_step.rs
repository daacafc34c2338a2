//! Forward + backward time of one SMT attention sub-block (`x + Attn(LN(x))`, batch 2) at a
//! stage's size, for comparing with PyTorch piece by piece (`benchmarks/pytorch_smt_parts.py`).
//!
//! `cargo run --release -p densepred-backbones --example smt_attn_step -- C HW HEADS sam|msa`
//! (e.g. `64 56 4 sam`, `256 14 8 msa`). `INSTALL=1` runs on a rayon worker (as the CLI does);
//! `TOKEN=1` uses `ops::token_attention` for MSA (what SMT runs), otherwise the head split and
//! `scaled_dot_product_attention`. SAM here is the older composition (narrow per head + cat).
#[global_allocator]
static G: mimalloc::MiMalloc = mimalloc::MiMalloc;
use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use densepred_core::nn::{gelu, BatchNorm2d, Conv2d, ConvCfg, LayerNorm, Linear};
use densepred_core::ops::*;
use std::time::Instant;

fn med(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn main() {
    densepred_core::threads::set_default_thread_env();
    if std::env::var_os("INSTALL").is_some() {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(2)
            .build()
            .unwrap();
        return pool.install(main2);
    }
    main2()
}
fn main2() {
    let d = Device::Cpu;
    let args: Vec<String> = std::env::args().collect();
    let (c, hw, heads, sam) = (
        args[1].parse::<usize>().unwrap(),
        args[2].parse::<usize>().unwrap(),
        args[3].parse::<usize>().unwrap(),
        args[4] == "sam",
    );
    let vm = VarMap::new();
    let vb = VarBuilder::from_varmap(&vm, DType::F32, &d);
    let ln = LayerNorm::new(vb.pp("ln"), c, 1e-6).unwrap();
    let v = Linear::new(vb.pp("v"), c, c, true).unwrap();
    let s = Linear::new(vb.pp("s"), c, c, true).unwrap();
    let kv = Linear::new(vb.pp("kv"), c, 2 * c, true).unwrap();
    let proj = Linear::new(vb.pp("proj"), c, c, true).unwrap();
    let cg = c / heads;
    let convs: Vec<(Var, Var)> = (0..heads)
        .map(|i| {
            let k = 3 + 2 * i;
            (
                Var::from_tensor(&Tensor::randn(0f32, 0.1, (cg, 1, k, k), &d).unwrap()).unwrap(),
                Var::from_tensor(&Tensor::zeros(cg, DType::F32, &d).unwrap()).unwrap(),
            )
        })
        .collect();
    let proj0 = Conv2d::new(
        vb.pp("p0"),
        c,
        2 * c,
        1,
        ConvCfg {
            groups: cg,
            ..Default::default()
        },
        true,
    )
    .unwrap();
    let bn = BatchNorm2d::new(vb.pp("bn"), 2 * c, 1e-5).unwrap();
    let proj1 = Conv2d::new(vb.pp("p1"), 2 * c, c, 1, ConvCfg::default(), true).unwrap();
    let lw = Var::from_tensor(&Tensor::randn(0f32, 0.1, (c, 1, 3, 3), &d).unwrap()).unwrap();
    let lb = Var::from_tensor(&Tensor::zeros(c, DType::F32, &d).unwrap()).unwrap();
    let x = Var::from_tensor(&Tensor::randn(0f32, 1., (2, hw * hw, c), &d).unwrap()).unwrap();
    let b = 2;
    let n = hw * hw;
    let mut ts = vec![];
    let iters: usize = std::env::var("IT")
        .ok()
        .map(|s| s.parse().unwrap())
        .unwrap_or(25);
    for i in 0..iters {
        let t0 = Instant::now();
        let y = ln.forward(&x).unwrap();
        let a = if sam {
            let vv = v.forward(&y).unwrap();
            let sm = transpose_last2(&s.forward(&y).unwrap())
                .unwrap()
                .reshape((b, c, hw, hw))
                .unwrap();
            let outs: Vec<Tensor> = convs
                .iter()
                .enumerate()
                .map(|(i, (w, bb))| {
                    depthwise_conv2d(
                        &sm.narrow(1, i * cg, cg).unwrap(),
                        w,
                        Some(bb),
                        DwConvParams::same(1 + i),
                    )
                    .unwrap()
                    .unsqueeze(2)
                    .unwrap()
                })
                .collect();
            let mixed = Tensor::cat(&outs, 2)
                .unwrap()
                .reshape((b, c, hw, hw))
                .unwrap();
            let m = bn.forward(&proj0.forward(&mixed).unwrap(), true).unwrap();
            let m = proj1.forward(&gelu(&m).unwrap()).unwrap();
            let m = transpose_last2(&m.reshape((b, c, n)).unwrap()).unwrap();
            proj.forward(&(m * vv).unwrap()).unwrap()
        } else {
            let d_ = c / heads;
            if std::env::var_os("TOKEN").is_some() {
                let q = s.forward(&y).unwrap();
                let kvt = kv.forward(&y).unwrap();
                let o = token_attention(&q, &kvt, heads, (d_ as f64).powf(-0.5)).unwrap();
                let vt = kvt.narrow(2, c, c).unwrap();
                let local = token_dwconv(&vt, &lw, &lb, (hw, hw), LocalMode::Plain).unwrap();
                proj.forward(&(o + local).unwrap()).unwrap()
            } else {
                let q = s
                    .forward(&y)
                    .unwrap()
                    .reshape((b, n, heads, d_))
                    .unwrap()
                    .transpose(1, 2)
                    .unwrap()
                    .contiguous()
                    .unwrap();
                let kvv = kv
                    .forward(&y)
                    .unwrap()
                    .reshape((b, n, 2, heads, d_))
                    .unwrap()
                    .permute((2, 0, 3, 1, 4))
                    .unwrap();
                let k = kvv.get(0).unwrap().contiguous().unwrap();
                let vv = kvv.get(1).unwrap().contiguous().unwrap();
                let o = scaled_dot_product_attention(&q, &k, &vv, (d_ as f64).powf(-0.5)).unwrap();
                let o = o.transpose(1, 2).unwrap().reshape((b, n, c)).unwrap();
                let vt = vv.transpose(1, 2).unwrap().reshape((b, n, c)).unwrap();
                let local = token_dwconv(&vt, &lw, &lb, (hw, hw), LocalMode::Plain).unwrap();
                proj.forward(&(o + local).unwrap()).unwrap()
            }
        };
        let out = (a + x.as_tensor()).unwrap();
        let g = out.mean_all().unwrap().backward().unwrap();
        drop(g);
        if i >= 5 {
            ts.push(t0.elapsed().as_secs_f64() * 1e3);
        }
    }
    println!(
        "{} c={c} hw={hw} heads={heads}: median {:.2} ms",
        args[4],
        med(ts)
    );
}
