#[global_allocator]
static G: mimalloc::MiMalloc = mimalloc::MiMalloc;
use candle_core::{DType, Device, Tensor};
use densepred_core::ops::*;
use std::time::Instant;
fn t<F: FnMut() -> Tensor>(name: &str, mut f: F) {
    for _ in 0..2 {
        f();
    }
    let n = 10;
    let s = Instant::now();
    for _ in 0..n {
        f();
    }
    println!(
        "{name:40} {:8.3} ms",
        s.elapsed().as_secs_f64() * 1e3 / n as f64
    );
}
fn main() {
    let d = Device::Cpu;
    for &(n, c, h) in &[(16384usize, 64usize, 128usize), (1024, 256, 32)] {
        println!("-- N={n} C={c}");
        let x = Tensor::randn(0f32, 1., (1, n, c), &d).unwrap();
        let w1 = Tensor::randn(0f32, 0.02, (4 * c, c), &d).unwrap();
        let lin = candle_nn::Linear::new(w1.clone(), None);
        t("linear c->4c", || {
            candle_core::Module::forward(&lin, &x).unwrap()
        });
        let hdn = candle_core::Module::forward(&lin, &x).unwrap();
        t("linear via 2d matmul", || {
            x.reshape((n, c)).unwrap().matmul(&w1.t().unwrap()).unwrap()
        });
        t("gelu_erf 4c", || hdn.gelu_erf().unwrap());
        t("gelu tanh 4c", || hdn.gelu().unwrap());
        t("add 4c", || (&hdn + &hdn).unwrap());
        t("to_map 4c (transpose copy)", || {
            hdn.transpose(1, 2).unwrap().contiguous().unwrap()
        });
        t("fast transpose 4c", || transpose_last2(&hdn).unwrap());
        t("fast gelu 4c", || gelu_erf(&hdn).unwrap());
        let m = hdn
            .transpose(1, 2)
            .unwrap()
            .contiguous()
            .unwrap()
            .reshape((1, 4 * c, h, h))
            .unwrap();
        let dw = Tensor::randn(0f32, 0.3, (4 * c, 1, 3, 3), &d).unwrap();
        t("dwconv3 4c", || {
            depthwise_conv2d(&m, &dw, None, DwConvParams::same(1)).unwrap()
        });
        let g = Tensor::ones(c, DType::F32, &d).unwrap();
        let b = Tensor::zeros(c, DType::F32, &d).unwrap();
        t("layernorm c", || layer_norm(&x, &g, &b, 1e-6).unwrap());
        if n == 1024 {
            let a = Tensor::randn(0f32, 1., (1, 8, n, n), &d).unwrap();
            t("softmax 8xNxN", || softmax_last_dim(&a).unwrap());
            let q = Tensor::randn(0f32, 1., (1, 8, n, 32), &d).unwrap();
            t("q@kT", || q.matmul(&q.t().unwrap()).unwrap());
            t("attn@v", || a.matmul(&q).unwrap());
        }
    }
}
#[allow(dead_code)]
fn more() {}
